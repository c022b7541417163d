//! An out-of-tree PDU driver for Vivian: a relay board switched over
//! HTTP/JSON. It shows the whole path a third-party driver author takes:
//!
//! 1. implement [`vivian_core::pdu::PduDriver`] ([`HttpRelayDriver`]);
//! 2. give it a constructor from the MarsDB `config` map
//!    ([`HttpRelayDriver::from_config`]) that validates and does no I/O;
//! 3. register it under a MarsDB `driver` name ([`register`]);
//! 4. the farm's MarsDB then uses it like a stock driver:
//!
//! ```yaml
//! pdus:
//!   bench-relays:
//!     driver: http_relay
//!     config: {url: "http://10.0.0.7", timeout: 2}
//!     reserved_port_ids: ["3"]
//! ```
//!
//! The embedding program builds its registry with the stock drivers plus
//! this one (see `tests/from_marsdb.rs` for the complete program):
//!
//! ```
//! let mut registry = vivian_core::pdu::DriverRegistry::new();
//! pdu_http_relay::register(&mut registry);
//! assert!(registry.contains("http_relay"));
//! ```
//!
//! # The board's HTTP API
//!
//! | request | answer |
//! |---|---|
//! | `GET /relays` | `{"relays": [{"name": "fan", "on": true}, …]}` |
//! | `GET /relays/<i>` | `{"name": "fan", "on": true}` |
//! | `POST /relays/<i>` with `{"on": false}` | `{"name": "fan", "on": false}` |
//!
//! Relays are numbered from 0; Vivian's port ids are those numbers.
//! The board has no reboot: Vivian does REBOOT as OFF, wait, ON.

#![warn(missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use vivian_core::pdu::{DriverRegistry, PduDriver, PduError, PortInfo, PortState};

/// The MarsDB `driver` name of this driver.
pub const DRIVER_NAME: &str = "http_relay";

/// One relay as the board describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relay {
    /// The relay's name (the port label).
    pub name: String,
    /// Whether the relay is closed (power ON).
    pub on: bool,
}

/// `GET /relays`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayList {
    /// The relays, in order.
    pub relays: Vec<Relay>,
}

/// The MarsDB config of the driver.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Base URL of the board.
    url: String,
    /// Timeout of one HTTP request in seconds (default 2).
    #[serde(default = "default_timeout")]
    timeout: f64,
}

fn default_timeout() -> f64 {
    2.0
}

/// The driver: one HTTP request per operation.
#[derive(Clone, Debug)]
pub struct HttpRelayDriver {
    base: String,
    timeout: Duration,
    client: reqwest::Client,
}

impl HttpRelayDriver {
    /// Builds the driver from its MarsDB config (`url`, optional `timeout`).
    /// Errors name the offending key; nothing is sent to the board yet.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, PduError> {
        let c: Config = serde_json::from_value(config.clone())
            .map_err(|e| PduError::config(format!("http_relay: {e}")))?;
        if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
            return Err(PduError::config(format!(
                "\"url\" must start with http:// or https://, not \"{}\"",
                c.url
            )));
        }
        let timeout = Duration::try_from_secs_f64(c.timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| PduError::config("\"timeout\" must be a positive number of seconds"))?;
        // vivian_core::http_client: the client still works over http:// on
        // a machine without CA certificates (and says so in the log).
        let (client, _) = vivian_core::http_client::build_with("pdu-http-relay", || {
            vivian_core::http_client::builder().timeout(timeout)
        })
        .map_err(|e| PduError::config(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: c.url.trim_end_matches('/').to_string(),
            timeout,
            client,
        })
    }

    fn relay_url(&self, port_id: &str) -> Result<String, PduError> {
        let n: u32 = port_id
            .parse()
            .map_err(|_| PduError::Protocol(format!("no relay \"{port_id}\"")))?;
        Ok(format!("{}/relays/{n}", self.base))
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, PduError> {
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                PduError::Timeout {
                    operation: format!("HTTP request to {}", self.base),
                    timeout: self.timeout,
                }
            } else {
                PduError::Transport(e.to_string())
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(PduError::Protocol(format!(
                "{} answered HTTP {status}",
                response.url()
            )));
        }
        response
            .json::<T>()
            .await
            .map_err(|e| PduError::Protocol(format!("unexpected JSON: {e}")))
    }
}

#[async_trait]
impl PduDriver for HttpRelayDriver {
    async fn ports(&self) -> Result<Vec<PortInfo>, PduError> {
        let list: RelayList = self
            .json(self.client.get(format!("{}/relays", self.base)))
            .await?;
        Ok(list
            .relays
            .into_iter()
            .enumerate()
            .map(|(i, r)| PortInfo::new(i.to_string(), Some(r.name)))
            .collect())
    }

    async fn get_state(&self, port_id: &str) -> Result<PortState, PduError> {
        let relay: Relay = self.json(self.client.get(self.relay_url(port_id)?)).await?;
        Ok(if relay.on {
            PortState::On
        } else {
            PortState::Off
        })
    }

    async fn set_state(&self, port_id: &str, state: PortState) -> Result<(), PduError> {
        let on = match state {
            PortState::On => true,
            PortState::Off => false,
            s => return Err(PduError::Unsupported(format!("{s} on an HTTP relay"))),
        };
        let relay: Relay = self
            .json(
                self.client
                    .post(self.relay_url(port_id)?)
                    .json(&serde_json::json!({ "on": on })),
            )
            .await?;
        if relay.on != on {
            return Err(PduError::Protocol(format!(
                "relay {port_id} stayed {}",
                if relay.on { "ON" } else { "OFF" }
            )));
        }
        Ok(())
    }

    /// Relay boards switch mains power: keep the stock 30 s default.
    fn default_min_off_time(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// Registers `http_relay` in a registry.
pub fn register(registry: &mut DriverRegistry) {
    registry.register(DRIVER_NAME, |config| {
        Ok(Box::new(HttpRelayDriver::from_config(config)?) as Box<dyn PduDriver>)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        for (config, key) in [
            (serde_json::json!({}), "url"),
            (serde_json::json!({"url": "ftp://x"}), "url"),
            (
                serde_json::json!({"url": "http://x", "timeout": 0}),
                "timeout",
            ),
            (
                serde_json::json!({"url": "http://x", "colour": 1}),
                "colour",
            ),
        ] {
            let e = HttpRelayDriver::from_config(&config)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }
}
