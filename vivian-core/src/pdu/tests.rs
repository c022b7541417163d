//! Tests of the port semantics and of the per-PDU task, on the dummy driver,
//! with Tokio's paused clock (waits are virtual, so exact).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::dummy::{DummyControl, DummyDriver};
use super::*;

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("outlet-{i}")).collect()
}

fn options() -> PduOptions {
    PduOptions {
        retry_backoff: Duration::from_millis(100),
        ..PduOptions::default()
    }
}

fn spawn(n: usize, reserved: &[&str]) -> (PduHandle, DummyControl) {
    let (driver, control) = DummyDriver::with_control(labels(n));
    let handle = PduHandle::spawn(
        "pdu-a",
        Box::new(driver.with_default_min_off_time(Duration::from_secs(30))),
        reserved.iter().map(|s| s.to_string()),
        options(),
    );
    (handle, control)
}

#[tokio::test(start_paused = true)]
async fn setting_the_current_state_writes_nothing() {
    let (pdu, ctl) = spawn(2, &[]);
    pdu.set_port_state("0", PortState::On).await.unwrap();
    assert!(ctl.writes().is_empty());
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    assert_eq!(ctl.writes(), vec![("0".to_string(), PortState::Off)]);
}

#[tokio::test(start_paused = true)]
async fn off_to_on_waits_out_the_minimum_off_time() {
    let (pdu, ctl) = spawn(2, &[]);
    pdu.set_min_off_time("1", Some(Duration::from_secs(7)))
        .await
        .unwrap();
    pdu.set_port_state("1", PortState::Off).await.unwrap();
    let off_at = Instant::now();
    pdu.set_port_state("1", PortState::On).await.unwrap();
    let waited = off_at.elapsed();
    assert!(waited >= Duration::from_secs(7), "{waited:?}");
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    assert_eq!(ctl.state("1"), Some(PortState::On));
    // Port 0 keeps the driver default (30 s) and shows it.
    let snap = pdu.snapshot();
    assert_eq!(snap.ports["0"].min_off_time, 30.0);
    assert_eq!(snap.ports["1"].min_off_time, 7.0);
    assert!(snap.ports["1"].last_shutdown.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_port_seen_off_by_the_poll_also_waits() {
    let (pdu, ctl) = spawn(1, &[]);
    pdu.refresh().await.unwrap();
    ctl.force_state("0", PortState::Off);
    let mut rx = pdu.subscribe();
    rx.wait_for(|s| s.ports["0"].state == PortState::Off)
        .await
        .unwrap();
    let seen = Instant::now();
    pdu.set_port_state("0", PortState::On).await.unwrap();
    // The poll saw OFF up to one poll interval after the forced change.
    assert!(
        seen.elapsed() >= Duration::from_secs(29),
        "{:?}",
        seen.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_for_one_port_does_not_block_the_others() {
    let (pdu, ctl) = spawn(2, &[]);
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    let start = Instant::now();
    let slow = {
        let pdu = pdu.clone();
        tokio::spawn(async move { pdu.set_port_state("0", PortState::On).await })
    };
    tokio::task::yield_now().await;
    pdu.set_port_state("1", PortState::Off).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    slow.await.unwrap().unwrap();
    assert!(start.elapsed() >= Duration::from_secs(30));
    assert_eq!(ctl.state("0"), Some(PortState::On));
    assert_eq!(ctl.state("1"), Some(PortState::Off));
}

#[tokio::test(start_paused = true)]
async fn a_later_command_supersedes_a_waiting_on() {
    let (pdu, ctl) = spawn(1, &[]);
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    let waiting = {
        let pdu = pdu.clone();
        tokio::spawn(async move { pdu.set_port_state("0", PortState::On).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(err, PduError::Superseded { .. }), "{err}");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(ctl.state("0"), Some(PortState::Off));
    assert_eq!(ctl.writes(), vec![("0".to_string(), PortState::Off)]);
}

#[tokio::test(start_paused = true)]
async fn reserved_ports_refuse_changes_until_freed() {
    let (pdu, ctl) = spawn(3, &["2"]);
    let err = pdu.set_port_state("2", PortState::Off).await.unwrap_err();
    assert_eq!(
        err,
        PduError::PortReserved {
            pdu: "pdu-a".into(),
            port: "2".into()
        }
    );
    assert!(ctl.writes().is_empty());
    assert!(pdu.snapshot().ports["2"].reserved);
    pdu.set_reserved("2", false).await.unwrap();
    assert!(!pdu.snapshot().ports["2"].reserved);
    pdu.set_port_state("2", PortState::Off).await.unwrap();
    pdu.set_reserved("0", true).await.unwrap();
    assert!(pdu.set_port_state("0", PortState::Off).await.is_err());
    pdu.replace_reserved(vec![]).await;
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    assert_eq!(ctl.writes().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn reboot_is_off_wait_on_without_native_reboot() {
    let (pdu, ctl) = spawn(1, &[]);
    pdu.set_min_off_time("0", Some(Duration::from_secs(3)))
        .await
        .unwrap();
    let start = Instant::now();
    pdu.set_port_state("0", PortState::Reboot).await.unwrap();
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert_eq!(
        ctl.writes(),
        vec![
            ("0".to_string(), PortState::Off),
            ("0".to_string(), PortState::On)
        ]
    );
    // REBOOT of an OFF port just switches it ON.
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    pdu.set_port_state("0", PortState::Reboot).await.unwrap();
    assert_eq!(ctl.writes().len(), 4);
    assert_eq!(ctl.writes()[3], ("0".to_string(), PortState::On));
}

#[tokio::test(start_paused = true)]
async fn native_reboot_is_one_write() {
    let (driver, ctl) = DummyDriver::with_control(labels(1));
    let pdu = PduHandle::spawn(
        "native",
        Box::new(driver.with_native_reboot(true)),
        Vec::new(),
        options(),
    );
    pdu.set_port_state("0", PortState::Reboot).await.unwrap();
    assert_eq!(ctl.writes(), vec![("0".to_string(), PortState::Reboot)]);
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_then_reported_in_the_snapshot() {
    let (pdu, ctl) = spawn(1, &[]);
    pdu.refresh().await.unwrap();
    // Two failures: the third attempt works.
    ctl.fail_next(2);
    pdu.set_port_state("0", PortState::Off).await.unwrap();
    assert_eq!(pdu.snapshot().state, PduStatus::Ok);
    // Always failing: the command fails after 3 attempts, the PDU is in error.
    ctl.fail_always(true);
    let err = pdu.set_port_state("0", PortState::On).await.unwrap_err();
    match &err {
        PduError::Failed { attempts, .. } => assert_eq!(*attempts, 3),
        e => panic!("unexpected {e}"),
    }
    let snap = pdu.snapshot();
    assert_eq!(snap.state, PduStatus::Error);
    assert!(snap.error.unwrap().contains("dummy PDU set to fail"));
    // It comes back by itself once the PDU answers again.
    ctl.fail_always(false);
    let mut rx = pdu.subscribe();
    rx.wait_for(|s| s.state == PduStatus::Ok).await.unwrap();
    assert_eq!(pdu.snapshot().error, None);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_pdu_times_out_and_never_hangs_a_command() {
    let (pdu, ctl) = spawn(1, &[]);
    pdu.refresh().await.unwrap();
    ctl.hang(true);
    let start = Instant::now();
    let err = pdu.set_port_state("0", PortState::Off).await.unwrap_err();
    let PduError::Failed { last, .. } = &err else {
        panic!("unexpected {err}")
    };
    assert!(matches!(**last, PduError::Timeout { .. }), "{err}");
    // 3 attempts of 10 s plus the backoffs.
    assert!(
        start.elapsed() < Duration::from_secs(31),
        "{:?}",
        start.elapsed()
    );
    // The poll also reports it, and ports become UNKNOWN.
    let mut rx = pdu.subscribe();
    rx.wait_for(|s| s.state == PduStatus::Error && s.ports["0"].state == PortState::Unknown)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn ports_are_found_by_id_or_label_and_unknown_ports_are_errors() {
    let (pdu, ctl) = spawn(3, &[]);
    pdu.set_port_state("outlet-2", PortState::Off)
        .await
        .unwrap();
    assert_eq!(ctl.state("2"), Some(PortState::Off));
    let err = pdu.set_port_state("9", PortState::Off).await.unwrap_err();
    assert_eq!(err.to_string(), "PDU \"pdu-a\" has no port \"9\"");
    assert!(matches!(
        pdu.set_port_state("0", PortState::Unknown).await,
        Err(PduError::InvalidState(_))
    ));
    assert_eq!(pdu.get_port_state("2").await.unwrap(), PortState::Off);
}

#[tokio::test(start_paused = true)]
async fn labels_are_refreshed() {
    let (pdu, ctl) = spawn(1, &[]);
    pdu.refresh().await.unwrap();
    assert_eq!(pdu.snapshot().ports["0"].label.as_deref(), Some("outlet-0"));
    ctl.set_label("0", "dut-x");
    pdu.refresh().await.unwrap();
    assert_eq!(pdu.snapshot().ports["0"].label.as_deref(), Some("dut-x"));
}

#[tokio::test(start_paused = true)]
async fn snapshot_has_the_api_shape() {
    let (pdu, _ctl) = spawn(2, &["1"]);
    pdu.refresh().await.unwrap();
    let json = serde_json::to_value(pdu.snapshot()).unwrap();
    assert_eq!(json["state"], "OK");
    assert_eq!(json["error"], serde_json::Value::Null);
    let port = &json["ports"]["1"];
    assert_eq!(port["label"], "outlet-1");
    assert_eq!(port["state"], "ON");
    assert_eq!(port["reserved"], true);
    assert_eq!(port["min_off_time"], 30.0);
    assert_eq!(port["last_shutdown"], serde_json::Value::Null);
    assert!(port["last_polled"].as_str().unwrap().ends_with('Z'));
    let keys: Vec<_> = json["ports"].as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["0", "1"]);
}

#[tokio::test(start_paused = true)]
async fn stopped_pdus_refuse_commands() {
    let (pdu, _ctl) = spawn(1, &[]);
    pdu.stop().await;
    assert_eq!(pdu.snapshot().state, PduStatus::Stopped);
    assert_eq!(
        pdu.set_port_state("0", PortState::Off).await.unwrap_err(),
        PduError::Stopped("pdu-a".into())
    );
}

fn registry() -> Arc<DriverRegistry> {
    let mut r = DriverRegistry::new();
    DummyDriver::register(&mut r);
    Arc::new(r)
}

fn spec(name: &str, ports: &[&str], reserved: &[&str]) -> PduSpec {
    PduSpec {
        name: name.into(),
        driver: "dummy".into(),
        config: serde_json::json!({ "ports": ports }),
        reserved_port_ids: reserved.iter().map(|s| s.to_string()).collect(),
        hidden: false,
    }
}

#[tokio::test(start_paused = true)]
async fn the_manager_follows_marsdb() {
    let m = PduManager::new(registry(), options());
    let errors = m
        .sync(vec![spec("A", &["a0", "a1"], &[]), spec("B", &["b0"], &[])])
        .await;
    assert!(errors.is_empty());
    assert_eq!(m.names(), vec!["A", "B"]);
    let a = m.get("A").unwrap();
    a.set_port_state("0", PortState::Off).await.unwrap();

    // Only the reservations change: the same task keeps its state.
    m.sync(vec![
        spec("A", &["a0", "a1"], &["1"]),
        spec("B", &["b0"], &[]),
    ])
    .await;
    a.refresh().await.unwrap();
    let snap = m.snapshots()["A"].clone();
    assert!(snap.ports["1"].reserved);
    assert_eq!(snap.ports["0"].state, PortState::Off);

    // Config change: a new task (a fresh dummy, every port ON); B removed.
    m.sync(vec![spec("A", &["a0", "a1", "a2"], &[])]).await;
    assert_eq!(a.snapshot().state, PduStatus::Stopped);
    assert_eq!(m.names(), vec!["A"]);
    let a2 = m.get("A").unwrap();
    a2.refresh().await.unwrap();
    assert_eq!(a2.snapshot().ports.len(), 3);
    assert_eq!(a2.snapshot().ports["0"].state, PortState::On);
    assert!(m.get("B").is_none());

    // An unknown driver: listed in ERROR, naming the PDU.
    let mut bad = spec("C", &[], &[]);
    bad.driver = "nope".into();
    let errors = m.sync(vec![spec("A", &["a0", "a1", "a2"], &[]), bad]).await;
    assert_eq!(errors.len(), 1);
    assert!(errors[0]
        .to_string()
        .contains("PDU \"C\": unknown driver \"nope\""));
    let mut rx = m.get("C").unwrap().subscribe();
    let snap = rx
        .wait_for(|s| s.state == PduStatus::Error)
        .await
        .unwrap()
        .clone();
    assert!(snap.error.unwrap().contains("unknown driver"));
    m.shutdown().await;
    assert!(m.names().is_empty());
}
