//! The artifact cache against a real HTTP origin on 127.0.0.1 (see
//! `origin/mod.rs`): downloads, fresh hits, 304 revalidation, ETag changes,
//! resumed transfers (also across a restart), single flight in one process
//! and across two caches sharing a folder, a dead origin, eviction, and
//! that a half-written entry is never served.

mod origin;

use std::time::Duration;

use futures::StreamExt;
use origin::{Origin, Resource};
use vivian_cache::{ArtifactCache, CacheConfig, CacheError, FetchOutcome, ValidationState};

fn config(root: &std::path::Path) -> CacheConfig {
    CacheConfig {
        attempts: 4,
        retry_delay: Duration::from_millis(20),
        connect_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_secs(5),
        ..CacheConfig::new(root)
    }
}

fn body(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The served body of `key`, read through the serving code.
async fn served(cache: &ArtifactCache, key: &str) -> Vec<u8> {
    let entry = cache.open_entry(key).unwrap().expect("the entry is served");
    let resp = vivian_cache::serve::respond(entry, false, None, None).unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.into_body().unwrap();
    let mut out = Vec::new();
    while let Some(c) = stream.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

#[tokio::test]
async fn first_fetch_downloads_once_then_fresh_hits_make_no_request() {
    let origin = Origin::start().await;
    let data = body(300_000, 1);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=3600"));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let f = cache.fetch(&origin.url("/k")).await.unwrap();
    assert_eq!(
        f.outcome,
        FetchOutcome::Downloaded {
            bytes: 300_000,
            resumes: 0
        }
    );
    assert_eq!(f.size, 300_000);
    for _ in 0..3 {
        let again = cache.fetch(&origin.url("/k")).await.unwrap();
        assert_eq!(again.outcome, FetchOutcome::Hit);
        assert_eq!(again.key, f.key);
    }
    assert_eq!(origin.hits().len(), 1, "{:?}", origin.hits());
    assert_eq!(served(&cache, &f.key).await, data);
    let list = cache.entries().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].url, origin.url("/k"));
    assert_eq!(list[0].state, ValidationState::Fresh);
    assert!(list[0].fresh_for_seconds > 3500, "{:?}", list[0]);
    assert_eq!(list[0].etag.as_deref(), Some("\"v1\""));
    let stats = cache.stats();
    assert_eq!((stats.downloads, stats.hits), (1, 3));
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_with_a_304_and_not_downloaded_again() {
    let origin = Origin::start().await;
    let data = body(200_000, 2);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=0"));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let url = origin.url("/k");
    let first = cache.fetch(&url).await.unwrap();
    assert!(matches!(first.outcome, FetchOutcome::Downloaded { .. }));
    assert_eq!(cache.entries().unwrap()[0].state, ValidationState::Stale);
    let second = cache.fetch(&url).await.unwrap();
    assert_eq!(second.outcome, FetchOutcome::Revalidated);
    let hits = origin.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(hits[1].status, 304);
    assert!(hits[1].conditional, "{hits:?}");
    assert_eq!(origin.bytes_sent("/k"), 200_000);
    assert_eq!(served(&cache, &second.key).await, data);
}

#[tokio::test]
async fn a_changed_etag_downloads_the_new_version_and_drops_the_old_body() {
    let origin = Origin::start().await;
    origin.put("/k", Resource::new(body(100_000, 3), "v1", "no-cache"));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let url = origin.url("/k");
    let f = cache.fetch(&url).await.unwrap();
    let v2 = body(150_000, 4);
    origin.change("/k", v2.clone(), "v2");
    let g = cache.fetch(&url).await.unwrap();
    assert_eq!(
        g.outcome,
        FetchOutcome::Downloaded {
            bytes: 150_000,
            resumes: 0
        }
    );
    assert_eq!(g.key, f.key);
    assert_eq!(served(&cache, &g.key).await, v2);
    assert_eq!(cache.entries().unwrap()[0].etag.as_deref(), Some("\"v2\""));
    // One body file in the entry folder.
    let entry_dir = dir.path().join("entries").join(&g.key[..2]).join(&g.key);
    let bodies: Vec<_> = std::fs::read_dir(&entry_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("body-"))
        .collect();
    assert_eq!(bodies.len(), 1);
}

#[tokio::test]
async fn a_broken_transfer_resumes_with_range_without_sending_bytes_twice() {
    let origin = Origin::start().await;
    let data = body(1 << 20, 5);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=600"));
    {
        let mut k = origin.knobs();
        k.drop_after = Some(300_000);
        k.drops_left = 2;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let f = cache.fetch(&origin.url("/k")).await.unwrap();
    assert_eq!(
        f.outcome,
        FetchOutcome::Downloaded {
            bytes: 1 << 20,
            resumes: 2
        }
    );
    let hits = origin.hits();
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert_eq!((hits[0].status, hits[0].range.as_deref()), (200, None));
    assert_eq!(hits[1].status, 206);
    assert_eq!(hits[1].range.as_deref(), Some("bytes=300000-"));
    assert_eq!(hits[2].range.as_deref(), Some("bytes=600000-"));
    assert_eq!(origin.bytes_sent("/k"), 1 << 20);
    assert_eq!(served(&cache, &f.key).await, data);
    assert_eq!(cache.entries().unwrap()[0].resumes, 2);
}

#[tokio::test]
async fn a_partial_download_is_never_served_and_resumes_after_a_restart() {
    let origin = Origin::start().await;
    let data = body(500_000, 6);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=600"));
    {
        let mut k = origin.knobs();
        k.drop_after = Some(200_000);
        k.drops_left = 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url("/k");
    let key = vivian_cache::key_for(&url).unwrap().1;
    {
        let cache = ArtifactCache::open(CacheConfig {
            attempts: 1,
            ..config(dir.path())
        })
        .unwrap();
        let e = cache.fetch(&url).await.unwrap_err();
        assert!(
            matches!(
                e,
                CacheError::Interrupted {
                    received: 200_000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&url), "{e}");
        assert_eq!(e.url(), Some(url.as_str()));
        // Half a body is there, and is not served.
        assert!(cache.open_entry(&key).unwrap().is_none());
        let list = cache.entries().unwrap();
        assert_eq!(list[0].state, ValidationState::Partial);
        assert_eq!(list[0].size, 200_000);
    }
    // "Restart": a new cache on the same folder resumes.
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let f = cache.fetch(&url).await.unwrap();
    assert_eq!(
        f.outcome,
        FetchOutcome::Downloaded {
            bytes: 300_000,
            resumes: 1
        }
    );
    assert_eq!(origin.hits()[1].range.as_deref(), Some("bytes=200000-"));
    assert_eq!(origin.bytes_sent("/k"), 500_000);
    assert_eq!(served(&cache, &f.key).await, data);
}

#[tokio::test]
async fn a_resume_against_a_changed_file_starts_over() {
    let origin = Origin::start().await;
    origin.put("/k", Resource::new(body(400_000, 7), "v1", "max-age=600"));
    {
        let mut k = origin.knobs();
        k.drop_after = Some(100_000);
        k.drops_left = 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url("/k");
    let one = ArtifactCache::open(CacheConfig {
        attempts: 1,
        ..config(dir.path())
    })
    .unwrap();
    assert!(one.fetch(&url).await.is_err());
    let v2 = body(300_000, 8);
    origin.change("/k", v2.clone(), "v2");
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let f = cache.fetch(&url).await.unwrap();
    // If-Range did not match: the whole new version came back.
    assert_eq!(
        f.outcome,
        FetchOutcome::Downloaded {
            bytes: 300_000,
            resumes: 0
        }
    );
    assert_eq!(origin.hits()[1].status, 200);
    assert_eq!(served(&cache, &f.key).await, v2);
}

#[tokio::test]
async fn concurrent_fetches_of_one_url_download_once() {
    let origin = Origin::start().await;
    let data = body(1 << 20, 9);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=600"));
    // Slow: 16 chunks of 64 KiB, 10 ms apart.
    origin.knobs().chunk_delay = Duration::from_millis(10);
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let url = origin.url("/k");
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let c = cache.clone();
            let u = url.clone();
            tokio::spawn(async move { c.fetch(&u).await.unwrap() })
        })
        .collect();
    let mut downloaded = 0;
    for t in tasks {
        let f = t.await.unwrap();
        assert_eq!(f.size, 1 << 20);
        if matches!(f.outcome, FetchOutcome::Downloaded { .. }) {
            downloaded += 1;
        } else {
            assert_eq!(f.outcome, FetchOutcome::Hit);
        }
    }
    assert_eq!(downloaded, 1);
    // The origin records a request when its connection ends, which may be
    // after the client has the whole body: give it a bounded moment.
    for _ in 0..200 {
        if !origin.hits().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(origin.hits().len(), 1, "{:?}", origin.hits());
}

#[tokio::test]
async fn two_caches_sharing_a_folder_download_once() {
    // Two executors (or two processes) on one folder: only the file lock
    // stands between them.
    let origin = Origin::start().await;
    origin.put("/k", Resource::new(body(1 << 20, 10), "v1", "max-age=600"));
    origin.knobs().chunk_delay = Duration::from_millis(10);
    let dir = tempfile::tempdir().unwrap();
    let a = ArtifactCache::open(config(dir.path())).unwrap();
    let b = ArtifactCache::open(config(dir.path())).unwrap();
    let url = origin.url("/k");
    let (fa, fb) = tokio::join!(a.fetch(&url), b.fetch(&url));
    let (fa, fb) = (fa.unwrap(), fb.unwrap());
    let outcomes = [fa.outcome, fb.outcome];
    assert!(outcomes.contains(&FetchOutcome::Hit), "{outcomes:?}");
    assert_eq!(origin.hits().len(), 1, "{:?}", origin.hits());
}

#[tokio::test]
async fn a_dead_origin_does_not_stop_fresh_or_stale_entries() {
    let origin = Origin::start().await;
    origin.put(
        "/fresh",
        Resource::new(body(50_000, 11), "f", "max-age=600"),
    );
    origin.put("/stale", Resource::new(body(50_000, 12), "s", "max-age=0"));
    origin.put(
        "/strict",
        Resource::new(body(50_000, 13), "m", "max-age=0, must-revalidate"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    for p in ["/fresh", "/stale", "/strict"] {
        cache.fetch(&origin.url(p)).await.unwrap();
    }
    origin.go_down().await;
    assert_eq!(
        cache.fetch(&origin.url("/fresh")).await.unwrap().outcome,
        FetchOutcome::Hit
    );
    let stale = cache.fetch(&origin.url("/stale")).await.unwrap();
    assert!(
        matches!(stale.outcome, FetchOutcome::StaleOriginError { .. }),
        "{stale:?}"
    );
    assert!(cache.open_entry(&stale.key).unwrap().is_some());
    let e = cache.fetch(&origin.url("/strict")).await.unwrap_err();
    assert!(matches!(e, CacheError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains(&origin.url("/strict")), "{e}");
    // Never fetched: a typed error naming the URL.
    let e = cache.fetch(&origin.url("/never")).await.unwrap_err();
    assert!(e.to_string().contains(&origin.url("/never")), "{e}");
    // Back up: the stale entry revalidates.
    origin.come_up().await;
    assert_eq!(
        cache.fetch(&origin.url("/stale")).await.unwrap().outcome,
        FetchOutcome::Revalidated
    );
}

#[tokio::test]
async fn error_statuses_are_typed_errors_naming_the_url() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let url = origin.url("/missing");
    let e = cache.fetch(&url).await.unwrap_err();
    assert!(matches!(e, CacheError::Status { status: 404, .. }), "{e}");
    assert!(e.to_string().contains(&url), "{e}");
    // A server error is retried, then reported.
    origin.put("/k", Resource::new(body(10, 0), "v", "max-age=60"));
    origin.knobs().status = Some(503);
    let url = origin.url("/k");
    let e = cache.fetch(&url).await.unwrap_err();
    assert!(matches!(e, CacheError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("HTTP 503"), "{e}");
    assert_eq!(origin.count("/k", 503), 4, "every attempt was made");
    assert!(cache.entries().unwrap().is_empty());
    let e = cache.fetch("ftp://example.org/k").await.unwrap_err();
    assert!(matches!(e, CacheError::InvalidUrl { .. }), "{e}");
}

#[tokio::test]
async fn eviction_keeps_the_size_bound_least_recently_used_first() {
    let origin = Origin::start().await;
    for p in ["/a", "/b", "/c", "/d"] {
        origin.put(
            p,
            Resource::new(body(100_000, p.as_bytes()[1]), p, "max-age=600"),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(CacheConfig {
        max_bytes: Some(250_000),
        ..config(dir.path())
    })
    .unwrap();
    let pause = || tokio::time::sleep(Duration::from_millis(20));
    let a = cache.fetch(&origin.url("/a")).await.unwrap().key;
    pause().await;
    let b = cache.fetch(&origin.url("/b")).await.unwrap().key;
    pause().await;
    // A use of `a`: now `b` is the least recently used.
    assert_eq!(
        cache.fetch(&origin.url("/a")).await.unwrap().outcome,
        FetchOutcome::Hit
    );
    pause().await;
    let c = cache.fetch(&origin.url("/c")).await.unwrap().key;
    let keys = |cache: &ArtifactCache| -> Vec<String> {
        let mut k: Vec<String> = cache
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        k.sort();
        k
    };
    let mut want = vec![a.clone(), c.clone()];
    want.sort();
    assert_eq!(keys(&cache), want, "b was evicted");
    let total: u64 = cache.entries().unwrap().iter().map(|e| e.disk_bytes).sum();
    assert!(total <= 250_000, "{total}");
    // A pinned entry stays even when it is the least recently used.
    let pin = cache.pin(&a);
    pause().await;
    let d = cache.fetch(&origin.url("/d")).await.unwrap().key;
    let mut want = vec![a.clone(), d.clone()];
    want.sort();
    assert_eq!(keys(&cache), want, "c went, the pinned a stayed");
    drop(pin);
    assert!(cache.open_entry(&b).unwrap().is_none());
    assert_eq!(cache.stats().evictions, 2);
}

#[tokio::test]
async fn entries_unused_for_too_long_are_pruned() {
    let origin = Origin::start().await;
    origin.put("/old", Resource::new(body(1000, 1), "o", "max-age=600"));
    origin.put("/new", Resource::new(body(1000, 2), "n", "max-age=600"));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(CacheConfig {
        max_unused: Some(Duration::from_secs(30 * 24 * 3600)),
        ..config(dir.path())
    })
    .unwrap();
    let old = cache.fetch(&origin.url("/old")).await.unwrap().key;
    let new = cache.fetch(&origin.url("/new")).await.unwrap().key;
    // Make `old` look unused for 40 days.
    let entry_dir = dir.path().join("entries").join(&old[..2]).join(&old);
    for e in std::fs::read_dir(&entry_dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("body-") {
            let f = std::fs::File::options().write(true).open(e.path()).unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(40 * 24 * 3600))
                .unwrap();
        }
    }
    let r = cache.evict().unwrap();
    assert_eq!(r.removed, vec![old.clone()]);
    assert!(cache.open_entry(&old).unwrap().is_none());
    assert!(cache.open_entry(&new).unwrap().is_some());
}

#[tokio::test]
async fn a_damaged_body_is_not_served_and_is_downloaded_again() {
    let origin = Origin::start().await;
    let data = body(100_000, 3);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=600"));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let key = cache.fetch(&origin.url("/k")).await.unwrap().key;
    // Truncate the body behind the cache's back.
    let entry_dir = dir.path().join("entries").join(&key[..2]).join(&key);
    for e in std::fs::read_dir(&entry_dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("body-") {
            let f = std::fs::File::options().write(true).open(e.path()).unwrap();
            f.set_len(10).unwrap();
        }
    }
    assert!(cache.open_entry(&key).unwrap().is_none());
    let f = cache.fetch(&origin.url("/k")).await.unwrap();
    assert!(matches!(f.outcome, FetchOutcome::Downloaded { .. }));
    assert_eq!(served(&cache, &key).await, data);
}

#[tokio::test]
async fn serving_honours_ranges_and_if_range() {
    let origin = Origin::start().await;
    let data = body(10_000, 4);
    origin.put("/k", Resource::new(data.clone(), "v1", "max-age=600"));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(config(dir.path())).unwrap();
    let key = cache.fetch(&origin.url("/k")).await.unwrap().key;
    let get = |range: Option<&'static str>, if_range: Option<String>, head: bool| {
        let entry = cache.open_entry(&key).unwrap().unwrap();
        vivian_cache::serve::respond(entry, head, range, if_range.as_deref()).unwrap()
    };
    async fn collect(r: http::Response<Option<vivian_cache::serve::BodyStream>>) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(mut s) = r.into_body() {
            while let Some(c) = s.next().await {
                out.extend_from_slice(&c.unwrap());
            }
        }
        out
    }
    let r = get(Some("bytes=100-199"), None, false);
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/10000");
    assert_eq!(r.headers()["content-length"], "100");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(collect(r).await, &data[100..200]);
    let r = get(Some("bytes=9000-"), Some(etag.clone()), false);
    assert_eq!(r.status(), 206);
    assert_eq!(collect(r).await, &data[9000..]);
    // Another version's validator: the whole body.
    let r = get(Some("bytes=9000-"), Some("\"other\"".into()), false);
    assert_eq!(r.status(), 200);
    assert_eq!(collect(r).await, data);
    let r = get(Some("bytes=20000-"), None, false);
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */10000");
    let r = get(None, None, true);
    assert_eq!(r.headers()["content-length"], "10000");
    assert!(r.into_body().is_none());
}
