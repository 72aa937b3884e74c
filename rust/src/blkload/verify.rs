//! A run that checks data: fill the region with one generation, run the job (reads check
//! it, writes carry the next generation), then read the whole region back.

use super::{BlkLoad, Expect, Job, LoadError, Report};

/// The three phases of [`BlkLoad::run_verified`].
#[derive(Clone, Debug)]
pub struct VerifiedReport {
    /// The sequential write of generation `generation` (None when skipped).
    pub fill: Option<Report>,
    /// The job itself, timed.
    pub timed: Report,
    /// The sequential read-back of the whole region.
    pub check: Report,
    /// The generation the region was filled with.
    pub generation: u32,
    /// Distinct sectors the timed job wrote (they now hold `generation + 1`).
    pub written_sectors: u64,
}

impl VerifiedReport {
    /// Sectors that did not hold what they should, over all phases.
    pub fn bad_sectors(&self) -> u64 {
        self.timed.bad_sectors + self.check.bad_sectors
    }

    /// Requests the device failed, over all phases.
    pub fn io_errors(&self) -> u64 {
        self.fill.as_ref().map_or(0, |f| f.io_errors) + self.timed.io_errors + self.check.io_errors
    }

    /// IOTLB misses over all phases (None for a flat memory table).
    pub fn iotlb_misses(&self) -> Option<u64> {
        let fill = self.fill.as_ref().and_then(|f| f.iotlb_misses);
        let phases = [fill, self.timed.iotlb_misses, self.check.iotlb_misses];
        phases.into_iter().flatten().reduce(|a, b| a + b)
    }

    /// The first offset found wrong (the timed phase's first, else the read-back's).
    pub fn first_bad_offset(&self) -> Option<u64> {
        self.timed.first_bad_offset.or(self.check.first_bad_offset)
    }
}

impl BlkLoad {
    /// The largest multiple of `bs` that fits a slot's window and divides `size`: the
    /// request size of the fill and read-back passes.
    fn pass_block_size(&self, bs: u32, size: u64) -> u32 {
        let mut best = bs;
        let mut k = 2u32;
        while let Some(cand) = bs.checked_mul(k) {
            if cand > self.window() {
                break;
            }
            if size % u64::from(cand) == 0 {
                best = cand;
            }
            k += 1;
        }
        best
    }

    /// Runs `job` between a fill and a read-back that check data. Unless `fill` is false
    /// (the region already holds `generation`, e.g. from an earlier run), every block is
    /// first written with the pattern of `generation`. In the job, reads must find
    /// `generation` and writes carry `generation + 1`. Then the whole region is read and
    /// each sector must hold `generation + 1` if the job wrote it, `generation` otherwise.
    /// The job's own `write_generation`, `check` and `track_writes` are ignored.
    pub fn run_verified(
        &mut self,
        job: &Job,
        generation: u32,
        fill: bool,
    ) -> Result<VerifiedReport, LoadError> {
        let next = generation
            .checked_add(1)
            .ok_or_else(|| LoadError::InvalidParam("generation must be below 2**32-1".into()))?;
        let pass_bs = self.pass_block_size(job.block_size, job.size);
        let pass_depth = job.iodepth.min(self.max_iodepth(pass_bs)).max(1);
        let pass = |write: bool, check: Option<Expect>| Job {
            rw: if write {
                super::Rw::Write
            } else {
                super::Rw::Read
            },
            block_size: pass_bs,
            iodepth: pass_depth,
            duration: None,
            max_ios: Some(job.size / u64::from(pass_bs)),
            write_generation: write.then_some(generation),
            check,
            track_writes: false,
            ..job.clone()
        };
        let fill_job = pass(true, None);
        let mut timed_job = job.clone();
        timed_job.write_generation = Some(next);
        timed_job.check = Some(Expect {
            base: generation,
            newer: None,
        });
        timed_job.track_writes = true;
        // Validate the job before the fill touches the disk.
        self.check_job(&timed_job)?;
        let fill = if fill {
            Some(self.run(&fill_job)?)
        } else {
            None
        };
        let mut timed = self.run(&timed_job)?;
        let newer = timed.written.take().map(|set| (next, set));
        let written_sectors = newer.as_ref().map_or(0, |(_, set)| set.len());
        let check = self.run(&pass(
            false,
            Some(Expect {
                base: generation,
                newer,
            }),
        ))?;
        Ok(VerifiedReport {
            fill,
            timed,
            check,
            generation,
            written_sectors,
        })
    }
}
