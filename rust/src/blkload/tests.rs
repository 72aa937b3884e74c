//! The load loop against a tiny virtio-blk device in a thread (a RAM disk over a
//! `SplitDevice`/`PackedDevice` on the same memory): data checked both ways.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::*;
use crate::memory::GuestMemory;
use crate::sys::{poll_readable, EventFd};
use crate::vring::{DescriptorChain, PackedDevice, RingLayout, SplitDevice};

const QUEUE: u32 = 128;
const DISK: usize = 1 << 20;

enum Dev {
    Split(SplitDevice),
    Packed(PackedDevice),
}

/// Serves requests until `stop`; `corrupt` flips a byte of every read's data.
fn device(
    mem: GuestMemory,
    layout: RingLayout,
    kick: EventFd,
    call: EventFd,
    disk: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    corrupt: bool,
) {
    let mut dev = if layout.is_packed() {
        Dev::Packed(PackedDevice::new(layout, true, false).unwrap())
    } else {
        Dev::Split(SplitDevice::new(layout, true, false).unwrap())
    };
    while !stop.load(Ordering::Relaxed) {
        if poll_readable(kick.as_fd(), 10).unwrap() {
            kick.read().unwrap();
        }
        loop {
            let chains: Vec<DescriptorChain> = match &mut dev {
                Dev::Split(q) => q.pop_batch(&mem, 64).unwrap(),
                Dev::Packed(q) => q.pop_batch(&mem, 64).unwrap(),
            };
            if chains.is_empty() {
                break;
            }
            let mut used = Vec::new();
            for c in chains {
                let hdr = c.read_all(&mem, 16).unwrap();
                let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
                let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
                let at = (sector * SECTOR) as usize;
                let mut d = disk.lock().unwrap();
                let written = if kind == 1 {
                    let data = c.read_all(&mem, usize::MAX).unwrap();
                    d[at..at + data.len() - 16].copy_from_slice(&data[16..]);
                    c.write_all(&mem, &[0]).unwrap()
                } else {
                    let n = c.writable_len() as usize - 1;
                    let mut out = d[at..at + n].to_vec();
                    if corrupt {
                        out[n / 2] ^= 0x40;
                    }
                    out.push(0);
                    c.write_all(&mem, &out).unwrap()
                };
                used.push((c.head, written));
            }
            let notify = match &mut dev {
                Dev::Split(q) => {
                    q.add_used_batch(&mem, &used).unwrap();
                    q.needs_notification(&mem).unwrap()
                }
                Dev::Packed(q) => {
                    q.add_used_batch(&mem, &used).unwrap();
                    q.needs_notification(&mem).unwrap()
                }
            };
            if notify {
                call.write(1).unwrap();
            }
        }
    }
}

struct Rig {
    load: BlkLoad,
    disk: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn rig(packed: bool, slots: u64, window: u32, corrupt: bool) -> Rig {
    let mem = GuestMemory::allocate(&[(0, 4 << 20)]).unwrap();
    let layout = if packed {
        RingLayout::packed_at(QUEUE, 0).unwrap()
    } else {
        RingLayout::split_at(QUEUE, 0).unwrap()
    };
    let buffers = (0..slots)
        .map(|i| Buffers {
            meta: 0x10000 + 32 * i,
            data: 0x20000 + u64::from(window) * i,
        })
        .collect();
    rig_on(mem.clone(), mem, layout, buffers, window, corrupt)
}

/// The load on `driver_mem` and the device thread on `device_mem` (the same memory, seen
/// by each side at the addresses of `layout` and `buffers`).
fn rig_on(
    driver_mem: GuestMemory,
    device_mem: GuestMemory,
    layout: RingLayout,
    buffers: Vec<Buffers>,
    window: u32,
    corrupt: bool,
) -> Rig {
    let (kick, call) = (EventFd::new(false).unwrap(), EventFd::new(false).unwrap());
    let (dk, dc) = (kick.try_clone().unwrap(), call.try_clone().unwrap());
    let load = BlkLoad::new(driver_mem, layout, true, kick, call, buffers, window, 4096).unwrap();
    let disk = Arc::new(Mutex::new(vec![0u8; DISK]));
    let stop = Arc::new(AtomicBool::new(false));
    let (d, s) = (disk.clone(), stop.clone());
    let thread = thread::spawn(move || device(device_mem, layout, dk, dc, d, s, corrupt));
    Rig {
        load,
        disk,
        stop,
        thread: Some(thread),
    }
}

fn job(rw: Rw, iodepth: u16) -> Job {
    Job {
        rw,
        block_size: 4096,
        iodepth,
        offset: 0,
        size: DISK as u64,
        duration: None,
        max_ios: Some(2000),
        seed: 7,
        busy_poll: Duration::ZERO,
        timeout: Duration::from_secs(10),
        write_generation: None,
        check: None,
        track_writes: false,
    }
}

#[test]
fn verified_randwrite_and_randread_split_and_packed() {
    for packed in [false, true] {
        let mut r = rig(packed, 16, 16384, false);
        for rw in [Rw::RandWrite, Rw::RandRead, Rw::Write, Rw::Read] {
            let v = r.load.run_verified(&job(rw, 16), 5, true).unwrap();
            assert_eq!(v.timed.ios, 2000, "{rw:?}");
            assert_eq!(v.io_errors(), 0);
            assert_eq!(v.bad_sectors(), 0, "{rw:?} packed={packed} {v:?}");
            assert_eq!(v.check.checked_sectors, DISK as u64 / SECTOR);
            if rw.is_read() {
                assert_eq!(v.timed.checked_sectors, 2000 * 8);
            }
        }
        // A short sequential write: the disk then holds generation 6 in the 100 blocks it
        // wrote, 5 elsewhere.
        let mut short = job(Rw::Write, 16);
        short.max_ios = Some(100);
        let v = r.load.run_verified(&short, 5, true).unwrap();
        assert_eq!((v.bad_sectors(), v.timed.ios), (0, 100));
        let d = r.disk.lock().unwrap();
        let mut newer = 0;
        for (s, chunk) in d.chunks(SECTOR as usize).enumerate() {
            let off = s as u64 * SECTOR;
            if pattern::matches(chunk, off, 6) {
                newer += 1;
            } else {
                assert!(pattern::matches(chunk, off, 5), "sector {s}");
            }
        }
        assert_eq!(newer, 100 * 8);
    }
}

#[test]
fn corrupt_reads_are_reported() {
    let mut r = rig(false, 8, 4096, true);
    let v = r.load.run_verified(&job(Rw::RandRead, 8), 1, true).unwrap();
    assert_eq!(
        v.timed.bad_sectors, v.timed.ios,
        "one bad sector per 4 KiB read"
    );
    assert_eq!(v.check.bad_sectors, DISK as u64 / 4096);
    assert!(v.first_bad_offset().is_some());
}

#[test]
fn timed_run_reports_latency_and_stops() {
    let mut r = rig(false, 32, 4096, false);
    let mut j = job(Rw::RandRead, 32);
    j.max_ios = None;
    j.duration = Some(Duration::from_millis(200));
    j.busy_poll = Duration::from_micros(20);
    let rep = r.load.run(&j).unwrap();
    assert!(rep.ios > 32);
    assert_eq!(rep.latency.count(), rep.ios);
    assert_eq!(rep.bytes, rep.ios * 4096);
    assert!(rep.elapsed >= Duration::from_millis(200));
    assert!(rep.latency.percentile(0.5) <= rep.latency.max());
}

#[test]
fn bad_jobs_are_refused_before_anything_is_sent() {
    let mut r = rig(false, 8, 4096, false);
    let cases: Vec<(Job, &str)> = vec![
        (
            Job {
                block_size: 1000,
                ..job(Rw::Read, 1)
            },
            "multiple of 512",
        ),
        (
            Job {
                block_size: 8192,
                ..job(Rw::Read, 1)
            },
            "data window",
        ),
        (job(Rw::Read, 9), "iodepth 9 does not fit"),
        (job(Rw::Read, 0), "at least 1"),
        (
            Job {
                size: 4096 + 512,
                ..job(Rw::Read, 1)
            },
            "whole",
        ),
        (
            Job {
                max_ios: None,
                ..job(Rw::Read, 1)
            },
            "duration",
        ),
    ];
    for (j, msg) in cases {
        let e = r.load.run(&j).unwrap_err();
        assert!(matches!(e, LoadError::InvalidParam(_)), "{e}");
        assert!(e.to_string().contains(msg), "{e} lacks {msg:?}");
    }
    // Nothing reached the device: the disk is still zero, and a good job runs.
    assert!(r.disk.lock().unwrap().iter().all(|&b| b == 0));
    assert_eq!(r.load.run(&job(Rw::Read, 8)).unwrap().ios, 2000);
}

#[test]
fn a_silent_device_times_out() {
    let mem = GuestMemory::allocate(&[(0, 1 << 20)]).unwrap();
    let layout = RingLayout::split_at(QUEUE, 0).unwrap();
    let buffers = vec![Buffers {
        meta: 0x8000,
        data: 0x9000,
    }];
    let mut load = BlkLoad::new(
        mem,
        layout,
        true,
        EventFd::new(false).unwrap(),
        EventFd::new(false).unwrap(),
        buffers,
        4096,
        4096,
    )
    .unwrap();
    let mut j = job(Rw::Read, 1);
    j.timeout = Duration::from_millis(50);
    assert!(matches!(
        load.run(&j).unwrap_err(),
        LoadError::Timeout { in_flight: 1, .. }
    ));
}

#[test]
fn the_interrupt_hook_stops_a_run_busy_or_waiting() {
    use std::sync::atomic::AtomicUsize;
    // A busy device: asked every 100 ms, the third answer stops the run.
    let mut r = rig(false, 8, 4096, false);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    r.load.set_interrupt(Some(Box::new(move || {
        c.fetch_add(1, Ordering::Relaxed) >= 2
    })));
    let mut j = job(Rw::RandRead, 8);
    j.max_ios = None;
    j.duration = Some(Duration::from_secs(30));
    let t = std::time::Instant::now();
    assert!(matches!(r.load.run(&j), Err(LoadError::Interrupted)));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(calls.load(Ordering::Relaxed), 3);

    // A silent device: the wait is cut into slices, so the hook is asked long before the
    // 30 s timeout.
    let mem = GuestMemory::allocate(&[(0, 1 << 20)]).unwrap();
    let mut load = BlkLoad::new(
        mem,
        RingLayout::split_at(QUEUE, 0).unwrap(),
        true,
        EventFd::new(false).unwrap(),
        EventFd::new(false).unwrap(),
        vec![Buffers {
            meta: 0x8000,
            data: 0x9000,
        }],
        4096,
        4096,
    )
    .unwrap();
    load.set_interrupt(Some(Box::new(|| true)));
    let mut j = job(Rw::Read, 1);
    j.timeout = Duration::from_secs(30);
    let t = std::time::Instant::now();
    assert!(matches!(load.run(&j), Err(LoadError::Interrupted)));
    assert!(t.elapsed() < Duration::from_secs(5));
    // The abandoned request keeps the next run from starting on a dirty ring.
    load.set_interrupt(None);
    let e = load.run(&job(Rw::Read, 1)).unwrap_err();
    assert!(e.to_string().contains("still in flight"), "{e}");
}

#[test]
fn a_back_end_that_hangs_up_ends_the_wait_at_once() {
    use std::os::unix::net::UnixStream;
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mem = GuestMemory::allocate(&[(0, 1 << 20)]).unwrap();
    let mut load = BlkLoad::new(
        mem,
        RingLayout::split_at(QUEUE, 0).unwrap(),
        true,
        EventFd::new(false).unwrap(),
        EventFd::new(false).unwrap(),
        vec![Buffers {
            meta: 0x8000,
            data: 0x9000,
        }],
        4096,
        4096,
    )
    .unwrap();
    load.watch_hangup(Some(ours.into()));
    let closer = thread::spawn(move || {
        // Data on the socket is not a hang-up: the wait goes on.
        use std::io::Write;
        (&theirs).write_all(b"x").unwrap();
        thread::sleep(Duration::from_millis(200));
        drop(theirs);
    });
    let mut j = job(Rw::Read, 1);
    j.timeout = Duration::from_secs(30);
    let t = std::time::Instant::now();
    let e = load.run(&j).unwrap_err();
    closer.join().unwrap();
    assert!(matches!(e, LoadError::Disconnected { in_flight: 1 }), "{e}");
    assert!(e.to_string().contains("closed the connection"), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert!(t.elapsed() < Duration::from_secs(10));
}

// -- behind an IOMMU: the remapping and the translation the IOMMU side hands out --------

use super::iommu::{Remap, IOVA_BASE};
use crate::memory::Iotlb;
use crate::user::payload::iotlb as msg;

const PAGE: u64 = 4096;

#[test]
fn the_remapping_swaps_pages_in_pairs_and_the_halves() {
    let r = Remap::new(PAGE, 8 * PAGE).unwrap();
    assert_eq!(r.pages(), 8);
    assert_eq!(r.iova(0x1234), IOVA_BASE + 0x1234);
    // I/O virtual page j is guest page ((j ^ 1) + 4) % 8, the byte offset kept.
    let pages: Vec<u64> = (0..8)
        .map(|j| r.backing(IOVA_BASE + j * PAGE + 7).unwrap())
        .map(|g| {
            assert_eq!(g % PAGE, 7);
            g / PAGE
        })
        .collect();
    assert_eq!(pages, [5, 4, 7, 6, 1, 0, 3, 2]);
    // Five pages: the odd last page is not swapped, the halves turn by two; still a
    // bijection.
    let odd = Remap::new(PAGE, 5 * PAGE).unwrap();
    let mut pages: Vec<u64> = (0..5)
        .map(|j| odd.backing(IOVA_BASE + j * PAGE).unwrap() / PAGE)
        .collect();
    assert_eq!(pages, [3, 2, 0, 4, 1]);
    pages.sort_unstable();
    assert_eq!(pages, [0, 1, 2, 3, 4]);
    // Nothing outside the remapped space.
    assert_eq!(r.backing(IOVA_BASE + 8 * PAGE), None);
    assert_eq!(r.backing(IOVA_BASE - 1), None);
    assert_eq!(
        r.backing(PAGE),
        None,
        "a guest address is no I/O virtual one"
    );
    // One page of 2 MiB: the remapping is the offset alone.
    let big = Remap::new(2 << 20, 2 << 20).unwrap();
    assert_eq!(big.backing(IOVA_BASE + 5), Some(5));
}

#[test]
fn bad_iommu_pages_are_refused() {
    for (page, size) in [
        (3000, 3000 * 4),
        (2048, 4096),
        (0, 4096),
        (8192, 4096),
        (4096, 0),
    ] {
        let err = Remap::new(page, size).unwrap_err();
        assert!(matches!(err, LoadError::InvalidParam(_)), "{page} {size}");
    }
}

#[test]
fn updates_map_whole_pages_to_the_front_end_address_behind_them() {
    let mem = GuestMemory::allocate(&[(0, 4 * PAGE)]).unwrap();
    let user0 = mem.gpa_to_user(0).unwrap();
    let r = Remap::new(PAGE, 4 * PAGE).unwrap();
    let u = r.update_for(&mem, IOVA_BASE + 2 * PAGE + 100).unwrap();
    assert_eq!((u.iova, u.size), (IOVA_BASE + 2 * PAGE, PAGE));
    assert_eq!(
        u.uaddr,
        user0 + PAGE,
        "page 2 is page 3 turned by half of 4 pages"
    );
    assert_eq!((u.perm, u.kind), (msg::PERM_RW, msg::UPDATE));
    assert!(r.update_for(&mem, IOVA_BASE + 4 * PAGE).is_none());
    assert!(r.update_for(&mem, 0).is_none());
    // A 2 MiB page is one update for the whole page.
    let mem = GuestMemory::allocate(&[(0, 4 << 20)]).unwrap();
    let r = Remap::new(2 << 20, 4 << 20).unwrap();
    let u = r.update_for(&mem, IOVA_BASE + 5).unwrap();
    assert_eq!((u.iova, u.size), (IOVA_BASE, 2 << 20));
    assert_eq!(
        u.uaddr,
        mem.gpa_to_user(0).unwrap(),
        "pages 0 and 1 swapped, then the halves"
    );
}

/// An IOTLB (the back-end's) filled with what the IOMMU side answers for every page, or,
/// from page `wrong_from` on, with a mistranslation: each I/O virtual page to the guest
/// page of the same number.
fn back_end_view(mem: &GuestMemory, r: &Remap, wrong_from: Option<u64>) -> GuestMemory {
    let mut tlb = Iotlb::new();
    for j in 0..r.pages() {
        let mut u = r.update_for(mem, r.iova(j * r.page())).unwrap();
        if wrong_from.is_some_and(|w| j >= w) {
            u.uaddr = mem.gpa_to_user(j * r.page()).unwrap();
        }
        tlb.update(mem, u.iova, u.size, u.uaddr, u.perm).unwrap();
    }
    tlb.view()
}

#[test]
fn the_driver_view_and_the_answers_show_the_same_memory() {
    let mem = GuestMemory::allocate(&[(0, 6 * PAGE)]).unwrap();
    for p in 0..6u8 {
        mem.write(u64::from(p) * PAGE, &[p + 1; PAGE as usize])
            .unwrap();
    }
    let r = Remap::new(PAGE, 6 * PAGE).unwrap();
    let driver = r.driver_view(&mem).unwrap();
    let device = back_end_view(&mem, &r, None);
    for j in 0..6u64 {
        let mut a = [0u8; 2];
        let mut b = [0u8; 2];
        driver
            .read(r.iova(j * PAGE + PAGE - 1), &mut a[..1])
            .unwrap();
        device.read(r.iova(j * PAGE), &mut b[..1]).unwrap();
        assert_eq!(a[0], ((j ^ 1) + 3) as u8 % 6 + 1, "driver, page {j}");
        assert_eq!(b[0], a[0], "back-end, page {j}");
    }
    // A range across a page boundary is contiguous for both, not in memory.
    driver.write(r.iova(PAGE - 2), &[0xaa; 4]).unwrap();
    let mut back = [0u8; 4];
    device.read(r.iova(PAGE - 2), &mut back).unwrap();
    assert_eq!(back, [0xaa; 4]);
    let mut g = [0u8; 2];
    mem.read(5 * PAGE - 2, &mut g).unwrap();
    assert_eq!(
        g, [0xaa; 2],
        "the end of I/O virtual page 0 is the end of guest page 4"
    );
    mem.read(3 * PAGE, &mut g).unwrap();
    assert_eq!(
        g, [0xaa; 2],
        "the start of I/O virtual page 1 is the start of guest page 3"
    );
}

/// The load in I/O virtual space (as `new_behind_iommu` builds it) against the rig's
/// device reading through an IOTLB view (mistranslating the data pages with `wrong`).
fn remapped_rig(wrong: bool) -> Rig {
    let size = 4 << 20;
    let mem = GuestMemory::allocate(&[(0, size)]).unwrap();
    let r = Remap::new(PAGE, size).unwrap();
    let layout = r
        .ring_layout(RingLayout::split_at(QUEUE, 0).unwrap())
        .unwrap();
    let buffers = (0..8)
        .map(|i| Buffers {
            meta: r.iova(0x10000 + 32 * i),
            data: r.iova(0x20000 + 16384 * i),
        })
        .collect();
    let driver_mem = r.driver_view(&mem).unwrap();
    let device_mem = back_end_view(&mem, &r, wrong.then_some(0x20000 / PAGE));
    rig_on(driver_mem, device_mem, layout, buffers, 16384, false)
}

#[test]
fn a_verified_run_through_the_remapping_passes() {
    let mut r = remapped_rig(false);
    for rw in [Rw::RandWrite, Rw::RandRead] {
        let mut j = job(rw, 8);
        j.block_size = 16384;
        let v = r.load.run_verified(&j, 3, true).unwrap();
        assert_eq!((v.io_errors(), v.bad_sectors()), (0, 0), "{rw:?}");
        assert_eq!(v.check.checked_sectors, DISK as u64 / SECTOR);
    }
}

#[test]
fn a_back_end_translating_data_without_the_swap_is_caught_by_verification() {
    // The ring is translated right, the data pages as if nothing were remapped: every
    // request completes, and the data read back is wrong.
    let mut r = remapped_rig(true);
    let mut j = job(Rw::RandRead, 8);
    j.block_size = 16384;
    let v = r.load.run_verified(&j, 3, true).unwrap();
    assert_eq!(v.io_errors(), 0);
    assert!(
        v.bad_sectors() > 0,
        "a mistranslating back-end went unnoticed"
    );
}
