//! The per-DUT lifecycle: the seed's state graph as one explicit transition
//! table.
//!
//! ```text
//! START ──(no PDU port)──────────────▶ WAIT_FOR_CONFIG
//! START ──(retired)──────────────────▶ RETIRED
//! START ──(not ready for service)────▶ TRAINING
//! START ──(quick checks disabled)────▶ IDLE
//! START ──(ready for service)────────▶ QUICK_CHECK
//! QUICK_CHECK ──passed──▶ IDLE        QUICK_CHECK ──failed──▶ TRAINING
//! TRAINING ──failed──▶ TRAINING       TRAINING ──passed──▶ IDLE
//! RETIRED ──activate──▶ QUICK_CHECK   IDLE ──retire──▶ RETIRED
//! IDLE ──job──▶ QUEUED ──started──▶ RUNNING ──finished──▶ IDLE
//! ```
//!
//! plus the edges a real farm needs, all listed in [`TRANSITIONS`]: retiring
//! a DUT that is training or quick-checking (its job is stopped), a PDU port
//! assigned to or removed from a DUT, a job cancelled while queued or running,
//! a DUT found unfit at the end of a job (back to training), an admin marking
//! a DUT ready or unfit, and a quick check requested through the API.
//!
//! The START rules ([`START_RULES`]) are the reference's priority order for a
//! DUT that is not running anything; they also decide where a DUT goes when
//! it is activated ([`DutEvent::Activate`]) or gets a PDU port
//! ([`DutEvent::PortAssigned`]), from the [`DutFacts`] those events carry.
//!
//! # Invariants
//! * A DUT is in exactly one [`DutState`] at a time; [`DutStateMachine`] is a
//!   single byte, so a farm of 1,000 DUTs costs 1 kB of state.
//! * An event either follows exactly one row of [`TRANSITIONS`] or is refused
//!   with [`TransitionRefused`], and a refused event leaves the state
//!   unchanged.
//! * Only an IDLE DUT accepts a job ([`DutEvent::JobQueued`]); QUEUED and
//!   RUNNING are entered and left only through job events, a cancel, or the
//!   loss of the PDU port. A busy DUT cannot be retired: retire it once its
//!   job is over.
//! * WAIT_FOR_CONFIG is entered from every other state when the PDU port is
//!   removed, and left only when a port is assigned.
//! * Every state is reachable from START and every state can reach IDLE.
//! * When a row has `stops_job`, the caller must stop the DUT's current job
//!   (training, quick check or user job) as it takes the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The lifecycle state of a DUT. Serialised by name (`"WAIT_FOR_CONFIG"`);
/// [`DutState::code`] gives the reference's numeric value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum DutState {
    /// The DUT has no usable PDU port: it cannot be powered, so nothing runs.
    WaitForConfig = 0,
    /// Available (powered down to save energy), waiting for a job.
    Idle = 1,
    /// Being tested for boot reliability (registration then boot loops).
    Training = 2,
    /// Chosen to run a job; the executor is getting ready (expected < 1 s).
    Queued = 3,
    /// Running a job.
    Running = 4,
    /// Under maintenance: accepts no job.
    Retired = 5,
    /// Checking that its configuration still matches MarsDB (one boot loop).
    QuickCheck = 7,
}

impl DutState {
    /// Every state, in numeric order.
    pub const ALL: [DutState; 7] = [
        DutState::WaitForConfig,
        DutState::Idle,
        DutState::Training,
        DutState::Queued,
        DutState::Running,
        DutState::Retired,
        DutState::QuickCheck,
    ];

    /// The reference's name, e.g. `"WAIT_FOR_CONFIG"`.
    pub fn name(self) -> &'static str {
        match self {
            DutState::WaitForConfig => "WAIT_FOR_CONFIG",
            DutState::Idle => "IDLE",
            DutState::Training => "TRAINING",
            DutState::Queued => "QUEUED",
            DutState::Running => "RUNNING",
            DutState::Retired => "RETIRED",
            DutState::QuickCheck => "QUICK_CHECK",
        }
    }

    /// The reference's numeric value (WAIT_FOR_CONFIG=0 … QUICK_CHECK=7;
    /// 6 and 8, UNKNOWN and BORKED, do not exist in Vivian).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The state with the reference's numeric value `code`.
    pub fn from_code(code: u8) -> Option<DutState> {
        DutState::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Whether a job (user job) owns the DUT: QUEUED or RUNNING.
    pub fn is_busy(self) -> bool {
        matches!(self, DutState::Queued | DutState::Running)
    }
}

impl fmt::Display for DutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A state name that is not one of [`DutState::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown DUT state {0:?}: expected one of WAIT_FOR_CONFIG, IDLE, TRAINING, QUEUED, RUNNING, RETIRED, QUICK_CHECK")]
pub struct UnknownState(pub String);

impl FromStr for DutState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        DutState::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// What the START rules (and the events that re-run them) need to know about
/// a DUT: its MarsDB record and the quick-check setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DutFacts {
    /// The DUT's `pdu` and `pdu_port_id` resolve to a port.
    pub has_pdu_port: bool,
    /// MarsDB `is_retired`.
    pub is_retired: bool,
    /// MarsDB `ready_for_service`.
    pub ready_for_service: bool,
    /// Quick checks are enabled (`SERGENT_HARTMAN_QUICK_CHECK` on and
    /// `SERGENT_HARTMAN_BOOT_COUNT` not negative).
    pub quick_check_enabled: bool,
}

/// Something that happens to a DUT. [`DutEvent::kind`] is the key of the
/// transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DutEvent {
    /// The DUT is brought back into service (`is_retired` true → false);
    /// goes where the START rules say (normally QUICK_CHECK). The facts'
    /// `is_retired` is taken as false.
    Activate(DutFacts),
    /// The DUT is retired (`is_retired` false → true).
    Retire,
    /// The DUT got a PDU port; goes where the START rules say. The facts'
    /// `has_pdu_port` is taken as true.
    PortAssigned(DutFacts),
    /// The DUT lost its PDU port (MarsDB edit, PDU removed).
    PortRemoved,
    /// A quick check was asked for (`POST /dut/<id>/quick_check`).
    QuickCheckRequested,
    /// The quick-check boot loop passed (or quick checks are disabled).
    QuickCheckPassed,
    /// The quick-check boot loop did not pass.
    QuickCheckFailed,
    /// Training qualified the DUT (`ready_for_service` becomes true).
    TrainingPassed,
    /// Training did not qualify the DUT: training starts again.
    TrainingFailed,
    /// An admin set `ready_for_service` to true: training is cancelled.
    MarkedReady,
    /// An admin set `ready_for_service` to false: the DUT is retrained.
    MarkedUnfit,
    /// The scheduler picked this DUT for a job.
    JobQueued,
    /// The job's body started (power sequencing began).
    JobStarted,
    /// The job ended and the DUT is fit for service.
    JobFinished,
    /// The job ended and a `machine_unfit_for_service` pattern matched.
    JobFinishedUnfit,
    /// The current job was cancelled and its task has ended.
    JobCancelled,
}

/// The data-less discriminant of a [`DutEvent`]: the table's key.
/// Serialised in SCREAMING_SNAKE_CASE (`"JOB_QUEUED"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// [`DutEvent::Activate`].
    Activate,
    /// [`DutEvent::Retire`].
    Retire,
    /// [`DutEvent::PortAssigned`].
    PortAssigned,
    /// [`DutEvent::PortRemoved`].
    PortRemoved,
    /// [`DutEvent::QuickCheckRequested`].
    QuickCheckRequested,
    /// [`DutEvent::QuickCheckPassed`].
    QuickCheckPassed,
    /// [`DutEvent::QuickCheckFailed`].
    QuickCheckFailed,
    /// [`DutEvent::TrainingPassed`].
    TrainingPassed,
    /// [`DutEvent::TrainingFailed`].
    TrainingFailed,
    /// [`DutEvent::MarkedReady`].
    MarkedReady,
    /// [`DutEvent::MarkedUnfit`].
    MarkedUnfit,
    /// [`DutEvent::JobQueued`].
    JobQueued,
    /// [`DutEvent::JobStarted`].
    JobStarted,
    /// [`DutEvent::JobFinished`].
    JobFinished,
    /// [`DutEvent::JobFinishedUnfit`].
    JobFinishedUnfit,
    /// [`DutEvent::JobCancelled`].
    JobCancelled,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 16] = [
        EventKind::Activate,
        EventKind::Retire,
        EventKind::PortAssigned,
        EventKind::PortRemoved,
        EventKind::QuickCheckRequested,
        EventKind::QuickCheckPassed,
        EventKind::QuickCheckFailed,
        EventKind::TrainingPassed,
        EventKind::TrainingFailed,
        EventKind::MarkedReady,
        EventKind::MarkedUnfit,
        EventKind::JobQueued,
        EventKind::JobStarted,
        EventKind::JobFinished,
        EventKind::JobFinishedUnfit,
        EventKind::JobCancelled,
    ];

    /// The name, e.g. `"JOB_QUEUED"`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Activate => "ACTIVATE",
            EventKind::Retire => "RETIRE",
            EventKind::PortAssigned => "PORT_ASSIGNED",
            EventKind::PortRemoved => "PORT_REMOVED",
            EventKind::QuickCheckRequested => "QUICK_CHECK_REQUESTED",
            EventKind::QuickCheckPassed => "QUICK_CHECK_PASSED",
            EventKind::QuickCheckFailed => "QUICK_CHECK_FAILED",
            EventKind::TrainingPassed => "TRAINING_PASSED",
            EventKind::TrainingFailed => "TRAINING_FAILED",
            EventKind::MarkedReady => "MARKED_READY",
            EventKind::MarkedUnfit => "MARKED_UNFIT",
            EventKind::JobQueued => "JOB_QUEUED",
            EventKind::JobStarted => "JOB_STARTED",
            EventKind::JobFinished => "JOB_FINISHED",
            EventKind::JobFinishedUnfit => "JOB_FINISHED_UNFIT",
            EventKind::JobCancelled => "JOB_CANCELLED",
        }
    }

    /// An event of this kind; `facts` is used by the kinds that carry facts
    /// (ACTIVATE, PORT_ASSIGNED) and ignored by the others.
    pub fn with_facts(self, facts: DutFacts) -> DutEvent {
        match self {
            EventKind::Activate => DutEvent::Activate(facts),
            EventKind::Retire => DutEvent::Retire,
            EventKind::PortAssigned => DutEvent::PortAssigned(facts),
            EventKind::PortRemoved => DutEvent::PortRemoved,
            EventKind::QuickCheckRequested => DutEvent::QuickCheckRequested,
            EventKind::QuickCheckPassed => DutEvent::QuickCheckPassed,
            EventKind::QuickCheckFailed => DutEvent::QuickCheckFailed,
            EventKind::TrainingPassed => DutEvent::TrainingPassed,
            EventKind::TrainingFailed => DutEvent::TrainingFailed,
            EventKind::MarkedReady => DutEvent::MarkedReady,
            EventKind::MarkedUnfit => DutEvent::MarkedUnfit,
            EventKind::JobQueued => DutEvent::JobQueued,
            EventKind::JobStarted => DutEvent::JobStarted,
            EventKind::JobFinished => DutEvent::JobFinished,
            EventKind::JobFinishedUnfit => DutEvent::JobFinishedUnfit,
            EventKind::JobCancelled => DutEvent::JobCancelled,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl DutEvent {
    /// The table key of this event.
    pub fn kind(&self) -> EventKind {
        match self {
            DutEvent::Activate(_) => EventKind::Activate,
            DutEvent::Retire => EventKind::Retire,
            DutEvent::PortAssigned(_) => EventKind::PortAssigned,
            DutEvent::PortRemoved => EventKind::PortRemoved,
            DutEvent::QuickCheckRequested => EventKind::QuickCheckRequested,
            DutEvent::QuickCheckPassed => EventKind::QuickCheckPassed,
            DutEvent::QuickCheckFailed => EventKind::QuickCheckFailed,
            DutEvent::TrainingPassed => EventKind::TrainingPassed,
            DutEvent::TrainingFailed => EventKind::TrainingFailed,
            DutEvent::MarkedReady => EventKind::MarkedReady,
            DutEvent::MarkedUnfit => EventKind::MarkedUnfit,
            DutEvent::JobQueued => EventKind::JobQueued,
            DutEvent::JobStarted => EventKind::JobStarted,
            DutEvent::JobFinished => EventKind::JobFinished,
            DutEvent::JobFinishedUnfit => EventKind::JobFinishedUnfit,
            DutEvent::JobCancelled => EventKind::JobCancelled,
        }
    }
}

/// Where an edge of the table leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Always this state.
    State(DutState),
    /// Decided by [`START_RULES`] from the facts the event carries.
    StartRules,
}

/// One edge of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transition {
    /// The state the DUT must be in.
    pub from: DutState,
    /// The event taking the edge.
    pub event: EventKind,
    /// Where it leads.
    pub to: Target,
    /// The caller must stop the DUT's current job when taking this edge.
    pub stops_job: bool,
}

const fn edge(from: DutState, event: EventKind, to: DutState, stops_job: bool) -> Transition {
    Transition {
        from,
        event,
        to: Target::State(to),
        stops_job,
    }
}

const fn restart(from: DutState, event: EventKind) -> Transition {
    Transition {
        from,
        event,
        to: Target::StartRules,
        stops_job: false,
    }
}

use DutState as S;
use EventKind as E;

/// The transition table: every edge of the DUT graph. A (state, event)
/// pair appears at most once; any pair not listed is refused.
pub const TRANSITIONS: &[Transition] = &[
    // WAIT_FOR_CONFIG: only a PDU port gets it out.
    restart(S::WaitForConfig, E::PortAssigned),
    // RETIRED
    restart(S::Retired, E::Activate),
    edge(S::Retired, E::PortRemoved, S::WaitForConfig, false),
    // QUICK_CHECK
    edge(S::QuickCheck, E::QuickCheckPassed, S::Idle, false),
    edge(S::QuickCheck, E::QuickCheckFailed, S::Training, false),
    edge(S::QuickCheck, E::Retire, S::Retired, true),
    edge(S::QuickCheck, E::MarkedUnfit, S::Training, true),
    // A cancelled quick check did not pass: retrain, like a failed one.
    edge(S::QuickCheck, E::JobCancelled, S::Training, false),
    edge(S::QuickCheck, E::PortRemoved, S::WaitForConfig, true),
    // TRAINING
    edge(S::Training, E::TrainingPassed, S::Idle, false),
    edge(S::Training, E::TrainingFailed, S::Training, false),
    edge(S::Training, E::MarkedReady, S::Idle, true),
    edge(S::Training, E::Retire, S::Retired, true),
    // A cancelled training job is retried: training starts again.
    edge(S::Training, E::JobCancelled, S::Training, false),
    edge(S::Training, E::PortRemoved, S::WaitForConfig, true),
    // IDLE
    edge(S::Idle, E::JobQueued, S::Queued, false),
    edge(S::Idle, E::Retire, S::Retired, false),
    edge(S::Idle, E::QuickCheckRequested, S::QuickCheck, false),
    edge(S::Idle, E::MarkedUnfit, S::Training, false),
    edge(S::Idle, E::PortRemoved, S::WaitForConfig, false),
    // QUEUED
    edge(S::Queued, E::JobStarted, S::Running, false),
    edge(S::Queued, E::JobCancelled, S::Idle, false),
    edge(S::Queued, E::PortRemoved, S::WaitForConfig, true),
    // RUNNING
    edge(S::Running, E::JobFinished, S::Idle, false),
    edge(S::Running, E::JobFinishedUnfit, S::Training, false),
    edge(S::Running, E::JobCancelled, S::Idle, false),
    edge(S::Running, E::PortRemoved, S::WaitForConfig, true),
];

/// A condition of the START rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartCondition {
    /// The DUT has no PDU port.
    NoPduPort,
    /// The DUT is retired.
    Retired,
    /// The DUT is not ready for service.
    NotReadyForService,
    /// Quick checks are disabled.
    QuickCheckDisabled,
    /// Always true (the last rule).
    Otherwise,
}

impl StartCondition {
    /// Whether the condition holds for `facts`.
    pub fn holds(self, facts: &DutFacts) -> bool {
        match self {
            StartCondition::NoPduPort => !facts.has_pdu_port,
            StartCondition::Retired => facts.is_retired,
            StartCondition::NotReadyForService => !facts.ready_for_service,
            StartCondition::QuickCheckDisabled => !facts.quick_check_enabled,
            StartCondition::Otherwise => true,
        }
    }
}

/// The START edges, in priority order: the first rule whose condition holds
/// gives the state.
pub const START_RULES: &[(StartCondition, DutState)] = &[
    (StartCondition::NoPduPort, DutState::WaitForConfig),
    (StartCondition::Retired, DutState::Retired),
    (StartCondition::NotReadyForService, DutState::Training),
    (StartCondition::QuickCheckDisabled, DutState::Idle),
    (StartCondition::Otherwise, DutState::QuickCheck),
];

/// The state the START rules give for `facts`.
pub fn start_state(facts: &DutFacts) -> DutState {
    START_RULES
        .iter()
        .find(|(cond, _)| cond.holds(facts))
        .map(|(_, state)| *state)
        .unwrap_or(DutState::QuickCheck)
}

/// The table row for (`from`, `event`), if any.
pub fn find_transition(from: DutState, event: EventKind) -> Option<&'static Transition> {
    TRANSITIONS
        .iter()
        .find(|t| t.from == from && t.event == event)
}

/// An event that is not on any edge out of the DUT's state. The DUT kept its
/// state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not allowed while the DUT is {state}{}", hint(*.state, *.event))]
pub struct TransitionRefused {
    /// The DUT's state (unchanged).
    pub state: DutState,
    /// The refused event.
    pub event: EventKind,
}

fn hint(state: DutState, event: EventKind) -> &'static str {
    match (state, event) {
        (s, E::JobQueued | E::Retire | E::QuickCheckRequested) if s.is_busy() => {
            ": it is busy with a job"
        }
        (S::WaitForConfig, _) => ": it has no PDU port yet",
        (S::Retired, E::JobQueued | E::QuickCheckRequested) => ": it is retired",
        (_, E::JobQueued) => ": only an IDLE DUT accepts jobs",
        (_, E::JobCancelled) => ": it is running no job",
        _ => "",
    }
}

/// The result of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    /// The state before.
    pub from: DutState,
    /// The state after (may equal `from`, e.g. TRAINING → TRAINING).
    pub to: DutState,
    /// The event.
    pub event: EventKind,
    /// The caller must stop the DUT's current job.
    pub stops_job: bool,
}

/// One DUT's lifecycle. `Copy`, one byte; serialises as the state's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DutStateMachine {
    state: DutState,
}

impl DutStateMachine {
    /// A DUT placed by the START rules.
    pub fn start(facts: &DutFacts) -> Self {
        DutStateMachine {
            state: start_state(facts),
        }
    }

    /// A DUT known to be in `state` (e.g. restored from a snapshot).
    pub fn in_state(state: DutState) -> Self {
        DutStateMachine { state }
    }

    /// The current state.
    pub fn state(&self) -> DutState {
        self.state
    }

    /// What `event` would do, without doing it.
    pub fn peek(&self, event: &DutEvent) -> Result<StateChange, TransitionRefused> {
        let kind = event.kind();
        let t = find_transition(self.state, kind).ok_or(TransitionRefused {
            state: self.state,
            event: kind,
        })?;
        let to = match (t.to, event) {
            (Target::State(s), _) => s,
            (Target::StartRules, DutEvent::Activate(f)) => start_state(&DutFacts {
                is_retired: false,
                ..*f
            }),
            (Target::StartRules, DutEvent::PortAssigned(f)) => start_state(&DutFacts {
                has_pdu_port: true,
                ..*f
            }),
            // Events without facts never lead to StartRules rows (checked by
            // a test over the table); stay put rather than guess.
            (Target::StartRules, _) => self.state,
        };
        Ok(StateChange {
            from: self.state,
            to,
            event: kind,
            stops_job: t.stops_job,
        })
    }

    /// Applies `event`: follows its edge, or refuses it and keeps the state.
    pub fn fire(&mut self, event: DutEvent) -> Result<StateChange, TransitionRefused> {
        let change = self.peek(&event)?;
        self.state = change.to;
        Ok(change)
    }

    /// The events accepted in the current state.
    pub fn accepted_events(&self) -> impl Iterator<Item = EventKind> + '_ {
        TRANSITIONS
            .iter()
            .filter(move |t| t.from == self.state)
            .map(|t| t.event)
    }
}

impl fmt::Display for DutStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashSet, VecDeque};

    fn facts(port: bool, retired: bool, ready: bool, qc: bool) -> DutFacts {
        DutFacts {
            has_pdu_port: port,
            is_retired: retired,
            ready_for_service: ready,
            quick_check_enabled: qc,
        }
    }

    /// Every combination of facts.
    fn all_facts() -> Vec<DutFacts> {
        let mut v = Vec::new();
        for bits in 0..16u8 {
            v.push(facts(
                bits & 1 != 0,
                bits & 2 != 0,
                bits & 4 != 0,
                bits & 8 != 0,
            ));
        }
        v
    }

    /// The expected edges, written out independently of TRANSITIONS:
    /// (from, event, to for fixed targets / None for START rules).
    const EXPECTED: &[(DutState, EventKind, Option<DutState>)] = &[
        (S::WaitForConfig, E::PortAssigned, None),
        (S::Retired, E::Activate, None),
        (S::Retired, E::PortRemoved, Some(S::WaitForConfig)),
        (S::QuickCheck, E::QuickCheckPassed, Some(S::Idle)),
        (S::QuickCheck, E::QuickCheckFailed, Some(S::Training)),
        (S::QuickCheck, E::Retire, Some(S::Retired)),
        (S::QuickCheck, E::MarkedUnfit, Some(S::Training)),
        (S::QuickCheck, E::JobCancelled, Some(S::Training)),
        (S::QuickCheck, E::PortRemoved, Some(S::WaitForConfig)),
        (S::Training, E::TrainingPassed, Some(S::Idle)),
        (S::Training, E::TrainingFailed, Some(S::Training)),
        (S::Training, E::MarkedReady, Some(S::Idle)),
        (S::Training, E::Retire, Some(S::Retired)),
        (S::Training, E::JobCancelled, Some(S::Training)),
        (S::Training, E::PortRemoved, Some(S::WaitForConfig)),
        (S::Idle, E::JobQueued, Some(S::Queued)),
        (S::Idle, E::Retire, Some(S::Retired)),
        (S::Idle, E::QuickCheckRequested, Some(S::QuickCheck)),
        (S::Idle, E::MarkedUnfit, Some(S::Training)),
        (S::Idle, E::PortRemoved, Some(S::WaitForConfig)),
        (S::Queued, E::JobStarted, Some(S::Running)),
        (S::Queued, E::JobCancelled, Some(S::Idle)),
        (S::Queued, E::PortRemoved, Some(S::WaitForConfig)),
        (S::Running, E::JobFinished, Some(S::Idle)),
        (S::Running, E::JobFinishedUnfit, Some(S::Training)),
        (S::Running, E::JobCancelled, Some(S::Idle)),
        (S::Running, E::PortRemoved, Some(S::WaitForConfig)),
    ];

    #[test]
    fn table_matches_the_expected_graph() {
        assert_eq!(TRANSITIONS.len(), EXPECTED.len());
        for (from, ev, to) in EXPECTED {
            let t = find_transition(*from, *ev).unwrap_or_else(|| panic!("{from} {ev} missing"));
            match (t.to, to) {
                (Target::State(a), Some(b)) => assert_eq!(a, *b, "{from} {ev}"),
                (Target::StartRules, None) => {}
                other => panic!("{from} {ev}: {other:?}"),
            }
        }
        // No duplicate (state, event) pair.
        let keys: HashSet<_> = TRANSITIONS.iter().map(|t| (t.from, t.event)).collect();
        assert_eq!(keys.len(), TRANSITIONS.len());
        // Only fact-carrying events lead to the START rules.
        for t in TRANSITIONS {
            if t.to == Target::StartRules {
                assert!(matches!(t.event, E::Activate | E::PortAssigned), "{t:?}");
            }
        }
    }

    #[test]
    fn stops_job_only_when_leaving_a_state_with_a_job_for_another_reason() {
        let stopping: BTreeSet<(DutState, EventKind)> = TRANSITIONS
            .iter()
            .filter(|t| t.stops_job)
            .map(|t| (t.from, t.event))
            .collect();
        let expected: BTreeSet<(DutState, EventKind)> = [
            (S::QuickCheck, E::Retire),
            (S::QuickCheck, E::MarkedUnfit),
            (S::QuickCheck, E::PortRemoved),
            (S::Training, E::MarkedReady),
            (S::Training, E::Retire),
            (S::Training, E::PortRemoved),
            (S::Queued, E::PortRemoved),
            (S::Running, E::PortRemoved),
        ]
        .into_iter()
        .collect();
        assert_eq!(stopping, expected);
    }

    #[test]
    fn walks_every_edge_and_refuses_every_other_pair() {
        let sample = facts(true, false, true, true);
        let mut accepted = 0;
        let mut refused = 0;
        for from in DutState::ALL {
            for kind in EventKind::ALL {
                let mut m = DutStateMachine::in_state(from);
                let result = m.fire(kind.with_facts(sample));
                match EXPECTED.iter().find(|(f, e, _)| *f == from && *e == kind) {
                    Some((_, _, to)) => {
                        let change = result.unwrap_or_else(|e| panic!("{from} {kind}: {e}"));
                        let expected_to = to.unwrap_or(DutState::QuickCheck);
                        assert_eq!(change.to, expected_to, "{from} {kind}");
                        assert_eq!(change.from, from);
                        assert_eq!(change.event, kind);
                        assert_eq!(m.state(), expected_to);
                        accepted += 1;
                    }
                    None => {
                        let err = result.expect_err(&format!("{from} {kind} must be refused"));
                        assert_eq!(
                            err,
                            TransitionRefused {
                                state: from,
                                event: kind
                            }
                        );
                        assert_eq!(m.state(), from, "a refused event changed the state");
                        assert!(err.to_string().starts_with(&format!(
                            "{} is not allowed while the DUT is {}",
                            kind.name(),
                            from.name()
                        )));
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!(accepted, EXPECTED.len());
        assert_eq!(accepted + refused, 7 * 16);
    }

    #[test]
    fn start_rules_follow_the_reference_priority() {
        for f in all_facts() {
            let expected = if !f.has_pdu_port {
                S::WaitForConfig
            } else if f.is_retired {
                S::Retired
            } else if !f.ready_for_service {
                S::Training
            } else if !f.quick_check_enabled {
                S::Idle
            } else {
                S::QuickCheck
            };
            assert_eq!(start_state(&f), expected, "{f:?}");
            assert_eq!(DutStateMachine::start(&f).state(), expected);
        }
    }

    #[test]
    fn activate_and_port_assigned_use_the_start_rules() {
        for f in all_facts() {
            let mut m = DutStateMachine::in_state(S::Retired);
            let c = m.fire(DutEvent::Activate(f)).unwrap();
            // Activation clears `is_retired`, whatever the facts say.
            let expected = start_state(&DutFacts {
                is_retired: false,
                ..f
            });
            assert_eq!(c.to, expected, "{f:?}");
            assert_ne!(c.to, S::Retired);

            let mut m = DutStateMachine::in_state(S::WaitForConfig);
            let c = m.fire(DutEvent::PortAssigned(f)).unwrap();
            let expected = start_state(&DutFacts {
                has_pdu_port: true,
                ..f
            });
            assert_eq!(c.to, expected, "{f:?}");
            assert_ne!(c.to, S::WaitForConfig);
        }
        // The seed's edge: RETIRED → QUICK_CHECK on activate.
        let mut m = DutStateMachine::in_state(S::Retired);
        m.fire(DutEvent::Activate(facts(true, true, true, true)))
            .unwrap();
        assert_eq!(m.state(), S::QuickCheck);
    }

    #[test]
    fn seed_scenarios() {
        let ready = facts(true, false, true, true);
        // START → QUICK_CHECK → IDLE → QUEUED → RUNNING → IDLE → RETIRED → QUICK_CHECK
        let mut m = DutStateMachine::start(&ready);
        let steps = [
            (DutEvent::QuickCheckPassed, S::Idle),
            (DutEvent::JobQueued, S::Queued),
            (DutEvent::JobStarted, S::Running),
            (DutEvent::JobFinished, S::Idle),
            (DutEvent::Retire, S::Retired),
            (DutEvent::Activate(ready), S::QuickCheck),
            (DutEvent::QuickCheckFailed, S::Training),
            (DutEvent::TrainingFailed, S::Training),
            (DutEvent::TrainingPassed, S::Idle),
            (DutEvent::JobQueued, S::Queued),
            (DutEvent::JobStarted, S::Running),
            (DutEvent::JobFinishedUnfit, S::Training),
        ];
        assert_eq!(m.state(), S::QuickCheck);
        for (ev, to) in steps {
            m.fire(ev).unwrap_or_else(|e| panic!("{ev:?}: {e}"));
            assert_eq!(m.state(), to, "{ev:?}");
        }
        // A busy DUT cannot be retired or given a second job.
        let mut m = DutStateMachine::in_state(S::Running);
        let e = m.fire(DutEvent::Retire).unwrap_err();
        assert_eq!(
            e.to_string(),
            "RETIRE is not allowed while the DUT is RUNNING: it is busy with a job"
        );
        let e = m.fire(DutEvent::JobQueued).unwrap_err();
        assert_eq!(
            e.to_string(),
            "JOB_QUEUED is not allowed while the DUT is RUNNING: it is busy with a job"
        );
        let e = DutStateMachine::in_state(S::Retired)
            .fire(DutEvent::JobQueued)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "JOB_QUEUED is not allowed while the DUT is RETIRED: it is retired"
        );
        let e = DutStateMachine::in_state(S::Idle)
            .fire(DutEvent::JobCancelled)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "JOB_CANCELLED is not allowed while the DUT is IDLE: it is running no job"
        );
        assert_eq!(m.state(), S::Running);
    }

    #[test]
    fn every_state_reachable_from_start_and_idle_reachable_from_every_state() {
        let successors = |s: DutState| -> Vec<DutState> {
            EventKind::ALL
                .iter()
                .flat_map(|k| all_facts().into_iter().map(move |f| k.with_facts(f)))
                .filter_map(|ev| DutStateMachine::in_state(s).peek(&ev).ok())
                .map(|c| c.to)
                .collect()
        };
        let reach = |from: Vec<DutState>| -> BTreeSet<DutState> {
            let mut seen: BTreeSet<DutState> = from.iter().copied().collect();
            let mut q: VecDeque<DutState> = from.into_iter().collect();
            while let Some(s) = q.pop_front() {
                for n in successors(s) {
                    if seen.insert(n) {
                        q.push_back(n);
                    }
                }
            }
            seen
        };
        let starts: Vec<DutState> = all_facts().iter().map(start_state).collect();
        assert_eq!(reach(starts).len(), DutState::ALL.len());
        for s in DutState::ALL {
            assert!(
                reach(vec![s]).contains(&S::Idle),
                "IDLE unreachable from {s}"
            );
        }
    }

    #[test]
    fn names_codes_and_serde() {
        let expected = [
            (S::WaitForConfig, "WAIT_FOR_CONFIG", 0),
            (S::Idle, "IDLE", 1),
            (S::Training, "TRAINING", 2),
            (S::Queued, "QUEUED", 3),
            (S::Running, "RUNNING", 4),
            (S::Retired, "RETIRED", 5),
            (S::QuickCheck, "QUICK_CHECK", 7),
        ];
        for (s, name, code) in expected {
            assert_eq!(s.name(), name);
            assert_eq!(s.to_string(), name);
            assert_eq!(s.code(), code);
            assert_eq!(DutState::from_code(code), Some(s));
            assert_eq!(name.parse::<DutState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<DutState>(&format!("\"{name}\"")).unwrap(),
                s
            );
            let m = DutStateMachine::in_state(s);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{name}\""));
        }
        assert_eq!(DutState::from_code(6), None);
        assert_eq!(DutState::from_code(8), None);
        assert!("BORKED".parse::<DutState>().is_err());
        assert!(serde_json::from_str::<DutState>("\"idle\"").is_err());
        for k in EventKind::ALL {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
            assert_eq!(k.with_facts(DutFacts::default()).kind(), k);
        }
    }

    #[test]
    fn cheap_enough_for_a_thousand_duts() {
        assert_eq!(std::mem::size_of::<DutStateMachine>(), 1);
        assert_eq!(std::mem::size_of::<Option<DutStateMachine>>(), 1);
    }

    #[test]
    fn accepted_events_lists_the_table_rows() {
        let m = DutStateMachine::in_state(S::Queued);
        let got: Vec<EventKind> = m.accepted_events().collect();
        assert_eq!(got, vec![E::JobStarted, E::JobCancelled, E::PortRemoved]);
        let m = DutStateMachine::in_state(S::WaitForConfig);
        assert_eq!(
            m.accepted_events().collect::<Vec<_>>(),
            vec![E::PortAssigned]
        );
    }
}
