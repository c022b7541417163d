//! Benchmark: the job's console matcher (line splitting and pattern
//! matching) on a synthetic boot log, fed in serial-sized and large
//! chunks. Run with `cargo bench -p vivian-core --bench console_matcher`;
//! prints MB/s (best of several passes) and the lines matched per pass.

use std::hint::black_box;
use std::time::Instant;

use vivian_core::job::{Job, ParseOptions};

/// The patterns of the reference's sample job (EX B.7), a watchdog included.
const JOB: &str = r#"version: 1
target: {id: "52:54:00:11:22:0a"}
timeouts:
  watchdogs:
    igt: {minutes: 1}
console_patterns:
  session_end: {regex: "^\\[[\\d \\.]{12}\\] reboot: .*$"}
  session_reboot: {regex: "^.*OOPS.*$"}
  job_success: {regex: "^JOB_RESULT=0\r$"}
  job_warn: {regex: "^The configured console is not connected to SALAD$"}
  machine_unfit_for_service: {regex: "^MCE detected"}
  watchdogs:
    igt:
      start: {regex: "^IGT_START"}
      reset: {regex: "^IGT_PROGRESS"}
      stop: {regex: "^IGT_DONE"}
deployment:
  start:
    kernel: {url: "http://10.42.0.1:9000/kernel"}
"#;

/// About 8 MB of kernel-like lines (40 to 160 bytes, `\r\n`), with a
/// watchdog start and regular progress lines that match.
fn console() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"IGT_START\r\n");
    let mut i: u64 = 0;
    while out.len() < 8 << 20 {
        i += 1;
        let width = 40 + (i * 7919 % 120) as usize;
        let mut line = if i % 50 == 0 {
            format!("IGT_PROGRESS subtest {i} ")
        } else {
            format!("[{:5}.{:06}] ", i / 1000, i % 1_000_000)
        };
        while line.len() < width {
            line.push_str("pci 0000:00:1f.3: [8086:a348] type 00 class 0x040300 ");
        }
        line.truncate(width);
        line.push_str("\r\n");
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn main() {
    let job = Job::parse(JOB, &ParseOptions::default()).expect("the bench job parses");
    let log = console();
    let mb = log.len() as f64 / 1e6;
    // 1,152 bytes: 100 ms of a 115200-baud serial console; 64 KiB: a
    // network console's large reads.
    for chunk in [1_152usize, 64 * 1024] {
        let mut best = f64::INFINITY;
        let mut matched = 0;
        for _ in 0..7 {
            let mut m = job.console_matcher();
            let t = Instant::now();
            matched = 0;
            for c in log.chunks(chunk) {
                matched += black_box(m.feed(black_box(c))).matches.len();
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "console_matcher: {chunk:>6}-byte chunks: {:.0} MB/s ({mb:.1} MB, {matched} lines matched per pass)",
            mb / best
        );
    }
}
