//! Reconciliation of a large farm against the fake GitLab of the tests:
//! `cargo bench -p vivian-gitlab --bench reconcile [-- <duts>]`.
//!
//! Prints the wall time of: the first full pass (every DUT registered), a
//! second full pass (every runner verified and its details read), an
//! incremental pass with nothing changed, an incremental pass after one
//! DUT's tags changed, and one config.toml rendering.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeGitlab, ACCESS_TOKEN, REGISTRATION_TOKEN};
use vivian_core::marsdb::{
    Database, Dut, GitlabInstance, GitlabRunner, MacAddr, MarsDb, MarsDbExt, MemoryMarsDb,
};
use vivian_gitlab::{
    GitlabClient, GitlabClientOptions, HostResources, Reconciler, ReconcilerSettings,
    RunnerConfigInput, RunnerConfigWriter, TemplateSource,
};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let fake = FakeGitlab::start().await;
    let mut db = Database::new();
    let mut gl = GitlabInstance::new(fake.url());
    gl.registration_token = Some(REGISTRATION_TOKEN.into());
    gl.access_token = Some(ACCESS_TOKEN.into());
    gl.gateway_runner = Some(GitlabRunner::default());
    db.gitlab.insert("fake".into(), gl);
    for i in 0..n {
        let mac = MacAddr([0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8]);
        let mut d = Dut::new(
            mac,
            format!("gfx{}", i % 10),
            "10.42.0.2".parse().unwrap(),
            vec![format!("amdgpu:gfx{}", i % 10), "amdgpu:APU".into()],
        );
        d.ready_for_service = true;
        db.duts.insert(mac, d);
    }
    let db = Arc::new(MemoryMarsDb::new(db));
    let dir = tempfile::tempdir().unwrap();
    let host = HostResources::detect();
    let mut settings = ReconcilerSettings::new("benchfarm");
    settings.allow_insecure = true;
    let writer = RunnerConfigWriter::new(
        dir.path().join("config.toml"),
        TemplateSource::BuiltIn,
        vec![("MINIO_URL".into(), "http://ci-gateway:9000".into())],
        host.clone(),
    );
    settings.config = Some(writer.clone());
    let client = GitlabClient::new(GitlabClientOptions {
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .unwrap();
    let rec = Reconciler::new(db.clone() as Arc<dyn MarsDb>, Arc::new(client), settings).unwrap();

    let t = Instant::now();
    let r = rec.reconcile(true).await;
    println!(
        "{n} DUTs, first full pass (register {}): {:?}",
        r.registered,
        t.elapsed()
    );
    assert_eq!(r.registered, n + 1, "{r:?}");

    let t = Instant::now();
    let r = rec.reconcile(true).await;
    println!(
        "second full pass (verify + details of {}): {:?}",
        r.checked,
        t.elapsed()
    );

    let t = Instant::now();
    let r = rec.reconcile(false).await;
    println!(
        "incremental pass, nothing changed ({} checked): {:?}",
        r.checked,
        t.elapsed()
    );

    let first = *db.snapshot().duts.keys().next().unwrap();
    db.update(move |d| {
        d.duts[&first].manual_tags.push("new".into());
        Ok::<_, std::convert::Infallible>(())
    })
    .await
    .unwrap();
    let t = Instant::now();
    let r = rec.reconcile(false).await;
    println!(
        "incremental pass, one DUT re-tagged ({} checked, {} registered): {:?}",
        r.checked,
        r.registered,
        t.elapsed()
    );

    let snap = db.snapshot();
    let t = Instant::now();
    let input = RunnerConfigInput::from_database(&snap, "benchfarm", &host, true);
    let text = writer.render(&input).unwrap();
    println!(
        "config.toml of {} runners ({} bytes) rendered and checked: {:?}",
        input.dut_runners.len() + input.gateway_runners.len(),
        text.len(),
        t.elapsed()
    );
}
