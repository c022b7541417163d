//! The IAM Query API backend and the S3 data operations against moto
//! (`moto_server` from PyPI), which implements the AWS shapes of both:
//! users, access keys, inline user policies, groups and their members,
//! buckets and objects with metadata. moto signs nothing and enforces no
//! `aws:SourceIp` condition: that part is tested on SeaweedFS.

use std::sync::Arc;

use reqwest::Method;
use vivian_core::storage::{
    AccessSpec, BucketName, IdentityAdmin, IpPolicyStyle, JobStorage, MinioRequest, ObjectStore,
    Role, StorageError,
};
use vivian_storage::iam::xml_texts;
use vivian_storage::testing::Moto;
use vivian_storage::{IamAdmin, S3Store, SignedClient};

/// A raw IAM call (what the test checks with), as moto's administrator.
async fn iam_call(moto: &Moto, action: &str, params: &[(&str, &str)]) -> (u16, String) {
    let c = SignedClient::new(&moto.url, &moto.admin, "us-east-1", "iam", None).unwrap();
    let mut form = vec![("Action", action), ("Version", "2010-05-08")];
    form.extend_from_slice(params);
    let body = form
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                vivian_storage::sigv4::uri_encode(k, false),
                vivian_storage::sigv4::uri_encode(v, false)
            )
        })
        .collect::<Vec<_>>()
        .join("&");
    let a = c
        .send(
            Method::POST,
            "/",
            &[],
            &[("content-type", "application/x-www-form-urlencoded")],
            body.into_bytes(),
        )
        .await
        .unwrap();
    (a.status, a.text())
}

fn tarball() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(5);
    b.append_data(&mut h, "dir/a.txt", &b"hello"[..]).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_backend_on_moto() {
    let moto = tokio::task::spawn_blocking(Moto::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("moto_server (PyPI moto[server]) is needed: {e}"));
    let iam = IamAdmin::new(&moto.url, &moto.admin, IpPolicyStyle::DenyOutsideIp).unwrap();
    iam.check_root().await.unwrap();

    // A submitter, member of g1.
    iam.create_group("g1").await.unwrap();
    iam.create_group("g1").await.unwrap(); // an existing group is fine
    iam.create_group("g2").await.unwrap();
    let alice = iam.create_user_with_key("alice").await.unwrap();
    assert!(alice.access_key.starts_with("AKIA"), "{alice:?}");
    iam.add_user_to_group("alice", "g1").await.unwrap();
    iam.verify_membership(&alice, &["g1".into()]).await.unwrap();
    let e = iam
        .verify_membership(&alice, &["g1".into(), "g2".into(), "g3".into()])
        .await
        .unwrap_err();
    assert_eq!(
        e,
        StorageError::NotMember {
            user: "alice".into(),
            missing: vec!["g2".into(), "g3".into()],
        }
    );

    // A DUT user: key, inline policy with the IP conditions, groups.
    let bucket = BucketName::new("job-moto-1-abcdef").unwrap();
    let spec = AccessSpec {
        bucket: bucket.clone(),
        role: Role::Dut,
        source_ips: vec!["10.42.0.7".parse().unwrap()],
        groups: vec!["g1".into(), "g2".into()],
    };
    let dut = iam.create_scoped_user(&spec).await.unwrap();
    assert_eq!(dut.user.user, "job-moto-1-abcdef-dut");
    assert_eq!(
        dut.user.policy.as_deref(),
        Some("policy_job-moto-1-abcdef-dut")
    );
    assert_eq!(dut.user.groups, vec!["g1", "g2"]);
    assert!(users(&iam).await.contains(&dut.user.user));
    let (st, keys) = iam_call(&moto, "ListAccessKeys", &[("UserName", &dut.user.user)]).await;
    assert_eq!(st, 200, "{keys}");
    assert_eq!(
        xml_texts(keys.as_bytes(), "AccessKeyId"),
        vec![dut.user.access_key.clone()]
    );
    assert!(!dut.secret_key.expose().is_empty());
    let (st, pol) = iam_call(
        &moto,
        "GetUserPolicy",
        &[
            ("UserName", &dut.user.user),
            ("PolicyName", "policy_job-moto-1-abcdef-dut"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{pol}");
    let doc = xml_texts(pol.as_bytes(), "PolicyDocument")
        .into_iter()
        .next()
        .unwrap();
    // moto may return the document URL-encoded, as AWS does.
    let doc = percent_encoding::percent_decode_str(&doc)
        .decode_utf8_lossy()
        .into_owned();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let text = doc.to_string();
    assert!(text.contains("arn:aws:s3:::job-moto-1-abcdef"), "{text}");
    assert!(text.contains("10.42.0.7/32"), "{text}");
    assert!(text.contains("\"Deny\""), "{text}");
    let (_, groups) = iam_call(&moto, "ListGroupsForUser", &[("UserName", &dut.user.user)]).await;
    let mut g = xml_texts(groups.as_bytes(), "GroupName");
    g.sort();
    assert_eq!(g, vec!["g1", "g2"]);
    // The same user again: IAM says it exists, and the first is untouched.
    let e = iam.create_scoped_user(&spec).await.unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists(_)), "{e}");
    assert!(users(&iam).await.contains(&dut.user.user));

    // Deleting: groups, policy, keys, user; again is fine.
    iam.delete_scoped_user(&dut.user).await.unwrap();
    assert!(!users(&iam).await.contains(&dut.user.user));
    let (st, _) = iam_call(&moto, "GetUser", &[("UserName", &dut.user.user)]).await;
    assert_eq!(st, 404);
    let (_, members) = iam_call(&moto, "GetGroup", &[("GroupName", "g1")]).await;
    assert_eq!(xml_texts(members.as_bytes(), "UserName"), vec!["alice"]);
    iam.delete_scoped_user(&dut.user).await.unwrap();

    // A group that does not exist: the half-created user is removed.
    let bad = AccessSpec {
        groups: vec!["no-such-group".into()],
        ..spec.clone()
    };
    let e = iam.create_scoped_user(&bad).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound(_)), "{e}");
    assert!(!users(&iam).await.contains(&dut.user.user));

    iam.delete_user_fully("alice").await.unwrap();
    assert_eq!(users(&iam).await, Vec::<String>::new());
}

async fn users(iam: &IamAdmin) -> Vec<String> {
    iam.list_users().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_data_and_job_bucket_lifecycle_on_moto() {
    let moto = tokio::task::spawn_blocking(Moto::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("moto_server (PyPI moto[server]) is needed: {e}"));
    let s3 = S3Store::new(&moto.url, &moto.admin, "us-east-1");
    let b = BucketName::new("vivian-moto-data").unwrap();
    assert!(!s3.bucket_exists(&b).await.unwrap());
    s3.create_bucket(&b).await.unwrap();
    assert!(s3.bucket_exists(&b).await.unwrap());
    // moto answers 200 to re-creating one's own bucket, as AWS does in
    // us-east-1: the store still says it exists.
    let e = s3.create_bucket(&b).await.unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists(_)), "{e}");
    assert_eq!(s3.list_buckets().await.unwrap(), vec!["vivian-moto-data"]);

    let meta = vec![("mc-attrs".to_string(), "mode:33188/uid:0".to_string())];
    s3.put_object(&b, "a/one.txt", b"one".to_vec(), &meta)
        .await
        .unwrap();
    s3.put_object(&b, "a/two.txt", b"two!".to_vec(), &[])
        .await
        .unwrap();
    s3.put_object(&b, "b.txt", vec![], &[]).await.unwrap();
    assert_eq!(s3.get_object(&b, "a/one.txt").await.unwrap(), b"one");
    let head = s3
        .client()
        .head_object()
        .bucket(b.as_str())
        .key("a/one.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata()
            .and_then(|m| m.get("mc-attrs"))
            .map(String::as_str),
        Some("mode:33188/uid:0")
    );
    let listed = s3.list_objects(&b, "a/").await.unwrap();
    let keys: Vec<(&str, u64)> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(keys, vec![("a/one.txt", 3), ("a/two.txt", 4)]);
    assert!(listed.iter().all(|o| o.etag.is_some()));
    assert_eq!(s3.list_objects(&b, "").await.unwrap().len(), 3);
    s3.delete_object(&b, "a/two.txt").await.unwrap();
    s3.delete_object(&b, "a/two.txt").await.unwrap(); // already gone: fine
    let e = s3.get_object(&b, "a/two.txt").await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound(_)), "{e}");
    // Removing a bucket with objects in it; a missing bucket is fine.
    s3.delete_bucket_force(&b).await.unwrap();
    assert!(!s3.bucket_exists(&b).await.unwrap());
    s3.delete_bucket_force(&b).await.unwrap();

    // The whole job-bucket lifecycle over moto's S3 and IAM.
    let iam =
        Arc::new(IamAdmin::new(&moto.url, &moto.admin, IpPolicyStyle::DenyOutsideIp).unwrap());
    iam.create_group("farm").await.unwrap();
    let storage = JobStorage::new(Arc::new(s3.clone()), iam.clone(), moto.url.clone());
    let alice = iam.create_user_with_key("alice").await.unwrap();
    iam.add_user_to_group("alice", "farm").await.unwrap();
    storage
        .check_submission(&MinioRequest {
            credentials: Some(alice.clone()),
            groups: vec!["farm".into()],
        })
        .await
        .unwrap();
    let mut jb = storage
        .open_job_bucket(
            "52:54:00:aa:bb:cc",
            "moto-job",
            "10.0.0.9".parse().unwrap(),
            &["farm".into()],
        )
        .await
        .unwrap();
    assert!(
        jb.name
            .as_str()
            .starts_with("job-52-54-00-aa-bb-cc-moto-job-"),
        "{}",
        jb.name
    );
    assert_eq!(storage.seed_from_tar(&jb, &tarball()).await.unwrap(), 1);
    assert_eq!(
        s3.get_object(&jb.name, "dir/a.txt").await.unwrap(),
        b"hello"
    );
    let client = storage.client_credentials(&mut jb).await.unwrap();
    let url = storage.access_url(&client.credentials(), Some("executor.example"));
    assert!(
        url.starts_with(&format!("http://{}:", client.user.access_key))
            && url.ends_with(&format!("@executor.example:{}", moto.url.port().unwrap())),
        "{url}"
    );
    let mut job_users: Vec<String> = users(&iam)
        .await
        .into_iter()
        .filter(|u| u.starts_with("job-"))
        .collect();
    job_users.sort();
    assert_eq!(job_users.len(), 2, "{job_users:?}");
    assert!(job_users[0].ends_with("-client") && job_users[1].ends_with("-dut"));
    let name = jb.name.clone();
    storage.close(jb).await.unwrap();
    assert!(!s3.bucket_exists(&name).await.unwrap());
    assert_eq!(users(&iam).await, vec!["alice"]);
}
