//! The bench's overall deadline: a bench never waits forever. Each bench names the phase it
//! is in ([`phase`]); a watchdog thread started with the bench ([`start`]) waits until the
//! deadline and, if the bench is still running then, prints which phase stalled and for how
//! long, and exits the process with [`EXIT_DEADLINE`]. The nodes a bench started die with it
//! (they get SIGTERM when the thread that spawned them exits, see `tools::procs`).
//!
//! Invariants: the watchdog never touches the bench's state beyond the phase name; a bench
//! that finishes in time is never interrupted (the thread just dies with the process).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Exit status of a bench stopped by its deadline (2 is any other failure).
pub(crate) const EXIT_DEADLINE: i32 = 3;

/// The phase the bench is in, and since when.
static PHASE: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// Notes that the bench entered `name` (the text of its progress line).
pub(crate) fn phase(name: &str) {
    let name = name.trim_end_matches([' ', '…', '.']).to_string();
    assert!(!name.is_empty(), "a phase has a name");
    *PHASE.lock().expect("phase lock") = Some((name, Instant::now()));
}

/// Starts the watchdog: after `deadline`, a bench still running is stopped with a message
/// naming the phase that stalled.
pub(crate) fn start(command: &'static str, deadline: Duration) {
    assert!(!deadline.is_zero(), "a deadline of zero stops every bench");
    let began = Instant::now();
    std::thread::Builder::new()
        .name("bench-deadline".into())
        .spawn(move || {
            // Sleep in slices: a suspended machine must not stretch the deadline.
            while began.elapsed() < deadline {
                std::thread::sleep((deadline - began.elapsed()).min(Duration::from_secs(1)));
            }
            let phase = PHASE.lock().map(|p| p.clone()).unwrap_or_default();
            let stalled = match phase {
                Some((name, since)) => format!(
                    "stalled in phase \"{name}\" (entered {:.1} s earlier)",
                    since.elapsed().as_secs_f64()
                ),
                None => "stalled before its first phase".to_string(),
            };
            eprintln!(
                "sixfold-bench {command}: overall deadline of {} s passed; {stalled}; \
                 giving up (raise it with --deadline SECS if the machine is just slow)",
                deadline.as_secs()
            );
            std::process::exit(EXIT_DEADLINE);
        })
        .expect("cannot start the deadline thread");
}
