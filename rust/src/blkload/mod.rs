//! A virtio-blk load generator: the driver side of one virtqueue, keeping `iodepth`
//! read or write requests in flight against any virtio-blk device (a vhost-user back-end,
//! through rings in memory shared with it), fast enough that the device is what is
//! measured. It is what `python -m vhost bench blk` runs, with the GIL released.
//!
//! The caller (the Python set-up: connection, feature negotiation, memory table, vring
//! addresses) hands over guest memory, a fresh ring's layout, the kick and call eventfds
//! and one (header, data window) pair of buffers per request slot. The loop then behaves
//! like a guest's `virtio_blk` driver: requests are published in batches with one kick
//! when the device asks for it (EVENT_IDX or NO_NOTIFY), completions are reaped with
//! used-buffer notifications off, and only when the used ring is empty are notifications
//! re-armed and the call eventfd slept on (after an optional busy-poll of the ring).
//!
//! With verification ([`BlkLoad::run_verified`]) every write carries a pattern derived from
//! its disk offset and a generation ([`pattern`]) and every read is checked against it.

mod engine;
mod histogram;
pub mod iommu;
pub mod pattern;
mod ring;
mod verify;

use std::time::Duration;

use crate::memory::MemoryError;
use crate::vring::VringError;

pub use engine::{BlkLoad, InterruptHook};
pub use histogram::Histogram;
pub use iommu::{IommuConfig, Prefill};
pub use verify::VerifiedReport;

/// virtio-blk addresses the disk in 512-byte sectors.
pub const SECTOR: u64 = 512;

/// The access pattern of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random offsets (from `Job::seed`).
    RandRead,
    /// Writes at random offsets (from `Job::seed`).
    RandWrite,
}

impl Rw {
    /// `read`, `write`, `randread` or `randwrite` (fio's names).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Rw::Read),
            "write" => Some(Rw::Write),
            "randread" => Some(Rw::RandRead),
            "randwrite" => Some(Rw::RandWrite),
            _ => None,
        }
    }

    /// The fio name of the pattern (`"randread"`), for reports and the command line.
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
        }
    }

    /// Whether requests are writes (so the image must be writable).
    pub fn is_write(self) -> bool {
        matches!(self, Rw::Write | Rw::RandWrite)
    }

    /// Whether requests are reads (so they can be checked against a pattern).
    pub fn is_read(self) -> bool {
        !self.is_write()
    }

    /// Whether offsets are random rather than sequential.
    pub fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite)
    }
}

/// One request slot's buffers (guest-physical): the 16-byte request header with the
/// status byte right after it (17 bytes at `meta`), and the data window at `data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    /// Guest-physical address of the request header and status byte.
    pub meta: u64,
    /// Guest-physical address of the data window.
    pub data: u64,
}

/// A set of sectors (of a region starting at `first` sector): which ones a run wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SectorSet {
    first: u64,
    bits: Vec<u64>,
    count: u64,
}

impl SectorSet {
    /// An empty set of `sectors` sectors from `first` on.
    pub fn new(first: u64, sectors: u64) -> Self {
        Self {
            first,
            bits: vec![0; sectors.div_ceil(64) as usize],
            count: 0,
        }
    }

    fn slot(&self, sector: u64) -> Option<(usize, u64)> {
        let rel = sector.checked_sub(self.first)?;
        let word = usize::try_from(rel / 64).ok()?;
        (word < self.bits.len()).then_some((word, 1u64 << (rel % 64)))
    }

    /// Adds `sector`; one outside the region is ignored.
    pub fn insert(&mut self, sector: u64) {
        if let Some((w, bit)) = self.slot(sector) {
            if self.bits[w] & bit == 0 {
                self.bits[w] |= bit;
                self.count += 1;
            }
        }
    }

    /// Whether `sector` is in the set (false outside the region).
    pub fn contains(&self, sector: u64) -> bool {
        self.slot(sector)
            .is_some_and(|(w, bit)| self.bits[w] & bit != 0)
    }

    /// Sectors in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when no sector was inserted.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// What reads must find: every sector holds generation `base`, except those in the set
/// of `newer`, which hold its generation.
#[derive(Clone, Debug)]
pub struct Expect {
    /// The generation every sector holds unless it is in `newer`.
    pub base: u32,
    /// A later generation and the sectors that hold it.
    pub newer: Option<(u32, SectorSet)>,
}

impl Expect {
    fn generation(&self, sector: u64) -> u32 {
        match &self.newer {
            Some((g, set)) if set.contains(sector) => *g,
            _ => self.base,
        }
    }
}

/// One run: `rw` requests of `block_size` bytes inside `[offset, offset+size)` of the
/// disk, `iodepth` in flight, until `duration` has passed or `max_ios` were issued
/// (whichever first; at least one of them must be set).
#[derive(Clone, Debug)]
pub struct Job {
    /// The access pattern.
    pub rw: Rw,
    /// Bytes per request (a multiple of 512).
    pub block_size: u32,
    /// Requests kept in flight.
    pub iodepth: u16,
    /// Start of the region, in bytes from the start of the disk.
    pub offset: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Stop after this many requests.
    pub max_ios: Option<u64>,
    /// Seed of the random offsets (xorshift64*): the same seed gives the same sequence.
    pub seed: u64,
    /// How long to spin on the used ring before sleeping on the call eventfd.
    pub busy_poll: Duration,
    /// A run fails when no request completes for this long.
    pub timeout: Duration,
    /// Writes carry the pattern of this generation (else: whatever the buffer holds).
    pub write_generation: Option<u32>,
    /// Reads are checked against this.
    pub check: Option<Expect>,
    /// Record the sectors written (in [`Report::written`]).
    pub track_writes: bool,
}

/// A request the device completed with a status other than OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFailure {
    /// Whether the request was a write.
    pub write: bool,
    /// Its byte offset on the disk.
    pub offset: u64,
    /// The status the device wrote (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP).
    pub status: u8,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Requests completed.
    pub ios: u64,
    /// Bytes moved by the completed requests.
    pub bytes: u64,
    /// From the first submission to the last completion.
    pub elapsed: Duration,
    /// CPU time the loop's thread used (user + system): the driver's own cost.
    pub cpu: Duration,
    /// Submission to reaping, per request, in nanoseconds.
    pub latency: Histogram,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Wake-ups by the call eventfd.
    pub wakeups: u64,
    /// Requests completed with a status other than OK, and the first of them.
    pub io_errors: u64,
    /// The first failing request, to name it.
    pub first_io_error: Option<IoFailure>,
    /// Sectors read and checked against the pattern, and those that did not match.
    pub checked_sectors: u64,
    /// Sectors that did not hold the expected pattern.
    pub bad_sectors: u64,
    /// Byte offset of the first sector that did not match.
    pub first_bad_offset: Option<u64>,
    /// With [`Job::track_writes`]: the sectors written.
    pub written: Option<SectorSet>,
    /// Behind an IOMMU ([`BlkLoad::new_behind_iommu`]): the IOTLB misses the back-end
    /// sent during the run (answered or not); None for a flat memory table.
    pub iotlb_misses: Option<u64>,
}

impl Report {
    /// Requests completed per second of `elapsed`, 0 for an empty run.
    pub fn iops(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ios as f64 / s
        } else {
            0.0
        }
    }

    /// Bytes moved per second of `elapsed`, 0 for an empty run.
    pub fn bandwidth(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// Everything a load run can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A job or buffer layout the loop cannot run (checked before anything is sent).
    #[error("{0}")]
    InvalidParam(String),
    /// A ring refused a buffer or returned a bad used element.
    #[error(transparent)]
    Vring(#[from] VringError),
    /// A buffer is not backed by the shared memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// An eventfd read or write failed.
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
    /// No request completed within the job's timeout: the back-end is stuck.
    #[error("the device completed none of {in_flight} request(s) in flight within {timeout:?}")]
    Timeout {
        /// Requests in flight when the bound passed.
        in_flight: u16,
        /// The bound: no completion for this long.
        timeout: Duration,
    },
    /// The back-end closed its vhost-user socket (it exited or dropped the connection)
    /// while requests were in flight.
    #[error("the back-end closed the connection ({in_flight} request(s) in flight)")]
    Disconnected {
        /// Requests in flight when it closed.
        in_flight: u16,
    },
    /// A vhost-user request of the IOMMU set-up (or an update, an invalidation) failed.
    #[error("{0}: {1}")]
    Vhost(&'static str, crate::user::Error),
    /// The thread answering the back-end's IOTLB misses failed (an update refused, a
    /// broken channel): the run's figures are not those of a working IOMMU.
    #[error("the IOMMU side failed: {0}")]
    IommuSide(String),
    /// The interrupt hook asked to stop (requests may still be in flight: the next run
    /// refuses to start).
    #[error("the run was interrupted")]
    Interrupted,
}

#[cfg(test)]
mod tests;
