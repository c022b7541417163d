//! The `dummy` driver: in-memory ports, for farms without real PDUs and for
//! tests.
//!
//! MarsDB config: `ports: [label, …]`. Port ids are `"0"`..`"n-1"`, every
//! port starts ON (as in the reference).
//!
//! Built directly with [`DummyDriver::with_control`], it also hands out a
//! [`DummyControl`] through which a test sees the writes and makes the
//! driver fail or hang.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{DriverRegistry, PduDriver, PduError, PortInfo, PortState};

#[derive(Debug, Default)]
struct Inner {
    labels: Vec<String>,
    states: Vec<PortState>,
    writes: Vec<(String, PortState)>,
    reads: u64,
    fail_next: u32,
    fail_always: bool,
    hang: bool,
}

/// The in-memory `dummy` driver.
#[derive(Debug, Clone)]
pub struct DummyDriver {
    inner: Arc<Mutex<Inner>>,
    native_reboot: bool,
    min_off_time: Duration,
}

/// Test control of a [`DummyDriver`]: inspect writes, inject failures.
#[derive(Debug, Clone)]
pub struct DummyControl {
    inner: Arc<Mutex<Inner>>,
}

impl DummyDriver {
    /// The driver's MarsDB name.
    pub const NAME: &'static str = "dummy";

    /// A dummy PDU with these port labels, every port ON.
    pub fn new(labels: Vec<String>) -> Self {
        let states = vec![PortState::On; labels.len()];
        Self {
            inner: Arc::new(Mutex::new(Inner {
                labels,
                states,
                ..Default::default()
            })),
            native_reboot: false,
            min_off_time: Duration::from_secs(30),
        }
    }

    /// A dummy PDU and its test control.
    pub fn with_control(labels: Vec<String>) -> (Self, DummyControl) {
        let driver = Self::new(labels);
        let control = DummyControl {
            inner: driver.inner.clone(),
        };
        (driver, control)
    }

    /// Makes the driver claim a native REBOOT (a REBOOT write leaves the
    /// port ON and is recorded as a REBOOT write).
    pub fn with_native_reboot(mut self, native: bool) -> Self {
        self.native_reboot = native;
        self
    }

    /// Changes the driver's default minimum off time (30 s otherwise).
    pub fn with_default_min_off_time(mut self, min_off_time: Duration) -> Self {
        self.min_off_time = min_off_time;
        self
    }

    /// Builds the driver from its MarsDB config (`ports: [labels]`).
    pub fn from_config(config: &serde_json::Value) -> Result<Self, PduError> {
        let ports = match config.get("ports") {
            None | Some(serde_json::Value::Null) => return Ok(Self::new(Vec::new())),
            Some(p) => p,
        };
        let list = ports
            .as_array()
            .ok_or_else(|| PduError::config("\"ports\" must be a list of port labels"))?;
        let labels = list
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                _ => Err(PduError::config(format!(
                    "\"ports\"[{i}] must be a label (a string), not {v}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(labels))
    }

    /// Registers `dummy` in a registry.
    pub fn register(registry: &mut DriverRegistry) {
        registry.register(Self::NAME, |config| {
            Ok(Box::new(Self::from_config(config)?) as Box<dyn PduDriver>)
        });
    }

    fn index(inner: &Inner, port_id: &str) -> Result<usize, PduError> {
        port_id
            .parse::<usize>()
            .ok()
            .filter(|i| *i < inner.states.len())
            .ok_or_else(|| PduError::Protocol(format!("no port \"{port_id}\"")))
    }

    /// Applies failure injection; returns true if the call must hang.
    fn check_faults(&self) -> Result<bool, PduError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.hang {
            return Ok(true);
        }
        if inner.fail_always {
            return Err(PduError::Transport("dummy PDU set to fail".into()));
        }
        if inner.fail_next > 0 {
            inner.fail_next -= 1;
            return Err(PduError::Transport("dummy PDU injected failure".into()));
        }
        Ok(false)
    }

    async fn faults(&self) -> Result<(), PduError> {
        if self.check_faults()? {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[async_trait]
impl PduDriver for DummyDriver {
    async fn ports(&self) -> Result<Vec<PortInfo>, PduError> {
        self.faults().await?;
        let inner = self.inner.lock().unwrap();
        Ok(inner
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| PortInfo::new(i.to_string(), Some(l.clone())))
            .collect())
    }

    async fn get_state(&self, port_id: &str) -> Result<PortState, PduError> {
        self.faults().await?;
        let mut inner = self.inner.lock().unwrap();
        let i = Self::index(&inner, port_id)?;
        inner.reads += 1;
        Ok(inner.states[i])
    }

    async fn set_state(&self, port_id: &str, state: PortState) -> Result<(), PduError> {
        self.faults().await?;
        let mut inner = self.inner.lock().unwrap();
        let i = Self::index(&inner, port_id)?;
        let new = match state {
            PortState::On | PortState::Off => state,
            PortState::Reboot if self.native_reboot => PortState::On,
            _ => {
                return Err(PduError::InvalidState(format!(
                    "the dummy driver cannot set {state}"
                )))
            }
        };
        inner.states[i] = new;
        inner.writes.push((port_id.to_string(), state));
        Ok(())
    }

    fn supports_reboot(&self) -> bool {
        self.native_reboot
    }

    fn default_min_off_time(&self) -> Duration {
        self.min_off_time
    }
}

impl DummyControl {
    /// Every write so far, in order: (port id, state written).
    pub fn writes(&self) -> Vec<(String, PortState)> {
        self.inner.lock().unwrap().writes.clone()
    }

    /// How many single-port reads were made.
    pub fn reads(&self) -> u64 {
        self.inner.lock().unwrap().reads
    }

    /// The current state of a port (as if read on the device's display).
    pub fn state(&self, port_id: &str) -> Option<PortState> {
        let inner = self.inner.lock().unwrap();
        port_id
            .parse::<usize>()
            .ok()
            .and_then(|i| inner.states.get(i).copied())
    }

    /// Changes a port's state behind Vivian's back (someone pressed a
    /// button on the PDU).
    pub fn force_state(&self, port_id: &str, state: PortState) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(s) = port_id
            .parse::<usize>()
            .ok()
            .and_then(|i| inner.states.get_mut(i))
        {
            *s = state;
        }
    }

    /// Changes a port's label.
    pub fn set_label(&self, port_id: &str, label: &str) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(l) = port_id
            .parse::<usize>()
            .ok()
            .and_then(|i| inner.labels.get_mut(i))
        {
            *l = label.to_string();
        }
    }

    /// Makes the next `n` driver calls fail.
    pub fn fail_next(&self, n: u32) {
        self.inner.lock().unwrap().fail_next = n;
    }

    /// Makes every driver call fail (or work again).
    pub fn fail_always(&self, fail: bool) {
        self.inner.lock().unwrap().fail_always = fail;
    }

    /// Makes every driver call hang forever (or answer again).
    pub fn hang(&self, hang: bool) {
        self.inner.lock().unwrap().hang = hang;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn config_ports_become_zero_based_ports_all_on() {
        let d = DummyDriver::from_config(&serde_json::json!({"ports": ["a", "b", 3]})).unwrap();
        let ports = d.ports().await.unwrap();
        assert_eq!(
            ports,
            vec![
                PortInfo::new("0", Some("a".into())),
                PortInfo::new("1", Some("b".into())),
                PortInfo::new("2", Some("3".into())),
            ]
        );
        for p in &ports {
            assert_eq!(d.get_state(&p.id).await.unwrap(), PortState::On);
        }
        d.set_state("1", PortState::Off).await.unwrap();
        assert_eq!(d.get_state("1").await.unwrap(), PortState::Off);
        assert!(d.get_state("3").await.is_err());
        assert!(d.set_state("0", PortState::Reboot).await.is_err());
    }

    #[test]
    fn bad_config_names_the_key() {
        let e = DummyDriver::from_config(&serde_json::json!({"ports": [{"x": 1}]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"ports\"[0]"), "{e}");
    }
}
