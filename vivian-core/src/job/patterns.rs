//! Console patterns (EX B.4) and the [`ConsoleMatcher`], a pure state
//! machine fed with console bytes that reports what matched and computes the
//! job's verdict.

use std::collections::HashSet;
use std::fmt;

use indexmap::IndexMap;
use regex::bytes::Regex;
use serde::Deserialize;

use super::regex::compile_python_regex;
use super::timeouts::WatchdogAction;
use super::{JobError, JobStatus};
use crate::console::LineSplitter;

/// The default `session_end` pattern: a kernel's power-down message.
pub const DEFAULT_SESSION_END_REGEX: &str = r"^\[[\d \.]{12}\] reboot: Power Down$";

/// Longest console line kept for matching; a longer run of bytes without a
/// newline is matched as a line of its own so memory stays bounded (the
/// bound of the [`LineSplitter`] the matcher splits lines with).
pub const MAX_LINE_LEN: usize = crate::console::DEFAULT_MAX_LINE;

/// A compiled console pattern.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    /// Compiles `source` with Python bytes-regex semantics. The error names
    /// the pattern, as in the reference: "Console pattern '<re>' is not a
    /// valid regular expression: <msg>".
    pub fn new(source: &str) -> Result<Self, JobError> {
        let regex = compile_python_regex(source).map_err(|e| JobError::InvalidRegex {
            pattern: source.to_string(),
            message: e.to_string(),
        })?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    /// The pattern as written in the job.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches anywhere in `line` (Python `search`).
    pub fn is_match(&self, line: &[u8]) -> bool {
        self.regex.is_match(line)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<ConsoleRegex: regex={}>", self.source)
    }
}

/// A console watchdog: its three patterns.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogPatterns {
    /// Starts the watchdog's timeout.
    pub start: Pattern,
    /// Restarts its clock.
    pub reset: Pattern,
    /// Stops it.
    pub stop: Pattern,
}

/// The validated `console_patterns` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsolePatterns {
    /// Ends the session (default [`DEFAULT_SESSION_END_REGEX`]).
    pub session_end: Pattern,
    /// Requests a reboot into the `continue` deployment.
    pub session_reboot: Option<Pattern>,
    /// Defines PASS (matched) versus FAIL (not matched).
    pub job_success: Option<Pattern>,
    /// Turns a PASS into a WARN.
    pub job_warn: Option<Pattern>,
    /// Marks the DUT unfit for service at the end of the session.
    pub machine_unfit_for_service: Option<Pattern>,
    /// Watchdogs by name, in file order.
    pub watchdogs: IndexMap<String, WatchdogPatterns>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatternWire {
    regex: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WatchdogWire {
    start: PatternWire,
    reset: PatternWire,
    stop: PatternWire,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsolePatternsWire {
    session_end: Option<PatternWire>,
    session_reboot: Option<PatternWire>,
    job_success: Option<PatternWire>,
    job_warn: Option<PatternWire>,
    machine_unfit_for_service: Option<PatternWire>,
    watchdogs: Option<IndexMap<String, WatchdogWire>>,
}

impl ConsolePatternsWire {
    pub(crate) fn validate(
        &self,
        default_unfit: Option<&str>,
    ) -> Result<ConsolePatterns, JobError> {
        let opt = |p: &Option<PatternWire>| p.as_ref().map(|p| Pattern::new(&p.regex)).transpose();
        let unfit = match &self.machine_unfit_for_service {
            Some(p) => Some(Pattern::new(&p.regex)?),
            None => default_unfit.map(Pattern::new).transpose()?,
        };
        let mut watchdogs = IndexMap::new();
        for (name, wd) in self.watchdogs.iter().flatten() {
            watchdogs.insert(
                name.clone(),
                WatchdogPatterns {
                    start: Pattern::new(&wd.start.regex)?,
                    reset: Pattern::new(&wd.reset.regex)?,
                    stop: Pattern::new(&wd.stop.regex)?,
                },
            );
        }
        Ok(ConsolePatterns {
            session_end: match &self.session_end {
                Some(p) => Pattern::new(&p.regex)?,
                None => Pattern::new(DEFAULT_SESSION_END_REGEX)?,
            },
            session_reboot: opt(&self.session_reboot)?,
            job_success: opt(&self.job_success)?,
            job_warn: opt(&self.job_warn)?,
            machine_unfit_for_service: unfit,
            watchdogs,
        })
    }
}

/// Something a console line triggered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// `session_end` matched: the session is over.
    SessionEnd,
    /// `session_reboot` matched: reboot into the `continue` deployment.
    SessionReboot,
    /// `job_success` matched.
    JobSuccess,
    /// `job_warn` matched.
    JobWarn,
    /// `machine_unfit_for_service` matched (takes effect at session end).
    MachineUnfitForService,
    /// A watchdog pattern matched.
    Watchdog {
        /// The watchdog's name.
        name: String,
        /// What to do with its timeout.
        action: WatchdogAction,
    },
}

/// One console line that matched at least one pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineMatch {
    /// The line, with its line ending.
    pub line: Vec<u8>,
    /// The names matched, in the reference's wording (`session_end`,
    /// `job_success`, `<watchdog>.start`, ...), for the "Matched the
    /// following patterns: a, b" control message.
    pub patterns: Vec<String>,
    /// What the runner must act upon.
    pub events: Vec<ConsoleEvent>,
    /// How far into the chunk given to [`ConsoleMatcher::feed`] the line
    /// ends (the index just past its last byte): a runner that forwards the
    /// chunk to the job's client sends the bytes up to here, then the
    /// match's control message, so the message never cuts a console line
    /// in two. From [`ConsoleMatcher::process_line`]: the line's length.
    pub end: usize,
}

impl LineMatch {
    /// The reference's control text: `Matched the following patterns: a, b`.
    pub fn control_text(&self) -> String {
        format!(
            "Matched the following patterns: {}",
            self.patterns.join(", ")
        )
    }

    /// The control-message metadata of the `DUT_CONSOLE_PATTERN_MATCHED`
    /// tag: `{"patterns": [...], "line": "<line, lossy UTF-8>"}`.
    pub fn metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("patterns".into(), serde_json::json!(self.patterns));
        m.insert(
            "line".into(),
            serde_json::json!(String::from_utf8_lossy(&self.line)),
        );
        m
    }
}

/// What one chunk of console bytes produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleFeed {
    /// Whether the chunk counts as console activity (only once a chunk of
    /// this boot contained a newline; after that any byte counts).
    pub activity: bool,
    /// The complete lines of the chunk that matched something.
    pub matches: Vec<LineMatch>,
}

/// The console state of a job: it splits console bytes into lines, applies
/// the patterns, accumulates what matched over the whole job and gives the
/// verdict. It never reads a clock: watchdog events are reported for the
/// runner to apply to its [`Timeouts`](super::Timeouts).
#[derive(Debug, Clone)]
pub struct ConsoleMatcher {
    lines: LineSplitter,
    seen_newline: bool,
    state: MatchState,
}

/// What the lines matched so far decided (kept apart from the splitter so
/// that matching a line can use it while the splitter gives the line).
#[derive(Debug, Clone)]
struct MatchState {
    patterns: ConsolePatterns,
    armed_watchdogs: HashSet<String>,
    running_watchdogs: HashSet<String>,
    matched: Vec<String>,
    session_ended: bool,
    reboot_requested: bool,
    success: bool,
    warn: bool,
    unfit: bool,
}

impl ConsoleMatcher {
    /// A matcher for `patterns`. `armed_watchdogs` lists the watchdogs that
    /// have a timeout (`timeouts.watchdogs.<name>`); the others are inert.
    pub fn new<I, S>(patterns: ConsolePatterns, armed_watchdogs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ConsoleMatcher {
            lines: LineSplitter::new(MAX_LINE_LEN),
            seen_newline: false,
            state: MatchState {
                patterns,
                armed_watchdogs: armed_watchdogs.into_iter().map(Into::into).collect(),
                running_watchdogs: HashSet::new(),
                matched: Vec::new(),
                session_ended: false,
                reboot_requested: false,
                success: false,
                warn: false,
                unfit: false,
            },
        }
    }

    /// The patterns in use.
    pub fn patterns(&self) -> &ConsolePatterns {
        &self.state.patterns
    }

    /// Starts a new boot: clears the reboot request, cancels the watchdogs,
    /// waits again for a newline before counting activity and drops any
    /// partial line left by the previous boot (a line the DUT had not
    /// finished when it lost power never joins the new boot's first line).
    ///
    /// Call it when the DUT has just been powered on; console bytes from
    /// before that moment must not be fed at all (they belong to no boot of
    /// the job).
    pub fn reset_per_boot(&mut self) {
        self.state.reboot_requested = false;
        self.state.running_watchdogs.clear();
        self.seen_newline = false;
        self.lines.clear();
    }

    /// Feeds console bytes; complete lines are matched, a trailing partial
    /// line is kept for the next call.
    pub fn feed(&mut self, data: &[u8]) -> ConsoleFeed {
        let mut out = ConsoleFeed::default();
        // A line's end in `data`: the bytes it took from `data` (its first
        // bytes may have been carried over from earlier chunks).
        let mut carried = self.lines.pending().len();
        let mut end = 0;
        let (state, seen_newline) = (&mut self.state, &mut self.seen_newline);
        self.lines.push(data, |line| {
            end += line.bytes.len() - carried;
            carried = 0;
            // Only complete lines end with a newline.
            *seen_newline |= line.complete;
            if let Some(mut m) = state.process_line(line.bytes) {
                m.end = end;
                out.matches.push(m);
            }
        });
        out.activity = self.seen_newline && !data.is_empty();
        out
    }

    /// Matches one line (normally called by [`feed`](Self::feed), which
    /// also gives lines cut at [`MAX_LINE_LEN`]).
    pub fn process_line(&mut self, line: &[u8]) -> Option<LineMatch> {
        self.state.process_line(line)
    }

    /// Every pattern name matched so far in the job, in first-match order.
    pub fn matched(&self) -> &[String] {
        &self.state.matched
    }

    /// Whether `session_end` matched.
    pub fn session_ended(&self) -> bool {
        self.state.session_ended
    }

    /// Whether `session_reboot` matched during this boot.
    pub fn reboot_requested(&self) -> bool {
        self.state.reboot_requested
    }

    /// Whether `machine_unfit_for_service` ever matched.
    pub fn machine_unfit_for_service(&self) -> bool {
        self.state.unfit
    }

    /// Whether the watchdog runs (its `start` matched and `stop` did not).
    pub fn watchdog_running(&self, name: &str) -> bool {
        self.state.running_watchdogs.contains(name)
    }

    /// The verdict (EX B.4): INCOMPLETE until `session_end` matched; then,
    /// with a `job_success` pattern, PASS (WARN if `job_warn` ever matched)
    /// or FAIL; without one, COMPLETE.
    pub fn status(&self) -> JobStatus {
        verdict(
            self.state.session_ended,
            self.state.patterns.job_success.is_some(),
            self.state.success,
            self.state.warn,
        )
    }
}

impl MatchState {
    /// Matches one line: records what it decided and reports it.
    fn process_line(&mut self, line: &[u8]) -> Option<LineMatch> {
        let mut patterns = Vec::new();
        let mut events = Vec::new();
        let p = &self.patterns;
        if p.session_end.is_match(line) {
            self.session_ended = true;
            patterns.push("session_end".to_string());
            events.push(ConsoleEvent::SessionEnd);
        }
        if p.session_reboot.as_ref().is_some_and(|r| r.is_match(line)) {
            self.reboot_requested = true;
            patterns.push("session_reboot".to_string());
            events.push(ConsoleEvent::SessionReboot);
        }
        if p.job_success.as_ref().is_some_and(|r| r.is_match(line)) {
            self.success = true;
            patterns.push("job_success".to_string());
            events.push(ConsoleEvent::JobSuccess);
        }
        if p.job_warn.as_ref().is_some_and(|r| r.is_match(line)) {
            self.warn = true;
            patterns.push("job_warn".to_string());
            events.push(ConsoleEvent::JobWarn);
        }
        if p.machine_unfit_for_service
            .as_ref()
            .is_some_and(|r| r.is_match(line))
        {
            self.unfit = true;
            patterns.push("machine_unfit_for_service".to_string());
            events.push(ConsoleEvent::MachineUnfitForService);
        }
        for (name, wd) in &p.watchdogs {
            if !self.armed_watchdogs.contains(name) {
                continue;
            }
            let mut fire = |action: WatchdogAction, suffix: &str| {
                patterns.push(format!("{name}.{suffix}"));
                events.push(ConsoleEvent::Watchdog {
                    name: name.clone(),
                    action,
                });
            };
            if !self.running_watchdogs.contains(name) {
                if wd.start.is_match(line) {
                    self.running_watchdogs.insert(name.clone());
                    fire(WatchdogAction::Start, "start");
                }
            } else {
                if wd.reset.is_match(line) {
                    fire(WatchdogAction::Reset, "reset");
                }
                if wd.stop.is_match(line) {
                    self.running_watchdogs.remove(name);
                    fire(WatchdogAction::Stop, "stop");
                }
            }
        }
        if patterns.is_empty() {
            return None;
        }
        for name in &patterns {
            if !self.matched.contains(name) {
                self.matched.push(name.clone());
            }
        }
        Some(LineMatch {
            end: line.len(),
            line: line.to_vec(),
            patterns,
            events,
        })
    }
}

/// The verdict rules of EX B.4 as a pure function.
pub fn verdict(
    session_ended: bool,
    has_success_pattern: bool,
    success: bool,
    warn: bool,
) -> JobStatus {
    match (session_ended, has_success_pattern, success, warn) {
        (false, ..) => JobStatus::Incomplete,
        (true, false, ..) => JobStatus::Complete,
        (true, true, false, _) => JobStatus::Fail,
        (true, true, true, false) => JobStatus::Pass,
        (true, true, true, true) => JobStatus::Warn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns() -> ConsolePatterns {
        ConsolePatterns {
            session_end: Pattern::new("^MaRS: Registration .*$").unwrap(),
            session_reboot: None,
            job_success: Some(Pattern::new("^MaRS: Registration complete$").unwrap()),
            job_warn: None,
            machine_unfit_for_service: None,
            watchdogs: IndexMap::new(),
        }
    }

    #[test]
    fn a_new_boot_drops_the_partial_line_of_the_previous_one() {
        let mut m = ConsoleMatcher::new(patterns(), Vec::<String>::new());
        // The DUT lost power in the middle of a line.
        assert!(m.feed(b"MaRS: Registration com").matches.is_empty());
        m.reset_per_boot();
        let f = m.feed(b"plete\nMaRS: Registration failed\n");
        assert_eq!(f.matches.len(), 1, "{f:?}");
        assert_eq!(f.matches[0].line, b"MaRS: Registration failed\n");
        assert_eq!(m.status(), JobStatus::Fail);
    }

    #[test]
    fn matches_say_where_their_line_ends_in_the_chunk() {
        let mut m = ConsoleMatcher::new(patterns(), Vec::<String>::new());
        assert!(m.feed(b"MaRS: Registration com").matches.is_empty());
        // The line started in the previous chunk ends 6 bytes into this
        // one; the next ends 21 bytes later; the partial line after it is
        // not matched yet.
        let f = m.feed(b"plete\nMaRS: Registration x\nMaRS: Regis");
        let ends: Vec<usize> = f.matches.iter().map(|l| l.end).collect();
        assert_eq!(ends, [6, 27], "{f:?}");
        assert_eq!(f.matches[0].line, b"MaRS: Registration complete\n");
    }

    #[test]
    fn a_partial_line_joins_the_next_bytes_within_a_boot() {
        let mut m = ConsoleMatcher::new(patterns(), Vec::<String>::new());
        assert!(m.feed(b"MaRS: Registration com").matches.is_empty());
        let f = m.feed(b"plete\n");
        assert_eq!(f.matches.len(), 1);
        assert_eq!(m.status(), JobStatus::Pass);
    }
}
