//! Fuzzes `Frame::decode`, the decoder of every byte a peer sends.
//!
//! Invariant: a decoded frame re-encodes to exactly its input, and its decoded lengths add up
//! to the input's length: every field of every kind (Append, Ack, Error, ReadPage, Page,
//! HostSegments with its placement, SetPgmrpl, Done, …) is decoded exactly, reserved fields must be zero and no
//! trailing byte is allowed. One exception: an error reply's message is decoded lossily (invalid
//! UTF-8 becomes U+FFFD, then the message is cut to the limit on a char boundary), so when
//! the input's message bytes are not UTF-8 the re-encoding differs from the input; it must
//! then still decode to the same frame. `wire/tests/properties.rs` checks the same invariant
//! (`check_reencoding`) on random and corrupted frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::frame::FRAME_HEADER_BYTES;
use wire::{Frame, Message};

/// Length prefix.
const PREFIX_BYTES: usize = 4;
/// Where an error reply's message starts: prefix, frame header, code, reserved, length.
const ERROR_MESSAGE_OFFSET: usize = PREFIX_BYTES + FRAME_HEADER_BYTES + 8;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(data) else {
        return;
    };
    if let Message::Append(append) = &frame.message {
        assert_eq!(
            PREFIX_BYTES + FRAME_HEADER_BYTES + append.encoded_len(),
            data.len(),
            "decoded lengths do not add up"
        );
    }
    let again = frame.to_bytes();
    assert_eq!(
        Frame::decode(&again).as_ref(),
        Ok(&frame),
        "the re-encoding decodes to another frame"
    );
    if again != data {
        assert!(
            matches!(frame.message, Message::Error(_)),
            "a non-error frame re-encodes to other bytes"
        );
        let message = data.get(ERROR_MESSAGE_OFFSET..).unwrap_or_default();
        assert!(
            std::str::from_utf8(message).is_err(),
            "a UTF-8 error message re-encodes to other bytes"
        );
    }
});
