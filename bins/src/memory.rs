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
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "memory::tests::mmap_probe",
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
