//! Workloads (seed 003, FIG. 4): instances wanted from a start time to an end
//! time, with a priority and placement rules. Validation names the field at
//! fault the way the workload file spells it (`instance[1].vcpus`,
//! `rule[0].instances`), so the CLI can point at the line.

use super::capacity::Capacity;
use crate::error::FieldError;
use crate::terms::{MAX_DISK_GIB, MAX_MEMORY_MIB};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most instances in one workload and rules in one workload.
pub const MAX_INSTANCES_PER_WORKLOAD: usize = 1024;
pub const MAX_RULES_PER_WORKLOAD: usize = 256;
/// Most vCPUs one instance may ask for.
pub const MAX_INSTANCE_VCPUS: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl InstanceSpec {
    /// What the instance is to be guaranteed (whole vCPUs, in centicores).
    pub fn capacity(&self) -> Capacity {
        Capacity::new(u64::from(self.vcpus) * 100, self.memory_mib, self.disk_gib)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Each listed instance on a different host (reliability, FIG. 11).
    Spread,
    /// All listed instances on one host (speed, FIG. 11).
    Pack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlacementRule {
    pub kind: RuleKind,
    pub instances: Vec<String>,
}

/// A workload as the broker keeps it: times in milliseconds since the epoch,
/// its owner, and `seq`, the order it was first applied in (the queue of
/// FIG. 12 among equal priorities).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Workload {
    pub name: String,
    pub owner: String,
    pub priority: i64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub instances: Vec<InstanceSpec>,
    #[serde(default)]
    pub rules: Vec<PlacementRule>,
    pub seq: u64,
}

/// What the planner places as one unit: an instance, or the instances a pack
/// rule keeps together (their capacities summed, one pool on one host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The first instance's name: the demand's key.
    pub key: String,
    pub instances: Vec<String>,
    pub target: Capacity,
}

/// A name of a workload or an instance: 1 to 64 of `a-z A-Z 0-9 - _ .`.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    let good = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if good {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
        ))
    }
}

impl Workload {
    /// Every field in range and the rules consistent; the first problem,
    /// named by its field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_name("name", &self.name)?;
        if self.end_ms <= self.start_ms {
            return Err(FieldError::new("end", "must be after start"));
        }
        if self.instances.is_empty() {
            return Err(FieldError::new(
                "instance",
                "a workload needs at least one [[instance]]",
            ));
        }
        if self.instances.len() > MAX_INSTANCES_PER_WORKLOAD {
            return Err(FieldError::new(
                "instance",
                format!("at most {MAX_INSTANCES_PER_WORKLOAD} instances per workload"),
            ));
        }
        let mut seen = BTreeMap::new();
        for (index, instance) in self.instances.iter().enumerate() {
            validate_instance(index, instance)?;
            if let Some(first) = seen.insert(instance.name.as_str(), index) {
                return Err(FieldError::new(
                    format!("instance[{index}].name"),
                    format!("`{}` is also the name of instance[{first}]", instance.name),
                ));
            }
        }
        self.validate_rules(&seen)?;
        Ok(())
    }

    fn validate_rules(&self, names: &BTreeMap<&str, usize>) -> Result<(), FieldError> {
        if self.rules.len() > MAX_RULES_PER_WORKLOAD {
            return Err(FieldError::new(
                "rule",
                format!("at most {MAX_RULES_PER_WORKLOAD} rules per workload"),
            ));
        }
        for (index, rule) in self.rules.iter().enumerate() {
            let field = format!("rule[{index}].instances");
            if rule.instances.is_empty() {
                return Err(FieldError::new(field, "names no instance"));
            }
            let mut in_rule = std::collections::BTreeSet::new();
            for name in &rule.instances {
                if !names.contains_key(name.as_str()) {
                    return Err(FieldError::new(
                        field,
                        format!("`{name}` is not an instance of this workload"),
                    ));
                }
                if !in_rule.insert(name.as_str()) {
                    return Err(FieldError::new(field, format!("`{name}` is listed twice")));
                }
            }
        }
        let groups = self.pack_groups();
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.kind != RuleKind::Spread {
                continue;
            }
            for (i, a) in rule.instances.iter().enumerate() {
                for b in &rule.instances[i + 1..] {
                    if groups[a.as_str()] == groups[b.as_str()] {
                        return Err(FieldError::new(
                            format!("rule[{index}].instances"),
                            format!("`{a}` and `{b}` must be on different hosts here, but a pack rule keeps them on one host: the rules cannot both hold"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Each instance's pack group, as the index of the group's first
    /// instance (union of the pack rules).
    fn pack_groups(&self) -> BTreeMap<&str, usize> {
        let mut parent: Vec<usize> = (0..self.instances.len()).collect();
        fn root(parent: &mut [usize], mut at: usize) -> usize {
            while parent[at] != at {
                parent[at] = parent[parent[at]];
                at = parent[at];
            }
            at
        }
        let index_of: BTreeMap<&str, usize> = self
            .instances
            .iter()
            .enumerate()
            .map(|(i, instance)| (instance.name.as_str(), i))
            .collect();
        for rule in self.rules.iter().filter(|r| r.kind == RuleKind::Pack) {
            let members: Vec<usize> = rule
                .instances
                .iter()
                .filter_map(|name| index_of.get(name.as_str()).copied())
                .collect();
            for pair in members.windows(2) {
                let (a, b) = (root(&mut parent, pair[0]), root(&mut parent, pair[1]));
                parent[a.max(b)] = a.min(b);
            }
        }
        (0..self.instances.len())
            .map(|i| (self.instances[i].name.as_str(), root(&mut parent, i)))
            .collect()
    }

    /// The units the planner places, in declaration order.
    pub fn demands(&self) -> Vec<Demand> {
        let groups = self.pack_groups();
        let mut demands: BTreeMap<usize, Demand> = BTreeMap::new();
        for instance in &self.instances {
            let group = groups[instance.name.as_str()];
            let demand = demands.entry(group).or_insert_with(|| Demand {
                key: instance.name.clone(),
                instances: Vec::new(),
                target: Capacity::ZERO,
            });
            demand.instances.push(instance.name.clone());
            demand.target = demand.target.saturating_add(instance.capacity());
        }
        demands.into_values().collect()
    }

    /// Whether a spread rule keeps instances `a` and `b` on different hosts.
    pub fn spread_apart(&self, a: &[String], b: &[String]) -> bool {
        self.rules
            .iter()
            .filter(|r| r.kind == RuleKind::Spread)
            .any(|rule| {
                rule.instances.iter().any(|x| a.contains(x))
                    && rule.instances.iter().any(|y| b.contains(y))
            })
    }
}

fn validate_instance(index: usize, instance: &InstanceSpec) -> Result<(), FieldError> {
    let field = |name: &str| format!("instance[{index}].{name}");
    check_name(&field("name"), &instance.name)?;
    if instance.vcpus == 0 || instance.vcpus > MAX_INSTANCE_VCPUS {
        return Err(FieldError::new(
            field("vcpus"),
            format!("must be 1 to {MAX_INSTANCE_VCPUS}"),
        ));
    }
    if instance.memory_mib == 0 || instance.memory_mib > MAX_MEMORY_MIB {
        return Err(FieldError::new(
            field("memory_mib"),
            format!("must be 1 to {MAX_MEMORY_MIB}"),
        ));
    }
    if instance.disk_gib > MAX_DISK_GIB {
        return Err(FieldError::new(
            field("disk_gib"),
            format!("must be at most {MAX_DISK_GIB}"),
        ));
    }
    if let Some(image) = &instance.image {
        crate::image_ref::parse_image_reference(&field("image"), image)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn instance(name: &str, vcpus: u32, memory_mib: u64) -> InstanceSpec {
        InstanceSpec {
            name: name.into(),
            vcpus,
            memory_mib,
            disk_gib: 1,
            image: None,
        }
    }

    fn workload(instances: Vec<InstanceSpec>, rules: Vec<PlacementRule>) -> Workload {
        Workload {
            name: "w".into(),
            owner: "ops".into(),
            priority: 0,
            start_ms: 1_000,
            end_ms: 2_000,
            instances,
            rules,
            seq: 1,
        }
    }

    fn rule(kind: RuleKind, names: &[&str]) -> PlacementRule {
        PlacementRule {
            kind,
            instances: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn fields_at_fault_are_named() {
        let mut w = workload(vec![instance("a", 0, 1)], vec![]);
        assert_eq!(w.validate().unwrap_err().field, "instance[0].vcpus");
        w.instances = vec![instance("a", 1, 1), instance("a", 1, 1)];
        assert_eq!(w.validate().unwrap_err().field, "instance[1].name");
        w.instances = vec![instance("a", 1, 1)];
        w.end_ms = 1_000;
        assert_eq!(w.validate().unwrap_err().field, "end");
        w.end_ms = 2_000;
        w.rules = vec![rule(RuleKind::Spread, &["a", "b"])];
        let error = w.validate().unwrap_err();
        assert_eq!(error.field, "rule[0].instances");
        assert!(error.problem.contains("`b`"), "{error}");
    }

    #[test]
    fn pack_and_spread_of_the_same_pair_is_refused_with_the_reason() {
        let w = workload(
            vec![
                instance("a", 1, 1),
                instance("b", 1, 1),
                instance("c", 1, 1),
            ],
            vec![
                rule(RuleKind::Pack, &["a", "b"]),
                rule(RuleKind::Pack, &["b", "c"]),
                rule(RuleKind::Spread, &["c", "a"]),
            ],
        );
        let error = w.validate().unwrap_err();
        assert_eq!(error.field, "rule[2].instances");
        assert!(error.problem.contains("cannot both hold"), "{error}");
    }

    #[test]
    fn pack_rules_make_one_demand_with_the_summed_target() {
        let w = workload(
            vec![
                instance("a", 1, 100),
                instance("b", 2, 200),
                instance("c", 1, 50),
            ],
            vec![
                rule(RuleKind::Pack, &["a", "c"]),
                rule(RuleKind::Spread, &["a", "b"]),
            ],
        );
        w.validate().unwrap();
        let demands = w.demands();
        assert_eq!(demands.len(), 2);
        assert_eq!(demands[0].instances, vec!["a", "c"]);
        assert_eq!(demands[0].target, Capacity::new(200, 150, 2));
        assert_eq!(demands[1].instances, vec!["b"]);
        assert!(w.spread_apart(&demands[0].instances, &demands[1].instances));
    }
}
