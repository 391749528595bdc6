//! Identifier newtypes. An LSN is allocated by the single writer of a volume and is strictly
//! increasing across the volume; `Lsn::ZERO` means "nothing" (the backlink of a PG's first
//! record, the SCL of an empty segment).

use std::fmt;

/// Log sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// No record: the backlink of a PG's first record and the SCL of an empty segment.
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A page of the volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageId(pub u64);

/// A protection group: a contiguous range of pages, replicated as six segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgId(pub u32);

/// Which of a PG's six segments (0..6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentIndex(pub u32);

/// One database's storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(pub u64);

/// Volume epoch, bumped by every recovery and membership change. The high 32 bits count
/// bumps; the low 32 bits are a tag the bumping writer draws at random, so two writers that
/// race to bump the same epoch never propose the same value (a node that already took one
/// refuses the other instead of mistaking it for a retry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch a writer proposes after seeing `self`: one more bump, tagged with `tag`.
    ///
    /// # Panics
    /// If `tag` is zero (tags are drawn non-zero) or the bump counter is exhausted.
    #[must_use]
    pub fn next(self, tag: u32) -> Epoch {
        assert!(tag != 0, "epoch tags are non-zero");
        let bumps = (self.0 >> 32) + 1;
        assert!(bumps < u64::from(u32::MAX), "epoch bump counter exhausted");
        let next = Epoch((bumps << 32) | u64::from(tag));
        assert!(next > self);
        next
    }
}

/// What a certificate allows its holder to do, as `sixfold certs` issues it: an engine
/// writes, hosts segments and bumps epochs; a node talks to its peers (gossip).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Engine,
    Node,
}

impl Role {
    /// The name used in certificates and error messages.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Node => "node",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    )*};
}
display_inner!(PageId, PgId, SegmentIndex, VolumeId, Epoch);
