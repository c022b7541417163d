//! The share directory (`-s`): validated, created if missing and packed as
//! a plain tar archive whose member names are relative to the directory,
//! like the reference client's; after the job, the job bucket is mirrored
//! back into it ([`mirror_back`]: what the reference does with
//! `mcli mirror --overwrite --remove`, without any external binary).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use vivian_core::protocol::JobBucket;
use vivian_core::storage::{BucketName, Credentials, ObjectStore, StorageError};

/// Pauses between mirror attempts (reference: 3 attempts, 2, 4 and 8 s).
pub const MIRROR_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// What a mirror did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorReport {
    /// Files written (new or changed).
    pub written: Vec<String>,
    /// Files left unchanged.
    pub unchanged: usize,
    /// Local files removed (gone from the bucket).
    pub removed: Vec<String>,
}

/// The S3 endpoint and credentials of a `minio_access_url`
/// (`http://<access key>:<secret>@<host>:<port>`).
pub fn parse_access_url(access_url: &str) -> Result<(url::Url, Credentials), String> {
    let u = url::Url::parse(access_url)
        .map_err(|e| format!("the job bucket's access URL is not a URL: {e}"))?;
    if u.username().is_empty() || u.password().is_none() {
        return Err("the job bucket's access URL has no credentials".into());
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let creds = Credentials::new(decode(u.username()), decode(u.password().unwrap_or("")));
    let mut endpoint = u.clone();
    let _ = endpoint.set_username("");
    let _ = endpoint.set_password(None);
    endpoint.set_path("");
    endpoint.set_query(None);
    Ok((endpoint, creds))
}

/// The local path of an object key, refusing keys that would leave `dir`.
fn local_path(dir: &Path, key: &str) -> Option<PathBuf> {
    let rel = Path::new(key);
    if key.is_empty() || key.ends_with('/') {
        return None;
    }
    if rel.components().all(|c| matches!(c, Component::Normal(_))) {
        Some(dir.join(rel))
    } else {
        None
    }
}

/// Every regular file under `dir`, as `/`-separated relative paths.
fn local_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let name = rel.join(entry.file_name());
            let t = entry.file_type()?;
            if t.is_dir() {
                stack.push(name);
            } else if t.is_file() || t.is_symlink() {
                out.push(
                    name.to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/"),
                );
            }
        }
    }
    Ok(out)
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.vivian-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// One mirror pass: every object of `bucket` written under `dir` (when new
/// or changed), every local file not in the bucket removed.
pub async fn mirror_once(
    store: &dyn ObjectStore,
    bucket: &BucketName,
    dir: &Path,
) -> Result<MirrorReport, StorageError> {
    let io_err = |what: &str, e: io::Error| StorageError::Backend(format!("{what}: {e}"));
    let objects = store.list_objects(bucket, "").await?;
    let mut report = MirrorReport::default();
    let mut keep = std::collections::BTreeSet::new();
    for o in objects {
        let Some(path) = local_path(dir, &o.key) else {
            tracing::warn!(
                "skipping the object {:?}: not a path inside the share directory",
                o.key
            );
            continue;
        };
        keep.insert(o.key.clone());
        let data = store.get_object(bucket, &o.key).await?;
        if fs::read(&path).ok().as_deref() == Some(&data[..]) {
            report.unchanged += 1;
            continue;
        }
        if path.is_dir() {
            fs::remove_dir_all(&path).map_err(|e| io_err(&path.display().to_string(), e))?;
        }
        write_atomic(&path, &data).map_err(|e| io_err(&path.display().to_string(), e))?;
        report.written.push(o.key);
    }
    for f in local_files(dir).map_err(|e| io_err(&dir.display().to_string(), e))? {
        if !keep.contains(&f) {
            let p = dir.join(&f);
            fs::remove_file(&p).map_err(|e| io_err(&p.display().to_string(), e))?;
            report.removed.push(f);
        }
    }
    Ok(report)
}

/// Mirrors the job bucket offered in `session_end` into `dir`, retrying
/// transient failures after each of `delays`. Errors that retrying cannot
/// fix (refused credentials, no such bucket) end it at once.
pub async fn mirror_back(
    bucket: &JobBucket,
    dir: &Path,
    delays: &[Duration],
) -> Result<MirrorReport, String> {
    let (endpoint, creds) = parse_access_url(&bucket.minio_access_url)?;
    let name = BucketName::new(bucket.bucket_name.clone()).map_err(|e| e.to_string())?;
    prepare_dir(dir)?;
    let store = vivian_storage::S3Store::new(&endpoint, &creds, "us-east-1");
    let mut attempt = 0;
    loop {
        match mirror_once(&store, &name, dir).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                let transient = matches!(e, StorageError::Backend(_));
                match delays.get(attempt) {
                    Some(d) if transient => {
                        eprintln!(
                            "WARNING: mirroring the job bucket failed ({e}); retrying in {}s",
                            d.as_secs()
                        );
                        tokio::time::sleep(*d).await;
                        attempt += 1;
                    }
                    _ => return Err(e.to_string()),
                }
            }
        }
    }
}

/// `executorctl`'s step after `session_end`: mirrors the bucket into the
/// share directory and says what happened.
pub async fn mirror_back_reporting(dir: &Path, bucket: Option<&JobBucket>) {
    let Some(b) = bucket else {
        println!(
            "NOTE: the executor offered no job bucket, so nothing was mirrored back into the share directory '{}'; it is unchanged.",
            dir.display()
        );
        return;
    };
    println!(
        "Mirroring the job bucket '{}' into the share directory '{}'",
        b.bucket_name,
        dir.display()
    );
    match mirror_back(b, dir, &MIRROR_RETRY_DELAYS).await {
        Ok(r) => println!(
            "--> {} file(s) written, {} unchanged, {} removed",
            r.written.len(),
            r.unchanged,
            r.removed.len()
        ),
        Err(e) => eprintln!(
            "WARNING: the job bucket '{}' could not be mirrored back into '{}': {e}",
            b.bucket_name,
            dir.display()
        ),
    }
}

/// Checks the share directory: created when missing; an error when the path
/// exists and is not a directory.
pub fn prepare_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        return Err(format!(
            "The share directory '{}' is not a folder",
            dir.display()
        ));
    }
    fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the share directory '{}': {e}", dir.display()))
}

/// Packs `dir` into an uncompressed tar archive (symbolic links kept as
/// links, entries sorted by name).
pub fn pack(dir: &Path) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(dir.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = rel.join(entry.file_name());
            let path = entry.path();
            builder.append_path_with_name(&path, &name)?;
            if entry.file_type()?.is_dir() {
                stack.push(name);
            }
        }
    }
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_relative_names() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("a.txt"), b"hello").unwrap();
        fs::write(d.path().join("sub/b.txt"), b"world").unwrap();
        let data = pack(d.path()).unwrap();
        let mut ar = tar::Archive::new(&data[..]);
        let mut names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["a.txt", "sub", "sub/b.txt"]);
    }

    #[test]
    fn access_urls_and_keys() {
        let (u, c) = parse_access_url("http://job-b-client:s%2Fk@10.0.0.1:9000").unwrap();
        assert_eq!(u.as_str(), "http://10.0.0.1:9000/");
        assert_eq!(c.access_key, "job-b-client");
        assert_eq!(c.secret_key.expose(), "s/k");
        assert!(parse_access_url("http://10.0.0.1:9000").is_err());
        let d = Path::new("/share");
        assert_eq!(
            local_path(d, "a/b.txt"),
            Some(PathBuf::from("/share/a/b.txt"))
        );
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "dir/"] {
            assert_eq!(local_path(d, bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn mirror_writes_changed_and_removes_gone_files() {
        use vivian_core::storage::memory::MemoryObjectStore;
        let store = MemoryObjectStore::default();
        let b = BucketName::new("job-b").unwrap();
        store.create_bucket(&b).await.unwrap();
        store
            .put_object(&b, "same.txt", b"same".to_vec(), &[])
            .await
            .unwrap();
        store
            .put_object(&b, "new/deep.txt", b"new".to_vec(), &[])
            .await
            .unwrap();
        store
            .put_object(&b, "changed.txt", b"v2".to_vec(), &[])
            .await
            .unwrap();
        store
            .put_object(&b, "../evil", b"x".to_vec(), &[])
            .await
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("same.txt"), b"same").unwrap();
        fs::write(d.path().join("changed.txt"), b"v1").unwrap();
        fs::create_dir(d.path().join("old")).unwrap();
        fs::write(d.path().join("old/gone.txt"), b"bye").unwrap();
        let r = mirror_once(&store, &b, d.path()).await.unwrap();
        let mut written = r.written.clone();
        written.sort();
        assert_eq!(written, vec!["changed.txt", "new/deep.txt"]);
        assert_eq!(r.unchanged, 1);
        assert_eq!(r.removed, vec!["old/gone.txt"]);
        assert_eq!(fs::read(d.path().join("changed.txt")).unwrap(), b"v2");
        assert_eq!(fs::read(d.path().join("new/deep.txt")).unwrap(), b"new");
        assert!(!d.path().join("old/gone.txt").exists());
        assert!(!d.path().parent().unwrap().join("evil").exists());
    }

    #[test]
    fn refuses_a_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"").unwrap();
        assert!(prepare_dir(&f).unwrap_err().contains("is not a folder"));
        let new = d.path().join("new/dir");
        prepare_dir(&new).unwrap();
        assert!(new.is_dir());
    }
}
