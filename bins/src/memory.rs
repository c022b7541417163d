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
//!
//! Most of the RSS is code, and most of that code runs once, at start-up:
//! [`spawn_start_up_release`] unmaps the process's code pages once
//! start-up is over ([`drop_file_pages`], the way the kernel frees
//! its own init code after boot); what runs afterwards maps its pages
//! back from the page cache.

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

/// How long after start-up [`spawn_start_up_release`] releases the pages
/// only start-up needed: loading MarsDB, the PDUs' first poll and the first
/// exchanges with GitLab and SALAD take well under this.
pub const START_UP_RELEASE_DELAY: Duration = Duration::from_secs(2);

/// What [`drop_file_pages`] unmapped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DroppedPages {
    /// Mappings it applied to.
    pub mappings: usize,
    /// Bytes that were resident in them.
    pub bytes: u64,
}

/// A file mapping whose resident pages can be dropped: its address range
/// and resident bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Droppable {
    start: usize,
    end: usize,
    rss: u64,
}

/// The mappings in `smaps` (the text of `/proc/self/smaps`) of a file that
/// are private, not writable and hold no anonymous page, resident or
/// swapped out: their pages are the file's bytes, unchanged. Mappings the
/// dynamic loader relocated (RELRO: read-only now, written at start) hold
/// anonymous pages and are left out, as is one a debugger wrote a
/// breakpoint into; so are shared mappings, anonymous memory, stacks and
/// the vDSO (no file). A mapping is taken only when its `Anonymous` and
/// `Swap` lines both say 0.
fn droppable_mappings(smaps: &str) -> Vec<Droppable> {
    /// A candidate mapping, with its Anonymous and Swap figures once read.
    struct Pending {
        m: Droppable,
        anon: Option<u64>,
        swap: Option<u64>,
    }
    fn keep(p: Pending, out: &mut Vec<Droppable>) {
        if p.anon == Some(0) && p.swap == Some(0) && p.m.rss > 0 {
            out.push(p.m);
        }
    }
    let mut out = Vec::new();
    let mut cur: Option<Pending> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        let range = first.split_once('-').and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        });
        if let Some((start, end)) = range {
            // A new mapping: `start-end perms offset dev inode [path]`.
            if let Some(p) = cur.take() {
                keep(p, &mut out);
            }
            let perms = f.next().unwrap_or("").as_bytes();
            let inode = f.nth(2).and_then(|i| i.parse::<u64>().ok());
            let private_read_only = perms.len() == 4 && perms[1] != b'w' && perms[3] == b'p';
            if private_read_only && inode.is_some_and(|i| i != 0) {
                let m = Droppable { start, end, rss: 0 };
                cur = Some(Pending {
                    m,
                    anon: None,
                    swap: None,
                });
            }
            continue;
        }
        let Some(p) = cur.as_mut() else { continue };
        let kib = f.next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Rss:" => p.m.rss = kib.unwrap_or(0) * 1024,
            "Anonymous:" => p.anon = kib,
            // A modified page swapped out is no longer in Anonymous.
            "Swap:" => p.swap = kib,
            _ => {}
        }
    }
    if let Some(p) = cur {
        keep(p, &mut out);
    }
    out
}

/// Unmaps the resident pages of the process's code and constants: its
/// private, read-only file mappings that hold no modified page (the
/// executable's and the shared libraries' code and read-only data;
/// `madvise(MADV_DONTNEED)`). The pages stay in the page cache: the next
/// use of one maps it again from there (a minor fault), as after the
/// kernel reclaimed it. Writable data, relocated constants and anonymous
/// memory are not touched.
///
/// Most of a process's code runs once: the executor's start-up (parsing
/// the configuration and MarsDB, loading TLS roots, templates) touches
/// ten MiB of it, each touch mapping the 64 KiB around it. Call this once
/// that work is over: what runs afterwards maps its own pages back.
pub fn drop_file_pages() -> std::io::Result<DroppedPages> {
    #[cfg(target_os = "linux")]
    {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut done = DroppedPages::default();
        for m in droppable_mappings(&smaps) {
            // SAFETY: [m.start, m.end) is a whole mapping of this process
            // (from smaps, page aligned): a private file mapping, not
            // writable, none of whose pages was modified.
            // Dropping its pages changes no byte the process can read: the
            // next access maps the same bytes of the file again.
            let r = unsafe {
                libc::madvise(
                    m.start as *mut libc::c_void,
                    m.end - m.start,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            done.mappings += 1;
            done.bytes += m.rss;
        }
        Ok(done)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(DroppedPages::default())
    }
}

/// Starts a task that, [`START_UP_RELEASE_DELAY`] from now, hands back
/// what only start-up needed: the code pages ([`drop_file_pages`])
/// and, with `trim_heap`, the heap's free pages ([`trim`]; the garbage of
/// parsing MarsDB, say). Logs what it released.
pub fn spawn_start_up_release(trim_heap: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(START_UP_RELEASE_DELAY).await;
        let released = tokio::task::spawn_blocking(move || {
            if trim_heap {
                trim();
            }
            drop_file_pages()
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match released {
            Ok(d) => tracing::info!(
                "start-up over: {:.1} MiB of code and constants unmapped (they stay in the page cache and map again on use)",
                d.bytes as f64 / (1024.0 * 1024.0)
            ),
            Err(e) => tracing::warn!("cannot unmap the start-up code pages: {e}"),
        }
    })
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

    /// Read-only private file mappings are chosen, not relocated constants
    /// (RELRO, read-only but written at start), data, shared mappings,
    /// anonymous memory or the vDSO.
    #[test]
    fn only_unmodified_read_only_file_mappings_are_dropped() {
        let smaps = "\
55d0a0000000-55d0a0400000 r--p 00000000 fe:00 4242                       /usr/bin/executor
Size:               4096 kB
Rss:                1280 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me sd
55d0a0400000-55d0a1000000 r-xp 00400000 fe:00 4242                       /usr/bin/executor (deleted)
Size:              12288 kB
Rss:               11036 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0a1000000-55d0a109d000 r--p 01000000 fe:00 4242                       /usr/bin/executor
Rss:                 600 kB
Anonymous:           600 kB
Swap:                 28 kB
7f0000100000-7f0000110000 r--p 00000000 fe:00 77                         /usr/lib/libssl.so.3
Rss:                  32 kB
Anonymous:             0 kB
Swap:                 32 kB
55d0a109d000-55d0a10a6000 rw-p 0109d000 fe:00 4242                       /usr/bin/executor
Rss:                  36 kB
Anonymous:            20 kB
Swap:                  0 kB
55d0a10a6000-55d0a10b0000 r-xp 00000000 fe:00 4242                       /usr/bin/executor
Rss:                   0 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000200000-7f0000300000 r-xp 00000000 fe:00 99                         /usr/lib/libc.so.6
Rss:                 512 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000300000-7f0000310000 rw-p 00100000 fe:00 99                         /usr/lib/libc.so.6
Rss:                  64 kB
Anonymous:            16 kB
Swap:                  0 kB
7f0000400000-7f0000500000 r-xs 00000000 fe:00 4242                       /usr/bin/executor
Rss:                  64 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000600000-7f0000700000 rw-p 00000000 00:00 0
Rss:                 100 kB
Anonymous:           100 kB
Swap:                  0 kB
7ffe00000000-7ffe00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  60 kB
Anonymous:            60 kB
Swap:                  0 kB
7ffe00100000-7ffe00102000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
Swap:                  0 kB
";
        let got = droppable_mappings(smaps);
        assert_eq!(
            got,
            vec![
                Droppable {
                    start: 0x55d0a0000000,
                    end: 0x55d0a0400000,
                    rss: 1280 * 1024
                },
                Droppable {
                    start: 0x55d0a0400000,
                    end: 0x55d0a1000000,
                    rss: 11036 * 1024
                },
                Droppable {
                    start: 0x7f0000200000,
                    end: 0x7f0000300000,
                    rss: 512 * 1024
                },
            ]
        );
        // A mapping whose Anonymous or Swap line is missing is not known
        // clean.
        for partial in [
            "55d0a0000000-55d0a0400000 r--p 00000000 fe:00 4242 /x\nRss: 8 kB\n",
            "55d0a0000000-55d0a0400000 r--p 00000000 fe:00 4242 /x\nRss: 8 kB\nAnonymous: 0 kB\n",
            "55d0a0000000-55d0a0400000 r--p 00000000 fe:00 4242 /x\nRss: 8 kB\nSwap: 0 kB\n",
        ] {
            assert!(droppable_mappings(partial).is_empty(), "{partial}");
        }
    }

    /// [`drop_file_pages`] unmaps the resident code of the process, and it
    /// goes on working: code, constants and calls through vtables
    /// (relocated at start) behave as before. In a fresh process
    /// ([`drop_probe`]): other tests would map pages back meanwhile.
    #[cfg(target_os = "linux")]
    #[test]
    fn dropping_the_code_pages_unmaps_them_and_the_process_goes_on() {
        run_probe("drop_probe");
    }

    /// Resident KiB of this process's read-only file mappings.
    #[cfg(target_os = "linux")]
    fn code_rss_kib() -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        droppable_mappings(&smaps)
            .iter()
            .map(|m| m.rss / 1024)
            .sum()
    }

    /// Run by [`dropping_the_code_pages_unmaps_them_and_the_process_goes_on`].
    #[cfg(target_os = "linux")]
    #[test]
    #[ignore = "run in a fresh process by dropping_the_code_pages_unmaps_them_and_the_process_goes_on"]
    fn drop_probe() {
        if std::env::var_os(PROBE_VAR).is_none() {
            return;
        }
        let json = |v: &serde_json::Value| serde_json::to_string(v).unwrap();
        let value = serde_json::json!({"duts": {"52:54:00:00:00:01": {"pdu_port_id": 3}}});
        let before_text = json(&value);
        let before = code_rss_kib();
        assert!(
            before >= 1024,
            "only {before} KiB of the test binary resident"
        );
        let dropped = drop_file_pages().expect("madvise");
        assert!(dropped.mappings >= 1, "{dropped:?}");
        assert!(dropped.bytes >= 1024 * 1024, "{dropped:?}");
        let after = code_rss_kib();
        assert!(
            after * 2 <= before,
            "{before} KiB resident before, {after} KiB after dropping"
        );
        // The same code and constants again, and dynamic dispatch.
        assert_eq!(json(&value), before_text);
        let shown: Box<dyn std::fmt::Display> = Box::new(dropped.mappings);
        assert_eq!(format!("{shown}"), dropped.mappings.to_string());
        let parsed: serde_json::Value = serde_json::from_str(&before_text).unwrap();
        assert_eq!(parsed["duts"]["52:54:00:00:00:01"]["pdu_port_id"], 3);
        eprintln!("executable resident: {before} KiB, {after} KiB after dropping {dropped:?}");
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
