//! vivian-gitlab against a fake GitLab (an in-process warp app with
//! GitLab's status codes and JSON): the client, then whole reconciliation
//! passes over an in-memory MarsDB, checking GitLab's side, MarsDB's
//! write-backs and the generated config.toml.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::{FakeGitlab, ACCESS_TOKEN, REGISTRATION_TOKEN};
use vivian_core::marsdb::{
    Database, Dut, GitlabInstance, GitlabRunner, MacAddr, MarsDb, MarsDbExt, MemoryMarsDb,
    RunnerType, PLACEHOLDER_TOKEN,
};
use vivian_core::runner::{
    RegistryEndpoint, RegistryError, RunnerRegistry, RunnerScope, RunnerSpec, Secret, TokenState,
};
use vivian_gitlab::{
    GitlabClient, GitlabClientOptions, HostResources, Reconciler, ReconcilerSettings,
    RunnerConfigWriter, TemplateSource,
};

fn client() -> GitlabClient {
    logs();
    GitlabClient::new(GitlabClientOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        max_retries: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        danger_accept_invalid_certs: false,
    })
    .unwrap()
}

fn endpoint(fake: &FakeGitlab) -> RegistryEndpoint {
    RegistryEndpoint {
        name: "fake".into(),
        url: format!("{}/", fake.url()),
        registration_token: Some(Secret::new(REGISTRATION_TOKEN)),
        access_token: Some(Secret::new(ACCESS_TOKEN)),
    }
}

// ---------------------------------------------------------------- client

#[tokio::test]
async fn client_maps_gitlab_answers() {
    let fake = FakeGitlab::start().await;
    let c = client();
    let ep = endpoint(&fake);
    let spec = RunnerSpec::new(
        "farm-gfx9-1",
        vec!["farm:farm".to_string(), "amdgpu:gfx9".to_string()],
        21600,
        RunnerScope::Instance,
    );
    let reg = c.register(&ep, &spec).await.unwrap();
    let on_server = fake.runner_by_description("farm-gfx9-1").unwrap();
    assert_eq!(on_server.id, reg.id);
    assert_eq!(on_server.token, reg.token.expose());
    assert_eq!(on_server.tags, vec!["amdgpu:gfx9", "farm:farm"]);
    assert_eq!(on_server.maximum_timeout, Some(21600));
    assert_eq!(on_server.runner_type, "instance_type");
    assert!(!on_server.run_untagged);

    assert_eq!(
        c.verify(&ep, &reg.token).await.unwrap(),
        TokenState::Valid {
            runner_id: Some(reg.id)
        }
    );
    let d = c.details(&ep, reg.id).await.unwrap();
    assert_eq!(d.description, "farm-gfx9-1");
    assert!(spec.drift(&d).is_empty(), "{:?}", spec.drift(&d));
    assert_eq!(d.status.as_deref(), Some("never_contacted"));

    // Wrong access token: 401, a refusal, not an outage.
    let bad = RegistryEndpoint {
        access_token: Some(Secret::new("glpat-wrong-token")),
        ..ep.clone()
    };
    match c.details(&bad, reg.id).await {
        Err(RegistryError::Refused { status: 401, .. }) => {}
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    match c.details(&ep, 999_999).await {
        Err(RegistryError::Refused { status: 404, .. }) => {}
        other => panic!("expected a 404 refusal, got {other:?}"),
    }
    // Wrong registration token.
    let bad = RegistryEndpoint {
        registration_token: Some(Secret::new("glpat-wrong-token")),
        ..ep.clone()
    };
    let err = c.register(&bad, &spec).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Refused { status: 401, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("glpat-wrong-token"));

    c.remove(&ep, &reg.token).await.unwrap();
    assert!(fake.runners().is_empty());
    assert_eq!(
        c.verify(&ep, &reg.token).await.unwrap(),
        TokenState::Invalid
    );
    assert!(matches!(
        c.remove(&ep, &reg.token).await,
        Err(RegistryError::InvalidToken { .. })
    ));
}

#[tokio::test]
async fn client_sends_group_and_project_scopes() {
    let fake = FakeGitlab::start().await;
    let c = client();
    let ep = endpoint(&fake);
    let g = RunnerSpec::new("g", vec![], 60, RunnerScope::Group(42));
    let p = RunnerSpec::new("p", vec![], 60, RunnerScope::Project(7));
    c.register(&ep, &g).await.unwrap();
    c.register(&ep, &p).await.unwrap();
    let g = fake.runner_by_description("g").unwrap();
    assert_eq!(
        (g.runner_type.as_str(), g.group_id),
        ("group_type", Some(42))
    );
    let p = fake.runner_by_description("p").unwrap();
    assert_eq!(
        (p.runner_type.as_str(), p.project_id),
        ("project_type", Some(7))
    );
    let no_token = RegistryEndpoint {
        registration_token: None,
        ..ep
    };
    assert!(matches!(
        c.register(&no_token, &g_spec()).await,
        Err(RegistryError::Misconfigured { .. })
    ));
    fn g_spec() -> RunnerSpec {
        RunnerSpec::new("x", vec![], 60, RunnerScope::Instance)
    }
}

#[tokio::test]
async fn client_retries_throttling_and_reports_outages() {
    let fake = FakeGitlab::start().await;
    let c = client();
    let ep = endpoint(&fake);
    let spec = RunnerSpec::new("d", vec![], 60, RunnerScope::Instance);
    let reg = c.register(&ep, &spec).await.unwrap();

    // Two 429 then success: max_retries = 2 is enough.
    fake.throttle(2);
    let before = fake.requests().len();
    assert!(matches!(
        c.verify(&ep, &reg.token).await.unwrap(),
        TokenState::Valid { .. }
    ));
    assert_eq!(fake.requests().len() - before, 3);

    // GitLab down (503): an error, never "invalid".
    fake.set_down(true);
    let before = fake.requests().len();
    let err = c.verify(&ep, &reg.token).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(fake.requests().len() - before, 3, "1 try + 2 retries");
    assert!(c.remove(&ep, &reg.token).await.unwrap_err().is_transient());
    assert!(c.register(&ep, &spec).await.unwrap_err().is_transient());
    fake.set_down(false);
    assert_eq!(fake.runners().len(), 1, "the outage removed nothing");

    // Nobody listening (a port just released): unreachable, with no token
    // in the message.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let gone = RegistryEndpoint {
        url: format!("http://{addr}"),
        ..ep
    };
    let err = c.verify(&gone, &reg.token).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(!err.to_string().contains(reg.token.expose()), "{err}");
}

// ---------------------------------------------------------- reconciliation

const FARM: &str = "testfarm";

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, n])
}

fn dut(n: u8, base: &str, ready: bool, tags: &[&str]) -> Dut {
    let mut d = Dut::new(
        mac(n),
        base,
        format!("10.42.0.{n}").parse().unwrap(),
        tags.iter().map(|t| t.to_string()).collect(),
    );
    d.ready_for_service = ready;
    d.first_seen = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, n as u32).unwrap();
    d
}

fn instance(url: &str) -> GitlabInstance {
    let mut gl = GitlabInstance::new(url);
    gl.registration_token = Some(REGISTRATION_TOKEN.into());
    gl.access_token = Some(ACCESS_TOKEN.into());
    gl.maximum_timeout = 7200;
    gl.gateway_runner = Some(GitlabRunner::default());
    gl
}

fn host() -> HostResources {
    HostResources {
        cpu_count: 16,
        physical_cores: 8,
        ram_total_bytes: 16_384_000_000,
        arch: "x86_64".into(),
    }
}

struct Farm {
    fake: FakeGitlab,
    db: Arc<MemoryMarsDb>,
    rec: Reconciler,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Farm {
    async fn new(duts: Vec<Dut>) -> Farm {
        Self::with(duts, |_| {}).await
    }

    async fn with(duts: Vec<Dut>, tweak: impl FnOnce(&mut ReconcilerSettings)) -> Farm {
        logs();
        let fake = FakeGitlab::start().await;
        let mut db = Database::new();
        db.gitlab.insert("fake".into(), instance(&fake.url()));
        for d in duts {
            db.duts.insert(d.mac_address, d);
        }
        db.validate().unwrap();
        let db = Arc::new(MemoryMarsDb::new(db));
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("gitlab-runner/config.toml");
        let mut settings = ReconcilerSettings::new(FARM);
        settings.allow_insecure = true;
        settings.host = host();
        settings.concurrency = 1;
        settings.debounce = Duration::from_millis(20);
        settings.retry_interval = Duration::from_millis(200);
        settings.config = Some(RunnerConfigWriter::new(
            &conf,
            TemplateSource::BuiltIn,
            vec![
                ("MINIO_URL".into(), "http://ci-gateway:9000".into()),
                ("NTP_PEER".into(), "10.42.0.1".into()),
            ],
            host(),
        ));
        tweak(&mut settings);
        let rec =
            Reconciler::new(db.clone() as Arc<dyn MarsDb>, Arc::new(client()), settings).unwrap();
        Farm {
            fake,
            db,
            rec,
            conf,
            _dir: dir,
        }
    }

    fn entry(&self, n: u8) -> GitlabRunner {
        self.db.snapshot().duts[&mac(n)].gitlab["fake"].clone()
    }

    fn config(&self) -> toml::Table {
        let text = std::fs::read_to_string(&self.conf).unwrap();
        text.parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("config.toml is not TOML: {e}\n{text}"))
    }

    /// (name, token) of every [[runners]] entry.
    fn config_runners(&self) -> Vec<(String, String)> {
        self.config()
            .get("runners")
            .and_then(|r| r.as_array())
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["name"].as_str().unwrap().to_string(),
                            r["token"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn edit(&self, f: impl FnOnce(&mut Database) + Send) {
        self.db
            .update(|db| {
                f(db);
                Ok::<_, std::convert::Infallible>(())
            })
            .await
            .unwrap();
    }
}

/// Every log line of this test binary (all crates, TRACE level): a global
/// subscriber, installed by the first test that needs it.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = BufWriter(buf.clone());
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber");
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

#[derive(Clone)]
struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for BufWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn new_dut_is_registered_written_back_and_configured() {
    let mut d1 = dut(1, "gfx9", true, &["amdgpu:gfx9", "amdgpu:APU"]);
    d1.manual_tags = vec!["freesync_display".into(), "amdgpu:gfx9".into()];
    let d2 = dut(2, "gfx9", true, &["amdgpu:gfx9"]);
    let d3 = dut(3, "gfx10", false, &["amdgpu:gfx10"]); // still training
    let farm = Farm::new(vec![d1, d2, d3]).await;

    let report = farm.rec.reconcile(true).await;
    assert_eq!(report.registered, 3, "{report:?}"); // gateway + 2 DUTs
    assert_eq!(report.failures + report.transient_failures, 0, "{report:?}");
    assert!(report.config_written && report.db_updated);

    // GitLab's side.
    let r1 = farm.fake.runner_by_description("testfarm-gfx9-1").unwrap();
    assert_eq!(
        r1.tags,
        vec![
            "amdgpu:APU",
            "amdgpu:gfx9",
            "farm:testfarm",
            "freesync_display"
        ]
    );
    assert_eq!(r1.maximum_timeout, Some(7200));
    assert_eq!(r1.runner_type, "instance_type");
    assert!(farm.fake.runner_by_description("testfarm-gfx9-2").is_some());
    let gw = farm.fake.runner_by_description("testfarm-gateway").unwrap();
    assert!(gw.tags.contains(&"CI-gateway".to_string()));
    assert!(gw.tags.contains(&"mem:size:16GiB".to_string()));
    assert_eq!(
        farm.fake.runners().len(),
        3,
        "the unready DUT is not registered"
    );

    // MarsDB's side: tokens and ids written back; default entry added to
    // the unready DUT.
    let e1 = farm.entry(1);
    assert_eq!(
        (e1.token.as_str(), e1.runner_id),
        (r1.token.as_str(), r1.id as i64)
    );
    let e3 = farm.entry(3);
    assert_eq!(e3, GitlabRunner::default());
    let snap = farm.db.snapshot();
    let gw_entry = snap.gitlab["fake"].gateway_runner.clone().unwrap();
    assert_eq!(gw_entry.token, gw.token);

    // config.toml: parses, and is exactly the expected file (tokens are
    // deterministic: one registration at a time, ids from 101).
    let text = std::fs::read_to_string(&farm.conf).unwrap();
    let expected = include_str!("expected/basic.toml").replace("{url}", &farm.fake.url());
    assert_eq!(text, expected);
    assert_eq!(
        farm.config_runners(),
        vec![
            ("testfarm-gateway".to_string(), gw.token.clone()),
            ("testfarm-gfx9-1".to_string(), r1.token.clone()),
            ("testfarm-gfx9-2".to_string(), farm.entry(2).token.clone()),
        ]
    );

    // The REST snapshot.
    let st = &farm.rec.dut_status(&mac(1))["fake"];
    assert!(st.active && st.registered && st.in_config);
    assert_eq!(st.is_valid, Some(true));
    assert_eq!(st.runner_id, Some(r1.id));
    let st3 = &farm.rec.dut_status(&mac(3))["fake"];
    assert!(!st3.active && !st3.registered && !st3.in_config);
    let json = serde_json::to_string(&farm.rec.dut_status(&mac(1))).unwrap();
    assert!(!json.contains(&r1.token), "{json}");
    assert!(farm.rec.gateway_status()["fake"].in_config);

    // A second pass changes nothing and checks everything again.
    let report = farm.rec.reconcile(true).await;
    assert_eq!((report.checked, report.registered), (3, 0), "{report:?}");
    assert!(!report.config_written && !report.db_updated, "{report:?}");

    // An incremental pass with nothing new does not call GitLab.
    let before = farm.fake.requests().len();
    let report = farm.rec.reconcile(false).await;
    assert_eq!(report.checked, 0, "{report:?}");
    assert_eq!(farm.fake.requests().len(), before);

    // No token in any log line (all crates, TRACE level).
    let log = log_text();
    assert!(
        log.contains("registered runner"),
        "the capture works: {log}"
    );
    for secret in [REGISTRATION_TOKEN, ACCESS_TOKEN, "glrt-"] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the logs:\n{log}"
        );
    }
}

#[tokio::test]
async fn runner_deleted_on_gitlab_is_created_again() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    farm.rec.reconcile(true).await;
    let old = farm.entry(1);
    // The seed's FAQ: curl -X DELETE .../api/v4/runners --form token=<token>
    let c = reqwest::Client::new();
    let resp = c
        .delete(format!("{}/api/v4/runners", farm.fake.url()))
        .form(&[("token", old.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(farm.fake.runner_by_description("testfarm-gfx9-1").is_none());

    let report = farm.rec.reconcile(true).await;
    assert_eq!(report.registered, 1, "{report:?}");
    let new = farm.entry(1);
    assert_ne!(new.token, old.token);
    assert_ne!(new.runner_id, old.runner_id);
    let on_server = farm.fake.runner_by_description("testfarm-gfx9-1").unwrap();
    assert_eq!(on_server.token, new.token);
    assert!(farm
        .config_runners()
        .contains(&("testfarm-gfx9-1".to_string(), new.token.clone())));
    assert!(!farm.config_runners().iter().any(|(_, t)| *t == old.token));
}

#[tokio::test]
async fn changed_tags_and_drift_register_again() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    farm.rec.reconcile(true).await;
    let old = farm.entry(1);

    // The admin adds a manual tag: the change-triggered pass re-registers.
    farm.edit(|db| db.duts[&mac(1)].manual_tags.push("new-tag".into()))
        .await;
    let report = farm.rec.reconcile(false).await;
    assert_eq!(
        (report.checked, report.registered, report.removed),
        (1, 1, 1),
        "{report:?}"
    );
    let runners: Vec<_> = farm
        .fake
        .runners()
        .into_iter()
        .filter(|r| r.description == "testfarm-gfx9-1")
        .collect();
    assert_eq!(runners.len(), 1, "the old runner is gone: {runners:?}");
    assert_eq!(runners[0].tags, vec!["a", "farm:testfarm", "new-tag"]);
    let new = farm.entry(1);
    assert_ne!(new.token, old.token);
    assert_eq!(new.runner_id, runners[0].id as i64);

    // Someone edits the runner on GitLab (maximum timeout): a full pass
    // sees the drift through the access token and re-registers.
    farm.fake
        .state
        .lock()
        .unwrap()
        .runners
        .get_mut(&(new.runner_id as u64))
        .unwrap()
        .maximum_timeout = Some(60);
    let report = farm.rec.reconcile(true).await;
    assert_eq!(report.registered, 1, "{report:?}");
    let r = farm.fake.runner_by_description("testfarm-gfx9-1").unwrap();
    assert_eq!(r.maximum_timeout, Some(7200));
    assert_eq!(farm.entry(1).runner_id, r.id as i64);
}

#[tokio::test]
async fn gitlab_down_loses_no_token_and_is_retried() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    farm.rec.reconcile(true).await;
    let before = farm.entry(1);
    let config_before = std::fs::read_to_string(&farm.conf).unwrap();

    farm.fake.set_down(true);
    // A new DUT arrives during the outage.
    farm.edit(|db| {
        let d = dut(2, "gfx10", true, &["b"]);
        db.duts.insert(d.mac_address, d);
    })
    .await;
    let report = farm.rec.reconcile(true).await;
    assert!(report.transient_failures >= 2, "{report:?}");
    assert_eq!(farm.entry(1), before, "the token survived the outage");
    assert_eq!(farm.entry(2).token, PLACEHOLDER_TOKEN);
    assert_eq!(farm.fake.runners().len(), 2, "nothing removed on GitLab");
    let st = &farm.rec.dut_status(&mac(1))["fake"];
    assert!(
        st.in_config && st.is_valid.is_none() && st.error.is_some(),
        "{st:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&farm.conf).unwrap(),
        config_before,
        "the config keeps the existing runners and gains nothing"
    );

    // The loop retries after retry_interval (200 ms here) without any
    // MarsDB change, once GitLab is back.
    let task = farm.rec.spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    farm.fake.set_down(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while farm.entry(2).token == PLACEHOLDER_TOKEN {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(farm.entry(1), before);
    farm.rec.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    let names: Vec<_> = farm.config_runners().into_iter().map(|r| r.0).collect();
    assert!(names.contains(&"testfarm-gfx10-1".to_string()), "{names:?}");
}

#[tokio::test]
async fn retired_unexposed_and_disabled_runners_leave_the_config() {
    let farm = Farm::new(vec![
        dut(1, "gfx9", true, &["a"]),
        dut(2, "gfx9", true, &["a"]),
    ])
    .await;
    farm.rec.reconcile(true).await;
    assert_eq!(farm.config_runners().len(), 3);

    // Retired: leaves config.toml, keeps its registration (as the reference).
    farm.edit(|db| db.duts[&mac(1)].is_retired = true).await;
    farm.rec.reconcile(false).await;
    let names: Vec<_> = farm.config_runners().into_iter().map(|r| r.0).collect();
    assert_eq!(names, vec!["testfarm-gateway", "testfarm-gfx9-2"]);
    assert!(farm.entry(1).token_looks_valid());
    assert!(!farm.rec.dut_status(&mac(1))["fake"].active);

    // exposed: false on the DUT's entry.
    farm.edit(|db| db.duts[&mac(2)].gitlab["fake"].exposed = false)
        .await;
    farm.rec.reconcile(false).await;
    let names: Vec<_> = farm.config_runners().into_iter().map(|r| r.0).collect();
    assert_eq!(names, vec!["testfarm-gateway"]);

    // Back in service: back in the config with the same token, no new runner.
    let token1 = farm.entry(1).token;
    farm.edit(|db| db.duts[&mac(1)].is_retired = false).await;
    let report = farm.rec.reconcile(false).await;
    assert_eq!(report.registered, 0, "{report:?}");
    assert!(farm
        .config_runners()
        .contains(&("testfarm-gfx9-1".to_string(), token1)));

    // expose_runners: false empties the instance's runners.
    farm.edit(|db| db.gitlab["fake"].expose_runners = false)
        .await;
    farm.rec.reconcile(false).await;
    assert!(
        farm.config_runners().is_empty(),
        "{:?}",
        farm.config_runners()
    );
    let cfg = farm.config();
    assert_eq!(cfg["concurrent"].as_integer(), Some(128));
    assert_eq!(
        cfg["session_server"]["session_timeout"].as_integer(),
        Some(1800)
    );
}

#[tokio::test]
async fn deleted_duts_have_their_runners_removed() {
    let farm = Farm::new(vec![
        dut(1, "gfx9", true, &["a"]),
        dut(2, "gfx9", true, &["a"]),
    ])
    .await;
    farm.rec.reconcile(true).await;
    let id1 = farm.entry(1).runner_id as u64;
    let id2 = farm.entry(2).runner_id as u64;

    // Through the API: the REST layer removes the runners, then the DUT.
    let report = farm.rec.remove_dut_runners(&mac(1)).await;
    assert_eq!(report.removed, vec!["fake"]);
    assert!(report.retrying.is_empty());
    assert!(!farm.fake.runners().iter().any(|r| r.id == id1));
    assert_eq!(farm.entry(1).token, PLACEHOLDER_TOKEN);
    farm.edit(|db| {
        db.duts.shift_remove(&mac(1));
    })
    .await;
    farm.rec.reconcile(false).await;
    assert!(farm.rec.dut_status(&mac(1)).is_empty());

    // By editing MarsDB: the next pass removes the vanished DUT's runner.
    farm.edit(|db| {
        db.duts.shift_remove(&mac(2));
    })
    .await;
    let report = farm.rec.reconcile(false).await;
    assert_eq!(report.removed, 1, "{report:?}");
    assert!(!farm.fake.runners().iter().any(|r| r.id == id2));
    let names: Vec<_> = farm.config_runners().into_iter().map(|r| r.0).collect();
    assert_eq!(names, vec!["testfarm-gateway"]);
}

#[tokio::test]
async fn removing_a_deleted_duts_record_removes_tokens_no_pass_has_seen() {
    let farm = Farm::new(vec![
        dut(1, "gfx9", true, &["a"]),
        dut(2, "gfx9", true, &["a"]),
    ])
    .await;
    farm.rec.reconcile(true).await;
    let seen = farm.entry(2).runner_id as u64;
    // An admin pastes the token of a runner made by hand into DUT 2's
    // entry, then deletes DUT 2 through the API before any pass ran: the
    // REST layer hands over the record it had just before the removal.
    let by_hand = client()
        .register(
            &endpoint(&farm.fake),
            &RunnerSpec::new(
                "by-hand",
                vec!["x".to_string()],
                3600,
                RunnerScope::Instance,
            ),
        )
        .await
        .unwrap();
    let mut record = farm.db.snapshot().duts[&mac(2)].clone();
    record.gitlab.get_mut("fake").unwrap().token = by_hand.token.expose().to_string();
    farm.edit(|db| {
        db.duts.shift_remove(&mac(2));
    })
    .await;
    let before = farm.rec.status_version();
    let report = farm.rec.remove_runners_of(&mac(2), Some(&record)).await;
    assert_eq!(report.removed, vec!["fake", "fake"], "{report:?}");
    let left: Vec<u64> = farm.fake.runners().iter().map(|r| r.id).collect();
    assert!(
        !left.contains(&seen),
        "the runner a pass saw is gone: {left:?}"
    );
    assert!(
        !left.contains(&by_hand.id),
        "the pasted token's runner is gone: {left:?}"
    );
    assert!(
        left.contains(&(farm.entry(1).runner_id as u64)),
        "DUT 1 keeps its runner"
    );
    assert!(farm.rec.dut_status(&mac(2)).is_empty());
    assert_ne!(farm.rec.status_version(), before, "the status changed");
}

#[tokio::test]
async fn status_version_changes_only_with_the_statuses() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    let v0 = farm.rec.status_version();
    farm.rec.reconcile(true).await;
    let v1 = farm.rec.status_version();
    assert_ne!(v1, v0, "the first pass fills the statuses");
    // Nothing new: the statuses, and so the version, stay (the REST API
    // keeps its rendered DUT objects).
    farm.rec.reconcile(false).await;
    assert_eq!(farm.rec.status_version(), v1);
    // Retiring the DUT changes its status.
    farm.edit(|db| {
        db.duts.get_mut(&mac(1)).unwrap().is_retired = true;
    })
    .await;
    farm.rec.reconcile(false).await;
    assert_ne!(farm.rec.status_version(), v1);
    assert!(!farm.rec.dut_status(&mac(1))["fake"].active);
}

#[tokio::test]
async fn removal_during_an_outage_is_retried() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    farm.rec.reconcile(true).await;
    let id1 = farm.entry(1).runner_id as u64;
    farm.fake.set_down(true);
    let report = farm.rec.remove_dut_runners(&mac(1)).await;
    assert!(report.removed.is_empty());
    assert_eq!(report.retrying.len(), 1, "{report:?}");
    farm.edit(|db| {
        db.duts.shift_remove(&mac(1));
    })
    .await;
    farm.fake.set_down(false);
    let report = farm.rec.reconcile(false).await;
    assert_eq!(
        (report.removed, report.pending_removals),
        (1, 0),
        "{report:?}"
    );
    assert!(!farm.fake.runners().iter().any(|r| r.id == id1));
}

#[tokio::test]
async fn the_loop_follows_marsdb_changes() {
    let farm = Farm::with(vec![], |s| {
        s.retry_interval = Duration::from_secs(3600);
    })
    .await;
    let task = farm.rec.spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while farm.rec.last_report().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no start-up pass");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A DUT becomes ready (training passed): it is registered and configured.
    farm.edit(|db| {
        let d = dut(5, "vm", true, &["virtio"]);
        db.duts.insert(d.mac_address, d);
    })
    .await;
    while !farm
        .config_runners()
        .iter()
        .any(|(n, _)| n == "testfarm-vm-1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "DUT never configured"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(farm.entry(5).token_looks_valid());
    farm.rec.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn group_runners_custom_template_and_insecure_urls() {
    let dir = tempfile::tempdir().unwrap();
    let tmpl = dir.path().join("custom.toml.j2");
    std::fs::write(
        &tmpl,
        "concurrent = {{ cpu_count }}\n{% for r in dut_runners %}\n[[runners]]\nname = {{ r.name | toml }}\ntoken = {{ r.token | toml }}\ntags = {{ r.tags | toml }}\nenvironment = {{ environment | toml }}\n{% endfor %}\n",
    )
    .unwrap();
    let tmpl2 = tmpl.clone();
    let farm = Farm::with(vec![dut(1, "a\"b", true, &["x"])], move |s| {
        let path = s.config.as_ref().unwrap().path().to_path_buf();
        s.config = Some(RunnerConfigWriter::new(
            path,
            TemplateSource::File(tmpl2),
            vec![("K".into(), "v \"quoted\"".into())],
            host(),
        ));
    })
    .await;
    farm.edit(|db| {
        let gl = &mut db.gitlab["fake"];
        gl.runner_type = RunnerType::GroupType;
        gl.group_id = Some(1234);
        gl.gateway_runner = None;
    })
    .await;
    farm.rec.reconcile(true).await;
    let r = farm.fake.runners();
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].runner_type.as_str(), r[0].group_id),
        ("group_type", Some(1234))
    );
    let cfg = farm.config();
    assert_eq!(cfg["concurrent"].as_integer(), Some(16));
    let runner = &cfg["runners"].as_array().unwrap()[0];
    assert_eq!(runner["name"].as_str(), Some("testfarm-a\"b-1"));
    assert_eq!(
        runner["environment"].as_array().unwrap()[0].as_str(),
        Some("K=v \"quoted\"")
    );
    assert_eq!(runner["tags"].as_array().unwrap().len(), 2);

    // http:// without GITLAB_ALLOW_INSECURE: nothing is exposed there.
    let farm = Farm::with(vec![dut(1, "gfx9", true, &["a"])], |s| {
        s.allow_insecure = false;
    })
    .await;
    let report = farm.rec.reconcile(true).await;
    assert!(farm.fake.requests().is_empty());
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("GITLAB_ALLOW_INSECURE")),
        "{report:?}"
    );
    assert!(farm.config_runners().is_empty());
}

#[tokio::test]
async fn a_bad_access_token_keeps_runners_and_is_reported() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    farm.rec.reconcile(true).await;
    let before = farm.entry(1);
    farm.edit(|db| db.gitlab["fake"].access_token = Some("glpat-revoked-access".into()))
        .await;
    let report = farm.rec.reconcile(false).await;
    assert_eq!(report.registered, 0, "{report:?}");
    assert!(report.failures >= 1, "{report:?}");
    assert_eq!(farm.entry(1), before, "the runner token is kept");
    let st = &farm.rec.dut_status(&mac(1))["fake"];
    assert!(st.in_config && st.is_valid == Some(true), "{st:?}");
    assert!(st.error.as_deref().unwrap_or("").contains("401"), "{st:?}");
    // Not asked again at every MarsDB change; the next full pass does.
    let n = farm.fake.requests().len();
    assert_eq!(farm.rec.reconcile(false).await.checked, 0);
    assert_eq!(farm.fake.requests().len(), n);
    assert_eq!(farm.rec.reconcile(true).await.checked, 2);
}

#[tokio::test]
async fn tokens_wait_in_memory_while_marsdb_refuses_writes() {
    let farm = Farm::new(vec![dut(1, "gfx9", true, &["a"])]).await;
    // An invalid edit of the file: MarsDB refuses every write.
    farm.db
        .set_error(Some(vivian_core::marsdb::ValidationError::new(
            "duts",
            "simulated invalid edit",
        )));
    let report = farm.rec.reconcile(true).await;
    assert_eq!(report.registered, 2, "{report:?}");
    assert!(report.pending_writes >= 2, "{report:?}");
    assert!(
        farm.db.snapshot().duts[&mac(1)]
            .gitlab
            .get("fake")
            .is_none(),
        "nothing written while the file is invalid"
    );
    let on_server = farm.fake.runner_by_description("testfarm-gfx9-1").unwrap();
    // The new runner is served already, with its token from memory.
    assert!(farm
        .config_runners()
        .contains(&("testfarm-gfx9-1".to_string(), on_server.token.clone())));
    // Another pass registers nothing new.
    let report = farm.rec.reconcile(true).await;
    assert_eq!(report.registered, 0, "{report:?}");
    // The file is fixed: the tokens are written back.
    farm.db.set_error(None);
    let report = farm.rec.reconcile(false).await;
    assert_eq!(report.pending_writes, 0, "{report:?}");
    assert_eq!(farm.entry(1).token, on_server.token);
    assert_eq!(farm.fake.runners().len(), 2);
}
