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
    let farm = Farm::new(mdb.clone(), pdus, FarmOptions::new("farm"));
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
