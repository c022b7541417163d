//! The registry of PDU drivers, keyed by the MarsDB `driver` name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::{PduDriver, PduError};

/// A driver constructor: builds a driver from the MarsDB `config` map of a
/// PDU. It validates the configuration (returning [`PduError::Config`] with a
/// message naming the bad key) and does no I/O.
pub type DriverConstructor =
    Arc<dyn Fn(&serde_json::Value) -> Result<Box<dyn PduDriver>, PduError> + Send + Sync>;

/// Driver constructors by MarsDB `driver` name.
///
/// `vivian_pdu::register_builtin` adds the stock drivers; a third-party
/// crate adds its own with [`DriverRegistry::register`], without touching
/// Vivian:
///
/// ```
/// use vivian_core::pdu::{DriverRegistry, dummy::DummyDriver};
///
/// let mut registry = DriverRegistry::new();
/// registry.register("my_dummy", |config| {
///     let labels = config["labels"].as_array().map(|a| a.len()).unwrap_or(1);
///     let labels = (0..labels).map(|i| format!("outlet {i}")).collect();
///     Ok(Box::new(DummyDriver::new(labels)))
/// });
/// assert!(registry.contains("my_dummy"));
/// let driver = registry.build("pdu1", "my_dummy", &serde_json::json!({})).unwrap();
/// # drop(driver);
/// ```
#[derive(Clone, Default)]
pub struct DriverRegistry {
    drivers: BTreeMap<String, DriverConstructor>,
}

impl fmt::Debug for DriverRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverRegistry")
            .field("drivers", &self.drivers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DriverRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the constructor of the driver `name`.
    /// Returns true if a driver of that name was replaced.
    pub fn register<F>(&mut self, name: impl Into<String>, constructor: F) -> bool
    where
        F: Fn(&serde_json::Value) -> Result<Box<dyn PduDriver>, PduError> + Send + Sync + 'static,
    {
        self.drivers
            .insert(name.into(), Arc::new(constructor))
            .is_some()
    }

    /// Whether a driver of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.drivers.contains_key(name)
    }

    /// The registered driver names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.drivers.keys().map(String::as_str)
    }

    /// Checks that the driver of the PDU `pdu` exists: the error names the
    /// PDU, the unknown driver and the known ones (for MarsDB validation).
    pub fn check(&self, pdu: &str, driver: &str) -> Result<(), PduError> {
        if self.contains(driver) {
            Ok(())
        } else {
            Err(PduError::UnknownDriver {
                pdu: pdu.to_string(),
                driver: driver.to_string(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })
        }
    }

    /// Builds the driver of the PDU `pdu`. Errors name the PDU and driver.
    pub fn build(
        &self,
        pdu: &str,
        driver: &str,
        config: &serde_json::Value,
    ) -> Result<Box<dyn PduDriver>, PduError> {
        self.check(pdu, driver)?;
        (self.drivers[driver])(config).map_err(|e| PduError::Build {
            pdu: pdu.to_string(),
            driver: driver.to_string(),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::dummy::DummyDriver;

    #[test]
    fn unknown_driver_error_names_the_pdu_and_the_known_drivers() {
        let mut registry = DriverRegistry::new();
        DummyDriver::register(&mut registry);
        let err = registry
            .build("rack-1", "apc", &serde_json::json!({}))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.contains("\"rack-1\""), "{text}");
        assert!(text.contains("\"apc\""), "{text}");
        assert!(text.contains("dummy"), "{text}");
        assert!(registry.check("rack-1", "dummy").is_ok());
    }

    #[test]
    fn constructor_errors_name_pdu_and_driver() {
        let mut registry = DriverRegistry::new();
        DummyDriver::register(&mut registry);
        let err = registry
            .build("rack-2", "dummy", &serde_json::json!({"ports": "nope"}))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("rack-2") && err.contains("dummy") && err.contains("ports"),
            "{err}"
        );
    }

    #[test]
    fn third_party_drivers_replace_or_add() {
        let mut registry = DriverRegistry::new();
        assert!(!registry.register("x", |_| Ok(Box::new(DummyDriver::new(vec![])))));
        assert!(registry.register("x", |_| Ok(Box::new(DummyDriver::new(vec![])))));
        assert_eq!(registry.names().collect::<Vec<_>>(), vec!["x"]);
    }
}
