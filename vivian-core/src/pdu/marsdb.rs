//! Glue between MarsDB and the PDUs: specs from the database, the
//! validation hook that refuses unknown drivers and bad driver configs, and
//! the DUTs' `pdu_off_delay` as their ports' minimum off time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::marsdb::{Database, Pdu, ValidationError, Validator};

use super::{DriverRegistry, PduError, PduManager, PduSpec};

impl PduSpec {
    /// The spec of the MarsDB PDU `name`.
    pub fn from_marsdb(name: &str, pdu: &Pdu) -> Self {
        PduSpec {
            name: name.to_string(),
            driver: pdu.driver.clone(),
            config: serde_json::Value::Object(pdu.config.clone()),
            reserved_port_ids: pdu
                .reserved_port_ids
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            hidden: false,
        }
    }
}

/// The specs of every PDU of a database, in file order.
pub fn specs_from_marsdb(db: &Database) -> Vec<PduSpec> {
    db.pdus
        .iter()
        .map(|(name, pdu)| PduSpec::from_marsdb(name, pdu))
        .collect()
}

/// The minimum off time of every port a DUT uses (its `pdu_off_delay`), by
/// PDU name then port id.
pub fn min_off_times_from_marsdb(db: &Database) -> HashMap<String, HashMap<String, Duration>> {
    let mut out: HashMap<String, HashMap<String, Duration>> = HashMap::new();
    for dut in db.duts.values() {
        if let (Some(pdu), Some(port)) = (&dut.pdu, &dut.pdu_port_id) {
            if let Ok(delay) = Duration::try_from_secs_f64(dut.pdu_off_delay) {
                out.entry(pdu.clone())
                    .or_default()
                    .insert(port.as_str().to_string(), delay);
            }
        }
    }
    out
}

impl DriverRegistry {
    /// A MarsDB [`Validator`] refusing a PDU whose driver is not registered
    /// (error at `pdus.<name>.driver`, naming the PDU and the known drivers)
    /// or whose config the driver refuses (at `pdus.<name>.config`).
    /// Building a driver does no I/O, so this is cheap.
    pub fn marsdb_validator(self: &Arc<Self>) -> Validator {
        let registry = self.clone();
        Arc::new(move |db: &Database| {
            for (name, pdu) in &db.pdus {
                if let Err(e) = registry.check(name, &pdu.driver) {
                    return Err(ValidationError::new(
                        format!("pdus.{name}.driver"),
                        e.to_string(),
                    ));
                }
                let config = serde_json::Value::Object(pdu.config.clone());
                if let Err(e) = registry.build(name, &pdu.driver, &config) {
                    return Err(ValidationError::new(
                        format!("pdus.{name}.config"),
                        e.to_string(),
                    ));
                }
            }
            Ok(())
        })
    }
}

impl PduManager {
    /// [`PduManager::sync`] with the PDUs of a MarsDB database, then gives
    /// every port used by a DUT that DUT's `pdu_off_delay` as minimum off
    /// time (other ports keep their driver's default).
    pub async fn sync_marsdb(&self, db: &Database) -> Vec<PduError> {
        let errors = self.sync(specs_from_marsdb(db)).await;
        let mut delays = min_off_times_from_marsdb(db);
        for name in self.names() {
            if let Some(handle) = self.get(&name) {
                handle
                    .replace_min_off_times(delays.remove(&name).unwrap_or_default())
                    .await;
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marsdb::{Dut, PortId};
    use crate::pdu::{dummy::DummyDriver, PduOptions, PduStatus};

    fn db() -> Database {
        let mut db = Database::new();
        let mut config = serde_json::Map::new();
        config.insert("ports".into(), serde_json::json!(["a", "b", "c"]));
        let mut pdu = Pdu::new("dummy", config);
        pdu.reserved_port_ids.insert(PortId::new("2"));
        db.pdus.insert("rack".into(), pdu);
        let mac = "52:54:00:11:22:33".parse().unwrap();
        let mut dut = Dut::new(mac, "gfx9", "10.0.0.9".parse().unwrap(), vec![]);
        dut.pdu = Some("rack".into());
        dut.pdu_port_id = Some(PortId::new("1"));
        dut.pdu_off_delay = 4.5;
        db.duts.insert(mac, dut);
        db
    }

    fn registry() -> Arc<DriverRegistry> {
        let mut r = DriverRegistry::new();
        DummyDriver::register(&mut r);
        Arc::new(r)
    }

    #[test]
    fn the_validator_names_the_pdu_and_the_field() {
        let v = registry().marsdb_validator();
        let mut db = db();
        assert!(v(&db).is_ok());
        db.pdus.get_mut("rack").unwrap().driver = "apc".into();
        let e = v(&db).unwrap_err();
        assert_eq!(e.path, "pdus.rack.driver");
        assert!(e.to_string().contains("unknown driver \"apc\""), "{e}");
        let pdu = db.pdus.get_mut("rack").unwrap();
        pdu.driver = "dummy".into();
        pdu.config.insert("ports".into(), serde_json::json!(7));
        let e = v(&db).unwrap_err();
        assert_eq!(e.path, "pdus.rack.config");
        assert!(e.to_string().contains("\"ports\""), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_manager_takes_pdus_reservations_and_off_delays_from_marsdb() {
        let m = PduManager::new(registry(), PduOptions::default());
        assert!(m.sync_marsdb(&db()).await.is_empty());
        let pdu = m.get("rack").unwrap();
        pdu.refresh().await.unwrap();
        let snap = pdu.snapshot();
        assert_eq!(snap.state, PduStatus::Ok);
        assert_eq!(snap.ports["1"].min_off_time, 4.5);
        assert_eq!(snap.ports["0"].min_off_time, 30.0);
        assert!(snap.ports["2"].reserved);
        // The DUT leaves: its port goes back to the driver's default.
        let mut db = db();
        db.duts.clear();
        m.sync_marsdb(&db).await;
        pdu.refresh().await.unwrap();
        assert_eq!(pdu.snapshot().ports["1"].min_off_time, 30.0);
    }
}
