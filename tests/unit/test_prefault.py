"""engine/prefault.py: the KV pool's first blocks are faulted in without their contents changing, within the
byte limit, and nothing happens where there is nothing to do."""
import mmap
import sys

import pytest
import torch

from pdcluster.engine.prefault import prefault

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE): Linux")


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _fresh(nbytes: int) -> torch.Tensor:
    """Fresh anonymous zero pages, not yet faulted in, as model_runner._zeros's pool is in a fresh process (here
    mmap'd directly: in a long test process calloc may hand back memory already resident)."""
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def test_it_faults_in_the_first_bytes_of_each_tensor_and_keeps_their_values():
    a, b = _fresh(96 << 20), _fresh(96 << 20)
    a[5] = 7                                            # written before: kept
    before = _rss()
    th = prefault([a, b], limit=128 << 20)              # 64 MiB of each (of 96)
    th.join(timeout=60)
    grown = _rss() - before
    assert 120 << 20 <= grown <= 140 << 20, grown       # 192 MiB would mean the limit was ignored; ~0, nothing done
    assert a[5] == 7 and int(a.sum()) == 7 and int(b.sum()) == 0


def test_nothing_to_do_is_no_thread():
    assert prefault([]) is None
    assert prefault([torch.zeros(4)], limit=0) is None
    assert prefault([torch.zeros(0)]) is None
    assert prefault([torch.zeros(1 << 20)], background=False) is None   # done in the caller's thread
