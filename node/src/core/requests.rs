//! Step one of every request: decode, check the role, the segment, the epoch and the pages,
//! then act or queue. Appends are checked in place ([`AppendView`]): no record is copied.
//!
//! Invariants: nothing from a request that fails a check is queued, persisted or applied; each
//! frame gets exactly one reply (now, or once what it waits for is done).

use std::time::Instant;

use bytes::Bytes;
use wire::codec::Reader;
use wire::frame::{FRAME_HEADER_BYTES, FrameHeader, PAGE_BYTES_MAX};
use wire::{
    AppendView, Epoch, ErrorCode, ErrorReply, Fence, FetchRecords, Geometry, HostSegments, Message,
    ReadPage, Records, Role, SetPgmrpl, Truncate, VolumeId,
};

use super::commit::Batch;
use super::durability::Answer;
use super::reads::{ReadKind, empty_page};
use super::{ConnId, NodeCore, NodeOutput, Phase, RecordInBody, volume_keys};
use crate::manifest::{SegmentKey, Truncation, add_truncation};
use crate::pagestore::{PageRead, PageSlots};
use crate::segment::Segment;

/// The frame kind of an Append (see `wire::frame`).
pub(super) const KIND_APPEND: u8 = 1;

/// Journal use (percent of its files) from which only appends that continue a chain are taken.
pub const RESERVE_PERCENT: u64 = 75;

/// Most truncation ranges a volume keeps (each recovery adds one; adjacent ones merge).
pub const TRUNCATIONS_PER_VOLUME_MAX: usize = 4096;

/// Largest `bytes_max` a FetchRecords reply honours: the reply frame stays under the limit.
pub const FETCH_BYTES_MAX: usize = wire::FRAME_BYTES_MAX
    - wire::frame::LEN_PREFIX_BYTES
    - FRAME_HEADER_BYTES
    - 32
    - wire::RECORD_HEADER_BYTES
    - wire::record::RECORD_PAYLOAD_BYTES_MAX;

const _: () = assert!(FETCH_BYTES_MAX > 1 << 20);

/// Largest `bytes_max` a FetchPages reply honours (half a frame: a reply may pass it by one
/// page, and each page carries a 24-byte header).
pub const FETCH_PAGES_BYTES_MAX: usize = FETCH_BYTES_MAX / 2;

const ENGINE: &[Role] = &[Role::Engine];
const ENGINE_OR_NODE: &[Role] = &[Role::Engine, Role::Node];

impl NodeCore {
    /// A request frame (the bytes after its length prefix) from `conn`, whose certificate
    /// carries `role`. `now` stamps appends, for [`NodeCore::oldest_waiting`].
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, role: Option<Role>, frame: Bytes) {
        assert!(
            self.phase != Phase::Recovering,
            "requests come after recovery"
        );
        self.note_now(now);
        let header = match FrameHeader::decode(&mut Reader::new(&frame)) {
            Ok(header) => header,
            Err(e) => {
                let code = ErrorCode::of_decode_error(&e);
                return self.reply_error(conn, 0, code, e.to_string());
            }
        };
        let request_id = header.request_id;
        if let Some(text) = self.refusal() {
            return self.reply_error(conn, request_id, ErrorCode::ShuttingDown, text);
        }
        assert!(frame.len() >= FRAME_HEADER_BYTES, "the header decoded");
        let body = frame.slice(FRAME_HEADER_BYTES..);
        if header.kind == KIND_APPEND {
            return self.handle_append(now, conn, role, request_id, body);
        }
        match Message::decode_body(header.kind, &body) {
            Ok(message) => self.handle_message(conn, role, request_id, message),
            Err(e) => {
                let code = ErrorCode::of_decode_error(&e);
                self.reply_error(conn, request_id, code, e.to_string());
            }
        }
    }

    /// A request given as a message: encoded as it would arrive, then handled as
    /// [`NodeCore::handle_frame`] handles it (for simulators and tests).
    pub fn handle_request(
        &mut self,
        now: Instant,
        conn: ConnId,
        role: Option<Role>,
        request_id: u64,
        message: Message,
    ) {
        let bytes = wire::Frame {
            request_id,
            message,
        }
        .to_bytes();
        assert!(bytes.len() >= wire::frame::LEN_PREFIX_BYTES + FRAME_HEADER_BYTES);
        let frame = Bytes::from(bytes).slice(wire::frame::LEN_PREFIX_BYTES..);
        assert!(frame.len() <= wire::FRAME_BYTES_MAX);
        self.handle_frame(now, conn, role, frame);
    }

    /// Why a new request is refused, if the node no longer serves.
    fn refusal(&self) -> Option<String> {
        assert!(
            self.phase != Phase::Recovering,
            "requests come after recovery"
        );
        assert!(self.commit.is_idle() || self.stopped().is_none());
        match &self.phase {
            Phase::Serving => None,
            Phase::ShuttingDown => Some(format!("node {} is shutting down", self.config.name)),
            Phase::Stopped(reason) => Some(format!("node {} stopped: {reason}", self.config.name)),
            Phase::Recovering => unreachable!("checked by the caller"),
        }
    }

    fn handle_message(&mut self, conn: ConnId, role: Option<Role>, request_id: u64, m: Message) {
        let (what, allowed) = match &m {
            Message::GetVolumeState(_) => ("GetVolumeState", ENGINE_OR_NODE),
            Message::FetchRecords(_) => ("FetchRecords", ENGINE_OR_NODE),
            Message::FetchPages(_) => ("FetchPages", ENGINE_OR_NODE),
            // Nodes read pages of their peers to repair damaged ones.
            Message::ReadPage(_) => ("ReadPage", ENGINE_OR_NODE),
            Message::HostSegments(_) => ("HostSegments", ENGINE),
            Message::SetPgmrpl(_) => ("SetPgmrpl", ENGINE),
            Message::Fence(_) => ("Fence", ENGINE),
            Message::Truncate(_) => ("Truncate", ENGINE),
            _ => {
                let text = "a node accepts requests, not replies".to_string();
                return self.reply_error(conn, request_id, ErrorCode::Malformed, text);
            }
        };
        if let Err(e) = self.check_role(role, what, allowed) {
            return self.reply(conn, request_id, Message::Error(e));
        }
        assert!(role.is_some(), "every request needs a role");
        assert!(self.stopped().is_none(), "refused by the caller");
        match m {
            Message::GetVolumeState(volume) => {
                self.answer_when_durable(conn, request_id, volume, Answer::VolumeState(volume));
            }
            Message::FetchRecords(fetch) => self.handle_fetch(conn, request_id, &fetch),
            Message::FetchPages(fetch) => self.handle_fetch_pages(conn, request_id, &fetch),
            Message::ReadPage(read) => self.handle_read(conn, request_id, &read),
            Message::HostSegments(host) => self.handle_host(conn, request_id, &host),
            Message::SetPgmrpl(set) => {
                let result = self.set_pgmrpl(&set).map(|()| Message::Done);
                self.reply_result(conn, request_id, result);
            }
            Message::Fence(fence) => self.handle_fence(conn, request_id, &fence),
            Message::Truncate(truncate) => self.handle_truncate(conn, request_id, &truncate),
            _ => unreachable!("filtered above"),
        }
    }

    fn check_role(
        &self,
        role: Option<Role>,
        what: &str,
        allowed: &[Role],
    ) -> Result<(), ErrorReply> {
        if role.is_some_and(|r| allowed.contains(&r)) {
            return Ok(());
        }
        let presented = match role {
            Some(Role::Engine) => "an engine certificate",
            Some(Role::Node) => "a node certificate",
            None => "a certificate without a role",
        };
        let required = match allowed {
            [Role::Engine] => "an engine certificate",
            [Role::Node] => "a node certificate",
            _ => "an engine or node certificate",
        };
        assert!(!allowed.is_empty());
        assert!(role.is_none_or(|r| !allowed.contains(&r)));
        Err(ErrorReply::new(
            ErrorCode::Forbidden,
            format!("{what} needs {required}; this connection presented {presented}"),
        ))
    }

    /// The segment must be hosted here.
    fn check_hosted(&self, key: &SegmentKey) -> Result<(), ErrorReply> {
        if self.segments.contains_key(key) {
            assert!(
                self.volumes.contains_key(&key.volume),
                "hosted volumes are known"
            );
            assert!(self.volumes[&key.volume].meta.page_size_bytes > 0);
            return Ok(());
        }
        Err(ErrorReply::new(
            ErrorCode::UnknownSegment,
            format!("{key} is not hosted by node {}", self.config.name),
        ))
    }

    /// The volume must have a segment hosted here.
    fn check_volume_hosted(&self, volume: VolumeId) -> Result<(), ErrorReply> {
        if self.segments.range(volume_keys(volume)).next().is_some() {
            assert!(
                self.volumes.contains_key(&volume),
                "hosted volumes are known"
            );
            assert!(self.volumes[&volume].meta.page_size_bytes > 0);
            return Ok(());
        }
        Err(ErrorReply::new(
            ErrorCode::UnknownSegment,
            format!(
                "volume {volume} has no segment on node {}",
                self.config.name
            ),
        ))
    }

    /// A request that reads or changes segment state must carry exactly the node's epoch.
    fn check_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<(), ErrorReply> {
        let installed = self.epoch(volume);
        assert!(self.volumes.contains_key(&volume) || installed == Epoch(0));
        if epoch < installed {
            return Err(ErrorReply::new(
                ErrorCode::StaleEpoch,
                format!("epoch {epoch} is older than volume {volume}'s epoch {installed}"),
            ));
        }
        if epoch > installed {
            return Err(ErrorReply::new(
                ErrorCode::EpochNotInstalled,
                format!(
                    "epoch {epoch} is newer than volume {volume}'s installed epoch {installed}: \
                     send Fence or Truncate first"
                ),
            ));
        }
        assert!(epoch == installed);
        Ok(())
    }

    /// Pages per PG of `volume`, 0 while unknown.
    pub(super) fn pages_per_pg(&self, volume: VolumeId) -> u64 {
        let Some(v) = self.volumes.get(&volume) else {
            return 0;
        };
        assert!(
            v.meta.page_size_bytes > 0,
            "page sizes are checked when hosting"
        );
        assert!(v.meta.page_size_bytes as usize <= PAGE_BYTES_MAX);
        v.meta.pages_per_pg
    }

    fn handle_append(
        &mut self,
        now: Instant,
        conn: ConnId,
        role: Option<Role>,
        request_id: u64,
        body: Bytes,
    ) {
        let checked = self
            .check_role(role, "Append", ENGINE)
            .and_then(|()| {
                AppendView::decode(&body)
                    .map_err(|e| ErrorReply::new(ErrorCode::of_decode_error(&e), e.to_string()))
            })
            .and_then(|view| self.check_append(&view).map(|key| (key, view)));
        let (key, view) = match checked {
            Ok(checked) => checked,
            Err(e) => return self.reply(conn, request_id, Message::Error(e)),
        };
        assert!(
            body.len() >= wire::frame::APPEND_HEADER_BYTES,
            "the view checked it"
        );
        let batch = Batch {
            conn,
            request_id,
            key,
            epoch: view.header.epoch,
            vdl: view.header.vdl,
            records: RecordInBody::of_view(&view),
            received: now,
            gossip: false,
        };
        assert!(batch.records.len() == view.header.record_count as usize);
        drop(view);
        if let Err(e) = self.check_reserve(&batch) {
            return self.reply(conn, request_id, Message::Error(e));
        }
        self.note_accepted(&batch);
        self.background.last_append = Some(now);
        self.commit.enqueue(batch, body);
    }

    /// Near a full journal ([`RESERVE_PERCENT`]), only appends that continue their segment's
    /// chain (from its SCL, or from an append accepted before) are taken: they are what lets
    /// VDL, then PGMRPL, then garbage collection move on. Records beyond a gap would fill the
    /// last of the journal with what can be neither coalesced nor collected until the gap is
    /// filled, and a journal full of them stalls every writer for good.
    fn check_reserve(&self, batch: &Batch) -> Result<(), ErrorReply> {
        if self.journal_used_percent() < RESERVE_PERCENT {
            return Ok(());
        }
        let first = batch.records[0].backlink;
        let end = self.chain_end(&batch.key);
        if first <= end {
            return Ok(());
        }
        Err(ErrorReply::new(
            ErrorCode::JournalFull,
            format!(
                "journal nearly full: {} takes only records that continue its chain (at {end}), \
                 this batch starts after {first}",
                batch.key
            ),
        ))
    }

    /// Checks an append's segment, epoch and pages; returns its segment.
    fn check_append(&self, view: &AppendView<'_>) -> Result<SegmentKey, ErrorReply> {
        let h = view.header;
        let key = SegmentKey {
            volume: h.volume,
            pg: h.pg,
            segment: h.segment,
        };
        self.check_hosted(&key)?;
        self.check_epoch(h.volume, h.epoch)?;
        assert!(h.record_count as usize == view.records.len());
        assert!(!view.records.is_empty(), "the view checked the count");
        let pages_per_pg = self.pages_per_pg(h.volume);
        if pages_per_pg > 0 {
            let outside = view
                .records
                .iter()
                .find(|r| !Geometry::page_in_pg(pages_per_pg, r.page, h.pg));
            if let Some(r) = outside {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!(
                        "record {} is for page {}, outside pg {}",
                        r.lsn, r.page.0, h.pg
                    ),
                ));
            }
        }
        Ok(key)
    }

    fn handle_host(&mut self, conn: ConnId, request_id: u64, host: &HostSegments) {
        assert!(self.stopped().is_none(), "refused by the caller");
        match self.host_segments(host) {
            Ok(()) => {
                assert!(host.segments.iter().all(|(pg, segment)| {
                    let key = SegmentKey {
                        volume: host.volume,
                        pg: *pg,
                        segment: *segment,
                    };
                    self.segments.contains_key(&key)
                }));
                self.answer_when_durable(conn, request_id, host.volume, Answer::Done);
            }
            Err(e) => self.reply(conn, request_id, Message::Error(e)),
        }
    }

    /// Hosts the named segments from now on (idempotent), installing a newer epoch and
    /// recording the volume's geometry.
    fn host_segments(&mut self, host: &HostSegments) -> Result<(), ErrorReply> {
        fits_manifest("epoch", host.epoch.0)?;
        fits_manifest("pages_per_pg", host.pages_per_pg)?;
        fits_manifest("volume", host.volume.0)?;
        let page_size = host.page_size_bytes as usize;
        if page_size == 0 || page_size > PAGE_BYTES_MAX {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("page size {page_size} must be between 1 and {PAGE_BYTES_MAX}"),
            ));
        }
        let installed = self.epoch(host.volume);
        if host.epoch < installed {
            return Err(ErrorReply::new(
                ErrorCode::StaleEpoch,
                format!(
                    "epoch {} is older than volume {}'s epoch {installed}",
                    host.epoch, host.volume
                ),
            ));
        }
        let keys: Vec<SegmentKey> = host
            .segments
            .iter()
            .map(|(pg, segment)| SegmentKey {
                volume: host.volume,
                pg: *pg,
                segment: *segment,
            })
            .filter(|key| !self.segments.contains_key(key))
            .collect();
        assert!(keys.len() <= host.segments.len());
        let hosted = self.segments.range(volume_keys(host.volume)).count();
        if hosted + keys.len() > wire::frame::HOST_SEGMENTS_MAX {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "volume {} would have more than {} segments on one node",
                    host.volume,
                    wire::frame::HOST_SEGMENTS_MAX
                ),
            ));
        }
        self.install_host(host, keys);
        assert!(self.epoch(host.volume) == host.epoch);
        Ok(())
    }

    fn install_host(&mut self, host: &HostSegments, keys: Vec<SegmentKey>) {
        let volume = self.volumes.entry(host.volume).or_default();
        let before = volume.meta.clone();
        volume.meta.epoch = host.epoch;
        volume.meta.page_size_bytes = host.page_size_bytes;
        volume.meta.pages_per_pg = host.pages_per_pg;
        if host.pg_count > 0 {
            volume.meta.pg_count = host.pg_count;
        }
        let changed = before != volume.meta || !keys.is_empty();
        assert!(volume.meta.epoch >= before.epoch, "epochs only grow");
        for key in keys {
            let previous = self.segments.insert(key, Segment::default());
            assert!(previous.is_none(), "only new segments are added");
        }
        let changed = self.install_placement(host) || changed;
        if changed {
            self.manifest_changed(host.volume);
        }
        assert!(self.check_volume_hosted(host.volume).is_ok() || host.segments.is_empty());
    }

    /// Records a PG's minimum read point on every segment of it hosted here, and the writer's
    /// VDL as the volume's VDL hint if the writer is at the epoch in force here (it says its
    /// VDL only to a node that installed its truncation: see `wire::SetPgmrpl`).
    fn set_pgmrpl(&mut self, request: &SetPgmrpl) -> Result<(), ErrorReply> {
        if request.vdl > wire::Lsn::ZERO
            && request.epoch == self.epoch(request.volume)
            && let Some(volume) = self.volumes.get_mut(&request.volume)
        {
            volume.vdl = volume.vdl.max(request.vdl);
        }
        let mut found = 0;
        for (key, segment) in self.segments.range_mut(volume_keys(request.volume)) {
            if key.pg == request.pg {
                segment.raise_pgmrpl(request.pgmrpl);
                found += 1;
            }
        }
        if found == 0 {
            return Err(ErrorReply::new(
                ErrorCode::UnknownSegment,
                format!(
                    "volume {} pg {} is not hosted here",
                    request.volume, request.pg
                ),
            ));
        }
        assert!(found <= wire::PG_SIZE);
        assert!(found >= 1);
        Ok(())
    }

    /// Installs `epoch_new` if the node has seen nothing newer than `epoch_current`.
    fn handle_fence(&mut self, conn: ConnId, request_id: u64, fence: &Fence) {
        let volume = fence.volume;
        let checked = self.check_volume_hosted(volume).and_then(|()| {
            fits_manifest("epoch_new", fence.epoch_new.0)?;
            if fence.epoch_new <= fence.epoch_current {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!(
                        "fence to epoch {} does not move past epoch {}",
                        fence.epoch_new, fence.epoch_current
                    ),
                ));
            }
            Ok(())
        });
        if let Err(e) = checked {
            return self.reply(conn, request_id, Message::Error(e));
        }
        let installed = self.epoch(volume);
        if installed == fence.epoch_new {
            // A retry of a fence this node took.
            return self.answer_when_durable(conn, request_id, volume, Answer::VolumeState(volume));
        }
        if installed > fence.epoch_current || fence.epoch_new <= installed {
            let text = format!(
                "fence of volume {volume} from epoch {} to {} refused: the node is at epoch \
                 {installed}",
                fence.epoch_current, fence.epoch_new
            );
            return self.reply_error(conn, request_id, ErrorCode::StaleEpoch, text);
        }
        assert!(installed < fence.epoch_new && installed <= fence.epoch_current);
        self.volumes.get_mut(&volume).expect("hosted").meta.epoch = fence.epoch_new;
        self.manifest_changed(volume);
        assert!(self.epoch(volume) == fence.epoch_new);
        self.answer_when_durable(conn, request_id, volume, Answer::VolumeState(volume));
    }

    /// Records a truncation range (installing a newer epoch), applies it to every hosted
    /// segment of the volume, and answers once it is durable.
    fn handle_truncate(&mut self, conn: ConnId, request_id: u64, t: &Truncate) {
        let volume = t.volume;
        let installed = self.epoch(volume);
        let checked = self.check_volume_hosted(volume).and_then(|()| {
            fits_manifest("epoch", t.epoch.0)?;
            fits_manifest("through", t.range.through.0)?;
            if t.epoch < installed {
                return Err(ErrorReply::new(
                    ErrorCode::StaleEpoch,
                    format!(
                        "epoch {} is older than volume {volume}'s epoch {installed}",
                        t.epoch
                    ),
                ));
            }
            self.check_truncation_room(t)
        });
        if let Err(e) = checked {
            return self.reply(conn, request_id, Message::Error(e));
        }
        let entry = self.volumes.get_mut(&volume).expect("hosted");
        let mut changed = t.epoch > entry.meta.epoch;
        entry.meta.epoch = entry.meta.epoch.max(t.epoch);
        let range = Truncation {
            epoch: t.range.annul_epoch,
            after: t.range.after,
            through: t.range.through,
        };
        if range.after < range.through && add_truncation(&mut entry.meta.truncations, range) {
            changed = true;
            self.apply_truncation(volume, &range);
        }
        if changed {
            self.manifest_changed(volume);
        }
        assert!(self.epoch(volume) >= t.epoch);
        assert!(self.epoch(volume) >= range.epoch);
        self.answer_when_durable(conn, request_id, volume, Answer::VolumeState(volume));
    }

    /// Refuses a truncation that would pass the per-volume limit.
    fn check_truncation_room(&self, t: &Truncate) -> Result<(), ErrorReply> {
        let count = self
            .volumes
            .get(&t.volume)
            .map_or(0, |v| v.meta.truncations.len());
        assert!(count <= TRUNCATIONS_PER_VOLUME_MAX);
        assert!(
            t.range.after <= t.range.through,
            "the decoder checked the range"
        );
        if count < TRUNCATIONS_PER_VOLUME_MAX {
            return Ok(());
        }
        Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!(
                "volume {} already has {count} truncation ranges, the most a node keeps",
                t.volume
            ),
        ))
    }

    fn apply_truncation(&mut self, volume: VolumeId, t: &Truncation) {
        let mut dropped = 0;
        self.background
            .accepted_end
            .retain(|key, _| key.volume != volume);
        assert!(t.after < t.through, "only non-empty ranges are applied");
        for (key, segment) in self.segments.range_mut(volume_keys(volume)) {
            let before = segment.scl();
            dropped += segment.truncate(t);
            assert!(segment.scl() <= before || before <= t.after);
            tracing::debug!(
                "{key}: truncated ({}, {}] below epoch {}, SCL {before} -> {}",
                t.after,
                t.through,
                t.epoch,
                segment.scl()
            );
        }
        tracing::info!(
            "volume {volume}: records of epochs before {} in ({}, {}] annulled ({dropped} dropped here)",
            t.epoch,
            t.after,
            t.through
        );
    }

    /// A request about one segment: hosted here, and at the epoch in force.
    fn check_segment_at(&self, key: &SegmentKey, epoch: Epoch) -> Result<(), ErrorReply> {
        self.check_hosted(key)
            .and_then(|()| self.check_epoch(key.volume, epoch))
    }

    fn handle_read(&mut self, conn: ConnId, request_id: u64, read: &ReadPage) {
        let key = segment_key(read.volume, read.pg, read.segment);
        let checked = self.check_segment_at(&key, read.epoch).and_then(|()| {
            let pages_per_pg = self.pages_per_pg(read.volume);
            if pages_per_pg > 0 && !Geometry::page_in_pg(pages_per_pg, read.page, read.pg) {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!("page {} is not in pg {}", read.page.0, read.pg),
                ));
            }
            let segment = &self.segments[&key];
            if read.read_point < segment.materialized() {
                // The page store may hold only images newer than the read point: the records
                // between left the journal. Readers never go below PGMRPL, so only a peer
                // repairing a page asks this; it asks another segment.
                return Err(ErrorReply::new(
                    ErrorCode::Compacted,
                    format!(
                        "{key} has materialized through {}, above read point {}",
                        segment.materialized(),
                        read.read_point
                    ),
                ));
            }
            let locations = segment
                .records_for_read(read.page, read.read_point)
                .map_err(|e| {
                    ErrorReply::new(
                        ErrorCode::SclBelowReadPoint,
                        format!(
                            "{key} has SCL {} below read point {}",
                            e.scl, read.read_point
                        ),
                    )
                })?;
            if segment.any_damaged(&locations) {
                return Err(ErrorReply::new(
                    ErrorCode::Corrupt,
                    format!("{key}: a record of page {} is damaged here", read.page.0),
                ));
            }
            Ok(locations)
        });
        let locations = match checked {
            Ok(locations) => locations,
            Err(e) => return self.reply(conn, request_id, Message::Error(e)),
        };
        let meta = &self.volumes[&read.volume].meta;
        let page_size_bytes = meta.page_size_bytes as usize;
        assert!(page_size_bytes > 0, "page sizes are checked when hosting");
        assert!(locations.iter().all(|l| l.lsn <= read.read_point));
        let materialized = self.segments[&key].materialized();
        if locations.is_empty() && materialized == wire::Lsn::ZERO {
            return self.reply(conn, request_id, empty_page(read.page, page_size_bytes));
        }
        let page_read = PageRead {
            slots: PageSlots::new(key, read.page, page_size_bytes, meta.pages_per_pg),
            read_point: read.read_point,
            use_store: materialized > wire::Lsn::ZERO,
            records: locations,
        };
        let kind = ReadKind::Page {
            key,
            page: read.page,
            read_point: read.read_point,
        };
        let token = self.reads.begin(conn, request_id, &page_read.records, kind);
        self.outputs.push_back(NodeOutput::ReadPage {
            token,
            read: page_read,
        });
    }

    fn handle_fetch(&mut self, conn: ConnId, request_id: u64, fetch: &FetchRecords) {
        let key = segment_key(fetch.volume, fetch.pg, fetch.segment);
        if let Err(e) = self.check_segment_at(&key, fetch.epoch) {
            return self.reply(conn, request_id, Message::Error(e));
        }
        let segment = &self.segments[&key];
        let scl = segment.scl();
        let bytes_max = (fetch.bytes_max as usize).min(FETCH_BYTES_MAX);
        let locations = match segment.records_for_fetch(fetch.after, fetch.through, bytes_max) {
            Ok(locations) => locations,
            Err(compacted) => {
                let text = format!(
                    "{key}: records after {} left the journal (materialized through {}); ask a \
                     segment that still holds them",
                    fetch.after, compacted.base
                );
                return self.reply_error(conn, request_id, ErrorCode::Compacted, text);
            }
        };
        assert!(
            locations
                .iter()
                .all(|l| fetch.after < l.lsn && l.lsn <= scl)
        );
        assert!(locations.iter().all(|l| l.lsn <= fetch.through));
        if locations.is_empty() {
            let records = Records {
                volume: key.volume,
                pg: key.pg,
                segment: key.segment,
                scl,
                records: Vec::new(),
                epochs: Vec::new(),
            };
            return self.reply(conn, request_id, Message::Records(records));
        }
        // Each record keeps the epoch it was written with: a copy is annulled exactly when
        // the original is.
        let epochs = locations
            .iter()
            .map(|l| segment.epoch_of(l.lsn).expect("fetched records are held"))
            .collect();
        let kind = ReadKind::Records { key, scl, epochs };
        let token = self.reads.begin(conn, request_id, &locations, kind);
        self.outputs
            .push_back(NodeOutput::ReadRecords { token, locations });
    }
}

impl NodeCore {
    /// FetchPages: the segment's pages as of a point its page store can serve (see the wire
    /// docs), read by the driver ([`crate::pagestore::read_pages`]).
    fn handle_fetch_pages(&mut self, conn: ConnId, request_id: u64, fetch: &wire::FetchPages) {
        let key = segment_key(fetch.volume, fetch.pg, fetch.segment);
        let job = self
            .check_segment_at(&key, fetch.epoch)
            .and_then(|()| self.pages_read(key, fetch));
        match job {
            Ok(job) => {
                let kind = ReadKind::Pages {
                    key,
                    read_point: job.read_point,
                };
                let token = self.reads.begin(conn, request_id, &[], kind);
                self.outputs.push_back(NodeOutput::ReadPages { token, job });
            }
            Err(e) => self.reply(conn, request_id, Message::Error(e)),
        }
    }

    pub(super) fn pages_read(
        &self,
        key: SegmentKey,
        fetch: &wire::FetchPages,
    ) -> Result<crate::pagestore::PagesRead, ErrorReply> {
        let segment = &self.segments[&key];
        let materialized = segment.materialized();
        let read_point = if fetch.read_point == wire::Lsn::ZERO {
            materialized
        } else {
            fetch.read_point
        };
        let meta = &self.volumes[&key.volume].meta;
        let refuse = |code, text: String| Err(ErrorReply::new(code, text));
        if read_point == wire::Lsn::ZERO || meta.page_size_bytes == 0 {
            let text = format!("{key} has materialized nothing: fetch its records instead");
            return refuse(ErrorCode::Compacted, text);
        }
        if read_point < materialized {
            let text = format!("{key} has materialized through {materialized}, past {read_point}");
            return refuse(ErrorCode::Compacted, text);
        }
        if read_point > segment.scl() {
            let text = format!("{key} has SCL {} below {read_point}", segment.scl());
            return refuse(ErrorCode::SclBelowReadPoint, text);
        }
        let pages_per_pg = meta.pages_per_pg;
        let first = wire::PageId(u64::from(key.pg.0) * pages_per_pg + fetch.from_index);
        let records = segment.records_by_page(read_point, first).map_err(|lsn| {
            ErrorReply::new(
                ErrorCode::Corrupt,
                format!("{key}: record {lsn} is damaged"),
            )
        })?;
        Ok(crate::pagestore::PagesRead {
            key,
            page_bytes: meta.page_size_bytes as usize,
            pages_per_pg,
            read_point,
            use_store: materialized > wire::Lsn::ZERO,
            from_index: fetch.from_index,
            records,
            bytes_max: (fetch.bytes_max as usize).clamp(1, FETCH_PAGES_BYTES_MAX),
        })
    }
}

fn segment_key(volume: VolumeId, pg: wire::PgId, segment: wire::SegmentIndex) -> SegmentKey {
    SegmentKey {
        volume,
        pg,
        segment,
    }
}

/// The manifest is TOML, whose integers are signed 64-bit: a value past `i64::MAX` from a peer
/// is refused here rather than failing the manifest store (which would stop the node).
fn fits_manifest(what: &str, value: u64) -> Result<(), ErrorReply> {
    if i64::try_from(value).is_ok() {
        return Ok(());
    }
    Err(ErrorReply::new(
        ErrorCode::BadRequest,
        format!(
            "{what} = {value} is above {}, the largest a node stores",
            i64::MAX
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the node's notion of the Append kind matches the wire's encoding.
    /// Method: encode an Append frame and read its kind byte.
    #[test]
    fn append_kind_matches_the_wire() {
        let append = wire::Append {
            volume: VolumeId(1),
            epoch: Epoch(1),
            pg: wire::PgId(0),
            segment: wire::SegmentIndex(0),
            vdl: wire::Lsn::ZERO,
            records: vec![wire::LogRecord {
                lsn: wire::Lsn(1),
                backlink: wire::Lsn(0),
                page: wire::PageId(0),
                cpl: true,
                op: wire::RedoOp::Init,
            }],
        };
        let bytes = wire::Frame {
            request_id: 7,
            message: Message::Append(append),
        }
        .to_bytes();
        assert_eq!(bytes[5], KIND_APPEND);
    }
}
