//! Rings behind an IOMMU: the device pops and completes through an [`Iotlb`] view whose
//! addresses (I/O virtual) differ from the guest-physical layout, while a driver writes
//! the same I/O virtual addresses through a view of its own that maps everything. Misses
//! leave the queue working and are popped again; a reply through a read-only mapping
//! fails that request and writes nothing.

use super::*;
use crate::memory::{Access, GuestMemory, Iotlb, MemoryError, Perm};

const PAGE: u64 = 0x1000;
/// Guest-physical layout: ring page at 0, buffers at 0x8_0000.
const RING_GPA: u64 = 0;
const BUF_GPA: u64 = 0x8_0000;
/// I/O virtual layout: unrelated to the gpas, buffers below the ring.
const RING_IOVA: u64 = 0xa000_0000;
const IN_IOVA: u64 = 0x5000_0000; // device-readable request
const OUT_IOVA: u64 = 0x5000_1000; // device-writable reply
const OUT2_IOVA: u64 = 0x5000_2000;

struct Setup {
    mem: GuestMemory,
    uaddr: u64,
    /// The driver's IOTLB: everything mapped read-write.
    driver: Iotlb,
    /// The device's IOTLB: only what each test maps.
    device: Iotlb,
}

fn setup() -> Setup {
    let mem = GuestMemory::allocate(&[(0, 0x10_0000)]).unwrap();
    let uaddr = mem.regions()[0].info().userspace_addr;
    let mut driver = Iotlb::new();
    driver
        .update(&mem, RING_IOVA, PAGE, uaddr + RING_GPA, 3)
        .unwrap();
    driver
        .update(&mem, IN_IOVA, 3 * PAGE, uaddr + BUF_GPA, 3)
        .unwrap();
    let mut device = Iotlb::new();
    device
        .update(&mem, RING_IOVA, PAGE, uaddr + RING_GPA, 3)
        .unwrap();
    Setup {
        mem,
        uaddr,
        driver,
        device,
    }
}

impl Setup {
    /// Maps the device's `iova` page onto the buffer page the driver sees there.
    fn map(&mut self, iova: u64, perm: u8) {
        let off = iova - IN_IOVA;
        self.device
            .update(&self.mem, iova, PAGE, self.uaddr + BUF_GPA + off, perm)
            .unwrap();
    }
}

/// A driver of either format, through the driver's view.
enum Driver {
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Driver {
    fn new(packed: bool, mem: &GuestMemory) -> (Self, RingLayout) {
        let layout = if packed {
            RingLayout::packed_at(8, RING_IOVA).unwrap()
        } else {
            RingLayout::split_at(8, RING_IOVA).unwrap()
        };
        let d = if packed {
            let mut d = PackedDriver::new(layout, false).unwrap();
            d.init(mem).unwrap();
            Driver::Packed(d)
        } else {
            let mut d = SplitDriver::new(layout, false).unwrap();
            d.init(mem).unwrap();
            Driver::Split(d)
        };
        (d, layout)
    }

    fn send(&mut self, mem: &GuestMemory, readable: &[(u64, u32)], writable: &[(u64, u32)]) {
        match self {
            Driver::Split(d) => {
                d.add(mem, readable, writable).unwrap();
                d.publish(mem).unwrap();
            }
            Driver::Packed(d) => {
                d.add(mem, readable, writable).unwrap();
                d.publish(mem).unwrap();
            }
        }
    }

    fn used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        match self {
            Driver::Split(d) => d.poll_used(mem).unwrap(),
            Driver::Packed(d) => d.poll_used(mem).unwrap(),
        }
    }
}

/// A fresh setup with a driver and a device queue of format `packed` on its ring.
fn rig(packed: bool) -> (Setup, GuestMemory, Driver, DeviceQueue) {
    let s = setup();
    let dview = s.driver.view();
    let (driver, layout) = Driver::new(packed, &dview);
    let q = DeviceQueue::new(layout, false, false).unwrap();
    (s, dview, driver, q)
}

#[test]
fn misses_leave_the_queue_working_and_the_pop_is_retried() {
    for packed in [false, true] {
        let (mut s, dview, mut driver, mut q) = rig(packed);
        dview.write(IN_IOVA, b"request!").unwrap();
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);

        // The request buffer is not mapped for the device yet: a read miss.
        let err = q.pop_batch(&s.device.view(), 4).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((IN_IOVA, Access::Read)), "{err}");
        assert!(!q.is_broken());
        s.map(IN_IOVA, 1);
        // Then the reply buffer: a write miss.
        let err = q.pop_batch(&s.device.view(), 4).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((OUT_IOVA, Access::Write)), "{err}");
        assert!(!q.is_broken());
        s.map(OUT_IOVA, 3);

        let view = s.device.view();
        let chains = q.pop_batch(&view, 4).unwrap();
        assert_eq!(chains.len(), 1, "packed {packed}");
        let c = &chains[0];
        assert_eq!(c.read_all(&view, 64).unwrap(), b"request!");
        assert_eq!(c.write_all(&view, b"reply").unwrap(), 5);
        q.add_used_batch(&view, &[(c.head, 5)]).unwrap();
        assert_eq!(driver.used(&dview).len(), 1);
        // The reply is where the device's IOVA led: the gpa behind OUT_IOVA.
        let mut back = [0u8; 5];
        s.mem.read(BUF_GPA + PAGE, &mut back).unwrap();
        assert_eq!(&back, b"reply");
        assert!(q.pop_batch(&view, 4).unwrap().is_empty());
    }
}

#[test]
fn a_reply_through_a_read_only_mapping_fails_the_request_only() {
    for packed in [false, true] {
        let (mut s, dview, mut driver, mut q) = rig(packed);
        s.map(IN_IOVA, 1);
        s.map(OUT_IOVA, 1); // the IOMMU maps the reply buffer read-only
        dview.write(OUT_IOVA, &[0xee; 16]).unwrap();
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);

        let view = s.device.view();
        let chains = q.pop_batch(&view, 4).unwrap();
        let c = &chains[0];
        let err = c.write_all(&view, b"reply").unwrap_err();
        assert!(
            matches!(
                err,
                VringError::Memory(MemoryError::AccessDenied {
                    addr: OUT_IOVA,
                    access: Access::Write,
                    perm: Perm::ReadOnly,
                    ..
                })
            ),
            "{err:?}"
        );
        // A device path handing the buffer to the kernel is refused the same way.
        assert!(view
            .for_each_chunk(OUT_IOVA, 16, Access::Write, |_, _, _| panic!("no chunk"))
            .is_err());
        let mut back = [0u8; 16];
        s.mem.read(BUF_GPA + PAGE, &mut back).unwrap();
        assert_eq!(back, [0xee; 16], "memory unchanged");
        // The request completes (as failed) and the queue goes on.
        q.add_used_batch(&view, &[(c.head, 0)]).unwrap();
        assert!(!q.is_broken());
        assert_eq!(driver.used(&dview), vec![(c.head, 0)]);

        s.map(OUT2_IOVA, 3);
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT2_IOVA, 16)]);
        let view = s.device.view();
        let chains = q.pop_batch(&view, 4).unwrap();
        assert_eq!(chains[0].write_all(&view, b"ok").unwrap(), 2);
    }
}

#[test]
fn a_batch_returns_the_chains_before_a_miss() {
    for packed in [false, true] {
        let (mut s, dview, mut driver, mut q) = rig(packed);
        s.map(IN_IOVA, 1);
        s.map(OUT_IOVA, 3);
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT2_IOVA, 16)]);
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);

        let first = q.pop_batch(&s.device.view(), 8).unwrap();
        assert_eq!(first.len(), 1, "the chain before the miss is handed out");
        let err = q.pop_batch(&s.device.view(), 8).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((OUT2_IOVA, Access::Write)));
        s.map(OUT2_IOVA, 3);
        let rest = q.pop_batch(&s.device.view(), 8).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].segments[1].addr, OUT2_IOVA);
    }
}

#[test]
fn an_in_flight_chain_outlives_the_invalidation_of_its_buffers() {
    let (mut s, dview, mut driver, mut q) = rig(false);
    s.map(IN_IOVA, 1);
    s.map(OUT_IOVA, 3);
    driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);
    let view = s.device.view();
    let chains = q.pop_batch(&view, 4).unwrap();
    // The IOMMU side unmaps the reply buffer while the request is being served.
    s.device.invalidate(OUT_IOVA, PAGE).unwrap();
    assert!(matches!(
        s.device.view().write(OUT_IOVA, b"x"),
        Err(MemoryError::IotlbMiss { .. })
    ));
    // The worker completes it against the view it popped from.
    assert_eq!(chains[0].write_all(&view, b"done").unwrap(), 4);
    q.add_used_batch(&view, &[(chains[0].head, 4)]).unwrap();
    assert_eq!(driver.used(&dview), vec![(chains[0].head, 4)]);
}

#[test]
fn ring_areas_are_checked_for_the_access_the_device_needs() {
    let mut s = setup();
    for packed in [false, true] {
        let layout = if packed {
            RingLayout::packed_at(8, RING_IOVA).unwrap()
        } else {
            RingLayout::split_at(8, RING_IOVA).unwrap()
        };
        layout.check_memory(&s.device.view()).unwrap();
        // Read-only ring page: the used ring (split) or descriptor ring (packed) is
        // written by the device.
        s.device
            .update(&s.mem, RING_IOVA, PAGE, s.uaddr + RING_GPA, 1)
            .unwrap();
        let err = layout.check_memory(&s.device.view()).unwrap_err();
        assert!(
            matches!(
                err,
                VringError::Memory(MemoryError::AccessDenied {
                    access: Access::Write,
                    ..
                })
            ),
            "{err:?}"
        );
        s.device.invalidate(RING_IOVA, PAGE).unwrap();
        let err = layout.check_memory(&s.device.view()).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((RING_IOVA, Access::Read)));
        s.device
            .update(&s.mem, RING_IOVA, PAGE, s.uaddr + RING_GPA, 3)
            .unwrap();
    }
}

#[test]
fn a_miss_after_the_chain_was_consumed_breaks_the_queue() {
    let mut s = setup();
    let dview = s.driver.view();
    let layout = RingLayout::split_at(8, RING_IOVA).unwrap();
    let mut driver = SplitDriver::new(layout, true).unwrap();
    driver.init(&dview).unwrap();
    let mut q = DeviceQueue::new(layout, true, false).unwrap();
    s.map(IN_IOVA, 1);
    s.map(OUT_IOVA, 3);
    driver
        .add(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)])
        .unwrap();
    driver.publish(&dview).unwrap();
    // The used ring (where the pop writes avail_event) is unmapped for the device.
    let (used, _) = layout.areas()[2];
    s.device.invalidate(used, RING_IOVA + PAGE - used).unwrap();
    let err = q.pop_batch(&s.device.view(), 4).unwrap_err();
    assert!(
        matches!(err, VringError::MissAfterPop { iova } if iova == used + 4 + 8 * 8),
        "{err:?}"
    );
    assert!(q.is_broken(), "a consumed chain cannot be popped again");
}

/// A driver of either format and a device queue with `VIRTIO_F_INDIRECT_DESC`.
fn rig_indirect(packed: bool) -> (Setup, GuestMemory, Driver, DeviceQueue) {
    let s = setup();
    let dview = s.driver.view();
    let (driver, layout) = Driver::new(packed, &dview);
    let q = DeviceQueue::new(layout, false, true).unwrap();
    (s, dview, driver, q)
}

impl Driver {
    fn send_indirect(
        &mut self,
        mem: &GuestMemory,
        table: u64,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) {
        match self {
            Driver::Split(d) => {
                d.add_indirect(mem, table, readable, writable).unwrap();
                d.publish(mem).unwrap();
            }
            Driver::Packed(d) => {
                d.add_indirect(mem, table, readable, writable).unwrap();
                d.publish(mem).unwrap();
            }
        }
    }
}

/// A request whose indirect table the IOMMU never maps can be neither walked nor retried:
/// `discard_head` consumes it unread (a chain with no segments, so only length 0 may be
/// returned), its buffers keep their bytes, and the next request on the queue is served.
#[test]
fn a_head_whose_descriptors_never_map_is_discarded_and_the_queue_goes_on() {
    for packed in [false, true] {
        let (mut s, dview, mut driver, mut q) = rig_indirect(packed);
        s.map(IN_IOVA, 3);
        s.map(OUT_IOVA, 3);
        dview.write(OUT_IOVA, &[0xee; 16]).unwrap();
        // The table sits at OUT2_IOVA, which only the driver's view maps.
        driver.send_indirect(&dview, OUT2_IOVA, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);

        let err = q.pop_batch(&s.device.view(), 4).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((OUT2_IOVA, Access::Read)), "{err}");
        // Allowing holes in buffers does not help: the table itself is the hole.
        let view = s.device.view();
        let err = q.pop_with_holes(&view, None).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((OUT2_IOVA, Access::Read)), "{err}");
        assert!(!q.is_broken(), "packed {packed}");

        let c = q.discard_head(&view, None).unwrap().expect("a head");
        assert!(c.segments.is_empty());
        assert!(matches!(
            q.add_used_batch(&view, &[(c.head, 1)]),
            Err(VringError::InvalidUsed { .. })
        ));
        q.add_used_batch(&view, &[(c.head, 0)]).unwrap();
        assert_eq!(driver.used(&dview), vec![(c.head, 0)]);
        let mut back = [0u8; 16];
        s.mem.read(BUF_GPA + PAGE, &mut back).unwrap();
        assert_eq!(back, [0xee; 16], "its buffers untouched");
        assert!(
            q.discard_head(&view, None).unwrap().is_none(),
            "nothing left"
        );

        // The queue goes on: a request through mapped buffers is served.
        dview.write(IN_IOVA, b"next").unwrap();
        driver.send(&dview, &[(IN_IOVA, 4)], &[(OUT_IOVA, 16)]);
        let chains = q.pop_batch(&view, 4).unwrap();
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].read_all(&view, 64).unwrap(), b"next");
        assert_eq!(chains[0].write_all(&view, b"done").unwrap(), 4);
        q.add_used_batch(&view, &[(chains[0].head, 4)]).unwrap();
        assert_eq!(driver.used(&dview), vec![(chains[0].head, 4)]);
        s.mem.read(BUF_GPA + PAGE, &mut back[..4]).unwrap();
        assert_eq!(&back[..4], b"done");
    }
}

/// A request whose reply buffer the IOMMU never maps is popped with its hole: what is
/// mapped reads as usual, a write into the hole is the same miss (no byte written), and
/// the request is returned failed while the queue goes on.
#[test]
fn a_buffer_that_never_maps_is_popped_with_its_hole() {
    for packed in [false, true] {
        let (mut s, dview, mut driver, mut q) = rig(packed);
        s.map(IN_IOVA, 1);
        dview.write(IN_IOVA, b"request!").unwrap();
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);
        let view = s.device.view();
        let err = q.pop_batch(&view, 4).unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((OUT_IOVA, Access::Write)));

        let c = q.pop_with_holes(&view, None).unwrap().expect("a chain");
        assert_eq!(c.writable_len(), 16);
        assert_eq!(c.read_all(&view, 64).unwrap(), b"request!");
        let err = c.write_all(&view, b"reply").unwrap_err();
        assert_eq!(err.iotlb_miss(), Some((OUT_IOVA, Access::Write)), "{err}");
        q.add_used_batch(&view, &[(c.head, 0)]).unwrap();
        assert!(!q.is_broken());
        assert_eq!(driver.used(&dview), vec![(c.head, 0)]);

        s.map(OUT_IOVA, 3);
        driver.send(&dview, &[(IN_IOVA, 8)], &[(OUT_IOVA, 16)]);
        let view = s.device.view();
        let chains = q.pop_batch(&view, 4).unwrap();
        assert_eq!(chains[0].write_all(&view, b"ok").unwrap(), 2);
    }
}

/// Dirty logging behind an IOMMU: a completion marks the guest-physical pages the device
/// wrote, found through the IOTLB view it popped from, not the I/O virtual pages (which
/// here lie far past the end of guest memory, so marking them would be an error): a
/// reply crossing two entries that map to unrelated pages marks both, and the used ring,
/// logged at its I/O virtual log address, marks the ring's guest-physical page.
#[test]
fn a_write_through_the_iotlb_is_logged_at_its_guest_physical_pages() {
    use crate::memory::dirty_log::DirtyLog;
    const FAR_GPA: u64 = 0x9_0000;
    for packed in [false, true] {
        let (mut s, dview, mut driver, mut q) = rig(packed);
        s.map(IN_IOVA, 1);
        s.map(OUT_IOVA, 3);
        // The next I/O virtual page maps somewhere unrelated in guest memory.
        s.device
            .update(&s.mem, OUT2_IOVA, PAGE, s.uaddr + FAR_GPA, 3)
            .unwrap();
        let log = DirtyLog::allocate(0x10_0000).unwrap();
        // A reply buffer straddling the two entries.
        let reply = OUT_IOVA + PAGE / 2;
        driver.send(&dview, &[(IN_IOVA, 8)], &[(reply, PAGE as u32)]);
        let view = s.device.view();
        let chains = q.pop_batch(&view, 4).unwrap();
        let c = &chains[0];
        assert_eq!(c.write_all(&view, &[0xab; PAGE as usize]).unwrap(), 4096);
        let ring_log = RingLog {
            log: &log,
            // The used ring's log address is I/O virtual too (QEMU's used_phys).
            used_log_addr: Some(q_used_area(packed)),
            iova_view: Some(&view),
        };
        let from = q.used_position();
        ring_log.mark_buffers(&c.segments).unwrap();
        q.add_used_batch(&view, &[(c.head, 4096)]).unwrap();
        q.log_ring(&ring_log, from).unwrap();
        let dirty: Vec<u64> = log
            .take()
            .flat_map(|r| (r.start..r.end).step_by(PAGE as usize))
            .collect();
        assert_eq!(
            dirty,
            vec![RING_GPA, BUF_GPA + PAGE, FAR_GPA],
            "packed {packed}: the ring's page, then the reply's two pages"
        );
        // What the device wrote is where those pages say.
        let mut back = [0u8; 4];
        s.mem.read(FAR_GPA, &mut back).unwrap();
        assert_eq!(back, [0xab; 4]);
    }
}

/// The I/O virtual address of the used ring (split) or device area (packed) of the rig's
/// ring: what a front-end behind an IOMMU sends as the log address.
fn q_used_area(packed: bool) -> u64 {
    let layout = if packed {
        RingLayout::packed_at(8, RING_IOVA).unwrap()
    } else {
        RingLayout::split_at(8, RING_IOVA).unwrap()
    };
    layout.used_or_device()
}
