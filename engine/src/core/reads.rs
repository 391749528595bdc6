//! Reads: one segment at a time, hedged. A read takes the current VDL as its read point,
//! registers it (PGMRPL never passes a registered read point), turns it into the PG's own read
//! point (the PG's last record at or below it: a segment's SCL can never pass its PG's last
//! record), and asks a segment whose SCL the writer knows to be at least that. If no answer
//! comes within `hedge_delay`, or the answer is a refusal, it asks the next one; the first page
//! wins. A page read from storage enters the buffer cache only if no record for that page was
//! allocated after the read point.
//!
//! Invariants: a read completes exactly once (page, refusal by every candidate, deadline, or
//! fence); its read point is unregistered when it completes or is cancelled.

use std::collections::VecDeque;
use std::time::Instant;

use wire::{Lsn, Message, PageId, PageImage, PgId, ReadPage, SegmentIndex};

use super::{Completion, Payload, ReadId, ReadStart, RequestKind, VolumeCore, VolumeError};

#[derive(Debug)]
pub(super) struct ReadState {
    page: PageId,
    pg: PgId,
    /// The volume read point registered for PGMRPL.
    read_point: Lsn,
    /// The PG's read point sent to the segments.
    pg_read_point: Lsn,
    candidates: VecDeque<SegmentIndex>,
    inflight: usize,
    failures: Vec<String>,
    next_hedge: Option<Instant>,
    deadline: Instant,
    /// Whether a successful page may enter the cache.
    cache: bool,
}

impl ReadState {
    pub(super) fn next_timer(&self) -> Option<Instant> {
        Some(
            self.next_hedge
                .map_or(self.deadline, |h| h.min(self.deadline)),
        )
    }
}

impl VolumeCore {
    /// The page at the current VDL: from the buffer cache, or from one segment.
    pub fn read_page(&mut self, now: Instant, page: PageId) -> ReadStart {
        if let Err(e) = self.check_usable() {
            return ReadStart::Done(Err(e));
        }
        let serving = self.serving.as_mut().expect("serving");
        if let Some(image) = serving.cache.get(page) {
            return ReadStart::Done(Ok(image.clone()));
        }
        let read_point = serving.writer.vdl();
        self.start_read(now, page, read_point, None, true)
    }

    /// Reads `page` as of `read_point` from storage, bypassing the cache: from the segments in
    /// `order` if given (tests aim at a lagging segment first), else from those the writer
    /// knows to have reached the read point, hedging after `hedge_delay`.
    pub fn read_page_from(
        &mut self,
        now: Instant,
        page: PageId,
        read_point: Lsn,
        order: Option<Vec<SegmentIndex>>,
    ) -> ReadStart {
        if let Err(e) = self.check_usable() {
            return ReadStart::Done(Err(e));
        }
        self.start_read(now, page, read_point, order, false)
    }

    fn start_read(
        &mut self,
        now: Instant,
        page: PageId,
        read_point: Lsn,
        order: Option<Vec<SegmentIndex>>,
        cache: bool,
    ) -> ReadStart {
        let Some(pg) = self.layout.geometry.pg_of(page) else {
            let error = format!("page {} is outside the volume", page.0);
            return ReadStart::Done(Err(VolumeError::Read(error)));
        };
        let serving = self.serving.as_ref().expect("serving");
        let pg_read_point = pg_read_point(&serving.pg_lsns[pg.0 as usize], read_point);
        let candidates: VecDeque<SegmentIndex> = match order {
            Some(order) => order.into(),
            None => {
                let mut c = serving.writer.readable_segments(pg, pg_read_point);
                if c.is_empty() {
                    let error =
                        format!("no segment of pg {pg} has reached read point {read_point}");
                    return ReadStart::Done(Err(VolumeError::Read(error)));
                }
                self.read_rotation = self.read_rotation.wrapping_add(1);
                let len = c.len();
                c.rotate_left(self.read_rotation % len);
                c.into()
            }
        };
        let id = ReadId(self.next_read);
        self.next_read += 1;
        *self.read_points.entry(read_point).or_default() += 1;
        let state = ReadState {
            page,
            pg,
            read_point,
            pg_read_point,
            candidates,
            inflight: 0,
            failures: Vec::new(),
            next_hedge: None,
            deadline: now + self.config.request_timeout,
            cache,
        };
        self.reads.insert(id, state);
        self.read_next_candidate(now, id);
        ReadStart::Pending(id)
    }

    /// Asks the next candidate segment, or completes the read with every failure if none is
    /// left and nothing is in flight.
    fn read_next_candidate(&mut self, now: Instant, id: ReadId) {
        let state = self.reads.get_mut(&id).expect("live read");
        let Some(segment) = state.candidates.pop_front() else {
            state.next_hedge = None;
            if state.inflight == 0 {
                let error = format!(
                    "every segment failed to serve page {}: {}",
                    state.page.0,
                    state.failures.join("; ")
                );
                self.complete_read(id, Err(VolumeError::Read(error)));
            }
            return;
        };
        state.inflight += 1;
        state.next_hedge = Some(now + self.config.hedge_delay);
        let request = ReadPage {
            volume: self.layout.volume,
            epoch: self.epoch,
            pg: state.pg,
            segment,
            page: state.page,
            read_point: state.pg_read_point,
        };
        let node = self.layout.placement[state.pg.0 as usize][segment.0 as usize];
        let kind = RequestKind::Read { read: id, segment };
        self.send(
            now,
            node,
            kind,
            Payload::Message(Message::ReadPage(request)),
        );
    }

    pub(super) fn on_read_reply(
        &mut self,
        now: Instant,
        id: ReadId,
        segment: SegmentIndex,
        reply: Result<Message, String>,
    ) {
        let Some(state) = self.reads.get_mut(&id) else {
            return; // Already answered by another segment.
        };
        assert!(state.inflight > 0);
        state.inflight -= 1;
        let size = self.layout.geometry.page_size_bytes as usize;
        let outcome = match reply {
            Ok(Message::Page(reply)) if reply.page != state.page => {
                Err(format!("answered for page {}", reply.page.0))
            }
            Ok(Message::Page(reply)) if reply.page_lsn > state.pg_read_point => {
                Err("answered past the read point".to_string())
            }
            Ok(Message::Page(reply)) if reply.bytes.len() != size => {
                Err(format!("sent a page of {} bytes", reply.bytes.len()))
            }
            Ok(Message::Page(reply)) => Ok(PageImage {
                page: reply.page,
                lsn: reply.page_lsn,
                bytes: reply.bytes,
            }),
            Ok(Message::Error(e)) => Err(format!("refused: {:?}: {}", e.code, e.message)),
            Ok(other) => Err(format!("sent {} to a read", other.name())),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(image) => {
                let (page, read_point, cache) = (state.page, state.read_point, state.cache);
                let serving = self.serving.as_mut().expect("serving");
                if cache && !serving.recent_writes.written_after(page, read_point) {
                    let vdl = serving.writer.vdl();
                    serving.cache.insert(image.clone(), vdl);
                }
                self.complete_read(id, Ok(image));
            }
            Err(why) => {
                let node = self.layout.placement[state.pg.0 as usize][segment.0 as usize];
                let name = &self.layout.node_names[node];
                state
                    .failures
                    .push(format!("segment {segment} on {name}: {why}"));
                self.read_next_candidate(now, id);
            }
        }
    }

    /// Hedges reads whose delay passed and fails reads past their deadline.
    pub(super) fn reads_timeout(&mut self, now: Instant) {
        let due: Vec<(ReadId, bool)> = self
            .reads
            .iter()
            .filter(|(_, s)| s.next_timer().is_some_and(|t| t <= now))
            .map(|(id, s)| (*id, s.deadline <= now))
            .collect();
        for (id, expired) in due {
            if expired {
                let page = self.reads[&id].page;
                let error = format!("no segment served page {} before the deadline", page.0);
                self.complete_read(id, Err(VolumeError::Read(error)));
            } else if !self.reads[&id].candidates.is_empty() {
                self.stats.reads_hedged += 1;
                self.read_next_candidate(now, id);
            } else {
                self.reads.get_mut(&id).expect("live").next_hedge = None;
            }
        }
    }

    /// Abandons a read (its waiter went away): its read point no longer holds PGMRPL back.
    pub fn cancel_read(&mut self, id: ReadId) {
        if let Some(state) = self.reads.remove(&id) {
            self.unregister_read_point(state.read_point);
        }
    }

    pub(super) fn complete_read(&mut self, id: ReadId, result: Result<PageImage, VolumeError>) {
        let state = self.reads.remove(&id).expect("a read completes once");
        self.unregister_read_point(state.read_point);
        self.completions.push_back(Completion::Read { id, result });
    }

    fn unregister_read_point(&mut self, read_point: Lsn) {
        let count = self
            .read_points
            .get_mut(&read_point)
            .expect("registered read point");
        assert!(*count > 0);
        *count -= 1;
        if *count == 0 {
            self.read_points.remove(&read_point);
        }
    }
}

/// The highest LSN of a PG's records at or below `read_point` (`Lsn::ZERO` if none): a
/// segment holds everything of its PG up to `read_point` exactly when its SCL reaches this.
fn pg_read_point(lsns: &VecDeque<Lsn>, read_point: Lsn) -> Lsn {
    let end = lsns.partition_point(|lsn| *lsn <= read_point);
    let pg_read_point = if end == 0 { Lsn::ZERO } else { lsns[end - 1] };
    assert!(pg_read_point <= read_point);
    pg_read_point
}
