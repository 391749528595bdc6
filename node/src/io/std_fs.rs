//! The plain-file journal writer: `pwrite` + `fdatasync` (or one `pwritev2` with `RWF_DSYNC`)
//! on a thread of its own, one group at a time. The fallback for kernels or sandboxes without
//! io_uring; group commit still happens (in the core), pipelining does not.
//!
//! Invariants: a group's outcome is reported only after its write and its sync returned; the
//! group's buffer is the thread's own, aligned for the O_DIRECT journal files.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::thread::{Completions, ThreadJournal, WorkQueue};
use super::{AlignedBuf, GroupOutcome, encode_group};
use crate::config::SyncMode;
use crate::core::PersistGroup;
use crate::journal::format::GROUP_BYTES_MAX;

/// Starts the writer thread over the journal `files` (indexed by file number).
pub fn start(files: Vec<File>, sync: SyncMode) -> std::io::Result<ThreadJournal> {
    assert!(!files.is_empty(), "a journal has files");
    ThreadJournal::spawn("journal-std-fs", None, move |queue, completions| {
        run(&files, sync, queue, completions);
    })
}

fn run(files: &[File], sync: SyncMode, queue: &WorkQueue, completions: &Completions) {
    let mut buf = AlignedBuf::new(GROUP_BYTES_MAX);
    loop {
        let groups = queue.wait();
        if groups.is_empty() {
            assert!(queue.is_closed());
            return;
        }
        for group in groups {
            let id = group.id;
            let result = write_group(files, sync, &group, &mut buf);
            completions.push(GroupOutcome { group: id, result });
        }
    }
}

fn write_group(
    files: &[File],
    sync: SyncMode,
    group: &PersistGroup,
    buf: &mut AlignedBuf,
) -> std::io::Result<()> {
    encode_group(group, buf);
    let file = files
        .get(group.position.file as usize)
        .expect("the core places groups in existing files");
    assert!(
        group
            .position
            .offset
            .is_multiple_of(super::DIRECT_IO_ALIGN as u64)
    );
    match sync {
        SyncMode::Fdatasync => {
            file.write_all_at(buf.as_slice(), group.position.offset)?;
            file.sync_data()
        }
        SyncMode::RwfDsync => write_dsync(file, buf.as_slice(), group.position.offset),
    }
}

/// One `pwritev2(RWF_DSYNC)`: durable when it returns.
fn write_dsync(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: `iov` points at `bytes`, which outlives this synchronous call; the kernel only
    // reads from it.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_DSYNC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(std::io::Error::other(format!(
            "short write of {n} bytes out of {}",
            bytes.len()
        )));
    }
    Ok(())
}
