//! The redo applicator: the one pure function that turns a page image and records into a
//! newer page image. Used by storage nodes (reads, coalescing), the engine's buffer cache,
//! replicas and restore.
//!
//! Invariants: records apply in strictly increasing LSN order, each above the image's page
//! LSN; a record never touches a byte outside the page; a rejected record leaves the image
//! unchanged.

use thiserror::Error;

use crate::record::{LogRecord, RedoOp};
use crate::types::{Lsn, PageId};

/// A page as of `lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageImage {
    pub page: PageId,
    /// LSN of the last record applied (`Lsn::ZERO` for a page never written).
    pub lsn: Lsn,
    pub bytes: Vec<u8>,
}

impl PageImage {
    /// An all-zero page that no record has touched.
    pub fn zeroed(page: PageId, page_size_bytes: usize) -> Self {
        Self {
            page,
            lsn: Lsn::ZERO,
            bytes: vec![0; page_size_bytes],
        }
    }

    /// CRC32 of the page contents, as stored beside it.
    pub fn crc(&self) -> u32 {
        crc32fast::hash(&self.bytes)
    }
}

/// Why a record could not be applied.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApplyError {
    #[error("record {lsn} is for page {record_page}, not page {image_page}")]
    WrongPage {
        lsn: Lsn,
        record_page: PageId,
        image_page: PageId,
    },
    #[error("record {lsn} is not above the page LSN {page_lsn}")]
    NotAfterPageLsn { lsn: Lsn, page_lsn: Lsn },
    #[error("record {lsn} writes bytes [{offset}, {end}) outside a page of {page_size} bytes")]
    OutOfPage {
        lsn: Lsn,
        offset: u64,
        end: u64,
        page_size: usize,
    },
}

/// Applies one record to `image`. On error the image is unchanged.
pub fn apply_record(image: &mut PageImage, record: &LogRecord) -> Result<(), ApplyError> {
    if record.page != image.page {
        return Err(ApplyError::WrongPage {
            lsn: record.lsn,
            record_page: record.page,
            image_page: image.page,
        });
    }
    if record.lsn <= image.lsn {
        return Err(ApplyError::NotAfterPageLsn {
            lsn: record.lsn,
            page_lsn: image.lsn,
        });
    }
    match &record.op {
        RedoOp::Init => image.bytes.fill(0),
        RedoOp::Write { offset, bytes } => {
            let start = u64::from(*offset);
            let end = start + bytes.len() as u64;
            let target = usize::try_from(start)
                .ok()
                .zip(usize::try_from(end).ok())
                .and_then(|(s, e)| image.bytes.get_mut(s..e));
            let Some(target) = target else {
                return Err(ApplyError::OutOfPage {
                    lsn: record.lsn,
                    offset: start,
                    end,
                    page_size: image.bytes.len(),
                });
            };
            target.copy_from_slice(bytes);
        }
    }
    image.lsn = record.lsn;
    Ok(())
}

/// Applies `records` in order. Stops at the first bad record, leaving the image as of the
/// record before it, and returns the error.
pub fn apply_records<'a>(
    image: &mut PageImage,
    records: impl IntoIterator<Item = &'a LogRecord>,
) -> Result<(), ApplyError> {
    for record in records {
        apply_record(image, record)?;
    }
    Ok(())
}
