//! One PDU in service: the task that owns its driver, and the handle to it.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use chrono::{DateTime, Utc};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{PduDriver, PduError, PortInfo, PortState};

/// Tuning of a PDU's task. The defaults are those of the reference.
#[derive(Clone, Debug)]
pub struct PduOptions {
    /// Interval of the background poll of every port's state (1 s).
    pub poll_interval: Duration,
    /// Whether to poll at all (MarsDB `hidden` PDUs are not polled).
    pub poll: bool,
    /// Timeout of every single driver call (10 s).
    pub command_timeout: Duration,
    /// Attempts of a command before it fails (3).
    pub attempts: u32,
    /// Wait before the second attempt; doubled before each further one (1 s).
    pub retry_backoff: Duration,
    /// Consecutive failed polls after which the PDU is reported in error
    /// and its ports' states as UNKNOWN (3).
    pub error_after_poll_failures: u32,
    /// Interval between attempts to list the ports of a PDU that could not
    /// be initialised (15 s).
    pub init_retry_interval: Duration,
    /// The port list (and labels) is read again every this many polls (60).
    pub relist_every_polls: u32,
}

impl Default for PduOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            poll: true,
            command_timeout: Duration::from_secs(10),
            attempts: 3,
            retry_backoff: Duration::from_secs(1),
            error_after_poll_failures: 3,
            init_retry_interval: Duration::from_secs(15),
            relist_every_polls: 60,
        }
    }
}

/// The state of a PDU's task, as shown by the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PduStatus {
    /// The task is created and has not started yet.
    Created,
    /// The ports are being listed for the first time.
    Initializing,
    /// The PDU keeps failing (or its driver could not be built); see `error`.
    Error,
    /// The task has stopped (the PDU was removed).
    Stopped,
    /// The PDU answers.
    Ok,
}

/// A port as shown by the API (`GET /api/v1/pdu/<name>/port/<id>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortSnapshot {
    /// The port's label on the PDU, if it has one.
    pub label: Option<String>,
    /// Minimum off time in seconds (the DUT's `pdu_off_delay`, else the
    /// driver's default).
    pub min_off_time: f64,
    /// Last known state.
    pub state: PortState,
    /// When the port was last seen or made OFF (RFC 3339, UTC).
    pub last_shutdown: Option<DateTime<Utc>>,
    /// When the port's state was last read (RFC 3339, UTC).
    pub last_polled: Option<DateTime<Utc>>,
    /// Whether the port is reserved (refuses changes).
    pub reserved: bool,
}

/// A PDU as shown by the API (`GET /api/v1/pdu/<name>`): the cached result
/// of the background poll, never waiting on the PDU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PduSnapshot {
    /// The ports by id, in the PDU's order.
    pub ports: IndexMap<String, PortSnapshot>,
    /// The task's state.
    pub state: PduStatus,
    /// The last error when `state` is ERROR.
    pub error: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, PduError>>;

enum Msg {
    Set {
        port: String,
        state: PortState,
        reply: Reply<()>,
        /// Set for a command coming back after waiting out the minimum off
        /// time: it is dropped if a later command was given for the port.
        generation: Option<u64>,
    },
    Get {
        port: String,
        reply: Reply<PortState>,
    },
    Reserve {
        port: String,
        reserved: bool,
        reply: Reply<()>,
    },
    ReplaceReserved {
        ids: BTreeSet<String>,
    },
    MinOffTime {
        port: String,
        min_off_time: Option<Duration>,
        reply: Reply<()>,
    },
    ReplaceMinOffTimes {
        times: HashMap<String, Duration>,
    },
    Refresh {
        reply: Reply<()>,
    },
    Stop,
}

/// A handle to one PDU in service. Cheap to clone.
///
/// [`PduHandle::spawn`] starts the PDU's task, which owns the driver: it
/// lists the ports, polls their states every [`PduOptions::poll_interval`],
/// and runs the commands one at a time with the port semantics of the
/// [module documentation](super). The task ends when [`PduHandle::stop`] is
/// called or every handle is dropped.
#[derive(Clone)]
pub struct PduHandle {
    name: Arc<str>,
    tx: mpsc::Sender<Msg>,
    snapshot: watch::Receiver<PduSnapshot>,
}

impl std::fmt::Debug for PduHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PduHandle")
            .field("name", &self.name)
            .finish()
    }
}

impl PduHandle {
    /// Starts the task of the PDU `name` driven by `driver`, with the ports
    /// `reserved` reserved. Must be called within a Tokio runtime.
    pub fn spawn(
        name: impl Into<String>,
        driver: Box<dyn PduDriver>,
        reserved: impl IntoIterator<Item = String>,
        options: PduOptions,
    ) -> Self {
        Self::start(name.into(), Ok(Arc::from(driver)), reserved, options)
    }

    /// Starts a PDU whose driver could not be built: it shows in ERROR with
    /// `error`, and every command fails with it.
    pub fn spawn_failed(
        name: impl Into<String>,
        error: PduError,
        reserved: impl IntoIterator<Item = String>,
        options: PduOptions,
    ) -> Self {
        Self::start(name.into(), Err(error), reserved, options)
    }

    fn start(
        name: String,
        driver: Result<Arc<dyn PduDriver>, PduError>,
        reserved: impl IntoIterator<Item = String>,
        options: PduOptions,
    ) -> Self {
        let name: Arc<str> = Arc::from(name);
        let (tx, rx) = mpsc::channel(64);
        let (snap_tx, snap_rx) = watch::channel(PduSnapshot {
            ports: IndexMap::new(),
            state: PduStatus::Created,
            error: None,
        });
        let default_min_off = match &driver {
            Ok(d) => d.default_min_off_time(),
            Err(_) => Duration::from_secs(30),
        };
        let actor = Actor {
            name: name.clone(),
            driver,
            options,
            ports: IndexMap::new(),
            initialised: false,
            last_init_attempt: None,
            reserved: reserved.into_iter().collect(),
            min_off: HashMap::new(),
            default_min_off,
            status: PduStatus::Created,
            error: None,
            poll_failures: 0,
            polls_since_list: 0,
            tx: tx.downgrade(),
            snapshot: snap_tx,
        };
        let span = tracing::info_span!("pdu", name = %name);
        tokio::spawn(tracing::Instrument::instrument(actor.run(rx), span));
        Self {
            name,
            tx,
            snapshot: snap_rx,
        }
    }

    /// The PDU's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cached state of the PDU and its ports (never waits on the PDU).
    pub fn snapshot(&self) -> PduSnapshot {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees every new snapshot (for waiting on a change).
    pub fn subscribe(&self) -> watch::Receiver<PduSnapshot> {
        self.snapshot.clone()
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, PduError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| PduError::Stopped(self.name.to_string()))?;
        rx.await
            .map_err(|_| PduError::Stopped(self.name.to_string()))?
    }

    /// Sets a port to ON, OFF or REBOOT, with the port semantics: nothing is
    /// written if the port is already in that state; OFF→ON first waits out
    /// the port's minimum off time; a reserved port refuses. Returns once the
    /// PDU has accepted the write (after the whole OFF, wait, ON sequence of
    /// a REBOOT). The port may be given by id or, if no id matches, by its
    /// unique label.
    pub async fn set_port_state(&self, port: &str, state: PortState) -> Result<(), PduError> {
        self.request(|reply| Msg::Set {
            port: port.to_string(),
            state,
            reply,
            generation: None,
        })
        .await
    }

    /// Reads a port's state from the PDU now (through the task's queue, with
    /// retries), and updates the cached snapshot.
    pub async fn get_port_state(&self, port: &str) -> Result<PortState, PduError> {
        self.request(|reply| Msg::Get {
            port: port.to_string(),
            reply,
        })
        .await
    }

    /// Reserves or frees a port (in memory; persisting it in MarsDB is the
    /// caller's business).
    pub async fn set_reserved(&self, port: &str, reserved: bool) -> Result<(), PduError> {
        self.request(|reply| Msg::Reserve {
            port: port.to_string(),
            reserved,
            reply,
        })
        .await
    }

    /// Replaces the whole set of reserved port ids (MarsDB
    /// `reserved_port_ids` changed).
    pub async fn replace_reserved(&self, ids: impl IntoIterator<Item = String>) {
        let _ = self
            .tx
            .send(Msg::ReplaceReserved {
                ids: ids.into_iter().collect(),
            })
            .await;
    }

    /// Sets a port's minimum off time (the DUT's `pdu_off_delay`); `None`
    /// goes back to the driver's default.
    pub async fn set_min_off_time(
        &self,
        port: &str,
        min_off_time: Option<Duration>,
    ) -> Result<(), PduError> {
        self.request(|reply| Msg::MinOffTime {
            port: port.to_string(),
            min_off_time,
            reply,
        })
        .await
    }

    /// Replaces every port's minimum off time override at once (port id →
    /// time; ports not listed go back to the driver's default). Does not
    /// wait on the PDU, even one that was never initialised.
    pub async fn replace_min_off_times(&self, times: HashMap<String, Duration>) {
        let _ = self.tx.send(Msg::ReplaceMinOffTimes { times }).await;
    }

    /// Lists the ports again and polls their states now. Also the way to
    /// wait for the first initialisation: it fails with
    /// [`PduError::NotReady`] if the ports cannot be listed.
    pub async fn refresh(&self) -> Result<(), PduError> {
        self.request(|reply| Msg::Refresh { reply }).await
    }

    /// Stops the PDU's task (commands waiting in its queue fail with
    /// [`PduError::Stopped`]) and waits until it has stopped.
    pub async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
        let mut rx = self.snapshot.clone();
        let _ = rx.wait_for(|s| s.state == PduStatus::Stopped).await;
    }
}

struct Port {
    info: PortInfo,
    state: PortState,
    last_shutdown: Option<(Instant, DateTime<Utc>)>,
    last_polled: Option<DateTime<Utc>>,
    generation: u64,
}

impl Port {
    fn new(info: PortInfo) -> Self {
        Self {
            info,
            state: PortState::Unknown,
            last_shutdown: None,
            last_polled: None,
            generation: 0,
        }
    }

    /// Records a state read from the PDU. Seeing OFF when the port was not
    /// known OFF counts as a shutdown now (for the minimum off time).
    fn observe(&mut self, state: PortState) {
        if state == PortState::Off && (self.state != PortState::Off || self.last_shutdown.is_none())
        {
            self.last_shutdown = Some((Instant::now(), Utc::now()));
        }
        self.state = state;
        self.last_polled = Some(Utc::now());
    }
}

enum SetOutcome {
    Done,
    /// Come back after `delay` to switch the port ON.
    OnAfter(Duration),
}

struct Actor {
    name: Arc<str>,
    driver: Result<Arc<dyn PduDriver>, PduError>,
    options: PduOptions,
    ports: IndexMap<String, Port>,
    initialised: bool,
    last_init_attempt: Option<Instant>,
    reserved: BTreeSet<String>,
    min_off: HashMap<String, Duration>,
    default_min_off: Duration,
    status: PduStatus,
    error: Option<String>,
    poll_failures: u32,
    polls_since_list: u32,
    tx: mpsc::WeakSender<Msg>,
    snapshot: watch::Sender<PduSnapshot>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        if let Err(e) = &self.driver {
            self.status = PduStatus::Error;
            self.error = Some(e.to_string());
        } else {
            self.status = PduStatus::Initializing;
        }
        self.publish();
        if self.driver.is_ok() {
            self.init().await;
        }
        let mut ticker = tokio::time::interval(self.options.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    None | Some(Msg::Stop) => break,
                    Some(msg) => self.handle(msg).await,
                },
                _ = ticker.tick(), if self.options.poll && self.driver.is_ok() => {
                    self.poll().await;
                }
            }
        }
        self.status = PduStatus::Stopped;
        self.publish();
        debug!(pdu = %self.name, "PDU task stopped");
    }

    fn publish(&self) {
        let ports = self
            .ports
            .iter()
            .map(|(id, p)| {
                (
                    id.clone(),
                    PortSnapshot {
                        label: p.info.label.clone(),
                        min_off_time: self.min_off_time(id).as_secs_f64(),
                        state: p.state,
                        last_shutdown: p.last_shutdown.map(|(_, t)| t),
                        last_polled: p.last_polled,
                        reserved: self.reserved.contains(id),
                    },
                )
            })
            .collect();
        self.snapshot.send_replace(PduSnapshot {
            ports,
            state: self.status,
            error: self.error.clone(),
        });
    }

    fn min_off_time(&self, port: &str) -> Duration {
        self.min_off
            .get(port)
            .copied()
            .unwrap_or(self.default_min_off)
    }

    fn set_ok(&mut self) {
        if self.status != PduStatus::Ok {
            info!(pdu = %self.name, "PDU is OK");
        }
        self.status = PduStatus::Ok;
        self.error = None;
    }

    fn set_error(&mut self, error: &PduError) {
        if self.status != PduStatus::Error {
            warn!(pdu = %self.name, %error, "PDU in error");
        }
        self.status = PduStatus::Error;
        self.error = Some(error.to_string());
    }

    fn driver(&self) -> Result<Arc<dyn PduDriver>, PduError> {
        self.driver.clone()
    }

    /// Runs one driver call under the command timeout.
    async fn call<T>(
        &self,
        operation: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, PduError>>,
    ) -> Result<T, PduError> {
        match tokio::time::timeout(self.options.command_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(PduError::Timeout {
                operation: operation(),
                timeout: self.options.command_timeout,
            }),
        }
    }

    async fn backoff(&self, attempt: u32) {
        if attempt > 1 {
            let factor = 1u32 << (attempt - 2).min(16);
            tokio::time::sleep(self.options.retry_backoff * factor).await;
        }
    }

    /// Lists the ports, keeping the runtime state of the ports that stay.
    async fn list_ports(&mut self) -> Result<(), PduError> {
        let driver = self.driver()?;
        let list = self
            .call(|| "listing the ports".to_string(), driver.ports())
            .await?;
        let mut old = std::mem::take(&mut self.ports);
        for info in list {
            let port = match old.shift_remove(&info.id) {
                Some(mut p) => {
                    p.info = info;
                    p
                }
                None => Port::new(info),
            };
            self.ports.insert(port.info.id.clone(), port);
        }
        self.polls_since_list = 0;
        Ok(())
    }

    async fn init(&mut self) {
        self.last_init_attempt = Some(Instant::now());
        match self.list_ports().await {
            Ok(()) => {
                self.initialised = true;
                info!(pdu = %self.name, ports = self.ports.len(), "PDU initialised");
                self.poll_states().await;
            }
            Err(e) => {
                let e = PduError::NotReady {
                    pdu: self.name.to_string(),
                    reason: e.to_string(),
                };
                self.set_error(&e);
            }
        }
        self.publish();
    }

    /// Makes sure the ports are known, trying to list them now if not.
    async fn ensure_initialised(&mut self) -> Result<(), PduError> {
        if let Err(e) = &self.driver {
            return Err(e.clone());
        }
        if !self.initialised {
            self.init().await;
        }
        if self.initialised {
            Ok(())
        } else {
            Err(PduError::NotReady {
                pdu: self.name.to_string(),
                reason: self.error.clone().unwrap_or_default(),
            })
        }
    }

    /// Finds a port by id, else by unique label.
    async fn resolve(&mut self, port: &str) -> Result<String, PduError> {
        self.ensure_initialised().await?;
        if self.ports.contains_key(port) {
            return Ok(port.to_string());
        }
        let mut by_label = self
            .ports
            .values()
            .filter(|p| p.info.label.as_deref() == Some(port));
        match (by_label.next(), by_label.next()) {
            (Some(p), None) => Ok(p.info.id.clone()),
            _ => Err(PduError::UnknownPort {
                pdu: self.name.to_string(),
                port: port.to_string(),
            }),
        }
    }

    async fn poll_states(&mut self) -> bool {
        let Ok(driver) = self.driver() else {
            return false;
        };
        let infos: Vec<PortInfo> = self.ports.values().map(|p| p.info.clone()).collect();
        let result = self
            .call(
                || "polling the port states".to_string(),
                driver.get_states(&infos),
            )
            .await
            .and_then(|states| {
                if states.len() == infos.len() {
                    Ok(states)
                } else {
                    Err(PduError::Protocol(format!(
                        "the driver returned {} states for {} ports",
                        states.len(),
                        infos.len()
                    )))
                }
            });
        match result {
            Ok(states) => {
                for (info, state) in infos.iter().zip(states) {
                    if let Some(p) = self.ports.get_mut(&info.id) {
                        p.observe(state);
                    }
                }
                self.poll_failures = 0;
                self.set_ok();
                true
            }
            Err(e) => {
                self.poll_failed(&e);
                false
            }
        }
    }

    fn poll_failed(&mut self, e: &PduError) {
        self.poll_failures += 1;
        debug!(pdu = %self.name, error = %e, failures = self.poll_failures, "poll failed");
        if self.poll_failures >= self.options.error_after_poll_failures {
            self.set_error(e);
            for p in self.ports.values_mut() {
                p.state = PortState::Unknown;
            }
        }
    }

    async fn poll(&mut self) {
        if !self.initialised {
            let due = self
                .last_init_attempt
                .is_none_or(|t| t.elapsed() >= self.options.init_retry_interval);
            if due {
                self.init().await;
            }
            return;
        }
        self.polls_since_list += 1;
        if self.polls_since_list >= self.options.relist_every_polls
            || self.status == PduStatus::Error
        {
            if let Err(e) = self.list_ports().await {
                self.poll_failed(&e);
                self.publish();
                return;
            }
        }
        self.poll_states().await;
        self.publish();
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Set {
                port,
                state,
                reply,
                generation,
            } => self.handle_set(port, state, reply, generation).await,
            Msg::Get { port, reply } => {
                let r = self.handle_get(&port).await;
                let _ = reply.send(r);
            }
            Msg::Reserve {
                port,
                reserved,
                reply,
            } => {
                let r = self.resolve(&port).await.map(|id| {
                    if reserved {
                        self.reserved.insert(id);
                    } else {
                        self.reserved.remove(&id);
                    }
                });
                self.publish();
                let _ = reply.send(r);
            }
            Msg::ReplaceReserved { ids } => {
                self.reserved = ids;
                self.publish();
            }
            Msg::MinOffTime {
                port,
                min_off_time,
                reply,
            } => {
                let r = self.resolve(&port).await.map(|id| match min_off_time {
                    Some(d) => {
                        self.min_off.insert(id, d);
                    }
                    None => {
                        self.min_off.remove(&id);
                    }
                });
                self.publish();
                let _ = reply.send(r);
            }
            Msg::ReplaceMinOffTimes { times } => {
                self.min_off = times;
                self.publish();
            }
            Msg::Refresh { reply } => {
                let r = self.handle_refresh().await;
                let _ = reply.send(r);
            }
            Msg::Stop => {}
        }
    }

    async fn handle_refresh(&mut self) -> Result<(), PduError> {
        self.ensure_initialised().await?;
        let r = self.list_ports().await;
        if let Err(e) = &r {
            self.set_error(e);
        } else {
            self.poll_states().await;
        }
        self.publish();
        r
    }

    async fn handle_get(&mut self, port: &str) -> Result<PortState, PduError> {
        let id = self.resolve(port).await?;
        let driver = self.driver()?;
        let mut last = None;
        for attempt in 1..=self.options.attempts.max(1) {
            self.backoff(attempt).await;
            match self
                .call(|| format!("reading port {id}"), driver.get_state(&id))
                .await
            {
                Ok(state) => {
                    if let Some(p) = self.ports.get_mut(&id) {
                        p.observe(state);
                    }
                    self.set_ok();
                    self.publish();
                    return Ok(state);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(self.failed(format!("reading port {id}"), last))
    }

    fn failed(&mut self, operation: String, last: Option<PduError>) -> PduError {
        let e = PduError::Failed {
            pdu: self.name.to_string(),
            operation,
            attempts: self.options.attempts.max(1),
            last: Box::new(last.unwrap_or_else(|| PduError::Transport("no attempt".into()))),
        };
        self.set_error(&e);
        self.publish();
        e
    }

    async fn handle_set(
        &mut self,
        port: String,
        state: PortState,
        reply: Reply<()>,
        generation: Option<u64>,
    ) {
        if !state.is_action() {
            let _ = reply.send(Err(PduError::InvalidState(
                "UNKNOWN cannot be set; use ON, OFF or REBOOT".into(),
            )));
            return;
        }
        let id = match self.resolve(&port).await {
            Ok(id) => id,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if self.reserved.contains(&id) {
            let _ = reply.send(Err(PduError::PortReserved {
                pdu: self.name.to_string(),
                port: id,
            }));
            return;
        }
        let p = self.ports.get_mut(&id).expect("resolved port exists");
        let generation = match generation {
            None => {
                p.generation += 1;
                p.generation
            }
            Some(g) if g == p.generation => g,
            Some(_) => {
                let _ = reply.send(Err(PduError::Superseded {
                    pdu: self.name.to_string(),
                    port: id,
                }));
                return;
            }
        };
        let mut last = None;
        for attempt in 1..=self.options.attempts.max(1) {
            self.backoff(attempt).await;
            match self.try_set(&id, state).await {
                Ok(SetOutcome::Done) => {
                    self.set_ok();
                    self.publish();
                    let _ = reply.send(Ok(()));
                    return;
                }
                Ok(SetOutcome::OnAfter(delay)) => {
                    self.set_ok();
                    self.publish();
                    debug!(pdu = %self.name, port = %id, ?delay, "waiting out the minimum off time");
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Some(tx) = tx.upgrade() {
                            let _ = tx
                                .send(Msg::Set {
                                    port: id,
                                    state: PortState::On,
                                    reply,
                                    generation: Some(generation),
                                })
                                .await;
                        }
                    });
                    return;
                }
                Err(e) => {
                    debug!(pdu = %self.name, port = %id, attempt, error = %e, "command failed");
                    last = Some(e)
                }
            }
        }
        let e = self.failed(format!("setting port {id} {state}"), last);
        let _ = reply.send(Err(e));
    }

    /// One attempt of a set: read, decide, write.
    async fn try_set(&mut self, id: &str, state: PortState) -> Result<SetOutcome, PduError> {
        let driver = self.driver()?;
        let current = self
            .call(|| format!("reading port {id}"), driver.get_state(id))
            .await?;
        let min_off = self.min_off_time(id);
        let p = self.ports.get_mut(id).expect("resolved port exists");
        p.observe(current);
        let target = match state {
            PortState::Reboot if current == PortState::Off => PortState::On,
            s => s,
        };
        if target == current {
            debug!(pdu = %self.name, port = id, %state, "port already in that state");
            return Ok(SetOutcome::Done);
        }
        if target == PortState::On {
            if let Some((off_at, _)) = p.last_shutdown {
                let remaining = min_off.saturating_sub(off_at.elapsed());
                if !remaining.is_zero() {
                    return Ok(SetOutcome::OnAfter(remaining));
                }
            }
        }
        let write = if target == PortState::Reboot && !driver.supports_reboot() {
            PortState::Off
        } else {
            target
        };
        self.call(
            || format!("setting port {id} {write}"),
            driver.set_state(id, write),
        )
        .await?;
        info!(pdu = %self.name, port = id, state = %write, "port set");
        let p = self.ports.get_mut(id).expect("resolved port exists");
        let now = (Instant::now(), Utc::now());
        match write {
            PortState::Off => {
                p.last_shutdown = Some(now);
                p.state = PortState::Off;
            }
            PortState::Reboot => {
                p.last_shutdown = Some(now);
                p.state = PortState::On;
            }
            s => p.state = s,
        }
        self.publish();
        let delay = driver.state_transition_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if target == PortState::Reboot && write == PortState::Off {
            return Ok(SetOutcome::OnAfter(min_off));
        }
        Ok(SetOutcome::Done)
    }
}
