//! The artifact cache end to end: simulated DUTs run jobs whose kernel and
//! initrd live on a local origin (`vivian-cache/tests/origin`), through the
//! job engine with a cache, and boot from the executor's
//! `/artifacts/<key>` URLs. The origin counts what it serves, so the tests
//! see every download the farm makes.

#[path = "../../vivian-cache/tests/origin/mod.rs"]
mod origin;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use origin::{Origin, Resource};
use tokio::sync::watch;
use vivian::artifacts::Artifacts;
use vivian::client::{run_job, RunOptions};
use vivian::engine::{EngineOptions, JobEngine};
use vivian_cache::CacheConfig;
use vivian_core::farm::{Farm, FarmOptions};
use vivian_core::job::JobStatus;
use vivian_core::marsdb::{FileMarsDb, FileOptions, MarsDb};
use vivian_core::pdu::{PduManager, PduOptions};
use vivian_salad::{InProcessConsoles, Salad, SaladConfig};

/// The simulated kernel: a script for the simulated DUTs.
const KERNEL: &str = "#!vivian-sim\nprint [    0.1] vivian-sim: booted from the artifact cache\n";

/// A virtual farm (as `executor demo`) whose engine has an artifact cache.
struct CacheFarm {
    api_url: String,
    artifacts: Arc<Artifacts>,
    farm: Arc<Farm>,
    log_dir: PathBuf,
    salad: Salad,
    vpdu: vivian::vpdu::VpduServerHandle,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: tempfile::TempDir,
}

impl CacheFarm {
    async fn start(duts: u8) -> CacheFarm {
        let dir = tempfile::tempdir().unwrap();
        let salad = Salad::start(SaladConfig::local(Some(dir.path().join("consoles"))))
            .await
            .unwrap();
        let netconsole = salad.netconsole_addr().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api_url = format!("http://{}", listener.local_addr().unwrap());
        let vpdu = vivian::vpdu::VpduServer::bind(
            ("127.0.0.1", 0),
            vivian::vpdu::VpduConfig {
                num_ports: duts,
                salad_console_port: Some(netconsole.port()),
            },
            vivian::simdut::sim_duts(api_url.clone(), "127.0.0.1".into()),
        )
        .await
        .unwrap();
        let vpdu_addr = vpdu.local_addr().unwrap();
        let vpdu = vpdu.spawn();
        let db_path = dir.path().join("mars_db.yaml");
        std::fs::write(&db_path, vivian::demo::demo_marsdb(vpdu_addr, duts)).unwrap();
        let registry = Arc::new(vivian_pdu::default_registry());
        let db = FileMarsDb::open(
            &db_path,
            FileOptions {
                validator: Some(registry.marsdb_validator()),
                ..FileOptions::default()
            },
        )
        .await
        .unwrap();
        let db: Arc<dyn MarsDb> = Arc::new(db);
        let pdus = Arc::new(PduManager::new(registry, PduOptions::default()));
        let mut farm_opts = FarmOptions::new("cache");
        farm_opts.quick_check_enabled = false;
        let farm = Farm::new(db, pdus, farm_opts);
        farm.start().await;
        let artifacts = Arc::new(
            Artifacts::new(
                CacheConfig {
                    retry_delay: Duration::from_millis(50),
                    ..CacheConfig::new(dir.path().join("cache"))
                },
                &api_url,
            )
            .unwrap(),
        );
        let log_dir = dir.path().join("jobs");
        farm.set_job_runner(Arc::new(JobEngine::new(
            Arc::new(InProcessConsoles::new(salad.clone())),
            EngineOptions {
                log_dir: log_dir.clone(),
                artifacts: Some(artifacts.clone()),
                ..EngineOptions::default()
            },
        )));
        let state = vivian::api::ApiState::new(farm.clone());
        assert!(state.set_artifacts(artifacts.clone()));
        let filter = vivian::api::server_filter(state);
        // Ready when every DUT is IDLE.
        let ids: Vec<_> = farm.db().snapshot().duts.keys().copied().collect();
        for _ in 0..300 {
            if ids
                .iter()
                .all(|id| farm.dut_state(id) == Some(vivian_core::state::DutState::Idle))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (stop, mut stop_rx) = watch::channel(false);
        let server = tokio::spawn(vivian::serve::serve(filter, vec![listener], async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        CacheFarm {
            api_url,
            artifacts,
            farm,
            log_dir,
            salad,
            vpdu,
            stop,
            server,
            dir,
        }
    }

    /// Writes a job booting `kernel` and `initrd` on a DUT tagged `tag`.
    fn job(&self, name: &str, tag: &str, kernel: &str, initrd: &str) -> PathBuf {
        let text = format!(
            r#"version: 1
target: {{tags: ["{tag}"]}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^JOB_RESULT=PASS"}}
timeouts:
  overall: {{minutes: 1}}
  infra_setup: {{seconds: 20}}
deployment:
  start:
    kernel:
      url: "{kernel}"
      cmdline:
        - "SALAD.machine_id={{{{ machine_id }}}}"
        - 'vivian.cmd="print JOB_RESULT=PASS"'
        - "vivian.cmd=poweroff"
    initramfs:
      url: "{initrd}"
"#
        );
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    async fn run(&self, path: PathBuf) -> JobStatus {
        let mut opts = RunOptions::new(self.api_url.clone(), path);
        opts.interactive = false;
        // The DUT may still be on its way back to IDLE after the previous job.
        opts.wait = true;
        tokio::time::timeout(Duration::from_secs(90), run_job(&opts))
            .await
            .expect("the job ends in time")
    }

    /// The text of every job log so far.
    fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.log_dir) {
            let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        out
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.farm.shutdown().await;
        self.vpdu.stop().await;
        self.salad.shutdown().await;
    }
}

fn origin_files(origin: &Origin, cache_control: &str) -> (String, String) {
    origin.put("/kernel", Resource::new(KERNEL, "k1", cache_control));
    origin.put(
        "/initrd",
        Resource::new(vec![7u8; 256 * 1024], "i1", cache_control),
    );
    (origin.url("/kernel"), origin.url("/initrd"))
}

#[tokio::test]
async fn jobs_boot_from_the_cache_and_the_second_job_downloads_nothing() {
    let origin = Origin::start().await;
    // Always stale: the second job revalidates (304) but downloads nothing.
    let (kernel, initrd) = origin_files(&origin, "max-age=0");
    let f = CacheFarm::start(1).await;
    let job = f.job("one.yml", "sim", &kernel, &initrd);
    assert_eq!(f.run(job.clone()).await, JobStatus::Pass, "{}", f.logs());
    // One download each, by the cache: the DUT fetched the cache's copy.
    assert_eq!(origin.count("/kernel", 200), 1, "{:?}", origin.hits());
    assert_eq!(origin.count("/initrd", 200), 1, "{:?}", origin.hits());
    assert_eq!(origin.hits().len(), 2, "{:?}", origin.hits());
    let logs = f.logs();
    assert!(logs.contains("booted from the artifact cache"), "{logs}");
    assert!(
        logs.contains(&format!("Artifact cache: downloaded {kernel}")),
        "{logs}"
    );

    assert_eq!(f.run(job).await, JobStatus::Pass, "{}", f.logs());
    assert_eq!(origin.count("/kernel", 200), 1, "{:?}", origin.hits());
    assert_eq!(origin.count("/kernel", 304), 1, "{:?}", origin.hits());
    assert_eq!(origin.count("/initrd", 304), 1, "{:?}", origin.hits());
    assert_eq!(origin.bytes_sent("/initrd"), 256 * 1024);
    let stats = f.artifacts.cache().stats();
    assert_eq!((stats.downloads, stats.revalidations), (2, 2));

    // The listing: both entries, their origin, size, state and local URL.
    let list: serde_json::Value = reqwest::get(format!("{}/api/v1/artifacts", f.api_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["enabled"], true);
    let items = list["artifacts"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    let k = items.iter().find(|e| e["url"] == kernel.as_str()).unwrap();
    assert_eq!(k["size"], KERNEL.len());
    assert_eq!(k["state"], "stale");
    assert!(k["last_used"].is_string(), "{k}");
    assert!(k["download_url"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}/artifacts/", f.api_url)));
    f.stop().await;
}

#[tokio::test]
async fn the_boot_script_names_the_cache_and_downloads_honour_range() {
    let origin = Origin::start().await;
    let (kernel, initrd) = origin_files(&origin, "max-age=600");
    let f = CacheFarm::start(1).await;
    let job = f.job("one.yml", "sim", &kernel, &initrd);
    assert_eq!(f.run(job).await, JobStatus::Pass, "{}", f.logs());
    let list: serde_json::Value = reqwest::get(format!("{}/api/v1/artifacts", f.api_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let initrd_entry = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == initrd.as_str())
        .unwrap()
        .clone();
    let url = initrd_entry["download_url"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let r = client
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 1000-1999/262144");
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
    let r = client.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "262144");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    let r = client
        .get(format!("{}/artifacts/{}", f.api_url, "0".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .get(format!("{}/artifacts/../mars_db.yaml", f.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    f.stop().await;
}

#[tokio::test]
async fn a_dead_origin_with_fresh_entries_still_boots() {
    let origin = Origin::start().await;
    let (kernel, initrd) = origin_files(&origin, "max-age=3600");
    let f = CacheFarm::start(1).await;
    let job = f.job("one.yml", "sim", &kernel, &initrd);
    assert_eq!(f.run(job.clone()).await, JobStatus::Pass, "{}", f.logs());
    origin.go_down().await;
    assert_eq!(f.run(job).await, JobStatus::Pass, "{}", f.logs());
    assert!(f.logs().contains("is fresh in the cache"), "{}", f.logs());
    assert_eq!(origin.hits().len(), 2);
    f.stop().await;
}

#[tokio::test]
async fn concurrent_jobs_on_two_duts_download_once() {
    let origin = Origin::start().await;
    let (kernel, initrd) = origin_files(&origin, "max-age=600");
    // Slow enough that both jobs ask while the first download runs.
    origin.knobs().chunk_delay = Duration::from_millis(30);
    let f = CacheFarm::start(2).await;
    let a = f.job("a.yml", "sim:outlet0", &kernel, &initrd);
    let b = f.job("b.yml", "sim:outlet1", &kernel, &initrd);
    let (ra, rb) = tokio::join!(f.run(a), f.run(b));
    assert_eq!((ra, rb), (JobStatus::Pass, JobStatus::Pass), "{}", f.logs());
    assert_eq!(origin.count("/initrd", 200), 1, "{:?}", origin.hits());
    assert_eq!(origin.count("/kernel", 200), 1, "{:?}", origin.hits());
    f.stop().await;
}

#[tokio::test]
async fn a_broken_download_resumes_and_a_failed_one_ends_the_setup() {
    let origin = Origin::start().await;
    let (kernel, initrd) = origin_files(&origin, "max-age=600");
    {
        let mut k = origin.knobs();
        k.drop_after = Some(100_000);
        k.drops_left = 1;
    }
    let f = CacheFarm::start(1).await;
    let job = f.job("one.yml", "sim", &kernel, &initrd);
    assert_eq!(f.run(job).await, JobStatus::Pass, "{}", f.logs());
    assert_eq!(origin.count("/initrd", 206), 1, "{:?}", origin.hits());
    assert_eq!(origin.bytes_sent("/initrd"), 256 * 1024);
    assert!(f.logs().contains("resumed 1 time(s)"), "{}", f.logs());

    // An artifact the origin does not have: SETUP_FAIL before any power-on,
    // with an infrastructure error naming the URL.
    let missing = origin.url("/missing-kernel");
    let bad = f.job("bad.yml", "sim", &missing, &initrd);
    let before = f.logs().matches("Powering the DUT").count();
    assert_eq!(f.run(bad).await, JobStatus::SetupFail, "{}", f.logs());
    let logs = f.logs();
    assert!(
        logs.contains(&format!("infrastructure error: cannot download {missing}")),
        "{logs}"
    );
    assert_eq!(logs.matches("Powering the DUT").count(), before, "{logs}");
    f.stop().await;
}

#[tokio::test]
async fn the_tftp_hook_serves_cache_entries() {
    use vivian_core::netboot::ArtifactFetcher;
    let origin = Origin::start().await;
    let (kernel, _initrd) = origin_files(&origin, "max-age=600");
    let dir = tempfile::tempdir().unwrap();
    let a = Artifacts::open(dir.path(), "http://10.42.0.1:8000/").unwrap();
    // An origin URL (a deployment the cache has not seen): fetched, then
    // opened from the cache.
    let mut f = a.fetch(&kernel).await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).unwrap();
    assert_eq!(text, KERNEL);
    // Our own URL (what a prepared boot configuration names): opened from
    // the cache without any request.
    let key = vivian_cache::key_for(&kernel).unwrap().1;
    let own = format!("http://10.42.0.1:8000/artifacts/{key}");
    assert_eq!(a.url_for(&key), own);
    origin.go_down().await;
    let mut f = a.fetch(&own).await.unwrap();
    let mut again = String::new();
    std::io::Read::read_to_string(&mut f, &mut again).unwrap();
    assert_eq!(again, KERNEL);
    assert_eq!(origin.hits().len(), 1);
    let e = a
        .fetch(&format!(
            "http://10.42.0.1:8000/artifacts/{}",
            "0".repeat(32)
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no artifact"), "{e}");
}
