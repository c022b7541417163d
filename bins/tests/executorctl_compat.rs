//! Compatibility with the reference Python client,
//! `valve-gfx-ci.executor.client` 0.2.1 from PyPI (installed in a venv under
//! /var/tmp on first use): the reference `executorctl` runs jobs against our
//! fake executor, which speaks `vivian_core::protocol`, and exits with each
//! status; the reference's own `message.py` and our codec read each other's
//! frames; and the reference `executorctl` runs whole jobs on our real
//! executor (the `executor`, `salad` and `vpdu` binaries with a simulated
//! DUT), getting the console streamed and exiting with each verdict.

mod executorctl_support;
mod process_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use executorctl_support::{standard_script, write_job, FakeExecutor};
use process_support::farm::{RealFarm, ONE_DUT};
use process_support::wait_for;
use vivian_core::job::JobStatus;
use vivian_core::protocol::{FrameDecoder, Message, Payload, SubmissionMetadata};

const CLIENT: &str = "valve-gfx-ci.executor.client==0.2.1";
const VENV: &str = "/var/tmp/vivian-refclient-0.2.1";

/// The venv with the reference client, created once (a failure is fatal:
/// CI installs python3-venv and reaches PyPI).
fn venv() -> &'static Path {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY.get_or_init(|| {
        let venv = PathBuf::from(VENV);
        let marker = venv.join(".vivian-ready");
        if !marker.exists() {
            let _ = std::fs::remove_dir_all(&venv);
            let st = Command::new("python3")
                .args(["-m", "venv", VENV])
                .status()
                .expect("python3 is needed (Debian packages python3 and python3-venv)");
            assert!(
                st.success(),
                "python3 -m venv failed: install the Debian package python3-venv"
            );
            let out = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", CLIENT])
                .output()
                .expect("run pip");
            assert!(
                out.status.success(),
                "pip install {CLIENT} failed (PyPI must be reachable): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&marker, b"ok").unwrap();
        }
        venv
    })
}

/// A directory holding a stub `mcli` (the 0.2.1 client refuses to run
/// without one on PATH; it is only used for share directories).
fn mcli_stub(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mcli = bin.join("mcli");
    std::fs::write(&mcli, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&mcli, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

async fn reference_executorctl(args: Vec<String>, stub: PathBuf) -> Output {
    let venv = venv().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let path = format!(
            "{}:{}:{}",
            stub.display(),
            venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(venv.join("bin/executorctl"))
            .args(&args)
            .env("PATH", path)
            .env_remove("VALVE_MINIO_AUTH_CREDENTIALS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the reference executorctl");
        let pid = child.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let out = child.wait_with_output().unwrap();
        drop(killer);
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_gets_every_status_from_our_protocol() {
    tokio::task::spawn_blocking(venv).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path());
    let stub = mcli_stub(dir.path());
    for status in JobStatus::ALL {
        let fake = FakeExecutor::start(vec![], true, standard_script(status)).await;
        let args = vec![
            "-e".to_string(),
            fake.url.trim_end_matches('/').to_string(),
            "run".into(),
            "-t".into(),
            "gfx10".into(),
            "-j".into(),
            "ref-job".into(),
            job.display().to_string(),
        ];
        let out = reference_executorctl(args, stub.clone()).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(status.exit_code()),
            "{status}:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("+0.001s: Boot the machine"), "{stdout}");
        assert!(
            stdout.contains("[    0.000000] Linux version 6.1 (vivian)\r\nJOB_RESULT=0\r\n"),
            "{stdout}"
        );
        assert!(
            stdout.contains(" * job_success(1): JOB_RESULT=0"),
            "tag 401 metadata understood: {stdout}"
        );

        // Our server-side type accepts the reference client's metadata.
        let sub = &fake.submissions()[0];
        let meta = SubmissionMetadata::from_json(&sub.part("metadata").unwrap().data).unwrap();
        assert_eq!(meta.job_id.as_deref(), Some("ref-job"));
        assert_eq!(meta.target.unwrap().to_target().tags, vec!["gfx10"]);
        assert!(meta.callback.port > 0);
        assert_eq!(
            sub.part("metadata").unwrap().content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(
            sub.part("job").unwrap().content_type.as_deref(),
            Some("application/x-yaml")
        );
    }
}

fn venv_python(script: &str, stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(venv().join("bin/python"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn reference_message_py_and_our_codec_agree() {
    // Python → us: the reference's own serializer, every message kind.
    let frames = venv_python(
        r#"
import sys
from valve_gfx_ci.executor.client.message import JobIOMessage, ControlMessage, SessionEndMessage, JobStatus, LogLevel
out = b""
out += JobIOMessage.create(b"keys \x01\x03\xff").serialize()
out += ControlMessage.create("+1.000s: caf\u00e9\n", severity=LogLevel.WARN, tag=400, metadata={"timeout": {"name": "boot_cycle"}}).serialize()
for s in JobStatus:
    out += SessionEndMessage.create(s).serialize()
sys.stdout.buffer.write(out)
"#,
        b"",
    );
    let mut d = FrameDecoder::new();
    d.push(&frames);
    let m = d.next_message().unwrap().unwrap();
    assert_eq!(m.payload, Payload::JobIo(b"keys \x01\x03\xff".to_vec()));
    match d.next_message().unwrap().unwrap().payload {
        Payload::Control(c) => {
            assert_eq!(c.msg, "+1.000s: café\n");
            assert_eq!(c.severity as u8, 2);
            assert_eq!(c.tag, 400);
            assert_eq!(c.metadata["timeout"]["name"], "boot_cycle");
        }
        other => panic!("{other:?}"),
    }
    for status in JobStatus::ALL {
        match d.next_message().unwrap().unwrap().payload {
            Payload::SessionEnd(e) => assert_eq!(e.status, status),
            other => panic!("{other:?}"),
        }
    }
    d.finish().unwrap();

    // Us → Python: the reference's reader parses our frames.
    let mut ours = Vec::new();
    ours.extend(
        Message::job_io(b"console \x00\xfe\r\n".to_vec())
            .encode()
            .unwrap(),
    );
    ours.extend(
        Message::control(
            "+2.000s: Power up ☃\n",
            vivian_core::protocol::Severity::Error,
        )
        .encode()
        .unwrap(),
    );
    for status in JobStatus::ALL {
        ours.extend(Message::session_end(status).encode().unwrap());
    }
    let report = venv_python(
        r#"
import sys, json
from valve_gfx_ci.executor.client.message import Message, MessageType
class S:
    def __init__(self, data): self.data = data
    def recv(self, n):
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk
s = S(sys.stdin.buffer.read())
out = []
while s.data:
    m = Message.next_message(s)
    if m.msg_type == MessageType.JOB_IO:
        out.append(["job_io", m.buffer.hex()])
    elif m.msg_type == MessageType.CONTROL:
        out.append(["ctrl", m.message, int(m.severity), int(m.tag)])
    else:
        out.append(["session_end", m.status.name, m.status.status_code])
try:
    Message.next_message(S(b"\x00\x00\x00\x10{"))
except EOFError as e:
    out.append(["eof", str(e)])
print(json.dumps(out))
"#,
        &ours,
    );
    let report: serde_json::Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(
        report[0],
        serde_json::json!(["job_io", "636f6e736f6c6520 00fe0d0a".replace(' ', "")])
    );
    assert_eq!(
        report[1],
        serde_json::json!(["ctrl", "+2.000s: Power up ☃\n", 3, 0])
    );
    for (i, status) in JobStatus::ALL.iter().enumerate() {
        assert_eq!(
            report[2 + i],
            serde_json::json!(["session_end", status.as_str(), status.exit_code()])
        );
    }
    assert_eq!(report[9][1], vivian_core::protocol::EOF_MID_FRAME);
}

/// Our real executor, as an operator runs it: `salad`, `vpdu` with
/// simulated DUTs, `executor` on a MarsDB file (one DUT, tag `sim`, with
/// `EXECUTOR_JOB__POOL=sim`), and an HTTP server for the job artifacts.
async fn real_farm() -> RealFarm {
    RealFarm::builder("compat")
        // A variable of the job templates (EX B.6), used by the jobs'
        // target: the submission-time render must see it too.
        .env("EXECUTOR_JOB__POOL", "sim")
        .start()
        .await
}

impl RealFarm {
    /// Writes a job whose DUT runs `cmds` (simulated-DUT script commands).
    fn job(&self, name: &str, extra: &str, cmds: &[&str]) -> PathBuf {
        let head = format!(
            r#"target: {{tags: ["{{{{ pool }}}}"]}}
{extra}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^JOB_RESULT=PASS"}}"#
        );
        self.write_sim_job(name, &head, cmds)
    }

    async fn run(&self, job: &Path, extra_args: &[&str]) -> (Option<i32>, String) {
        let mut args = vec!["-e".to_string(), self.api.clone(), "run".to_string()];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        args.push(job.display().to_string());
        let out = reference_executorctl(args, mcli_stub(self.dir.path())).await;
        let text = format!(
            "{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The DUT goes back to IDLE before the next job.
        wait_for(
            &format!("{}/api/v1/dut/{ONE_DUT}", self.api),
            "the DUT goes back to IDLE",
            |v| v["state"] == "IDLE",
        )
        .await;
        (out.status.code(), text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_runs_jobs_on_our_real_executor() {
    tokio::task::spawn_blocking(venv).await.unwrap();
    let farm = real_farm().await;

    // PASS: the console is streamed, the verdict is the exit code.
    let pass = farm.job(
        "pass.yml",
        "timeouts:\n  overall: {minutes: 1}",
        &[
            "print running on @MAC@",
            "print JOB_RESULT=PASS",
            "poweroff",
        ],
    );
    let (code, out) = farm.run(&pass, &["-j", "compat-pass"]).await;
    assert_eq!(code, Some(0), "PASS exits 0:\n{out}");
    assert!(out.contains("simulated kernel up"), "{out}");
    assert!(out.contains(&format!("running on {ONE_DUT}")), "{out}");
    assert!(out.contains("JOB_RESULT=PASS"), "{out}");
    assert!(out.contains("Matched the following patterns"), "{out}");

    // FAIL, with the target given on the command line (-i).
    let fail = farm.job(
        "fail.yml",
        "timeouts:\n  overall: {minutes: 1}",
        &["print JOB_RESULT=FAIL", "poweroff"],
    );
    let (code, out) = farm.run(&fail, &["-i", ONE_DUT]).await;
    assert_eq!(code, Some(3), "FAIL exits 3:\n{out}");
    assert!(out.contains("JOB_RESULT=FAIL"), "{out}");

    // INCOMPLETE: the DUT hangs and the console timeout has no retry left.
    let hang = farm.job(
        "hang.yml",
        "timeouts:\n  overall: {minutes: 1}\n  console_activity: {seconds: 1}",
        &["print about to hang", "hang"],
    );
    let (code, out) = farm.run(&hang, &["-t", "sim"]).await;
    assert_eq!(code, Some(4), "INCOMPLETE exits 4:\n{out}");
    assert!(out.contains("about to hang"), "{out}");

    // Refused (a deadline in the past): SETUP_FAIL, nothing runs.
    let late = farm.dir.path().join("late.yml");
    std::fs::write(
        &late,
        std::fs::read_to_string(&pass).unwrap().replace(
            "version: 1\n",
            "version: 1\ndeadline: \"2001-01-01 00:00:00\"\n",
        ),
    )
    .unwrap();
    let (code, out) = farm.run(&late, &[]).await;
    assert_eq!(code, Some(6), "a refused job exits 6:\n{out}");
    assert!(out.contains("deadline"), "the reason is shown:\n{out}");

    // Three jobs ran, each logged.
    let logs = std::fs::read_dir(farm.dir.path().join("job_logs"))
        .unwrap()
        .count();
    assert_eq!(logs, 3);
}
