use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use super::*;
use crate::marsdb::{Database, Dut, MacAddr, MemoryMarsDb, Pdu, PduConfig};
use crate::pdu::dummy::DummyDriver;
use crate::pdu::{DriverRegistry, PduDriver, PduOptions, PortState};

const MAC1: &str = "52:54:00:00:00:01";
const MAC2: &str = "52:54:00:00:00:02";
const NEW: &str = "52:54:00:00:00:99";

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

/// A farm with PDU "P" (4 ports, zero minimum off time, all ON) and two
/// DUTs: MAC1 on port 0 (ready), MAC2 on port 1 (retired).
async fn farm() -> (Arc<Farm>, Arc<MemoryMarsDb>) {
    farm_with(FarmOptions::new("farm"), None).await
}

/// [`farm`] with these options and job engine (installed before start).
async fn farm_with(
    options: FarmOptions,
    runner: Option<Arc<dyn JobRunner>>,
) -> (Arc<Farm>, Arc<MemoryMarsDb>) {
    let mut db = Database::new();
    let mut config = PduConfig::new();
    config.insert("ports".into(), json!(["a", "b", "c", "d"]));
    db.pdus.insert("P".into(), Pdu::new("fast", config));
    let mut d1 = Dut::new(
        mac(MAC1),
        "gfx9",
        "10.0.0.1".parse().unwrap(),
        vec!["t1".into()],
    );
    d1.pdu = Some("P".into());
    d1.pdu_port_id = Some("0".into());
    d1.pdu_off_delay = 0.0;
    d1.ready_for_service = true;
    let mut d2 = Dut::new(
        mac(MAC2),
        "gfx9",
        "10.0.0.2".parse().unwrap(),
        vec!["t2".into()],
    );
    d2.pdu = Some("P".into());
    d2.pdu_port_id = Some("1".into());
    d2.pdu_off_delay = 0.0;
    d2.ready_for_service = true;
    d2.is_retired = true;
    db.duts.insert(mac(MAC1), d1);
    db.duts.insert(mac(MAC2), d2);
    let mdb = Arc::new(MemoryMarsDb::new(db));
    let mut reg = DriverRegistry::new();
    reg.register("fast", |config| {
        Ok(Box::new(
            DummyDriver::from_config(config)?.with_default_min_off_time(Duration::from_millis(100)),
        ) as Box<dyn PduDriver>)
    });
    let opts = PduOptions {
        poll_interval: Duration::from_millis(50),
        ..PduOptions::default()
    };
    let pdus = Arc::new(PduManager::new(Arc::new(reg), opts));
    let farm = Farm::new(mdb.clone(), pdus, options);
    if let Some(r) = runner {
        farm.set_job_runner(r);
    }
    farm.start().await;
    // Wait for the PDU's ports to be listed.
    let h = farm.pdus().get("P").unwrap();
    h.refresh().await.unwrap();
    (farm, mdb)
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 2 s");
}

#[tokio::test]
async fn states_follow_the_reference_rules() {
    let (farm, _) = farm().await;
    let v = farm.view();
    // MAC1 is ready and not retired: created with a quick check queued.
    assert_eq!(v.duts[&mac(MAC1)].state, DutState::QuickCheck);
    assert_eq!(v.duts[&mac(MAC2)].state, DutState::Retired);
    assert_eq!(v.duts[&mac(MAC1)].full_name, "farm-gfx9-1");
    assert_eq!(v.duts[&mac(MAC2)].full_name, "farm-gfx9-2");
    assert!(v.duts[&mac(MAC1)].has_pdu_assigned);
    farm.clear_quick_check(&mac(MAC1));
    assert_eq!(farm.view().duts[&mac(MAC1)].state, DutState::Idle);
    assert_eq!(
        farm.view().find_dut("farm-gfx9-2").unwrap().id,
        MAC2.to_string()
    );
}

/// Training progress is shown only next to TRAINING or QUICK_CHECK: a
/// record not yet cleared when the DUT left them is not.
#[tokio::test]
async fn training_progress_shows_only_while_the_dut_trains_or_is_checked() {
    let (farm, _) = farm().await;
    let busy = TrainingInfo {
        state: TrainingState::QuickCheck,
        progress: None,
    };
    farm.set_training(&mac(MAC1), busy.clone());
    farm.set_training(&mac(MAC2), busy.clone());
    let v = farm.view();
    assert_eq!(v.duts[&mac(MAC1)].state, DutState::QuickCheck);
    assert_eq!(v.duts[&mac(MAC1)].training, busy);
    assert_eq!(v.duts[&mac(MAC2)].state, DutState::Retired);
    assert_eq!(v.duts[&mac(MAC2)].training, TrainingInfo::default());
    // The check is over before the record is cleared.
    farm.clear_quick_check(&mac(MAC1));
    let v = farm.view();
    assert_eq!(v.duts[&mac(MAC1)].state, DutState::Idle);
    assert_eq!(v.duts[&mac(MAC1)].training, TrainingInfo::default());
}

#[tokio::test]
async fn registration_creates_merges_and_consumes_the_discovery() {
    let (farm, db) = farm().await;
    // Creation needs base_name, ip_address, tags.
    let r = DutRegistration::from_json(&obj(json!({"mac_address": NEW}))).unwrap();
    let e = farm.register_dut(r).await.unwrap_err();
    assert!(
        matches!(e, FarmError::Invalid(ref m) if m.contains("base_name")),
        "{e}"
    );
    assert!(!db.snapshot().duts.contains_key(&mac(NEW)));

    // Unknown keys and wrong types are refused.
    for bad in [
        json!({"mac_address": NEW, "pdu": "P"}),
        json!({"mac_address": NEW, "tags": "x"}),
        json!({"mac_address": NEW, "ip_address": "10.0.0"}),
        json!({"mac_address": "nope"}),
        json!({"base_name": "x"}),
    ] {
        assert!(
            matches!(
                DutRegistration::from_json(&obj(bad.clone())),
                Err(FarmError::Invalid(_))
            ),
            "{bad}"
        );
    }

    // Port 2 OFF, then a discovery on it.
    farm.patch_port(
        "P",
        "2",
        PortPatch {
            state: Some(PortState::Off),
            reserved: None,
        },
    )
    .await
    .unwrap();
    farm.start_discovery("P", "2", None).await.unwrap();
    let d = farm.discovery().unwrap();
    assert_eq!(
        (d.pdu.as_str(), d.port_id.as_str(), d.timeout),
        ("P", "2", 150.0)
    );

    let r = DutRegistration::from_json(&obj(json!({
        "mac_address": NEW, "base_name": "gfx10", "ip_address": "10.0.0.99", "tags": ["x"]
    })))
    .unwrap();
    let (id, created) = farm.register_dut(r).await.unwrap();
    assert!(created);
    assert!(farm.discovery().is_none(), "the discovery is consumed");
    let snap = db.snapshot();
    let dut = &snap.duts[&id];
    assert_eq!(dut.pdu.as_deref(), Some("P"));
    assert_eq!(dut.pdu_port_id.as_ref().unwrap().as_str(), "2");
    assert!(
        (dut.pdu_off_delay - 0.1).abs() < 1e-9,
        "{}",
        dut.pdu_off_delay
    );
    assert!(!dut.ready_for_service);
    assert_eq!(farm.view().duts[&id].state, DutState::Training);

    // Merge: only the given fields change.
    let r = DutRegistration::from_json(&obj(json!({"id": NEW, "tags": ["y"]}))).unwrap();
    let (_, created) = farm.register_dut(r).await.unwrap();
    assert!(!created);
    let snap = db.snapshot();
    assert_eq!(snap.duts[&id].tags, vec!["y".to_string()]);
    assert_eq!(snap.duts[&id].base_name, "gfx10");
}

#[tokio::test]
async fn patch_validates_everything_first_and_unretiring_queues_a_quick_check() {
    let (farm, db) = farm().await;
    let before = db.snapshot();
    for bad in [
        json!({"comment": true}),
        json!({"pdu_off_delay": "x"}),
        json!({"pdu_off_delay": -1}),
        json!({"comment": "ok", "pdu": "P"}),
        json!({"manual_tags": [1]}),
        json!({"is_retired": "false"}),
    ] {
        assert!(DutPatch::from_json(&obj(bad.clone())).is_err(), "{bad}");
    }
    assert_eq!(*db.snapshot(), *before);

    let p = DutPatch::from_json(&obj(json!({"is_retired": false, "comment": "hi"}))).unwrap();
    let msg = farm.patch_dut(MAC2, p).await.unwrap();
    assert!(msg.starts_with("Updated farm-gfx9-2: "), "{msg}");
    assert!(farm.quick_check_queued(MAC2).unwrap());
    assert_eq!(
        db.snapshot().duts[&mac(MAC2)].comment.as_deref(),
        Some("hi")
    );
    assert_eq!(farm.view().duts[&mac(MAC2)].state, DutState::QuickCheck);

    let e = farm
        .patch_dut("unknown", DutPatch::default())
        .await
        .unwrap_err();
    assert!(matches!(e, FarmError::NotFound(_)));
}

#[tokio::test]
async fn discovery_refusals_and_active_expiry() {
    let (farm, _) = farm().await;
    // Port 0 is used by MAC1; port 2 is ON (dummy ports start ON).
    assert!(matches!(
        farm.start_discovery("P", "0", None).await,
        Err(FarmError::Conflict(_))
    ));
    assert!(matches!(
        farm.start_discovery("P", "2", None).await,
        Err(FarmError::Conflict(_))
    ));
    assert!(matches!(
        farm.start_discovery("Q", "2", None).await,
        Err(FarmError::NotFound(_))
    ));
    assert!(matches!(
        farm.start_discovery("P", "9", None).await,
        Err(FarmError::NotFound(_))
    ));
    assert!(matches!(
        farm.cancel_discovery().await,
        Err(FarmError::Conflict(_))
    ));

    farm.patch_port(
        "P",
        "3",
        PortPatch {
            state: Some(PortState::Off),
            reserved: None,
        },
    )
    .await
    .unwrap();
    farm.start_discovery("P", "3", Some(Duration::from_millis(300)))
        .await
        .unwrap();
    let h = farm.pdus().get("P").unwrap();
    assert_eq!(h.get_port_state("3").await.unwrap(), PortState::On);
    assert!(matches!(
        farm.start_discovery("P", "3", None).await,
        Err(FarmError::Conflict(_))
    ));
    // Expiry frees the slot and switches the port OFF again.
    wait_for(|| farm.discovery().is_none()).await;
    let mut off = false;
    for _ in 0..100 {
        if h.get_port_state("3").await.unwrap() == PortState::Off {
            off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(off, "the port is switched OFF at expiry");

    // Cancel.
    farm.start_discovery("P", "3", None).await.unwrap();
    let msg = farm.cancel_discovery().await.unwrap();
    assert!(msg.contains("turned OFF"), "{msg}");
    assert_eq!(h.get_port_state("3").await.unwrap(), PortState::Off);
}

#[tokio::test]
async fn port_reservation_is_persisted_and_refuses_changes() {
    let (farm, db) = farm().await;
    // A port in use by a non-retired DUT cannot be changed.
    let e = farm
        .patch_port(
            "P",
            "0",
            PortPatch {
                state: Some(PortState::Off),
                reserved: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, FarmError::Conflict(_)), "{e}");
    // A retired DUT's port can.
    farm.patch_port(
        "P",
        "1",
        PortPatch {
            state: Some(PortState::Off),
            reserved: None,
        },
    )
    .await
    .unwrap();

    farm.patch_port(
        "P",
        "3",
        PortPatch {
            state: None,
            reserved: Some(true),
        },
    )
    .await
    .unwrap();
    assert!(db.snapshot().pdus["P"].is_reserved(&"3".into()));
    let e = farm
        .patch_port(
            "P",
            "3",
            PortPatch {
                state: Some(PortState::Off),
                reserved: None,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, FarmError::Conflict(ref m) if m.contains("reserved")),
        "{e}"
    );
    assert!(matches!(
        farm.start_discovery("P", "3", None).await,
        Err(FarmError::Conflict(_))
    ));
    farm.patch_port(
        "P",
        "3",
        PortPatch {
            state: None,
            reserved: Some(false),
        },
    )
    .await
    .unwrap();
    assert!(!db.snapshot().pdus["P"].is_reserved(&"3".into()));

    for bad in [
        json!({}),
        json!({"state": true}),
        json!({"state": "up"}),
        json!({"reserved": "yes"}),
        json!({"reserved": 1}),
        json!({"label": "x"}),
    ] {
        assert!(PortPatch::from_json(&obj(bad.clone())).is_err(), "{bad}");
    }
    assert_eq!(
        PortPatch::from_json(&obj(json!({"reserved": "True", "state": "ON"}))).unwrap(),
        PortPatch {
            state: Some(PortState::On),
            reserved: Some(true)
        }
    );
}

struct FakeEngine;

#[async_trait]
impl JobRunner for FakeEngine {
    async fn start_job(&self, farm: Arc<Farm>, job: AcceptedJob) -> Result<(), FarmError> {
        tokio::spawn(async move {
            farm.job_running(&job.dut, &job.submission.job_id);
            job.cancel.cancelled().await;
            farm.job_finished(&job.dut, &job.submission.job_id);
        });
        Ok(())
    }
}

fn submission(id: Option<&str>, tags: &[&str]) -> JobSubmission {
    JobSubmission {
        version: 1,
        job_id: "job-1".into(),
        target: JobTarget {
            id: id.map(str::to_owned),
            tags: tags.iter().map(|s| s.to_string()).collect(),
        },
        ..JobSubmission::default()
    }
}

#[tokio::test]
async fn job_submission_selects_queues_and_cancels() {
    let (farm, _) = farm().await;
    farm.clear_quick_check(&mac(MAC1));
    // Without an engine: 503 and nothing changes.
    let e = farm
        .submit_job(submission(None, &["t1"]))
        .await
        .unwrap_err();
    assert!(matches!(e, FarmError::Unavailable(_)), "{e}");
    assert_eq!(farm.view().duts[&mac(MAC1)].state, DutState::Idle);

    assert!(matches!(
        farm.submit_job(submission(Some("nope"), &[])).await,
        Err(FarmError::NotFound(_))
    ));
    assert!(matches!(
        farm.submit_job(submission(Some(MAC1), &["zzz"])).await,
        Err(FarmError::NoMatch(_))
    ));
    assert!(matches!(
        farm.submit_job(submission(Some(MAC2), &[])).await,
        Err(FarmError::Conflict(_))
    ));
    assert!(
        matches!(
            farm.submit_job(submission(None, &["t2"])).await,
            Err(FarmError::NoMatch(_))
        ),
        "a retired DUT is no candidate"
    );

    farm.set_job_runner(Arc::new(FakeEngine));
    let dut = farm
        .submit_job(submission(None, &["t1", "farm:farm"]))
        .await
        .unwrap();
    assert_eq!(dut, mac(MAC1));
    wait_for(|| farm.view().duts[&dut].state == DutState::Running).await;
    assert!(matches!(
        farm.submit_job(submission(None, &["t1"])).await,
        Err(FarmError::Conflict(ref m)) if m.contains("busy")
    ));
    farm.cancel_job(MAC1).await.unwrap();
    wait_for(|| farm.view().duts[&dut].state == DutState::Idle).await;
    assert!(matches!(
        farm.cancel_job(MAC1).await,
        Err(FarmError::Conflict(_))
    ));
}

#[tokio::test]
async fn removal_cancels_the_job_and_forgets_the_dut() {
    let (farm, db) = farm().await;
    let token = farm
        .begin_job(&mac(MAC1), "train-1", JobKind::Training)
        .unwrap();
    assert_eq!(farm.view().duts[&mac(MAC1)].state, DutState::Training);
    let msg = farm.remove_dut("farm-gfx9-1").await.unwrap();
    assert_eq!(msg, "The machine farm-gfx9-1 was removed\n");
    assert!(token.is_cancelled());
    assert!(!db.snapshot().duts.contains_key(&mac(MAC1)));
    assert!(farm.dut_runtime(&mac(MAC1)).is_none());
    assert!(matches!(
        farm.remove_dut(MAC1).await,
        Err(FarmError::NotFound(_))
    ));
}

#[tokio::test]
async fn generation_moves_on_every_change() {
    let (farm, _) = farm().await;
    let g = farm.generation();
    farm.queue_quick_check(MAC2).await.unwrap();
    assert!(farm.generation() > g);
}

// ---- Sergent Hartman ----

const MAC3: &str = "52:54:00:00:00:03";

/// One internal job as the scripted engine saw it.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    dut: MacAddr,
    kind: JobKind,
    training_kind: String,
    training_loop: u64,
    /// The DUT's state and training object while the job ran.
    state: DutState,
    training: TrainingInfo,
    at: std::time::Instant,
    /// `SERGENT_HARTMAN_QUIET` as the job received it.
    quiet: bool,
}

/// What the scripted engine answers: a status, or `None` to run until
/// cancelled.
type Script = dyn Fn(&Call, usize) -> Option<crate::job::JobStatus> + Send + Sync;

/// An engine whose internal jobs end as `script` says (`usize`: how many
/// jobs of the same `training_kind` ran before).
struct ScriptedEngine {
    script: Box<Script>,
    calls: std::sync::Mutex<Vec<Call>>,
}

impl ScriptedEngine {
    fn new(
        script: impl Fn(&Call, usize) -> Option<crate::job::JobStatus> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(ScriptedEngine {
            script: Box::new(script),
            calls: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls for one DUT.
    fn calls_for(&self, dut: &str) -> Vec<Call> {
        let dut = mac(dut);
        self.calls().into_iter().filter(|c| c.dut == dut).collect()
    }

    fn count(&self, training_kind: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.training_kind == training_kind)
            .count()
    }
}

#[async_trait]
impl JobRunner for ScriptedEngine {
    async fn start_job(&self, _farm: Arc<Farm>, _job: AcceptedJob) -> Result<(), FarmError> {
        Err(FarmError::Unavailable("no user jobs here".into()))
    }

    async fn run_internal_job(
        &self,
        farm: Arc<Farm>,
        job: InternalJob,
    ) -> Result<InternalJobReport, FarmError> {
        farm.job_running(&job.dut, &job.job_id);
        let v = farm.view();
        let call = Call {
            dut: job.dut,
            kind: job.kind,
            training_kind: job.vars[VAR_TRAINING_KIND].as_str().unwrap().to_string(),
            training_loop: job.vars[VAR_TRAINING_LOOP].as_u64().unwrap(),
            state: v.duts[&job.dut].state,
            training: v.duts[&job.dut].training.clone(),
            at: std::time::Instant::now(),
            quiet: job.quiet,
        };
        let before = self.count(&call.training_kind);
        let status = (self.script)(&call, before);
        self.calls.lock().unwrap().push(call.clone());
        match status {
            Some(s) => {
                // Each boot is set up; a DUT that passes fetches its boot
                // script (its firmware booted), one that fails does not.
                farm.set_job_boot(&job.dut, &job.job_id, BootSpec::default());
                if s == PASS {
                    use crate::netboot::DeploymentProvider;
                    let req = crate::netboot::BootRequest::ipxe(Some("efi"), Some("x86_64"));
                    farm.deployment(&job.dut.to_string(), &req).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(InternalJobReport {
                    status: Some(s),
                    console_data_received: true,
                    elapsed: Duration::from_millis(5),
                    log: format!(
                        "log of {} {}: {s}\n",
                        call.training_kind, call.training_loop
                    ),
                })
            }
            None => {
                job.cancel.cancelled().await;
                Ok(InternalJobReport {
                    status: None,
                    console_data_received: false,
                    elapsed: Duration::ZERO,
                    log: String::new(),
                })
            }
        }
    }
}

fn training(boot_count: i64, qualifying: u32) -> FarmOptions {
    let mut o = FarmOptions::new("farm");
    let mut t = TrainingOptions::new(
        JobTemplate::Text(Arc::from("registration")),
        JobTemplate::Text(Arc::from("bootloop")),
    );
    t.boot_count = boot_count;
    t.qualifying_boot_count = qualifying;
    t.registration_retrial_delay = Duration::from_millis(300);
    o.training = Some(t);
    o
}

/// Adds MAC3, not ready, on port 2 (through MarsDB, as a file edit would).
async fn add_untrained(db: &MemoryMarsDb) {
    db.update(|db| {
        let mut d = Dut::new(mac(MAC3), "new", "10.0.0.3".parse().unwrap(), vec![]);
        d.pdu = Some("P".into());
        d.pdu_port_id = Some("2".into());
        d.pdu_off_delay = 0.0;
        db.duts.insert(mac(MAC3), d);
        Ok::<_, FarmError>(())
    })
    .await
    .unwrap();
}

async fn wait_long(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not reached in 5 s");
}

use crate::job::JobStatus::{Fail as FAIL, Pass as PASS};
use crate::marsdb::MarsDbExt;

#[tokio::test]
async fn training_registers_runs_the_loops_and_qualifies() {
    // Loop 2 fails: 2 PASS out of 3, 2 needed.
    let engine = ScriptedEngine::new(|c, _| match c.training_kind.as_str() {
        "bootloop" if c.training_loop == 2 => Some(FAIL),
        _ => Some(PASS),
    });
    let (farm, db) = farm_with(training(3, 2), Some(engine.clone())).await;
    add_untrained(&db).await;
    wait_long("MAC3 ready", || {
        db.snapshot().duts[&mac(MAC3)].ready_for_service
            && farm.dut_state(&mac(MAC3)) == Some(DutState::Idle)
    })
    .await;
    let calls: Vec<_> = engine
        .calls_for(MAC3)
        .into_iter()
        .map(|c| (c.training_kind, c.training_loop))
        .collect();
    assert_eq!(
        calls,
        [
            ("registration".to_string(), 0),
            ("bootloop".into(), 1),
            ("bootloop".into(), 2),
            ("bootloop".into(), 3)
        ]
    );
    for c in engine.calls_for(MAC3) {
        assert_eq!(c.kind, JobKind::Training);
        assert!(!c.quiet, "SERGENT_HARTMAN_QUIET is off by default");
        assert_eq!(c.state, DutState::Training, "{c:?}");
        assert_eq!(c.training.state, TrainingState::Enrolling);
        let p = c.training.progress.unwrap();
        assert_eq!(p.is_registered, c.training_kind == "bootloop");
        assert_eq!(u64::from(p.current_loop_count), c.training_loop);
        assert_eq!((p.boot_loop_counts, p.qualifying_rate), (3, 2));
        // The registration is loops[0], boot loop n is loops[n].
        assert_eq!(p.loops.len() as u64, c.training_loop);
    }
    // The third loop saw the registration and the first two loops
    // recorded, the failed one with a log.
    let third = engine.calls_for(MAC3)[3].training.progress.clone().unwrap();
    let third_statuses: Vec<_> = third.loops.iter().map(|l| l.status.as_str()).collect();
    assert_eq!(third_statuses, ["PASS", "PASS", "FAIL"]);
    assert_eq!(
        third.statuses,
        std::collections::BTreeMap::from([("FAIL".to_string(), 1), ("PASS".to_string(), 1)]),
        "the registration is listed but not counted"
    );
    let third = TrainingProgress {
        loops: third.loops[1..].to_vec(),
        ..third
    };
    assert_eq!(third.loops[0].status, "PASS");
    assert!(!third.loops[0].has_log);
    assert_eq!(third.loops[1].status, "FAIL");
    assert!(third.loops[1].has_log);
    // Each loop as EX A.1 (V2025) shows it: the loop that booted fetched
    // its boot script; no PDU here reads power.
    let shown = serde_json::to_value(&third.loops[0]).unwrap();
    assert_eq!(
        shown,
        json!({"status": "PASS", "seconds_elapsed": third.loops[0].seconds_elapsed,
               "energy_consumed_check": null, "firmware_booted_check": true,
               "console_data_received_check": true, "has_log": false})
    );
    let keys: Vec<_> = shown.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "status",
            "seconds_elapsed",
            "energy_consumed_check",
            "firmware_booted_check",
            "console_data_received_check",
            "has_log"
        ]
    );
    assert!(!third.loops[1].firmware_booted_check);
    assert_eq!(
        third.loops[1].log.as_deref(),
        Some("log of bootloop 2: FAIL\n")
    );
    // Done: the training object is back to IDLE, nothing else ran.
    wait_long("training IDLE", || {
        farm.view().duts[&mac(MAC3)].training == TrainingInfo::default()
    })
    .await;
    assert!(matches!(
        farm.training_loop_log(MAC3, 1),
        Err(FarmError::NotFound(_))
    ));
    assert_eq!(engine.calls_for(MAC3).len(), 4);
    farm.shutdown().await;
}

#[tokio::test]
async fn a_dut_failing_half_its_loops_keeps_training_from_registration() {
    let engine = ScriptedEngine::new(|c, _| match c.training_kind.as_str() {
        "bootloop" if c.training_loop % 2 == 0 => Some(FAIL),
        _ => Some(PASS),
    });
    let (farm, db) = farm_with(training(2, 2), Some(engine.clone())).await;
    add_untrained(&db).await;
    wait_long("three registrations", || engine.count("registration") >= 3).await;
    assert!(!db.snapshot().duts[&mac(MAC3)].ready_for_service);
    assert_eq!(farm.dut_state(&mac(MAC3)), Some(DutState::Training));
    // Each round: registration, loop 1, loop 2; then again from scratch
    // (the registration is loops[0]).
    let kinds: Vec<_> = engine
        .calls_for(MAC3)
        .into_iter()
        .take(6)
        .map(|c| {
            (
                c.training_kind,
                c.training_loop,
                c.training.progress.unwrap().loops.len(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("registration".to_string(), 0, 0),
            ("bootloop".into(), 1, 1),
            ("bootloop".into(), 2, 2),
            ("registration".into(), 0, 0),
            ("bootloop".into(), 1, 1),
            ("bootloop".into(), 2, 2),
        ]
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn a_failed_registration_is_retried_after_the_delay() {
    let engine = ScriptedEngine::new(|c, n| match c.training_kind.as_str() {
        "registration" if n == 0 => Some(FAIL),
        _ => Some(PASS),
    });
    // No boot loop: ready as soon as the registration passes.
    let (farm, db) = farm_with(training(0, 100), Some(engine.clone())).await;
    add_untrained(&db).await;
    wait_long("registration failed", || {
        farm.view().duts[&mac(MAC3)].training.state == TrainingState::RegistrationFailed
    })
    .await;
    assert_eq!(farm.dut_state(&mac(MAC3)), Some(DutState::Training));
    let json = serde_json::to_value(&farm.view().duts[&mac(MAC3)].training).unwrap();
    assert_eq!(json["state"], "REGISTRATION_FAILED", "{json}");
    assert_eq!(json["is_registered"], false, "{json}");
    // The failed registration is loops[0]; its log is served while the DUT
    // waits for the next try (as in the reference).
    assert_eq!(json["loops"][0]["status"], "FAIL", "{json}");
    assert_eq!(json["loops"][0]["has_log"], true, "{json}");
    assert_eq!(json["statuses"], json!({}), "{json}");
    assert_eq!(
        farm.training_loop_log(MAC3, 0).unwrap().as_ref(),
        "log of registration 0: FAIL\n"
    );
    wait_long("MAC3 ready", || {
        db.snapshot().duts[&mac(MAC3)].ready_for_service
    })
    .await;
    let calls = engine.calls_for(MAC3);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let gap = calls[1].at - calls[0].at;
    assert!(gap >= Duration::from_millis(300), "retried after {gap:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn quick_checks_pass_to_idle_and_fail_to_training() {
    let engine = ScriptedEngine::new(|c, n| match c.training_kind.as_str() {
        // The start-up quick check passes, the next one fails.
        "quick_check" => Some(if n == 0 { PASS } else { FAIL }),
        // Retraining then hangs in its registration.
        _ => None,
    });
    let (farm, db) = farm_with(training(2, 2), Some(engine.clone())).await;
    // MAC1 is ready: a quick check is queued at start and runs.
    wait_long("start-up quick check", || {
        engine.count("quick_check") == 1 && farm.dut_state(&mac(MAC1)) == Some(DutState::Idle)
    })
    .await;
    let c = &engine.calls()[0];
    assert_eq!(
        (c.kind, c.state),
        (JobKind::QuickCheck, DutState::QuickCheck)
    );
    assert_eq!(c.training.state, TrainingState::QuickCheck);
    assert!(!farm.quick_check_queued(MAC1).unwrap());
    assert!(db.snapshot().duts[&mac(MAC1)].ready_for_service);

    // Asked through the API: it fails, the DUT goes back to training.
    farm.queue_quick_check(MAC1).await.unwrap();
    wait_long("back to training", || engine.count("registration") == 1).await;
    assert!(!db.snapshot().duts[&mac(MAC1)].ready_for_service);
    assert!(!farm.quick_check_queued(MAC1).unwrap());
    assert_eq!(farm.dut_state(&mac(MAC1)), Some(DutState::Training));
    // The retired DUT was never touched.
    assert!(engine.calls().iter().all(|c| c.training_kind != "bootloop"));
    farm.shutdown().await;
}

#[tokio::test]
async fn retiring_stops_training_and_activating_quick_checks() {
    // Registrations hang until cancelled; quick checks pass.
    let engine = ScriptedEngine::new(|c, _| match c.training_kind.as_str() {
        "quick_check" => Some(PASS),
        _ => None,
    });
    let (farm, db) = farm_with(training(2, 2), Some(engine.clone())).await;
    add_untrained(&db).await;
    wait_long("registration running", || {
        farm.view().duts[&mac(MAC3)].current_job.is_some()
    })
    .await;
    // Retire through the API: the job is cancelled, the DUT is RETIRED.
    farm.patch_dut(
        MAC3,
        DutPatch {
            is_retired: Some(true),
            ..DutPatch::default()
        },
    )
    .await
    .unwrap();
    wait_long("retired", || {
        let v = farm.view();
        let d = &v.duts[&mac(MAC3)];
        d.state == DutState::Retired
            && d.current_job.is_none()
            && d.training == TrainingInfo::default()
    })
    .await;
    // Made ready by hand in MarsDB, then activated by a file edit: a quick
    // check runs, then IDLE.
    db.update(|db| {
        let d = db.duts.get_mut(&mac(MAC3)).unwrap();
        d.ready_for_service = true;
        d.is_retired = false;
        Ok::<_, FarmError>(())
    })
    .await
    .unwrap();
    wait_long("quick check then IDLE", || {
        engine.count("quick_check") == 1 && farm.dut_state(&mac(MAC3)) == Some(DutState::Idle)
    })
    .await;
    // A retirement by file edit while training stops it too.
    db.update(|db| {
        db.duts.get_mut(&mac(MAC3)).unwrap().ready_for_service = false;
        Ok::<_, FarmError>(())
    })
    .await
    .unwrap();
    wait_long("training again", || engine.count("registration") == 2).await;
    db.update(|db| {
        db.duts.get_mut(&mac(MAC3)).unwrap().is_retired = true;
        Ok::<_, FarmError>(())
    })
    .await
    .unwrap();
    wait_long("retired by file", || {
        farm.dut_state(&mac(MAC3)) == Some(DutState::Retired)
            && farm.view().duts[&mac(MAC3)].current_job.is_none()
    })
    .await;
    farm.shutdown().await;
}

#[tokio::test]
async fn an_admin_cancel_restarts_training_and_fails_a_quick_check() {
    let engine = ScriptedEngine::new(|c, n| match c.training_kind.as_str() {
        // The first registration hangs (cancelled below), then all pass.
        "registration" if n == 0 => None,
        // The start-up quick check hangs too.
        "quick_check" if n == 0 => None,
        _ => Some(PASS),
    });
    let (farm, db) = farm_with(training(1, 1), Some(engine.clone())).await;
    add_untrained(&db).await;
    wait_long("both jobs running", || {
        let v = farm.view();
        v.duts[&mac(MAC1)].current_job.is_some() && v.duts[&mac(MAC3)].current_job.is_some()
    })
    .await;
    farm.cancel_job(MAC3).await.unwrap();
    farm.cancel_job(MAC1).await.unwrap();
    // MAC3 registers again at once and qualifies; MAC1's cancelled quick
    // check did not pass: it retrains and qualifies too.
    wait_long("both ready", || {
        let s = db.snapshot();
        engine.count("registration") == 3
            && s.duts[&mac(MAC3)].ready_for_service
            && s.duts[&mac(MAC1)].ready_for_service
            && farm.dut_state(&mac(MAC1)) == Some(DutState::Idle)
            && farm.dut_state(&mac(MAC3)) == Some(DutState::Idle)
    })
    .await;
    farm.shutdown().await;
}

#[tokio::test]
async fn a_negative_boot_count_disables_training_and_quick_checks() {
    let engine = ScriptedEngine::new(|_, _| Some(FAIL));
    let (farm, db) = farm_with(training(-1, 100), Some(engine.clone())).await;
    add_untrained(&db).await;
    wait_long("MAC3 ready, MAC1 IDLE", || {
        db.snapshot().duts[&mac(MAC3)].ready_for_service
            && farm.dut_state(&mac(MAC3)) == Some(DutState::Idle)
            && farm.dut_state(&mac(MAC1)) == Some(DutState::Idle)
    })
    .await;
    farm.queue_quick_check(MAC1).await.unwrap();
    wait_long("quick check cleared", || {
        farm.dut_state(&mac(MAC1)) == Some(DutState::Idle)
    })
    .await;
    assert!(engine.calls().is_empty(), "{:?}", engine.calls());
    farm.shutdown().await;
}

/// `SERGENT_HARTMAN_QUIET` reaches the engine with every registration,
/// boot-loop and quick-check job (the engine then writes no job log file
/// and logs at debug level).
#[tokio::test]
async fn quiet_reaches_every_training_and_quick_check_job() {
    let env: std::collections::BTreeMap<String, String> = [
        ("FARM_NAME", "farm"),
        ("SERGENT_HARTMAN_QUIET", "true"),
        ("SERGENT_HARTMAN_BOOT_COUNT", "1"),
        ("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = crate::config::Config::from_env_map(&env).unwrap();
    let mut t = TrainingOptions::from_config(&config, "registration", "bootloop");
    assert!(
        t.quiet,
        "SERGENT_HARTMAN_QUIET=true must set TrainingOptions::quiet"
    );
    t.registration_retrial_delay = Duration::from_millis(300);
    let mut o = FarmOptions::new("farm");
    o.training = Some(t);
    let engine = ScriptedEngine::new(|_, _| Some(PASS));
    let (farm, db) = farm_with(o, Some(engine.clone())).await;
    // MAC1 is ready: its start-up quick check runs; MAC3 trains.
    add_untrained(&db).await;
    wait_long("MAC3 trained", || {
        farm.dut_state(&mac(MAC3)) == Some(DutState::Idle)
            && farm.dut_state(&mac(MAC1)) == Some(DutState::Idle)
    })
    .await;
    let calls = engine.calls();
    let kinds: Vec<_> = calls.iter().map(|c| c.training_kind.as_str()).collect();
    for k in ["quick_check", "registration", "bootloop"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    assert!(calls.iter().all(|c| c.quiet), "{calls:?}");

    let env: std::collections::BTreeMap<String, String> =
        [("FARM_NAME".to_string(), "farm".to_string())].into();
    let config = crate::config::Config::from_env_map(&env).unwrap();
    assert!(!TrainingOptions::from_config(&config, "r", "b").quiet);
    farm.shutdown().await;
}
