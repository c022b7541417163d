//! Job description: rendering, strict parsing, verdicts and timeouts, with
//! the reference's sample job (EX B.7) and table-driven error cases.

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use vivian_core::job::{
    ConsoleEvent, Job, JobError, JobStatus, MachineVars, ParseOptions, RetryDecision, TemplateVars,
    TimeoutName, WatchdogAction,
};

const SAMPLE: &str = include_str!("data/jobs/sample_job.yml");
const SIMPLE: &str = include_str!("data/jobs/simple_job.yml");

fn machine() -> MachineVars {
    MachineVars {
        id: "52:54:00:11:22:0a".into(),
        full_name: Some("farm-gfx10-1".into()),
        tags: vec!["amdgpu:gfxversion:gfx10".into(), "cpu:arch:x86_64".into()],
        local_tty_device: Some("ttyS0".into()),
        ready_for_service: true,
        ..Default::default()
    }
}

fn sample_vars() -> TemplateVars {
    let mut v = TemplateVars::for_dut(&machine(), "http://10.42.0.1:9000", None);
    v.add_job_env([("EXECUTOR_JOB__NTP_PEER", "10.42.0.1"), ("PATH", "/bin")]);
    v
}

fn sample() -> Job {
    Job::from_template(SAMPLE, &sample_vars(), &ParseOptions::default()).unwrap()
}

#[test]
fn sample_job_renders_and_parses() {
    let job = sample();
    assert_eq!(job.version, 1);
    assert_eq!(job.target.id.as_deref(), Some("52:54:00:11:22:0a"));
    assert_eq!(
        job.target.tags,
        vec!["amdgpu:gfxversion:gfx10", "cpu:arch:x86_64"]
    );
    let deadline = job.deadline.unwrap();
    assert_eq!(
        deadline.0,
        Utc.with_ymd_and_hms(2021, 3, 31, 0, 0, 0).unwrap()
    );
    assert!(job.is_past(Utc.with_ymd_and_hms(2021, 3, 31, 0, 0, 1).unwrap()));
    assert!(!job.is_past(Utc.with_ymd_and_hms(2021, 3, 30, 23, 59, 59).unwrap()));

    let t = &job.timeouts;
    assert_eq!(
        t.first_console_activity.duration(),
        Some(Duration::from_secs(45))
    );
    assert_eq!(t.first_console_activity.retries(), 5);
    assert_eq!(t.console_activity.duration(), Some(Duration::from_secs(15)));
    assert_eq!(t.boot_cycle.duration(), Some(Duration::from_secs(480)));
    assert_eq!(t.overall.duration(), Some(Duration::from_secs(1800)));
    assert_eq!(
        t.infra_setup.duration(),
        None,
        "infra_setup defaults to infinite"
    );
    assert_eq!(t.infra_teardown.duration(), Some(Duration::from_secs(600)));
    assert_eq!(t.watchdogs["igt"].duration(), Some(Duration::from_secs(90)));

    let d = &job.deployment;
    assert_eq!(
        d.start.kernel.url.as_deref(),
        Some("http://10.42.0.1:9000/test-kernel")
    );
    assert_eq!(
        d.start.initramfs[0].url,
        "http://10.42.0.1:9000/test-initramfs"
    );
    assert_eq!(
        d.start.cmdline().unwrap(),
        "SALAD.machine_id=52:54:00:11:22:0a console=ttyS0,115200 b2c.ntp_peer=10.42.0.1 farm-gfx10-1"
    );
    assert_eq!(
        d.continue_.cmdline().unwrap(),
        "SALAD.machine_id=52:54:00:11:22:0a console=ttyS0,115200 b2c.ntp_peer=10.42.0.1 resume"
    );
    assert_eq!(
        d.continue_.kernel.url, d.start.kernel.url,
        "continue inherits the start kernel"
    );
    assert_eq!(d.continue_.initramfs, d.start.initramfs);
}

#[test]
fn simple_job_defaults() {
    let job = Job::from_template(SIMPLE, &TemplateVars::new(), &ParseOptions::default()).unwrap();
    assert_eq!(job.target.id, None);
    assert!(job.target.tags.is_empty());
    assert_eq!(job.deadline, None);
    assert_eq!(
        job.timeouts.overall.duration(),
        Some(Duration::from_secs(6 * 3600))
    );
    assert_eq!(job.deployment.continue_, job.deployment.start);
    assert_eq!(
        job.console_patterns.session_end.as_str(),
        vivian_core::job::DEFAULT_SESSION_END_REGEX
    );
    assert!(job.console_patterns.machine_unfit_for_service.is_none());
    let mut m = job.console_matcher();
    m.feed(b"[    1.234567] reboot: Power Down\r\n");
    assert!(
        !m.session_ended(),
        "the default pattern has no \\r before $"
    );
    m.feed(b"[    1.234567] reboot: Power Down\n");
    assert_eq!(m.status(), JobStatus::Complete);
}

#[test]
fn submission_render_has_no_dut() {
    let job = Job::from_template(
        SAMPLE,
        &TemplateVars::for_submission("http://m:9000"),
        &ParseOptions::default(),
    )
    .unwrap();
    assert_eq!(job.target.id.as_deref(), Some("machine_id"));
    assert!(job.target.tags.is_empty());
    // Undefined variables rendered empty, attribute chains did not fail.
    assert_eq!(
        job.deployment.start.cmdline().unwrap(),
        "SALAD.machine_id=machine_id console=,115200 b2c.ntp_peer="
    );
}

/// Feeds `lines` to a fresh matcher of the sample job and returns the status.
fn verdict_of(job: &Job, lines: &[&str]) -> JobStatus {
    let mut m = job.console_matcher();
    for l in lines {
        m.feed(l.as_bytes());
    }
    m.status()
}

#[test]
fn verdict_table() {
    let job = sample();
    let end = "[   12.345678] reboot: Power Down\n";
    let cases: &[(&[&str], JobStatus)] = &[
        (&[], JobStatus::Incomplete),
        (&["JOB_RESULT=0\r\n"], JobStatus::Incomplete),
        (&[end], JobStatus::Fail),
        (&["JOB_RESULT=1\r\n", end], JobStatus::Fail),
        (&["JOB_RESULT=0\r\n", end], JobStatus::Pass),
        (&["JOB_RE", "SULT=0\r", "\n", end], JobStatus::Pass),
        (
            &[
                "The configured console is not connected to SALAD\n",
                "JOB_RESULT=0\r\n",
                end,
            ],
            JobStatus::Warn,
        ),
        (
            &[
                "JOB_RESULT=0\r\n",
                end,
                "The configured console is not connected to SALAD\n",
            ],
            JobStatus::Warn,
        ),
        (
            &["The configured console is not connected to SALAD\n", end],
            JobStatus::Fail,
        ),
    ];
    for (lines, want) in cases {
        assert_eq!(verdict_of(&job, lines), *want, "lines {lines:?}");
    }
    // Without job_success, an ended session is COMPLETE.
    let simple = Job::parse(SIMPLE, &ParseOptions::default()).unwrap();
    assert_eq!(verdict_of(&simple, &[end]), JobStatus::Complete);
    assert_eq!(
        verdict_of(&simple, &["JOB_RESULT=0\r\n"]),
        JobStatus::Incomplete
    );
}

#[test]
fn matcher_reports_events_and_names() {
    let job = sample();
    let mut m = job.console_matcher();
    let f = m.feed(b"garbage");
    assert!(!f.activity, "no newline seen yet this boot");
    let f = m.feed(b" OOPS\nIGT_START\n");
    assert!(f.activity);
    assert_eq!(f.matches.len(), 2);
    assert_eq!(f.matches[0].line, b"garbage OOPS\n");
    assert_eq!(f.matches[0].patterns, vec!["session_reboot"]);
    assert_eq!(f.matches[0].events, vec![ConsoleEvent::SessionReboot]);
    assert_eq!(f.matches[1].patterns, vec!["igt.start"]);
    assert!(m.reboot_requested());
    assert!(m.watchdog_running("igt"));
    assert!(m.feed(b"x").activity, "after a newline any byte counts");

    let f = m.feed(b"\nIGT_START again\nIGT_PROGRESS 1\nIGT_DONE\n");
    let names: Vec<_> = f.matches.iter().flat_map(|l| l.patterns.clone()).collect();
    assert_eq!(
        names,
        vec!["igt.reset", "igt.stop"],
        "start is only tested before the watchdog runs"
    );

    m.reset_per_boot();
    assert!(!m.reboot_requested());
    assert!(!m.feed(b"x").activity);
    assert_eq!(
        m.matched(),
        &["session_reboot", "igt.start", "igt.reset", "igt.stop"]
    );
}

#[test]
fn watchdog_without_timeout_is_inert() {
    let yaml = SIMPLE.replace(
        "console_patterns: {}",
        "console_patterns: {watchdogs: {wd: {start: {regex: a}, reset: {regex: b}, stop: {regex: c}}}}",
    );
    let job = Job::parse(&yaml, &ParseOptions::default()).unwrap();
    let mut m = job.console_matcher();
    assert!(m.feed(b"a\n").matches.is_empty());
}

#[test]
fn machine_unfit_default_comes_from_the_options() {
    let opts = ParseOptions {
        default_machine_unfit_for_service: Some("^MCE detected".into()),
    };
    let job = Job::parse(SIMPLE, &opts).unwrap();
    let mut m = job.console_matcher();
    m.feed(b"MCE detected on CPU0\n");
    assert!(m.machine_unfit_for_service());
    assert!(
        !m.session_ended(),
        "an unfit match does not end the session"
    );

    let own = SIMPLE.replace(
        "console_patterns: {}",
        "console_patterns: {machine_unfit_for_service: {regex: 'disk failure'}}",
    );
    let job = Job::parse(&own, &opts).unwrap();
    assert_eq!(
        job.console_patterns
            .machine_unfit_for_service
            .as_ref()
            .unwrap()
            .as_str(),
        "disk failure"
    );
    let bad = ParseOptions {
        default_machine_unfit_for_service: Some("(".into()),
    };
    assert!(matches!(
        Job::parse(SIMPLE, &bad),
        Err(JobError::InvalidRegex { .. })
    ));
}

#[test]
fn runner_drives_timeouts_with_the_sample_job() {
    let job = sample();
    let mut t = job.timeouts.clone();
    let mut m = job.console_matcher();
    let t0 = Instant::now();
    t.on_job_start(t0);
    t.on_power_on(t0);
    // The first console activity must come within 45 s.
    assert!(t.expired(t0 + Duration::from_secs(45)).is_empty());
    let feed = m.feed(b"Linux version 6.1\nIGT_START\n");
    assert!(feed.activity);
    let now = t0 + Duration::from_secs(10);
    t.on_console_activity(now);
    for l in &feed.matches {
        for e in &l.events {
            if let ConsoleEvent::Watchdog { name, action } = e {
                t.apply_watchdog(name, action, now);
                assert_eq!(*action, WatchdogAction::Start);
            }
        }
    }
    // 15 s of silence expire console_activity; 90 s expire the watchdog.
    let expired = t.expired(now + Duration::from_secs(16));
    assert_eq!(expired, vec![TimeoutName::ConsoleActivity]);
    let (decision, hits) = t.end_boot(&expired, m.reboot_requested());
    assert_eq!(decision, RetryDecision::Reboot);
    assert_eq!(
        (hits[0].retried, hits[0].retries, hits[0].is_retrying),
        (1, 3, true)
    );
    assert!(!t.boot_cycle.is_started());

    // Overall expires after 30 min and has no retries.
    let late = t0 + Duration::from_secs(1801);
    let expired = t.expired(late);
    assert_eq!(expired, vec![TimeoutName::Overall]);
    assert_eq!(
        t.end_boot(&expired, false).0,
        RetryDecision::Abort {
            exhausted: vec![TimeoutName::Overall]
        }
    );
}

#[test]
fn timeout_units_and_infinite() {
    let yaml = SIMPLE.replace(
        "target: {tags: []}",
        "target: {tags: []}\ntimeouts:\n  boot_cycle: {retries: 2}\n  console_activity: {days: 1, hours: 1, minutes: 1, seconds: 1, milliseconds: 500}",
    );
    let job = Job::parse(&yaml, &ParseOptions::default()).unwrap();
    assert_eq!(
        job.timeouts.boot_cycle.duration(),
        None,
        "no unit means infinite (V2024)"
    );
    assert_eq!(job.timeouts.boot_cycle.retries(), 2);
    assert_eq!(
        job.timeouts.console_activity.duration(),
        Some(Duration::from_millis(90_061_500))
    );
}

/// Job texts that must be refused, with a piece of the expected message.
#[test]
fn invalid_jobs_name_what_is_wrong() {
    let with = |from: &str, to: &str| {
        let s = SIMPLE.replace(from, to);
        assert_ne!(s, SIMPLE, "bad test: '{from}' not found");
        s
    };
    let cases: Vec<(String, &str)> = vec![
        (with("console_patterns: {}", "console_patterns: {reboot: {regex: a}}"), "console_patterns.reboot"),
        (with("console_patterns: {}", "console_patterns: {session_end: {regex: a, flags: i}}"), "console_patterns.session_end.flags"),
        (with("version: 1", "version: 1\nfoo: bar"), "foo"),
        (with("initramfs: {url", "initramfs: {path"), "deployment.start.initramfs"),
        (with("console_patterns: {}", "console_patterns: {job_success: {regex: '('}}"), "Console pattern '(' is not a valid regular expression"),
        (with("console_patterns: {}", "console_patterns: {watchdogs: {w: {start: {regex: 'a['}, reset: {regex: b}, stop: {regex: c}}}}"), "Console pattern 'a['"),
        (with("console_patterns: {}", "console_patterns: {watchdogs: {w: {start: {regex: a}}}}"), "console_patterns.watchdogs.w"),
        (with("target: {tags: []}", "target: {tags: []}\ntimeouts: {overall: {hours: 1, retries: 1}}"), "Neither the overall nor the teardown timeout can have retries"),
        (with("target: {tags: []}", "target: {tags: []}\ntimeouts: {infra_teardown: {retries: 1}}"), "Neither the overall nor the teardown"),
        (with("target: {tags: []}", "target: {tags: []}\ntimeouts: {boot_cycle: {seconds: -1}}"), "timeouts.boot_cycle"),
        (with("target: {tags: []}", "target: {tags: []}\ntimeouts: {boot_cycle: {secs: 1}}"), "timeouts.boot_cycle.secs"),
        (with("target: {tags: []}", "target: {tags: []}\ntimeouts: {reboot: {seconds: 1}}"), "timeouts.reboot"),
        (with("target: {tags: []}", "target: {}"), "The target is neither identified by tags or id"),
        (with("target: {tags: []}\n", ""), "target"),
        (with("target: {tags: []}", "target: {tags: [], name: x}"), "target.name"),
        (with("version: 1", "version: 0"), "version"),
        (with("version: 1", "version: 1\ndeadline: tomorrow"), "deadline"),
        (with("http://ci-gateway:9000/boot/kernel", "ftp://ci-gateway/kernel"), "deployment.start.kernel.url"),
        (with("cmdline: \"console=ttyS0\"", "cmdline: {':reserved': x}"), "deployment.start.kernel.cmdline.:reserved"),
        (with("cmdline: \"console=ttyS0\"", "cmdline: {a: {b: c}}"), "deployment.start.kernel.cmdline.a"),
        (SIMPLE.lines().filter(|l| !l.starts_with("console_patterns")).collect::<Vec<_>>().join("\n"), "console_patterns"),
        (with("deployment:\n  start:", "deployment:\n  continue:"), "start"),
        (with("version: 1", "version: [1"), "invalid job description"),
    ];
    for (text, needle) in cases {
        let err = Job::parse(&text, &ParseOptions::default()).expect_err(&text);
        let msg = err.to_string();
        assert!(
            msg.contains(needle),
            "error for\n{text}\nis '{msg}', expected it to contain '{needle}'"
        );
    }
}

#[test]
fn unknown_key_error_names_the_path() {
    let text = SIMPLE.replace(
        "console_patterns: {}",
        "console_patterns:\n  reboot: {regex: a}",
    );
    match Job::parse(&text, &ParseOptions::default()).unwrap_err() {
        JobError::Schema { path, message } => {
            assert_eq!(path, "console_patterns.reboot");
            assert!(message.contains("unknown field `reboot`"), "{message}");
            assert!(
                message.contains("line"),
                "the message gives the position: {message}"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn template_errors_are_reported() {
    let err = Job::from_template(
        "version: 1\n{% if %}\n",
        &TemplateVars::new(),
        &ParseOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, JobError::Template { line: Some(2), .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn deadline_forms() {
    use vivian_core::job::Deadline;
    let at = |y, mo, d, h, mi, s| Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap();
    for (text, want) in [
        ("2021-03-31 00:00:00", at(2021, 3, 31, 0, 0, 0)),
        ("2021-03-31T01:02:03Z", at(2021, 3, 31, 1, 2, 3)),
        ("2021-03-31T01:02:03+01:00", at(2021, 3, 31, 0, 2, 3)),
        (
            "2021-03-31 01:02:03.5",
            at(2021, 3, 31, 1, 2, 3) + chrono::Duration::milliseconds(500),
        ),
        ("2021-03-31 01:02", at(2021, 3, 31, 1, 2, 0)),
        ("2021-03-31", at(2021, 3, 31, 0, 0, 0)),
        ("1617148800", at(2021, 3, 31, 0, 0, 0)),
    ] {
        assert_eq!(Deadline::parse(text).map(|d| d.0), Some(want), "{text}");
    }
    assert_eq!(Deadline::parse("soon"), None);
    assert_eq!(Deadline::parse("inf"), None);
}

#[test]
fn long_lines_are_bounded_and_reported() {
    use vivian_core::job::patterns::MAX_LINE_LEN;
    let yaml = SIMPLE.replace(
        "console_patterns: {}",
        "console_patterns: {job_success: {regex: 'x{10}$'}}",
    );
    let job = Job::parse(&yaml, &ParseOptions::default()).unwrap();
    let mut m = job.console_matcher();
    // A flood without newline is cut into bounded lines.
    let flood = vec![b'x'; MAX_LINE_LEN * 2 + 10];
    let f = m.feed(&flood);
    assert_eq!(f.matches.len(), 2);
    assert!(f.matches.iter().all(|l| l.line.len() == MAX_LINE_LEN));
    let ends: Vec<usize> = f.matches.iter().map(|l| l.end).collect();
    assert_eq!(ends, [MAX_LINE_LEN, 2 * MAX_LINE_LEN]);
    let f = m.feed(b"\n");
    assert_eq!(f.matches.len(), 1);
    assert_eq!(f.matches[0].end, 1);
    assert_eq!(f.matches[0].line, b"xxxxxxxxxx\n");
    assert_eq!(
        f.matches[0].control_text(),
        "Matched the following patterns: job_success"
    );
    assert_eq!(f.matches[0].metadata()["line"], "xxxxxxxxxx\n");
}

#[test]
fn timeout_hits_carry_the_reference_metadata() {
    let job = sample();
    let mut t = job.timeouts.clone();
    let t0 = Instant::now();
    t.on_power_on(t0);
    let expired = t.expired(t0 + Duration::from_secs(46));
    let (_, hits) = t.end_boot(&expired, false);
    let meta = serde_json::Value::Object(hits[0].metadata());
    assert_eq!(
        meta,
        serde_json::json!({"timeout": {"name": "first_console_activity", "seconds": 45.0, "retries": 5, "retried": 1, "is_retrying": true}})
    );
}

/// The jobs shipped in `examples/jobs/` render and parse.
#[test]
fn example_jobs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/jobs") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".yml") || name.ends_with(".yml.j2")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let job = Job::from_template(&text, &sample_vars(), &ParseOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            job.deployment.start.kernel.url.is_some(),
            "{}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 2);
    let b2c = std::fs::read_to_string(dir.join("boot2container.yml.j2")).unwrap();
    let job = Job::from_template(&b2c, &sample_vars(), &ParseOptions::default()).unwrap();
    assert_eq!(
        job.target.tags,
        vec!["amdgpu:gfxversion:gfx10", "cpu:arch:x86_64"]
    );
    let start = job.deployment.start.cmdline().unwrap();
    assert!(start.starts_with("b2c.ntp_peer=10.42.0.1 b2c.container=\"docker://registry.example.com/ci/test-image:latest\""), "{start}");
    assert!(
        start.ends_with("SALAD.machine_id=52:54:00:11:22:0a"),
        "{start}"
    );
    let cont = job.deployment.continue_.cmdline().unwrap();
    assert!(
        cont.contains("collect-logs") && cont.contains("console=ttyS0,115200"),
        "{cont}"
    );
}

#[test]
fn submission_parse_and_target_selection() {
    use vivian_core::protocol::{SubmissionMetadata, TargetOverride};
    let job = Job::parse_for_submission(
        SAMPLE,
        "http://m:9000",
        [("EXECUTOR_JOB__NTP_PEER", "ntp")],
        &ParseOptions::default(),
    )
    .unwrap();
    assert_eq!(job.target.id.as_deref(), Some("machine_id"));
    assert!(job
        .deployment
        .start
        .cmdline()
        .unwrap()
        .contains("b2c.ntp_peer=ntp"));
    let mut meta = SubmissionMetadata::new(1234);
    assert_eq!(meta.effective_target(&job), job.target);
    meta.target = Some(TargetOverride {
        id: None,
        tags: Some(vec!["gfx10".into()]),
    });
    let t = meta.effective_target(&job);
    assert_eq!(
        t.id, None,
        "the metadata target overrides the job's entirely"
    );
    assert!(t.accepts_tags(&["gfx10", "farm:test"]));
    assert!(!t.accepts_tags(&["gfx9"]));
    assert!(vivian_core::job::Target::default().accepts_tags::<&str>(&[]));
}
