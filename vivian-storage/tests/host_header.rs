//! The `Host` header of admin, IAM and S3 requests: it names the server as
//! `MINIO_URL` does (a host name stays a host name, the port is kept), and
//! SigV4 signatures cover it, so servers that check it (the fake MinIO
//! admin server, SeaweedFS) accept requests sent to a host name as well
//! as to an address, and refuse a signature made for another host.

use reqwest::Method;
use vivian_core::storage::{
    AccessSpec, BucketName, Credentials, IdentityAdmin, IpPolicyStyle, ObjectStore, Role,
};
use vivian_storage::fake_minio::FakeMinio;
use vivian_storage::sigv4::{self, Canonical};
use vivian_storage::testing::Seaweed;
use vivian_storage::{IamAdmin, MinioAdmin, S3Store, SignedClient};

fn root() -> Credentials {
    Credentials::new("minioadmin", "minio-root-password")
}

fn spec(bucket: &str) -> AccessSpec {
    AccessSpec {
        bucket: BucketName::new(bucket).unwrap(),
        role: Role::Dut,
        source_ips: vec!["127.0.0.2".parse().unwrap()],
        groups: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minio_admin_requests_name_and_sign_the_host() {
    let fake = FakeMinio::start(root()).await.unwrap();
    let port = fake.url.port().unwrap();
    for (url, host) in [
        (
            format!("http://localhost:{port}"),
            format!("localhost:{port}"),
        ),
        (
            format!("http://LocalHost:{port}/"),
            format!("localhost:{port}"),
        ),
        (
            format!("http://127.0.0.1:{port}"),
            format!("127.0.0.1:{port}"),
        ),
    ] {
        fake.state.lock().unwrap().hosts.clear();
        let admin = MinioAdmin::new(&url.parse().unwrap(), &root()).unwrap();
        admin.check_root().await.unwrap();
        let c = admin.create_scoped_user(&spec("job-host")).await.unwrap();
        admin.delete_scoped_user(&c.user).await.unwrap();
        let hosts: Vec<String> = fake.state.lock().unwrap().hosts.iter().cloned().collect();
        assert_eq!(hosts, vec![host], "{url}");
    }

    // A signature made for another host is refused: the fake checks it.
    let body = Vec::new();
    let date = sigv4::amz_date_now();
    let hash = sigv4::sha256_hex(&body);
    let headers = vec![
        ("host".to_string(), format!("minio.example:{port}")),
        ("x-amz-content-sha256".to_string(), hash.clone()),
        ("x-amz-date".to_string(), date.clone()),
    ];
    let auth = sigv4::authorization(
        "minioadmin",
        "minio-root-password",
        &date,
        "us-east-1",
        "s3",
        &Canonical {
            method: "GET",
            path: "/minio/admin/v3/info",
            query: &[],
            headers: &headers,
            payload_hash: &hash,
        },
    );
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/minio/admin/v3/info"))
        .header("authorization", auth)
        .header("x-amz-content-sha256", hash)
        .header("x-amz-date", date)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("SignatureDoesNotMatch"));
    fake.stop().await;
}

/// SeaweedFS checks SigV4 signatures (host included): S3 through
/// aws-sdk-s3, IAM and raw signed requests all work through
/// `http://localhost:<port>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_and_iam_requests_to_a_host_name_on_seaweedfs() {
    let sw = tokio::task::spawn_blocking(Seaweed::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("SeaweedFS is needed for this test: {e}"));
    let by_name: url::Url = format!("http://localhost:{}", sw.url.port().unwrap())
        .parse()
        .unwrap();
    let s3 = S3Store::new(&by_name, &sw.admin, "us-east-1");
    let b = BucketName::new("vivian-host-check").unwrap();
    s3.create_bucket(&b).await.unwrap();
    s3.put_object(&b, "k.txt", b"v".to_vec(), &[])
        .await
        .unwrap();
    assert_eq!(s3.get_object(&b, "k.txt").await.unwrap(), b"v");
    assert_eq!(s3.list_objects(&b, "").await.unwrap().len(), 1);
    // A signature with another secret is refused: the server checks them.
    let wrong = S3Store::new(
        &by_name,
        &Credentials::new(&sw.admin.access_key, "wrong"),
        "us-east-1",
    );
    assert!(wrong.get_object(&b, "k.txt").await.is_err());
    let raw = SignedClient::new(&by_name, &sw.admin, "us-east-1", "s3", None).unwrap();
    let a = raw
        .send(Method::GET, "/vivian-host-check/k.txt", &[], &[], vec![])
        .await
        .unwrap();
    assert_eq!((a.status, a.text()), (200, "v".to_string()));

    let iam = IamAdmin::new(&by_name, &sw.admin, IpPolicyStyle::AllowOnlyIp).unwrap();
    iam.check_root().await.unwrap();
    let c = iam
        .create_scoped_user(&spec("vivian-host-check"))
        .await
        .unwrap();
    iam.delete_scoped_user(&c.user).await.unwrap();
    s3.delete_bucket_force(&b).await.unwrap();
    assert!(!s3.bucket_exists(&b).await.unwrap());
}
