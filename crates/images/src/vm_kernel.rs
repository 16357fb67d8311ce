//! The `vm` image's kernel: the uncompressed ELF inside a Debian bzImage,
//! which QEMU boots through PVH straight into 64-bit code (no real-mode
//! setup, no in-guest decompression: about 2 s less per boot under TCG).
//! What the kernel's own `scripts/extract-vmlinux` does, for the payload
//! formats Debian uses, read from the bzImage's setup header.

use crate::ImageError;

/// Offset of the setup header's `setup_sects` byte (x86 boot protocol).
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// Offset of the boot protocol's "HdrS" magic.
const HEADER_MAGIC_OFFSET: usize = 0x202;
/// Offsets of `payload_offset` and `payload_length` (protocol 2.08+).
const PAYLOAD_OFFSET_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH_OFFSET: usize = 0x24c;
/// The largest kernel this recipe unpacks.
pub const MAX_VMLINUX_BYTES: u64 = 512 << 20;
/// Xen's ELF note type for a 32-bit PVH entry point, which QEMU looks for
/// to boot an ELF kernel directly.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn fail(reason: impl Into<String>) -> ImageError {
    ImageError::VmRecipe {
        reason: reason.into(),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The compressed kernel inside a bzImage: its bytes, as the setup header
/// places them (the last 4 are the uncompressed size, which xz ignores).
fn payload(bzimage: &[u8]) -> Result<&[u8], ImageError> {
    if bzimage.get(HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4) != Some(b"HdrS") {
        return Err(fail("the kernel is not a bzImage (no HdrS setup header)"));
    }
    let setup_sects = match bzimage.get(SETUP_SECTS_OFFSET).copied() {
        Some(0) | None => 4,
        Some(n) => n as usize,
    };
    let offset = u32_at(bzimage, PAYLOAD_OFFSET_OFFSET).unwrap_or(0) as usize;
    let length = u32_at(bzimage, PAYLOAD_LENGTH_OFFSET).unwrap_or(0) as usize;
    let start = (setup_sects + 1) * 512 + offset;
    bzimage
        .get(start..start.saturating_add(length))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| fail("the bzImage's payload lies outside the file"))
}

/// The uncompressed `vmlinux` ELF inside a bzImage (an xz payload, as
/// Debian builds them).
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, ImageError> {
    let payload = payload(bzimage)?;
    if !payload.starts_with(b"\xfd7zXZ\x00") {
        let magic: Vec<String> = payload.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return Err(fail(format!(
            "the kernel's payload is compressed in a format this recipe does not read (magic {}); Debian's kernels use xz",
            magic.join(" ")
        )));
    }
    let vmlinux = unxz_one_stream(payload)?;
    if !vmlinux.starts_with(b"\x7fELF\x02\x01") {
        return Err(fail(
            "the bzImage's payload is not a 64-bit little-endian ELF",
        ));
    }
    Ok(vmlinux)
}

/// Decompresses the first xz stream of `input` and stops at its end: the
/// 4 size bytes the kernel's build appends are not a second stream.
fn unxz_one_stream(input: &[u8]) -> Result<Vec<u8>, ImageError> {
    use xz2::stream::{Action, Status, Stream};
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0)
        .map_err(|e| fail(format!("cannot start the xz decoder: {e}")))?;
    let mut output: Vec<u8> = Vec::with_capacity(input.len() * 4);
    loop {
        if output.len() == output.capacity() {
            if output.len() as u64 >= MAX_VMLINUX_BYTES {
                return Err(fail(format!(
                    "the uncompressed kernel is over {MAX_VMLINUX_BYTES} bytes"
                )));
            }
            output.reserve(output.len().max(1 << 20));
        }
        let consumed = stream.total_in() as usize;
        let status = stream
            .process_vec(&input[consumed..], &mut output, Action::Run)
            .map_err(|e| fail(format!("the kernel's xz payload does not decompress: {e}")))?;
        match status {
            Status::StreamEnd => return Ok(output),
            _ if stream.total_in() as usize == input.len() && output.len() < output.capacity() => {
                return Err(fail("the kernel's xz payload ends early"));
            }
            _ => {}
        }
    }
}

/// Whether an ELF64 kernel has a PVH entry note (QEMU boots it with
/// `-kernel` only then).
pub fn has_pvh_entry(elf: &[u8]) -> bool {
    let (Some(program_headers), Some(entry_size), Some(count)) =
        (u64_at(elf, 0x20), u16_at(elf, 0x36), u16_at(elf, 0x38))
    else {
        return false;
    };
    (0..count as usize).any(|i| {
        let header = program_headers as usize + i * entry_size as usize;
        // PT_NOTE is 4.
        if u32_at(elf, header) != Some(4) {
            return false;
        }
        let (Some(offset), Some(size)) = (u64_at(elf, header + 8), u64_at(elf, header + 32)) else {
            return false;
        };
        let notes = elf
            .get(offset as usize..(offset as usize).saturating_add(size as usize))
            .unwrap_or(&[]);
        note_types(notes).contains(&XEN_ELFNOTE_PHYS32_ENTRY)
    })
}

/// The types of the "Xen" notes in an ELF note segment.
fn note_types(mut notes: &[u8]) -> Vec<u32> {
    let align4 = |n: usize| (n + 3) & !3;
    let mut types = Vec::new();
    while let (Some(name_size), Some(desc_size), Some(kind)) =
        (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
    {
        let name_end = 12 + name_size as usize;
        let name = notes.get(12..name_end).unwrap_or(&[]);
        if name.starts_with(b"Xen") {
            types.push(kind);
        }
        let next = 12 + align4(name_size as usize) + align4(desc_size as usize);
        match notes.get(next..) {
            Some(rest) if next > 12 => notes = rest,
            _ => break,
        }
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 with one PT_NOTE segment holding one "Xen" note of `kind`.
    fn elf_with_note(kind: u32) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_offset = elf.len() as u64;
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&kind.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&4u32.to_le_bytes());
        elf[0x48..0x50].copy_from_slice(&note_offset.to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        elf
    }

    #[test]
    fn a_pvh_note_is_found_and_another_note_is_not_taken_for_one() {
        assert!(has_pvh_entry(&elf_with_note(XEN_ELFNOTE_PHYS32_ENTRY)));
        assert!(!has_pvh_entry(&elf_with_note(6)));
        assert!(!has_pvh_entry(b"\x7fELF"));
    }

    /// A bzImage header around `payload`, with setup_sects 1.
    fn bzimage_around(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        image[SETUP_SECTS_OFFSET] = 1;
        image[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        image[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 4]
            .copy_from_slice(&0u32.to_le_bytes());
        image[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image
    }

    #[test]
    fn an_xz_payload_is_unpacked_and_other_inputs_are_refused_by_name() {
        use std::io::Write;
        let elf = elf_with_note(XEN_ELFNOTE_PHYS32_ENTRY);
        let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 6);
        encoder.write_all(&elf).unwrap();
        let mut payload = encoder.finish().unwrap();
        // As in a real bzImage: the uncompressed size follows the stream.
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract_vmlinux(&bzimage_around(&payload)).unwrap(), elf);

        let not_bz = extract_vmlinux(&[0u8; 2048]).unwrap_err().to_string();
        assert!(not_bz.contains("not a bzImage"), "{not_bz}");
        let gzip = extract_vmlinux(&bzimage_around(b"\x1f\x8b\x08\0\0\0")).unwrap_err();
        assert!(gzip.to_string().contains("magic 1f 8b"), "{gzip}");
    }
}
