//! `NodeCore` driven directly, as the simulator will drive it: no disk, no network, no clock.
//! A small harness plays the driver: it keeps the journal groups the core asks for in memory
//! (as laid out by `io::encode_group`), completes them when a test says so, stores manifests,
//! serves journal reads from the in-memory journal, and restarts a core from what is
//! "durable".

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use node::core::{
    ACK_DELAY_LIMIT, ConnId, CoreConfig, EntryLocation, GroupId, IDLE_AFTER, ManifestToken,
    NodeCore, NodeOutput, PersistGroup, ThrottleConfig,
};
use node::io::{AlignedBuf, encode_group};
use node::journal::format::GROUP_BYTES_MAX;
use node::manifest::{Manifest, SegmentKey};
use proptest::prelude::*;
use wire::codec::Reader;
use wire::{
    Append, Epoch, ErrorCode, Fence, FetchRecords, Frame, LogRecord, Lsn, Message, PageId, PgId,
    ReadPage, RedoOp, Role, SegmentIndex, Truncate, VolumeId,
};

const ENGINE: Option<Role> = Some(Role::Engine);
const V: VolumeId = VolumeId(1);

fn key(segment: u32) -> SegmentKey {
    SegmentKey {
        volume: V,
        pg: PgId(0),
        segment: SegmentIndex(segment),
    }
}

fn config() -> CoreConfig {
    CoreConfig {
        name: "node1".into(),
        inflight_groups_max: 4,
        journal_file_bytes: 2 * GROUP_BYTES_MAX as u64,
        journal_file_count: 2,
    }
}

/// A record of page `page` with `lsn` and `backlink`.
fn record(lsn: u64, backlink: u64, page: u64) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(backlink),
        page: PageId(page),
        cpl: true,
        op: RedoOp::Write {
            offset: 0,
            bytes: vec![(lsn % 251) as u8; 16],
        },
    }
}

fn append(epoch: Epoch, records: Vec<LogRecord>) -> Message {
    Message::Append(Append {
        volume: V,
        epoch,
        pg: PgId(0),
        segment: SegmentIndex(0),
        vdl: Lsn(records.first().map_or(0, |r| r.backlink.0)),
        records,
    })
}

/// A chain link: the record `lsn` whose backlink is `backlink` (page = lsn % 4).
fn link(epoch: Epoch, lsn: u64, backlink: u64) -> Message {
    append(epoch, vec![record(lsn, backlink, lsn % 4)])
}

/// The harness's journal files as a scan sees them (unwritten bytes read as zeroes).
struct Images<'a> {
    files: &'a HashMap<u32, Vec<u8>>,
    config: &'a CoreConfig,
}

impl node::journal::JournalStorage for Images<'_> {
    fn file_count(&self) -> usize {
        self.config.journal_file_count as usize
    }

    fn file_bytes(&self) -> u64 {
        self.config.journal_file_bytes
    }

    fn read_exact_at(&self, file: u32, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        if let Some(image) = self.files.get(&file) {
            let start = (offset as usize).min(image.len());
            let end = (start + buf.len()).min(image.len());
            buf[..end - start].copy_from_slice(&image[start..end]);
        }
        Ok(())
    }

    fn write_all_at(&self, _file: u32, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Ok(()) // Only the tail erase writes; the harness has no stale tail to erase.
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The driver's part, in memory.
struct Harness {
    config: CoreConfig,
    core: NodeCore,
    now: Instant,
    next_request: u64,
    replies: Vec<(ConnId, u64, Message)>,
    /// Groups asked for and not yet completed.
    pending: BTreeMap<GroupId, PersistGroup>,
    /// Durable groups in journal order (sequence), for reads and restarts.
    durable: BTreeMap<u64, PersistGroup>,
    /// Journal files' bytes as written.
    files: HashMap<u32, Vec<u8>>,
    manifest_pending: Option<(ManifestToken, Manifest)>,
    manifest_durable: Manifest,
    stopped: Vec<String>,
    pages: std::sync::Arc<node::pagestore::MemPageStore>,
    /// Backup jobs asked for, waiting for a test to carry them out.
    backups: Vec<(node::core::BackupToken, node::core::BackupJob)>,
}

impl Harness {
    /// A node hosting segment 0 of volume 1's PG 0 at epoch 0.
    fn new() -> Self {
        let manifest = Manifest {
            segments: vec![key(0)],
            ..Manifest::default()
        };
        Self::recover(
            manifest,
            BTreeMap::new(),
            HashMap::new(),
            Default::default(),
        )
    }

    /// A core rebuilt from a durable manifest and the journal files as written, the way a
    /// node recovers: a scan from the manifest's journal start.
    fn recover(
        manifest: Manifest,
        durable: BTreeMap<u64, PersistGroup>,
        files: HashMap<u32, Vec<u8>>,
        pages: std::sync::Arc<node::pagestore::MemPageStore>,
    ) -> Self {
        Self::recover_with(config(), manifest, durable, files, pages)
    }

    fn recover_with(
        config: CoreConfig,
        manifest: Manifest,
        durable: BTreeMap<u64, PersistGroup>,
        files: HashMap<u32, Vec<u8>>,
        pages: std::sync::Arc<node::pagestore::MemPageStore>,
    ) -> Self {
        let mut core = NodeCore::new(config.clone(), manifest.clone());
        // No scrub rounds: these tests step the core's timer and expect only their own work.
        core.configure_scrub(node::core::ScrubConfig {
            enabled: false,
            ..node::core::ScrubConfig::default()
        });
        let images = Images {
            files: &files,
            config: &config,
        };
        let start = core.journal_start();
        let scan = node::journal::scan_with(&images, start, |group| {
            core.recover_group(group.position, group.sequence);
            for entry in &group.entries {
                let at = EntryLocation {
                    file: group.position.file,
                    body_offset: entry.body_offset,
                };
                core.recover_append(at, &entry.append);
            }
        })
        .unwrap();
        core.finish_recovery(scan.end, scan.next_sequence);
        Self {
            config,
            core,
            now: Instant::now(),
            next_request: 1,
            replies: Vec::new(),
            pending: BTreeMap::new(),
            durable,
            files,
            manifest_pending: None,
            manifest_durable: manifest,
            stopped: Vec::new(),
            pages,
            backups: Vec::new(),
        }
    }

    /// What survives a crash now: the durable manifest and journal.
    fn restart(&self) -> Self {
        Self::recover_with(
            self.config.clone(),
            self.manifest_durable.clone(),
            self.durable.clone(),
            self.files.clone(),
            self.pages.clone(),
        )
    }

    /// Sends a request as `role` on `conn`; returns its request id.
    fn send_as(&mut self, conn: u64, role: Option<Role>, message: Message) -> u64 {
        let request_id = self.next_request;
        self.next_request += 1;
        // Half the requests as bytes off the wire, half as messages: both entry points.
        if request_id.is_multiple_of(2) {
            let frame = Frame {
                request_id,
                message,
            }
            .to_bytes();
            let frame = Bytes::from(frame).slice(4..);
            self.core.handle_frame(self.now, ConnId(conn), role, frame);
        } else {
            self.core
                .handle_request(self.now, ConnId(conn), role, request_id, message);
        }
        self.drain();
        request_id
    }

    fn send(&mut self, message: Message) -> u64 {
        self.send_as(1, ENGINE, message)
    }

    /// Carries out outputs: replies are kept, groups wait for `persist`, manifests for
    /// `store`, reads are served at once from the in-memory journal.
    fn drain(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                NodeOutput::Reply {
                    conn,
                    request_id,
                    message,
                } => self.replies.push((conn, request_id, message)),
                NodeOutput::Persist(group) => {
                    self.pending.insert(group.id, group);
                }
                NodeOutput::StoreManifest { token, manifest } => {
                    assert!(self.manifest_pending.is_none(), "one store at a time");
                    self.manifest_pending = Some((token, manifest));
                }
                NodeOutput::ReadRecords { token, locations } => {
                    let records = self.read(&locations);
                    self.core.handle_records_read(token, Ok(records));
                }
                NodeOutput::ReadPage { token, read } => {
                    let reader = node::io::MemRecords(&self.files);
                    let result = node::pagestore::read_page(&read, self.pages.as_ref(), &reader);
                    self.core.handle_page_read(token, result);
                }
                NodeOutput::Coalesce { token, job } => {
                    let reader = node::io::MemRecords(&self.files);
                    let result = node::pagestore::run_coalesce(&job, self.pages.as_ref(), &reader);
                    self.core.handle_coalesced(token, result);
                }
                NodeOutput::ReadPages { token, job } => {
                    let reader = node::io::MemRecords(&self.files);
                    let result = node::pagestore::read_pages(&job, self.pages.as_ref(), &reader);
                    self.core.handle_pages_read(token, result);
                }
                NodeOutput::Scrub { token, job } => {
                    let reader = node::io::MemRecords(&self.files);
                    let report = node::pagestore::run_scrub(&job, self.pages.as_ref(), &reader);
                    self.core.handle_scrubbed(token, report);
                }
                NodeOutput::Stopped { reason } => self.stopped.push(reason),
                NodeOutput::PeerRequest { .. } => panic!("no placement here, so no gossip"),
                NodeOutput::Backup { token, job } => self.backups.push((token, job)),
            }
        }
    }

    fn read(&self, locations: &[node::segment::RecordLocation]) -> Vec<LogRecord> {
        locations
            .iter()
            .map(|l| {
                let file = &self.files[&l.file];
                let bytes = &file[l.offset as usize..(l.offset + u64::from(l.len)) as usize];
                LogRecord::decode(&mut Reader::new(bytes)).unwrap()
            })
            .collect()
    }

    /// Completes the write of the group with `id`.
    fn persist(&mut self, id: GroupId) {
        let group = self.pending.remove(&id).expect("a pending group");
        let mut buf = AlignedBuf::new(GROUP_BYTES_MAX);
        encode_group(&group, &mut buf);
        let file = self.files.entry(group.position.file).or_default();
        let end = group.position.offset as usize + buf.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[group.position.offset as usize..end].copy_from_slice(buf.as_slice());
        self.durable.insert(group.sequence, group);
        self.core.handle_persisted(self.now, id);
        self.drain();
    }

    /// Completes every pending group write, oldest first.
    fn persist_all(&mut self) {
        while let Some(id) = self.pending.keys().next().copied() {
            self.persist(id);
        }
    }

    /// Completes the manifest store in flight, if any.
    fn store(&mut self) -> bool {
        let Some((token, manifest)) = self.manifest_pending.take() else {
            return false;
        };
        self.manifest_durable = manifest;
        self.core.handle_manifest_stored(token);
        self.drain();
        true
    }

    /// Completes every write and store until nothing is pending.
    fn settle(&mut self) {
        loop {
            self.persist_all();
            if !self.store() && self.pending.is_empty() {
                return;
            }
        }
    }

    /// The reply to `request_id`, which must have exactly one.
    fn reply(&self, request_id: u64) -> &Message {
        let mut found = self.replies.iter().filter(|(_, id, _)| *id == request_id);
        let (_, _, message) = found
            .next()
            .unwrap_or_else(|| panic!("no reply to {request_id}"));
        assert!(found.next().is_none(), "two replies to {request_id}");
        message
    }

    fn has_reply(&self, request_id: u64) -> bool {
        self.replies.iter().any(|(_, id, _)| *id == request_id)
    }

    fn error(&self, request_id: u64) -> (ErrorCode, String) {
        match self.reply(request_id) {
            Message::Error(e) => (e.code, e.message.clone()),
            other => panic!("expected an error to {request_id}, got {other:?}"),
        }
    }

    fn ack_scl(&self, request_id: u64) -> Lsn {
        match self.reply(request_id) {
            Message::Ack(ack) => ack.scl,
            other => panic!("expected an ack to {request_id}, got {other:?}"),
        }
    }

    fn state(&self, request_id: u64) -> wire::VolumeState {
        match self.reply(request_id) {
            Message::VolumeState(state) => state.clone(),
            other => panic!("expected a volume state to {request_id}, got {other:?}"),
        }
    }

    fn scl(&self) -> Lsn {
        self.core.scl(&key(0)).unwrap()
    }

    fn fence(&mut self, current: Epoch, new: Epoch) -> u64 {
        self.send(Message::Fence(Fence {
            volume: V,
            epoch_current: current,
            epoch_new: new,
        }))
    }

    fn truncate(&mut self, epoch: Epoch, after: u64, through: u64) -> u64 {
        self.send(Message::Truncate(Truncate {
            volume: V,
            epoch,
            range: wire::TruncationRange {
                annul_epoch: epoch,
                after: Lsn(after),
                through: Lsn(through),
            },
        }))
    }

    fn fetch(&mut self, role: Option<Role>, epoch: Epoch, after: u64, through: u64) -> u64 {
        let fetch = FetchRecords {
            volume: V,
            epoch,
            pg: PgId(0),
            segment: SegmentIndex(0),
            after: Lsn(after),
            through: Lsn(through),
            bytes_max: 1 << 20,
        };
        self.send_as(1, role, Message::FetchRecords(fetch))
    }

    /// Fences epoch 0 to `epoch` and makes it durable.
    fn install(&mut self, epoch: Epoch) {
        let id = self.fence(Epoch(0), epoch);
        self.settle();
        assert_eq!(self.state(id).epoch, epoch);
    }
}

/// Whether segment 0 holds the record `lsn`.
fn holds(core: &NodeCore, lsn: Lsn) -> bool {
    core.segment(&key(0)).unwrap().holds(lsn)
}

fn e(bumps: u64, tag: u32) -> Epoch {
    Epoch((bumps << 32) | u64::from(tag))
}

/// Goal: an append is acknowledged only once durable, with the SCL that follows backlinks;
/// a gap holds the SCL until it fills.
/// Method: append a chain with one link held back, completing writes step by step.
#[test]
fn append_is_acked_once_durable_with_the_scl() {
    let mut h = Harness::new();
    let a = h.send(link(Epoch(0), 1, 0));
    assert!(!h.has_reply(a), "not before the write completes");
    assert_eq!(h.pending.len(), 1);
    h.persist_all();
    assert_eq!(h.ack_scl(a), Lsn(1));
    let b = h.send(link(Epoch(0), 3, 2));
    h.persist_all();
    assert_eq!(h.ack_scl(b), Lsn(1), "3 waits for 2");
    let c = h.send(link(Epoch(0), 2, 1));
    h.persist_all();
    assert_eq!(h.ack_scl(c), Lsn(3));
    assert!(h.core.is_idle());
}

/// Goal: group commit takes everything queued into one group, keeps at most
/// `inflight_groups_max` groups in flight, and acks in journal order even when writes
/// complete out of order.
/// Method: queue appends while groups are outstanding, complete the newest group first.
#[test]
fn groups_take_everything_queued_and_ack_in_journal_order() {
    let mut h = Harness::new();
    let mut ids = Vec::new();
    for lsn in 1..=4 {
        ids.push(h.send(link(Epoch(0), lsn, lsn - 1)));
    }
    assert_eq!(
        h.pending.len(),
        4,
        "one group per append while slots are free"
    );
    // Slots full: these queue, and all go into one group once a slot frees.
    for lsn in 5..=9 {
        ids.push(h.send(link(Epoch(0), lsn, lsn - 1)));
    }
    assert_eq!(h.pending.len(), 4);
    let newest = *h.pending.keys().next_back().unwrap();
    h.persist(newest);
    assert!(h.replies.is_empty(), "group 4 waits for groups 1 to 3");
    let oldest = *h.pending.keys().next().unwrap();
    h.persist(oldest);
    assert_eq!(h.replies.len(), 1, "group 1 acks alone");
    // Groups 2 and 3 are pending, group 4 is written but waits: one slot was free.
    assert_eq!(h.pending.len(), 3, "the queued five formed one group");
    let five = h.pending.values().next_back().unwrap();
    assert_eq!(five.entries.len(), 5);
    h.persist_all();
    let acked: Vec<u64> = h.replies.iter().map(|(_, id, _)| *id).collect();
    assert_eq!(acked, ids, "acks leave in journal order");
    assert_eq!(h.ack_scl(*ids.last().unwrap()), Lsn(9));
}

/// Goal: a request at an epoch older than the node's is StaleEpoch, a newer one is
/// EpochNotInstalled and is not adopted; neither is persisted.
/// Method: install an epoch, send appends, reads and fetches at older and newer epochs.
#[test]
fn epochs_older_are_stale_newer_are_not_installed() {
    let mut h = Harness::new();
    h.install(e(1, 7));
    let old = h.send(link(Epoch(0), 1, 0));
    let new = h.send(link(e(2, 9), 1, 0));
    assert_eq!(h.error(old).0, ErrorCode::StaleEpoch);
    let (code, text) = h.error(new);
    assert_eq!(code, ErrorCode::EpochNotInstalled);
    assert!(text.contains("Fence or Truncate"), "{text}");
    assert_eq!(h.core.epoch(V), e(1, 7), "not adopted");
    assert!(h.pending.is_empty(), "nothing persisted");
    let read = h.send(Message::ReadPage(ReadPage {
        volume: V,
        epoch: e(2, 1),
        pg: PgId(0),
        segment: SegmentIndex(0),
        page: PageId(1),
        read_point: Lsn(0),
    }));
    assert_eq!(h.error(read).0, ErrorCode::EpochNotInstalled);
    let fetch = h.fetch(ENGINE, Epoch(0), 0, 10);
    assert_eq!(h.error(fetch).0, ErrorCode::StaleEpoch);
}

/// Goal: a Fence's reply waits for the manifest; from its acceptance appends at the old epoch
/// are refused and a batch in flight is persisted but answered StaleEpoch, never acked; a
/// retry is answered the same; a fence from a stale view is refused naming the node's epoch.
/// Method: an append in flight, then a fence; complete the write before the manifest store.
#[test]
fn fence_refuses_the_old_epoch_at_once_and_answers_once_durable() {
    let mut h = Harness::new();
    let (e0, e1) = (Epoch(0), e(1, 5));
    let inflight = h.send(link(e0, 1, 0));
    let fence = h.fence(e0, e1);
    assert!(!h.has_reply(fence), "the reply waits for the manifest");
    let late = h.send(link(e0, 2, 1));
    assert_eq!(
        h.error(late).0,
        ErrorCode::StaleEpoch,
        "refused from acceptance on"
    );
    h.persist_all();
    let (code, _) = h.error(inflight);
    assert_eq!(
        code,
        ErrorCode::StaleEpoch,
        "durable, but never acked at the old epoch"
    );
    assert!(holds(&h.core, Lsn(1)), "yet persisted and indexed");
    assert!(h.store());
    let state = h.state(fence);
    assert_eq!((state.epoch, state.segments[0].scl), (e1, Lsn(1)));
    assert_eq!(h.manifest_durable.epoch(V), e1);
    let retry = h.fence(e0, e1);
    assert_eq!(h.state(retry).epoch, e1, "idempotent");
    let stale = h.fence(e0, e(1, 6));
    let (code, text) = h.error(stale);
    assert_eq!(code, ErrorCode::StaleEpoch);
    assert!(
        text.contains(&e1.to_string()),
        "names the node's epoch: {text}"
    );
}

/// Goal: an ack at a newly installed epoch waits until the manifest holding the epoch is
/// durable (a crash before that must not lose the epoch an ack relied on).
/// Method: fence, append at the new epoch, complete the write before the store.
#[test]
fn acks_wait_for_their_epoch_to_be_durable() {
    let mut h = Harness::new();
    let e1 = e(1, 3);
    let fence = h.fence(Epoch(0), e1);
    let a = h.send(link(e1, 1, 0));
    h.persist_all();
    assert!(!h.has_reply(a) && !h.has_reply(fence));
    h.store();
    assert_eq!(h.ack_scl(a), Lsn(1));
    assert_eq!(h.state(fence).epoch, e1);
}

/// Goal: two writers racing to fence from the same epoch with different tags never both win
/// on one node, whatever the order; retries by the winner are idempotent, the loser's are
/// refused.
/// Method: for each order of the two fences (and their retries) on a fresh node, check that
/// exactly one got a VolumeState and that the node ends at the winner's epoch.
#[test]
fn racing_fences_have_one_winner_per_node() {
    let (a, b) = (e(1, 11), e(1, 22));
    for order in [[a, b, a, b], [b, a, b, a], [a, a, b, b], [b, b, a, a]] {
        let mut h = Harness::new();
        let mut outcomes: Vec<(Epoch, bool)> = Vec::new();
        for (i, epoch) in order.iter().enumerate() {
            let id = h.fence(Epoch(0), *epoch);
            if i % 2 == 1 {
                h.settle();
            }
            h.settle();
            let won = matches!(h.reply(id), Message::VolumeState(_));
            outcomes.push((*epoch, won));
        }
        let winner = order[0];
        for (epoch, won) in outcomes {
            assert_eq!(won, epoch == winner, "{order:?}");
        }
        assert_eq!(h.core.epoch(V), winner);
    }
}

proptest! {
    /// Goal: on six nodes, two writers fencing from the same epoch, each in its own order and
    /// with any interleaving of manifest stores, never both reach a write quorum (4 of 6).
    /// Method: random interleavings; count each writer's winning nodes.
    #[test]
    fn racing_fences_never_both_reach_a_quorum(order in proptest::collection::vec(any::<bool>(), 12)) {
        let (a, b) = (e(1, 1), e(1, 2));
        let mut nodes: Vec<Harness> = (0..6).map(|_| Harness::new()).collect();
        let mut sent: Vec<(usize, Epoch, u64)> = Vec::new();
        let (mut next_a, mut next_b) = (0usize, 0usize);
        for pick_a in order {
            let (epoch, next) = if pick_a { (a, &mut next_a) } else { (b, &mut next_b) };
            if *next >= 6 { continue; }
            let node = if pick_a { *next } else { 5 - *next };
            *next += 1;
            let id = nodes[node].fence(Epoch(0), epoch);
            sent.push((node, epoch, id));
        }
        for h in &mut nodes { h.settle(); }
        let wins = |epoch: Epoch| sent.iter()
            .filter(|(n, e, id)| *e == epoch && matches!(nodes[*n].reply(*id), Message::VolumeState(_)))
            .count();
        prop_assert!(wins(a) + wins(b) <= 6);
        prop_assert!(!(wins(a) >= wire::WRITE_QUORUM && wins(b) >= wire::WRITE_QUORUM));
        for h in &nodes {
            prop_assert!(h.core.epoch(V) == a || h.core.epoch(V) == b || h.core.epoch(V) == Epoch(0));
        }
    }
}

/// Goal: a truncation removes the records in its range from the index, the SCL falls back to
/// the chain's last record at or below `after`, new records chain on from there, the same
/// range again changes nothing, and the reply waits for the manifest.
/// Method: a chain 1..=6 at epoch 1, fence to epoch 2, truncate (3, 100], append 101 → 3.
#[test]
fn truncation_then_new_chain() {
    let mut h = Harness::new();
    let (e1, e2) = (e(1, 1), e(2, 1));
    h.install(e1);
    for lsn in 1..=6 {
        h.send(link(e1, lsn, lsn - 1));
    }
    h.settle();
    assert_eq!(h.scl(), Lsn(6));
    let fence = h.fence(e1, e2);
    h.settle();
    assert_eq!(h.state(fence).segments[0].scl, Lsn(6));
    let t = h.truncate(e2, 3, 100);
    assert!(!h.has_reply(t), "waits for the manifest");
    assert_eq!(h.scl(), Lsn(3), "applied at once, answered once durable");
    h.settle();
    assert_eq!(h.state(t).segments[0].scl, Lsn(3));
    for lsn in 4..=6 {
        assert!(!holds(&h.core, Lsn(lsn)), "{lsn} annulled");
    }
    let again = h.truncate(e2, 3, 100);
    assert!(
        h.manifest_pending.is_none(),
        "the same range changes nothing"
    );
    assert_eq!(h.state(again).segments[0].scl, Lsn(3));
    let a = h.send(link(e2, 101, 3));
    h.settle();
    assert_eq!(h.ack_scl(a), Lsn(101));
    let stale = h.truncate(e1, 3, 100);
    assert_eq!(h.error(stale).0, ErrorCode::StaleEpoch);
}

/// Goal: records in a truncated range are never indexed even when they become durable after
/// the truncation (an old writer's batch in flight), and a Truncate installs a newer epoch.
/// Method: an append at epoch 1 in flight; Truncate at epoch 2 covering it; complete both.
#[test]
fn records_in_a_truncated_range_arriving_late_are_never_indexed() {
    let mut h = Harness::new();
    let (e1, e2) = (e(1, 1), e(2, 2));
    h.install(e1);
    h.send(link(e1, 1, 0));
    h.settle();
    let late = h.send(link(e1, 2, 1));
    let t = h.truncate(e2, 1, 50);
    assert_eq!(h.core.epoch(V), e2, "Truncate installs a newer epoch");
    h.settle();
    assert_eq!(h.error(late).0, ErrorCode::StaleEpoch);
    assert!(!holds(&h.core, Lsn(2)));
    assert_eq!(h.state(t).segments[0].scl, Lsn(1));
    let fetch = h.fetch(ENGINE, e2, 0, 100);
    match h.reply(fetch) {
        Message::Records(r) => {
            assert_eq!(r.records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(), [1])
        }
        other => panic!("{other:?}"),
    }
}

/// Goal: a restart rebuilds the same state from the journal and the manifest: truncation
/// ranges from the manifest are applied while replaying (records in them are skipped), the
/// epoch and the VDL hint come back.
/// Method: chain, fence, truncate, new chain; restart; compare SCL, records held and state.
#[test]
fn restart_rebuild_applies_truncations() {
    let mut h = Harness::new();
    let (e1, e2) = (e(1, 1), e(2, 1));
    h.install(e1);
    for lsn in 1..=5 {
        h.send(link(e1, lsn, lsn - 1));
    }
    h.settle();
    h.fence(e1, e2);
    h.truncate(e2, 2, 1000);
    h.settle();
    for lsn in [1001, 1002] {
        h.send(link(e2, lsn, if lsn == 1001 { 2 } else { 1001 }));
    }
    h.settle();
    let before = h.core.volume_state(V);
    assert_eq!(before.segments[0].scl, Lsn(1002));
    let r = h.restart();
    assert_eq!(r.core.volume_state(V), before);
    assert_eq!(r.core.epoch(V), e2);
    for lsn in 3..=5 {
        assert!(!holds(&r.core, Lsn(lsn)), "{lsn} stays annulled");
    }
    assert!(holds(&r.core, Lsn(1001)));
    assert_eq!(
        before.vdl,
        Lsn(1001),
        "the VDL hint: highest vdl of a durable header"
    );
}

/// Goal: a crash before a Truncate's manifest is durable loses the truncation, but nothing
/// relied on it: its reply and any ack at that volume were still held.
/// Method: truncate and append, complete the writes but not the store, restart.
#[test]
fn nothing_answered_depends_on_a_manifest_lost_in_a_crash() {
    let mut h = Harness::new();
    let e1 = e(1, 1);
    h.install(e1);
    for lsn in 1..=3 {
        h.send(link(e1, lsn, lsn - 1));
    }
    h.settle();
    let t = h.truncate(e1, 1, 10);
    let a = h.send(link(e1, 11, 1));
    h.persist_all();
    assert!(
        !h.has_reply(t) && !h.has_reply(a),
        "both wait for the manifest"
    );
    let r = h.restart();
    assert_eq!(
        r.scl(),
        Lsn(3),
        "the truncation was never durable, nor acknowledged"
    );
}

/// Goal: FetchRecords returns the chain in LSN order from `after` to min(through, SCL),
/// re-read from the journal; a node certificate may fetch; a role-less one may not.
/// Method: a chain with a gap, fetched over several ranges.
#[test]
fn fetch_returns_the_chain_up_to_the_scl() {
    let mut h = Harness::new();
    for (lsn, backlink) in [(1, 0), (2, 1), (4, 2), (7, 5)] {
        h.send(link(Epoch(0), lsn, backlink));
    }
    h.settle();
    assert_eq!(h.scl(), Lsn(4));
    let lsns = |h: &Harness, id| match h.reply(id) {
        Message::Records(r) => (r.scl, r.records.iter().map(|r| r.lsn.0).collect::<Vec<_>>()),
        other => panic!("{other:?}"),
    };
    let all = h.fetch(Some(Role::Node), Epoch(0), 0, 100);
    assert_eq!(lsns(&h, all), (Lsn(4), vec![1, 2, 4]), "not beyond the SCL");
    let middle = h.fetch(ENGINE, Epoch(0), 1, 2);
    assert_eq!(lsns(&h, middle).1, vec![2]);
    let none = h.fetch(ENGINE, Epoch(0), 4, 100);
    assert_eq!(lsns(&h, none).1, Vec::<u64>::new());
    let anonymous = h.fetch(None, Epoch(0), 0, 100);
    let (code, text) = h.error(anonymous);
    assert_eq!(code, ErrorCode::Forbidden);
    assert!(text.contains("without a role"), "{text}");
}

/// Goal: a read returns the page at exactly its read point from records re-read from the
/// journal, and is refused above the SCL.
/// Method: two writes to one page, read at each point and above the SCL.
#[test]
fn read_page_applies_records_up_to_the_read_point() {
    let mut h = Harness::new();
    let write = |lsn: u64, backlink: u64, byte: u8| {
        let mut r = record(lsn, backlink, 1);
        r.op = RedoOp::Write {
            offset: 2,
            bytes: vec![byte; 3],
        };
        append(Epoch(0), vec![r])
    };
    h.send(write(1, 0, 0xAA));
    h.send(write(2, 1, 0xBB));
    h.settle();
    let read = |h: &mut Harness, read_point| {
        h.send(Message::ReadPage(ReadPage {
            volume: V,
            epoch: Epoch(0),
            pg: PgId(0),
            segment: SegmentIndex(0),
            page: PageId(1),
            read_point: Lsn(read_point),
        }))
    };
    let one = read(&mut h, 1);
    match h.reply(one) {
        Message::Page(p) => assert_eq!(
            (p.page_lsn, &p.bytes[..6]),
            (Lsn(1), &[0, 0, 0xAA, 0xAA, 0xAA, 0][..])
        ),
        other => panic!("{other:?}"),
    }
    let two = read(&mut h, 2);
    assert!(matches!(h.reply(two), Message::Page(p) if p.page_lsn == Lsn(2) && p.bytes[2] == 0xBB));
    let above = read(&mut h, 3);
    assert_eq!(h.error(above).0, ErrorCode::SclBelowReadPoint);
}

/// Goal: a fatal I/O error stops the node: every request waiting (queued, in flight, held for
/// the manifest) and every later one gets ShuttingDown with the reason; Stopped comes once.
/// Method: fill every kind of wait, then report a failed write.
#[test]
fn a_fatal_io_error_answers_everyone_and_stops() {
    let mut h = Harness::new();
    let e1 = e(1, 1);
    let fence = h.fence(Epoch(0), e1); // held for the manifest
    let mut waiting = vec![fence];
    for lsn in 1..=6 {
        waiting.push(h.send(link(e1, lsn, lsn - 1))); // in flight, then queued
    }
    h.core.handle_fatal_io("journal write failed: EIO".into());
    h.drain();
    h.core.handle_fatal_io("a second failure".into());
    h.drain();
    assert_eq!(h.stopped, vec!["journal write failed: EIO".to_string()]);
    let later = h.send(link(e1, 7, 6));
    waiting.push(later);
    for id in waiting {
        let (code, text) = h.error(id);
        assert_eq!(code, ErrorCode::ShuttingDown);
        assert!(text.contains("EIO"), "names the reason: {text}");
    }
    // Completions of what was in flight no longer matter.
    let ids: Vec<GroupId> = h.pending.keys().copied().collect();
    for id in ids {
        h.core.handle_persisted(h.now, id);
    }
    h.drain();
    assert!(h.core.is_idle());
}

/// Goal: every role gets exactly what it may do; refusals name the role needed and the one
/// presented.
/// Method: each request kind from a node certificate and from none.
#[test]
fn roles_decide_what_a_peer_may_do() {
    let mut h = Harness::new();
    let fence = Message::Fence(Fence {
        volume: V,
        epoch_current: Epoch(0),
        epoch_new: e(1, 1),
    });
    for role in [Some(Role::Node), None] {
        for message in [link(Epoch(0), 1, 0), fence.clone()] {
            let id = h.send_as(2, role, message);
            let (code, text) = h.error(id);
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(text.contains("needs an engine certificate"), "{text}");
        }
        let state = h.send_as(2, role, Message::GetVolumeState(V));
        assert_eq!(
            matches!(h.reply(state), Message::VolumeState(_)),
            role.is_some()
        );
    }
    assert!(
        h.pending.is_empty() && h.manifest_pending.is_none(),
        "nothing refused acted"
    );
}

/// One step of the random workload.
#[derive(Clone, Debug)]
enum Step {
    Append { lsn_delta: u64, stale: bool },
    Fence,
    Truncate { back: u64 },
    Persist(prop::sample::Index),
    Store,
    Get,
    Fetch,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1u64..4, prop::bool::weighted(0.1)).prop_map(|(lsn_delta, stale)| Step::Append { lsn_delta, stale }),
        1 => Just(Step::Fence),
        1 => (0u64..6).prop_map(|back| Step::Truncate { back }),
        5 => any::<prop::sample::Index>().prop_map(Step::Persist),
        2 => Just(Step::Store),
        1 => Just(Step::Get),
        1 => Just(Step::Fetch),
        1 => Just(Step::Restart),
    ]
}

/// The writer of the random workload: its epoch and the chain it has sent.
struct Writer {
    epoch: Epoch,
    chain: Vec<u64>,
    /// Request id → epoch of each append sent.
    appends: HashMap<u64, Epoch>,
    sent: Vec<u64>,
}

impl Writer {
    fn tip(&self) -> u64 {
        self.chain.last().copied().unwrap_or(0)
    }

    fn append(&mut self, h: &mut Harness, lsn: u64, epoch: Epoch) {
        let id = h.send(link(epoch, lsn, self.tip()));
        self.appends.insert(id, epoch);
        self.sent.push(id);
    }

    /// Recovery: a new epoch, then a truncation above `after`, then a new record linking to
    /// the chain's last record at or below `after`.
    fn recover(&mut self, h: &mut Harness, back: u64) {
        let next = self.epoch.next(1);
        self.sent.push(h.fence(self.epoch, next));
        self.epoch = next;
        let after = self.tip().saturating_sub(back);
        let through = self.tip() + 10;
        if after < through {
            self.sent.push(h.truncate(next, after, through));
        }
        self.chain.retain(|l| *l <= after);
        self.append(h, through + 1, next);
        self.chain.push(through + 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Goal: under any interleaving of appends, fences, truncations, completions in any order
    /// and crashes: every request gets exactly one reply; an ack leaves only at the epoch in
    /// force when it leaves; no record of an older epoch in a truncated range is ever held; no
    /// read of the journal fails.
    /// Method: a random workload by one writer that recovers now and then (fence, truncate,
    /// new chain), driven by the harness with random completion order; checks after each step.
    #[test]
    fn random_workload_keeps_the_invariants(steps in proptest::collection::vec(step(), 1..80)) {
        let mut h = Harness::new();
        let mut w = Writer { epoch: Epoch(0), chain: Vec::new(), appends: HashMap::new(), sent: Vec::new() };
        for step in steps {
            let replies_before = h.replies.len();
            match step {
                Step::Append { lsn_delta, stale } if stale && w.epoch > Epoch(0) => {
                    // An old writer's append: refused, never persisted.
                    w.append(&mut h, w.tip() + lsn_delta, Epoch(0));
                }
                Step::Append { lsn_delta, .. } => {
                    let lsn = w.tip() + lsn_delta;
                    w.append(&mut h, lsn, w.epoch);
                    w.chain.push(lsn);
                }
                Step::Fence => {
                    let next = w.epoch.next(1);
                    w.sent.push(h.fence(w.epoch, next));
                    w.epoch = next;
                }
                Step::Truncate { back } => w.recover(&mut h, back),
                Step::Persist(pick) => {
                    let ids: Vec<GroupId> = h.pending.keys().copied().collect();
                    if !ids.is_empty() {
                        h.persist(ids[pick.index(ids.len())]);
                    }
                }
                Step::Store => { h.store(); }
                Step::Get => w.sent.push(h.send(Message::GetVolumeState(V))),
                Step::Fetch => w.sent.push(h.fetch(ENGINE, w.epoch, 0, u64::MAX)),
                Step::Restart => {
                    // Whatever waited is lost with the process: no reply is due any more.
                    w.sent.retain(|id| h.has_reply(*id));
                    let replies = std::mem::take(&mut h.replies);
                    h = Harness { next_request: h.next_request, replies, ..h.restart() };
                    w.epoch = h.core.epoch(V);
                }
            }
            for (_, id, m) in &h.replies[replies_before..] {
                if let Message::Error(e) = m {
                    prop_assert!(e.code != ErrorCode::Internal, "{}", e.message);
                }
                if let (Message::Ack(_), Some(epoch)) = (m, w.appends.get(id)) {
                    prop_assert_eq!(*epoch, h.core.epoch(V), "ack at an epoch not in force");
                }
            }
            for t in h.core.manifest().volume(V).truncations {
                for lsn in [t.after.0 + 1, t.through.0] {
                    // Held only if it came at the truncation's epoch or later.
                    let epoch = h.core.segment(&key(0)).unwrap().epoch_of(Lsn(lsn));
                    prop_assert!(epoch.is_none_or(|e| e >= t.epoch), "annulled record held");
                }
            }
        }
        h.settle();
        for id in &w.sent {
            let _ = h.reply(*id); // Exactly one each.
        }
    }
}

/// A record writing `len` bytes of `fill` at the start of `page`.
fn big_record(lsn: u64, backlink: u64, page: u64, len: usize) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(backlink),
        page: PageId(page),
        cpl: true,
        op: RedoOp::Write {
            offset: (lsn % 7) as u32 * 100,
            bytes: vec![(lsn % 251) as u8; len],
        },
    }
}

/// Reads `page` at `read_point` from segment 0 and returns its bytes.
fn read_bytes(h: &mut Harness, page: u64, read_point: u64) -> Vec<u8> {
    let id = h.send(Message::ReadPage(ReadPage {
        volume: V,
        epoch: Epoch(0),
        pg: PgId(0),
        segment: SegmentIndex(0),
        page: PageId(page),
        read_point: Lsn(read_point),
    }));
    match h.reply(id) {
        Message::Page(p) => {
            assert!(p.page_lsn.0 <= read_point);
            p.bytes.clone()
        }
        other => panic!("read of page {page} at {read_point}: {other:?}"),
    }
}

/// Appends 4 records of 6,000 bytes after `lsn` (pages `lsn % 8`), applies them to `model`,
/// and checks the append is acknowledged once durable.
fn append_and_model(
    h: &mut Harness,
    model: &mut HashMap<u64, wire::PageImage>,
    lsn: &mut u64,
    i: u64,
) {
    let page_bytes = node::manifest::DEFAULT_PAGE_SIZE_BYTES as usize;
    let mut records = Vec::new();
    for _ in 0..4 {
        let next = *lsn + 1;
        records.push(big_record(next, *lsn, next % 8, 6000));
        *lsn = next;
    }
    for r in &records {
        let image = model
            .entry(r.page.0)
            .or_insert_with(|| wire::PageImage::zeroed(r.page, page_bytes));
        wire::apply_record(image, r).unwrap();
    }
    let id = h.send(append(Epoch(0), records));
    h.settle();
    assert!(
        matches!(h.reply(id), Message::Ack(_)),
        "append {i}: {:?}",
        h.reply(id)
    );
}

/// Goal: a sustained write load of several times the journal's capacity never fills it —
/// coalescing materializes what PGMRPL allows, garbage collection recycles journal files —
/// and reads at the newest point, after GC and after a restart from what is durable, equal a
/// model of every write. Method: a ring of 3 journal files of one group's size each (about
/// 290 appends each); 1,600 appends of 4 records of 6,000 bytes over 8 pages; PGMRPL raised to the newest LSN every 8 appends;
/// every reply must be an Ack; compare page images with a model applied in memory.
#[test]
fn sustained_writes_recycle_the_journal_and_reads_stay_exact() {
    let config = CoreConfig {
        journal_file_bytes: GROUP_BYTES_MAX as u64,
        journal_file_count: 3,
        ..config()
    };
    let manifest = Manifest {
        segments: vec![key(0)],
        ..Manifest::default()
    };
    let mut h = Harness::recover_with(
        config,
        manifest,
        BTreeMap::new(),
        HashMap::new(),
        Default::default(),
    );
    let mut model: HashMap<u64, wire::PageImage> = HashMap::new();
    let (mut lsn, appends) = (0u64, 1600u64);
    for i in 0..appends {
        append_and_model(&mut h, &mut model, &mut lsn, i);
        if i % 8 == 7 {
            let set = h.send(Message::SetPgmrpl(wire::SetPgmrpl {
                volume: V,
                pg: PgId(0),
                pgmrpl: Lsn(lsn),
                epoch: wire::Epoch(0),
                vdl: Lsn::ZERO,
            }));
            h.settle();
            assert_eq!(h.reply(set), &Message::Done);
        }
    }
    let stats = h.core.background_stats();
    let written = appends * 4 * 6000;
    assert!(
        written > 3 * 3 * GROUP_BYTES_MAX as u64 / 2,
        "the load is over 1.5 times the journal"
    );
    assert!(stats.files_recycled >= 4, "the ring went round: {stats:?}");
    assert!(stats.rounds > 0 && stats.rounds_failed == 0, "{stats:?}");
    let segment = h.core.segment(&key(0)).unwrap();
    assert_eq!(segment.scl(), Lsn(lsn));
    assert!(
        segment.record_count() < lsn as usize / 2,
        "records left the index: {} of {lsn} still there",
        segment.record_count()
    );
    for page in 0..8 {
        assert_eq!(
            read_bytes(&mut h, page, lsn),
            model[&page].bytes,
            "page {page}"
        );
    }
    let mut restarted = h.restart();
    assert_eq!(restarted.core.scl(&key(0)), Some(Lsn(lsn)));
    for page in 0..8 {
        let bytes = read_bytes(&mut restarted, page, lsn);
        assert_eq!(bytes, model[&page].bytes, "page {page} after a restart");
    }
}

/// A throttle that delays every ack by exactly `delay` (journal use is always at or past 0 %).
fn always(delay: std::time::Duration) -> ThrottleConfig {
    ThrottleConfig {
        journal_percent: 0,
        backlog_records: usize::MAX / 4,
        delay_min: delay,
        delay_max: delay,
    }
}

/// Goal: under back-pressure a durable batch's ack is held, then leaves at its deadline with
/// the SCL as it is then; the core's timer names that deadline; nothing else waits (the batch
/// is indexed at once); the state is reported once per episode.
/// Method: force throttling (journal_percent = 0) with a 100 ms delay; append, complete the
/// write, step the core's clock to just before and to the deadline.
#[test]
fn throttled_acks_are_held_until_their_deadline() {
    let mut h = Harness::new();
    let delay = Duration::from_millis(100);
    h.core.configure_throttle(always(delay));
    let a = h.send(link(Epoch(0), 1, 0));
    h.persist_all();
    assert!(!h.has_reply(a), "held by back-pressure");
    assert_eq!(h.scl(), Lsn(1), "the batch is indexed while its ack waits");
    let status = h.core.throttle_status();
    assert!(status.throttled);
    assert_eq!(
        (status.episodes, status.acks_throttled, status.acks_held),
        (1, 1, 1)
    );
    assert_eq!(status.delay, delay);
    assert!(!h.core.is_idle(), "a held ack is work still to do");
    let deadline = h.now + delay;
    h.core.handle_timeout(h.now); // As a driver does when it starts (gossip plans at once).
    h.drain();
    assert_eq!(h.core.poll_timeout(), Some(deadline));
    h.core.handle_timeout(deadline - Duration::from_millis(1));
    h.drain();
    assert!(!h.has_reply(a));
    h.core.handle_timeout(deadline);
    h.drain();
    assert_eq!(h.ack_scl(a), Lsn(1));
    assert_eq!(h.core.throttle_status().acks_held, 0);
    assert_eq!(h.core.poll_timeout(), None);
    assert!(h.core.is_idle());
    // Still under pressure: the next ack is held too, in the same episode.
    h.now = deadline;
    let b = h.send(link(Epoch(0), 2, 1));
    h.persist_all();
    assert!(!h.has_reply(b));
    assert_eq!(h.core.throttle_status().episodes, 1);
}

/// Goal: acks leave in the order they were decided even when pressure drops meanwhile (an ack
/// decided without pressure waits behind those held before it), and errors are never held.
/// Method: hold one ack under a 100 ms delay, lift the pressure, append again, then also a
/// request refused at once; step the clock to the first deadline.
#[test]
fn held_acks_keep_their_order_and_errors_are_never_held() {
    let mut h = Harness::new();
    h.core
        .configure_throttle(always(Duration::from_millis(100)));
    let a = h.send(link(Epoch(0), 1, 0));
    h.persist_all();
    h.core.configure_throttle(ThrottleConfig::default());
    h.now += Duration::from_millis(10);
    let b = h.send(link(Epoch(0), 2, 1));
    h.persist_all();
    assert!(!h.has_reply(a) && !h.has_reply(b), "b waits behind a");
    let status = h.core.throttle_status();
    assert!(!status.throttled, "no pressure any more");
    assert_eq!(status.acks_held, 2);
    let refused = h.send(link(Epoch(5), 3, 2));
    assert_eq!(h.error(refused).0, ErrorCode::EpochNotInstalled);
    h.core.handle_timeout(h.now + Duration::from_millis(90));
    h.drain();
    let acked: Vec<u64> = h
        .replies
        .iter()
        .filter(|(_, _, m)| matches!(m, Message::Ack(_)))
        .map(|(_, id, _)| *id)
        .collect();
    assert_eq!(acked, vec![a, b]);
    assert_eq!(h.ack_scl(b), Lsn(2));
}

/// Goal: a held ack never outlives the node's serving: shutdown sends it at once, and a fatal
/// stop answers it ShuttingDown; an epoch that moves on while an ack is held turns it into
/// StaleEpoch. Method: hold acks, then fence, shut down, and stop another core.
#[test]
fn held_acks_leave_at_shutdown_and_turn_stale_with_the_epoch() {
    let mut h = Harness::new();
    h.core.configure_throttle(always(ACK_DELAY_LIMIT));
    let a = h.send(link(Epoch(0), 1, 0));
    h.persist_all();
    let fence = h.fence(Epoch(0), e(1, 1));
    h.settle();
    assert!(matches!(h.reply(fence), Message::VolumeState(_)));
    let b = h.send(link(e(1, 1), 2, 1));
    h.persist_all();
    assert!(!h.has_reply(a) && !h.has_reply(b));
    h.core.begin_shutdown();
    h.drain();
    assert_eq!(
        h.error(a).0,
        ErrorCode::StaleEpoch,
        "its epoch was replaced"
    );
    assert_eq!(h.ack_scl(b), Lsn(2));
    assert!(h.core.is_idle());

    let mut h = Harness::new();
    h.core.configure_throttle(always(ACK_DELAY_LIMIT));
    let c = h.send(link(Epoch(0), 1, 0));
    h.persist_all();
    h.core.handle_fatal_io("EIO".into());
    h.drain();
    assert_eq!(h.error(c).0, ErrorCode::ShuttingDown);
    assert_eq!(h.core.poll_timeout(), None);
    assert!(h.core.is_idle());
}

/// Appends a run of `count` records of 6,000 bytes continuing the chain after `lsn`, completes
/// its write, and returns its request id.
fn append_run(h: &mut Harness, lsn: &mut u64, count: u64) -> u64 {
    let records = (0..count)
        .map(|_| {
            *lsn += 1;
            big_record(*lsn, *lsn - 1, *lsn % 8, 6000)
        })
        .collect();
    let id = h.send(append(Epoch(0), records));
    h.persist_all();
    id
}

/// Goal: the ack delay grows with journal use: none below `journal_percent`, then rising,
/// and the maximum from the reserve on. Method: a journal of 4 files of one group's size, no
/// PGMRPL (nothing can be coalesced or collected); appends of 40 records of 6,000 bytes until
/// the journal refuses; note each ack's delay and the journal use it was decided at.
#[test]
fn the_ack_delay_grows_with_journal_use() {
    let config = CoreConfig {
        journal_file_bytes: GROUP_BYTES_MAX as u64,
        journal_file_count: 4,
        ..config()
    };
    let mut h = Harness::recover_with(
        config,
        Manifest {
            segments: vec![key(0)],
            ..Manifest::default()
        },
        BTreeMap::new(),
        HashMap::new(),
        Default::default(),
    );
    let (min, max) = (Duration::from_millis(10), Duration::from_millis(110));
    h.core.configure_throttle(ThrottleConfig {
        journal_percent: 20,
        delay_min: min,
        delay_max: max,
        ..ThrottleConfig::default()
    });
    let mut lsn = 0;
    let mut seen: Vec<(u64, Option<Duration>)> = Vec::new();
    loop {
        let id = append_run(&mut h, &mut lsn, 40);
        if h.has_reply(id) {
            match h.reply(id) {
                Message::Error(e) if e.code == ErrorCode::JournalFull => break,
                Message::Ack(_) => {}
                other => panic!("append {id}: {other:?}"),
            }
        }
        let status = h.core.throttle_status();
        let held = if h.has_reply(id) {
            None
        } else {
            Some(status.delay)
        };
        seen.push((status.journal_used_percent, held));
        h.now += ACK_DELAY_LIMIT;
        h.core.handle_timeout(h.now);
        h.drain();
        assert!(h.has_reply(id), "released within the limit");
    }
    assert!(
        seen.iter()
            .all(|(used, held)| (*used < 20) == held.is_none()),
        "{seen:?}"
    );
    let delays: Vec<Duration> = seen.iter().filter_map(|(_, d)| *d).collect();
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert!(delays.iter().any(|d| *d > min && *d < max), "{delays:?}");
    assert_eq!(delays.last(), Some(&max), "full pressure near the end");
}

/// Goal: a full journal is an immediate error, never a wait: every append gets its reply
/// (Ack, or JournalFull once no file has room) within the back-pressure limit, and nothing
/// is left waiting. Method: a ring of 2 files of one group's size, no PGMRPL; append runs of
/// 40 records until JournalFull; after each, step the clock by ACK_DELAY_LIMIT.
#[test]
fn a_full_journal_is_an_error_not_a_hang() {
    let config = CoreConfig {
        journal_file_bytes: GROUP_BYTES_MAX as u64,
        journal_file_count: 2,
        ..config()
    };
    let manifest = Manifest {
        segments: vec![key(0)],
        ..Manifest::default()
    };
    let mut h = Harness::recover_with(
        config,
        manifest,
        BTreeMap::new(),
        HashMap::new(),
        Default::default(),
    );
    let mut lsn = 0;
    let mut acked = 0;
    loop {
        let id = append_run(&mut h, &mut lsn, 40);
        h.now += ACK_DELAY_LIMIT;
        h.core.handle_timeout(h.now);
        h.drain();
        h.settle();
        assert!(h.core.is_idle(), "nothing waits after append {id}");
        match h.reply(id) {
            Message::Ack(_) => acked += 1,
            Message::Error(e) if e.code == ErrorCode::JournalFull => break,
            other => panic!("append {id}: {other:?}"),
        }
    }
    assert!(acked > 10, "the journal held {acked} appends first");
    assert!(
        h.core.throttle_status().acks_throttled > 0,
        "pressure came first"
    );
    // The refused records are lost: what follows them lies beyond a gap, and the reserve
    // refuses it even where a small batch would still fit.
    let beyond = h.send(append(Epoch(0), vec![big_record(lsn + 1, lsn, 1, 100)]));
    h.settle();
    assert_eq!(h.error(beyond).0, ErrorCode::JournalFull);
    assert!(h.core.is_idle());
}

/// Goal: a coalescing backlog past its bound delays acks, and once coalescing catches up,
/// acks leave at once again. Method: bound 8 records; PGMRPL far ahead so every record is
/// coalescible; appends keep the foreground busy (no round below a quarter of the journal);
/// then the foreground idles past IDLE_AFTER, a round runs (the harness runs it at once).
#[test]
fn a_coalescing_backlog_delays_acks_until_it_is_worked_off() {
    let mut h = Harness::new();
    h.core.configure_throttle(ThrottleConfig {
        backlog_records: 8,
        delay_min: Duration::from_millis(5),
        delay_max: Duration::from_millis(5),
        ..ThrottleConfig::default()
    });
    let set = h.send(Message::SetPgmrpl(wire::SetPgmrpl {
        volume: V,
        pg: PgId(0),
        pgmrpl: Lsn(1000),
        epoch: wire::Epoch(0),
        vdl: Lsn::ZERO,
    }));
    assert_eq!(h.reply(set), &Message::Done);
    let mut held = Vec::new();
    for lsn in 1..=20 {
        // The header's VDL (here the backlink) is the hint coalescing stops at.
        let id = h.send(link(Epoch(0), lsn, lsn - 1));
        h.persist_all();
        if !h.has_reply(id) {
            held.push(lsn);
        }
        h.now += node::core::BACKLOG_REFRESH;
        h.core.handle_timeout(h.now);
        h.drain();
    }
    assert_eq!(
        h.core.background_stats().rounds,
        0,
        "the foreground was busy"
    );
    assert!(
        held.first().is_some_and(|l| *l >= 9),
        "not before the bound: {held:?}"
    );
    assert!(held.len() >= 8, "{held:?}");
    let status = h.core.throttle_status();
    assert!(
        status.throttled && status.backlog_records >= 8,
        "{status:?}"
    );
    // The foreground idles: a round works the backlog off.
    h.now += IDLE_AFTER;
    h.core.handle_timeout(h.now);
    h.drain();
    h.settle();
    assert!(h.core.background_stats().rounds >= 1);
    let after = h.send(link(Epoch(0), 21, 20));
    h.persist_all();
    assert!(
        h.has_reply(after),
        "acked at once: {:?}",
        h.core.throttle_status()
    );
    assert!(!h.core.throttle_status().throttled);
    assert_eq!(h.core.throttle_status().episodes, 1);
}

/// Goal: a writer gone quiet still gets its last records coalesced: SetPgmrpl carries its
/// VDL, taken as the hint only at the epoch in force. Method: five chain links (each Append's
/// VDL is the record before it, so the hint ends at 4); PGMRPL 5 with no VDL, then with a VDL
/// from another epoch, then from this one; the foreground idles between them.
#[test]
fn a_quiet_writers_last_records_are_coalesced_through_set_pgmrpl() {
    let mut h = Harness::new();
    for lsn in 1..=5 {
        let id = h.send(link(Epoch(0), lsn, lsn - 1));
        h.settle();
        assert!(matches!(h.reply(id), Message::Ack(_)));
    }
    let set = |h: &mut Harness, epoch: u64, vdl: u64| {
        let id = h.send(Message::SetPgmrpl(wire::SetPgmrpl {
            volume: V,
            pg: PgId(0),
            pgmrpl: Lsn(5),
            epoch: Epoch(epoch),
            vdl: Lsn(vdl),
        }));
        assert_eq!(h.reply(id), &Message::Done);
        h.now += IDLE_AFTER;
        h.core.handle_timeout(h.now);
        h.drain();
        h.settle();
        h.core.segment(&key(0)).expect("hosted").materialized()
    };
    assert_eq!(
        set(&mut h, 0, 0),
        Lsn(4),
        "up to the VDL the Appends carried"
    );
    assert_eq!(
        set(&mut h, 7, 5),
        Lsn(4),
        "another epoch's VDL says nothing"
    );
    assert_eq!(set(&mut h, 0, 5), Lsn(5), "this epoch's writer reached 5");
}

/// Goal: once the backlog is past back-pressure's bound, coalescing stops yielding to appends
/// (else acks would be delayed for work the node chose not to do), even with the journal far
/// below a quarter full. Method: a journal of 8 files (one eighth in use), bound 300 records
/// (above ROUND_RECORDS_MIN), PGMRPL far ahead; 400 one-record appends, a millisecond apart
/// (the foreground never idles).
#[test]
fn coalescing_stops_yielding_once_acks_are_delayed_for_it() {
    let config = CoreConfig {
        journal_file_bytes: GROUP_BYTES_MAX as u64,
        journal_file_count: 8,
        ..config()
    };
    let manifest = Manifest {
        segments: vec![key(0)],
        ..Manifest::default()
    };
    let mut h = Harness::recover_with(
        config,
        manifest,
        BTreeMap::new(),
        HashMap::new(),
        Default::default(),
    );
    h.core.configure_throttle(ThrottleConfig {
        backlog_records: 300,
        delay_min: Duration::from_millis(1),
        delay_max: Duration::from_millis(1),
        ..ThrottleConfig::default()
    });
    let set = h.send(Message::SetPgmrpl(wire::SetPgmrpl {
        volume: V,
        pg: PgId(0),
        pgmrpl: Lsn(10_000),
        epoch: wire::Epoch(0),
        vdl: Lsn::ZERO,
    }));
    assert_eq!(h.reply(set), &Message::Done);
    let mut first_held = None;
    for lsn in 1..=400 {
        let id = h.send(link(Epoch(0), lsn, lsn - 1));
        h.persist_all();
        if !h.has_reply(id) && first_held.is_none() {
            first_held = Some(lsn);
        }
        h.now += Duration::from_millis(1);
        h.core.handle_timeout(h.now);
        h.drain();
        h.settle();
    }
    assert!(h.core.journal_used_percent() < node::core::COALESCE_PERCENT);
    assert!(first_held.is_some_and(|l| l > 300), "{first_held:?}");
    let stats = h.core.background_stats();
    assert!(
        stats.rounds >= 1,
        "coalescing ran while appends flowed: {stats:?}"
    );
}

/// Goal: the owner of a PG lists the store first, then seals the chain into log objects no
/// further than the VDL hint, and states what is backed up in its VolumeState; a failure
/// retries later and moves nothing. Method: one node hosting segment 0 (no peers: it owns the
/// PG); backup on; jobs carried out by hand.
#[test]
fn the_owner_lists_then_seals_the_chain_up_to_the_vdl_hint() {
    use node::core::{BackupConfig, BackupJob, BackupOutcome};
    let mut h = Harness::new();
    h.core.configure_backup(BackupConfig {
        enabled: true,
        ..BackupConfig::default()
    });
    for lsn in 1..=5 {
        let id = h.send(link(Epoch(0), lsn, lsn - 1));
        h.settle();
        assert!(matches!(h.reply(id), Message::Ack(_)));
    }
    h.now += Duration::from_millis(1);
    h.core.handle_timeout(h.now);
    h.drain();
    let (token, job) = h.backups.pop().expect("a listing first");
    assert!(matches!(job, BackupJob::List { .. }), "{job:?}");
    h.core
        .handle_backup_done(token, BackupOutcome::Listed(Default::default()));
    h.drain();
    let (token, job) = h.backups.pop().expect("then a log range");
    let BackupJob::Log { after, through, .. } = job else {
        panic!("{job:?}");
    };
    // The hint is 4 (the last Append's VDL): record 5 may still be annulled by a recovery.
    assert_eq!((after, through), (Lsn(0), Lsn(4)));
    h.core
        .handle_backup_done(token, BackupOutcome::Failed("store down".into()));
    h.drain();
    assert!(h.backups.is_empty(), "retried only after retry_interval");
    assert_eq!(h.core.backup_state(&key(0)).0, Lsn::ZERO);
    h.now += BackupConfig::default().retry_interval;
    h.core.handle_timeout(h.now);
    h.drain();
    let (token, job) = h.backups.pop().expect("the same range again");
    assert!(
        matches!(
            job,
            BackupJob::Log {
                through: Lsn(4),
                ..
            }
        ),
        "{job:?}"
    );
    h.core.handle_backup_done(token, BackupOutcome::Uploaded);
    assert_eq!(h.core.backup_state(&key(0)).0, Lsn(4));
    let state = h.send(Message::GetVolumeState(V));
    h.settle();
    let Message::VolumeState(state) = h.reply(state) else {
        panic!("a volume state");
    };
    assert_eq!(state.segments[0].backed_up, Lsn(4));
    assert_eq!(h.core.backup_stats().log_objects, 1);
    assert_eq!(h.core.backup_stats().failures, 1);
}

/// Goal: a listing whose log runs past what is restorable (it restarted at a snapshot that
/// never completed) raises the backed-up LSN only to what is restorable. Method: one node
/// owning the PG; the listing says log end 22, restorable 3.
#[test]
fn a_listed_log_past_the_restorable_point_is_not_counted_as_backed_up() {
    use node::core::{BackupConfig, BackupJob, BackupOutcome};
    let mut h = Harness::new();
    h.core.configure_backup(BackupConfig {
        enabled: true,
        ..BackupConfig::default()
    });
    let id = h.send(link(Epoch(0), 1, 0));
    h.settle();
    assert!(matches!(h.reply(id), Message::Ack(_)));
    h.now += Duration::from_millis(1);
    h.core.handle_timeout(h.now);
    h.drain();
    let (token, job) = h.backups.pop().expect("a listing first");
    assert!(matches!(job, BackupJob::List { .. }), "{job:?}");
    let coverage = wire::backup::Coverage {
        log_end: Lsn(22),
        restorable: Lsn(3),
        snapshot: Lsn(0),
    };
    h.core
        .handle_backup_done(token, BackupOutcome::Listed(coverage));
    assert_eq!(h.core.backup_state(&key(0)).0, Lsn(3));
}
