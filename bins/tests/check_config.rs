//! `executor --check-config` and the start-up configuration check, run as
//! the real binary with a controlled environment.

use std::process::{Command, Output};

fn executor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_executor"));
    cmd.args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the executor binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mars_db.yaml");
    let out = executor(
        &["--check-config"],
        &[
            ("FARM_NAME", "tchar"),
            ("MARS_DB_FILE", db.to_str().unwrap()),
            ("EXECUTOR_PORT", "8080"),
            ("MINIO_ROOT_PASSWORD", "very-secret-pw"),
            ("EXECUTOR_JOB__GITLAB_TOKEN", "glpat-secret-token"),
            ("EXECUTOR_JOB__NTP_PEER", "10.42.0.1"),
            ("BOOTS_DEFAULT_X86_64_KERNEL", "http://gw/k64"),
            ("SERGENT_HARTMAN_QUICK_CHECK", "disabled"),
            ("BOOTS_DISABLE_SERVERS", "1"),
            ("EXECUTOR_ARTIFACT_CACHE_MAX_SIZE", "20G"),
            ("VIVIAN_STORAGE_ADMIN_API", "iam"),
        ],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("warning"),
        "every variable given is one the executor reads: {stderr}"
    );
    assert!(
        out.status.success(),
        "status {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for expected in [
        "FARM_NAME=tchar",
        "EXECUTOR_PORT=8080",
        &format!("MARS_DB_FILE={}", db.display()),
        "MINIO_ROOT_PASSWORD=********",
        "EXECUTOR_JOB__GITLAB_TOKEN=********",
        "EXECUTOR_JOB__NTP_PEER=10.42.0.1",
        "BOOTS_DEFAULT_X86_64_KERNEL=http://gw/k64",
        "BOOTS_DEFAULT_KERNEL=http://ci-gateway:9000/boot/default_kernel  # default",
        "SERGENT_HARTMAN_QUICK_CHECK=false",
        "BOOTS_DISABLE_SERVERS=true",
        "EXECUTOR_URL=http://ci-gateway  # default",
        "SERGENT_HARTMAN_BOOT_COUNT=100  # default",
        "MINIO_ROOT_USER=minioadmin  # default",
        "PRIVATE_INTERFACE=private  # default",
        "EXECUTOR_ARTIFACT_CACHE_MAX_SIZE=21474836480",
        "EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS=60  # default",
        "VIVIAN_STORAGE_ADMIN_API=iam",
        "# configuration OK",
    ] {
        assert!(
            lines.contains(&expected),
            "missing line {expected:?} in:\n{stdout}"
        );
    }
    for secret in ["very-secret-pw", "glpat-secret-token"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
}

#[test]
fn check_config_fails_with_every_error_named() {
    let out = executor(
        &["--check-config"],
        &[
            ("SERGENT_HARTMAN_BOOT_COUNT", "abc"),
            ("EXECUTOR_VPDU_ENDPOINT", "localhost"),
            ("MINIO_ROOT_PASSWORD", "very-secret-pw"),
            ("EXECUTOR_ARTIFACT_CACHE_MAX_SIZE", "lots"),
            ("VIVIAN_STORAGE_ADMIN_API", "s3"),
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for a bad configuration"
    );
    for expected in [
        "SERGENT_HARTMAN_BOOT_COUNT=\"abc\": expected an integer",
        "EXECUTOR_VPDU_ENDPOINT=\"localhost\": expected host:port (e.g. localhost:9191)",
        "FARM_NAME is not set",
        "EXECUTOR_ARTIFACT_CACHE_MAX_SIZE=\"lots\": expected a size such as 20G",
        "VIVIAN_STORAGE_ADMIN_API=\"s3\": expected one of minio, iam, iam-allow-only",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("very-secret-pw"));
}

#[test]
fn check_config_checks_the_files_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent/mars_db.yaml");
    let out = executor(
        &["--check-config"],
        &[
            ("FARM_NAME", "f"),
            ("MARS_DB_FILE", missing.to_str().unwrap()),
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("MARS_DB_FILE=\"{}\"", missing.display())),
        "{stderr}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn a_bad_configuration_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mars_db.yaml");
    let out = executor(
        &[],
        &[
            ("FARM_NAME", "f"),
            ("MARS_DB_FILE", db.to_str().unwrap()),
            ("EXECUTOR_PORT", "http"),
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("EXECUTOR_PORT=\"http\": expected a port number (0-65535)"),
        "{stderr}"
    );
    assert!(
        !db.exists(),
        "nothing may be created before the configuration is valid"
    );
}

#[test]
fn unknown_arguments_are_refused() {
    let out = executor(&["--no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--no-such-flag"));
}

#[test]
fn a_missing_private_interface_stops_start_up_naming_it_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mars_db.yaml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = executor(
        &[],
        &[
            ("FARM_NAME", "tchar"),
            ("MARS_DB_FILE", db.to_str().unwrap()),
            ("EXECUTOR_HOST", "127.0.0.1"),
            ("EXECUTOR_PORT", &port.to_string()),
            ("PRIVATE_INTERFACE", "no-such-if0"),
            ("SERGENT_HARTMAN_QUICK_CHECK", "disabled"),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "must not start: {stderr}");
    assert!(
        stderr.contains("no-such-if0") && stderr.contains("BOOTS_DISABLE_SERVERS"),
        "the error names the interface and BOOTS_DISABLE_SERVERS: {stderr}"
    );
}
