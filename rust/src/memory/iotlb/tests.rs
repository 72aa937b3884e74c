use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::memory::RegionInfo;
use crate::sys::dup_cloexec;

const PAGE: u64 = 0x1000;
const RO: u8 = 1;
const WO: u8 = 2;
const RW: u8 = 3;

/// Four pages of guest RAM at gpa 0x10_0000; returns the table and its front-end address.
fn ram() -> (GuestMemory, u64) {
    let mem = GuestMemory::allocate(&[(0x10_0000, 4 * PAGE)]).unwrap();
    let uaddr = mem.regions()[0].info().userspace_addr;
    (mem, uaddr)
}

#[test]
fn update_maps_iovas_onto_the_memory_table() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::new();
    // IOVA 0x8000_0000.. shows the second and third pages, in that order.
    tlb.update(&mem, 0x8000_0000, 2 * PAGE, u + PAGE, RW)
        .unwrap();
    let t = tlb.translate(0x8000_0010, Access::Write).unwrap();
    assert_eq!(t.gpa(), 0x10_1010);
    assert_eq!(t.uaddr(), u + PAGE + 0x10);
    assert_eq!(t.perm, Perm::ReadWrite);
    assert_eq!(t.last_offset, 3 * PAGE - 1);
    assert_eq!(t.host_ptr(), mem.translate(0x10_1010, 1).unwrap());

    let view = tlb.view();
    assert_eq!(view.address_space(), AddressSpace::IoVirtual);
    // Running past the mapping's end: a miss where the mapping stops.
    assert!(matches!(
        view.write_u32(0x8000_1ffe, 0xdead_beef),
        Err(MemoryError::IotlbMiss {
            iova: 0x8000_2000,
            access: Access::Write
        })
    ));
    view.write(0x8000_0ffe, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 4];
    mem.read(0x10_1ffe, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4], "the bytes landed at the translated gpa");
    mem.write_u64(0x10_2800, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(view.read_u64(0x8000_1800).unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(
        tlb.entries().collect::<Vec<_>>(),
        vec![(0x8000_0000, 2 * PAGE - 1, u + PAGE, Perm::ReadWrite)]
    );
}

#[test]
fn bad_updates_are_typed_errors_and_change_nothing() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::new();
    tlb.update(&mem, 0, PAGE, u, RW).unwrap();
    let before: Vec<_> = tlb.entries().collect();
    let cases: [(u64, u64, u64, u8, IotlbError); 8] = [
        (PAGE, 0, u, RW, IotlbError::ZeroSize { iova: PAGE }),
        (
            u64::MAX - 0xfff,
            0x1001,
            u,
            RW,
            IotlbError::Overflow {
                space: AddressSpace::IoVirtual,
                start: u64::MAX - 0xfff,
                size: 0x1001,
            },
        ),
        (
            PAGE,
            2,
            u64::MAX,
            RW,
            IotlbError::Overflow {
                space: AddressSpace::FrontendVirtual,
                start: u64::MAX,
                size: 2,
            },
        ),
        (PAGE, PAGE, u, 0, IotlbError::BadPerm(0)),
        (PAGE, PAGE, u, 4, IotlbError::BadPerm(4)),
        (PAGE, PAGE, u, 0xff, IotlbError::BadPerm(0xff)),
        // Runs one byte past the end of the table's only region.
        (
            PAGE,
            PAGE + 1,
            u + 3 * PAGE,
            RW,
            IotlbError::Unbacked {
                uaddr: u + 3 * PAGE,
                size: PAGE + 1,
                first: u + 4 * PAGE,
            },
        ),
        // Entirely outside it.
        (
            PAGE,
            PAGE,
            u.wrapping_sub(PAGE),
            RW,
            IotlbError::Unbacked {
                uaddr: u.wrapping_sub(PAGE),
                size: PAGE,
                first: u.wrapping_sub(PAGE),
            },
        ),
    ];
    for (iova, size, uaddr, perm, want) in cases {
        let err = tlb.update(&mem, iova, size, uaddr, perm).unwrap_err();
        assert_eq!(
            err, want,
            "update {iova:#x}+{size:#x} -> {uaddr:#x} perm {perm}"
        );
        assert!(!err.to_string().is_empty());
        assert_eq!(tlb.entries().collect::<Vec<_>>(), before);
    }
    assert_eq!(
        IotlbError::ZeroSize { iova: 0x42 }.to_string(),
        "IOTLB range at I/O virtual address 0x42 has size 0"
    );
    // Invalidations: size 0 and wrapping ranges likewise.
    assert_eq!(tlb.invalidate(0, 0), Err(IotlbError::ZeroSize { iova: 0 }));
    assert!(matches!(
        tlb.invalidate(2, u64::MAX),
        Err(IotlbError::Overflow { .. })
    ));
    assert_eq!(tlb.entries().collect::<Vec<_>>(), before);
}

#[test]
fn the_top_of_the_address_space_is_mappable() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::new();
    let top = u64::MAX - (PAGE - 1);
    tlb.update(&mem, top, PAGE, u, RW).unwrap();
    let t = tlb.translate(u64::MAX, Access::Read).unwrap();
    assert_eq!(t.uaddr(), u + PAGE - 1);
    assert_eq!(tlb.invalidate(u64::MAX, 1), Ok(1));
    assert!(matches!(
        tlb.translate(u64::MAX, Access::Read),
        Err(MemoryError::IotlbMiss {
            iova: u64::MAX,
            access: Access::Read
        })
    ));
    tlb.translate(u64::MAX - 1, Access::Read).unwrap();
    // A range of 2^64 - 1 bytes ending at u64::MAX is a valid IOVA range, but no memory
    // table backs it.
    assert!(matches!(
        tlb.update(&mem, 1, u64::MAX, u, RW),
        Err(IotlbError::Overflow {
            space: AddressSpace::FrontendVirtual,
            ..
        })
    ));
    // The view holds everything but the very last byte.
    tlb.update(&mem, top, PAGE, u, RW).unwrap();
    let view = tlb.view();
    view.write_u16(u64::MAX - 2, 0x1234).unwrap();
    assert_eq!(mem.read_u16(0x10_0000 + PAGE - 3).unwrap(), 0x1234);
    assert!(view.read(u64::MAX, &mut [0u8; 1]).is_err());
    // Invalidating the whole space empties the table.
    assert_eq!(tlb.invalidate(0, u64::MAX), Ok(PAGE - 1));
    tlb.invalidate(u64::MAX, 1).unwrap();
    assert!(tlb.is_empty());
}

#[test]
fn permissions_are_enforced_and_denied_writes_write_nothing() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::new();
    tlb.update(&mem, 0x1_0000, PAGE, u, RO).unwrap();
    tlb.update(&mem, 0x2_0000, PAGE, u + PAGE, WO).unwrap();
    tlb.update(&mem, 0x3_0000, PAGE, u + 2 * PAGE, RW).unwrap();
    mem.write(0x10_0000, &[0x5a; 16]).unwrap();
    let view = tlb.view();

    // A device write through the read-only mapping: denied, memory unchanged.
    let err = view.write(0x1_0000, &[0xff; 16]).unwrap_err();
    assert!(
        matches!(
            err,
            MemoryError::AccessDenied {
                space: AddressSpace::IoVirtual,
                addr: 0x1_0000,
                len: 16,
                access: Access::Write,
                perm: Perm::ReadOnly
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "device write at I/O virtual address 0x10000+0x10 denied: the mapping is read-only"
    );
    assert!(view.write_u16(0x1_0000, 1).is_err());
    assert!(view.write_u64(0x1_0008, 1).is_err());
    let mut back = [0u8; 16];
    mem.read(0x10_0000, &mut back).unwrap();
    assert_eq!(back, [0x5a; 16]);
    assert_eq!(view.read_u16(0x1_0000).unwrap(), 0x5a5a);
    view.check_access(0x1_0000, PAGE, Access::Read).unwrap();
    assert!(view.check_access(0x1_0000, PAGE, Access::Write).is_err());
    assert!(matches!(
        tlb.translate(0x1_0000, Access::Write),
        Err(MemoryError::AccessDenied {
            perm: Perm::ReadOnly,
            ..
        })
    ));

    // Write-only: the device may write but not read.
    view.write_u32(0x2_0000, 7).unwrap();
    assert_eq!(mem.read_u32(0x10_0000 + PAGE).unwrap(), 7);
    assert!(matches!(
        view.read_u32(0x2_0000),
        Err(MemoryError::AccessDenied {
            access: Access::Read,
            perm: Perm::WriteOnly,
            ..
        })
    ));
    view.check_access(0x3_0000, PAGE, Access::Write).unwrap();
    view.check_access(0x3_0000, PAGE, Access::Read).unwrap();

    // A memory table region allows both: the flat path is unchanged.
    mem.check_access(0x10_0000, 4 * PAGE, Access::Write)
        .unwrap();
}

#[test]
fn holes_in_a_view_are_misses_at_the_first_unmapped_address() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::new();
    let view = tlb.view();
    assert!(matches!(
        view.read_u16(0x1000),
        Err(MemoryError::IotlbMiss {
            iova: 0x1000,
            access: Access::Read
        })
    ));
    tlb.update(&mem, 0x1_0000, PAGE, u, RW).unwrap();
    let view = tlb.view();
    // Starts mapped, runs into the hole: the miss names the hole, not the start.
    let err = view.write(0x1_0ff0, &[0u8; 32]).unwrap_err();
    assert!(
        matches!(
            err,
            MemoryError::IotlbMiss {
                iova: 0x1_1000,
                access: Access::Write
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "no IOTLB translation for a device write at I/O virtual address 0x11000"
    );
    assert!(matches!(
        view.check_access(0x0_f000, 0x2000, Access::Read),
        Err(MemoryError::IotlbMiss { iova: 0xf000, .. })
    ));
    assert!(matches!(
        view.write_u64(0x1_0ffc, 0),
        Err(MemoryError::IotlbMiss { iova: 0x1_1000, .. })
    ));
    // A memory table still reports a hole as out of range, as before.
    assert!(matches!(
        mem.read_u16(0),
        Err(MemoryError::OutOfRange { addr: 0, len: 2 })
    ));
}

#[test]
fn invalidate_cuts_entries_and_later_updates_replace() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::new();
    tlb.update(&mem, 0x4_0000, 4 * PAGE, u, RW).unwrap();
    // A hole in the middle: two entries keep their own offsets.
    assert_eq!(tlb.invalidate(0x4_1000, PAGE), Ok(PAGE));
    assert_eq!(
        tlb.entries().collect::<Vec<_>>(),
        vec![
            (0x4_0000, PAGE - 1, u, Perm::ReadWrite),
            (0x4_2000, 2 * PAGE - 1, u + 2 * PAGE, Perm::ReadWrite),
        ]
    );
    assert!(tlb.translate(0x4_1000, Access::Read).is_err());
    assert_eq!(
        tlb.translate(0x4_2004, Access::Read).unwrap().uaddr(),
        u + 2 * PAGE + 4
    );
    // An update straddling the hole replaces what it covers, read-only now.
    tlb.update(&mem, 0x4_0800, 2 * PAGE, u + PAGE, RO).unwrap();
    assert_eq!(
        tlb.entries().collect::<Vec<_>>(),
        vec![
            (0x4_0000, 0x7ff, u, Perm::ReadWrite),
            (0x4_0800, 2 * PAGE - 1, u + PAGE, Perm::ReadOnly),
            (0x4_2800, 0x17ff, u + 2 * PAGE + 0x800, Perm::ReadWrite),
        ]
    );
    // Invalidating unmapped space is a no-op.
    assert_eq!(tlb.invalidate(0x100_0000, PAGE), Ok(0));
    assert_eq!(tlb.invalidate(0, u64::MAX), Ok(4 * PAGE));
    assert!(tlb.is_empty());
    assert!(tlb.view().regions().is_empty());
}

#[test]
fn an_update_may_span_regions_contiguous_in_front_end_space() {
    // One memfd mapped twice by the back-end, described as two regions whose front-end
    // addresses are contiguous but whose gpas are not.
    let front = GuestRegion::allocate(0, 2 * PAGE).unwrap();
    let info = |gpa, uaddr, off| RegionInfo {
        guest_phys_addr: gpa,
        memory_size: PAGE,
        userspace_addr: uaddr,
        mmap_offset: off,
    };
    let u = 0x7000_0000u64;
    let a = GuestRegion::map(info(0, u, 0), dup_cloexec(front.fd()).unwrap(), false).unwrap();
    let b = GuestRegion::map(
        info(0x100_0000, u + PAGE, PAGE),
        dup_cloexec(front.fd()).unwrap(),
        false,
    )
    .unwrap();
    let mem = GuestMemory::new(vec![Arc::new(a), Arc::new(b)]).unwrap();
    let mut tlb = Iotlb::new();
    tlb.update(&mem, 0x9000, 2 * PAGE, u, RW).unwrap();
    assert_eq!(tlb.len(), 2);
    assert_eq!(
        tlb.translate(0x9000 + PAGE, Access::Read).unwrap().gpa(),
        0x100_0000
    );
    // The view copies across the seam.
    tlb.view().write(0x9ffe, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 4];
    mem.read(PAGE - 2, &mut back[..2]).unwrap();
    mem.read(0x100_0000, &mut back[2..]).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
}

#[test]
fn an_old_view_keeps_its_memory_after_invalidation_and_table_changes() {
    let (mem, u) = ram();
    mem.write_u64(0x10_0008, 0x1122_3344_5566_7788).unwrap();
    let weak = Arc::downgrade(&mem.regions()[0]);
    let mut tlb = Iotlb::new();
    tlb.update(&mem, 0x5000, PAGE, u, RW).unwrap();
    let in_flight = tlb.view();

    // The IOMMU side unmaps and the front-end drops its memory table.
    tlb.invalidate(0x5000, PAGE).unwrap();
    assert_eq!(tlb.rebind(&GuestMemory::default()), 0);
    drop(mem);
    assert!(matches!(
        tlb.view().read_u64(0x5008),
        Err(MemoryError::IotlbMiss { iova: 0x5008, .. })
    ));
    // The chain popped before still completes against the mapping it saw.
    assert_eq!(in_flight.read_u64(0x5008).unwrap(), 0x1122_3344_5566_7788);
    in_flight.write_u64(0x5008, 1).unwrap();
    assert!(weak.upgrade().is_some());
    drop(in_flight);
    assert!(
        weak.upgrade().is_none(),
        "the mapping goes with the last view"
    );
}

#[test]
fn rebind_drops_entries_whose_memory_left_the_table() {
    let mem = GuestMemory::allocate(&[(0, PAGE), (0x10_0000, PAGE)]).unwrap();
    let (u0, u1) = (
        mem.regions()[0].info().userspace_addr,
        mem.regions()[1].info().userspace_addr,
    );
    let mut tlb = Iotlb::new();
    tlb.update(&mem, 0, PAGE, u0, RW).unwrap();
    tlb.update(&mem, PAGE, PAGE, u1, RO).unwrap();
    let (smaller, _removed) = mem.without_region(0x10_0000, PAGE).unwrap();
    assert_eq!(tlb.rebind(&smaller), 1);
    assert_eq!(
        tlb.entries().collect::<Vec<_>>(),
        vec![(0, PAGE - 1, u0, Perm::ReadWrite)]
    );
    assert!(tlb.translate(PAGE, Access::Read).is_err());
}

#[test]
fn the_table_is_bounded() {
    let (mem, u) = ram();
    let mut tlb = Iotlb::with_max_entries(3);
    for i in 0..3 {
        tlb.update(&mem, i * 2 * PAGE, PAGE, u, RO).unwrap();
    }
    assert_eq!(
        tlb.update(&mem, 0x100_0000, PAGE, u, RO),
        Err(IotlbError::Full { max: 3 })
    );
    // Invalidating is refused at the cap only when it would split an entry in two.
    assert_eq!(tlb.invalidate(0x1, 1), Err(IotlbError::Full { max: 3 }));
    tlb.invalidate(0, PAGE).unwrap();
    tlb.update(&mem, 0x100_0000, PAGE, u, RO).unwrap();
    assert_eq!(tlb.len(), 3);
}

#[test]
fn views_stay_valid_while_another_thread_invalidates() {
    let (mem, u) = ram();
    mem.write(0x10_0000, &[0xab; 4 * PAGE as usize]).unwrap();
    let tlb = std::sync::Mutex::new(Iotlb::new());
    tlb.lock()
        .unwrap()
        .update(&mem, 0, 4 * PAGE, u, RW)
        .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // A worker: takes a view per "chain", reads through it to the end.
            for _ in 0..2000 {
                let view = tlb.lock().unwrap().view();
                let mut buf = [0u8; 64];
                match view.read(PAGE, &mut buf) {
                    Ok(()) => assert_eq!(buf, [0xab; 64]),
                    Err(MemoryError::IotlbMiss { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        });
        for i in 0..2000u64 {
            let mut t = tlb.lock().unwrap();
            if i % 2 == 0 {
                t.invalidate(PAGE, PAGE).unwrap();
            } else {
                t.update(&mem, PAGE, PAGE, u + PAGE, RW).unwrap();
            }
        }
    });
}

/// A 64-bit LCG (Knuth's MMIX constants), high bits out: reproducible pseudo-random
/// numbers without a dependency.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Property test against a byte-by-byte model: random updates (some invalid) and
/// invalidations in two small windows, one at address 0 and one ending at `u64::MAX`, with
/// overlaps, splits and merges; after each step every address of both windows translates
/// (for reads and writes) exactly as the model says, in the table and in its view, and the
/// entries stay sorted, disjoint and non-empty.
#[test]
fn random_updates_and_invalidations_match_a_byte_model() {
    const SPAN: u64 = 96;
    let (mem, u) = ram();
    let bases = [0u64, u64::MAX - (SPAN - 1)];
    for seed in 1..=24u64 {
        let mut rng = Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut tlb = Iotlb::new();
        let mut model: BTreeMap<u64, (u64, Perm)> = BTreeMap::new();
        for step in 0..300 {
            let base = bases[rng.below(2) as usize];
            let start = base + rng.below(SPAN);
            // Sizes up to past the window's end, so ranges at the top may wrap.
            let size = rng.below(SPAN / 2 + 2);
            let ctx = format!("seed {seed} step {step}: {start:#x}+{size:#x}");
            if rng.below(3) == 0 {
                let r = tlb.invalidate(start, size);
                match start.checked_add(size.wrapping_sub(1)) {
                    _ if size == 0 => assert_eq!(r, Err(IotlbError::ZeroSize { iova: start })),
                    None => assert!(matches!(r, Err(IotlbError::Overflow { .. })), "{ctx}"),
                    Some(last) => {
                        let before = model.len() as u64;
                        model.retain(|&a, _| a < start || a > last);
                        assert_eq!(r, Ok(before - model.len() as u64), "{ctx}");
                    }
                }
            } else {
                // Offsets past the region's end (4 pages) give unbacked ranges.
                let off = if rng.below(8) == 0 {
                    4 * PAGE - rng.below(SPAN)
                } else {
                    rng.below(2 * PAGE)
                };
                let perm = rng.below(5) as u8;
                let r = tlb.update(&mem, start, size, u + off, perm);
                let valid = size != 0
                    && start.checked_add(size - 1).is_some()
                    && (1..=3).contains(&perm)
                    && off + size <= 4 * PAGE;
                assert_eq!(r.is_ok(), valid, "{ctx} off {off:#x} perm {perm}: {r:?}");
                if valid {
                    let p = Perm::from_bits(perm).unwrap();
                    for i in 0..size {
                        model.insert(start + i, (u + off + i, p));
                    }
                }
            }
            check_against_model(&tlb, &model, &bases, SPAN, &ctx);
        }
    }
}

fn check_against_model(
    tlb: &Iotlb,
    model: &BTreeMap<u64, (u64, Perm)>,
    bases: &[u64],
    span: u64,
    ctx: &str,
) {
    let entries: Vec<_> = tlb.entries().collect();
    for pair in entries.windows(2) {
        assert!(pair[0].0 + pair[0].1 < pair[1].0, "{ctx}: {pair:x?}");
    }
    let view = tlb.view();
    for &base in bases {
        for iova in base..=base + (span - 1) {
            let want = model.get(&iova);
            for access in [Access::Read, Access::Write] {
                let got = tlb.translate(iova, access);
                let in_view = view.check_access(iova, 1, access);
                match want {
                    None => {
                        assert!(
                            matches!(got, Err(MemoryError::IotlbMiss { iova: i, access: a }) if i == iova && a == access),
                            "{ctx}: {iova:#x} {got:?}"
                        );
                        assert!(
                            matches!(in_view, Err(MemoryError::IotlbMiss { iova: i, .. }) if i == iova),
                            "{ctx}: {iova:#x} {in_view:?}"
                        );
                    }
                    Some(&(uaddr, perm)) if perm.allows(access) => {
                        let t = got.unwrap_or_else(|e| panic!("{ctx}: {iova:#x}: {e}"));
                        assert_eq!((t.uaddr(), t.perm), (uaddr, perm), "{ctx}: {iova:#x}");
                        if iova != u64::MAX {
                            in_view.unwrap_or_else(|e| panic!("{ctx}: {iova:#x}: {e}"));
                            assert_eq!(
                                view.translate(iova, 1).unwrap(),
                                t.host_ptr(),
                                "{ctx}: {iova:#x}"
                            );
                        }
                    }
                    Some(&(_, perm)) => {
                        assert!(
                            matches!(got, Err(MemoryError::AccessDenied { perm: p, .. }) if p == perm),
                            "{ctx}: {iova:#x} {got:?}"
                        );
                        if iova != u64::MAX {
                            assert!(
                                matches!(in_view, Err(MemoryError::AccessDenied { .. })),
                                "{ctx}: {iova:#x} {in_view:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
