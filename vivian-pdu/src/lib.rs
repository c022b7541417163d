//! # vivian-pdu
//!
//! Vivian's stock PDU drivers, implementing
//! [`vivian_core::pdu::PduDriver`]:
//!
//! | MarsDB `driver` | module |
//! |---|---|
//! | `apc_masterswitch` | [`snmp`] ([`snmp::APC_MASTERSWITCH`]) |
//! | `cyberpower_pdu41004` | [`snmp`] ([`snmp::CYBERPOWER_PDU41004`]) |
//! | `cyberpower_pdu15swhviec12atnet` | [`snmp`] ([`snmp::CYBERPOWER_PDU15SWHVIEC12ATNET`]) |
//! | `snmp` | [`snmp`] (generic, OIDs and values from the config) |
//! | `vpdu` | [`vpdu`] (the virtual PDU byte protocol) |
//! | `dummy` | [`dummy`] (in memory) |
//!
//! ```
//! let registry = vivian_pdu::default_registry();
//! assert!(registry.contains("apc_masterswitch"));
//! ```
//!
//! Drivers only talk to the device; the port semantics (reservations,
//! minimum off time, retries, timeouts, one command at a time) are applied
//! by [`vivian_core::pdu::PduHandle`].

#![warn(missing_docs)]

pub mod snmp;
pub mod test_peers;
pub mod vpdu;

/// The `dummy` driver (defined in `vivian-core`, which needs it for its own
/// tests).
pub mod dummy {
    pub use vivian_core::pdu::dummy::*;
}

use vivian_core::pdu::{DriverRegistry, PduDriver};

/// The names of the drivers [`register_builtin`] adds.
pub const BUILTIN_DRIVERS: [&str; 6] = [
    "apc_masterswitch",
    "cyberpower_pdu41004",
    "cyberpower_pdu15swhviec12atnet",
    snmp::GENERIC_NAME,
    vpdu::NAME,
    dummy::DummyDriver::NAME,
];

/// Adds the stock drivers to a registry (replacing same-named ones).
pub fn register_builtin(registry: &mut DriverRegistry) {
    for model in snmp::MODELS {
        registry.register(model.name, move |config| {
            Ok(Box::new(snmp::SnmpDriver::model(&model, config)?) as Box<dyn PduDriver>)
        });
    }
    registry.register(snmp::GENERIC_NAME, |config| {
        Ok(Box::new(snmp::SnmpDriver::generic(config)?) as Box<dyn PduDriver>)
    });
    registry.register(vpdu::NAME, |config| {
        Ok(Box::new(vpdu::VpduDriver::from_config(config)?) as Box<dyn PduDriver>)
    });
    dummy::DummyDriver::register(registry);
}

/// A registry holding the stock drivers.
pub fn default_registry() -> DriverRegistry {
    let mut registry = DriverRegistry::new();
    register_builtin(&mut registry);
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_is_registered() {
        let r = default_registry();
        assert_eq!(r.names().count(), BUILTIN_DRIVERS.len());
        for name in BUILTIN_DRIVERS {
            assert!(r.contains(name), "{name}");
        }
        let d = r
            .build("v", "vpdu", &serde_json::json!({"hostname": "127.0.0.1:1"}))
            .unwrap();
        assert_eq!(
            d.default_min_off_time(),
            std::time::Duration::from_millis(100)
        );
        let d = r
            .build(
                "a",
                "apc_masterswitch",
                &serde_json::json!({"hostname": "127.0.0.1"}),
            )
            .unwrap();
        assert_eq!(d.default_min_off_time(), std::time::Duration::from_secs(30));
        assert!(d.supports_reboot());
        let e = r
            .build("a", "apc_masterswitch", &serde_json::json!({}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"a\"") && e.contains("hostname"), "{e}");
    }
}
