//! Extracts the uncompressed kernel ELF (`vmlinux`) from an x86 bzImage.
//!
//! QEMU boots an ELF `vmlinux` through its Xen PVH entry point, skipping the real-mode
//! setup and the in-guest decompressor: far faster than a bzImage, above all under TCG.
//! The bzImage's protected-mode part carries the compressed ELF at `payload_offset`
//! (boot protocol 2.08+). Debian compresses it with XZ and the x86 BCJ filter.

use std::io::Read;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// Upper bound of an uncompressed kernel: refuses a decompression bomb.
pub const MAX_VMLINUX: u64 = 512 << 20;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];

#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("not an x86 bzImage: no `HdrS` setup header at offset 0x202")]
    NotBzImage,
    #[error("bzImage boot protocol {0:#06x} is older than 2.08 (no payload fields)")]
    OldProtocol(u16),
    #[error(
        "bzImage payload (offset {offset:#x}, length {len}) lies outside the {size}-byte file"
    )]
    PayloadOutOfRange { offset: u64, len: u64, size: usize },
    #[error("bzImage payload is not XZ-compressed (starts with {0:02x?}); only XZ kernels are supported")]
    NotXz(Vec<u8>),
    #[error("decompressing the bzImage's XZ payload failed")]
    Decompress(#[source] std::io::Error),
    #[error("decompressed kernel is over {MAX_VMLINUX} bytes: refusing it")]
    TooLarge,
    #[error("decompressed kernel is not a 64-bit x86 ELF executable")]
    NotElf,
    #[error("decompressed kernel has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted as vmlinux; build it with CONFIG_PVH=y")]
    NoPvhNote,
}

/// Returns the uncompressed, PVH-bootable ELF kernel held in `bzimage`.
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err(VmlinuxError::NotBzImage);
    }
    let version = le16(bzimage, 0x206).ok_or(VmlinuxError::NotBzImage)?;
    if version < 0x0208 {
        return Err(VmlinuxError::OldProtocol(version));
    }
    let setup_sects = match bzimage
        .get(0x1f1)
        .copied()
        .ok_or(VmlinuxError::NotBzImage)?
    {
        0 => 4,
        n => u64::from(n),
    };
    let payload_offset = u64::from(le32(bzimage, 0x248).ok_or(VmlinuxError::NotBzImage)?);
    let payload_len = u64::from(le32(bzimage, 0x24c).ok_or(VmlinuxError::NotBzImage)?);
    let start = (setup_sects + 1) * 512 + payload_offset;
    let end = start + payload_len;
    let out_of_range = || VmlinuxError::PayloadOutOfRange {
        offset: start,
        len: payload_len,
        size: bzimage.len(),
    };
    let payload = bzimage
        .get(
            usize::try_from(start).map_err(|_| out_of_range())?
                ..usize::try_from(end).map_err(|_| out_of_range())?,
        )
        .ok_or_else(out_of_range)?;
    if !payload.starts_with(XZ_MAGIC) {
        return Err(VmlinuxError::NotXz(
            payload.iter().take(6).copied().collect(),
        ));
    }
    // One XZ stream; the kernel build appends the uncompressed size after it, which the
    // single-stream decoder leaves unread.
    let mut out = Vec::new();
    liblzma::read::XzDecoder::new(payload)
        .take(MAX_VMLINUX + 1)
        .read_to_end(&mut out)
        .map_err(VmlinuxError::Decompress)?;
    if out.len() as u64 > MAX_VMLINUX {
        return Err(VmlinuxError::TooLarge);
    }
    check_pvh_elf(&out)?;
    Ok(out)
}

/// Checks that `data` is an x86-64 ELF executable carrying the PVH entry note.
pub fn check_pvh_elf(data: &[u8]) -> Result<(), VmlinuxError> {
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|_| VmlinuxError::NotElf)?;
    let endian = header.endian().map_err(|_| VmlinuxError::NotElf)?;
    if header.e_machine(endian) != elf::EM_X86_64 || header.e_type(endian) != elf::ET_EXEC {
        return Err(VmlinuxError::NotElf);
    }
    let phdrs = header
        .program_headers(endian, data)
        .map_err(|_| VmlinuxError::NotElf)?;
    for ph in phdrs {
        let Ok(Some(mut notes)) = ph.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == b"Xen" && note.n_type(endian) == XEN_ELFNOTE_PHYS32_ENTRY {
                return Ok(());
            }
        }
    }
    Err(VmlinuxError::NoPvhNote)
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert!(matches!(extract(b""), Err(VmlinuxError::NotBzImage)));
        assert!(matches!(
            extract(&[0u8; 4096]),
            Err(VmlinuxError::NotBzImage)
        ));
        let mut fake = vec![0u8; 4096];
        fake[0x202..0x206].copy_from_slice(b"HdrS");
        fake[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        fake[0x248..0x24c].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        fake[0x24c..0x250].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        assert!(matches!(
            extract(&fake),
            Err(VmlinuxError::PayloadOutOfRange { .. })
        ));
        fake[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        fake[0x24c..0x250].copy_from_slice(&16u32.to_le_bytes());
        assert!(matches!(extract(&fake), Err(VmlinuxError::NotXz(_))));
        fake[0x1f1] = 1;
        fake[1024..1030].copy_from_slice(XZ_MAGIC);
        assert!(matches!(extract(&fake), Err(VmlinuxError::Decompress(_))));
        assert!(matches!(
            check_pvh_elf(b"\x7fELF"),
            Err(VmlinuxError::NotElf)
        ));
    }

    /// Runs on the real Debian kernel when one is cached (by `gpucell guest build` or
    /// `apt-get download` in `GPUCELL_TEST_KERNEL_DEB`'s directory).
    #[test]
    fn real_debian_kernel_yields_a_pvh_vmlinux() {
        let Some((_dir, vmlinuz)) = crate::testutil::debian_vmlinuz() else {
            return;
        };
        let bz = std::fs::read(&vmlinuz).unwrap();
        let vmlinux = extract(&bz).unwrap();
        assert_eq!(&vmlinux[..4], b"\x7fELF");
        assert!(
            vmlinux.len() > bz.len(),
            "uncompressed kernel is larger than the bzImage"
        );
        // The same ELF with its notes segment blanked is refused.
        let mut broken = vmlinux.clone();
        let pos = broken.windows(4).position(|w| w == b"Xen\0").unwrap();
        broken[pos..pos + 3].copy_from_slice(b"Nex");
        // Some kernels carry several Xen notes; blank them all.
        while let Some(p) = broken.windows(4).position(|w| w == b"Xen\0") {
            broken[p..p + 3].copy_from_slice(b"Nex");
        }
        assert!(matches!(
            check_pvh_elf(&broken),
            Err(VmlinuxError::NoPvhNote)
        ));
    }
}
