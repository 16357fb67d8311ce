//! Terms (lending conditions 103: CPU count, CPU cap, memory, disk, OS, rate),
//! requirements (borrowing requirements: performance and rate) and host
//! capacity with its owner share.

use crate::error::FieldError;
use crate::money::MAX_PRICE_PER_HOUR_MICROS;
use serde::{Deserialize, Serialize};

pub const MAX_VCPUS: u32 = 1024;
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024; // 16 TiB
pub const MAX_DISK_GIB: u64 = 1024 * 1024; // 1 PiB
pub const MAX_IMAGES_PER_PARTITION: usize = 32;
pub const MAX_IMAGE_NAME_LEN: usize = 64;

/// What a lender offers for one partition, and at what price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Terms {
    #[schema(minimum = 1, maximum = 1024)]
    pub vcpus: u32,
    /// Share of each vCPU the partition may use, in percent (1..=100).
    #[schema(minimum = 1, maximum = 100)]
    pub cpu_cap_percent: u32,
    #[schema(minimum = 1, maximum = 16777216)]
    pub memory_mib: u64,
    #[schema(minimum = 1, maximum = 1048576)]
    pub disk_gib: u64,
    /// The images (operating systems) this partition can boot.
    #[schema(min_items = 1, max_items = 32)]
    pub images: Vec<String>,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    #[schema(maximum = 1000000000000_i64)]
    pub price_per_hour_micros: u64,
    /// How strongly the partition's jobs are kept apart from the host and
    /// from each other. The host's agent sets it from its driver; absent in
    /// rows written before it existed, and then treated as unisolated until
    /// the agent states it again at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

/// The isolation a partition driver gives its jobs, weakest first.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Plain processes of the host (`process` driver): same file system,
    /// same kernel view, for trusted borrowers only.
    None,
    /// Jobs that run nowhere real (`sim` driver): nothing to escape from.
    Simulated,
    /// Containers with their own namespaces, cgroup and seccomp (`oci`).
    Container,
    /// Virtual machines with their own kernel (`vm`).
    VirtualMachine,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Simulated => "simulated",
            Isolation::Container => "container",
            Isolation::VirtualMachine => "virtual_machine",
        }
    }
}

impl Terms {
    /// The image a job boots when it names none: the partition's first
    /// offered image. The one place that default is chosen (the agent's
    /// key check and the `oci` driver both ask here).
    pub fn default_image(&self) -> Option<&str> {
        self.images.first().map(String::as_str)
    }

    /// Whether a borrower must opt in to lease this partition: its isolation
    /// is `none`, or unknown (an old row, or a lender that did not say).
    pub fn is_unisolated(&self) -> bool {
        matches!(self.isolation, None | Some(Isolation::None))
    }

    /// CPU in hundredths of a core: what this partition takes from its host.
    pub fn cpu_centicores(&self) -> u64 {
        self.vcpus as u64 * self.cpu_cap_percent as u64
    }

    /// Checks every field; `known_images`, when given, is what the host can boot.
    pub fn validate(&self, known_images: Option<&[String]>) -> Result<(), FieldError> {
        check_range("vcpus", self.vcpus as u64, 1, MAX_VCPUS as u64)?;
        check_range("cpu_cap_percent", self.cpu_cap_percent as u64, 1, 100)?;
        check_range("memory_mib", self.memory_mib, 1, MAX_MEMORY_MIB)?;
        check_range("disk_gib", self.disk_gib, 1, MAX_DISK_GIB)?;
        check_range(
            "price_per_hour_micros",
            self.price_per_hour_micros,
            0,
            MAX_PRICE_PER_HOUR_MICROS,
        )?;
        if self.images.is_empty() {
            return Err(FieldError::new("images", "must list at least one image"));
        }
        if self.images.len() > MAX_IMAGES_PER_PARTITION {
            return Err(FieldError::new(
                "images",
                format!("at most {MAX_IMAGES_PER_PARTITION} images"),
            ));
        }
        for (position, image) in self.images.iter().enumerate() {
            let field = format!("images[{position}]");
            crate::image_ref::parse_image_reference(&field, image)?;
            if let Some(known) = known_images {
                if !known.iter().any(|k| k == image) {
                    return Err(FieldError::new(
                        field,
                        format!(
                            "unknown image '{image}'; this host can boot: {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
            // One digest per name, so that a request by name picks one image.
            let name = crate::image_ref::image_name(image);
            if self.images[..position]
                .iter()
                .any(|other| crate::image_ref::image_name(other) == name)
            {
                return Err(FieldError::new(
                    field,
                    format!("image '{image}' listed twice"),
                ));
            }
        }
        Ok(())
    }
}

pub fn validate_image_name(field: &str, image: &str) -> Result<(), FieldError> {
    let ok = !image.is_empty()
        && image.len() <= MAX_IMAGE_NAME_LEN
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("'{image}' is not an image name (1 to {MAX_IMAGE_NAME_LEN} of a-z, 0-9, '-', '_', '.', ':')"),
        ))
    }
}

fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), FieldError> {
    if value < min || value > max {
        return Err(FieldError::new(
            field,
            format!("{value} is out of range; must be between {min} and {max}"),
        ));
    }
    Ok(())
}

/// What a borrower needs. Every field is optional; an absent field matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1024)]
    pub min_vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub min_cpu_cap_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16777216)]
    pub min_memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1048576)]
    pub min_disk_gib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    #[schema(maximum = 1000000000000_i64)]
    pub max_price_per_hour_micros: Option<u64>,
    /// The borrower accepts partitions without isolation (the `process`
    /// driver). Off unless asked: nobody gets one by accident.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unisolated: bool,
}

impl Requirements {
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(v) = self.min_vcpus {
            check_range("min_vcpus", v as u64, 1, MAX_VCPUS as u64)?;
        }
        if let Some(v) = self.min_cpu_cap_percent {
            check_range("min_cpu_cap_percent", v as u64, 1, 100)?;
        }
        if let Some(v) = self.min_memory_mib {
            check_range("min_memory_mib", v, 1, MAX_MEMORY_MIB)?;
        }
        if let Some(v) = self.min_disk_gib {
            check_range("min_disk_gib", v, 1, MAX_DISK_GIB)?;
        }
        if let Some(v) = self.max_price_per_hour_micros {
            check_range("max_price_per_hour_micros", v, 0, MAX_PRICE_PER_HOUR_MICROS)?;
        }
        if let Some(image) = &self.image {
            crate::image_ref::parse_image_reference("image", image)?;
        }
        Ok(())
    }
}

/// What a host has, and the owner share it keeps for itself and never lends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostCapacity {
    #[schema(minimum = 1, maximum = 102400)]
    pub cpu_centicores: u64,
    #[schema(maximum = 16777216)]
    pub memory_mib: u64,
    #[schema(maximum = 1048576)]
    pub disk_gib: u64,
    pub owner_share_cpu_centicores: u64,
    pub owner_share_memory_mib: u64,
    pub owner_share_disk_gib: u64,
}

impl HostCapacity {
    /// Every figure in range and the owner share within the host; the
    /// refusal names `capacity.<field>`.
    pub fn validate(&self) -> Result<(), FieldError> {
        let check = |field: &str, value: u64, max: u64| -> Result<(), FieldError> {
            if value > max {
                return Err(FieldError::new(
                    format!("capacity.{field}"),
                    format!("{value} is out of range; at most {max}"),
                ));
            }
            Ok(())
        };
        check("cpu_centicores", self.cpu_centicores, 1024 * 100)?;
        check("memory_mib", self.memory_mib, MAX_MEMORY_MIB)?;
        check("disk_gib", self.disk_gib, MAX_DISK_GIB)?;
        check(
            "owner_share_cpu_centicores",
            self.owner_share_cpu_centicores,
            self.cpu_centicores,
        )?;
        check(
            "owner_share_memory_mib",
            self.owner_share_memory_mib,
            self.memory_mib,
        )?;
        check(
            "owner_share_disk_gib",
            self.owner_share_disk_gib,
            self.disk_gib,
        )?;
        if self.cpu_centicores == 0 {
            return Err(FieldError::new(
                "capacity.cpu_centicores",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The same host with capacity held elsewhere (pools, started
    /// instances) taken out of what it can lend.
    pub fn less(&self, cpu_centicores: u64, memory_mib: u64, disk_gib: u64) -> HostCapacity {
        HostCapacity {
            cpu_centicores: self.cpu_centicores.saturating_sub(cpu_centicores),
            memory_mib: self.memory_mib.saturating_sub(memory_mib),
            disk_gib: self.disk_gib.saturating_sub(disk_gib),
            ..self.clone()
        }
    }

    /// Checks that `candidate` fits beside `others` without touching the owner
    /// share. Returns the field that does not fit and by how much.
    pub fn admits<'a>(
        &self,
        others: impl Iterator<Item = &'a Terms>,
        candidate: &Terms,
    ) -> Result<(), FieldError> {
        let (mut cpu, mut memory, mut disk) = (0u64, 0u64, 0u64);
        for terms in others {
            cpu += terms.cpu_centicores();
            memory += terms.memory_mib;
            disk += terms.disk_gib;
        }
        let lendable_cpu = self
            .cpu_centicores
            .saturating_sub(self.owner_share_cpu_centicores);
        let lendable_memory = self.memory_mib.saturating_sub(self.owner_share_memory_mib);
        let lendable_disk = self.disk_gib.saturating_sub(self.owner_share_disk_gib);
        if cpu + candidate.cpu_centicores() > lendable_cpu {
            return Err(FieldError::new(
                "vcpus",
                format!(
                    "not enough CPU on this host: {} of {} lendable centicores are lent already, this partition needs {} (vcpus x cpu_cap_percent)",
                    cpu, lendable_cpu, candidate.cpu_centicores()
                ),
            ));
        }
        if memory + candidate.memory_mib > lendable_memory {
            return Err(FieldError::new(
                "memory_mib",
                format!(
                    "not enough memory on this host: {memory} of {lendable_memory} lendable MiB are lent already, this partition needs {}",
                    candidate.memory_mib
                ),
            ));
        }
        if disk + candidate.disk_gib > lendable_disk {
            return Err(FieldError::new(
                "disk_gib",
                format!(
                    "not enough disk on this host: {disk} of {lendable_disk} lendable GiB are lent already, this partition needs {}",
                    candidate.disk_gib
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn sample_terms() -> Terms {
    Terms {
        vcpus: 2,
        cpu_cap_percent: 50,
        memory_mib: 1024,
        disk_gib: 10,
        images: vec!["busybox".into()],
        price_per_hour_micros: 100_000,
        isolation: Some(Isolation::Container),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let check = |mutate: fn(&mut Terms), field: &str| {
            let mut terms = sample_terms();
            mutate(&mut terms);
            let error = terms.validate(Some(&["busybox".to_string()])).unwrap_err();
            assert_eq!(error.field, field);
        };
        check(|t| t.vcpus = 0, "vcpus");
        check(|t| t.vcpus = 1_000_000, "vcpus");
        check(|t| t.cpu_cap_percent = 101, "cpu_cap_percent");
        check(|t| t.memory_mib = 0, "memory_mib");
        check(|t| t.disk_gib = u64::MAX, "disk_gib");
        check(
            |t| t.price_per_hour_micros = u64::MAX,
            "price_per_hour_micros",
        );
        check(|t| t.images.clear(), "images");
        check(|t| t.images = vec!["windows".into()], "images[0]");
        check(
            |t| t.images = vec!["busybox".into(), "busybox".into()],
            "images[1]",
        );
        check(|t| t.images = vec!["bad name".into()], "images[0]");
        assert!(sample_terms().validate(None).is_ok());
    }

    #[test]
    fn capacity_keeps_the_owner_share() {
        let host = HostCapacity {
            cpu_centicores: 200,
            memory_mib: 4096,
            disk_gib: 100,
            owner_share_cpu_centicores: 50,
            owner_share_memory_mib: 1024,
            owner_share_disk_gib: 10,
        };
        let one = sample_terms(); // 100 centicores, 1024 MiB
        assert!(host.admits([].iter(), &one).is_ok());
        assert!(host.admits([one.clone()].iter(), &one).is_err());
        let mut small = one.clone();
        small.vcpus = 1;
        assert!(host.admits([one.clone()].iter(), &small).is_ok());
        let mut big_memory = small.clone();
        big_memory.memory_mib = 2049;
        assert_eq!(
            host.admits([one].iter(), &big_memory).unwrap_err().field,
            "memory_mib"
        );
    }
}
