//! `executorctl` (the real binary) against an in-process fake executor that
//! speaks the real v1 protocol: output and exit codes for every status,
//! refusals, `--wait`, a missing callback, broken frames, the share
//! directory and MinIO fields, interactive input on a pseudo-terminal, and
//! the DUT listings.

mod executorctl_support;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use executorctl_support::{standard_script, write_job, FakeExecutor, Step};
use serde_json::json;
use vivian_core::job::JobStatus;
use vivian_core::protocol::JobBucket;

const BIN: &str = env!("CARGO_BIN_EXE_executorctl");

/// Runs executorctl with `args` (stdin closed) on a blocking thread.
async fn executorctl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let child = Command::new(BIN)
            .args(&args)
            .env_remove("EXECUTOR_URL")
            .env_remove("VALVE_MINIO_AUTH_CREDENTIALS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start executorctl");
        // Bounded: kill it if it hangs.
        let pid = child.id();
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let out = child.wait_with_output().expect("executorctl output");
        drop(watchdog);
        out
    })
    .await
    .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_args(url: &str, job: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = s(&["-e", url, "run"]);
    a.extend(s(extra));
    a.push(job.display().to_string());
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_is_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    for status in JobStatus::ALL {
        let fake = FakeExecutor::start(vec![], true, standard_script(status)).await;
        let out = executorctl(run_args(
            &fake.url,
            &job,
            &["-t", "gfx10", "-t", "amd", "-j", "job-42"],
        ))
        .await;
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(status.exit_code()),
            "{status}: {stdout}\n{}",
            text(&out.stderr)
        );
        assert!(stdout.contains("+0.001s: Boot the machine\n"), "{stdout}");
        assert!(
            stdout.contains("[    0.000000] Linux version 6.1 (vivian)\r\nJOB_RESULT=0\r\n"),
            "{stdout}"
        );
        assert!(
            stdout.contains(
                "\x1b[1;91;47m+1.500s: Matched the following patterns: job_success\x1b[0m"
            ),
            "{stdout}"
        );
        assert!(
            stdout.contains(" * job_success(1): JOB_RESULT=0"),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("Job status: {status}")),
            "{stdout}"
        );

        let subs = fake.submissions();
        assert_eq!(subs.len(), 1);
        let sub = &subs[0];
        let meta = sub.metadata();
        assert_eq!(meta["version"], 1);
        assert_eq!(meta["job_id"], "job-42");
        assert_eq!(
            meta["target"],
            json!({"id": null, "tags": ["gfx10", "amd"]})
        );
        assert_eq!(meta["minio"], json!({"credentials": {}, "groups": []}));
        assert!(meta["callback"]["port"].as_u64().unwrap() > 0);
        assert!(meta["callback"].get("host").is_none());
        let mp = sub.part("metadata").unwrap();
        assert_eq!(mp.content_type.as_deref(), Some("application/json"));
        assert_eq!(mp.filename.as_deref(), Some("metadata"));
        let jp = sub.part("job").unwrap();
        assert_eq!(jp.content_type.as_deref(), Some("application/x-yaml"));
        assert_eq!(jp.data, std::fs::read(&job).unwrap());
        assert!(sub.part("job_bucket_initial_state_tarball_file").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_without_verdict_is_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let fake = FakeExecutor::start(vec![], true, vec![Step::Io(b"booting\n".to_vec())]).await;
    let out = executorctl(run_args(
        &fake.url,
        &job,
        &["-i", "52:54:00:11:22:0a", "-c", "127.0.0.1"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("booting\n"));
    assert!(text(&out.stderr).contains("closed the connection before the end of the session"));
    let meta = fake.submissions()[0].metadata();
    assert_eq!(
        meta["target"],
        json!({"id": "52:54:00:11:22:0a", "tags": null})
    );
    assert_eq!(meta["callback"]["host"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_are_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let end = || Step::End(JobStatus::Pass, None);
    for (steps, needle) in [
        (
            vec![Step::Raw(b"\x00\x00\x00\x05{bad}".to_vec()), end()],
            "malformed message",
        ),
        (
            vec![Step::Raw(b"\x00\x00\x00\x40{\"msg_type\"".to_vec())],
            "interrupted before receiving the end of the message",
        ),
        (
            vec![Step::Raw(b"\x7f\xff\xff\xff".to_vec()), end()],
            "exceeds the limit",
        ),
    ] {
        let fake = FakeExecutor::start(vec![], true, steps).await;
        let out = executorctl(run_args(&fake.url, &job, &[])).await;
        assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
    }
    // An unknown message type is skipped.
    let frame = br#"{"msg_type": "future", "date": "2024-01-01T00:00:00", "payload": 1}"#;
    let mut raw = (frame.len() as u32).to_be_bytes().to_vec();
    raw.extend_from_slice(frame);
    let fake = FakeExecutor::start(
        vec![],
        true,
        vec![Step::Raw(raw), Step::End(JobStatus::Warn, None)],
    )
    .await;
    let out = executorctl(run_args(&fake.url, &job, &[])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown type 'future'"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_setup_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    for (code, body) in [
        (
            404,
            json!({"error": "Unknown machine with ID 52:54:00:00:00:00"}),
        ),
        (
            409,
            json!({"version": 1, "error_msg": "All machines matching the tags {'x'} are busy"}),
        ),
        (
            400,
            json!({"error": "invalid job description at console_patterns.reboot: unknown field"}),
        ),
    ] {
        let fake = FakeExecutor::start(
            vec![(code, body.clone())],
            true,
            standard_script(JobStatus::Pass),
        )
        .await;
        let out = executorctl(run_args(&fake.url, &job, &[])).await;
        assert_eq!(out.status.code(), Some(6));
        let err = text(&out.stderr);
        assert!(err.contains("Could not queue the job"), "{err}");
        assert!(err.contains(&format!("HTTP {code}")), "{err}");
        let msg = body
            .get("error")
            .or(body.get("error_msg"))
            .unwrap()
            .as_str()
            .unwrap();
        assert!(err.contains(msg), "{err}");
        assert_eq!(fake.submissions().len(), 1, "no retry without --wait");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_retries_on_409() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let busy = json!({"error": "All machines matching the tags are busy"});
    let fake = FakeExecutor::start(
        vec![(409, busy.clone()), (409, busy)],
        true,
        standard_script(JobStatus::Pass),
    )
    .await;
    let out = executorctl(run_args(&fake.url, &job, &["-w"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("No machines available for the job, waiting: ."),
        "{stdout}"
    );
    assert!(stdout.contains("Job queued, the wait is over!"), "{stdout}");
    assert_eq!(fake.submissions().len(), 3);
    // A 404 is not retried even with --wait.
    let fake = FakeExecutor::start(
        vec![(404, json!({"error": "Unknown machine"}))],
        true,
        vec![],
    )
    .await;
    let out = executorctl(run_args(&fake.url, &job, &["-w"])).await;
    assert_eq!(out.status.code(), Some(6));
    assert_eq!(fake.submissions().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_executor_and_bad_input_are_setup_fail() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = executorctl(run_args(&format!("http://127.0.0.1:{port}"), &job, &[])).await;
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("Failed to connect to the executor"),
        "{}",
        text(&out.stderr)
    );

    let fake = FakeExecutor::start(vec![], true, standard_script(JobStatus::Pass)).await;
    let out = executorctl(run_args(&fake.url, &dir.path().join("missing.yml"), &[])).await;
    assert_eq!(out.status.code(), Some(6));
    assert!(text(&out.stderr).contains("cannot read the job file"));
    let out = executorctl(run_args(&fake.url, &job, &["-a", "no-colon"])).await;
    assert_eq!(out.status.code(), Some(6));
    assert!(text(&out.stderr).contains("Incorrect format for the --minio-auth parameter"));
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let out = executorctl(run_args(
        &fake.url,
        &job,
        &["-s", &dir.path().join("file").display().to_string()],
    ))
    .await;
    assert_eq!(out.status.code(), Some(6));
    assert!(text(&out.stderr).contains("is not a folder"));
    assert!(
        fake.submissions().is_empty(),
        "nothing submitted on bad input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_callback_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let fake = FakeExecutor::start(vec![], false, vec![]).await;
    let out = executorctl(run_args(&fake.url, &job, &["--callback-timeout", "0.5"])).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("The server failed to initiate a connection"));
}

/// A TCP server answering every HTTP request with S3's 403 AccessDenied.
async fn refusing_s3() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let body =
                    "<Error><Code>AccessDenied</Code><Message>Access Denied.</Message></Error>";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_directory_and_minio_travel_in_the_submission() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("in.txt"), b"input data").unwrap();
    std::fs::write(share.join("sub/deep.txt"), b"deep").unwrap();
    // An S3 server that refuses everything: the mirror fails at once.
    let s3 = refusing_s3().await;
    let bucket = JobBucket {
        minio_access_url: format!("http://u:p@{s3}"),
        bucket_name: "job-52-54-abc".into(),
    };
    let fake = FakeExecutor::start(
        vec![],
        true,
        vec![Step::End(JobStatus::Complete, Some(bucket))],
    )
    .await;
    let share_arg = share.display().to_string();
    let out = executorctl(run_args(
        &fake.url,
        &job,
        &[
            "-s",
            &share_arg,
            "-a",
            "ACCESS:SECRET",
            "-g",
            "g1",
            "-g",
            "g2",
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("the job bucket is mirrored back into it"),
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the job bucket 'job-52-54-abc' could not be mirrored back")
            && stderr.contains("AccessDenied"),
        "{stderr}"
    );
    // A failed mirror leaves the directory as it was.
    assert_eq!(std::fs::read(share.join("in.txt")).unwrap(), b"input data");

    let sub = &fake.submissions()[0];
    let meta = sub.metadata();
    assert_eq!(
        meta["minio"],
        json!({"credentials": {"access_key": "ACCESS", "secret_key": "SECRET"}, "groups": ["g1", "g2"]})
    );
    let tar_part = sub
        .part("job_bucket_initial_state_tarball_file")
        .expect("tarball part");
    assert_eq!(
        tar_part.content_type.as_deref(),
        Some("application/octet-stream")
    );
    let mut ar = tar::Archive::new(&tar_part.data[..]);
    let mut files = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = String::new();
        e.read_to_string(&mut data).unwrap();
        files.push((name, data));
    }
    files.sort();
    assert_eq!(
        files,
        vec![
            ("in.txt".to_string(), "input data".to_string()),
            ("sub".to_string(), String::new()),
            ("sub/deep.txt".to_string(), "deep".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duts_and_dut_info() {
    let fake = FakeExecutor::start(vec![], true, vec![]).await;
    let out = executorctl(s(&["-e", &fake.url, "duts"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "ID                 Full name     State    IP address  Comment"
    );
    assert_eq!(
        lines[2],
        "52:54:00:11:22:0a  farm-gfx10-1  IDLE     10.42.0.10"
    );
    assert_eq!(
        lines[3],
        "52:54:00:11:22:0b  farm-gfx10-2  RUNNING  10.42.0.11  new fan"
    );

    let out = executorctl(s(&["-e", &fake.url, "dut", "info", "52:54:00:11:22:0a"])).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["full_name"], "farm-gfx10-1");

    let out = executorctl(s(&["-e", &fake.url, "dut", "info", "nope"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("No DUTs exist with this name"));

    let out = executorctl(s(&["-e", "http://127.0.0.1:1", "duts"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the executor"),
        "{}",
        text(&out.stderr)
    );
}

/// A pseudo-terminal pair: (master, slave).
fn openpty() -> (OwnedFd, OwnedFd) {
    let mut master = 0;
    let mut slave = 0;
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_input_with_the_ctrl_a_escape() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;

    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    // The DUT waits for "ls\r", a Ctrl-A sent as Ctrl-A Ctrl-A, then a
    // forwarded Ctrl-C; then the user quits with Ctrl-A Ctrl-C.
    let fake = FakeExecutor::start(
        vec![],
        true,
        vec![
            Step::Io(b"login: ".to_vec()),
            Step::ExpectInput(b"ls\r\x01\x03".to_vec()),
            Step::Io(b"got it\n".to_vec()),
            Step::Sleep(30_000),
        ],
    )
    .await;
    let (master, slave) = openpty();
    let args = run_args(&fake.url, &job, &[]);
    let child = unsafe {
        Command::new(BIN)
            .args(&args)
            .env_remove("EXECUTOR_URL")
            .stdin(Stdio::from(slave))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .pre_exec(|| {
                // Make the pty the controlling terminal so Ctrl-C raises SIGINT.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
            .spawn()
            .expect("start executorctl")
    };
    let mut master = std::fs::File::from(master);
    let wait_for = |pred: &dyn Fn() -> bool, what: &str| {
        for _ in 0..200 {
            if pred() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}");
    };
    // Type only once the client is in the session: it then has put the
    // terminal in cbreak mode (which discards earlier input).
    let cbreak = || {
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::tcgetattr(std::os::fd::AsRawFd::as_raw_fd(&master), &mut t) };
        rc == 0 && t.c_lflag & libc::ICANON == 0
    };
    wait_for(&cbreak, "cbreak mode");
    let keys: &[(&[u8], &[u8])] = &[
        (b"ls\r", b"ls\r"),
        (b"\x01\x01", b"ls\r\x01"),
        (b"\x03", b"ls\r\x01\x03"),
    ];
    for (typed, total) in keys {
        master.write_all(typed).unwrap();
        wait_for(
            &|| fake.input() == *total,
            "the executor to receive the keys",
        );
    }
    wait_for(&|| fake.input().len() == 5, "input");
    // Ctrl-A then Ctrl-C quits the client with INCOMPLETE.
    master.write_all(b"\x01\x03").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(out);
    });
    let out = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("executorctl did not quit on Ctrl-A Ctrl-C");
        }
    };
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("login: "), "{stdout}");
    assert!(stdout.contains("got it"), "{stdout}");
    assert!(text(&out.stderr).contains("Exiting the client in response to Ctrl-A Ctrl-C"));
    assert_eq!(
        fake.input(),
        b"ls\r\x01\x03",
        "Ctrl-A Ctrl-C is not forwarded"
    );
}
