//! Reads waiting on I/O: ReadPage (the page store's image plus the records above it, applied
//! by the driver with [`crate::pagestore::read_page`]) and FetchRecords (records read back
//! from the journal and returned as they are).
//!
//! Invariants: each token is issued once and completed at most once; a read's reply uses only
//! records whose LSNs are exactly the ones indexed when the read was issued (a record that
//! decodes but is not the one indexed was misdirected on disk: an operating error, reported
//! as `Internal`, never served).

use std::collections::BTreeMap;

use wire::{
    Epoch, ErrorCode, ErrorReply, LogRecord, Lsn, Message, PageId, PageImage, PageReply, Records,
};

use super::{ConnId, ReadToken};
use crate::manifest::SegmentKey;
use crate::segment::RecordLocation;

/// A page found damaged by a read: its segment, the page and why.
pub(super) type Damage = (SegmentKey, PageId, String);

/// What a read makes of its records.
#[derive(Clone, Debug)]
pub(super) enum ReadKind {
    Page {
        key: SegmentKey,
        page: PageId,
        read_point: Lsn,
    },
    /// A page fetch (FetchPages) at `read_point`.
    Pages { key: SegmentKey, read_point: Lsn },
    Records {
        key: SegmentKey,
        scl: Lsn,
        /// The epoch each record was written with (one per location).
        epochs: Vec<Epoch>,
    },
}

#[derive(Clone, Debug)]
struct PendingRead {
    conn: ConnId,
    request_id: u64,
    locations: Vec<RecordLocation>,
    kind: ReadKind,
}

#[derive(Default)]
pub(super) struct Reads {
    next_token: u64,
    pending: BTreeMap<ReadToken, PendingRead>,
}

impl Reads {
    /// Registers a read; the caller emits `ReadRecords` with the token.
    pub(super) fn begin(
        &mut self,
        conn: ConnId,
        request_id: u64,
        locations: &[RecordLocation],
        kind: ReadKind,
    ) -> ReadToken {
        assert!(
            !locations.is_empty() || matches!(kind, ReadKind::Page { .. } | ReadKind::Pages { .. }),
            "fetches without records are answered at once"
        );
        self.next_token += 1;
        let token = ReadToken(self.next_token);
        let read = PendingRead {
            conn,
            request_id,
            locations: locations.to_vec(),
            kind,
        };
        let previous = self.pending.insert(token, read);
        assert!(previous.is_none(), "tokens are issued once");
        token
    }

    /// Completes a read: its requester and its reply.
    pub(super) fn complete(
        &mut self,
        token: ReadToken,
        result: Result<Vec<LogRecord>, String>,
    ) -> (ConnId, u64, Result<Message, ErrorReply>) {
        let read = self
            .pending
            .remove(&token)
            .expect("a read is completed once, after it was asked for");
        assert!(!read.locations.is_empty());
        let reply = result
            .map_err(|e| ErrorReply::new(ErrorCode::Corrupt, format!("journal read failed: {e}")))
            .and_then(|records| check_identity(&read.locations, records))
            .map(|records| {
                let ReadKind::Records { key, scl, epochs } = read.kind else {
                    unreachable!("page reads complete with complete_page")
                };
                Message::Records(Records {
                    volume: key.volume,
                    pg: key.pg,
                    segment: key.segment,
                    scl,
                    epochs,
                    records,
                })
            });
        assert!(!self.pending.contains_key(&token));
        (read.conn, read.request_id, reply)
    }

    /// Completes a page read with the image the driver built (or why it could not).
    pub(super) fn complete_page(
        &mut self,
        token: ReadToken,
        result: Result<PageImage, (bool, String)>,
    ) -> (ConnId, u64, Result<Message, ErrorReply>, Option<Damage>) {
        let read = self
            .pending
            .remove(&token)
            .expect("a read is completed once, after it was asked for");
        let ReadKind::Page {
            key,
            page,
            read_point,
        } = read.kind
        else {
            panic!("a page read completes as one");
        };
        let damage = match &result {
            Err((true, why)) => Some((key, page, why.clone())),
            _ => None,
        };
        let reply = match result {
            Ok(image) if image.page == page && image.lsn <= read_point => {
                Ok(Message::Page(PageReply {
                    page,
                    page_lsn: image.lsn,
                    bytes: image.bytes,
                }))
            }
            Ok(image) => Err(ErrorReply::new(
                ErrorCode::Internal,
                format!(
                    "page read built page {} at LSN {} for page {} at read point {read_point}",
                    image.page.0, image.lsn, page.0
                ),
            )),
            Err((true, why)) => Err(ErrorReply::new(
                ErrorCode::Corrupt,
                format!("page {} is damaged on this segment: {why}", page.0),
            )),
            // A journal record that does not read back: this segment cannot serve the page
            // now (scrub finds and repairs the record); the reader goes elsewhere.
            Err((false, why)) => Err(ErrorReply::new(
                ErrorCode::Corrupt,
                format!("page {} read failed on this segment: {why}", page.0),
            )),
        };
        (read.conn, read.request_id, reply, damage)
    }

    /// Completes a page fetch with the pages the driver read (or why it could not).
    pub(super) fn complete_pages(
        &mut self,
        token: ReadToken,
        result: Result<(Vec<PageImage>, u64), (bool, String)>,
    ) -> (ConnId, u64, Result<Message, ErrorReply>) {
        let read = self
            .pending
            .remove(&token)
            .expect("a read is completed once, after it was asked for");
        let ReadKind::Pages { key, read_point } = read.kind else {
            panic!("a page fetch completes as one");
        };
        let reply = match result {
            Ok((images, next_index)) => {
                assert!(images.iter().all(|i| i.lsn <= read_point));
                let pages = images
                    .into_iter()
                    .map(|i| PageReply {
                        page: i.page,
                        page_lsn: i.lsn,
                        bytes: i.bytes,
                    })
                    .collect();
                Ok(Message::Pages(wire::Pages {
                    volume: key.volume,
                    pg: key.pg,
                    segment: key.segment,
                    read_point,
                    next_index,
                    pages,
                }))
            }
            Err((_, why)) => Err(ErrorReply::new(
                ErrorCode::Corrupt,
                format!("{key}: pages cannot be read at {read_point}: {why}"),
            )),
        };
        (read.conn, read.request_id, reply)
    }

    /// Every requester still waiting (the node is stopping).
    pub(super) fn drain_waiting(&mut self) -> impl Iterator<Item = (ConnId, u64)> + use<> {
        let pending = std::mem::take(&mut self.pending);
        assert!(self.pending.is_empty());
        assert!(pending.len() as u64 <= self.next_token);
        pending.into_values().map(|r| (r.conn, r.request_id))
    }

    pub(super) fn is_idle(&self) -> bool {
        assert!(self.pending.len() as u64 <= self.next_token);
        assert!(
            self.pending
                .keys()
                .next_back()
                .is_none_or(|t| t.0 <= self.next_token)
        );
        self.pending.is_empty()
    }
}

/// The records read back must be exactly the ones indexed, in order.
fn check_identity(
    locations: &[RecordLocation],
    records: Vec<LogRecord>,
) -> Result<Vec<LogRecord>, ErrorReply> {
    assert!(
        !locations.is_empty(),
        "reads without records are answered at once"
    );
    if records.len() != locations.len() {
        return Err(ErrorReply::new(
            ErrorCode::Internal,
            format!(
                "journal read returned {} records for {} locations",
                records.len(),
                locations.len()
            ),
        ));
    }
    let misplaced = locations.iter().zip(&records).find(|(l, r)| l.lsn != r.lsn);
    if let Some((location, record)) = misplaced {
        return Err(ErrorReply::new(
            ErrorCode::Internal,
            format!(
                "journal holds record {} where {} was indexed",
                record.lsn, location.lsn
            ),
        ));
    }
    assert!(records.windows(2).all(|w| w[0].lsn < w[1].lsn));
    Ok(records)
}

/// The reply to a read with no record to apply: a zeroed page never written.
pub(super) fn empty_page(page: PageId, page_size_bytes: usize) -> Message {
    let image = PageImage::zeroed(page, page_size_bytes);
    assert!(image.lsn == Lsn::ZERO);
    assert!(image.bytes.len() == page_size_bytes);
    Message::Page(PageReply {
        page,
        page_lsn: image.lsn,
        bytes: image.bytes,
    })
}
