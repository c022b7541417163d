//! The MinIO admin backend against the in-process fake admin server, and
//! the fake itself against a real admin client (Python `minio`'s
//! `MinioAdmin`, from PyPI).

use std::process::Command;

use vivian_core::storage::{
    AccessSpec, BucketName, Credentials, IdentityAdmin, Role, StorageError,
};
use vivian_storage::fake_minio::FakeMinio;
use vivian_storage::MinioAdmin;

/// Run a client program against `fake` with its `host:port`, the root
/// access key and secret, then `extra` arguments; it must succeed and print
/// one JSON document, which is returned.
async fn run_client(
    mut cmd: Command,
    fake: &FakeMinio,
    extra: &[&std::ffi::OsStr],
) -> serde_json::Value {
    let host = format!(
        "{}:{}",
        fake.url.host_str().unwrap(),
        fake.url.port().unwrap()
    );
    let r = root();
    cmd.args([&host, &r.access_key, r.secret_key.expose()])
        .args(extra);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn root() -> Credentials {
    Credentials::new("minioadmin", "minio-root-password")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_users_membership_and_cleanup() {
    let fake = FakeMinio::start(root()).await.unwrap();
    let admin = MinioAdmin::new(&fake.url, &root()).unwrap();
    admin.check_root().await.unwrap();
    let wrong = MinioAdmin::new(
        &fake.url,
        &Credentials::new("minioadmin", "not-the-password"),
    )
    .unwrap();
    let e = wrong.check_root().await.unwrap_err();
    assert!(matches!(e, StorageError::BadCredentials(_)), "{e}");
    assert!(e.to_string().contains("SignatureDoesNotMatch"), "{e}");

    let spec = AccessSpec {
        bucket: BucketName::new("job-b1").unwrap(),
        role: Role::Dut,
        source_ips: vec!["10.42.0.5".parse().unwrap()],
        groups: vec!["g1".into()],
    };
    let creds = admin.create_scoped_user(&spec).await.unwrap();
    assert_eq!(creds.user.user, "job-b1-dut");
    {
        let st = fake.state.lock().unwrap();
        let u = &st.users["job-b1-dut"];
        // The secret travelled encrypted and arrived intact.
        assert_eq!(u.secret, creds.secret_key.expose());
        assert_eq!(u.policies, vec!["policy_job-b1-dut"]);
        let p = st.policies["policy_job-b1-dut"].to_string();
        assert!(
            p.contains("10.42.0.5/32") && p.contains("NotIpAddress"),
            "{p}"
        );
        assert!(st.groups["g1"].contains("job-b1-dut"));
    }

    // Membership: a user reads its own user-info.
    fake.add_user("alice", "alice-secret", &["g1", "g2"]);
    admin
        .verify_membership(
            &Credentials::new("alice", "alice-secret"),
            &["g1".into(), "g2".into()],
        )
        .await
        .unwrap();
    let e = admin
        .verify_membership(&Credentials::new("alice", "alice-secret"), &["g3".into()])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the user alice is not a member of the group(s) g3"
    );
    let e = admin
        .verify_membership(&Credentials::new("alice", "wrong-secret"), &["g1".into()])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::BadCredentials(_)), "{e}");

    // Removal leaves nothing, and is idempotent.
    admin.delete_scoped_user(&creds.user).await.unwrap();
    admin.delete_scoped_user(&creds.user).await.unwrap();
    {
        let st = fake.state.lock().unwrap();
        assert!(!st.users.contains_key("job-b1-dut"));
        assert!(!st.policies.contains_key("policy_job-b1-dut"));
        assert!(!st.groups["g1"].contains("job-b1-dut"));
    }

    fake.stop().await;
}

const PY_CLIENT: &str = r#"
import json, sys
from minio import MinioAdmin
from minio.credentials import StaticProvider
endpoint, ak, sk, policy_file = sys.argv[1:5]
adm = MinioAdmin(endpoint=endpoint, credentials=StaticProvider(ak, sk), secure=False)
out = {}
adm.user_add("pyuser", "pyuser-secret-1")
adm.policy_add("pypolicy", policy_file=policy_file)
out["attach"] = json.loads(adm.attach_policy(["pypolicy"], user="pyuser"))
adm.group_add("pygroup", ["pyuser"])
out["info"] = json.loads(adm.user_info("pyuser"))
own = MinioAdmin(endpoint=endpoint, credentials=StaticProvider("pyuser", "pyuser-secret-1"), secure=False)
out["own_info"] = json.loads(own.user_info("pyuser"))
out["detach"] = json.loads(adm.detach_policy(["pypolicy"], user="pyuser"))
adm.policy_remove("pypolicy")
adm.user_remove("pyuser")
bad = MinioAdmin(endpoint=endpoint, credentials=StaticProvider(ak, "wrong-secret"), secure=False)
try:
    bad.user_info("pyuser")
    out["bad"] = "accepted"
except Exception as e:
    out["bad"] = str(e)
print(json.dumps(out))
"#;

/// The fake answers a real, current-protocol admin client correctly: its
/// signatures verify, its encrypted bodies decrypt, and the client reads
/// the fake's encrypted attach/detach answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_serves_python_minio_admin() {
    let bin = tokio::task::spawn_blocking(vivian_storage::testing::venv)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the Python peers are needed: {e}"));
    let fake = FakeMinio::start(root()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.json");
    std::fs::write(
        &policy,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::shared/*"]}]}"#,
    )
    .unwrap();
    let mut py = Command::new(bin.join("python"));
    py.args(["-c", PY_CLIENT]);
    let v = run_client(py, &fake, &[policy.as_os_str()]).await;
    assert_eq!(
        v["attach"]["policiesAttached"],
        serde_json::json!(["pypolicy"]),
        "{v}"
    );
    assert_eq!(
        v["detach"]["policiesDetached"],
        serde_json::json!(["pypolicy"]),
        "{v}"
    );
    assert_eq!(v["info"]["policyName"], "pypolicy", "{v}");
    assert_eq!(v["info"]["memberOf"], serde_json::json!(["pygroup"]), "{v}");
    assert_eq!(v["own_info"]["status"], "enabled", "{v}");
    assert!(
        v["bad"].as_str().unwrap().contains("SignatureDoesNotMatch"),
        "{v}"
    );
    let st = fake.state.lock().unwrap();
    assert!(st.users.is_empty() && st.policies.is_empty(), "{st:?}");
    assert!(st
        .calls
        .contains(&"POST idp/builtin/policy/attach".to_string()));
}

/// Builds `tests/madmin-go` (a Go program using madmin-go) offline from
/// Debian's packages: `golang-go` and `golang-github-minio-madmin-go-dev`
/// (GOPATH mode on /usr/share/gocode, no module download). Returns the
/// binary, cached under the target directory.
fn build_madmin_check() -> std::path::PathBuf {
    let gocode = std::path::Path::new("/usr/share/gocode");
    assert!(
        gocode.join("src/github.com/minio/madmin-go").is_dir(),
        "madmin-go is needed: install the Debian package golang-github-minio-madmin-go-dev"
    );
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("madmin-go");
    std::fs::create_dir_all(&tmp).unwrap();
    let bin = tmp.join("madmin-check");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/madmin-go"))
        .env("GOPATH", gocode)
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", tmp.join("cache"))
        .env("HOME", &tmp)
        .output()
        .unwrap_or_else(|e| panic!("cannot run go (install the Debian package golang-go): {e}"));
    assert!(
        out.status.success(),
        "go build of tests/madmin-go failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// The fake answers madmin-go (a second real client, the Go library MinIO's
/// own `mc` uses, as Debian bookworm packages it: 2.0.7): its signatures
/// and encrypted bodies are accepted, it reads the fake's encrypted
/// `list-users` answer, and its legacy attach/detach (no Content-Type)
/// gets the legacy answers it expects (201/204).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_serves_go_madmin() {
    let bin = tokio::task::spawn_blocking(build_madmin_check)
        .await
        .unwrap();
    let fake = FakeMinio::start(root()).await.unwrap();
    let v = run_client(Command::new(bin), &fake, &[]).await;
    assert_eq!(v["group"]["name"], "gogroup", "{v}");
    assert_eq!(v["group"]["members"], serde_json::json!(["gouser"]), "{v}");
    assert_eq!(v["info"]["policyName"], "gopolicy", "{v}");
    assert_eq!(v["info"]["memberOf"], serde_json::json!(["gogroup"]), "{v}");
    assert_eq!(v["info"]["status"], "enabled", "{v}");
    // Decrypted by the Go client from the fake's encrypted answer.
    assert_eq!(v["users"]["gouser"]["policyName"], "gopolicy", "{v}");
    assert_eq!(
        v["users"]["gouser"]["memberOf"],
        serde_json::json!(["gogroup"]),
        "{v}"
    );
    assert_eq!(v["own_info"]["status"], "enabled", "{v}");
    assert!(
        v["bad"]
            .as_str()
            .unwrap()
            .contains("signature we calculated does not match"),
        "{v}"
    );
    assert!(
        v["after_remove"]
            .as_str()
            .unwrap_or("")
            .contains("does not exist"),
        "{v}"
    );
    let st = fake.state.lock().unwrap();
    assert!(st.users.is_empty() && st.policies.is_empty(), "{st:?}");
    assert!(st.groups["gogroup"].is_empty(), "{st:?}");
    for call in [
        "PUT add-user",
        "PUT add-canned-policy",
        "POST idp/builtin/policy/attach",
        "PUT update-group-members",
        "GET group",
        "GET list-users",
        "POST idp/builtin/policy/detach",
        "DELETE remove-canned-policy",
        "DELETE remove-user",
    ] {
        assert!(
            st.calls.contains(&call.to_string()),
            "{call}: {:?}",
            st.calls
        );
    }
}
