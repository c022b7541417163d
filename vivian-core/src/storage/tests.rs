use super::memory::{MemoryIdentity, MemoryObjectStore};
use super::*;

fn storage() -> (Arc<MemoryObjectStore>, Arc<MemoryIdentity>, JobStorage) {
    let o = Arc::new(MemoryObjectStore::default());
    let i = Arc::new(MemoryIdentity::default());
    let s = JobStorage::new(
        o.clone(),
        i.clone(),
        "http://10.42.0.1:9000".parse().unwrap(),
    );
    (o, i, s)
}

fn tarball() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "./sub/", &[][..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_700_000_000);
    h.set_username("alice").unwrap();
    h.set_groupname("users").unwrap();
    h.set_size(5);
    b.append_data(&mut h, "./sub/a.txt", &b"hello"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "link", "sub/a.txt").unwrap();
    b.into_inner().unwrap()
}

#[tokio::test]
async fn a_job_bucket_lives_and_leaves_nothing() {
    let (o, i, s) = storage();
    let mut jb = s
        .open_job_bucket(
            "52:54:00:11:22:00",
            "job 1",
            "10.42.0.5".parse().unwrap(),
            &["g1".into()],
        )
        .await
        .unwrap();
    assert!(jb.name.as_str().starts_with("job-52-54-00-11-22-00-job-1-"));
    assert_eq!(jb.dut.user.user, format!("{}-dut", jb.name));
    assert_eq!(jb.dut.secret_key.expose().len(), 32);
    assert!(!format!("{jb:?}").contains(jb.dut.secret_key.expose()));
    {
        let users = i.users.lock().unwrap();
        let u = &users[&jb.dut.user.access_key];
        assert!(u.groups.contains("g1"));
        assert!(u
            .policy
            .as_ref()
            .unwrap()
            .to_string()
            .contains("10.42.0.5/32"));
    }
    assert_eq!(s.seed_from_tar(&jb, &tarball()).await.unwrap(), 1);
    let meta = o.metadata(jb.name.as_str(), "sub/a.txt").unwrap();
    assert_eq!(
        meta,
        vec![(
            "mc-attrs".to_string(),
            "gid:100/gname:users/mode:33184/mtime:1700000000/uid:1000/uname:alice".to_string()
        )]
    );
    let c = s.client_credentials(&mut jb).await.unwrap();
    assert_eq!(c.user.user, format!("{}-client", jb.name));
    let url = s.access_url(&c.credentials(), Some("executor.example"));
    assert_eq!(
        url,
        format!(
            "http://{}:{}@executor.example:9000",
            c.user.access_key,
            c.secret_key.expose()
        )
    );
    assert_eq!(i.users.lock().unwrap().len(), 2);
    s.close(jb).await.unwrap();
    assert!(o.buckets().is_empty());
    assert!(i.users.lock().unwrap().is_empty());
}

#[tokio::test]
async fn name_collisions_are_retried_then_refused() {
    let (o, _i, s) = storage();
    struct Taken(Arc<MemoryObjectStore>, std::sync::atomic::AtomicUsize);
    #[async_trait]
    impl ObjectStore for Taken {
        async fn create_bucket(&self, b: &BucketName) -> Result<(), StorageError> {
            if self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 4 {
                return Err(StorageError::AlreadyExists(b.to_string()));
            }
            self.0.create_bucket(b).await
        }
        async fn delete_bucket_force(&self, b: &BucketName) -> Result<(), StorageError> {
            self.0.delete_bucket_force(b).await
        }
        async fn bucket_exists(&self, b: &BucketName) -> Result<bool, StorageError> {
            self.0.bucket_exists(b).await
        }
        async fn put_object(
            &self,
            b: &BucketName,
            k: &str,
            d: Vec<u8>,
            m: &[(String, String)],
        ) -> Result<(), StorageError> {
            self.0.put_object(b, k, d, m).await
        }
        async fn get_object(&self, b: &BucketName, k: &str) -> Result<Vec<u8>, StorageError> {
            self.0.get_object(b, k).await
        }
        async fn list_objects(
            &self,
            b: &BucketName,
            p: &str,
        ) -> Result<Vec<ObjectInfo>, StorageError> {
            self.0.list_objects(b, p).await
        }
        async fn delete_object(&self, b: &BucketName, k: &str) -> Result<(), StorageError> {
            self.0.delete_object(b, k).await
        }
    }
    let taken = Arc::new(Taken(o.clone(), Default::default()));
    let s2 = JobStorage::new(taken.clone(), s.identity().clone(), s.url().clone());
    // Four collisions, the fifth name is free.
    let jb = s2
        .open_job_bucket("dut", "j", "10.0.0.1".parse().unwrap(), &[])
        .await
        .unwrap();
    s2.close(jb).await.unwrap();
    // Always taken: five attempts, then refused, nothing left.
    struct Always;
    #[async_trait]
    impl ObjectStore for Always {
        async fn create_bucket(&self, b: &BucketName) -> Result<(), StorageError> {
            Err(StorageError::AlreadyExists(format!("bucket {b}")))
        }
        async fn delete_bucket_force(&self, _: &BucketName) -> Result<(), StorageError> {
            panic!("nothing was created")
        }
        async fn bucket_exists(&self, _: &BucketName) -> Result<bool, StorageError> {
            Ok(true)
        }
        async fn put_object(
            &self,
            _: &BucketName,
            _: &str,
            _: Vec<u8>,
            _: &[(String, String)],
        ) -> Result<(), StorageError> {
            unreachable!()
        }
        async fn get_object(&self, _: &BucketName, _: &str) -> Result<Vec<u8>, StorageError> {
            unreachable!()
        }
        async fn list_objects(
            &self,
            _: &BucketName,
            _: &str,
        ) -> Result<Vec<ObjectInfo>, StorageError> {
            unreachable!()
        }
        async fn delete_object(&self, _: &BucketName, _: &str) -> Result<(), StorageError> {
            unreachable!()
        }
    }
    let s4 = JobStorage::new(Arc::new(Always), s.identity().clone(), s.url().clone());
    let e = s4
        .open_job_bucket("dut", "j", "10.0.0.1".parse().unwrap(), &[])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists(_)), "{e}");
    assert!(o.buckets().is_empty());
}

#[tokio::test]
async fn a_failed_user_creation_removes_the_bucket() {
    let (o, i, s) = storage();
    *i.fail_next_create.lock().unwrap() = true;
    let e = s
        .open_job_bucket("d", "j", "10.0.0.1".parse().unwrap(), &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected"));
    assert!(o.buckets().is_empty());
    assert!(i.users.lock().unwrap().is_empty());
}

#[tokio::test]
async fn membership_is_checked_with_the_reason() {
    let (_o, i, s) = storage();
    i.add_user("alice", "alice-secret", &["g1", "g2"]);
    let req = |ak: &str, sk: &str, groups: &[&str]| MinioRequest {
        credentials: Some(Credentials::new(ak, sk)),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    s.check_submission(&req("alice", "alice-secret", &["g1", "g2"]))
        .await
        .unwrap();
    s.check_submission(&MinioRequest::default()).await.unwrap();
    let e = s
        .check_submission(&req("alice", "alice-secret", &["g1", "g3"]))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the user alice is not a member of the group(s) g3"
    );
    let e = s
        .check_submission(&req("alice", "wrong", &["g1"]))
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::BadCredentials(_)), "{e}");
    let e = s
        .check_submission(&MinioRequest {
            credentials: None,
            groups: vec!["g1".into()],
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("executorctl -a"), "{e}");
}

#[test]
fn minio_metadata_is_parsed_strictly() {
    let r = MinioRequest::from_json(&serde_json::json!({
        "credentials": {"access_key": "a", "secret_key": "b"}, "groups": ["g"]
    }))
    .unwrap();
    assert_eq!(r.groups, vec!["g"]);
    assert_eq!(r.credentials.unwrap().access_key, "a");
    let r = MinioRequest::from_json(&serde_json::json!({"credentials": {}, "groups": []})).unwrap();
    assert_eq!(r, MinioRequest::default());
    for bad in [
        serde_json::json!(3),
        serde_json::json!({"groups": "g"}),
        serde_json::json!({"groups": [1]}),
        serde_json::json!({"credentials": {"access_key": "a"}}),
    ] {
        let e = MinioRequest::from_json(&bad).unwrap_err();
        assert!(e.to_string().starts_with("metadata minio: "), "{e}");
    }
}

#[test]
fn tarballs_plain_gzip_and_hostile() {
    let plain = tarball();
    let files = read_tarball(&plain).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].path, "sub/a.txt");
    assert_eq!(files[0].data, b"hello");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    let gz = gz.finish().unwrap();
    assert_eq!(read_tarball(&gz).unwrap(), files);
    // A path leaving the directory is refused.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    // `append_data` refuses `..`; write the name into the header directly.
    h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let e = read_tarball(&b.into_inner().unwrap()).unwrap_err();
    assert!(e.to_string().contains("leaves the share directory"), "{e}");
    let e = read_tarball(b"BZh91AY&SY").unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
}

/// The resource hook (the executor's journal) hears of every bucket and
/// user before it exists, and of its removal once everything is gone: an
/// executor killed at any point has everything its jobs created listed.
#[tokio::test]
async fn the_resource_hook_lists_everything_before_it_exists() {
    type Journal = std::collections::BTreeMap<String, JobResources>;
    let o = Arc::new(MemoryObjectStore::default());
    let i = Arc::new(MemoryIdentity::default());
    let journal: Arc<std::sync::Mutex<Journal>> = Arc::default();
    // Whenever the hook is called, everything that exists is listed in
    // the journal as it was before the call.
    let violations: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let hook: ResourceHook = {
        let (o, i, journal, violations) =
            (o.clone(), i.clone(), journal.clone(), violations.clone());
        Arc::new(move |bucket: &str, res: Option<&JobResources>| {
            let mut j = journal.lock().unwrap();
            let listed_users: Vec<String> = j
                .values()
                .flat_map(|r| r.users.iter().map(|u| u.access_key.clone()))
                .collect();
            for b in o.buckets() {
                if !j.contains_key(&b) {
                    violations.lock().unwrap().push(format!("bucket {b}"));
                }
            }
            for u in i.users.lock().unwrap().keys() {
                if !listed_users.contains(u) {
                    violations.lock().unwrap().push(format!("user {u}"));
                }
            }
            match res {
                Some(r) => j.insert(bucket.to_string(), r.clone()),
                None => j.remove(bucket),
            };
        })
    };
    let s = JobStorage::new(
        o.clone(),
        i.clone(),
        "http://10.0.0.1:9000".parse().unwrap(),
    )
    .with_resource_hook(hook);
    let mut jb = s
        .open_job_bucket("d", "j", "10.0.0.2".parse().unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(journal.lock().unwrap()[jb.name.as_str()], jb.resources());
    s.client_credentials(&mut jb).await.unwrap();
    assert_eq!(journal.lock().unwrap()[jb.name.as_str()].users.len(), 2);
    s.close(jb).await.unwrap();
    assert!(journal.lock().unwrap().is_empty());
    assert!(o.buckets().is_empty() && i.users.lock().unwrap().is_empty());
    // A failed user creation: nothing left, nothing listed.
    *i.fail_next_create.lock().unwrap() = true;
    s.open_job_bucket("d", "j", "10.0.0.2".parse().unwrap(), &[])
        .await
        .unwrap_err();
    assert!(journal.lock().unwrap().is_empty());
    assert!(o.buckets().is_empty());
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new());
}
