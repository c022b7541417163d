//! Jobs end to end on a farm of the real binaries, as an operator runs it:
//! `salad` (the consoles), `vpdu` (a virtual PDU whose outlets power
//! simulated DUTs that netboot from the executor and run the script of
//! their command line), `executor` on a MarsDB file, and jobs submitted with
//! the `executorctl` binary, whose exit code is the verdict and whose
//! output shows the console and the control messages. The teardown test
//! speaks the v1 protocol itself (a client that does not close).
//!
//! A few tests of features the Done-when list does not name (DHCP, the
//! `machine_unfit_for_service` hand-over to training, job variables) run on
//! the in-process demo farm at the end of the file.

mod process_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use process_support::farm::RealFarm;
use vivian_core::job::JobStatus;
use vivian_core::protocol::{FrameDecoder, Payload};

/// The MAC address of the simulated DUT on outlet `i`.
fn mac(i: u16) -> String {
    vivian::vpdu::outlet_mac(i)
}

/// A farm of the real binaries with `duts` simulated DUTs (tags `sim` and
/// `sim:outlet<i>`), plus an HTTP server for the job artifacts (the
/// simulated kernel and initrd).
async fn start_farm(duts: u8) -> RealFarm {
    start_farm_with(duts, &[]).await
}

/// A farm whose executor has `env` added to its environment.
async fn start_farm_with(duts: u8, env: &[(&str, String)]) -> RealFarm {
    let mut b = RealFarm::builder("jobs")
        .marsdb(duts, (0..u16::from(duts)).map(mac).collect(), move |a| {
            vivian::demo::demo_marsdb(a, duts)
        })
        .artifacts(vivian::demo::DEMO_KERNEL, "simulated initramfs\n")
        .env("RUST_LOG", "info")
        .executor_url();
    for (k, v) in env {
        b = b.env(k, v.clone());
    }
    b.start().await
}

impl RealFarm {
    /// Writes a job file (`@ARTIFACTS@` replaced by the artifacts' URL).
    fn write_job(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text.replace("@ARTIFACTS@", &self.artifacts)).unwrap();
        p
    }

    /// Runs `executorctl` on `job` with `args`: the status and output.
    async fn executorctl(&self, job: &Path, args: &[&str]) -> (JobStatus, String) {
        executorctl(&self.api, job, args).await
    }

    /// Runs a job in the background.
    fn spawn(&self, job: PathBuf, args: &[&str]) -> tokio::task::JoinHandle<(JobStatus, String)> {
        let api = self.api.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            executorctl(&api, &job, &args).await
        })
    }

    async fn dut_json(&self, id: &str) -> serde_json::Value {
        reqwest::get(format!("{}/api/v1/dut/{id}", self.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_state(&self, id: &str, state: &str) {
        for _ in 0..300 {
            if self.dut_json(id).await["state"] == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} never reached {state}: {}", self.dut_json(id).await);
    }

    async fn port_state(&self, i: u16) -> serde_json::Value {
        let port: serde_json::Value =
            reqwest::get(format!("{}/api/v1/pdu/VPDU/port/{i}", self.api))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        port["state"].clone()
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("job_logs")
    }

    /// The job logs, by file name.
    fn logs(&self) -> Vec<(String, String)> {
        let mut logs: Vec<_> = std::fs::read_dir(self.log_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            std::fs::read_to_string(e.path()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs
    }

    fn only_log(&self) -> String {
        let logs = self.logs();
        assert_eq!(logs.len(), 1, "{logs:?}");
        logs.into_iter().next().unwrap().1
    }

    /// The log of the job whose id starts with `id`.
    fn log_of(&self, id: &str) -> String {
        self.logs()
            .into_iter()
            .find(|(name, _)| name.starts_with(&format!("{id}.")))
            .map(|(_, text)| text)
            .unwrap_or_default()
    }
}

/// Runs `executorctl -e API run ARGS JOB` (stdin closed, bounded in
/// time): the status its exit code gives, and its output.
async fn executorctl(api: &str, job: &Path, args: &[&str]) -> (JobStatus, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_executorctl"));
    cmd.args(["-e", api, "run"])
        .args(args)
        .arg(job)
        .env_remove("EXECUTOR_URL")
        .env_remove("VALVE_MINIO_AUTH_CREDENTIALS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("executorctl ends in time")
        .expect("executorctl runs");
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = JobStatus::ALL
        .into_iter()
        .find(|s| Some(s.exit_code()) == out.status.code())
        .unwrap_or_else(|| panic!("unexpected exit {:?}:\n{text}", out.status));
    (status, text)
}

/// A job for the simulated DUTs: `cmds` are simulated-DUT script commands.
fn job(target_tags: &[&str], extra: &str, cmds: &[&str]) -> String {
    let tags = target_tags
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut cmdline = String::from("        - \"SALAD.machine_id={{ machine_id }}\"\n");
    for c in cmds {
        cmdline.push_str(&format!("        - 'vivian.cmd=\"{c}\"'\n"));
    }
    format!(
        r#"version: 1
target: {{tags: [{tags}]}}
{extra}
deployment:
  start:
    kernel:
      url: "@ARTIFACTS@/kernel"
      cmdline:
{cmdline}    initramfs:
      url: "@ARTIFACTS@/initrd"
"#
    )
}

const PATTERNS: &str = r#"console_patterns:
  session_end: {regex: "reboot: Power down"}
  job_success: {regex: "^JOB_RESULT=PASS"}
  job_warn: {regex: "^WARNING: "}
timeouts:
  overall: {minutes: 2}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_job_passes_and_the_dut_goes_back_to_idle() {
    let f = start_farm(2).await;
    let path = f.write_job("sample.yml.j2", vivian::demo::SAMPLE_JOB);
    let (status, out) = f.executorctl(&path, &[]).await;
    assert_eq!(status, JobStatus::Pass, "{out}");
    // The console was streamed to the client, with the verdict.
    assert!(out.contains("simulated kernel booted"), "{out}");
    assert!(out.contains("JOB_RESULT=PASS"), "{out}");
    f.wait_state(&mac(0), "IDLE").await;
    // The port is OFF again after the job.
    assert_eq!(f.port_state(0).await, "OFF");
    // The job log has the console output and the verdict; the client
    // closed at once, so the teardown did not wait for infra_teardown.
    let log = f.only_log();
    assert!(log.contains("JOB_RESULT=PASS"), "{log}");
    assert!(log.contains("session end: PASS"), "{log}");
    assert!(!log.contains("infra_teardown"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_pass_fail_warn_complete() {
    let f = start_farm(4).await;
    let cases: [(&str, String, JobStatus); 4] = [
        (
            "pass",
            job(
                &["sim:outlet0"],
                PATTERNS,
                // The verdict line and the start of the next one in one
                // write, so in one console chunk.
                &[
                    "printf JOB_RESULT=PASS\\r\\nhalf-",
                    "sleep 0.2",
                    "print line",
                    "poweroff",
                ],
            ),
            JobStatus::Pass,
        ),
        (
            "fail",
            job(
                &["sim:outlet1"],
                PATTERNS,
                &["print JOB_RESULT=FAIL", "poweroff"],
            ),
            JobStatus::Fail,
        ),
        (
            "warn",
            job(
                &["sim:outlet2"],
                PATTERNS,
                &[
                    "print WARNING: something odd",
                    "print JOB_RESULT=PASS",
                    "poweroff",
                ],
            ),
            JobStatus::Warn,
        ),
        (
            "complete",
            job(
                &["sim:outlet3"],
                "console_patterns:\n  session_end: {regex: \"reboot: Power down\"}",
                &["print done", "poweroff"],
            ),
            JobStatus::Complete,
        ),
    ];
    // All four at once, one per DUT.
    let mut handles = Vec::new();
    for (name, text, want) in cases {
        let path = f.write_job(&format!("{name}.yml"), &text);
        handles.push((name, f.spawn(path, &[]), want));
    }
    for (name, h, want) in handles {
        let (status, out) = h.await.unwrap();
        assert_eq!(status, want, "job {name}:\n{out}");
        assert!(out.contains(&format!("Job status: {want}")), "{out}");
        if name == "pass" {
            // The match is reported after its line, before the rest of
            // the chunk: it does not cut the next line in two.
            let matched = out
                .find("Matched the following patterns: job_success")
                .expect("the match is reported");
            let line = out.find("half-line").unwrap_or_else(|| panic!("{out}"));
            assert!(
                out.find("JOB_RESULT=PASS\r\n").is_some_and(|i| i < matched) && matched < line,
                "{out}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reboot_boots_the_continue_deployment() {
    let f = start_farm(1).await;
    // The first boot asks for a reboot; `continue` boots a command line
    // that passes.
    let text = r#"version: 1
target: {tags: ["sim"]}
console_patterns:
  session_end: {regex: "reboot: Power down"}
  session_reboot: {regex: "^PLEASE_REBOOT"}
  job_success: {regex: "^JOB_RESULT=PASS"}
timeouts:
  boot_cycle: {minutes: 1, retries: 1}
deployment:
  start:
    kernel:
      url: "@ARTIFACTS@/kernel"
      cmdline: ['vivian.cmd="print PLEASE_REBOOT"', 'vivian.cmd=hang']
    initramfs:
      url: "@ARTIFACTS@/initrd"
  continue:
    kernel:
      cmdline: ['vivian.cmd="print JOB_RESULT=PASS"', 'vivian.cmd=poweroff']
"#;
    let path = f.write_job("reboot.yml", text);
    let (status, out) = f.executorctl(&path, &[]).await;
    assert_eq!(status, JobStatus::Pass, "{out}");
    assert!(
        out.contains("Hit: session_reboot requested (retry 1/1)"),
        "{out}"
    );
    assert!(
        out.contains("Rebooting the DUT with the continue deployment"),
        "{out}"
    );
    // Both boots ran, in order.
    let first = out.find("PLEASE_REBOOT").expect("the start boot ran");
    let second = out.rfind("JOB_RESULT=PASS").expect("the continue boot ran");
    assert!(first < second, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job() {
    let f = start_farm(1).await;
    let text = job(&["sim"], PATTERNS, &["print started", "hang"]);
    let path = f.write_job("cancel.yml", &text);
    let job = f.spawn(path, &[]);
    f.wait_state(&mac(0), "RUNNING").await;
    // Wait for the DUT to boot, so the cancel lands mid-job.
    for _ in 0..200 {
        if f.logs().iter().any(|(_, l)| l.contains("started")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(f.port_state(0).await, "ON");
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/dut/{}/cancel_job", f.api, mac(0)))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (status, out) = tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .unwrap()
        .unwrap();
    // No verdict: the client reports INCOMPLETE.
    assert_eq!(status, JobStatus::Incomplete, "{out}");
    assert!(out.contains("The job was cancelled"), "{out}");
    f.wait_state(&mac(0), "IDLE").await;
    assert_eq!(f.port_state(0).await, "OFF");
    let log = f.only_log();
    assert!(!log.contains("session end"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_on_one_dut_with_wait_run_one_after_the_other() {
    let f = start_farm(1).await;
    let text = job(
        &["sim"],
        PATTERNS,
        &["sleep 0.5", "print JOB_RESULT=PASS", "poweroff"],
    );
    let a = f.spawn(f.write_job("a.yml", &text), &["-w", "-j", "a"]);
    let b = f.spawn(f.write_job("b.yml", &text), &["-w", "-j", "b"]);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(
        (a.0, b.0),
        (JobStatus::Pass, JobStatus::Pass),
        "{a:?}\n{b:?}"
    );
    // Both ran on the one DUT, one after the other.
    assert_eq!(f.logs().len(), 2);
    assert!(f.log_of("a").contains("JOB_RESULT=PASS"));
    assert!(f.log_of("b").contains("JOB_RESULT=PASS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_dut_refuses_a_job_without_wait() {
    let f = start_farm(1).await;
    let long = job(
        &["sim"],
        PATTERNS,
        &["sleep 3", "print JOB_RESULT=PASS", "poweroff"],
    );
    let first = f.spawn(f.write_job("long.yml", &long), &[]);
    f.wait_state(&mac(0), "RUNNING").await;
    let (status, out) = f.executorctl(&f.write_job("second.yml", &long), &[]).await;
    assert_eq!(status, JobStatus::SetupFail, "{out}");
    assert_eq!(first.await.unwrap().0, JobStatus::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_the_duts_matching_their_tags() {
    let f = start_farm(4).await;
    let text = job(
        &["sim"],
        PATTERNS,
        &[
            "print ran on @MAC@",
            "sleep 1",
            "print JOB_RESULT=PASS",
            "poweroff",
        ],
    );
    let handles: Vec<_> = (0..4)
        .map(|i| f.spawn(f.write_job(&format!("j{i}.yml"), &text), &[]))
        .collect();
    let mut macs = Vec::new();
    for h in handles {
        let (status, out) = h.await.unwrap();
        assert_eq!(status, JobStatus::Pass, "{out}");
        let mac = out
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("ran on "))
            .expect("the DUT said where it ran")
            .trim()
            .to_string();
        macs.push(mac);
    }
    // Four jobs, four different DUTs.
    macs.sort();
    macs.dedup();
    assert_eq!(macs, (0..4).map(mac).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_is_refused() {
    let f = start_farm(1).await;
    let text = job(&["sim"], PATTERNS, &["print JOB_RESULT=PASS", "poweroff"]).replace(
        "version: 1\n",
        "version: 1\ndeadline: \"2001-01-01 00:00:00\"\n",
    );
    let path = f.write_job("late.yml", &text);
    let (status, out) = f.executorctl(&path, &[]).await;
    assert_eq!(status, JobStatus::SetupFail, "{out}");
    assert!(out.contains("deadline"), "the reason is shown:\n{out}");
    // Nothing was powered, and the DUT is free.
    assert_ne!(f.port_state(0).await, "ON");
    f.wait_state(&mac(0), "IDLE").await;
}

/// One case of the timeouts table: the timeouts, the commands of the
/// `start` and `continue` boots, the verdict and what the client must
/// have been told.
struct TimeoutCase {
    name: &'static str,
    timeouts: &'static str,
    start: &'static [&'static str],
    again: &'static [&'static str],
    want: JobStatus,
    told: &'static [&'static str],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_timeout_expires_with_and_without_retries_left() {
    const PASS: &[&str] = &["print JOB_RESULT=PASS", "poweroff"];
    // Silent after half a line: the timeout's message starts a new line.
    const SILENT: &[&str] = &["printf going silent", "hang"];
    // A DUT that keeps talking for about 4 s without ending the session.
    const CHATTY: &[&str] = &[
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "print tick",
        "sleep 0.4",
        "hang",
    ];
    // A watchdog started and never reset, the console still busy.
    const UNWATCHED: &[&str] = &[
        "print HB_START",
        "print still talking",
        "sleep 0.4",
        "print still talking",
        "sleep 0.4",
        "print still talking",
        "sleep 0.4",
        "print still talking",
        "sleep 0.4",
        "print still talking",
        "sleep 20",
        "poweroff",
    ];
    let cases = [
        TimeoutCase {
            name: "first_console_activity, retried, then the continue boot passes",
            timeouts: "first_console_activity: {seconds: 1.5, retries: 1}",
            start: &["vivian.boot_delay=10"],
            again: PASS,
            want: JobStatus::Pass,
            told: &["Hit: timeout first_console_activity expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "first_console_activity without retries",
            timeouts: "first_console_activity: {seconds: 1.5}",
            start: &["vivian.boot_delay=10"],
            again: PASS,
            want: JobStatus::Incomplete,
            told: &["Hit: timeout first_console_activity expired (retry 1/0): no retries left"],
        },
        TimeoutCase {
            name: "console_activity, retried, then the continue boot passes",
            timeouts: "console_activity: {seconds: 1, retries: 1}",
            start: SILENT,
            again: PASS,
            want: JobStatus::Pass,
            told: &["Hit: timeout console_activity expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "console_activity, retried, and silent again: no retries left",
            timeouts: "console_activity: {seconds: 1, retries: 1}",
            start: SILENT,
            again: SILENT,
            want: JobStatus::Incomplete,
            told: &[
                "Hit: timeout console_activity expired (retry 1/1)",
                "Hit: timeout console_activity expired (retry 2/1): no retries left",
            ],
        },
        TimeoutCase {
            name: "boot_cycle, retried, then the continue boot passes",
            timeouts: "boot_cycle: {seconds: 1.5, retries: 1}\n  console_activity: {seconds: 3}",
            start: CHATTY,
            again: PASS,
            want: JobStatus::Pass,
            told: &["Hit: timeout boot_cycle expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "boot_cycle without retries",
            timeouts: "boot_cycle: {seconds: 1.5}\n  console_activity: {seconds: 3}",
            start: CHATTY,
            again: PASS,
            want: JobStatus::Incomplete,
            told: &["Hit: timeout boot_cycle expired (retry 1/0): no retries left"],
        },
        TimeoutCase {
            name: "overall (never retried; other timeouts' retries do not extend it)",
            timeouts: "overall: {seconds: 1.5}\n  console_activity: {seconds: 3, retries: 3}",
            start: CHATTY,
            again: PASS,
            want: JobStatus::Incomplete,
            told: &["The overall timeout expired"],
        },
        TimeoutCase {
            name: "a watchdog, retried, then the continue boot passes",
            timeouts: "watchdogs:\n    heartbeat: {seconds: 1, retries: 1}",
            start: UNWATCHED,
            again: PASS,
            want: JobStatus::Pass,
            told: &["Hit: timeout heartbeat expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "a watchdog without retries",
            timeouts: "watchdogs:\n    heartbeat: {seconds: 1}",
            start: UNWATCHED,
            again: PASS,
            want: JobStatus::Incomplete,
            told: &["Hit: timeout heartbeat expired (retry 1/0): no retries left"],
        },
    ];
    let f = start_farm(cases.len() as u8).await;
    let mut handles = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let list = |cmds: &[&str]| {
            cmds.iter()
                .map(|c| {
                    if c.starts_with("vivian.") {
                        format!("'{c}'")
                    } else {
                        format!("'vivian.cmd=\"{c}\"'")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            r#"version: 1
target: {{tags: ["sim:outlet{i}"]}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^JOB_RESULT=PASS"}}
  watchdogs:
    heartbeat:
      start: {{regex: "^HB_START"}}
      reset: {{regex: "^HB_RESET"}}
      stop: {{regex: "^HB_STOP"}}
timeouts:
  {timeouts}
deployment:
  start:
    kernel:
      url: "@ARTIFACTS@/kernel"
      cmdline: [{start}]
    initramfs:
      url: "@ARTIFACTS@/initrd"
  continue:
    kernel:
      cmdline: [{again}]
"#,
            timeouts = case.timeouts,
            start = list(case.start),
            again = list(case.again),
        );
        let path = f.write_job(&format!("case{i}.yml"), &text);
        handles.push(f.spawn(path, &["-j", &format!("case{i}")]));
    }
    let mut failures = Vec::new();
    for (i, (case, h)) in cases.iter().zip(handles).enumerate() {
        let (status, out) = h.await.unwrap();
        if status != case.want {
            failures.push(format!(
                "{}: {status}, expected {}\n{out}",
                case.name, case.want
            ));
        }
        // The client was told, and so was the job's log.
        let log = f.log_of(&format!("case{i}"));
        for want in case.told {
            if !out.contains(want) || !log.contains(want) {
                failures.push(format!(
                    "{}: the client or the log lacks {want:?}\n{out}\n--- log ---\n{log}",
                    case.name
                ));
            }
        }
        if case.start == SILENT
            && !(out.contains("going silent\n") && log.contains("going silent\n"))
        {
            failures.push(format!(
                "{}: the timeout's message does not start a new line\n{out}\n--- log ---\n{log}",
                case.name
            ));
        }
        if !out.contains(&format!("Job status: {}", case.want)) {
            failures.push(format!("{}: no verdict shown\n{out}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Every DUT is powered off and free again.
    for i in 0..cases.len() as u16 {
        f.wait_state(&mac(i), "IDLE").await;
        assert_eq!(f.port_state(i).await, "OFF", "outlet {i}");
    }
}

/// An HTTP origin that accepts connections and never answers (bounded:
/// the task ends with the test's runtime).
async fn stalling_origin() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infra_setup_expires_and_is_never_retried() {
    // With an artifact cache, the setup fetches the boot's artifacts under
    // `infra_setup`; an origin that never answers makes it expire. A setup
    // failure ends the session (EX D.6 step 7): `retries` do not apply.
    let cache = tempfile::tempdir().unwrap();
    let f = start_farm_with(
        2,
        &[(
            "EXECUTOR_ARTIFACT_CACHE_ROOT",
            cache.path().display().to_string(),
        )],
    )
    .await;
    let origin = stalling_origin().await;
    let cases = [
        ("infra_setup: {seconds: 1}", 0u16),
        ("infra_setup: {seconds: 1, retries: 2}", 1),
    ];
    let mut handles = Vec::new();
    for (i, (timeouts, outlet)) in cases.iter().enumerate() {
        let text = job(
            &[&format!("sim:outlet{outlet}")],
            &format!("{PATTERNS}\n  {timeouts}"),
            &["print JOB_RESULT=PASS", "poweroff"],
        )
        .replace("@ARTIFACTS@/kernel", &format!("{origin}/kernel"));
        handles.push(f.spawn(f.write_job(&format!("setup{i}.yml"), &text), &[]));
    }
    for ((timeouts, outlet), h) in cases.iter().zip(handles) {
        let (status, out) = h.await.unwrap();
        assert_eq!(status, JobStatus::SetupFail, "{timeouts}:\n{out}");
        // The client is told whose fault it is, and which timeout.
        assert!(
            out.contains(
                "infrastructure error: the infra_setup timeout (1 s) expired while \
                 fetching the job's artifacts"
            ),
            "{timeouts}:\n{out}"
        );
        assert_eq!(out.matches("infra_setup timeout").count(), 1, "{out}");
        // The DUT was never powered on, and is free again.
        assert!(!out.contains("JOB_RESULT"), "{out}");
        f.wait_state(&mac(*outlet), "IDLE").await;
        assert_ne!(f.port_state(*outlet).await, "ON");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infra_teardown_expires_when_the_client_keeps_the_connection() {
    let f = start_farm(1).await;
    // Neither `infra_teardown` nor `overall` can have retries (EX B.3):
    // refused at submission, with the reason.
    for (name, timeout) in [
        (
            "teardown-retried",
            "infra_teardown: {seconds: 1, retries: 1}",
        ),
        ("overall-retried", "overall: {seconds: 30, retries: 1}"),
    ] {
        let text = job(
            &["sim"],
            &format!("console_patterns:\n  session_end: {{regex: \"reboot: Power down\"}}\ntimeouts:\n  {timeout}"),
            &["print JOB_RESULT=PASS", "poweroff"],
        );
        let (status, out) = f
            .executorctl(&f.write_job(&format!("{name}.yml"), &text), &[])
            .await;
        assert_eq!(status, JobStatus::SetupFail, "{name}: {out}");
        assert!(
            out.contains("Neither the overall nor the teardown timeout can have retries"),
            "{name}: {out}"
        );
    }
    assert!(f.logs().is_empty(), "nothing ran: {:?}", f.logs());

    // A client that gets its verdict and does not close the connection:
    // the executor waits `infra_teardown` (2 s), then closes it and frees
    // the DUT.
    let text = job(
        &["sim"],
        &format!("{PATTERNS}\n  infra_teardown: {{seconds: 2}}"),
        &["print JOB_RESULT=PASS", "poweroff"],
    )
    .replace("@ARTIFACTS@", &f.artifacts);
    let callback = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metadata = serde_json::json!({
        "version": 1,
        "job_id": "teardown",
        "callback": {"port": callback.local_addr().unwrap().port()},
        "target": {"id": null, "tags": ["sim"]},
        "minio": {"credentials": {}, "groups": []},
    });
    let form = reqwest::multipart::Form::new()
        .part(
            "metadata",
            reqwest::multipart::Part::text(metadata.to_string())
                .file_name("metadata")
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "job",
            reqwest::multipart::Part::text(text)
                .file_name("job")
                .mime_str("application/x-yaml")
                .unwrap(),
        );
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/jobs", f.api))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let (mut sock, _) = tokio::time::timeout(Duration::from_secs(30), callback.accept())
        .await
        .expect("the executor connects back")
        .unwrap();
    use tokio::io::AsyncReadExt;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = None;
    let mut console = Vec::new();
    while end.is_none() {
        let n = tokio::time::timeout(Duration::from_secs(60), sock.read(&mut buf))
            .await
            .expect("session_end comes")
            .unwrap();
        assert!(n > 0, "the connection closed before session_end");
        decoder.push(&buf[..n]);
        while let Some(m) = decoder.next_message().unwrap() {
            match m.payload {
                Payload::JobIo(d) => console.extend(d),
                Payload::SessionEnd(e) => end = Some(e.status),
                Payload::Control(_) => {}
            }
        }
    }
    assert_eq!(end, Some(JobStatus::Pass));
    assert!(String::from_utf8_lossy(&console).contains("JOB_RESULT=PASS"));
    // The teardown waits for us: the DUT is still busy.
    assert_eq!(
        f.dut_json(&mac(0)).await["state"],
        "RUNNING",
        "{}",
        f.log_of("teardown")
    );
    // Nothing more comes; the executor closes the connection.
    let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf))
        .await
        .expect("the executor closes the connection after infra_teardown")
        .unwrap();
    assert_eq!(n, 0, "nothing is sent after session_end");
    f.wait_state(&mac(0), "IDLE").await;
    let log = f.log_of("teardown");
    assert!(
        log.contains(
            "The infra_teardown timeout (2 s) expired: the client did not close the \
             connection after session_end; closing it"
        ),
        "{log}"
    );
    assert_eq!(f.port_state(0).await, "OFF");
}

/// Tests on the in-process demo farm.
mod in_process {
    use super::*;
    use vivian::client::{run_job, RunOptions};
    use vivian::demo::{DemoFarm, DemoOptions};

    async fn farm(duts: u8) -> DemoFarm {
        DemoFarm::start(DemoOptions {
            duts,
            ..DemoOptions::default()
        })
        .await
        .expect("the demo farm starts")
    }

    fn write_job(f: &DemoFarm, dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text.replace("@ARTIFACTS@", &f.artifacts_url())).unwrap();
        p
    }

    async fn run(f: &DemoFarm, path: PathBuf, tweak: impl FnOnce(&mut RunOptions)) -> JobStatus {
        let mut opts = RunOptions::new(f.api_url.clone(), path);
        opts.interactive = false;
        tweak(&mut opts);
        tokio::time::timeout(Duration::from_secs(120), run_job(&opts))
            .await
            .expect("the job ends in time")
    }

    async fn dut_json(f: &DemoFarm, id: &str) -> serde_json::Value {
        reqwest::get(format!("{}/api/v1/dut/{id}", f.api_url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_state(f: &DemoFarm, id: &str, state: &str) {
        for _ in 0..200 {
            if dut_json(f, id).await["state"] == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} never reached {state}: {}", dut_json(f, id).await);
    }

    fn only_log(f: &DemoFarm) -> String {
        let logs: Vec<_> = std::fs::read_dir(f.job_log_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(logs.len(), 1, "{logs:?}");
        std::fs::read_to_string(&logs[0]).unwrap()
    }

    #[tokio::test]
    async fn machine_unfit_for_service_sends_the_dut_back_to_training() {
        let f = farm(1).await;
        let dir = tempfile::tempdir().unwrap();
        let text = job(
            &["sim"],
            "console_patterns:\n  session_end: {regex: \"reboot: Power down\"}\n  machine_unfit_for_service: {regex: \"^BROKEN GPU\"}",
            &["print BROKEN GPU", "poweroff"],
        );
        let path = write_job(&f, dir.path(), "unfit.yml", &text);
        assert_eq!(run(&f, path, |_| {}).await, JobStatus::Complete);
        wait_state(&f, "52:54:00:11:22:00", "TRAINING").await;
        assert_eq!(
            dut_json(&f, "52:54:00:11:22:00").await["ready_for_service"],
            false
        );
        f.stop().await;
    }

    #[tokio::test]
    async fn executor_job_variables_reach_the_submission_and_the_job() {
        // EXECUTOR_JOB__POOL=sim:outlet2: the target is rendered at submission
        // (no metadata target) and the command line in the job engine.
        let f = DemoFarm::start(DemoOptions {
            duts: 4,
            job_env: [("pool".to_string(), "sim:outlet2".to_string())].into(),
            ..DemoOptions::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = job(
            &["{{ pool }}"],
            PATTERNS,
            &[
                "print ran on @MAC@ in {{ pool }}",
                "print JOB_RESULT=PASS",
                "poweroff",
            ],
        );
        let path = write_job(&f, dir.path(), "pool.yml", &text);
        assert_eq!(run(&f, path, |_| {}).await, JobStatus::Pass);
        let log = only_log(&f);
        assert!(
            log.contains("ran on 52:54:00:11:22:02 in sim:outlet2"),
            "{log}"
        );
        f.stop().await;
    }

    #[tokio::test]
    async fn simulated_duts_get_their_address_and_boot_file_from_our_dhcp_server() {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test needs root: the simulated DUT's DHCP client listens on port 68 \
             and the DHCP server binds to the loopback interface (SO_BINDTODEVICE)"
        );
        let f = DemoFarm::start(DemoOptions {
            duts: 1,
            dhcp: true,
            ..DemoOptions::default()
        })
        .await
        .expect("the demo farm with DHCP starts");
        assert!(f.dhcp_addr.is_some());
        let dir = tempfile::tempdir().unwrap();
        let text = job(
            &["sim"],
            PATTERNS,
            &[
                "print my address is @IP@",
                "print JOB_RESULT=PASS",
                "poweroff",
            ],
        );
        let path = write_job(&f, dir.path(), "dhcp.yml", &text);
        assert_eq!(run(&f, path, |_| {}).await, JobStatus::Pass);
        // The address is the DUT's static address in MarsDB, given by DHCP.
        let log = only_log(&f);
        assert!(log.contains("my address is 127.1.0.1"), "{log}");
        assert!(
            log.contains("net0: 127.1.0.1/52:54:00:11:22:00 via DHCP from 127.0.0.1"),
            "{log}"
        );
        // A full DORA as iPXE makes it, answered with the boot.ipxe URL.
        use vivian_core::netboot::{BootEventKind, DhcpMessage};
        let events = f.boot_events();
        let dhcp: Vec<_> = events
            .iter()
            .filter_map(|e| match &e.kind {
                BootEventKind::Dhcp {
                    message,
                    ipxe,
                    given_ip,
                    bootfile,
                    client_arch,
                    ..
                } => Some((
                    *message,
                    *ipxe,
                    *given_ip,
                    bootfile.clone(),
                    client_arch.map(|a| a.id),
                )),
                _ => None,
            })
            .collect();
        let url = format!(
            "{}/boot/52:54:00:11:22:00/boot.ipxe?platform=pcbios&buildarch=i386",
            f.api_url
        );
        let ip = Some("127.1.0.1".parse().unwrap());
        assert_eq!(
            dhcp,
            vec![
                (DhcpMessage::Discover, true, ip, Some(url.clone()), Some(0)),
                (DhcpMessage::Request, true, ip, Some(url), Some(0)),
            ],
            "{events:?}"
        );
        assert!(events
            .iter()
            .all(|e| e.dut_id.as_deref() == Some("52:54:00:11:22:00")));
        f.stop().await;
    }
}
