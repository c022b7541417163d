//! Allocator settings of the long-running binaries.
//!
//! glibc's malloc gives each thread that allocates concurrently an arena of
//! its own (up to 8 per core) and keeps freed memory in them; its
//! threshold for serving a large block straight from `mmap` grows with the
//! largest block freed. In the executor that meant: a few hundred
//! `GET /api/v1/full-state` bodies (140 KiB at 200 DUTs) built on two worker
//! threads left two arenas of 1.7-2.4 MiB resident for good, a third of the
//! process's anonymous memory, although the live heap never exceeded
//! 1.4 MiB.
//!
//! [`tune_allocator`] therefore caps the arenas at two, serves blocks of
//! 64 KiB and more from `mmap` (returned to the system on free), and gives
//! memory above 128 KiB at the top of the heap back. Measured with
//! `cargo bench -p vivian --bench api`: RSS after the load 21.1 → 19.1 MiB,
//! throughput unchanged within the run-to-run noise. An operator who tunes
//! malloc through the environment (`GLIBC_TUNABLES` with a `glibc.malloc`
//! setting, or one of the `MALLOC_*_` variables) keeps their settings.
//!
//! Freed memory in the middle of the heap still stays resident until
//! `malloc_trim` hands its pages back: [`IdleTrim`] does that once the
//! process has been quiet for a moment after a burst of work (the executor
//! counts served HTTP requests as work), never while it is busy and never
//! on a timer while it is idle. Measured the same way: the anonymous part
//! of the RSS after a REST load 5.6 → 4.4 MiB.

use futures::FutureExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest block served from an arena; larger ones come from `mmap`.
pub const MMAP_THRESHOLD: usize = 64 * 1024;

/// Free memory at the top of the heap beyond this is returned.
pub const TRIM_THRESHOLD: usize = 128 * 1024;

/// Most malloc arenas.
pub const ARENA_MAX: usize = 2;

/// Whether the environment already tunes malloc (then [`tune_allocator`]
/// leaves it alone).
pub fn environment_tunes_malloc(vars: impl IntoIterator<Item = (String, String)>) -> bool {
    vars.into_iter().any(|(k, v)| {
        (k == "GLIBC_TUNABLES" && v.contains("glibc.malloc."))
            || (k.starts_with("MALLOC_") && k.ends_with('_'))
            || k == "MALLOC_ARENA_MAX"
    })
}

/// Apply the settings above (glibc only; elsewhere nothing). Returns
/// whether they were applied. Call it first thing in `main`, before other
/// threads start. It logs nothing: it runs before logging is set up (the executor logs the
/// outcome once it is).
pub fn tune_allocator() -> bool {
    !environment_tunes_malloc(std::env::vars()) && apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; it is called
    // with valid parameter numbers and values.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX as libc::c_int) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

/// Hands the heap's free pages back to the system (glibc's `malloc_trim`;
/// elsewhere nothing). Returns whether memory was released. Blocking for
/// a moment (it walks the free lists): call it off the async workers.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory to the system; it
        // takes the arenas' locks itself.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// How long the process must be quiet before [`IdleTrim`] trims.
pub const QUIET_BEFORE_TRIM: Duration = Duration::from_secs(1);

/// Trims the heap ([`trim`]) once work has stopped for a quiet period.
///
/// Call [`IdleTrim::activity`] for each unit of work (a served request);
/// the task started by [`IdleTrim::spawn`] sleeps until the first activity,
/// waits until a whole quiet period passes without any, trims once on the
/// blocking pool and sleeps again. An idle process therefore costs nothing
/// (no timer runs), and a busy one is never trimmed mid-burst.
#[derive(Clone)]
pub struct IdleTrim {
    inner: Arc<IdleTrimInner>,
}

struct IdleTrimInner {
    quiet: Duration,
    activity: AtomicU64,
    wake: tokio::sync::Notify,
    trim: fn() -> bool,
    trims: AtomicU64,
}

impl IdleTrim {
    /// Trims with [`trim`] after `quiet` without activity.
    pub fn new(quiet: Duration) -> Self {
        Self::with_trim(quiet, trim)
    }

    fn with_trim(quiet: Duration, trim: fn() -> bool) -> Self {
        Self {
            inner: Arc::new(IdleTrimInner {
                quiet,
                activity: AtomicU64::new(0),
                wake: tokio::sync::Notify::new(),
                trim,
                trims: AtomicU64::new(0),
            }),
        }
    }

    /// Records a unit of work: a trim follows once a quiet period passes
    /// without another. Cheap (two atomic operations).
    pub fn activity(&self) {
        self.inner.activity.fetch_add(1, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// How many trims ran so far.
    pub fn trims(&self) -> u64 {
        self.inner.trims.load(Ordering::Relaxed)
    }

    /// Starts the trimming task on the current tokio runtime.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                inner.wake.notified().await;
                loop {
                    let seen = inner.activity.load(Ordering::SeqCst);
                    tokio::time::sleep(inner.quiet).await;
                    // Spend the wake-up stored by the work counted so far;
                    // work after this point stores a new one (its count
                    // is raised before it notifies), so it gets a trim of
                    // its own.
                    let _ = inner.wake.notified().now_or_never();
                    if inner.activity.load(Ordering::SeqCst) == seen {
                        break;
                    }
                }
                let trim = inner.trim;
                let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
                inner.trims.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(released, "heap trimmed after a quiet period");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn operator_malloc_settings_are_respected() {
        assert!(!environment_tunes_malloc(vars(&[
            ("PATH", "/usr/bin"),
            ("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=4096"),
        ])));
        assert!(environment_tunes_malloc(vars(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.arena_max=4"
        )])));
        assert!(environment_tunes_malloc(vars(&[("MALLOC_ARENA_MAX", "4")])));
        assert!(environment_tunes_malloc(vars(&[(
            "MALLOC_TRIM_THRESHOLD_",
            "0"
        )])));
    }

    /// Name of the environment variable that makes [`mmap_probe`] run.
    const PROBE_VAR: &str = "VIVIAN_MALLOC_PROBE";

    /// Runs the `#[ignore]`d test `memory::tests::<probe>` of this test
    /// binary in a fresh process and checks that it passed.
    fn run_probe(probe: &str) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                &format!("memory::tests::{probe}"),
                "--exact",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(PROBE_VAR, "1")
            .output()
            .expect("re-running the test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the probe failed:\n{text}");
        assert!(text.contains("1 passed"), "the probe did not run:\n{text}");
    }

    /// After tuning, blocks of 100 KiB (under glibc's default threshold of
    /// 128 KiB) are served by `mmap`, so their memory goes back to the
    /// system when freed instead of staying in an arena.
    ///
    /// The check runs in a fresh process ([`mmap_probe`]): in this one,
    /// other tests allocate concurrently and leave free chunks in the
    /// arenas that may serve a block of that size without `mmap` (that is
    /// how an in-process version of this test failed on CI).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn large_blocks_come_from_mmap_once_tuned() {
        run_probe("mmap_probe");
    }

    /// [`trim`] hands the pages of memory freed in the middle of the heap
    /// back to the system. In a fresh process ([`trim_probe`]), where other
    /// tests' allocations do not change the figures.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trim_returns_freed_heap_pages() {
        run_probe("trim_probe");
    }

    /// `RssAnon` of this process, in KiB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_anon_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("RssAnon in /proc/self/status")
    }

    /// Run by [`trim_returns_freed_heap_pages`] in a fresh process: 8 MiB
    /// of 2 KiB blocks (too large for glibc's per-thread cache) are freed
    /// below a block that stays, so the heap cannot shrink from its top;
    /// their pages stay resident until [`trim`].
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    #[ignore = "run in a fresh process by trim_returns_freed_heap_pages"]
    fn trim_probe() {
        if std::env::var_os(PROBE_VAR).is_none() {
            return;
        }
        let blocks: Vec<Vec<u8>> = (0..4096)
            .map(|_| std::hint::black_box(vec![1u8; 2048]))
            .collect();
        let pin = std::hint::black_box(vec![1u8; 2048]);
        drop(blocks);
        let before = rss_anon_kib();
        assert!(trim(), "malloc_trim released nothing");
        let after = rss_anon_kib();
        assert!(
            before >= after + 4096,
            "RssAnon {before} KiB before the trim, {after} KiB after: under 4 MiB released"
        );
        drop(pin);
    }

    /// The trim runs once after a quiet period that follows work, never
    /// during a burst and never while idle.
    #[tokio::test(start_paused = true)]
    async fn idle_trim_waits_for_quiet_then_trims_once() {
        let it = IdleTrim::with_trim(Duration::from_secs(1), || true);
        let task = it.spawn();
        let settle = |want: u64| {
            let it = it.clone();
            async move {
                // The trim runs on the blocking pool: give it a moment.
                for _ in 0..100 {
                    if it.trims() >= want {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                it.trims()
            }
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(it.trims(), 0, "trimmed while idle, without any work");
        // A burst of 5 s with work every 0.5 s: no trim during it.
        for _ in 0..10 {
            it.activity();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(it.trims(), 0, "trimmed in the middle of a burst");
        // Quiet from the last work on: the trim follows within two periods.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(settle(1).await, 1, "no trim after the burst");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(it.trims(), 1, "trimmed again without new work");
        it.activity();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(settle(2).await, 2, "no trim after the next work");
        task.abort();
    }

    /// Run by [`large_blocks_come_from_mmap_once_tuned`] in a fresh process.
    /// Eight 100 KiB blocks are held at once: the top of the heap of a fresh
    /// process has room for at most two, so without tuning none of them is
    /// mapped and with it at least six are.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    #[ignore = "run in a fresh process by large_blocks_come_from_mmap_once_tuned"]
    fn mmap_probe() {
        if std::env::var_os(PROBE_VAR).is_none() {
            return;
        }
        if environment_tunes_malloc(std::env::vars()) {
            eprintln!("skipped: the environment tunes malloc");
            return;
        }
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let mapped = || unsafe { libc::mallinfo2() }.hblks;
        let count = |blocks: usize| {
            let before = mapped();
            let held: Vec<Vec<u8>> = (0..blocks)
                .map(|_| std::hint::black_box(vec![1u8; 100 * 1024]))
                .collect();
            let during = mapped();
            drop(held);
            (during - before, mapped() - before)
        };
        let (untuned, _) = count(8);
        assert_eq!(untuned, 0, "without tuning, 100 KiB blocks were mapped");
        assert!(tune_allocator());
        let (tuned, left) = count(8);
        assert!(tuned >= 6, "only {tuned} of 8 blocks were mapped");
        assert_eq!(left, 0, "mapped blocks were not unmapped on free");
    }
}
