"""engine/hugepages.py: arena views are sound tensors, and where the host allows, huge pages back them."""
import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch

from pdcluster.engine.hugepages import ALIGN, HUGE, SMALL, Arena

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of transparent huge pages (always / madvise / never), None where there are none."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def vm_flags_at(addr: int) -> set[str]:
    """VmFlags of the mapping holding addr, from /proc/self/smaps ("hg": advised for huge pages)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return set()


def test_views_are_aligned_disjoint_and_hold_what_is_written():
    a = Arena()
    ts = [a.empty((300, 257), torch.float32), a.empty((1000, 100), torch.int8), a.empty((512, 64), torch.float32)]
    for i, t in enumerate(ts):
        assert t.is_contiguous() and t.data_ptr() % ALIGN == 0
        t.fill_(i + 1)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in ts)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    assert [int(t.float().mean()) for t in ts] == [1, 2, 3]


def test_a_tensor_larger_than_a_quarter_chunk_gets_its_own_huge_aligned_chunk():
    a = Arena(chunk=8 * HUGE)
    if a._madvise is None:
        pytest.skip("no madvise here (not Linux, or PDCLUSTER_HUGEPAGES=0)")
    big = a.empty((3 * HUGE // 4,), torch.float32)
    assert big.data_ptr() % HUGE == 0 and big.numel() == 3 * HUGE // 4
    small = a.empty((SMALL // 4,), torch.float32)
    assert small.data_ptr() % HUGE == 0                 # the first view of the shared chunk


def test_small_tensors_and_the_off_switch_use_torchs_allocator(monkeypatch):
    a = Arena()
    t = a.empty((10,), torch.float32)
    assert t.shape == (10,) and a.huge_bytes == 0
    monkeypatch.setenv("PDCLUSTER_HUGEPAGES", "0")
    off = Arena()
    assert off._madvise is None
    t = off.empty((HUGE,), torch.float32)
    assert t.shape == (HUGE,) and off.huge_bytes == 0


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off on this host")
def test_a_chunk_is_advised_for_huge_pages():
    """Whether the kernel finds free huge pages when the chunk is touched depends on the host's memory at that
    moment; the advice itself is what the arena controls."""
    a = Arena()
    if a._madvise is None:
        pytest.skip("no madvise here (PDCLUSTER_HUGEPAGES=0)")
    t = a.empty((HUGE,), torch.float32)                # 8 MiB
    t.fill_(1.0)
    assert a.huge_bytes >= HUGE * 4
    assert "hg" in vm_flags_at(t.data_ptr())
    # The control is a fresh mapping of its own, not torch.empty: malloc may hand out heap memory that another
    # library advised earlier in this process (numpy advises its large arrays), and a CI run once got such memory.
    plain = torch.frombuffer(mmap.mmap(-1, 4 * HUGE), dtype=torch.uint8)
    plain.fill_(1)
    assert "hg" not in vm_flags_at(plain.data_ptr())


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(int(lo, 16) <= addr < int(hi, 16) for lo, hi in (line.split()[0].split("-") for line in f))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")
def test_a_chunk_is_a_mapping_of_its_own_unmapped_with_its_last_view():
    """Not malloc's heap: the advice must not stay on memory that malloc hands out again."""
    a = Arena()
    if a._madvise is None:
        pytest.skip("no madvise here (PDCLUSTER_HUGEPAGES=0)")
    t = a.empty((40 << 20,), torch.uint8)            # over CHUNK / 4: a chunk of its own
    t.fill_(1)
    addr = t.data_ptr()
    assert addr % HUGE == 0 and _mapped(addr)
    del t
    gc.collect()
    assert not _mapped(addr)
