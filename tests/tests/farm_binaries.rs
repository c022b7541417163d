//! The stock binaries wired together as an operator would: `salad`, `vpdu`
//! with simulated DUTs, `executor` on a MarsDB file, and a job submitted
//! with `executorctl`, which exits with the job's verdict.

#[path = "../../bins/tests/process_support/mod.rs"]
mod process_support;

use std::process::{Command, Stdio};

use process_support::farm::{bin, RealFarm};

#[test]
fn executorctl_runs_a_job_through_salad_vpdu_and_executor() {
    // The farm's servers run on this runtime; the test itself blocks.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let farm = rt.block_on(
        RealFarm::builder("e2e")
            .artifacts("#!vivian-sim\nprint kernel up\n", "initrd")
            .start(),
    );
    let api = &farm.api;

    let files_url = &farm.artifacts;
    let job = farm.path("job.yml");
    std::fs::write(
        &job,
        format!(
            r#"version: 1
target: {{tags: [sim]}}
timeouts:
  overall: {{minutes: 1}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^RESULT=ok"}}
deployment:
  start:
    kernel:
      url: "{files_url}/kernel"
      cmdline: ["SALAD.machine_id={{{{ machine_id }}}}", 'vivian.cmd="print RESULT=ok"', "vivian.cmd=poweroff"]
    initramfs:
      url: "{files_url}/initrd"
"#
        ),
    )
    .unwrap();
    let out = Command::new(bin("executorctl"))
        .args(["-e", api, "run"])
        .arg(&job)
        .stdin(Stdio::null())
        .output()
        .expect("executorctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "executorctl must exit 0 (PASS)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("kernel up"), "{stdout}");
    assert!(stdout.contains("RESULT=ok"), "{stdout}");
    // The job log is next to MarsDB.
    assert_eq!(std::fs::read_dir(farm.path("job_logs")).unwrap().count(), 1);
    drop(farm);
}
