"""Property tests (hypothesis) of the Python virtqueue API, split and packed.

(a) A device queue over arbitrary bytes in its descriptor table and avail ring either
    yields chains whose every segment lies in guest memory, or raises QueueError /
    InvalidMemoryError and stays broken.
(b) Random driver/device interleavings keep the ring bookkeeping: every offered head
    completes exactly once, with the length the device reported, and the queue ends empty.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vhost import GuestMemory
from vhost.errors import InvalidMemoryError, QueueError
from vhost.virtio import DeviceQueue, Virtqueue, place_rings, ring_sizes

pytestmark = pytest.mark.timeout(300)

MEM_SIZE = 0x4000
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FORMATS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


# -- (a) hostile ring contents ------------------------------------------------------------


# Descriptor fields drawn near the interesting values, so that valid chains (and chains
# that just miss being valid) are common, not only noise.
_ADDR = st.one_of(
    st.integers(0, MEM_SIZE),
    st.integers(MEM_SIZE - 64, MEM_SIZE + 64),
    st.integers(0, 2**64 - 1),
)
_LEN = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 0x1000, MEM_SIZE, 2**32 - 1]))
_FLAGS = st.one_of(
    st.integers(0, 7).map(lambda f: f | 0x80),  # NEXT/WRITE/INDIRECT, packed AVAIL
    st.integers(0, 0xFFFF),
)
_DESC = st.builds(
    lambda a, n, f, nx: struct.pack("<QIHH", a, n, f, nx),
    _ADDR,
    _LEN,
    _FLAGS,
    st.integers(0, 17),
)
_AVAILABLE_DESC = st.builds(  # packed: AVAIL set, USED clear (available in wrap 1)
    lambda a, n, f, i: struct.pack("<QIHH", a, n, i, f | 0x80),  # addr len id flags
    _ADDR,
    _LEN,
    st.integers(0, 7),
    st.integers(0, 17),
)
_PLAUSIBLE_SPLIT = st.builds(  # in-memory buffers, NEXT/WRITE only, next in range
    lambda a, n, f, nx: struct.pack("<QIHH", a, n, f, nx),
    st.integers(0x2000, 0x3000),
    st.integers(1, 64),
    st.sampled_from([0, 0, 2, 1, 3]),
    st.integers(0, 15),
)
_PLAUSIBLE_PACKED = st.builds(  # packed: available, in-memory buffers, mostly single
    lambda a, n, i, f: struct.pack("<QIHH", a, n, i, 0x80 | f),
    st.integers(0x2000, 0x3000),
    st.integers(1, 64),
    st.integers(0, 15),
    st.sampled_from([0, 2, 0, 2, 1, 3]),
)
_TABLE = st.one_of(
    st.binary(max_size=16 * 16),
    st.lists(_PLAUSIBLE_PACKED, min_size=1, max_size=16).map(b"".join),
    st.lists(_PLAUSIBLE_SPLIT, min_size=1, max_size=16).map(b"".join),
    st.lists(_DESC, max_size=16).map(b"".join),
    st.lists(_AVAILABLE_DESC, min_size=1, max_size=16).map(b"".join),
)
_AVAIL = st.one_of(
    st.binary(max_size=6 + 2 * 16),
    st.lists(st.integers(0, 15), min_size=1, max_size=16).map(
        lambda ring: struct.pack(f"<HH{len(ring)}H", 0, len(ring), *ring)
    ),
    st.lists(st.integers(0, 17), max_size=16).flatmap(
        lambda ring: st.builds(
            lambda flags, idx: struct.pack(f"<HH{len(ring)}H", flags, idx, *ring),
            st.integers(0, 1),
            st.one_of(st.just(len(ring)), st.integers(0, 0xFFFF)),
        )
    ),
)


@FORMATS
@SETTINGS
@given(
    size_log=st.integers(min_value=0, max_value=4),
    desc_bytes=_TABLE,
    avail_bytes=_AVAIL,
    indirect=st.booleans(),
    event_idx=st.booleans(),
    rounds=st.integers(min_value=1, max_value=4),
    batch=st.integers(min_value=1, max_value=64),
)
def test_pop_batch_on_random_rings(  # noqa: PLR0917 - hypothesis arguments
    packed: bool,
    size_log: int,
    desc_bytes: bytes,
    avail_bytes: bytes,
    indirect: bool,
    event_idx: bool,
    rounds: int,
    batch: int,
) -> None:
    size = 1 << size_log
    mem = GuestMemory.allocate([(0, MEM_SIZE)])
    desc, avail, used = place_rings(0, size, packed)
    desc_len, avail_len, _ = ring_sizes(size, packed)
    mem.write(desc, desc_bytes[:desc_len])
    mem.write(avail, avail_bytes[:avail_len])
    dq = DeviceQueue(
        mem, size, desc, avail, used, packed=packed, event_idx=event_idx, indirect=indirect
    )
    for _ in range(rounds):
        try:
            chains = dq.pop_batch(batch)
        except (QueueError, InvalidMemoryError) as exc:
            event(f"error: {type(exc).__name__}")
            assert dq.broken
            with pytest.raises((QueueError, InvalidMemoryError)):
                dq.pop_batch(batch)
            assert dq.broken
            return
        assert len(chains) <= min(batch, size)
        event("chains" if chains else "empty")
        for chain in chains:
            assert 0 <= chain.head < size
            # Zero-length descriptors carry no segment: a chain of them has none.
            assert len(chain) == len(chain.segments)
            readable = writable = 0
            for gpa, length, write in chain.segments:
                assert mem.contains(gpa, length), (hex(gpa), length)
                if write:
                    writable += length
                else:
                    readable += length
            assert chain.readable_len == readable
            assert chain.writable_len == writable
        # Return them (length 0) so the next round looks at fresh slots.
        dq.add_used_batch([(c.head, 0) for c in chains])
        assert not dq.broken


# -- (b) driver/device interleavings -------------------------------------------------------

DATA_BASE = 0x2000
DATA_END = MEM_SIZE


@FORMATS
@SETTINGS
@given(
    size_log=st.integers(min_value=0, max_value=4),
    event_idx=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    steps=st.integers(min_value=1, max_value=120),
)
def test_random_driver_device_interleavings(
    packed: bool, size_log: int, event_idx: bool, seed: int, steps: int
) -> None:
    rng = random.Random(seed)
    size = 1 << size_log
    mem = GuestMemory.allocate([(0, MEM_SIZE)])
    rings = place_rings(0, size, packed)
    vq = Virtqueue(mem, size, *rings, packed=packed, event_idx=event_idx)
    dq = DeviceQueue(mem, size, *rings, packed=packed, event_idx=event_idx)

    offered: dict[int, list[tuple[int, int, bool]]] = {}  # head -> segments, driver view
    popped: dict[int, int] = {}  # head -> writable_len, device side, not yet used
    reported: dict[int, int] = {}  # head -> used length the device wrote
    completed: list[tuple[int, int]] = []
    added = 0

    def segs(n: int, write: bool) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            length = rng.randint(1, 256)
            gpa = rng.randint(DATA_BASE, DATA_END - length)
            out.append((gpa, length))
        del write
        return out

    def poll() -> None:
        for head, length in vq.poll_used():
            assert head in reported, f"head {head} completed but never used by the device"
            assert length == reported.pop(head)
            completed.append((head, length))

    def device_step() -> None:
        for chain in dq.pop_batch(rng.randint(1, size)):
            assert chain.head in offered
            assert chain.head not in popped and chain.head not in reported
            assert chain.segments == offered.pop(chain.head)
            popped[chain.head] = chain.writable_len
        done = [h for h in popped if rng.random() < 0.6]
        rng.shuffle(done)
        used = [(h, rng.randint(0, popped.pop(h))) for h in done]
        if used:
            dq.add_used_batch(used)
            reported.update(used)

    for _ in range(steps):
        op = rng.randrange(4)
        if op == 0:
            nr, nw = rng.randint(0, 3), rng.randint(0, 3)
            if nr + nw == 0:
                nw = 1
            if vq.num_free >= nr + nw or (vq.num_free >= 1 and vq.num_free == size):
                readable, writable = segs(nr, False), segs(nw, True)
                try:
                    head = vq.add(readable, writable)
                except QueueError:
                    continue  # no room (the queue said so): nothing was offered
                assert head not in offered and head not in popped and head not in reported
                offered[head] = [(g, n, False) for g, n in readable] + [
                    (g, n, True) for g, n in writable
                ]
                added += 1
        elif op == 1:
            vq.publish()
        elif op == 2:
            device_step()
        else:
            poll()
        assert not vq.broken and not dq.broken
        assert 0 <= vq.num_free <= size

    # Drain: publish everything, the device completes all, the driver collects all.
    vq.publish()
    for _ in range(4 * size + 4):
        if not (offered or popped or reported):
            break
        device_step()
        for h in list(popped):
            dq.add_used_batch([(h, popped[h])])
            reported[h] = popped.pop(h)
        poll()
    poll()
    assert not offered and not popped and not reported
    assert len(completed) == added
    event(f"completed {min(added, 10)}+" if added >= 10 else f"completed {added}")
    assert vq.in_flight == 0
    assert vq.num_free == size
