//! Segment rebuild: a segment whose missing records left every peer's journal (they were
//! coalesced and collected there) copies a peer's pages instead, as of the peer's
//! materialized LSN `P`, and continues its chain from `P`.
//!
//! 1. Gossip finds no peer that can serve the segment's next records (every peer ahead refused
//!    them, typically `Compacted`). The segment asks the freshest peer at its epoch with
//!    `FetchPages` at read point 0 ("your materialized LSN"); the reply names `P`, a point on
//!    the PG's chain at or below every read point (a peer materializes no further than its
//!    PGMRPL, so no further than the writer's).
//! 2. Each batch of pages is written into both slots of each page ([`NodeOutput::Scrub`]'s
//!    repairs, durably), then the next batch is asked for at exactly `P`.
//! 3. After the last batch, the segment's base, materialized LSN and SCL move to `P` (its
//!    records at or below `P` leave the index), the manifest records it, and gossip fetches
//!    the records above `P` as usual.
//!
//! A refusal or a lost reply abandons the rebuild; it starts over later (at a new `P`). A
//! crash in the middle leaves images at `P` above what the manifest says is materialized:
//! coalescing leaves such pages alone until its target passes `P` (their images hold the
//! records already), and reads never go below `P`.
//!
//! Invariants:
//! - `P` is above the segment's SCL when the rebuild finishes (else it is dropped);
//! - the base moves to `P` only after every page of the peer's as of `P` is durable here.

use std::collections::BTreeMap;
use std::time::Instant;

use wire::{Lsn, PageImage, Pages, SegmentIndex};

use super::background::JobToken;
use super::{FETCH_PAGES_BYTES_MAX, NodeCore, Phase};
use crate::manifest::SegmentKey;

/// One segment's rebuild under way.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rebuild {
    from: SegmentIndex,
    /// The peer's point (0 until its first reply).
    point: Lsn,
    next_index: u64,
    /// A FetchPages is in flight.
    asked: bool,
    /// The batch being written: waiting for a job (`None`) or in the job with this token.
    writing: Option<Option<JobToken>>,
    pages: u64,
}

#[derive(Default)]
pub(super) struct Rebuilds {
    pub(super) active: BTreeMap<SegmentKey, Rebuild>,
    /// No new rebuild of a segment before this (one just failed).
    backoff: BTreeMap<SegmentKey, Instant>,
    pub(super) finished: u64,
}

impl NodeCore {
    /// Segment rebuilds finished since start.
    pub fn rebuilds_finished(&self) -> u64 {
        self.rebuilds.finished
    }

    /// Whether `key` is being rebuilt (gossip leaves it alone meanwhile).
    pub(super) fn rebuilding(&self, key: &SegmentKey) -> bool {
        self.rebuilds.active.contains_key(key)
    }

    /// No peer can serve `own`'s next records: rebuild it from the freshest peer ahead.
    pub(super) fn maybe_rebuild(&mut self, now: Instant, own: SegmentKey) {
        if self.phase != Phase::Serving || self.rebuilding(&own) {
            return;
        }
        if self.rebuilds.backoff.get(&own).is_some_and(|t| now < *t) {
            return;
        }
        let scl = self.segments[&own].scl();
        let epoch = self.epoch(own.volume);
        let best = self
            .fresh_peer_views(&own)
            .filter(|(_, e, peer_scl)| *e == epoch && *peer_scl > scl)
            .max_by_key(|(_, _, peer_scl)| *peer_scl)
            .map(|(segment, _, _)| segment);
        let Some(from) = best else {
            return;
        };
        tracing::warn!(
            "{own}: no peer holds the records after {scl}; rebuilding from segment {from}'s \
             page store"
        );
        let rebuild = Rebuild {
            from,
            point: Lsn::ZERO,
            next_index: 0,
            asked: false,
            writing: None,
            pages: 0,
        };
        self.rebuilds.active.insert(own, rebuild);
        self.ask_pages(now, own);
    }

    fn ask_pages(&mut self, now: Instant, own: SegmentKey) {
        let epoch = self.epoch(own.volume);
        let rebuild = self.rebuilds.active.get_mut(&own).expect("active");
        assert!(!rebuild.asked && rebuild.writing.is_none());
        rebuild.asked = true;
        let fetch = wire::FetchPages {
            volume: own.volume,
            epoch,
            pg: own.pg,
            segment: rebuild.from,
            read_point: rebuild.point,
            from_index: rebuild.next_index,
            bytes_max: u32::try_from(FETCH_PAGES_BYTES_MAX).expect("under a frame"),
        };
        let from = rebuild.from;
        self.send_fetch_pages(now, own, from, fetch);
    }

    /// The rebuild of `own` failed (a refusal, no reply, a bad reply): it starts over later.
    pub(super) fn rebuild_failed(&mut self, now: Instant, own: SegmentKey, why: &str) {
        if self.rebuilds.active.remove(&own).is_some() {
            tracing::warn!("{own}: segment rebuild abandoned ({why}); it starts over later");
            let until = now + 4 * self.gossip_refusal_ttl();
            self.rebuilds.backoff.insert(own, until);
        }
    }

    /// A batch of pages from the peer: checked, then written by the next scrub job.
    pub(super) fn handle_pages(&mut self, now: Instant, own: SegmentKey, reply: Pages) {
        let Some(rebuild) = self.rebuilds.active.get(&own).copied() else {
            return;
        };
        if let Err(why) = self.check_pages(own, &rebuild, &reply) {
            return self.rebuild_failed(now, own, &why);
        }
        let images: Vec<PageImage> = reply
            .pages
            .into_iter()
            .map(|p| PageImage {
                page: p.page,
                lsn: p.page_lsn,
                bytes: p.bytes,
            })
            .collect();
        let rebuild = self.rebuilds.active.get_mut(&own).expect("checked above");
        rebuild.asked = false;
        rebuild.point = reply.read_point;
        rebuild.next_index = reply.next_index;
        rebuild.pages += images.len() as u64;
        if images.is_empty() {
            return self.rebuild_batch_done(now, own);
        }
        rebuild.writing = Some(None);
        self.scrub.ready.entry(own).or_default().extend(images);
    }

    fn check_pages(&self, own: SegmentKey, rebuild: &Rebuild, reply: &Pages) -> Result<(), String> {
        let meta = &self.volumes[&own.volume].meta;
        let scl = self.segments[&own].scl();
        if (reply.volume, reply.pg, reply.segment) != (own.volume, own.pg, rebuild.from) {
            return Err("the reply is about another segment".into());
        }
        if rebuild.point != Lsn::ZERO && reply.read_point != rebuild.point {
            return Err(format!(
                "pages at {} instead of {}",
                reply.read_point, rebuild.point
            ));
        }
        if reply.read_point <= scl {
            return Err(format!(
                "the peer's page store is at {}, not past this segment's SCL {scl}",
                reply.read_point
            ));
        }
        let size = meta.page_size_bytes as usize;
        for page in &reply.pages {
            let in_pg = meta.pages_per_pg == 0
                || wire::Geometry::page_in_pg(meta.pages_per_pg, page.page, own.pg);
            if !in_pg || page.bytes.len() != size || page.page_lsn > reply.read_point {
                return Err(format!("page {} does not fit this segment", page.page.0));
            }
        }
        Ok(())
    }

    /// A scrub job is taking `own`'s ready images: a rebuild batch among them is in it.
    pub(super) fn note_rebuild_job(&mut self, own: SegmentKey, token: JobToken) {
        if let Some(rebuild) = self.rebuilds.active.get_mut(&own)
            && rebuild.writing == Some(None)
        {
            rebuild.writing = Some(Some(token));
        }
    }

    /// A scrub job finished: if it wrote a rebuild batch, the rebuild goes on.
    pub(super) fn note_rebuild_written(
        &mut self,
        own: SegmentKey,
        token: JobToken,
        error: Option<&str>,
    ) {
        let Some(rebuild) = self.rebuilds.active.get(&own) else {
            return;
        };
        if rebuild.writing != Some(Some(token)) {
            return;
        }
        let now = self.gossip_now().expect("a rebuild starts at some time");
        if let Some(why) = error {
            return self.rebuild_failed(now, own, &format!("writing pages failed: {why}"));
        }
        self.rebuilds.active.get_mut(&own).expect("checked").writing = None;
        self.rebuild_batch_done(now, own);
    }

    fn rebuild_batch_done(&mut self, now: Instant, own: SegmentKey) {
        let rebuild = self.rebuilds.active[&own];
        if rebuild.next_index != Pages::DONE {
            return self.ask_pages(now, own);
        }
        self.rebuilds.active.remove(&own);
        let segment = self.segments.get_mut(&own).expect("hosted");
        if rebuild.point <= segment.scl() {
            return; // Caught up meanwhile: the images at the point are harmless.
        }
        let dropped = segment.rebuilt(rebuild.point);
        self.rebuilds.finished += 1;
        self.background.failed.remove(&own);
        self.gossip_forget_refusals(own);
        self.manifest_changed(own.volume);
        tracing::info!(
            "{own}: rebuilt from segment {} as of {} ({} pages; {dropped} records below it \
             dropped); gossip fetches the rest",
            rebuild.from,
            rebuild.point,
            rebuild.pages
        );
    }
}
