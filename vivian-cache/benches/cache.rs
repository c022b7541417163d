//! Benchmark of the artifact cache (`cargo bench -p vivian-cache`):
//!
//! 1. a DUT fetching a 64 MiB kernel from the cache over HTTP on loopback
//!    (the serving code of `/artifacts/<key>` behind warp, as in the
//!    executor; target: over 500 MB/s);
//! 2. the artifact setup of a job whose kernel (64 MiB) and initrd (16 MiB)
//!    are already cached: fresh entries (no request), and stale entries
//!    confirmed by the origin with a `304` (target: under 50 ms).
//!
//! The origin is the tests' local HTTP server on 127.0.0.1.

#[path = "../tests/origin/mod.rs"]
mod origin;

use std::time::{Duration, Instant};

use origin::{Origin, Resource};
use vivian_cache::{ArtifactCache, CacheConfig, FetchOutcome};
use warp::Filter;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (v[0], p(0.5), p(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let origin = Origin::start().await;
    let kernel: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let initrd: Vec<u8> = kernel[..16 << 20].to_vec();
    origin.put(
        "/kernel",
        Resource::new(kernel.clone(), "k", "max-age=3600"),
    );
    origin.put("/initrd", Resource::new(initrd, "i", "max-age=3600"));
    origin.put(
        "/kernel-stale",
        Resource::new(kernel.clone(), "ks", "no-cache"),
    );
    origin.put(
        "/initrd-stale",
        Resource::new(kernel[..16 << 20].to_vec(), "is", "no-cache"),
    );
    let dir = tempfile::tempdir().expect("temporary folder");
    let cache = ArtifactCache::open(CacheConfig::new(dir.path())).expect("cache");

    // First downloads (not the figure of interest, printed for reference).
    let t = Instant::now();
    for p in ["/kernel", "/initrd", "/kernel-stale", "/initrd-stale"] {
        cache.fetch(&origin.url(p)).await.expect("download");
    }
    println!(
        "first download of 2 x (64 + 16) MiB from the loopback origin: {:.0} ms",
        ms(t.elapsed())
    );

    // 1. The DUT side: GET /artifacts/<key> on loopback.
    let serve_cache = cache.clone();
    let route = warp::path!("artifacts" / String)
        .and(warp::header::optional::<String>("range"))
        .map(move |key: String, range: Option<String>| {
            let entry = serve_cache
                .open_entry(&key)
                .expect("cache readable")
                .expect("entry present");
            let (parts, body) = vivian_cache::serve::respond(entry, false, range.as_deref(), None)
                .expect("response")
                .into_parts();
            let mut r = warp::reply::Reply::into_response(warp::reply::stream(body.expect("body")));
            *r.status_mut() = parts.status;
            r.headers_mut().extend(parts.headers);
            r
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(warp::serve(route).incoming(listener).run());
    let key = vivian_cache::key_for(&origin.url("/kernel")).unwrap().1;
    let url = format!("http://{addr}/artifacts/{key}");
    let client = reqwest::Client::new();
    let mut times = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        let mut resp = client.get(&url).send().await.expect("GET");
        assert_eq!(resp.status(), 200);
        let mut n = 0usize;
        while let Some(c) = resp.chunk().await.expect("body") {
            n += c.len();
        }
        assert_eq!(n, 64 << 20);
        if i >= 2 {
            times.push(t.elapsed());
        }
    }
    let (best, median, worst) = stats(times);
    let mbps = |d: Duration| (64u64 << 20) as f64 / d.as_secs_f64() / 1e6;
    println!(
        "DUT fetch of a 64 MiB kernel from the cache over HTTP (loopback, 10 runs): \
         median {:.1} ms = {:.0} MB/s (best {:.0} MB/s, worst {:.0} MB/s; target > 500 MB/s)",
        ms(median),
        mbps(median),
        mbps(best),
        mbps(worst)
    );

    // 2. The job side: setup of a job whose artifacts are cached.
    let job = |k: &'static str, i: &'static str| {
        let cache = cache.clone();
        let (k, i) = (origin.url(k), origin.url(i));
        async move {
            let t = Instant::now();
            let (a, b) = tokio::join!(cache.fetch(&k), cache.fetch(&i));
            let (a, b) = (a.expect("kernel"), b.expect("initrd"));
            (t.elapsed(), a.outcome, b.outcome)
        }
    };
    let mut fresh = Vec::new();
    for _ in 0..200 {
        let (d, a, b) = job("/kernel", "/initrd").await;
        assert_eq!((a, b), (FetchOutcome::Hit, FetchOutcome::Hit));
        fresh.push(d);
    }
    let (best, median, p99) = stats(fresh);
    println!(
        "job setup, kernel 64 MiB + initrd 16 MiB fresh in the cache (200 runs): \
         median {:.2} ms, p99 {:.2} ms, best {:.2} ms (target < 50 ms)",
        ms(median),
        ms(p99),
        ms(best)
    );
    let mut revalidated = Vec::new();
    for _ in 0..100 {
        let (d, a, b) = job("/kernel-stale", "/initrd-stale").await;
        assert_eq!(
            (a, b),
            (FetchOutcome::Revalidated, FetchOutcome::Revalidated)
        );
        revalidated.push(d);
    }
    let (best, median, p99) = stats(revalidated);
    println!(
        "job setup, same artifacts stale and confirmed by a 304 from the loopback origin \
         (100 runs): median {:.2} ms, p99 {:.2} ms, best {:.2} ms (target < 50 ms)",
        ms(median),
        ms(p99),
        ms(best)
    );
}
