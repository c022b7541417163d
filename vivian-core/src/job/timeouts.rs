//! Job timeouts (EX B.3): their description in the job file and the runtime
//! helper the job runner drives with its clock.
//!
//! Nothing here sleeps or reads a clock: every method that needs the time
//! takes an [`Instant`], so the whole retry logic is unit-testable.

use std::fmt;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde::Deserialize;

use super::JobError;

/// Which timeout this is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TimeoutName {
    /// The whole job; started at job start, never stopped.
    Overall,
    /// Setting up the job's infrastructure (artifacts, bucket).
    InfraSetup,
    /// Tearing it down, once the DUT is done.
    InfraTeardown,
    /// One boot of the DUT, from power-on to the end of that boot.
    BootCycle,
    /// From power-on to the first console activity.
    FirstConsoleActivity,
    /// Between two console activities.
    ConsoleActivity,
    /// A console watchdog, started and reset by console patterns.
    Watchdog(String),
}

impl fmt::Display for TimeoutName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutName::Overall => "overall",
            TimeoutName::InfraSetup => "infra_setup",
            TimeoutName::InfraTeardown => "infra_teardown",
            TimeoutName::BootCycle => "boot_cycle",
            TimeoutName::FirstConsoleActivity => "first_console_activity",
            TimeoutName::ConsoleActivity => "console_activity",
            TimeoutName::Watchdog(name) => name,
        })
    }
}

/// One timeout: a duration (or none, meaning infinite), a retry budget and
/// its runtime state.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeout {
    name: TimeoutName,
    duration: Option<Duration>,
    retries: u32,
    retried: u32,
    started_at: Option<Instant>,
}

impl Timeout {
    /// A stopped timeout. `duration: None` never expires.
    pub fn new(name: TimeoutName, duration: Option<Duration>, retries: u32) -> Self {
        Timeout {
            name,
            duration,
            retries,
            retried: 0,
            started_at: None,
        }
    }

    /// The timeout's name.
    pub fn name(&self) -> &TimeoutName {
        &self.name
    }

    /// Its duration; `None` is infinite.
    pub fn duration(&self) -> Option<Duration> {
        self.duration
    }

    /// How many retries it allows over the whole job.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// How many times it has expired and been retried so far.
    pub fn retried(&self) -> u32 {
        self.retried
    }

    /// Starts (or restarts) the clock at `now`.
    pub fn start(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// Restarts the clock from `when` (e.g. the time of the latest console
    /// activity). A stopped timeout is started.
    pub fn reset(&mut self, when: Instant) {
        self.started_at = Some(when);
    }

    /// Stops the clock.
    pub fn stop(&mut self) {
        self.started_at = None;
    }

    /// Whether the clock is running.
    pub fn is_started(&self) -> bool {
        self.started_at.is_some()
    }

    /// When the clock was (re)started, if it runs.
    pub fn started_at(&self) -> Option<Instant> {
        self.started_at
    }

    /// How long the clock has been running at `now` (zero when stopped).
    pub fn active_time(&self, now: Instant) -> Duration {
        self.started_at
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default()
    }

    /// Whether the timeout has expired at `now`: it runs, is finite and has
    /// been running for strictly more than its duration.
    pub fn has_expired(&self, now: Instant) -> bool {
        match (self.started_at, self.duration) {
            (Some(_), Some(d)) => self.active_time(now) > d,
            _ => false,
        }
    }

    /// When the timeout will expire, if it runs and is finite. It counts as
    /// expired at any instant strictly after this one.
    pub fn deadline(&self) -> Option<Instant> {
        Some(self.started_at? + self.duration?)
    }

    /// Time left before expiry at `now` (`None` when stopped or infinite).
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        Some(self.deadline()?.saturating_duration_since(now))
    }

    /// Consumes one retry: increments `retried` and says whether the retry is
    /// allowed (`retried <= retries`).
    pub fn retry(&mut self) -> bool {
        self.retried = self.retried.saturating_add(1);
        self.retried <= self.retries
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.duration {
            Some(d) => write!(f, "<Timeout {}: value={:?}", self.name, d)?,
            None => write!(f, "<Timeout {}: value=inf", self.name)?,
        }
        write!(f, ", retries={}/{}>", self.retried, self.retries)
    }
}

/// What the runner does after a boot ended (EX B.3 retry semantics).
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    /// Power the DUT again with the `continue` deployment.
    Reboot,
    /// A retry budget is exhausted: end the session without `session_end`
    /// (so the status is INCOMPLETE unless `session_end` matched before).
    Abort {
        /// The timeouts (or `boot_cycle` for a reboot request) whose budget
        /// ran out.
        exhausted: Vec<TimeoutName>,
    },
}

/// One expired timeout (or a reboot request) as accounted by
/// [`Timeouts::end_boot`]; the runner reports it to the client (the
/// reference's `TIMEOUT_HIT` control message carries these fields).
#[derive(Debug, Clone, PartialEq)]
pub struct TimeoutHit {
    /// Which timeout.
    pub name: TimeoutName,
    /// Its duration in seconds (`None`: infinite, only for reboot requests).
    pub seconds: Option<f64>,
    /// Its retry budget.
    pub retries: u32,
    /// Retries consumed, this one included.
    pub retried: u32,
    /// Whether this hit is retried (false: the budget is exhausted).
    pub is_retrying: bool,
}

impl TimeoutHit {
    /// The control-message metadata of the reference's `TIMEOUT_HIT` tag:
    /// `{"timeout": {"name", "seconds", "retries", "retried", "is_retrying"}}`.
    pub fn metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "timeout".into(),
            serde_json::json!({
                "name": self.name.to_string(),
                "seconds": self.seconds,
                "retries": self.retries,
                "retried": self.retried,
                "is_retrying": self.is_retrying,
            }),
        );
        m
    }
}

/// Watchdog events reported by the console matcher, applied with
/// [`Timeouts::apply_watchdog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogAction {
    /// The watchdog's `start` pattern matched.
    Start,
    /// Its `reset` pattern matched.
    Reset,
    /// Its `stop` pattern matched.
    Stop,
}

/// All the timeouts of a job, with the state transitions of the job runner.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// `overall` (default 6 h, no retries).
    pub overall: Timeout,
    /// `infra_setup` (default infinite).
    pub infra_setup: Timeout,
    /// `infra_teardown` (default 10 min, no retries).
    pub infra_teardown: Timeout,
    /// `boot_cycle` (default infinite).
    pub boot_cycle: Timeout,
    /// `first_console_activity` (default infinite).
    pub first_console_activity: Timeout,
    /// `console_activity` (default infinite).
    pub console_activity: Timeout,
    /// `watchdogs.<name>`, in file order.
    pub watchdogs: IndexMap<String, Timeout>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            overall: Timeout::new(TimeoutName::Overall, Some(Duration::from_secs(6 * 3600)), 0),
            infra_setup: Timeout::new(TimeoutName::InfraSetup, None, 0),
            infra_teardown: Timeout::new(
                TimeoutName::InfraTeardown,
                Some(Duration::from_secs(600)),
                0,
            ),
            boot_cycle: Timeout::new(TimeoutName::BootCycle, None, 0),
            first_console_activity: Timeout::new(TimeoutName::FirstConsoleActivity, None, 0),
            console_activity: Timeout::new(TimeoutName::ConsoleActivity, None, 0),
            watchdogs: IndexMap::new(),
        }
    }
}

impl Timeouts {
    /// Every timeout, watchdogs last.
    pub fn iter(&self) -> impl Iterator<Item = &Timeout> {
        [
            &self.overall,
            &self.infra_setup,
            &self.infra_teardown,
            &self.boot_cycle,
            &self.first_console_activity,
            &self.console_activity,
        ]
        .into_iter()
        .chain(self.watchdogs.values())
    }

    /// The timeout of that name.
    pub fn get(&self, name: &TimeoutName) -> Option<&Timeout> {
        Some(match name {
            TimeoutName::Overall => &self.overall,
            TimeoutName::InfraSetup => &self.infra_setup,
            TimeoutName::InfraTeardown => &self.infra_teardown,
            TimeoutName::BootCycle => &self.boot_cycle,
            TimeoutName::FirstConsoleActivity => &self.first_console_activity,
            TimeoutName::ConsoleActivity => &self.console_activity,
            TimeoutName::Watchdog(n) => self.watchdogs.get(n)?,
        })
    }

    /// The timeout of that name, mutably.
    pub fn get_mut(&mut self, name: &TimeoutName) -> Option<&mut Timeout> {
        Some(match name {
            TimeoutName::Overall => &mut self.overall,
            TimeoutName::InfraSetup => &mut self.infra_setup,
            TimeoutName::InfraTeardown => &mut self.infra_teardown,
            TimeoutName::BootCycle => &mut self.boot_cycle,
            TimeoutName::FirstConsoleActivity => &mut self.first_console_activity,
            TimeoutName::ConsoleActivity => &mut self.console_activity,
            TimeoutName::Watchdog(n) => self.watchdogs.get_mut(n)?,
        })
    }

    /// The names of every timeout expired at `now` (watchdogs included).
    pub fn expired(&self, now: Instant) -> Vec<TimeoutName> {
        self.iter()
            .filter(|t| t.has_expired(now))
            .map(|t| t.name.clone())
            .collect()
    }

    /// The earliest instant at which a running timeout will have expired
    /// (strictly after its deadline), so the runner can sleep until then
    /// instead of polling.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.iter()
            .filter_map(Timeout::deadline)
            .min()
            .map(|d| d + Duration::from_millis(1))
    }

    /// Job start: starts `overall`.
    pub fn on_job_start(&mut self, now: Instant) {
        self.overall.start(now);
    }

    /// Each power-on: starts `boot_cycle` and `first_console_activity`,
    /// stops `console_activity` and cancels every watchdog.
    pub fn on_power_on(&mut self, now: Instant) {
        self.boot_cycle.start(now);
        self.first_console_activity.start(now);
        self.console_activity.stop();
        for wd in self.watchdogs.values_mut() {
            wd.stop();
        }
    }

    /// Console activity at `when`: stops `first_console_activity` and
    /// restarts `console_activity` from `when`.
    pub fn on_console_activity(&mut self, when: Instant) {
        self.first_console_activity.stop();
        self.console_activity.reset(when);
    }

    /// Applies a watchdog event from the console matcher at `now`. Unknown
    /// watchdog names are ignored (a watchdog without a timeout is inert).
    pub fn apply_watchdog(&mut self, name: &str, action: &WatchdogAction, now: Instant) {
        if let Some(wd) = self.watchdogs.get_mut(name) {
            match action {
                WatchdogAction::Start | WatchdogAction::Reset => wd.start(now),
                WatchdogAction::Stop => wd.stop(),
            }
        }
    }

    /// The end of a boot (after power was cut), with the timeouts that
    /// expired and whether a `session_reboot` was requested: each expired
    /// timeout is stopped and consumes one of its retries, a reboot request
    /// consumes one `boot_cycle` retry; if every budget allows it the
    /// per-boot timeouts are stopped and the DUT reboots, else the session
    /// aborts. Returns the decision and one [`TimeoutHit`] per accounted hit.
    pub fn end_boot(
        &mut self,
        expired: &[TimeoutName],
        reboot_requested: bool,
    ) -> (RetryDecision, Vec<TimeoutHit>) {
        let mut hits = Vec::new();
        let mut exhausted = Vec::new();
        let mut account = |t: &mut Timeout| {
            let ok = t.retry();
            hits.push(TimeoutHit {
                name: t.name.clone(),
                seconds: t.duration.map(|d| d.as_secs_f64()),
                retries: t.retries,
                retried: t.retried,
                is_retrying: ok,
            });
            if !ok {
                exhausted.push(t.name.clone());
            }
        };
        for name in expired {
            if let Some(t) = self.get_mut(name) {
                t.stop();
                account(t);
            }
        }
        if reboot_requested {
            account(&mut self.boot_cycle);
        }
        if !exhausted.is_empty() {
            return (RetryDecision::Abort { exhausted }, hits);
        }
        self.first_console_activity.stop();
        self.console_activity.stop();
        self.boot_cycle.stop();
        for wd in self.watchdogs.values_mut() {
            wd.stop();
        }
        (RetryDecision::Reboot, hits)
    }
}

/// A timeout as written in the job file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeoutWire {
    days: Option<f64>,
    hours: Option<f64>,
    minutes: Option<f64>,
    seconds: Option<f64>,
    milliseconds: Option<f64>,
    retries: Option<u32>,
}

/// The `timeouts` section as written in the job file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeoutsWire {
    overall: Option<TimeoutWire>,
    infra_setup: Option<TimeoutWire>,
    infra_teardown: Option<TimeoutWire>,
    boot_cycle: Option<TimeoutWire>,
    first_console_activity: Option<TimeoutWire>,
    console_activity: Option<TimeoutWire>,
    watchdogs: Option<IndexMap<String, TimeoutWire>>,
}

fn build(name: TimeoutName, wire: &TimeoutWire) -> Result<Timeout, JobError> {
    let path = format!(
        "timeouts.{}",
        match &name {
            TimeoutName::Watchdog(n) => format!("watchdogs.{n}"),
            other => other.to_string(),
        }
    );
    let units = [
        (wire.days, 86400.0),
        (wire.hours, 3600.0),
        (wire.minutes, 60.0),
        (wire.seconds, 1.0),
        (wire.milliseconds, 0.001),
    ];
    let mut total = None;
    for (value, scale) in units {
        if let Some(v) = value {
            if !v.is_finite() || v < 0.0 {
                return Err(JobError::Invalid {
                    path,
                    message: format!("durations must be finite and non-negative, got {v}"),
                });
            }
            total = Some(total.unwrap_or(0.0) + v * scale);
        }
    }
    let duration = match total {
        None => None,
        Some(secs) => Some(
            Duration::try_from_secs_f64(secs).map_err(|e| JobError::Invalid {
                path: path.clone(),
                message: format!("invalid duration: {e}"),
            })?,
        ),
    };
    Ok(Timeout::new(name, duration, wire.retries.unwrap_or(0)))
}

impl TimeoutsWire {
    pub(crate) fn validate(&self) -> Result<Timeouts, JobError> {
        let mut t = Timeouts::default();
        let fields: [(&Option<TimeoutWire>, &mut Timeout); 6] = [
            (&self.overall, &mut t.overall),
            (&self.infra_setup, &mut t.infra_setup),
            (&self.infra_teardown, &mut t.infra_teardown),
            (&self.boot_cycle, &mut t.boot_cycle),
            (&self.first_console_activity, &mut t.first_console_activity),
            (&self.console_activity, &mut t.console_activity),
        ];
        for (wire, slot) in fields {
            if let Some(wire) = wire {
                *slot = build(slot.name.clone(), wire)?;
            }
        }
        if t.overall.retries > 0 || t.infra_teardown.retries > 0 {
            return Err(JobError::Invalid {
                path: "timeouts".into(),
                message: "Neither the overall nor the teardown timeout can have retries".into(),
            });
        }
        for (name, wire) in self.watchdogs.iter().flatten() {
            let timeout = build(TimeoutName::Watchdog(name.clone()), wire)?;
            t.watchdogs.insert(name.clone(), timeout);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn expiry_is_strict() {
        let t0 = Instant::now();
        let mut t = Timeout::new(TimeoutName::BootCycle, Some(secs(10)), 1);
        assert!(
            !t.has_expired(t0 + secs(100)),
            "a stopped timeout never expires"
        );
        t.start(t0);
        assert!(t.is_started());
        assert!(
            !t.has_expired(t0 + secs(10)),
            "exactly at the limit is not expired"
        );
        assert!(t.has_expired(t0 + secs(10) + Duration::from_millis(1)));
        assert_eq!(t.remaining(t0 + secs(4)), Some(secs(6)));
        t.reset(t0 + secs(5));
        assert!(!t.has_expired(t0 + secs(15)));
        assert!(t.has_expired(t0 + secs(16)));
        t.stop();
        assert!(!t.has_expired(t0 + secs(100)));
        assert!(t.retry());
        assert!(!t.retry());
        assert_eq!(t.retried(), 2);
        assert_eq!(
            t.to_string(),
            "<Timeout boot_cycle: value=10s, retries=2/1>"
        );
    }

    #[test]
    fn infinite_timeouts_never_expire() {
        let t0 = Instant::now();
        let mut t = Timeout::new(TimeoutName::ConsoleActivity, None, 0);
        t.start(t0);
        assert!(!t.has_expired(t0 + secs(1_000_000)));
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn boot_sequence_and_retries() {
        let t0 = Instant::now();
        let mut ts = Timeouts {
            first_console_activity: Timeout::new(
                TimeoutName::FirstConsoleActivity,
                Some(secs(45)),
                1,
            ),
            console_activity: Timeout::new(TimeoutName::ConsoleActivity, Some(secs(15)), 0),
            ..Default::default()
        };
        ts.watchdogs.insert(
            "wd".into(),
            Timeout::new(TimeoutName::Watchdog("wd".into()), Some(secs(5)), 0),
        );
        ts.on_job_start(t0);
        ts.on_power_on(t0);
        assert_eq!(
            ts.next_expiry(),
            Some(t0 + secs(45) + Duration::from_millis(1))
        );
        assert!(ts.expired(t0 + secs(45)).is_empty());
        let exp = ts.expired(t0 + secs(46));
        assert_eq!(exp, vec![TimeoutName::FirstConsoleActivity]);
        let (d, hits) = ts.end_boot(&exp, false);
        assert_eq!(d, RetryDecision::Reboot);
        assert!(hits[0].is_retrying);
        assert_eq!(hits[0].retried, 1);

        // Second boot: activity, then a watchdog that expires without retries.
        let t1 = t0 + secs(60);
        ts.on_power_on(t1);
        ts.on_console_activity(t1 + secs(1));
        assert!(!ts.first_console_activity.is_started());
        ts.apply_watchdog("wd", &WatchdogAction::Start, t1 + secs(2));
        ts.apply_watchdog("unknown", &WatchdogAction::Start, t1 + secs(2));
        ts.on_console_activity(t1 + secs(7));
        let exp = ts.expired(t1 + secs(8));
        assert_eq!(exp, vec![TimeoutName::Watchdog("wd".into())]);
        let (d, hits) = ts.end_boot(&exp, false);
        assert_eq!(
            d,
            RetryDecision::Abort {
                exhausted: vec![TimeoutName::Watchdog("wd".into())]
            }
        );
        assert!(!hits[0].is_retrying);
    }

    #[test]
    fn reboot_requests_consume_boot_cycle_retries() {
        let mut ts = Timeouts {
            boot_cycle: Timeout::new(TimeoutName::BootCycle, None, 1),
            ..Default::default()
        };
        assert_eq!(ts.end_boot(&[], true).0, RetryDecision::Reboot);
        assert_eq!(
            ts.end_boot(&[], true).0,
            RetryDecision::Abort {
                exhausted: vec![TimeoutName::BootCycle]
            }
        );
    }

    #[test]
    fn power_on_cancels_watchdogs_and_console_activity() {
        let t0 = Instant::now();
        let mut ts = Timeouts::default();
        ts.watchdogs.insert(
            "wd".into(),
            Timeout::new(TimeoutName::Watchdog("wd".into()), Some(secs(5)), 0),
        );
        ts.apply_watchdog("wd", &WatchdogAction::Start, t0);
        ts.on_console_activity(t0);
        ts.on_power_on(t0 + secs(1));
        assert!(!ts.watchdogs["wd"].is_started());
        assert!(!ts.console_activity.is_started());
        assert!(ts.boot_cycle.is_started());
        ts.apply_watchdog("wd", &WatchdogAction::Start, t0);
        ts.apply_watchdog("wd", &WatchdogAction::Stop, t0);
        assert!(!ts.watchdogs["wd"].is_started());
    }
}
