//! Replies that must wait for the manifest: the manifest is versioned, one store is in flight
//! at a time (each store takes the newest state, so stores never queue up), and a reply that
//! depends on a volume's metadata waits until a version at least as new as the volume's last
//! change is durable.
//!
//! Invariants: `stored ≤ version`; a store in flight carries a version in `(stored, version]`;
//! a held reply is released only once `stored` reaches its version, and replies held for one
//! volume are released in the order they were held.

use std::collections::VecDeque;

use wire::{Epoch, Message, VolumeId};

use super::{ConnId, ManifestToken, NodeCore, NodeOutput};
use crate::manifest::SegmentKey;

/// A reply decided once the manifest is durable.
#[derive(Clone, Copy, Debug)]
pub(super) enum Answer {
    /// Ack a durable batch (or `StaleEpoch` if the epoch moved on meanwhile).
    Ack {
        key: SegmentKey,
        epoch: Epoch,
    },
    VolumeState(VolumeId),
    Done,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    version: u64,
    conn: ConnId,
    request_id: u64,
    answer: Answer,
}

#[derive(Default)]
pub(super) struct Durability {
    version: u64,
    stored: u64,
    inflight: Option<u64>,
    held: VecDeque<Held>,
}

impl Durability {
    pub(super) fn drain_waiting(&mut self) -> impl Iterator<Item = (ConnId, u64)> + use<> {
        let held = std::mem::take(&mut self.held);
        assert!(self.held.is_empty());
        assert!(held.iter().all(|h| h.version <= self.version));
        held.into_iter().map(|h| (h.conn, h.request_id))
    }

    /// The newest manifest version issued.
    pub(super) fn version(&self) -> u64 {
        assert!(self.stored <= self.version);
        assert!(
            self.inflight
                .is_none_or(|v| self.stored < v && v <= self.version)
        );
        self.version
    }

    pub(super) fn is_idle(&self) -> bool {
        assert!(self.stored <= self.version);
        assert!(self.inflight.is_none_or(|v| v <= self.version));
        self.held.is_empty() && self.inflight.is_none() && self.stored == self.version
    }
}

impl NodeCore {
    /// Notes that `volume`'s metadata (or the set of hosted segments) changed: a new manifest
    /// version is needed before replies about it may leave.
    pub(super) fn manifest_changed(&mut self, volume: VolumeId) {
        let d = &mut self.durability;
        d.version += 1;
        let version = d.version;
        let entry = self.volumes.entry(volume).or_default();
        assert!(entry.version_needed < version);
        entry.version_needed = version;
        self.store_manifest_if_idle();
        assert!(self.durability.inflight.is_some());
    }

    /// Notes that node-wide metadata (the journal start) changed; returns the manifest version
    /// that holds it.
    pub(super) fn manifest_changed_global(&mut self) -> u64 {
        self.durability.version += 1;
        let version = self.durability.version;
        self.store_manifest_if_idle();
        assert!(self.durability.inflight.is_some());
        version
    }

    /// Asks for the newest manifest to be stored, unless a store is in flight.
    fn store_manifest_if_idle(&mut self) {
        let d = &mut self.durability;
        if d.inflight.is_some() || d.stored == d.version {
            return;
        }
        d.inflight = Some(d.version);
        let token = ManifestToken(d.version);
        let manifest = self.manifest();
        assert!(token.0 > self.durability.stored);
        assert!(
            token.0 == self.durability.version,
            "a store takes the newest state"
        );
        self.outputs
            .push_back(NodeOutput::StoreManifest { token, manifest });
    }

    /// The manifest of `token` is durable: release what waited for it.
    pub fn handle_manifest_stored(&mut self, token: ManifestToken) {
        if self.stopped().is_some() {
            return; // Everyone waiting was answered when the node stopped.
        }
        let d = &mut self.durability;
        assert!(
            d.inflight == Some(token.0),
            "stores are reported as asked for"
        );
        assert!(token.0 > d.stored);
        d.stored = token.0;
        d.inflight = None;
        self.store_manifest_if_idle();
        let stored = self.durability.stored;
        let (ready, waiting): (VecDeque<Held>, VecDeque<Held>) =
            std::mem::take(&mut self.durability.held)
                .into_iter()
                .partition(|h| h.version <= stored);
        self.durability.held = waiting;
        for held in ready {
            self.answer(held.conn, held.request_id, held.answer);
        }
        self.on_manifest_durable(stored);
    }

    /// Answers now if `volume`'s metadata is durable, or once it is.
    pub(super) fn answer_when_durable(
        &mut self,
        conn: ConnId,
        request_id: u64,
        volume: VolumeId,
        answer: Answer,
    ) {
        let version = self.volumes.get(&volume).map_or(0, |v| v.version_needed);
        if version <= self.durability.stored {
            return self.answer(conn, request_id, answer);
        }
        assert!(version <= self.durability.version);
        assert!(self.durability.inflight.is_some(), "a store is on its way");
        self.durability.held.push_back(Held {
            version,
            conn,
            request_id,
            answer,
        });
    }

    /// Sends an answer whose state is durable, computed from the state as it is now (an Ack
    /// may be held back a moment first, see `throttle`).
    pub(super) fn answer(&mut self, conn: ConnId, request_id: u64, answer: Answer) {
        assert!(
            self.stopped().is_none(),
            "a stopped node answers ShuttingDown only"
        );
        match answer {
            Answer::Ack { key, epoch } => {
                if epoch < self.epoch(key.volume) {
                    // A refusal is never held back: only Acks are paced.
                    return self.send_ack(conn, request_id, key, epoch);
                }
                self.ack_or_hold(conn, request_id, key, epoch);
            }
            Answer::VolumeState(volume) => {
                let state = self.volume_state(volume);
                self.reply(conn, request_id, Message::VolumeState(state));
            }
            Answer::Done => self.reply(conn, request_id, Message::Done),
        }
    }
}
