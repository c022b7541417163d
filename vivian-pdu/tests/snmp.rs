//! The SNMP drivers against a real net-snmp `snmpd` on 127.0.0.1, serving
//! writable APC and Cyberpower outlet tables through a pass_persist script
//! (vivian_pdu::test_peers::Snmpd; needs the Debian packages snmpd, snmp).

use std::time::{Duration, Instant};

use serde_json::json;
use vivian_core::pdu::{PduDriver, PduError, PduHandle, PduOptions, PortState};
use vivian_pdu::snmp::{
    SnmpDriver, APC_MASTERSWITCH, CYBERPOWER_PDU15SWHVIEC12ATNET, CYBERPOWER_PDU41004,
};
use vivian_pdu::test_peers::Snmpd;

fn agent() -> Snmpd {
    Snmpd::start().unwrap_or_else(|e| panic!("cannot start the snmpd test peer: {e}"))
}

fn config(agent: &Snmpd, extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "hostname": agent.address(),
        "community": "private",
        "timeout": 1,
        "state_transition_delay": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn options() -> PduOptions {
    PduOptions {
        command_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(50),
        ..PduOptions::default()
    }
}

fn labels(ports: &[vivian_core::pdu::PortInfo]) -> Vec<String> {
    ports.iter().map(|p| p.label.clone().unwrap()).collect()
}

#[tokio::test]
async fn ports_are_walked_with_their_labels_for_every_model() {
    let agent = agent();
    for (model, prefix) in [
        (APC_MASTERSWITCH, "apc"),
        (CYBERPOWER_PDU41004, "cp4"),
        (CYBERPOWER_PDU15SWHVIEC12ATNET, "cp15"),
    ] {
        let d = SnmpDriver::model(&model, &config(&agent, json!({}))).unwrap();
        let ports = d.ports().await.unwrap();
        let ids: Vec<_> = ports.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            ids,
            ["1", "2", "3", "4", "5", "6", "7", "8"],
            "{}",
            model.name
        );
        assert_eq!(labels(&ports)[0], format!("{prefix}-1"));
        assert_eq!(labels(&ports)[7], format!("{prefix}-8"));
        let states = d.get_states(&ports).await.unwrap();
        assert_eq!(states, vec![PortState::On; 8], "{}", model.name);
    }
}

#[tokio::test]
async fn apc_set_get_and_native_reboot_through_the_port_layer() {
    let agent = agent();
    let driver = SnmpDriver::model(&APC_MASTERSWITCH, &config(&agent, json!({}))).unwrap();
    let pdu = PduHandle::spawn("apc", Box::new(driver), vec!["8".to_string()], options());
    pdu.set_min_off_time("3", Some(Duration::from_millis(300)))
        .await
        .unwrap();

    pdu.set_port_state("3", PortState::Off).await.unwrap();
    let status = APC_MASTERSWITCH.status;
    assert_eq!(agent.integer(status, 3), Some(2));
    assert_eq!(agent.sets(), vec![(format!(".{status}.3"), 2)]);
    assert_eq!(pdu.get_port_state("3").await.unwrap(), PortState::Off);
    assert_eq!(pdu.get_port_state("apc-3").await.unwrap(), PortState::Off);

    // OFF→ON waits out the minimum off time.
    let t = Instant::now();
    pdu.set_port_state("3", PortState::On).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(agent.integer(status, 3), Some(1));

    // Already ON: nothing written.
    pdu.set_port_state("3", PortState::On).await.unwrap();
    assert_eq!(agent.sets().len(), 2);

    // REBOOT is the PDU's own: one SET of 3.
    pdu.set_port_state("4", PortState::Reboot).await.unwrap();
    assert_eq!(agent.sets().last().unwrap(), &(format!(".{status}.4"), 3));
    assert_eq!(pdu.get_port_state("4").await.unwrap(), PortState::On);

    // Reserved port 8: refused, nothing written.
    let before = agent.sets().len();
    let err = pdu.set_port_state("8", PortState::Off).await.unwrap_err();
    assert!(matches!(err, PduError::PortReserved { .. }), "{err}");
    assert_eq!(agent.sets().len(), before);

    // The snapshot shows labels, states, reservation.
    let snap = pdu.snapshot();
    assert_eq!(snap.ports["3"].label.as_deref(), Some("apc-3"));
    assert_eq!(snap.ports["3"].state, PortState::On);
    assert!(snap.ports["8"].reserved);
    pdu.stop().await;
}

#[tokio::test]
async fn cyberpower_15sw_writes_the_control_column_and_reads_the_status_column() {
    let agent = agent();
    let d = SnmpDriver::model(&CYBERPOWER_PDU15SWHVIEC12ATNET, &config(&agent, json!({}))).unwrap();
    d.ports().await.unwrap();
    d.set_state("2", PortState::Off).await.unwrap();
    let ctrl = CYBERPOWER_PDU15SWHVIEC12ATNET.ctrl.unwrap();
    assert_eq!(agent.sets(), vec![(format!(".{ctrl}.2"), 3)]);
    assert_eq!(
        agent.integer(CYBERPOWER_PDU15SWHVIEC12ATNET.status, 2),
        Some(2)
    );
    assert_eq!(d.get_state("2").await.unwrap(), PortState::Off);
    d.set_state("2", PortState::On).await.unwrap();
    assert_eq!(agent.sets()[1], (format!(".{ctrl}.2"), 2));
    assert_eq!(d.get_state("2").await.unwrap(), PortState::On);
    d.set_state("2", PortState::Reboot).await.unwrap();
    assert_eq!(agent.sets()[2], (format!(".{ctrl}.2"), 4));

    let d = SnmpDriver::model(&CYBERPOWER_PDU41004, &config(&agent, json!({}))).unwrap();
    d.ports().await.unwrap();
    d.set_state("5", PortState::Off).await.unwrap();
    assert_eq!(d.get_state("5").await.unwrap(), PortState::Off);
    assert_eq!(agent.integer(CYBERPOWER_PDU41004.status, 5), Some(2));
}

#[tokio::test]
async fn generic_driver_with_system_id_inverse_mapping_and_v2c() {
    let agent = agent();
    // APC's table expressed generically, relative to system_id 318, v2c.
    let cfg = config(
        &agent,
        json!({
            "version": 2, "system_id": 318,
            "outlet_labels": "1.1.4.4.2.1.4", "outlet_status": "1.1.4.4.2.1.3",
            "state_mapping": {"on": 1, "off": 2, "reboot": 3},
        }),
    );
    let d = SnmpDriver::generic(&cfg).unwrap();
    assert_eq!(d.ports().await.unwrap().len(), 8);
    d.set_state("6", PortState::Off).await.unwrap();
    assert_eq!(d.get_state("6").await.unwrap(), PortState::Off);

    // An inverse mapping that swaps the meanings reads the other way round.
    let mut cfg = cfg.clone();
    cfg["inverse_state_mapping"] = json!({"on": 2, "off": 1, "reboot": 3});
    let d = SnmpDriver::generic(&cfg).unwrap();
    d.ports().await.unwrap();
    assert_eq!(d.get_state("6").await.unwrap(), PortState::On);
    assert_eq!(d.get_state("1").await.unwrap(), PortState::Off);
}

#[tokio::test]
async fn a_wrong_community_times_out_with_a_clear_error() {
    let agent = agent();
    let d = SnmpDriver::model(
        &APC_MASTERSWITCH,
        &config(
            &agent,
            json!({"community": "not-the-community", "timeout": 0.5}),
        ),
    )
    .unwrap();
    let t = Instant::now();
    let err = d.ports().await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let text = err.to_string();
    assert!(matches!(err, PduError::Timeout { .. }), "{text}");
    assert!(text.contains("community"), "{text}");

    // Through the port layer: the PDU is reported in error, commands fail.
    let pdu = PduHandle::spawn("apc", Box::new(d), Vec::new(), options());
    let err = pdu.set_port_state("1", PortState::Off).await.unwrap_err();
    assert!(matches!(err, PduError::NotReady { .. }), "{err}");
    let snap = pdu.snapshot();
    assert_eq!(snap.state, vivian_core::pdu::PduStatus::Error);
    assert!(snap.error.unwrap().contains("timed out"));
    assert!(agent.sets().is_empty());
}

#[tokio::test]
async fn the_read_only_community_cannot_write() {
    let agent = agent();
    let d = SnmpDriver::model(
        &APC_MASTERSWITCH,
        &config(&agent, json!({"community": "public"})),
    )
    .unwrap();
    d.ports().await.unwrap();
    let err = d.set_state("1", PortState::Off).await.unwrap_err();
    assert!(matches!(err, PduError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("SNMP SET"), "{err}");
    assert_eq!(agent.integer(APC_MASTERSWITCH.status, 1), Some(1));
}

#[tokio::test]
async fn an_agent_that_stops_answering_times_out_then_recovers() {
    let agent = agent();
    let d = SnmpDriver::model(&APC_MASTERSWITCH, &config(&agent, json!({}))).unwrap();
    d.ports().await.unwrap();
    agent.pause();
    let t = Instant::now();
    let err = d.get_state("1").await.unwrap_err();
    assert!(matches!(err, PduError::Timeout { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    agent.resume();
    // A fresh session: no stale reply is taken for the new answer.
    let mut state = None;
    for _ in 0..20 {
        if let Ok(s) = d.get_state("1").await {
            state = Some(s);
            break;
        }
    }
    assert_eq!(state, Some(PortState::On));
}

#[tokio::test]
async fn a_paused_agent_puts_the_pdu_in_error_and_never_hangs_a_command() {
    let agent = agent();
    let d = SnmpDriver::model(&APC_MASTERSWITCH, &config(&agent, json!({"timeout": 0.3}))).unwrap();
    let pdu = PduHandle::spawn(
        "apc",
        Box::new(d),
        Vec::new(),
        PduOptions {
            poll_interval: Duration::from_millis(100),
            ..options()
        },
    );
    pdu.refresh().await.unwrap();
    agent.pause();
    let t = Instant::now();
    let err = pdu.set_port_state("2", PortState::Off).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(matches!(err, PduError::Failed { attempts: 3, .. }), "{err}");
    let snap = pdu.snapshot();
    assert_eq!(snap.state, vivian_core::pdu::PduStatus::Error);
    assert!(snap.error.unwrap().contains("timed out"));
    agent.resume();
    let mut rx = pdu.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.state == vivian_core::pdu::PduStatus::Ok),
    )
    .await
    .expect("the PDU recovers once the agent answers")
    .unwrap();
    pdu.stop().await;
}

#[tokio::test]
async fn an_unexpected_value_is_a_clear_error() {
    let agent = agent();
    let d = SnmpDriver::model(&APC_MASTERSWITCH, &config(&agent, json!({}))).unwrap();
    d.ports().await.unwrap();
    agent.set_value(APC_MASTERSWITCH.status, 5, "integer", json!(7));
    let err = d.get_state("5").await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PduError::Protocol(_)), "{text}");
    assert!(text.contains("reads 7"), "{text}");
    agent.set_value(APC_MASTERSWITCH.status, 5, "string", json!("on"));
    let text = d.get_state("5").await.unwrap_err().to_string();
    assert!(text.contains("expected an INTEGER"), "{text}");
    // The other ports still read fine; the poll of all ports fails loudly.
    assert_eq!(d.get_state("4").await.unwrap(), PortState::On);
    let ports = d.ports().await.unwrap();
    assert!(d.get_states(&ports).await.is_err());
    // A value the agent refuses to store.
    let err = d.set_state("9", PortState::Off).await.unwrap_err();
    assert!(err.to_string().contains("no port"), "{err}");
}
