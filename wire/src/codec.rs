//! Little-endian cursor over untrusted bytes. Every read checks the remaining length first,
//! so decoding never panics and never reads past the input.

use thiserror::Error;

/// Why a decode failed. Each variant names the problem so an error reply can quote it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: u64, limit: u64 },
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("unknown redo op {0}")]
    UnknownOp(u8),
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    #[error("record {lsn}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        lsn: u64,
        stored: u32,
        computed: u32,
    },
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("{trailing} trailing bytes after {what}")]
    Trailing { what: &'static str, trailing: usize },
}

/// A bounds-checked little-endian reader.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if len > self.bytes.len() {
            return Err(DecodeError::Truncated {
                what,
                needed: len - self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let head = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails unless every byte has been consumed.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                what,
                trailing: self.bytes.len(),
            })
        }
    }
}
