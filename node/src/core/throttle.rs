//! Back-pressure: when coalescing falls behind, or the journal runs low on free space, the node
//! delays its acks. A writer that waits for them slows down and the background catches up;
//! the engine's 4/6 quorum routes around one or two nodes that ack late, so a node in trouble
//! costs commits nothing until three of a PG's six are. A full journal is another matter: an
//! append that finds no room is refused with `JournalFull` at once (see `commit`), never held.
//!
//! The decision is taken for each Ack as it is about to leave, from the state at that moment
//! and the latest time the core was given (pure: no clock is read here):
//! - journal pressure: none below `journal_percent` of the journal's bytes in use, then rising
//!   linearly to full at [`super::RESERVE_PERCENT`] (full from there on);
//! - backlog pressure: none below `backlog_records` records waiting to be coalesced, then
//!   rising linearly to full at twice that many (the count is capped there and refreshed at
//!   most every [`BACKLOG_REFRESH`], since counting costs a step per record);
//! - under either, the ack waits `delay_min + (delay_max − delay_min) × pressure` (the larger
//!   pressure of the two), at most [`ACK_DELAY_LIMIT`].
//!
//! A held ack leaves at its deadline: [`NodeCore::poll_timeout`] names the earliest, and
//! [`NodeCore::handle_timeout`] sends what is due.
//!
//! Invariants:
//! - nothing is held forever, nor until a condition (a smaller backlog, a freer journal) that
//!   might itself need acks to come true: each held ack has a deadline fixed when it was held,
//!   at most [`ACK_DELAY_LIMIT`] later;
//! - only the reply waits: the batch was indexed when it became durable, so it counts in the
//!   SCL, may be coalesced, and lets GC go on; gossip's batches are never answered, so never
//!   held; replies other than Acks (errors, Done, VolumeState, pages) are never held;
//! - acks leave in the order they were decided (deadlines never decrease along the queue), so
//!   they still leave in journal order;
//! - at shutdown every held ack leaves at once; a node that stops answers them `ShuttingDown`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use wire::{Epoch, ErrorCode, Message, SegmentAck};

use super::{ConnId, NodeCore, Phase};
use crate::manifest::SegmentKey;

/// The longest an ack is ever held: far below a writer's request deadline (the engine's is
/// 5 s), so a throttled node is slow, never taken for dead.
pub const ACK_DELAY_LIMIT: Duration = Duration::from_secs(1);
/// How long a count of the coalesce backlog stays good for throttling decisions.
pub const BACKLOG_REFRESH: Duration = Duration::from_millis(50);
/// Pressure at its full, in thousandths.
const FULL: u64 = 1000;

const _: () = assert!(super::PRESSURE_PERCENT < super::RESERVE_PERCENT);
const _: () = assert!(ThrottleConfig::JOURNAL_PERCENT_DEFAULT > super::PRESSURE_PERCENT);
const _: () = assert!(ThrottleConfig::JOURNAL_PERCENT_DEFAULT < super::RESERVE_PERCENT);

/// When and how much the node delays its acks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Journal use (percent of its bytes) from which acks are delayed (at most
    /// [`super::RESERVE_PERCENT`]; 0 throttles always, which tests use).
    pub journal_percent: u64,
    /// Records waiting to be coalesced from which acks are delayed (at least 1).
    pub backlog_records: usize,
    /// The delay as pressure begins.
    pub delay_min: Duration,
    /// The delay at full pressure (at most [`ACK_DELAY_LIMIT`]).
    pub delay_max: Duration,
}

impl ThrottleConfig {
    /// Between GC's pressure point (50 %: records held for peers start to go) and the reserve
    /// (75 %: only appends that continue a chain are taken).
    pub const JOURNAL_PERCENT_DEFAULT: u64 = 60;
    /// Eight full coalescing rounds.
    pub const BACKLOG_RECORDS_DEFAULT: usize = 8 * super::ROUND_RECORDS_MAX;

    /// Whether the values are usable; the error names the bad one.
    pub fn check(&self) -> Result<(), String> {
        if self.journal_percent > super::RESERVE_PERCENT {
            return Err(format!(
                "journal_percent = {} must be at most {} (the journal's reserve)",
                self.journal_percent,
                super::RESERVE_PERCENT
            ));
        }
        if self.backlog_records == 0 {
            return Err("backlog_records must be at least 1".into());
        }
        if self.delay_min > self.delay_max || self.delay_max > ACK_DELAY_LIMIT {
            return Err(format!(
                "ack delays must satisfy min ({:?}) ≤ max ({:?}) ≤ {ACK_DELAY_LIMIT:?}",
                self.delay_min, self.delay_max
            ));
        }
        Ok(())
    }
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            journal_percent: Self::JOURNAL_PERCENT_DEFAULT,
            backlog_records: Self::BACKLOG_RECORDS_DEFAULT,
            delay_min: Duration::from_millis(1),
            delay_max: Duration::from_millis(10),
        }
    }
}

/// What back-pressure is doing, for the driver's log line and metrics, and for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleStatus {
    /// Whether the last ack decided was under pressure (delayed).
    pub throttled: bool,
    /// Times the node entered the throttled state since it started.
    pub episodes: u64,
    /// Acks delayed since the node started.
    pub acks_throttled: u64,
    /// Acks held now.
    pub acks_held: u64,
    /// The delay given to the last ack decided under pressure.
    pub delay: Duration,
    /// Journal use (percent of its bytes) at the last decision.
    pub journal_used_percent: u64,
    /// Records waiting to be coalesced at the last decision (counted up to twice the bound).
    pub backlog_records: u64,
}

/// An Ack decided and waiting for its deadline.
#[derive(Clone, Copy, Debug)]
struct HeldAck {
    until: Instant,
    conn: ConnId,
    request_id: u64,
    key: SegmentKey,
    epoch: Epoch,
}

#[derive(Default)]
pub(super) struct Throttle {
    config: ThrottleConfig,
    held: VecDeque<HeldAck>,
    /// The backlog as last counted (up to twice the bound), and when.
    backlog: Option<(Instant, usize)>,
    status: ThrottleStatus,
}

impl Throttle {
    pub(super) fn is_idle(&self) -> bool {
        assert!(self.held.len() as u64 == self.status.acks_held);
        // O(1): this runs on every held ack. The order is kept where acks are held.
        assert!(self.held.front().map(|h| h.until) <= self.held.back().map(|h| h.until));
        self.held.is_empty()
    }

    pub(super) fn drain_waiting(&mut self) -> impl Iterator<Item = (ConnId, u64)> + use<> {
        let held = std::mem::take(&mut self.held);
        self.status.acks_held = 0;
        assert!(self.held.is_empty());
        held.into_iter().map(|h| (h.conn, h.request_id))
    }

    /// Whether the backlog, as last counted, is past the bound: acks are being delayed for it,
    /// so coalescing must not yield to appends any more (it would be throttling for nothing).
    pub(super) fn backlog_behind(&self) -> bool {
        let bound = self.config.backlog_records;
        let behind = self.backlog.is_some_and(|(_, counted)| counted >= bound);
        assert!(bound >= 1);
        behind
    }

    /// The coalesce backlog changed a lot (a round finished, PGMRPL moved): count it afresh.
    pub(super) fn backlog_changed(&mut self) {
        self.backlog = None;
    }
}

/// `part` of the way from `from` to `to`, in thousandths (`part ≥ from`), capped at full.
fn level(part: u64, from: u64, to: u64) -> u64 {
    assert!(part >= from);
    assert!(to > from);
    ((part - from) * FULL / (to - from)).min(FULL)
}

impl NodeCore {
    /// Replaces the back-pressure settings (the defaults are [`ThrottleConfig::default`]).
    pub fn configure_throttle(&mut self, config: ThrottleConfig) {
        if let Err(e) = config.check() {
            panic!("bad throttle configuration: {e}");
        }
        self.throttle.config = config;
        self.throttle.backlog = None;
    }

    /// What back-pressure is doing now.
    pub fn throttle_status(&self) -> ThrottleStatus {
        let status = self.throttle.status;
        assert!(status.acks_held == self.throttle.held.len() as u64);
        assert!(status.acks_held <= status.acks_throttled);
        status
    }

    /// Journal pressure in thousandths (`None`: below the threshold), and the use in percent.
    fn journal_pressure(&self) -> (Option<u64>, u64) {
        let c = self.commit.counters();
        let permille = c.journal_bytes_used * FULL / c.journal_bytes_capacity;
        let (from, to) = (
            self.throttle.config.journal_percent * 10,
            super::RESERVE_PERCENT * 10,
        );
        let pressure = if self.journal_used_percent() >= super::RESERVE_PERCENT || permille >= to {
            Some(FULL) // The reserve: files are full enough that gap records are refused.
        } else if permille < from {
            None
        } else {
            Some(level(permille, from, to))
        };
        assert!(pressure.is_none_or(|p| p <= FULL));
        (pressure, permille / 10)
    }

    /// Backlog pressure in thousandths (`None`: below the bound), and the backlog as counted.
    fn backlog_pressure(&mut self, now: Instant) -> (Option<u64>, usize) {
        let bound = self.throttle.config.backlog_records;
        let counted = match self.throttle.backlog {
            Some((at, counted)) if now < at + BACKLOG_REFRESH => counted,
            _ => {
                let counted = self.coalesce_backlog_capped(2 * bound);
                self.throttle.backlog = Some((now, counted));
                counted
            }
        };
        assert!(counted <= 2 * bound);
        let pressure =
            (counted >= bound).then(|| level(counted as u64, bound as u64, 2 * bound as u64));
        (pressure, counted)
    }

    /// How long an ack decided `now` waits (`None`: it need not), noting the decision.
    fn ack_delay(&mut self, now: Instant) -> Option<Duration> {
        let (journal, used) = self.journal_pressure();
        let (backlog, counted) = self.backlog_pressure(now);
        let pressure = journal.max(backlog).max(self.backup_pressure());
        let c = &self.throttle.config;
        let delay = pressure.map(|p| {
            let span = (c.delay_max - c.delay_min).as_nanos();
            let extra = u64::try_from(span * u128::from(p) / u128::from(FULL)).expect("≤ 1 s");
            c.delay_min + Duration::from_nanos(extra)
        });
        let s = &mut self.throttle.status;
        if delay.is_some() && !s.throttled {
            s.episodes += 1;
        }
        s.throttled = delay.is_some();
        s.delay = delay.unwrap_or(s.delay);
        s.journal_used_percent = used;
        s.backlog_records = counted as u64;
        assert!(delay.is_none_or(|d| d <= ACK_DELAY_LIMIT));
        assert!(delay.is_none() || self.throttle.status.episodes > 0);
        delay
    }

    /// Acks a durable batch of `key` at `epoch` now, or holds the ack until its deadline if
    /// the node is under pressure (or acks decided before are still held: order is kept).
    pub(super) fn ack_or_hold(
        &mut self,
        conn: ConnId,
        request_id: u64,
        key: SegmentKey,
        epoch: Epoch,
    ) {
        let now = match (self.gossip_now(), &self.phase) {
            (Some(now), Phase::Serving) => now,
            // No time given yet, or shutting down: nothing to pace against.
            _ => return self.send_ack(conn, request_id, key, epoch),
        };
        self.release_held_acks(now);
        let delay = self.ack_delay(now).unwrap_or(Duration::ZERO);
        let behind = self.throttle.held.back().map_or(now, |h| h.until);
        // Never before an ack held earlier: acks leave in the order they were decided.
        let until = (now + delay).max(behind);
        assert!(until >= behind);
        if until <= now {
            return self.send_ack(conn, request_id, key, epoch);
        }
        self.throttle.held.push_back(HeldAck {
            until,
            conn,
            request_id,
            key,
            epoch,
        });
        let s = &mut self.throttle.status;
        s.acks_throttled += 1;
        s.acks_held += 1;
        assert!(until <= now + ACK_DELAY_LIMIT, "nothing is held for long");
        assert!(s.acks_held <= s.acks_throttled);
        assert!(!self.throttle.is_idle(), "just held");
    }

    /// Sends every held ack whose deadline is `now` or earlier.
    pub(super) fn release_held_acks(&mut self, now: Instant) {
        while let Some(held) = self.throttle.held.front().copied() {
            if held.until > now {
                break;
            }
            self.throttle.held.pop_front();
            self.throttle.status.acks_held -= 1;
            self.send_ack(held.conn, held.request_id, held.key, held.epoch);
        }
        assert!(self.throttle.held.front().is_none_or(|h| h.until > now));
        assert!(self.throttle.status.acks_held == self.throttle.held.len() as u64);
    }

    /// Sends every held ack now (shutdown: nothing to pace any more).
    pub(super) fn release_all_held_acks(&mut self) {
        let last = self.throttle.held.back().map(|h| h.until);
        if let Some(last) = last {
            self.release_held_acks(last);
        }
        assert!(self.throttle.is_idle());
    }

    /// When the next held ack is due.
    pub(super) fn throttle_timeout(&self) -> Option<Instant> {
        let next = self.throttle.held.front().map(|h| h.until);
        assert!(
            next.is_none() || self.stopped().is_none(),
            "a stop drains them"
        );
        next
    }

    /// Sends the Ack of a durable batch of `key` at `epoch`, with the segment's SCL as it is
    /// now; `StaleEpoch` instead if the volume's epoch moved on since the batch was taken.
    pub(super) fn send_ack(
        &mut self,
        conn: ConnId,
        request_id: u64,
        key: SegmentKey,
        epoch: Epoch,
    ) {
        let current = self.epoch(key.volume);
        assert!(epoch <= current, "epochs only grow");
        if epoch < current {
            let text = format!(
                "epoch {epoch} was replaced by volume {}'s epoch {current} while the batch was \
                 in flight: it is durable but not acknowledged",
                key.volume
            );
            return self.reply_error(conn, request_id, ErrorCode::StaleEpoch, text);
        }
        let scl = self.scl(&key).expect("segments are never unhosted");
        let ack = SegmentAck {
            volume: key.volume,
            pg: key.pg,
            segment: key.segment,
            scl,
        };
        self.reply(conn, request_id, Message::Ack(ack));
    }
}
