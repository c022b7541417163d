//! Benchmark: a farm of 1,000 DUTs driven through the job lifecycle, plus
//! parsing the configuration. Run with `cargo bench -p vivian-core --bench
//! state_machine`; prints nanoseconds per event and microseconds per parse.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use vivian_core::config::Config;
use vivian_core::state::{DutEvent, DutFacts, DutState, DutStateMachine};

fn main() {
    const DUTS: usize = 1_000;
    const ROUNDS: usize = 2_000;
    let facts = DutFacts {
        has_pdu_port: true,
        is_retired: false,
        ready_for_service: true,
        quick_check_enabled: true,
    };
    let mut farm: Vec<DutStateMachine> =
        (0..DUTS).map(|_| DutStateMachine::start(&facts)).collect();
    for dut in &mut farm {
        dut.fire(DutEvent::QuickCheckPassed).unwrap();
    }
    let cycle = [
        DutEvent::JobQueued,
        DutEvent::JobStarted,
        DutEvent::JobFinished,
        DutEvent::Retire,
        DutEvent::JobQueued, // refused: retired
        DutEvent::Activate(facts),
        DutEvent::QuickCheckPassed,
    ];
    let start = Instant::now();
    let mut refused = 0usize;
    for _ in 0..ROUNDS {
        for dut in farm.iter_mut() {
            for ev in cycle {
                if black_box(dut.fire(black_box(ev))).is_err() {
                    refused += 1;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let events = DUTS * ROUNDS * cycle.len();
    assert!(farm.iter().all(|d| d.state() == DutState::Idle));
    assert_eq!(refused, DUTS * ROUNDS);
    println!(
        "state machine: {DUTS} DUTs, {events} events in {:.3} s: {:.1} ns/event; farm state = {} bytes",
        elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / events as f64,
        std::mem::size_of_val(farm.as_slice())
    );

    let env: BTreeMap<String, String> = [
        ("FARM_NAME", "bench"),
        ("EXECUTOR_URL", "http://10.42.0.1"),
        ("BOOTS_DEFAULT_X86_64_KERNEL", "http://gw/k"),
        ("EXECUTOR_JOB__NTP_PEER", "10.42.0.1"),
        (
            "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
            "GPU hang",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    const PARSES: u32 = 2_000;
    let start = Instant::now();
    for _ in 0..PARSES {
        black_box(Config::from_env_map(black_box(&env)).unwrap());
    }
    println!(
        "config: {:.1} us per Config::from_env_map",
        start.elapsed().as_secs_f64() * 1e6 / PARSES as f64
    );
}
