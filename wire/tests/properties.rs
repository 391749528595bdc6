//! Property tests of the wire formats and the redo applicator (STYLE.md §7):
//! - `decode(encode(frame)) == frame` for every message kind;
//! - decoding arbitrary or corrupted bytes never panics, and whatever it accepts is
//!   consistent with its input (the same invariant the `wire/fuzz` targets assert);
//! - a single flipped bit inside a record is always detected;
//! - the applicator agrees with a byte-by-byte model of a page.

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use wire::frame::{
    ERROR_MESSAGE_BYTES_MAX, FRAME_HEADER_BYTES, FRAME_VERSION, HOST_SEGMENTS_MAX, decode_len,
};
use wire::record::{RECORD_PAYLOAD_BYTES_MAX, decode_records, encode_records};
use wire::{
    Append, AppendView, ApplyError, DecodeError, Epoch, ErrorCode, ErrorReply, Fence, FetchPages,
    FetchRecords, Frame, HostSegments, LogRecord, Lsn, Message, PG_SIZE, PageId, PageImage,
    PageReply, Pages, PeerNode, PgId, PgPlacement, RECORD_HEADER_BYTES, ReadPage, Records, RedoOp,
    SegmentAck, SegmentIndex, SegmentState, SetPgmrpl, Truncate, TruncationRange, VolumeId,
    VolumeState, apply_record, apply_records,
};

// ---------------------------------------------------------------------------------------
// Layout facts the tests need (see the diagrams in `frame.rs` and `record.rs`).

/// Bytes of the length prefix.
const PREFIX_BYTES: usize = 4;
/// Offset of an Append body's record count in a whole frame.
const APPEND_COUNT_OFFSET: usize = PREFIX_BYTES + FRAME_HEADER_BYTES + 24;
/// Offset of an Append frame's first record in a whole frame.
const APPEND_RECORDS_OFFSET: usize = PREFIX_BYTES + FRAME_HEADER_BYTES + 40;
/// Offset of a Page reply's `len` field in a whole frame; `crc32` and the bytes follow it.
const PAGE_LEN_OFFSET: usize = PREFIX_BYTES + FRAME_HEADER_BYTES + 16;
/// Offset of an error reply's message within the bytes after the length prefix.
const ERROR_MESSAGE_OFFSET_AFTER_LEN: usize = FRAME_HEADER_BYTES + 8;
/// Largest Write payload the generators produce (larger than an 8 KiB page).
const PAYLOAD_BYTES_MAX: usize = 9000;
// Generated records must be encodable.
const _: () = assert!(PAYLOAD_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX);
const KIND_ERROR: u8 = 3;
/// Kinds 1..=14 exist; the generators of raw frames also try 0 and 15.
const KIND_MAX: u8 = 14;
const KIND_HOST_SEGMENTS: u8 = 6;

const ALL_CODES: [ErrorCode; 15] = [
    ErrorCode::Malformed,
    ErrorCode::FrameTooLarge,
    ErrorCode::UnsupportedVersion,
    ErrorCode::BadCrc,
    ErrorCode::UnknownSegment,
    ErrorCode::StaleEpoch,
    ErrorCode::JournalFull,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::SclBelowReadPoint,
    ErrorCode::BadRequest,
    ErrorCode::Forbidden,
    ErrorCode::EpochNotInstalled,
    ErrorCode::Compacted,
    ErrorCode::Corrupt,
];

// ---------------------------------------------------------------------------------------
// Generators.

/// Mostly short payloads, sometimes up to `PAYLOAD_BYTES_MAX`.
fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..=64),
        1 => vec(any::<u8>(), 0..=PAYLOAD_BYTES_MAX),
    ]
}

fn arb_op() -> impl Strategy<Value = RedoOp> {
    prop_oneof![
        1 => Just(RedoOp::Init),
        4 => (any::<u32>(), arb_payload()).prop_map(|(offset, bytes)| RedoOp::Write { offset, bytes }),
    ]
}

/// A record at `lsn` (≥ 1) with any backlink below it, any page, CPL flag and op.
fn arb_record_at(lsn: u64) -> impl Strategy<Value = LogRecord> {
    let backlink = prop_oneof![Just(0), Just(lsn - 1), 0..lsn];
    (backlink, any::<u64>(), any::<bool>(), arb_op()).prop_map(move |(backlink, page, cpl, op)| {
        LogRecord {
            lsn: Lsn(lsn),
            backlink: Lsn(backlink),
            page: PageId(page),
            cpl,
            op,
        }
    })
}

/// 1..=8 records with strictly increasing LSNs, as an Append requires.
fn arb_records() -> impl Strategy<Value = Vec<LogRecord>> {
    let lsn = prop_oneof![1..=64u64, 1..=u64::MAX, Just(u64::MAX)];
    btree_set(lsn, 1..=8)
        .prop_flat_map(|lsns| lsns.into_iter().map(arb_record_at).collect::<Vec<_>>())
}

fn arb_append() -> impl Strategy<Value = Append> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        arb_records(),
    )
        .prop_map(|(volume, epoch, pg, segment, vdl, records)| Append {
            volume: VolumeId(volume),
            epoch: Epoch(epoch),
            pg: PgId(pg),
            segment: SegmentIndex(segment),
            vdl: Lsn(vdl),
            records,
        })
}

fn arb_ack() -> impl Strategy<Value = SegmentAck> {
    (any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
        |(volume, pg, segment, scl)| SegmentAck {
            volume: VolumeId(volume),
            pg: PgId(pg),
            segment: SegmentIndex(segment),
            scl: Lsn(scl),
        },
    )
}

/// Any text: short, arbitrary Unicode up to about 4 times the limit, and strings of 1- to
/// 4-byte characters that straddle the limit so every cut position occurs.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        vec(any::<char>(), 0..=ERROR_MESSAGE_BYTES_MAX + 64).prop_map(String::from_iter),
        vec(
            select(vec!['a', 'é', '€', '😀']),
            250..=ERROR_MESSAGE_BYTES_MAX + 8
        )
        .prop_map(String::from_iter),
    ]
}

/// An error reply as `ErrorReply::new` builds it: the message is within the limit.
fn arb_error() -> impl Strategy<Value = ErrorReply> {
    (select(ALL_CODES.to_vec()), arb_text()).prop_map(|(code, text)| ErrorReply::new(code, text))
}

fn arb_read_page() -> impl Strategy<Value = ReadPage> {
    (
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |((volume, epoch, pg, segment), (page, read_point))| ReadPage {
                volume: VolumeId(volume),
                epoch: Epoch(epoch),
                pg: PgId(pg),
                segment: SegmentIndex(segment),
                page: PageId(page),
                read_point: Lsn(read_point),
            },
        )
}

fn arb_page_reply() -> impl Strategy<Value = PageReply> {
    (any::<u64>(), any::<u64>(), arb_payload()).prop_map(|(page, page_lsn, bytes)| PageReply {
        page: PageId(page),
        page_lsn: Lsn(page_lsn),
        bytes,
    })
}

fn arb_host_segments() -> impl Strategy<Value = HostSegments> {
    let segment = (any::<u32>(), any::<u32>()).prop_map(|(pg, s)| (PgId(pg), SegmentIndex(s)));
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        (any::<u64>(), any::<u32>()),
        vec(segment, 0..=48),
        arb_placement(),
    )
        .prop_map(
            |(
                volume,
                epoch,
                page_size_bytes,
                (pages_per_pg, pg_count),
                segments,
                (nodes, placement),
            )| {
                HostSegments {
                    volume: VolumeId(volume),
                    epoch: Epoch(epoch),
                    page_size_bytes,
                    pages_per_pg,
                    pg_count,
                    segments,
                    nodes,
                    placement,
                }
            },
        )
}

/// A node table (names up to the limit, IPv4 and IPv6 addresses) and PG placements that
/// index into it.
fn arb_placement() -> impl Strategy<Value = (Vec<PeerNode>, Vec<PgPlacement>)> {
    let node = (
        "[a-z0-9-]{0,40}",
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(name, ip, port, v6)| {
            let ip: std::net::IpAddr = if v6 {
                std::net::Ipv6Addr::from(ip).into()
            } else {
                std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into()
            };
            PeerNode {
                name,
                address: std::net::SocketAddr::new(ip, port),
            }
        });
    vec(node, 0..=8).prop_flat_map(|nodes| {
        let n = nodes.len();
        let pg = (any::<u32>(), any::<[u16; PG_SIZE]>()).prop_map(move |(pg, picks)| PgPlacement {
            pg: PgId(pg),
            nodes: picks.map(|p| p % u16::try_from(n.max(1)).unwrap()),
        });
        let count = if n == 0 { 0..=0 } else { 0..=6 };
        (Just(nodes), vec(pg, count))
    })
}

fn arb_set_pgmrpl() -> impl Strategy<Value = SetPgmrpl> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(volume, pg, pgmrpl, epoch, vdl)| SetPgmrpl {
            volume: VolumeId(volume),
            pg: PgId(pg),
            pgmrpl: Lsn(pgmrpl),
            epoch: Epoch(epoch),
            vdl: Lsn(vdl),
        })
}

fn arb_volume_state() -> impl Strategy<Value = VolumeState> {
    let segment = (
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(pg, s, scl, backed_up, snapshot)| SegmentState {
            pg: PgId(pg),
            segment: SegmentIndex(s),
            scl: Lsn(scl),
            backed_up: Lsn(backed_up),
            snapshot: Lsn(snapshot),
        });
    let range = (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(e, a, b)| TruncationRange {
        annul_epoch: Epoch(e),
        after: Lsn(a.min(b)),
        through: Lsn(a.max(b)),
    });
    (
        (any::<u64>(), any::<u64>(), any::<u64>()),
        vec(range, 0..=4),
        vec(segment, 0..=24),
    )
        .prop_map(
            |((volume, epoch, vdl), truncations, segments)| VolumeState {
                volume: VolumeId(volume),
                epoch: Epoch(epoch),
                vdl: Lsn(vdl),
                truncations,
                segments,
            },
        )
}

fn arb_recovery_request() -> impl Strategy<Value = Message> {
    let (v, e, l) = (any::<u64>(), any::<u64>(), any::<u64>());
    prop_oneof![
        v.prop_map(|v| Message::GetVolumeState(VolumeId(v))),
        (v, e, e).prop_map(|(v, a, b)| Message::Fence(Fence {
            volume: VolumeId(v),
            epoch_current: Epoch(a),
            epoch_new: Epoch(b),
        })),
        (v, e, e, l, l).prop_map(|(v, e, n, a, b)| Message::Truncate(Truncate {
            volume: VolumeId(v),
            epoch: Epoch(e.max(n)),
            range: TruncationRange {
                annul_epoch: Epoch(e.min(n)),
                after: Lsn(a.min(b)),
                through: Lsn(a.max(b)),
            },
        })),
        ((v, e, any::<u32>(), any::<u32>()), (l, l, any::<u32>())).prop_map(
            |((v, e, pg, s), (a, b, max))| Message::FetchRecords(FetchRecords {
                volume: VolumeId(v),
                epoch: Epoch(e),
                pg: PgId(pg),
                segment: SegmentIndex(s),
                after: Lsn(a),
                through: Lsn(b),
                bytes_max: max,
            })
        ),
        (
            v,
            any::<u32>(),
            any::<u32>(),
            l,
            prop_oneof![Just(vec![]), arb_records()],
            any::<u64>(),
        )
            .prop_map(|(v, pg, s, scl, records, epoch)| Message::Records(Records {
                volume: VolumeId(v),
                pg: PgId(pg),
                segment: SegmentIndex(s),
                scl: Lsn(scl),
                epochs: (0..records.len() as u64)
                    .map(|i| Epoch(epoch.wrapping_add(i % 3)))
                    .collect(),
                records,
            })),
        arb_page_transfer(),
    ]
}

/// FetchPages and Pages (a segment rebuild's messages).
fn arb_page_transfer() -> impl Strategy<Value = Message> {
    let (v, e, l) = (any::<u64>(), any::<u64>(), any::<u64>());
    prop_oneof![
        (
            (v, e, any::<u32>(), any::<u32>()),
            (l, any::<u64>(), any::<u32>())
        )
            .prop_map(
                |((v, e, pg, s), (read_point, from_index, max))| Message::FetchPages(FetchPages {
                    volume: VolumeId(v),
                    epoch: Epoch(e),
                    pg: PgId(pg),
                    segment: SegmentIndex(s),
                    read_point: Lsn(read_point),
                    from_index,
                    bytes_max: max,
                })
            ),
        (
            (v, any::<u32>(), any::<u32>()),
            (l, any::<u64>()),
            vec(arb_page_reply(), 0..=3)
        )
            .prop_map(|((v, pg, s), (read_point, next_index), pages)| {
                Message::Pages(Pages {
                    volume: VolumeId(v),
                    pg: PgId(pg),
                    segment: SegmentIndex(s),
                    read_point: Lsn(read_point),
                    next_index,
                    pages,
                })
            }),
    ]
}

/// Every message kind, Append (the largest and most structured) most often.
fn arb_frame() -> impl Strategy<Value = Frame> {
    let message = prop_oneof![
        4 => arb_append().prop_map(Message::Append),
        1 => arb_ack().prop_map(Message::Ack),
        2 => arb_error().prop_map(Message::Error),
        1 => arb_read_page().prop_map(Message::ReadPage),
        2 => arb_page_reply().prop_map(Message::Page),
        1 => arb_host_segments().prop_map(Message::HostSegments),
        1 => arb_set_pgmrpl().prop_map(Message::SetPgmrpl),
        1 => Just(Message::Done),
        1 => arb_volume_state().prop_map(Message::VolumeState),
        3 => arb_recovery_request(),
    ];
    (any::<u64>(), message).prop_map(|(request_id, message)| Frame {
        request_id,
        message,
    })
}

/// A frame around an arbitrary body: correct prefix and header (so decoding reaches the body
/// parsers), any kind and request id.
fn raw_frame(kind: u8, request_id: u64, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(FRAME_HEADER_BYTES + body.len()).expect("test frames are small");
    let mut out = Vec::new();
    out.extend_from_slice(&len.to_le_bytes());
    out.push(FRAME_VERSION);
    out.push(kind);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------
// The invariant a successful decode must satisfy (mirrored in wire/fuzz/fuzz_targets).

/// `rest` are the bytes after a length prefix that decoded to `frame`. Every field but an
/// error reply's message is decoded exactly, so re-encoding must give back `rest`. The message
/// is decoded lossily (invalid UTF-8 becomes U+FFFD), so when the input's message bytes are
/// not UTF-8 the re-encoding differs; it must still decode to the same frame.
fn check_reencoding(rest: &[u8], frame: &Frame) -> Result<(), TestCaseError> {
    let again = frame.to_bytes();
    prop_assert_eq!(Frame::decode(&again), Ok(frame.clone()));
    if again.get(PREFIX_BYTES..) != Some(rest) {
        let Message::Error(error) = &frame.message else {
            return Err(TestCaseError::fail(format!(
                "a non-error frame re-encodes to other bytes: {frame:?}"
            )));
        };
        let message = rest
            .get(ERROR_MESSAGE_OFFSET_AFTER_LEN..)
            .unwrap_or_default();
        prop_assert!(
            std::str::from_utf8(message).is_err(),
            "a UTF-8 error message re-encodes to other bytes: {:?}",
            error
        );
    }
    Ok(())
}

/// Decodes `bytes` every way the crate offers; none may panic, and each success must be
/// consistent with its input.
fn check_all_decoders(bytes: &[u8], count: u32) -> Result<(), TestCaseError> {
    if let Ok(frame) = Frame::decode(bytes) {
        prop_assert_eq!(
            decode_len(bytes[..PREFIX_BYTES].try_into().unwrap()),
            Ok(bytes.len() - PREFIX_BYTES)
        );
        check_reencoding(&bytes[PREFIX_BYTES..], &frame)?;
    }
    if let Some(rest) = bytes.get(PREFIX_BYTES..)
        && let Ok(frame) = Frame::decode_after_len(rest)
    {
        check_reencoding(rest, &frame)?;
    }
    match (Append::decode(bytes), AppendView::decode(bytes)) {
        (Ok(append), Ok(view)) => {
            prop_assert_eq!(view.header, append.header());
            prop_assert_eq!(view.records.len(), append.records.len());
            for ((offset, meta), record) in view.records_with_offsets().zip(&append.records) {
                prop_assert_eq!(meta.lsn, record.lsn);
                prop_assert_eq!(meta.encoded_len as usize, record.encoded_len());
                let mut one = Vec::new();
                record.encode(&mut one);
                let at = offset as usize;
                prop_assert_eq!(&bytes[at..at + one.len()], &one[..]);
            }
        }
        (Err(_), Err(_)) => {}
        (a, v) => {
            return Err(TestCaseError::fail(format!(
                "Append::decode and AppendView::decode disagree: {:?} vs {:?}",
                a.map(|_| ()),
                v.map(|_| ())
            )));
        }
    }
    if let Ok(append) = Append::decode(bytes) {
        let mut again = Vec::new();
        append.encode(&mut again);
        prop_assert_eq!(&again[..], bytes);
        prop_assert_eq!(append.encoded_len(), bytes.len());
    }
    if let Ok(records) = decode_records(bytes, count) {
        prop_assert_eq!(records.len(), count as usize);
        let mut again = Vec::new();
        encode_records(&records, &mut again);
        prop_assert_eq!(&again[..], bytes);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Round trips.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Goal: `decode(encode(frame)) == frame` for every message kind (Append, Ack, Error,
    /// ReadPage, Page, HostSegments, SetPgmrpl, Done).
    /// Method: encode a generated frame, decode it whole, and again split the way a stream
    /// reader does (`decode_len` on the prefix, then `decode_after_len`); the prefix must
    /// count the bytes that follow it, and an Append body must be `encoded_len` bytes.
    #[test]
    fn frame_round_trips(frame in arb_frame()) {
        let bytes = frame.to_bytes();
        prop_assert_eq!(frame.message.frame_len(), bytes.len());
        if let Message::Append(append) = &frame.message {
            let mut records = Vec::new();
            encode_records(&append.records, &mut records);
            let mut framed = Vec::new();
            wire::frame::encode_append_frame(frame.request_id, &append.header(), &records, &mut framed);
            prop_assert_eq!(&framed, &bytes);
        }
        prop_assert_eq!(Frame::decode(&bytes), Ok(frame.clone()));
        let prefix: [u8; 4] = bytes[..PREFIX_BYTES].try_into().unwrap();
        prop_assert_eq!(decode_len(prefix), Ok(bytes.len() - PREFIX_BYTES));
        prop_assert_eq!(Frame::decode_after_len(&bytes[PREFIX_BYTES..]), Ok(frame.clone()));
        if let Message::Append(append) = &frame.message {
            let body = &bytes[PREFIX_BYTES + FRAME_HEADER_BYTES..];
            prop_assert_eq!(body.len(), append.encoded_len());
            prop_assert_eq!(Append::decode(body), Ok(append.clone()));
        }
    }

    /// Goal: `decode_records(encode_records(rs), rs.len()) == rs`, and each record takes
    /// `encoded_len` bytes.
    /// Method: encode generated records back to back and decode them with their count.
    #[test]
    fn records_round_trip(records in arb_records()) {
        let mut bytes = Vec::new();
        encode_records(&records, &mut bytes);
        let total: usize = records.iter().map(LogRecord::encoded_len).sum();
        prop_assert_eq!(bytes.len(), total);
        let count = u32::try_from(records.len()).unwrap();
        prop_assert_eq!(decode_records(&bytes, count), Ok(records));
    }

    /// Goal: an error reply whose message is over the limit (possible because its fields are
    /// public) is sent cut on a char boundary, as `ErrorReply::new` would cut it, so the wire
    /// always carries UTF-8 and the receiver sees exactly what `new` gives.
    /// Method: encode a struct-literal reply with any text, check the message bytes are UTF-8
    /// and that it decodes to `ErrorReply::new(code, text)`.
    #[test]
    fn overlong_error_message_is_cut_on_a_char_boundary(
        request_id in any::<u64>(),
        code in select(ALL_CODES.to_vec()),
        text in arb_text(),
    ) {
        let reply = ErrorReply { code, message: text.clone() };
        let bytes = Frame { request_id, message: Message::Error(reply) }.to_bytes();
        let message = &bytes[PREFIX_BYTES + ERROR_MESSAGE_OFFSET_AFTER_LEN..];
        prop_assert!(message.len() <= ERROR_MESSAGE_BYTES_MAX);
        prop_assert!(std::str::from_utf8(message).is_ok());
        let expected = Frame { request_id, message: Message::Error(ErrorReply::new(code, text)) };
        prop_assert_eq!(Frame::decode(&bytes), Ok(expected));
    }

    /// Goal: an error message that is not UTF-8 decodes (lossily) to a reply that keeps the
    /// limit and survives another round trip unchanged.
    /// Method: hand-build error frames with arbitrary message bytes up to the limit, mostly
    /// invalid UTF-8; decode, check the limit and the re-encoding invariant.
    #[test]
    fn lossy_error_message_keeps_the_limit(
        request_id in any::<u64>(),
        code in select(ALL_CODES.to_vec()),
        message in prop_oneof![
            vec(any::<u8>(), 0..=ERROR_MESSAGE_BYTES_MAX),
            vec(0x80u8..=0xff, ERROR_MESSAGE_BYTES_MAX - 4..=ERROR_MESSAGE_BYTES_MAX),
        ],
    ) {
        let mut body = Vec::new();
        body.extend_from_slice(&(code as u16).to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_le_bytes());
        body.extend_from_slice(&message);
        let bytes = raw_frame(KIND_ERROR, request_id, &body);
        let frame = Frame::decode(&bytes);
        let Ok(Frame { message: Message::Error(reply), .. }) = &frame else {
            return Err(TestCaseError::fail(format!("not an error reply: {frame:?}")));
        };
        prop_assert_eq!(reply.code, code);
        prop_assert!(reply.message.len() <= ERROR_MESSAGE_BYTES_MAX);
        check_reencoding(&bytes[PREFIX_BYTES..], frame.as_ref().unwrap())?;
    }
}

/// Goal: pin the two error-message bugs the properties above found. (1) An over-long
/// struct-literal message was cut at byte 1024 even mid-char, sending invalid UTF-8 that came
/// back with U+FFFD. (2) A message of 1024 invalid bytes decoded to 1024 U+FFFD (3072 bytes,
/// over the limit), which re-encoded cut mid-char and so decoded to another message.
/// Method: both inputs by hand; check UTF-8 on the wire, the limit and the round trip.
#[test]
fn error_message_regressions() {
    let text = "é".repeat(ERROR_MESSAGE_BYTES_MAX / 2 + 1);
    let reply = ErrorReply {
        code: ErrorCode::Internal,
        message: text.clone(),
    };
    let bytes = Frame {
        request_id: 1,
        message: Message::Error(reply),
    }
    .to_bytes();
    let expected = ErrorReply::new(ErrorCode::Internal, text);
    assert_eq!(expected.message.len(), ERROR_MESSAGE_BYTES_MAX);
    assert_eq!(
        Frame::decode(&bytes),
        Ok(Frame {
            request_id: 1,
            message: Message::Error(expected)
        })
    );

    let mut body = Vec::new();
    body.extend_from_slice(&(ErrorCode::Internal as u16).to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(
        &u32::try_from(ERROR_MESSAGE_BYTES_MAX)
            .unwrap()
            .to_le_bytes(),
    );
    body.extend_from_slice(&[0x80; ERROR_MESSAGE_BYTES_MAX]);
    let frame = Frame::decode(&raw_frame(KIND_ERROR, 2, &body)).unwrap();
    let Message::Error(reply) = &frame.message else {
        panic!("{frame:?}")
    };
    assert_eq!(
        reply.message,
        "\u{fffd}".repeat(ERROR_MESSAGE_BYTES_MAX / 3)
    );
    assert_eq!(Frame::decode(&frame.to_bytes()), Ok(frame));
}

// ---------------------------------------------------------------------------------------
// Untrusted bytes.

/// How to corrupt a valid encoding.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index),
    /// Keep only the first `n` bytes, `n` < the frame length.
    Truncate(Index),
    /// Overwrite the length prefix.
    SetLen(u32),
    /// Overwrite the four bytes where an Append keeps its record count.
    SetCount(u32),
    SetByte(Index, u8),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::FlipBit),
        any::<Index>().prop_map(Mutation::Truncate),
        prop_oneof![any::<u32>(), 0..=64u32].prop_map(Mutation::SetLen),
        prop_oneof![any::<u32>(), 0..=16u32].prop_map(Mutation::SetCount),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetByte(at, byte)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Goal: no decoder panics on arbitrary input, and whatever it accepts re-encodes to its
    /// input (`check_all_decoders`).
    /// Method: feed random bytes to `Frame::decode`, `Frame::decode_after_len`,
    /// `Append::decode` and `decode_records` with an arbitrary count and with a count the
    /// bytes could hold.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..600),
        count in any::<u32>(),
        small_count in 0..=16u32,
    ) {
        check_all_decoders(&bytes, count)?;
        check_all_decoders(&bytes, small_count)?;
    }

    /// Goal: as above, for inputs that get past the frame header so the body parsers run.
    /// Method: a correct prefix and header of any kind 0..=KIND_MAX + 1 around random body
    /// bytes.
    #[test]
    fn arbitrary_bodies_never_panic(
        kind in 0u8..=KIND_MAX + 1,
        request_id in any::<u64>(),
        body in vec(any::<u8>(), 0..600),
    ) {
        let bytes = raw_frame(kind, request_id, &body);
        check_all_decoders(&bytes, 1)?;
        if let Ok(frame) = Frame::decode(&bytes) {
            prop_assert_eq!(frame.request_id, request_id);
        }
    }

    /// Goal: a corrupted valid frame decodes to an error or to a frame consistent with the
    /// corrupted bytes, never panics; the corruptions that change a length are always caught.
    /// Method: flip a bit, truncate, overwrite the length prefix, the record count or any
    /// byte, then run every decoder on the result (and on its body for `Append::decode`).
    /// A truncation, a wrong length prefix and a wrong record count must give `Err`.
    #[test]
    fn mutated_frames_never_panic(frame in arb_frame(), mutation in arb_mutation()) {
        let valid = frame.to_bytes();
        let mut bytes = valid.clone();
        let mut must_fail = false;
        match &mutation {
            Mutation::FlipBit(at) => {
                let bit = at.index(bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
            Mutation::Truncate(at) => {
                bytes.truncate(at.index(bytes.len()));
                must_fail = true;
            }
            Mutation::SetLen(len) => {
                bytes[..PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
                must_fail = bytes != valid;
            }
            Mutation::SetCount(count) => {
                if let Some(field) = bytes.get_mut(APPEND_COUNT_OFFSET..APPEND_COUNT_OFFSET + 4) {
                    field.copy_from_slice(&count.to_le_bytes());
                }
                must_fail = matches!(frame.message, Message::Append(_)) && bytes != valid;
            }
            Mutation::SetByte(at, byte) => {
                let at = at.index(bytes.len());
                bytes[at] = *byte;
            }
        }
        check_all_decoders(&bytes, 1)?;
        if let Some(body) = bytes.get(PREFIX_BYTES + FRAME_HEADER_BYTES..) {
            check_all_decoders(body, 1)?;
        }
        if must_fail {
            prop_assert!(Frame::decode(&bytes).is_err(), "accepted after {:?}", mutation);
            if !matches!(mutation, Mutation::SetLen(_)) {
                let rest = bytes.get(PREFIX_BYTES..).unwrap_or_default();
                prop_assert!(Frame::decode_after_len(rest).is_err(), "accepted after {:?}", mutation);
            }
        }
    }

    /// Goal: one flipped bit anywhere inside a record (header, CRC or payload) is detected.
    /// CRC32 detects every single-bit error, and a flip in a length field breaks the framing.
    /// Method: flip one bit in the records of an encoded Append frame; `Frame::decode`,
    /// `Append::decode` on its body and `decode_records` on its records must all fail. (The
    /// frame and Append headers carry no checksum, so a flip there can go unnoticed: that case
    /// is covered by `mutated_frames_never_panic` instead.)
    #[test]
    fn bit_flip_in_a_record_is_detected(
        request_id in any::<u64>(),
        append in arb_append(),
        at in any::<Index>(),
    ) {
        let count = u32::try_from(append.records.len()).unwrap();
        let mut bytes = Frame { request_id, message: Message::Append(append) }.to_bytes();
        let records_bits = (bytes.len() - APPEND_RECORDS_OFFSET) * 8;
        let bit = APPEND_RECORDS_OFFSET * 8 + at.index(records_bits);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Frame::decode(&bytes).is_err());
        prop_assert!(Append::decode(&bytes[PREFIX_BYTES + FRAME_HEADER_BYTES..]).is_err());
        prop_assert!(decode_records(&bytes[APPEND_RECORDS_OFFSET..], count).is_err());
    }

    /// Goal: one flipped bit in a Page reply's length, CRC or page bytes is detected.
    /// Method: flip one bit from the `len` field to the end of an encoded Page frame. (The
    /// page id and page LSN before it carry no checksum.)
    #[test]
    fn bit_flip_in_page_bytes_is_detected(
        request_id in any::<u64>(),
        page in arb_page_reply(),
        at in any::<Index>(),
    ) {
        let mut bytes = Frame { request_id, message: Message::Page(page) }.to_bytes();
        let bit = PAGE_LEN_OFFSET * 8 + at.index((bytes.len() - PAGE_LEN_OFFSET) * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Frame::decode(&bytes).is_err());
    }
}

/// Goal: a count larger than the bytes could hold, or over the limit, is refused before
/// allocating.
/// Method: a header-sized buffer with `u32::MAX` records; HostSegments bodies claiming
/// `u32::MAX` segments, and `HOST_SEGMENTS_MAX + 1` segments with the bytes for them.
#[test]
fn huge_counts_are_refused() {
    let bytes = vec![0u8; RECORD_HEADER_BYTES];
    assert_eq!(
        decode_records(&bytes, u32::MAX),
        Err(DecodeError::Malformed(
            "record count larger than the bytes can hold"
        ))
    );

    for count in [u32::MAX, u32::try_from(HOST_SEGMENTS_MAX + 1).unwrap()] {
        let mut body = Vec::new();
        body.extend_from_slice(&[0; 20]); // volume, epoch, page_size_bytes
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&[0; 8]); // pages_per_pg
        body.extend_from_slice(&[0; 8]); // pg_count, reserved
        body.resize(body.len() + 8 * (HOST_SEGMENTS_MAX + 1), 0);
        assert_eq!(
            Frame::decode(&raw_frame(KIND_HOST_SEGMENTS, 3, &body)),
            Err(DecodeError::Malformed(
                "segment count larger than the bytes can hold"
            ))
        );
    }
}

/// Goal: a HostSegments placement from an untrusted peer cannot make the decoder allocate
/// past what its bytes hold, nor name a node outside its table, nor carry an overlong name.
/// Method: bodies with no segments whose node count or PG count is `u32::MAX`, one whose PG
/// names node 1 of a one-node table, and one with a 256-byte node name.
#[test]
fn placement_counts_and_indexes_are_checked() {
    let head = |body: &mut Vec<u8>| {
        body.extend_from_slice(&[0; 20]); // volume, epoch, page_size_bytes
        body.extend_from_slice(&0u32.to_le_bytes()); // no segments
        body.extend_from_slice(&[0; 8]); // pages_per_pg
        body.extend_from_slice(&[0; 8]); // pg_count, reserved
    };
    let node = |body: &mut Vec<u8>, name: &[u8]| {
        body.extend_from_slice(&u16::try_from(name.len()).unwrap().to_le_bytes());
        body.extend_from_slice(name);
        let address = b"127.0.0.1:7100";
        body.extend_from_slice(&u16::try_from(address.len()).unwrap().to_le_bytes());
        body.extend_from_slice(address);
    };
    let refused = |body: &[u8], why: &'static str| {
        assert_eq!(
            Frame::decode(&raw_frame(KIND_HOST_SEGMENTS, 3, body)),
            Err(DecodeError::Malformed(why))
        );
    };
    let mut body = Vec::new();
    head(&mut body);
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.resize(body.len() + 4096, 0);
    refused(&body, "node count larger than the bytes can hold");

    let mut body = Vec::new();
    head(&mut body);
    body.extend_from_slice(&1u32.to_le_bytes());
    node(&mut body, b"node1");
    let with_one_node = body.clone();
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.resize(body.len() + 4096, 0);
    refused(&body, "placement count larger than the bytes can hold");

    let mut body = with_one_node;
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // pg 0
    for segment in 0..PG_SIZE {
        body.extend_from_slice(&u16::from(segment == 5).to_le_bytes());
    }
    refused(&body, "placement names a node beyond the node table");

    let mut body = Vec::new();
    head(&mut body);
    body.extend_from_slice(&1u32.to_le_bytes());
    node(&mut body, &[b'n'; 256]);
    body.extend_from_slice(&0u32.to_le_bytes());
    refused(&body, "node name longer than the limit");

    // An address that parses but is not written as the encoder writes it.
    let mut body = Vec::new();
    head(&mut body);
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&5u16.to_le_bytes());
    body.extend_from_slice(b"node1");
    let address = b"127.0.0.1:07100";
    body.extend_from_slice(&u16::try_from(address.len()).unwrap().to_le_bytes());
    body.extend_from_slice(address);
    body.extend_from_slice(&0u32.to_le_bytes());
    refused(&body, "node address is not in canonical ip:port form");
}

// ---------------------------------------------------------------------------------------
// The applicator against a model.

/// The page as a test sees it: bytes changed one at a time, and the LSN of the last change.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Model {
    page: PageId,
    lsn: Lsn,
    bytes: Vec<u8>,
}

impl Model {
    fn of(image: &PageImage) -> Self {
        Self {
            page: image.page,
            lsn: image.lsn,
            bytes: image.bytes.clone(),
        }
    }

    /// What `apply_record` should do, written out directly.
    fn apply(&mut self, record: &LogRecord) -> Result<(), ApplyError> {
        if record.page != self.page {
            return Err(ApplyError::WrongPage {
                lsn: record.lsn,
                record_page: record.page,
                image_page: self.page,
            });
        }
        if record.lsn <= self.lsn {
            return Err(ApplyError::NotAfterPageLsn {
                lsn: record.lsn,
                page_lsn: self.lsn,
            });
        }
        match &record.op {
            RedoOp::Init => {
                for byte in &mut self.bytes {
                    *byte = 0;
                }
            }
            RedoOp::Write { offset, bytes } => {
                let offset = u64::from(*offset);
                let end = offset + bytes.len() as u64;
                if end > self.bytes.len() as u64 {
                    return Err(ApplyError::OutOfPage {
                        lsn: record.lsn,
                        offset,
                        end,
                        page_size: self.bytes.len(),
                    });
                }
                for (i, byte) in bytes.iter().enumerate() {
                    self.bytes[offset as usize + i] = *byte;
                }
            }
        }
        self.lsn = record.lsn;
        Ok(())
    }

    fn matches(&self, image: &PageImage) -> bool {
        self.page == image.page && self.lsn == image.lsn && self.bytes == image.bytes
    }
}

const PAGE: PageId = PageId(7);

/// Page sizes from one byte to a 16 KiB page, mostly small so writes cover a lot of it.
fn arb_page_size() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1usize..=256, 1 => Just(8192), 1 => Just(16384)]
}

/// A Write that fits a page of `size` bytes.
fn arb_write_within(size: usize) -> impl Strategy<Value = RedoOp> {
    (0..=size)
        .prop_flat_map(move |offset| {
            let room = size - offset;
            let len = prop_oneof![0..=room.min(64), 0..=room];
            (Just(offset), len)
        })
        .prop_flat_map(|(offset, len)| {
            vec(any::<u8>(), len).prop_map(move |bytes| RedoOp::Write {
                offset: u32::try_from(offset).unwrap(),
                bytes,
            })
        })
}

/// A Write that does not fit a page of `size` bytes: it ends past the page, or starts past it
/// (up to `u32::MAX`).
fn arb_write_outside(size: usize) -> impl Strategy<Value = RedoOp> {
    let size_u32 = u32::try_from(size).unwrap();
    let offset = prop_oneof![0..=size_u32, size_u32..=u32::MAX, Just(u32::MAX)];
    offset
        .prop_flat_map(move |offset| {
            let room = size.saturating_sub(offset as usize);
            (Just(offset), room + 1..=room + 64)
        })
        .prop_flat_map(|(offset, len)| {
            vec(any::<u8>(), len).prop_map(move |bytes| RedoOp::Write { offset, bytes })
        })
}

/// A page of `size` bytes with random contents at a random LSN below `u64::MAX`.
fn arb_image(size: usize) -> impl Strategy<Value = PageImage> {
    (vec(any::<u8>(), size), prop_oneof![Just(0), 0..u64::MAX]).prop_map(|(bytes, lsn)| PageImage {
        page: PAGE,
        lsn: Lsn(lsn),
        bytes,
    })
}

fn record(lsn: u64, op: RedoOp) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(lsn.saturating_sub(1)),
        page: PAGE,
        cpl: false,
        op,
    }
}

/// A valid chain for a page of `size` bytes: LSNs increasing from 1, Init or fitting Writes.
fn arb_chain(size: usize) -> impl Strategy<Value = Vec<LogRecord>> {
    let op = prop_oneof![1 => Just(RedoOp::Init), 6 => arb_write_within(size)];
    vec((1..=5u64, op), 0..=12).prop_map(|steps| {
        let mut lsn = 0;
        steps
            .into_iter()
            .map(|(gap, op)| {
                lsn += gap;
                record(lsn, op)
            })
            .collect()
    })
}

/// Any record for a page of `size` bytes: right or wrong page, LSN stale or not, Init, a
/// fitting Write or one outside the page.
fn arb_any_record(size: usize) -> impl Strategy<Value = LogRecord> {
    let op = prop_oneof![
        1 => Just(RedoOp::Init),
        4 => arb_write_within(size),
        1 => arb_write_outside(size),
    ];
    let page = prop_oneof![9 => Just(PAGE), 1 => any::<u64>().prop_map(PageId)];
    (0..=40u64, page, op).prop_map(|(lsn, page, op)| LogRecord {
        page,
        ..record(lsn, op)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Goal: applying a chain at once equals applying it in two parts split anywhere, and
    /// both equal the model.
    /// Method: a valid chain on a zeroed page; apply it whole, and as `[..k]` then `[k..]`.
    #[test]
    fn split_application_equals_whole(
        (size, chain, split) in arb_page_size()
            .prop_flat_map(|size| (Just(size), arb_chain(size), any::<Index>())),
    ) {
        let split = split.index(chain.len() + 1);
        let mut whole = PageImage::zeroed(PAGE, size);
        prop_assert_eq!(apply_records(&mut whole, &chain), Ok(()));
        let mut parts = PageImage::zeroed(PAGE, size);
        prop_assert_eq!(apply_records(&mut parts, &chain[..split]), Ok(()));
        prop_assert_eq!(apply_records(&mut parts, &chain[split..]), Ok(()));
        prop_assert_eq!(&whole, &parts);
        let mut model = Model::of(&PageImage::zeroed(PAGE, size));
        for record in &chain {
            prop_assert_eq!(model.apply(record), Ok(()));
        }
        prop_assert!(model.matches(&whole));
        prop_assert_eq!(whole.lsn, chain.last().map_or(Lsn::ZERO, |r| r.lsn));
    }

    /// Goal: a Write changes exactly `[offset, offset + len)` to its payload, nothing else,
    /// and moves the page LSN to the record's.
    /// Method: a random page and a fitting Write above its LSN; compare byte ranges.
    #[test]
    fn write_changes_only_its_range(
        (image, op) in arb_page_size()
            .prop_flat_map(|size| (arb_image(size), arb_write_within(size))),
    ) {
        let RedoOp::Write { offset, bytes } = &op else { unreachable!() };
        let (start, end) = (*offset as usize, *offset as usize + bytes.len());
        let lsn = image.lsn.0 + 1;
        let mut after = image.clone();
        prop_assert_eq!(apply_record(&mut after, &record(lsn, op.clone())), Ok(()));
        prop_assert_eq!(after.bytes.len(), image.bytes.len());
        prop_assert_eq!(&after.bytes[..start], &image.bytes[..start]);
        prop_assert_eq!(&after.bytes[start..end], &bytes[..]);
        prop_assert_eq!(&after.bytes[end..], &image.bytes[end..]);
        prop_assert_eq!(after.lsn, Lsn(lsn));
        prop_assert_eq!(after.page, image.page);
    }

    /// Goal: a Write that ends past the page is rejected with `OutOfPage` naming its range,
    /// and the image, page LSN included, is unchanged.
    /// Method: a random page and a Write that overhangs it or starts past it (up to
    /// `u32::MAX`, where `offset + len` overflows a u32).
    #[test]
    fn out_of_page_write_is_rejected_and_changes_nothing(
        (image, op) in arb_page_size()
            .prop_flat_map(|size| (arb_image(size), arb_write_outside(size))),
    ) {
        let RedoOp::Write { offset, bytes } = &op else { unreachable!() };
        let lsn = Lsn(image.lsn.0 + 1);
        let expected = ApplyError::OutOfPage {
            lsn,
            offset: u64::from(*offset),
            end: u64::from(*offset) + bytes.len() as u64,
            page_size: image.bytes.len(),
        };
        let mut after = image.clone();
        prop_assert_eq!(apply_record(&mut after, &record(lsn.0, op.clone())), Err(expected));
        prop_assert_eq!(&after, &image);
    }

    /// Goal: a record at or below the page LSN is rejected whatever its op, and changes
    /// nothing.
    /// Method: a random page at LSN L and a record with LSN in [0, L] (L itself often).
    #[test]
    fn stale_record_is_rejected_and_changes_nothing(
        (image, op, lsn) in arb_page_size()
            .prop_flat_map(|size| {
                let op = prop_oneof![
                    Just(RedoOp::Init),
                    arb_write_within(size),
                    arb_write_outside(size),
                ];
                (arb_image(size), op)
            })
            .prop_flat_map(|(image, op)| {
                let page_lsn = image.lsn.0;
                (Just(image), Just(op), prop_oneof![Just(page_lsn), 0..=page_lsn])
            }),
    ) {
        let mut after = image.clone();
        let expected = ApplyError::NotAfterPageLsn { lsn: Lsn(lsn), page_lsn: image.lsn };
        prop_assert_eq!(apply_record(&mut after, &record(lsn, op)), Err(expected));
        prop_assert_eq!(&after, &image);
    }

    /// Goal: Init zeroes the whole page, keeps its size and moves the page LSN.
    /// Method: a random page and an Init above its LSN.
    #[test]
    fn init_zeroes_the_page(image in arb_page_size().prop_flat_map(arb_image)) {
        let lsn = image.lsn.0 + 1;
        let mut after = image.clone();
        prop_assert_eq!(apply_record(&mut after, &record(lsn, RedoOp::Init)), Ok(()));
        prop_assert_eq!(after.bytes.len(), image.bytes.len());
        prop_assert!(after.bytes.iter().all(|b| *b == 0));
        prop_assert_eq!(after.lsn, Lsn(lsn));
    }

    /// Goal: for any sequence of records, good or bad, `apply_record` does what the model
    /// does (same result, same image), and `apply_records` stops at the first bad record.
    /// Method: records with LSNs in 0..=40, now and then for another page or outside the
    /// page, applied one by one to an image and to the model, then all at once to a copy of
    /// the starting image and compared with the model run up to its first error.
    #[test]
    fn applicator_matches_model(
        (start, records) in arb_page_size().prop_map(|size| size.min(512)).prop_flat_map(|size| {
            let start = arb_image(size).prop_map(|mut image| {
                image.lsn = Lsn(image.lsn.0 % 20);
                image
            });
            (start, vec(arb_any_record(size), 0..=16))
        }),
    ) {
        let mut image = start.clone();
        let mut model = Model::of(&start);
        for record in &records {
            prop_assert_eq!(apply_record(&mut image, record), model.apply(record));
            prop_assert!(model.matches(&image));
        }

        let mut model = Model::of(&start);
        let expected = records.iter().try_for_each(|record| model.apply(record));
        let mut image = start.clone();
        prop_assert_eq!(apply_records(&mut image, &records), expected);
        prop_assert!(model.matches(&image));
    }
}

proptest! {
    /// Goal: backup objects read back from a store are untrusted bytes too: decoding any
    /// bytes never panics, and bytes behind a valid envelope of the right kind but a garbled
    /// body are refused, not misread. Method: arbitrary bytes, raw and behind each magic.
    #[test]
    fn backup_objects_decode_any_bytes_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        kind in 0usize..4,
    ) {
        use wire::backup::{
            DONE_MAGIC, DoneObject, LOG_MAGIC, LogObject, PAGES_MAGIC, PagesObject, VOLUME_MAGIC,
            VolumeObject,
        };
        let magic = [VOLUME_MAGIC, LOG_MAGIC, PAGES_MAGIC, DONE_MAGIC][kind];
        let mut framed = magic.to_vec();
        framed.extend_from_slice(&1u32.to_le_bytes());
        framed.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        framed.extend_from_slice(&bytes);
        let crc = crc32fast::hash(&framed);
        framed.extend_from_slice(&crc.to_le_bytes());
        for candidate in [&bytes, &framed] {
            let _ = VolumeObject::decode(candidate);
            let _ = LogObject::decode(candidate);
            let _ = PagesObject::decode(candidate);
            let _ = DoneObject::decode(candidate);
        }
        if let Ok(log) = LogObject::decode(&framed) {
            prop_assert!(log.check().is_ok());
        }
    }
}
