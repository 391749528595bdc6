//! The engine's buffer cache: page images bounded in bytes, evicted least-recently-used
//! first. Pure: no I/O; a miss is the caller's to serve by reading the page at the current
//! VDL from a segment whose SCL ≥ VDL.
//!
//! Invariants:
//! - a page is evicted only when its page LSN ≤ VDL, i.e. all its changes are durable, so a
//!   miss can always be served by reading at the current VDL (DESIGN.md; the paper's "≥" is a
//!   typo);
//! - the VDL the cache is told never moves backwards;
//! - every cached page is in exactly one of `evictable` (page LSN ≤ VDL, by last use) or
//!   `pinned` (page LSN > VDL, by page LSN); `bytes` is the sum of the cached images' sizes;
//! - after [`BufferCache::evict_to_capacity`], `bytes ≤ capacity_bytes` unless every page
//!   left is pinned. Only records above VDL pin pages, and the writer never has more than
//!   LAL of those in flight, so the overshoot is bounded by the pages those records touch
//!   (at most min(LAL, pinned pages) × page size); it drains as VDL advances.
//!
//! Cost: O(log n) per operation, plus O(log n) per page evicted or unpinned.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use wire::{ApplyError, LogRecord, Lsn, PageId, PageImage, apply_record};

/// A cached page and when it was last used.
#[derive(Clone, Debug)]
struct Entry {
    image: PageImage,
    /// Value of the cache's use counter at the last `get` or `insert`; unique per entry.
    used_tick: u64,
}

/// A byte-bounded page cache. See the module docs for its invariants.
#[derive(Clone, Debug)]
pub struct BufferCache {
    capacity_bytes: usize,
    /// Sum of `image.bytes.len()` over the cached pages.
    bytes: usize,
    /// Highest VDL the cache has been told.
    vdl: Lsn,
    /// Counter handing out `used_tick`s.
    tick: u64,
    entries: HashMap<PageId, Entry>,
    /// Pages with page LSN ≤ `vdl`, by last use (oldest first).
    evictable: BTreeMap<u64, PageId>,
    /// Pages with page LSN > `vdl`, by page LSN: they become evictable as VDL passes them.
    pinned: BTreeSet<(Lsn, PageId)>,
}

impl BufferCache {
    /// An empty cache holding at most `capacity_bytes` of page images (beyond pinned pages).
    #[must_use]
    pub fn new(capacity_bytes: usize) -> Self {
        let cache = Self {
            capacity_bytes,
            bytes: 0,
            vdl: Lsn::ZERO,
            tick: 0,
            entries: HashMap::new(),
            evictable: BTreeMap::new(),
            pinned: BTreeSet::new(),
        };
        assert!(cache.is_empty());
        assert_eq!(cache.bytes, 0);
        cache
    }

    #[must_use]
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Bytes of page images cached.
    #[must_use]
    pub fn bytes(&self) -> usize {
        assert!(!self.entries.is_empty() || self.bytes == 0);
        self.bytes
    }

    /// Pages cached.
    #[must_use]
    pub fn len(&self) -> usize {
        assert_eq!(self.entries.len(), self.evictable.len() + self.pinned.len());
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[must_use]
    pub fn contains(&self, page: PageId) -> bool {
        self.entries.contains_key(&page)
    }

    /// The cached image of `page`, marking it most recently used.
    pub fn get(&mut self, page: PageId) -> Option<&PageImage> {
        let tick = self.next_tick();
        let entry = self.entries.get_mut(&page)?;
        if entry.image.lsn <= self.vdl {
            let removed = self.evictable.remove(&entry.used_tick);
            assert_eq!(removed, Some(page));
            self.evictable.insert(tick, page);
        }
        assert!(entry.used_tick < tick);
        entry.used_tick = tick;
        Some(&entry.image)
    }

    /// Caches `image` as most recently used, replacing the cached version of its page unless
    /// that one is newer (a read reply that raced with newer records must not undo them),
    /// then evicts down to capacity.
    ///
    /// # Panics
    /// If `vdl` is below a VDL the cache was told before (VDL never moves backwards).
    pub fn insert(&mut self, image: PageImage, vdl: Lsn) {
        self.observe_vdl(vdl);
        let page = image.page;
        let newer_cached = self
            .entries
            .get(&page)
            .is_some_and(|entry| entry.image.lsn > image.lsn);
        if newer_cached {
            let touched = self.get(page).is_some();
            assert!(touched);
        } else {
            self.unlink(page);
            let used_tick = self.next_tick();
            self.link(Entry { image, used_tick });
        }
        assert!(self.contains(page));
        self.evict_to_capacity(vdl);
    }

    /// Applies `record` to its page if cached (returns `Ok(true)`); an uncached page is left
    /// alone (`Ok(false)`): a later miss reads it from storage. Does not change recency, and
    /// does not evict (applying never grows an image). On error the image is unchanged.
    ///
    /// # Errors
    /// The applicator's [`ApplyError`] if the cached page rejects the record (a record not
    /// above the page LSN, or a write outside the page).
    ///
    /// # Panics
    /// If `vdl` is below a VDL the cache was told before.
    pub fn apply(&mut self, record: &LogRecord, vdl: Lsn) -> Result<bool, ApplyError> {
        self.observe_vdl(vdl);
        let Some(mut entry) = self.unlink(record.page) else {
            return Ok(false);
        };
        let lsn_old = entry.image.lsn;
        let applied = apply_record(&mut entry.image, record);
        assert!(applied.is_err() || entry.image.lsn == record.lsn);
        assert!(applied.is_ok() || entry.image.lsn == lsn_old);
        self.link(entry);
        applied.map(|()| true)
    }

    /// Evicts least-recently-used pages whose page LSN ≤ `vdl` until the cache is within
    /// capacity or only pinned pages (page LSN > `vdl`) are left.
    ///
    /// # Panics
    /// If `vdl` is below a VDL the cache was told before.
    pub fn evict_to_capacity(&mut self, vdl: Lsn) {
        self.observe_vdl(vdl);
        while self.bytes > self.capacity_bytes {
            let Some((_, page)) = self.evictable.pop_first() else {
                break;
            };
            let entry = self
                .entries
                .remove(&page)
                .expect("evictable pages are cached");
            assert!(
                entry.image.lsn <= self.vdl,
                "evicting a page with changes above VDL"
            );
            self.bytes -= entry.image.bytes.len();
        }
        assert!(self.bytes <= self.capacity_bytes || self.evictable.is_empty());
        self.check_invariants();
    }

    /// Records a new VDL and moves the pages it now covers from `pinned` to `evictable`.
    fn observe_vdl(&mut self, vdl: Lsn) {
        assert!(vdl >= self.vdl, "VDL moved backwards: {} → {vdl}", self.vdl);
        self.vdl = vdl;
        while let Some(&(lsn, page)) = self.pinned.first()
            && lsn <= vdl
        {
            self.pinned.pop_first();
            let entry = self.entries.get(&page).expect("pinned pages are cached");
            assert_eq!(entry.image.lsn, lsn);
            let displaced = self.evictable.insert(entry.used_tick, page);
            assert!(displaced.is_none());
        }
    }

    fn next_tick(&mut self) -> u64 {
        assert!(self.tick < u64::MAX);
        self.tick += 1;
        self.tick
    }

    /// Adds `entry` to the map, the byte count, and `evictable` or `pinned`.
    fn link(&mut self, entry: Entry) {
        let page = entry.image.page;
        if entry.image.lsn <= self.vdl {
            let displaced = self.evictable.insert(entry.used_tick, page);
            assert!(displaced.is_none());
        } else {
            let fresh = self.pinned.insert((entry.image.lsn, page));
            assert!(fresh);
        }
        self.bytes += entry.image.bytes.len();
        let displaced = self.entries.insert(page, entry);
        assert!(displaced.is_none());
    }

    /// Removes `page` from the map, the byte count, and `evictable` or `pinned`.
    fn unlink(&mut self, page: PageId) -> Option<Entry> {
        let entry = self.entries.remove(&page)?;
        let found = if entry.image.lsn <= self.vdl {
            self.evictable.remove(&entry.used_tick) == Some(page)
        } else {
            self.pinned.remove(&(entry.image.lsn, page))
        };
        assert!(found, "page {page} missing from its eviction index");
        assert!(self.bytes >= entry.image.bytes.len());
        self.bytes -= entry.image.bytes.len();
        Some(entry)
    }

    /// Full-structure consistency check, debug builds only (O(n)).
    fn check_invariants(&self) {
        if !cfg!(all(debug_assertions, not(fuzzing))) {
            return;
        }
        let bytes: usize = self.entries.values().map(|e| e.image.bytes.len()).sum();
        assert_eq!(bytes, self.bytes);
        assert_eq!(self.entries.len(), self.evictable.len() + self.pinned.len());
        for (tick, page) in &self.evictable {
            let entry = &self.entries[page];
            assert_eq!(entry.used_tick, *tick);
            assert!(entry.image.lsn <= self.vdl);
        }
        for (lsn, page) in &self.pinned {
            assert_eq!(self.entries[page].image.lsn, *lsn);
            assert!(*lsn > self.vdl);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::collection::vec;
    use proptest::prelude::*;
    use wire::RedoOp;

    use super::*;

    const PAGE_SIZE_BYTES: usize = 16;

    fn image(page: u64, lsn: u64) -> PageImage {
        PageImage {
            page: PageId(page),
            lsn: Lsn(lsn),
            bytes: vec![u8::try_from(page).unwrap_or(0); PAGE_SIZE_BYTES],
        }
    }

    fn write(page: u64, lsn: u64, offset: u32, bytes: Vec<u8>) -> LogRecord {
        LogRecord {
            lsn: Lsn(lsn),
            backlink: Lsn::ZERO,
            page: PageId(page),
            cpl: true,
            op: RedoOp::Write { offset, bytes },
        }
    }

    /// Goal: eviction is least-recently-used first, and `get` refreshes recency.
    #[test]
    fn evicts_least_recently_used() {
        let mut cache = BufferCache::new(2 * PAGE_SIZE_BYTES);
        cache.insert(image(1, 1), Lsn(10));
        cache.insert(image(2, 2), Lsn(10));
        assert_eq!(cache.get(PageId(1)).map(|i| i.lsn), Some(Lsn(1)));
        cache.insert(image(3, 3), Lsn(10));
        assert!(cache.contains(PageId(1)) && cache.contains(PageId(3)));
        assert!(!cache.contains(PageId(2)));
        assert_eq!((cache.len(), cache.bytes()), (2, 2 * PAGE_SIZE_BYTES));
    }

    /// Goal: pages with changes above VDL stay cached (even over capacity) and become
    /// evictable once VDL passes them.
    #[test]
    fn pages_above_vdl_are_pinned() {
        let mut cache = BufferCache::new(PAGE_SIZE_BYTES);
        cache.insert(image(1, 0), Lsn(0));
        assert_eq!(cache.apply(&write(1, 5, 0, vec![9]), Lsn(0)), Ok(true));
        cache.insert(image(2, 0), Lsn(0));
        assert!(cache.contains(PageId(1)) && !cache.contains(PageId(2)));
        cache.insert(image(3, 6), Lsn(0));
        assert_eq!((cache.len(), cache.bytes()), (2, 2 * PAGE_SIZE_BYTES));
        cache.evict_to_capacity(Lsn(5));
        assert!(!cache.contains(PageId(1)) && cache.contains(PageId(3)));
        cache.evict_to_capacity(Lsn(6));
        assert!(cache.contains(PageId(3)), "within capacity already");
        assert_eq!(cache.len(), 1);
    }

    /// Goal: `apply` changes cached pages only, and a rejected record changes nothing.
    #[test]
    fn apply_touches_cached_pages_only() {
        let mut cache = BufferCache::new(4 * PAGE_SIZE_BYTES);
        assert_eq!(cache.apply(&write(1, 1, 0, vec![7]), Lsn(0)), Ok(false));
        assert!(cache.is_empty());
        cache.insert(image(1, 1), Lsn(1));
        assert_eq!(cache.apply(&write(1, 2, 3, vec![7, 8]), Lsn(1)), Ok(true));
        let cached = cache.get(PageId(1)).expect("cached").clone();
        assert_eq!((cached.lsn, &cached.bytes[3..5]), (Lsn(2), &[7, 8][..]));
        let outside = cache.apply(&write(1, 3, 15, vec![1, 2]), Lsn(1));
        assert!(matches!(outside, Err(ApplyError::OutOfPage { .. })));
        let stale = cache.apply(&write(1, 2, 0, vec![1]), Lsn(1));
        assert!(matches!(stale, Err(ApplyError::NotAfterPageLsn { .. })));
        assert_eq!(cache.get(PageId(1)), Some(&cached));
    }

    /// Goal: a read reply older than the cached page does not undo newer changes.
    #[test]
    fn insert_keeps_the_newer_image() {
        let mut cache = BufferCache::new(4 * PAGE_SIZE_BYTES);
        cache.insert(image(1, 1), Lsn(1));
        cache
            .apply(&write(1, 4, 0, vec![42]), Lsn(1))
            .expect("applies");
        cache.insert(image(1, 1), Lsn(2));
        assert_eq!(cache.get(PageId(1)).map(|i| i.lsn), Some(Lsn(4)));
        cache.insert(image(1, 7), Lsn(2));
        assert_eq!(cache.get(PageId(1)).map(|i| i.lsn), Some(Lsn(7)));
        assert_eq!((cache.len(), cache.bytes()), (1, PAGE_SIZE_BYTES));
    }

    /// Goal: the cache refuses a VDL that moves backwards (a caller bug).
    #[test]
    #[should_panic(expected = "VDL moved backwards")]
    fn vdl_moving_backwards_panics() {
        let mut cache = BufferCache::new(PAGE_SIZE_BYTES);
        cache.evict_to_capacity(Lsn(5));
        cache.evict_to_capacity(Lsn(4));
    }

    // -----------------------------------------------------------------------------------
    // Property test against a model.

    #[derive(Clone, Debug)]
    enum Step {
        /// Insert page `page` as of an LSN `lsn_back` below the newest allocated one.
        Insert {
            page: u64,
            lsn_back: u64,
        },
        /// Apply a new record (the next LSN) to `page`, sometimes out of the page.
        Apply {
            page: u64,
            offset: u32,
            len: usize,
        },
        Get {
            page: u64,
        },
        AdvanceVdl {
            by: u64,
        },
        Evict,
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..10u64, 0..6u64).prop_map(|(page, lsn_back)| Step::Insert { page, lsn_back }),
            4 => (0..10u64, 0..18u32, 0..4usize)
                .prop_map(|(page, offset, len)| Step::Apply { page, offset, len }),
            2 => (0..10u64).prop_map(|page| Step::Get { page }),
            2 => (0..4u64).prop_map(|by| Step::AdvanceVdl { by }),
            1 => Just(Step::Evict),
        ]
    }

    /// What the cache should hold: each page's image and last-use time.
    #[derive(Default)]
    struct Model {
        pages: HashMap<PageId, (PageImage, u64)>,
        clock: u64,
        lsn_max: u64,
        vdl: u64,
    }

    impl Model {
        fn touch(&mut self, page: PageId) {
            self.clock += 1;
            if let Some((_, used)) = self.pages.get_mut(&page) {
                *used = self.clock;
            }
        }

        /// Runs one step on the model and the cache; returns whether it may evict.
        fn step(&mut self, cache: &mut BufferCache, step: &Step) -> bool {
            let vdl = Lsn(self.vdl);
            match *step {
                Step::Insert { page, lsn_back } => {
                    let new = image(page, self.lsn_max.saturating_sub(lsn_back));
                    let keep = self
                        .pages
                        .get(&PageId(page))
                        .is_some_and(|(i, _)| i.lsn > new.lsn);
                    if !keep {
                        self.pages.insert(PageId(page), (new.clone(), 0));
                    }
                    self.touch(PageId(page));
                    cache.insert(new, vdl);
                    true
                }
                Step::Apply { page, offset, len } => {
                    self.lsn_max += 1;
                    let record = write(page, self.lsn_max, offset, vec![0xAB; len]);
                    let expected = match self.pages.get_mut(&PageId(page)) {
                        Some((image, _)) => apply_record(image, &record).map(|()| true),
                        None => Ok(false),
                    };
                    assert_eq!(cache.apply(&record, vdl), expected);
                    false
                }
                Step::Get { page } => {
                    self.touch(PageId(page));
                    let expected = self.pages.get(&PageId(page)).map(|(image, _)| image);
                    assert_eq!(cache.get(PageId(page)), expected);
                    false
                }
                Step::AdvanceVdl { by } => {
                    self.vdl = (self.vdl + by).min(self.lsn_max);
                    false
                }
                Step::Evict => {
                    cache.evict_to_capacity(vdl);
                    true
                }
            }
        }

        /// Drops the pages the cache evicted, checking each was evictable and older than
        /// every evictable page left, and that the cache is within capacity if it could be.
        fn check_evictions(&mut self, cache: &BufferCache, evicting: bool) {
            let evicted: Vec<PageId> = self
                .pages
                .keys()
                .filter(|&&p| !cache.contains(p))
                .copied()
                .collect();
            assert!(
                evicting || evicted.is_empty(),
                "evicted outside insert/evict"
            );
            let used_min = self
                .pages
                .values()
                .filter(|(i, _)| i.lsn.0 <= self.vdl && cache.contains(i.page))
                .map(|(_, used)| *used)
                .min();
            for page in &evicted {
                let (image, used) = self.pages.remove(page).expect("was cached");
                assert!(image.lsn.0 <= self.vdl, "evicted page {page} above VDL");
                assert!(
                    used_min.is_none_or(|min| used < min),
                    "evicted out of LRU order"
                );
            }
            let bytes: usize = self.pages.values().map(|(i, _)| i.bytes.len()).sum();
            assert_eq!((cache.len(), cache.bytes()), (self.pages.len(), bytes));
            if evicting {
                let all_pinned = self.pages.values().all(|(i, _)| i.lsn.0 > self.vdl);
                assert!(bytes <= cache.capacity_bytes() || all_pinned);
                let last_needed = bytes + PAGE_SIZE_BYTES > cache.capacity_bytes();
                assert!(
                    evicted.is_empty() || last_needed,
                    "evicted more than needed"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Goal: no page with page LSN > VDL is ever evicted, eviction is LRU among evictable
        /// pages and stops at capacity, the cache is within capacity after evicting whenever
        /// enough pages are evictable, and cached images equal a model's. Method: random
        /// inserts, applies, gets, VDL advances and evictions against a model.
        #[test]
        fn cache_matches_model(
            capacity_bytes in 0..=(6 * PAGE_SIZE_BYTES + 5),
            steps in vec(arb_step(), 1..200),
        ) {
            let mut cache = BufferCache::new(capacity_bytes);
            let mut model = Model::default();
            for step in steps {
                let evicting = model.step(&mut cache, &step);
                model.check_evictions(&cache, evicting);
            }
        }
    }
}
