//! The disk's own limit: one aligned O_DIRECT write made durable, through io_uring, one at a
//! time. Benchmarks run this beside the node so every figure comes with its ratio to the
//! hardware; the journal writer's choice between a linked `fdatasync` and `RWF_DSYNC` is made
//! on these numbers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use super::aligned::AlignedBuf;
pub use crate::config::SyncMode;

/// Opens (creating if needed) a file for O_DIRECT reads and writes.
pub fn open_direct(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Writes zeroes over `len` bytes of `file` (a multiple of 4 KiB: the file is O_DIRECT) and
/// syncs, so later overwrites touch only data blocks: on ext4, syncing a write into
/// fallocated-but-unwritten extents also flushes extent metadata, several times slower.
pub fn prewrite(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    assert!(len.is_multiple_of(super::DIRECT_IO_ALIGN as u64));
    let mut zeros = AlignedBuf::new(1 << 20);
    zeros.set_len(zeros.capacity());
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros.as_slice()[..n], offset)?;
        offset += n as u64;
    }
    file.sync_all()
}

/// Times durable writes of `block_bytes` at one in flight, for `duration` or `count_max`
/// writes, whichever comes first, over a pre-written file of `file_bytes` under `dir`
/// (removed afterwards). Returns each write's latency.
pub fn measure(
    dir: &Path,
    block_bytes: usize,
    file_bytes: u64,
    duration: Duration,
    count_max: usize,
    mode: SyncMode,
) -> io::Result<Vec<Duration>> {
    let path = dir.join("raw-disk-probe.dat");
    let file = open_direct(&path, true)?;
    prewrite(&file, file_bytes)?;
    let mut ring = IoUring::new(8)?;
    let mut buf = AlignedBuf::new(block_bytes);
    buf.extend_from_slice(&vec![0xA5; block_bytes]);
    buf.pad_to_alignment();
    let blocks = (file_bytes / buf.len() as u64).max(1);
    let mut latencies = Vec::new();
    let began = Instant::now();
    for i in 0..count_max {
        if began.elapsed() >= duration {
            break;
        }
        let offset = (i as u64 % blocks) * buf.len() as u64;
        let start = Instant::now();
        durable_write(&mut ring, &file, &buf, offset, mode)?;
        latencies.push(start.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(latencies)
}

fn durable_write(
    ring: &mut IoUring,
    file: &File,
    buf: &AlignedBuf,
    offset: u64,
    mode: SyncMode,
) -> io::Result<()> {
    let fd = types::Fd(file.as_raw_fd());
    let len = u32::try_from(buf.len()).expect("block fits u32");
    let write = opcode::Write::new(fd, buf.as_ptr(), len).offset(offset);
    let entries = match mode {
        SyncMode::Fdatasync => vec![
            write
                .build()
                .flags(io_uring::squeue::Flags::IO_LINK)
                .user_data(1),
            opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(2),
        ],
        SyncMode::RwfDsync => vec![write.rw_flags(libc::RWF_DSYNC).build().user_data(1)],
    };
    for entry in &entries {
        // SAFETY: `buf` and `file` outlive this call, which waits for every completion
        // below before returning, so the kernel never sees a dangling buffer.
        unsafe { ring.submission().push(entry).map_err(io::Error::other)? };
    }
    ring.submit_and_wait(entries.len())?;
    for cqe in ring.completion() {
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        if cqe.user_data() == 1 && cqe.result() as usize != buf.len() {
            return Err(io::Error::other("short direct write"));
        }
    }
    Ok(())
}
