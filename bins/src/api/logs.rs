//! The `logs_endpoint` of the DUT objects, from a console service (SALAD).
//!
//! The reference executor asks SALAD (`GET {SALAD_URL}/api/v1/machine/<id>`)
//! for every DUT object it renders, which makes a read wait for another
//! service. [`ConsoleLogs`] instead keeps the endpoints in memory: it lists
//! SALAD's machines at start-up, whenever MarsDB changes and every
//! `refresh` interval (one request; DUTs SALAD does not list yet are asked
//! for once each, which creates them in SALAD as the reference's request
//! does), and reads answer from that. While SALAD cannot be reached the
//! DUT objects have no `logs_endpoint`, as in the reference.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use vivian_core::console::{ConsoleError, ConsoleSource};
use vivian_core::marsdb::{MacAddr, MarsDb};

use super::hooks::{LogsEndpoint, LogsSource};

/// Console requests in flight at once while asking for unlisted DUTs.
const CONCURRENCY: usize = 8;

/// The console log endpoints of the DUTs, followed from a
/// [`ConsoleSource`] (a [`vivian_salad::SaladClient`] in the executor).
pub struct ConsoleLogs {
    source: Arc<dyn ConsoleSource>,
    host: String,
    ports: RwLock<HashMap<MacAddr, u16>>,
    version: AtomicU64,
    reachable: RwLock<Option<bool>>,
}

impl ConsoleLogs {
    /// Endpoints of `source`'s machines, announced with `host` (the host
    /// clients connect to: the host of `SALAD_URL` in the executor).
    pub fn new(source: Arc<dyn ConsoleSource>, host: impl Into<String>) -> Arc<Self> {
        Arc::new(ConsoleLogs {
            source,
            host: host.into(),
            ports: RwLock::new(HashMap::new()),
            version: AtomicU64::new(0),
            reachable: RwLock::new(None),
        })
    }

    /// Asks the console service for the machines of `duts` now; returns how
    /// many of them have an endpoint. When the service cannot be reached,
    /// every endpoint is dropped and the error returned.
    pub async fn refresh(&self, duts: &[MacAddr]) -> Result<usize, ConsoleError> {
        let listed = match self.source.machines().await {
            Ok(l) => l,
            Err(e) => {
                self.set_reachable(false, Some(&e));
                self.replace(HashMap::new());
                return Err(e);
            }
        };
        self.set_reachable(true, None);
        let mut by_id: HashMap<String, u16> = listed
            .into_iter()
            .map(|m| (m.id, m.tcp_port_logs))
            .collect();
        let missing: Vec<String> = duts
            .iter()
            .map(|m| m.to_string())
            .filter(|id| !by_id.contains_key(id))
            .collect();
        let asked: Vec<(String, Result<u16, ConsoleError>)> = futures::stream::iter(missing)
            .map(|id| async move {
                let r = self.source.machine(&id).await.map(|m| m.tcp_port_logs);
                (id, r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (id, r) in asked {
            match r {
                Ok(port) => {
                    by_id.insert(id, port);
                }
                Err(e) => {
                    tracing::debug!(target: "vivian::http", dut = %id, error = %e, "no console log endpoint");
                }
            }
        }
        let ports: HashMap<MacAddr, u16> = duts
            .iter()
            .filter_map(|m| Some((*m, *by_id.get(&m.to_string())?)))
            .collect();
        let n = ports.len();
        self.replace(ports);
        Ok(n)
    }

    fn set_reachable(&self, ok: bool, e: Option<&ConsoleError>) {
        let mut r = self.reachable.write().unwrap_or_else(|e| e.into_inner());
        if *r != Some(ok) {
            match e {
                Some(e) => tracing::warn!(
                    "console service {} unreachable, the DUTs have no logs_endpoint until it answers: {e}",
                    self.source.name()
                ),
                None => tracing::info!(
                    "console service {} answers: the DUTs' logs_endpoint follow it",
                    self.source.name()
                ),
            }
            *r = Some(ok);
        }
    }

    fn replace(&self, ports: HashMap<MacAddr, u16>) {
        let mut cur = self.ports.write().unwrap_or_else(|e| e.into_inner());
        if *cur != ports {
            *cur = ports;
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Refreshes at once, then whenever `db` changes and every `every`,
    /// until the task is aborted.
    pub fn spawn(
        self: &Arc<Self>,
        db: Arc<dyn MarsDb>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut rx = db.subscribe();
            loop {
                let duts: Vec<MacAddr> = rx.borrow_and_update().duts.keys().copied().collect();
                let _ = me.refresh(&duts).await;
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep(every) => {}
                }
            }
        })
    }
}

impl LogsSource for ConsoleLogs {
    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn logs_endpoint(&self, id: &MacAddr) -> Option<LogsEndpoint> {
        let port = *self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)?;
        Some(LogsEndpoint {
            host: self.host.clone(),
            port,
        })
    }
}
