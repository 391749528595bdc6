//! The checkers' model: every MTR the current writer allocated, in LSN order, and which
//! commits were acknowledged. A recovery to VDL `v` makes the MTRs with CPL ≤ `v` the truth
//! and drops the rest (they were annulled); an acknowledged MTR must never be dropped.
//!
//! Checks (each failure is a sentence saying what broke):
//! - no acknowledged commit is lost across any number of recoveries;
//! - a writer's VDL never goes back, and a new writer's recovered VDL is ≥ every VDL an older
//!   writer reached; an older writer never passes the VDL a newer one recovered;
//! - every page read equals the model at its read point (and nothing annulled is ever read).

use std::collections::{BTreeMap, BTreeSet};

use engine::quorum::MtrRecord;
use wire::{LogRecord, Lsn, PageId, PageImage};

/// One MTR as allocated: its records get consecutive LSNs ending at `cpl`.
#[derive(Clone, Debug)]
struct MtrModel {
    records: Vec<LogRecord>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Model {
    /// By CPL: the current history (committed, or allocated by the current writer).
    mtrs: BTreeMap<Lsn, MtrModel>,
    /// CPLs whose commit was acknowledged to the workload.
    acked: BTreeSet<Lsn>,
    /// The highest VDL any writer reached.
    vdl_max: Lsn,
    pub recoveries: u64,
}

impl Model {
    /// The current writer allocated an MTR ending at `cpl`.
    pub fn allocated(&mut self, cpl: Lsn, records: &[MtrRecord]) {
        let first = cpl.0 + 1 - records.len() as u64;
        let records = records
            .iter()
            .enumerate()
            .map(|(i, r)| LogRecord {
                lsn: Lsn(first + i as u64),
                backlink: Lsn::ZERO,
                page: r.page,
                cpl: i + 1 == records.len(),
                op: r.op.clone(),
            })
            .collect();
        let previous = self.mtrs.insert(cpl, MtrModel { records });
        assert!(previous.is_none(), "two MTRs ending at LSN {cpl}");
    }

    /// A commit was acknowledged to the workload.
    pub fn acknowledged(&mut self, cpl: Lsn) -> Result<(), String> {
        if !self.mtrs.contains_key(&cpl) {
            return Err(format!(
                "commit {cpl} was acknowledged but is not in the history"
            ));
        }
        self.acked.insert(cpl);
        Ok(())
    }

    /// A writer reports VDL `vdl`.
    pub fn observe_vdl(&mut self, vdl: Lsn) {
        self.vdl_max = self.vdl_max.max(vdl);
    }

    /// A new writer recovered to `vdl`: it must cover everything acknowledged and every VDL
    /// reached; the MTRs above it are annulled.
    pub fn recovered(&mut self, vdl: Lsn) -> Result<(), String> {
        self.recoveries += 1;
        if vdl < self.vdl_max {
            return Err(format!(
                "recovered VDL {vdl} is below VDL {} an older writer reached",
                self.vdl_max
            ));
        }
        if let Some(lost) = self.acked.range(Lsn(vdl.0 + 1)..).next() {
            return Err(format!(
                "acknowledged commit {lost} is above the recovered VDL {vdl}: lost"
            ));
        }
        let above: Vec<Lsn> = self.mtrs.range(Lsn(vdl.0 + 1)..).map(|(k, _)| *k).collect();
        for cpl in above {
            self.mtrs.remove(&cpl);
        }
        if vdl != Lsn::ZERO && !self.mtrs.contains_key(&vdl) {
            return Err(format!("recovered VDL {vdl} is not the end of an MTR"));
        }
        self.vdl_max = vdl;
        Ok(())
    }

    /// The records of `page` in the history, in LSN order.
    fn page_records(&self, page: PageId) -> Vec<&LogRecord> {
        self.mtrs
            .values()
            .flat_map(|m| m.records.iter())
            .filter(|r| r.page == page)
            .collect()
    }

    /// Checks a page read at `read_point`; `exact` for storage reads (the image is exactly at
    /// the read point), not for cache hits (which may hold the writer's newer records).
    pub fn check_read(
        &self,
        image: &PageImage,
        read_point: Lsn,
        exact: bool,
        page_size: usize,
    ) -> Result<(), String> {
        let records = self.page_records(image.page);
        let floor = records
            .iter()
            .filter(|r| r.lsn <= read_point)
            .map(|r| r.lsn)
            .next_back()
            .unwrap_or(Lsn::ZERO);
        let page = image.page.0;
        if exact && image.lsn != floor {
            return Err(format!(
                "page {page} read at {read_point} has page LSN {}, the model says {floor}",
                image.lsn
            ));
        }
        if image.lsn < floor {
            return Err(format!(
                "page {page} read at {read_point} is stale: page LSN {} < {floor}",
                image.lsn
            ));
        }
        if image.lsn != Lsn::ZERO && !records.iter().any(|r| r.lsn == image.lsn) {
            return Err(format!(
                "page {page} has page LSN {}, a record not in the history (annulled?)",
                image.lsn
            ));
        }
        let mut expected = PageImage::zeroed(image.page, page_size);
        for record in records.iter().filter(|r| r.lsn <= image.lsn) {
            wire::apply_record(&mut expected, record).map_err(|e| e.to_string())?;
        }
        if expected.bytes != image.bytes {
            return Err(format!(
                "page {page} at page LSN {} differs from the model",
                image.lsn
            ));
        }
        Ok(())
    }

    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }
}
