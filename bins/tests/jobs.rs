//! Jobs end to end on the in-process virtual farm: simulated DUTs that
//! netboot from the executor, a real virtual PDU, the console multiplexer,
//! the job engine and the executorctl client code over real sockets.

use std::path::PathBuf;
use std::time::Duration;

use vivian::client::{run_job, RunOptions};
use vivian::demo::{DemoFarm, DemoOptions};
use vivian_core::job::JobStatus;

async fn farm(duts: u8) -> DemoFarm {
    DemoFarm::start(DemoOptions {
        duts,
        ..DemoOptions::default()
    })
    .await
    .expect("the demo farm starts")
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

/// Submits a job in the background (non-interactive, bounded in time).
fn spawn_job(f: &DemoFarm, path: PathBuf) -> tokio::task::JoinHandle<JobStatus> {
    let mut opts = RunOptions::new(f.api_url.clone(), path);
    opts.interactive = false;
    tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(120), run_job(&opts))
            .await
            .expect("the job ends in time")
    })
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

#[tokio::test]
async fn sample_job_passes_and_the_dut_goes_back_to_idle() {
    let f = farm(2).await;
    let path = f.write_sample_job().unwrap();
    let status = run(&f, path, |_| {}).await;
    assert_eq!(status, JobStatus::Pass);
    wait_state(&f, "52:54:00:11:22:00", "IDLE").await;
    // The port is OFF again after the job.
    let port: serde_json::Value = reqwest::get(format!("{}/api/v1/pdu/VPDU/port/0", f.api_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(port["state"], "OFF", "{port}");
    // The job log has the console output and the verdict.
    let logs: Vec<_> = std::fs::read_dir(f.job_log_dir()).unwrap().collect();
    assert_eq!(logs.len(), 1);
    let log = std::fs::read_to_string(logs[0].as_ref().unwrap().path()).unwrap();
    assert!(log.contains("JOB_RESULT=PASS"), "{log}");
    assert!(log.contains("session end: PASS"), "{log}");
    f.stop().await;
}

#[tokio::test]
async fn verdicts_pass_fail_warn_complete() {
    let f = farm(4).await;
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, String, JobStatus); 4] = [
        (
            "pass",
            job(
                &["sim:outlet0"],
                PATTERNS,
                &["print JOB_RESULT=PASS", "poweroff"],
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
        let path = write_job(&f, dir.path(), &format!("{name}.yml"), &text);
        handles.push((name, spawn_job(&f, path), want));
    }
    for (name, h, want) in handles {
        assert_eq!(h.await.unwrap(), want, "job {name}");
    }
    f.stop().await;
}

#[tokio::test]
async fn a_hung_dut_hits_its_timeouts_and_the_job_is_incomplete() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
    // The console goes silent: console_activity expires, is retried once
    // (a reboot into `continue`), expires again: INCOMPLETE.
    let text = job(
        &["sim"],
        "console_patterns:\n  session_end: {regex: \"reboot: Power down\"}\ntimeouts:\n  console_activity: {seconds: 1, retries: 1}",
        &["print going silent", "hang"],
    );
    let path = write_job(&f, dir.path(), "hang.yml", &text);
    let status = run(&f, path, |_| {}).await;
    assert_eq!(status, JobStatus::Incomplete);
    let log = only_log(&f);
    assert!(log.matches("going silent").count() >= 2, "two boots: {log}");
    assert!(log.contains("console_activity"), "{log}");
    assert!(
        log.contains("Rebooting the DUT with the continue deployment"),
        "{log}"
    );
    wait_state(&f, "52:54:00:11:22:00", "IDLE").await;
    f.stop().await;
}

#[tokio::test]
async fn session_reboot_boots_the_continue_deployment() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
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
    let path = write_job(&f, dir.path(), "reboot.yml", text);
    assert_eq!(run(&f, path, |_| {}).await, JobStatus::Pass);
    let log = only_log(&f);
    assert!(log.contains("session_reboot requested"), "{log}");
    f.stop().await;
}

#[tokio::test]
async fn a_watchdog_that_is_not_reset_ends_the_job() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
    let text = job(
        &["sim"],
        "console_patterns:\n  session_end: {regex: \"reboot: Power down\"}\n  watchdogs:\n    heartbeat:\n      start: {regex: \"^HB_START\"}\n      reset: {regex: \"^HB\"}\n      stop: {regex: \"^HB_STOP\"}\ntimeouts:\n  watchdogs:\n    heartbeat: {seconds: 1}",
        &["print HB_START", "sleep 0.3", "print HB", "print still talking", "sleep 30", "poweroff"],
    );
    let path = write_job(&f, dir.path(), "watchdog.yml", &text);
    assert_eq!(run(&f, path, |_| {}).await, JobStatus::Incomplete);
    let log = only_log(&f);
    assert!(log.contains("heartbeat"), "{log}");
    f.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_job() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
    let text = job(&["sim"], PATTERNS, &["print started", "hang"]);
    let path = write_job(&f, dir.path(), "cancel.yml", &text);
    let job = spawn_job(&f, path);
    wait_state(&f, "52:54:00:11:22:00", "RUNNING").await;
    // Wait for the DUT to boot, so the cancel lands mid-job.
    for _ in 0..200 {
        if std::fs::read_dir(f.job_log_dir())
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .is_some_and(|l| l.contains("started"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/dut/52:54:00:11:22:00/cancel_job",
            f.api_url
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let status = tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, JobStatus::Incomplete);
    wait_state(&f, "52:54:00:11:22:00", "IDLE").await;
    let log = only_log(&f);
    assert!(log.contains("cancelled"), "{log}");
    f.stop().await;
}

#[tokio::test]
async fn two_jobs_on_one_dut_with_wait_run_one_after_the_other() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
    let text = job(
        &["sim"],
        PATTERNS,
        &["sleep 0.5", "print JOB_RESULT=PASS", "poweroff"],
    );
    let p1 = write_job(&f, dir.path(), "a.yml", &text);
    let p2 = write_job(&f, dir.path(), "b.yml", &text);
    let (a, b) = tokio::join!(
        run(&f, p1, |o| o.wait = true),
        run(&f, p2, |o| o.wait = true)
    );
    assert_eq!((a, b), (JobStatus::Pass, JobStatus::Pass));
    assert_eq!(std::fs::read_dir(f.job_log_dir()).unwrap().count(), 2);
    f.stop().await;
}

#[tokio::test]
async fn a_busy_dut_refuses_a_job_without_wait() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
    let long = job(
        &["sim"],
        PATTERNS,
        &["sleep 3", "print JOB_RESULT=PASS", "poweroff"],
    );
    let p1 = write_job(&f, dir.path(), "long.yml", &long);
    let p2 = write_job(&f, dir.path(), "second.yml", &long);
    let first = spawn_job(&f, p1);
    wait_state(&f, "52:54:00:11:22:00", "RUNNING").await;
    assert_eq!(run(&f, p2, |_| {}).await, JobStatus::SetupFail);
    assert_eq!(first.await.unwrap(), JobStatus::Pass);
    f.stop().await;
}

#[tokio::test]
async fn jobs_spread_over_the_duts_matching_their_tags() {
    let f = farm(4).await;
    let dir = tempfile::tempdir().unwrap();
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
    let mut handles = Vec::new();
    for i in 0..4 {
        let path = write_job(&f, dir.path(), &format!("j{i}.yml"), &text);
        handles.push(spawn_job(&f, path));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), JobStatus::Pass);
    }
    // Four jobs, four different DUTs.
    let mut macs = Vec::new();
    let mut all = String::new();
    for e in std::fs::read_dir(f.job_log_dir()).unwrap() {
        let log = std::fs::read_to_string(e.unwrap().path()).unwrap();
        all.push_str(&log);
        let mac = log
            .lines()
            .find_map(|l| l.strip_prefix("ran on "))
            .expect("the DUT said where it ran")
            .trim()
            .to_string();
        macs.push(mac);
    }
    macs.sort();
    macs.dedup();
    assert_eq!(macs.len(), 4, "{macs:?} {all}");
    f.stop().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_is_refused() {
    let f = farm(1).await;
    let dir = tempfile::tempdir().unwrap();
    let text = job(&["sim"], PATTERNS, &["print JOB_RESULT=PASS", "poweroff"]).replace(
        "version: 1\n",
        "version: 1\ndeadline: \"2001-01-01 00:00:00\"\n",
    );
    let path = write_job(&f, dir.path(), "late.yml", &text);
    assert_eq!(run(&f, path, |_| {}).await, JobStatus::SetupFail);
    // Nothing was powered.
    let port: serde_json::Value = reqwest::get(format!("{}/api/v1/pdu/VPDU/port/0", f.api_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(port["state"], "ON", "{port}");
    f.stop().await;
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

fn only_log(f: &DemoFarm) -> String {
    let logs: Vec<_> = std::fs::read_dir(f.job_log_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    std::fs::read_to_string(&logs[0]).unwrap()
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

/// One case of the timeouts table: the timeouts, the commands of the
/// `start` and `continue` boots, the verdict and what the log must say.
struct TimeoutCase {
    name: &'static str,
    timeouts: &'static str,
    start: &'static [&'static str],
    again: &'static [&'static str],
    want: JobStatus,
    log: &'static [&'static str],
}

#[tokio::test]
async fn each_timeout_expires_with_and_without_retries_left() {
    const PASS: &[&str] = &["print JOB_RESULT=PASS", "poweroff"];
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
    let cases = [
        TimeoutCase {
            name: "first_console_activity, retried, then the continue boot passes",
            timeouts: "first_console_activity: {seconds: 1.5, retries: 1}",
            start: &["vivian.boot_delay=10"],
            again: PASS,
            want: JobStatus::Pass,
            log: &["Hit: timeout first_console_activity expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "first_console_activity without retries",
            timeouts: "first_console_activity: {seconds: 1.5}",
            start: &["vivian.boot_delay=10"],
            again: PASS,
            want: JobStatus::Incomplete,
            log: &["first_console_activity expired (retry 1/0): no retries left"],
        },
        TimeoutCase {
            name: "console_activity, retried, then the continue boot passes",
            timeouts: "console_activity: {seconds: 1, retries: 1}",
            start: &["print going silent", "hang"],
            again: PASS,
            want: JobStatus::Pass,
            log: &["Hit: timeout console_activity expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "boot_cycle, retried, then the continue boot passes",
            timeouts: "boot_cycle: {seconds: 1.5, retries: 1}\n  console_activity: {seconds: 3}",
            start: CHATTY,
            again: PASS,
            want: JobStatus::Pass,
            log: &["Hit: timeout boot_cycle expired (retry 1/1)"],
        },
        TimeoutCase {
            name: "boot_cycle without retries",
            timeouts: "boot_cycle: {seconds: 1.5}\n  console_activity: {seconds: 3}",
            start: CHATTY,
            again: PASS,
            want: JobStatus::Incomplete,
            log: &["boot_cycle expired (retry 1/0): no retries left"],
        },
        TimeoutCase {
            name: "overall (never retried)",
            timeouts: "overall: {seconds: 1.5}\n  console_activity: {seconds: 3, retries: 3}",
            start: CHATTY,
            again: PASS,
            want: JobStatus::Incomplete,
            log: &["The overall timeout expired"],
        },
        TimeoutCase {
            name: "a watchdog, retried, then the continue boot passes",
            timeouts: "watchdogs:\n    heartbeat: {seconds: 1, retries: 1}",
            start: &[
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
            ],
            again: PASS,
            want: JobStatus::Pass,
            log: &["Hit: timeout heartbeat expired (retry 1/1)"],
        },
    ];
    let f = farm(cases.len() as u8).await;
    let dir = tempfile::tempdir().unwrap();
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
        let path = write_job(&f, dir.path(), &format!("case{i}.yml"), &text);
        let mut opts = RunOptions::new(f.api_url.clone(), path);
        opts.interactive = false;
        opts.job_id = Some(format!("case{i}"));
        handles.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(120), run_job(&opts))
                .await
                .expect("the job ends in time")
        }));
    }
    let mut failures = Vec::new();
    for (i, (case, h)) in cases.iter().zip(handles).enumerate() {
        let status = h.await.unwrap();
        let log = std::fs::read_dir(f.job_log_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("case{i}."))
            })
            .map(|p| std::fs::read_to_string(p).unwrap())
            .unwrap_or_default();
        if status != case.want {
            failures.push(format!(
                "{}: {status}, expected {}\n{log}",
                case.name, case.want
            ));
        }
        for want in case.log {
            if !log.contains(want) {
                failures.push(format!("{}: the log lacks {want:?}\n{log}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    f.stop().await;
}
