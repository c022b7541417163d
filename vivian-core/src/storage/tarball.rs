//! The share-directory tarball (EX C.1 `job_bucket_initial_state_tarball_file`):
//! its regular files and their MinIO `mc` attributes.

use std::io::Read;
use std::path::Component;

use super::StorageError;

/// Go `os.FileMode` type bits the reference ORs into `mode` (IN D).
const MODE_DIR: u32 = 1 << 31;
const MODE_SYMLINK: u32 = 1 << 27;
const MODE_DEVICE: u32 = 1 << 26;
const MODE_FIFO: u32 = 1 << 25;
const MODE_CHAR_DEVICE: u32 = 1 << 21;
const MODE_REGULAR: u32 = 1 << 15;

/// Largest uncompressed tarball accepted, so that a bad upload cannot
/// exhaust the executor's memory.
pub const MAX_TARBALL_SIZE: u64 = 4 << 30;

/// A regular file of the tarball.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarFile {
    /// Its path inside the archive (`/`-separated, no `.` or `..`): the
    /// object key.
    pub path: String,
    /// Its content.
    pub data: Vec<u8>,
    /// The `X-Amz-Meta-Mc-Attrs` value.
    pub mc_attrs: String,
}

/// `gid:<gid>/gname:<g>/mode:<m>/mtime:<epoch>/uid:<uid>/uname:<u>`, `m`
/// being the permission bits OR the Go `FileMode` type bits of the entry
/// type (a regular file: `1<<15`, as the reference sets it).
pub fn mc_attrs(header: &tar::Header) -> String {
    let kind = match header.entry_type() {
        tar::EntryType::Directory => MODE_DIR,
        tar::EntryType::Symlink => MODE_SYMLINK,
        tar::EntryType::Block => MODE_DEVICE,
        tar::EntryType::Fifo => MODE_FIFO,
        tar::EntryType::Char => MODE_DEVICE | MODE_CHAR_DEVICE,
        _ => MODE_REGULAR,
    };
    let mode = (header.mode().unwrap_or(0o644) & 0o7777) | kind;
    format!(
        "gid:{}/gname:{}/mode:{}/mtime:{}/uid:{}/uname:{}",
        header.gid().unwrap_or(0),
        header.groupname().ok().flatten().unwrap_or(""),
        mode,
        header.mtime().unwrap_or(0),
        header.uid().unwrap_or(0),
        header.username().ok().flatten().unwrap_or(""),
    )
}

/// The regular files of a tar archive, plain or gzip-compressed.
pub fn read_tarball(data: &[u8]) -> Result<Vec<TarFile>, StorageError> {
    let bad = |m: String| StorageError::InvalidInput(format!("the share directory tarball: {m}"));
    let reader: Box<dyn Read + '_> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(data))
    } else if data.starts_with(b"BZh") || data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) {
        return Err(bad(
            "bzip2 and xz compression are not supported; send a plain or gzip-compressed tar"
                .into(),
        ));
    } else {
        Box::new(data)
    };
    let mut archive = tar::Archive::new(reader.take(MAX_TARBALL_SIZE));
    let mut out = Vec::new();
    let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let raw = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let mut parts = Vec::new();
        for c in raw.components() {
            match c {
                Component::Normal(p) => parts.push(
                    p.to_str()
                        .ok_or_else(|| bad(format!("{raw:?} is not UTF-8")))?
                        .to_string(),
                ),
                Component::CurDir => {}
                _ => return Err(bad(format!("{raw:?} leaves the share directory"))),
            }
        }
        if parts.is_empty() {
            continue;
        }
        let mc = mc_attrs(entry.header());
        let mut content = Vec::with_capacity(entry.size().min(1 << 24) as usize);
        entry
            .read_to_end(&mut content)
            .map_err(|e| bad(e.to_string()))?;
        out.push(TarFile {
            path: parts.join("/"),
            data: content,
            mc_attrs: mc,
        });
    }
    Ok(out)
}
