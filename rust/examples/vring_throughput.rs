//! Descriptor-chain throughput of the virtqueue device side and driver side in one process,
//! beside the memcpy floor of the same bytes.
//!
//! One `GuestMemory::allocate`, one ring of 256 entries, a driver and a device on it. Each
//! round the driver adds a batch of chains (a 1500-byte device-readable payload split over
//! 1, 2 or 3 segments), publishes and asks `kick_needed`; the device `pop_batch`es them,
//! returns them with `add_used_batch` and asks `needs_notification`; the driver collects
//! them with `poll_used`. Device time is pop + add_used + needs_notification, driver time
//! add + publish + kick_needed + poll_used (one clock reading at each change of side, i.e.
//! three per batch); "both" is the whole loop. The payload bytes are not touched by the ring
//! loop: the memcpy floor is measured apart, as one `ptr::copy_nonoverlapping` per segment
//! of the same sizes between two places in the same guest memory.
//!
//! ```text
//! cargo run -p pyvhost-core --release --example vring_throughput -- \
//!     [--placement both|pinned|free] [--pin] [--cpu C] [--chains N] [--batch B] [--runs R] [--json]
//! ```
//!
//! Each figure is the median over `--runs` runs of `--chains` chains (after a warm-up run
//! of a tenth of them). `--json` prints one JSON object per row instead of the table (what
//! `benches/bench_vring.py` reads).

use std::hint::black_box;
use std::time::{Duration, Instant};

use vhost_core::memory::GuestMemory;
use vhost_core::vring::{PackedDevice, PackedDriver, RingLayout, SplitDevice, SplitDriver};

const QUEUE_SIZE: u32 = 256;
const PAYLOAD: u32 = 1500;
const MEM_SIZE: u64 = 4 << 20;
const RING: u64 = 0;
const BUF: u64 = 0x10_0000;
const SLOT: u64 = 2048;
const COPY_DST: u64 = 0x20_0000;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Both sides of one ring, whatever its format.
trait Pair {
    fn add(&mut self, mem: &GuestMemory, readable: &[(u64, u32)]) -> Res<()>;
    fn publish_and_kick(&mut self, mem: &GuestMemory) -> Res<bool>;
    /// pop_batch + add_used_batch + needs_notification; returns the chains popped.
    fn device_round(
        &mut self,
        mem: &GuestMemory,
        max: usize,
        used: &mut Vec<(u16, u32)>,
    ) -> Res<(usize, bool)>;
    fn poll_used(&mut self, mem: &GuestMemory) -> Res<usize>;
}

struct Split(SplitDriver, SplitDevice);
struct Packed(PackedDriver, PackedDevice);

macro_rules! impl_pair {
    ($t:ty) => {
        impl Pair for $t {
            fn add(&mut self, mem: &GuestMemory, readable: &[(u64, u32)]) -> Res<()> {
                black_box(self.0.add(mem, readable, &[])?);
                Ok(())
            }
            fn publish_and_kick(&mut self, mem: &GuestMemory) -> Res<bool> {
                self.0.publish(mem)?;
                Ok(self.0.kick_needed(mem)?)
            }
            fn device_round(
                &mut self,
                mem: &GuestMemory,
                max: usize,
                used: &mut Vec<(u16, u32)>,
            ) -> Res<(usize, bool)> {
                let chains = self.1.pop_batch(mem, max)?;
                used.clear();
                used.extend(chains.iter().map(|c| (c.head, 0)));
                black_box(&chains);
                self.1.add_used_batch(mem, used)?;
                Ok((chains.len(), self.1.needs_notification(mem)?))
            }
            fn poll_used(&mut self, mem: &GuestMemory) -> Res<usize> {
                Ok(black_box(self.0.poll_used(mem)?).len())
            }
        }
    };
}
impl_pair!(Split);
impl_pair!(Packed);

fn make_pair(mem: &GuestMemory, packed: bool, event_idx: bool) -> Res<Box<dyn Pair>> {
    Ok(if packed {
        let layout = RingLayout::packed_at(QUEUE_SIZE, RING)?;
        let mut drv = PackedDriver::new(layout, event_idx)?;
        drv.init(mem)?;
        Box::new(Packed(drv, PackedDevice::new(layout, event_idx, true)?))
    } else {
        let layout = RingLayout::split_at(QUEUE_SIZE, RING)?;
        let mut drv = SplitDriver::new(layout, event_idx)?;
        drv.init(mem)?;
        Box::new(Split(drv, SplitDevice::new(layout, event_idx, true)?))
    })
}

/// Segment lengths of the payload split over `n` pieces (the last takes the remainder).
fn segment_lens(n: u32) -> Vec<u32> {
    let each = PAYLOAD / n;
    let mut v = vec![each; n as usize];
    if let Some(last) = v.last_mut() {
        *last += PAYLOAD - each * n;
    }
    v
}

/// The segments of chain `slot` of a batch.
fn segments(slot: usize, lens: &[u32]) -> Vec<(u64, u32)> {
    let mut addr = BUF + slot as u64 * SLOT;
    lens.iter()
        .map(|&l| {
            let s = (addr, l);
            addr += u64::from(l);
            s
        })
        .collect()
}

#[derive(Default, Clone, Copy)]
struct Times {
    device: Duration,
    driver: Duration,
    total: Duration,
    kicks: u64,
    calls: u64,
}

fn run_ring(
    mem: &GuestMemory,
    pair: &mut dyn Pair,
    segs: &[Vec<(u64, u32)>],
    chains: u64,
) -> Res<Times> {
    let batch = segs.len();
    let mut used = Vec::with_capacity(batch);
    let mut t = Times::default();
    let mut done = 0u64;
    let start = Instant::now();
    while done < chains {
        let t0 = Instant::now();
        for s in segs {
            pair.add(mem, s)?;
        }
        let kick = pair.publish_and_kick(mem)?;
        let t1 = Instant::now();
        let (popped, call) = pair.device_round(mem, batch, &mut used)?;
        let t2 = Instant::now();
        let got = pair.poll_used(mem)?;
        let t3 = Instant::now();
        if popped != batch || got != batch {
            return Err(format!("batch of {batch}: popped {popped}, used {got}").into());
        }
        t.driver += (t1 - t0) + (t3 - t2);
        t.device += t2 - t1;
        t.kicks += u64::from(kick);
        t.calls += u64::from(call);
        done += batch as u64;
    }
    t.total = start.elapsed();
    Ok(t)
}

/// One `copy_nonoverlapping` per segment of every chain of the batch, guest memory to guest
/// memory; returns the time for `chains` chains' worth.
fn run_memcpy(mem: &GuestMemory, segs: &[Vec<(u64, u32)>], chains: u64) -> Res<Duration> {
    let mut ptrs = Vec::new();
    for s in segs {
        for &(addr, len) in s {
            let src = mem.translate(addr, u64::from(len))?;
            let dst = mem.translate(COPY_DST + (addr - BUF), u64::from(len))?;
            ptrs.push((src.cast_const(), dst, len as usize));
        }
    }
    let batch = segs.len() as u64;
    let mut done = 0u64;
    let start = Instant::now();
    while done < chains {
        for &(src, dst, len) in &ptrs {
            // SAFETY: both ranges were translated for `len` bytes of one mapped region of
            // `mem`, which outlives the loop, and [BUF, BUF+1 MiB) and [COPY_DST, ..) do
            // not overlap.
            unsafe { std::ptr::copy_nonoverlapping(black_box(src), black_box(dst), len) };
        }
        black_box(dst_probe(&ptrs));
        done += batch;
    }
    Ok(start.elapsed())
}

fn dst_probe(ptrs: &[(*const u8, *mut u8, usize)]) -> *mut u8 {
    ptrs.first().map_or(std::ptr::null_mut(), |p| p.1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn per_sec(chains: u64, d: Duration) -> f64 {
    chains as f64 / d.as_secs_f64().max(1e-12)
}

struct Row {
    placement: &'static str,
    cpus: String,
    format: &'static str,
    event_idx: bool,
    segments: u32,
    device: f64,
    driver: f64,
    both: f64,
    memcpy: f64,
    kicks_per_chain: f64,
    calls_per_chain: f64,
}

struct Args {
    placements: Vec<&'static str>,
    cpu: usize,
    chains: u64,
    batch: usize,
    runs: usize,
    json: bool,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        placements: vec!["pinned", "free"],
        cpu: 0,
        chains: 200_000,
        batch: 64,
        runs: 5,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--pin" => a.placements = vec!["pinned"],
            "--placement" => {
                a.placements = match val()?.as_str() {
                    "both" => vec!["pinned", "free"],
                    "pinned" => vec!["pinned"],
                    "free" => vec!["free"],
                    other => return Err(format!("unknown placement {other}").into()),
                }
            }
            "--cpu" => a.cpu = val()?.parse()?,
            "--chains" => a.chains = val()?.parse()?,
            "--batch" => a.batch = val()?.parse()?,
            "--runs" => a.runs = val()?.parse::<usize>()?.max(1),
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!(
                    "vring_throughput [--placement both|pinned|free] [--pin] [--cpu C] \
                     [--chains N] [--batch B] [--runs R] [--json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    // 3 descriptors per chain must fit the ring.
    if a.batch == 0 || a.batch * 3 > QUEUE_SIZE as usize {
        return Err(format!("--batch must be in 1..={}", QUEUE_SIZE / 3).into());
    }
    Ok(a)
}

fn get_affinity() -> Res<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(set)
}

fn set_affinity(set: &libc::cpu_set_t) -> Res<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn cpu_list(set: &libc::cpu_set_t) -> String {
    let cpus: Vec<String> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, set) })
        .map(|i| i.to_string())
        .collect();
    cpus.join(",")
}

fn measure(a: &Args, mem: &GuestMemory, placement: &'static str, cpus: &str) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for packed in [false, true] {
        for event_idx in [false, true] {
            for nseg in 1..=3u32 {
                let lens = segment_lens(nseg);
                let segs: Vec<_> = (0..a.batch).map(|i| segments(i, &lens)).collect();
                let mut pair = make_pair(mem, packed, event_idx)?;
                run_ring(
                    mem,
                    pair.as_mut(),
                    &segs,
                    (a.chains / 10).max(a.batch as u64),
                )?;
                run_memcpy(mem, &segs, (a.chains / 10).max(a.batch as u64))?;
                let (mut dev, mut drv, mut both, mut cpy) = (vec![], vec![], vec![], vec![]);
                let (mut kicks, mut calls, mut n) = (0u64, 0u64, 0u64);
                // Ring and memcpy runs take turns, so load from elsewhere falls on both.
                for _ in 0..a.runs {
                    let t = run_ring(mem, pair.as_mut(), &segs, a.chains)?;
                    let n_run = a.chains.div_ceil(a.batch as u64) * a.batch as u64;
                    dev.push(per_sec(n_run, t.device));
                    drv.push(per_sec(n_run, t.driver));
                    both.push(per_sec(n_run, t.total));
                    kicks += t.kicks;
                    calls += t.calls;
                    n += n_run;
                    cpy.push(per_sec(n_run, run_memcpy(mem, &segs, a.chains)?));
                }
                rows.push(Row {
                    placement,
                    cpus: cpus.to_string(),
                    format: if packed { "packed" } else { "split" },
                    event_idx,
                    segments: nseg,
                    device: median(dev),
                    driver: median(drv),
                    both: median(both),
                    memcpy: median(cpy),
                    kicks_per_chain: kicks as f64 / n as f64,
                    calls_per_chain: calls as f64 / n as f64,
                });
            }
        }
    }
    Ok(rows)
}

fn mops(x: f64) -> String {
    format!("{:.2}", x / 1e6)
}

fn print_table(a: &Args, rows: &[Row]) {
    println!(
        "# vring_throughput: queue {QUEUE_SIZE}, batch {}, {PAYLOAD}-byte device-readable \
         payload over 1-3 segments, {} chains x {} runs (median), Mchains/s",
        a.batch, a.chains, a.runs
    );
    println!("# memcpy = copy_nonoverlapping of the same segments inside the same GuestMemory;");
    println!("# ratio = both / memcpy (chains/s per memcpy op/s)");
    println!(
        "{:<7} {:<8} {:<7} {:<9} {:>4} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
        "place",
        "cpus",
        "format",
        "event_idx",
        "segs",
        "device",
        "driver",
        "both",
        "memcpy",
        "ratio",
        "kick/ch",
        "call/ch"
    );
    for r in rows {
        println!(
            "{:<7} {:<8} {:<7} {:<9} {:>4} {:>8} {:>8} {:>8} {:>8} {:>6.3} {:>7.4} {:>7.4}",
            r.placement,
            r.cpus,
            r.format,
            if r.event_idx { "on" } else { "off" },
            r.segments,
            mops(r.device),
            mops(r.driver),
            mops(r.both),
            mops(r.memcpy),
            r.both / r.memcpy,
            r.kicks_per_chain,
            r.calls_per_chain
        );
    }
}

fn print_json(rows: &[Row]) {
    for r in rows {
        println!(
            "{{\"placement\": \"{}\", \"cpus\": \"{}\", \"format\": \"{}\", \"event_idx\": {}, \
             \"segments\": {}, \"device\": {:.1}, \"driver\": {:.1}, \"both\": {:.1}, \
             \"memcpy\": {:.1}, \"kicks_per_chain\": {:.6}, \"calls_per_chain\": {:.6}}}",
            r.placement,
            r.cpus,
            r.format,
            r.event_idx,
            r.segments,
            r.device,
            r.driver,
            r.both,
            r.memcpy,
            r.kicks_per_chain,
            r.calls_per_chain
        );
    }
}

fn main() -> Res<()> {
    let a = parse_args()?;
    let mem = GuestMemory::allocate(&[(0, MEM_SIZE)])?;
    let all = get_affinity()?;
    let mut rows = Vec::new();
    for &placement in &a.placements {
        if placement == "pinned" {
            // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            if a.cpu >= libc::CPU_SETSIZE as usize {
                return Err(format!("--cpu {} out of range", a.cpu).into());
            }
            // SAFETY: `a.cpu` is below CPU_SETSIZE (checked above).
            unsafe { libc::CPU_SET(a.cpu, &mut one) };
            set_affinity(&one)?;
        } else {
            set_affinity(&all)?;
        }
        let cpus = cpu_list(&get_affinity()?);
        if !a.json {
            eprintln!(
                "# {placement}: this process (pid {}) on CPUs {cpus}",
                std::process::id()
            );
        }
        rows.extend(measure(&a, &mem, placement, &cpus)?);
    }
    set_affinity(&all)?;
    if a.json {
        print_json(&rows);
    } else {
        print_table(&a, &rows);
    }
    Ok(())
}
