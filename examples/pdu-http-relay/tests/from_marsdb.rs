//! The whole path of a third-party driver: a (simulated) HTTP relay board,
//! a MarsDB file naming the `http_relay` driver, a registry with the stock
//! drivers plus this one, MarsDB validation, the PDU manager, a port switch.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vivian_core::marsdb::{FileMarsDb, FileOptions, MarsDb};
use vivian_core::pdu::{DriverRegistry, PduError, PduManager, PduOptions, PortState};
use warp::Filter;

use pdu_http_relay::{Relay, RelayList};

/// A relay board on 127.0.0.1: three relays, all ON.
async fn relay_board() -> (std::net::SocketAddr, Arc<Mutex<Vec<Relay>>>) {
    let relays = Arc::new(Mutex::new(
        ["fan", "dut-a", "spare"]
            .iter()
            .map(|n| Relay {
                name: n.to_string(),
                on: true,
            })
            .collect::<Vec<_>>(),
    ));
    let state = relays.clone();
    let list = warp::path!("relays").and(warp::get()).map({
        let s = state.clone();
        move || {
            warp::reply::json(&RelayList {
                relays: s.lock().unwrap().clone(),
            })
        }
    });
    let get = warp::path!("relays" / usize).and(warp::get()).map({
        let s = state.clone();
        move |i: usize| match s.lock().unwrap().get(i) {
            Some(r) => warp::reply::with_status(warp::reply::json(r), warp::http::StatusCode::OK),
            None => warp::reply::with_status(
                warp::reply::json(&"no relay"),
                warp::http::StatusCode::NOT_FOUND,
            ),
        }
    });
    let set = warp::path!("relays" / usize)
        .and(warp::post())
        .and(warp::body::json())
        .map(move |i: usize, body: serde_json::Value| {
            let mut relays = state.lock().unwrap();
            match (relays.get_mut(i), body["on"].as_bool()) {
                (Some(r), Some(on)) => {
                    r.on = on;
                    warp::reply::with_status(warp::reply::json(r), warp::http::StatusCode::OK)
                }
                _ => warp::reply::with_status(
                    warp::reply::json(&"bad request"),
                    warp::http::StatusCode::BAD_REQUEST,
                ),
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(list.or(get).or(set)).incoming(listener).run());
    (addr, relays)
}

#[tokio::test]
async fn a_marsdb_pdu_with_the_third_party_driver_switches_a_relay() {
    let (addr, relays) = relay_board().await;

    // 1. The embedding program's registry: stock drivers + the third-party one.
    let mut registry = DriverRegistry::new();
    vivian_pdu::register_builtin(&mut registry);
    pdu_http_relay::register(&mut registry);
    let registry = Arc::new(registry);

    // 2. MarsDB names the driver; the registry validates every PDU.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mars_db.yaml");
    std::fs::write(
        &path,
        format!(
            r#"pdus:
  bench-relays:
    driver: http_relay
    config:
      url: http://{addr}
      timeout: 2
    reserved_port_ids: ["2"]
duts:
  52:54:00:aa:bb:01:
    base_name: board
    ip_address: 10.0.0.21
    tags: []
    pdu: bench-relays
    pdu_port_id: 1
    pdu_off_delay: 0.3
"#
        ),
    )
    .unwrap();
    let db = FileMarsDb::open(
        &path,
        FileOptions {
            validator: Some(registry.marsdb_validator()),
            ..FileOptions::default()
        },
    )
    .await
    .unwrap();

    // 3. The PDU manager builds the PDUs of MarsDB.
    let manager = PduManager::new(registry.clone(), PduOptions::default());
    assert!(manager.sync_marsdb(&db.snapshot()).await.is_empty());
    let pdu = manager.get("bench-relays").unwrap();
    pdu.refresh().await.unwrap();
    let snap = pdu.snapshot();
    assert_eq!(snap.ports["1"].label.as_deref(), Some("dut-a"));
    assert_eq!(snap.ports["1"].min_off_time, 0.3);
    assert!(snap.ports["2"].reserved);

    // 4. Power-cycle the DUT's relay: OFF, then ON after its pdu_off_delay.
    pdu.set_port_state("1", PortState::Off).await.unwrap();
    assert!(!relays.lock().unwrap()[1].on);
    let t = Instant::now();
    pdu.set_port_state("1", PortState::On).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert!(relays.lock().unwrap()[1].on);
    assert!(matches!(
        pdu.set_port_state("2", PortState::Off).await,
        Err(PduError::PortReserved { .. })
    ));
    assert!(relays.lock().unwrap()[2].on);
    manager.shutdown().await;
}

#[tokio::test]
async fn marsdb_refuses_an_unknown_driver_and_a_bad_config_naming_the_pdu() {
    let mut registry = DriverRegistry::new();
    pdu_http_relay::register(&mut registry);
    let registry = Arc::new(registry);
    let dir = tempfile::tempdir().unwrap();
    for (yaml, needle) in [
        (
            "pdus:\n  relays:\n    driver: http_relai\n    config: {url: 'http://x'}\n",
            "unknown driver \"http_relai\"",
        ),
        (
            "pdus:\n  relays:\n    driver: http_relay\n    config: {url: 'gopher://x'}\n",
            "\"url\"",
        ),
    ] {
        let path = dir.path().join("mars_db.yaml");
        std::fs::write(&path, yaml).unwrap();
        // An invalid file is reported (with file, line and column), and the
        // database stays empty instead.
        let db = FileMarsDb::open(
            &path,
            FileOptions {
                validator: Some(registry.marsdb_validator()),
                ..FileOptions::default()
            },
        )
        .await
        .unwrap();
        let err = db.error().expect("invalid database reported").to_string();
        assert!(db.snapshot().pdus.is_empty());
        assert!(err.contains("relays"), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
