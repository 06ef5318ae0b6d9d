"""The disk tier's files (kv_transfer/tiers/disk.py) on their own: whole pages written past the page cache
(O_DIRECT) where the filesystem allows it, through it where it refuses, bit for bit either way, and every
byte of a file under a checksum or checked to be zero."""
import errno
import os

import pytest
import torch

from pdcluster.kv_transfer.tiers import disk as disk_mod
from pdcluster.kv_transfer.tiers.block_format import Geometry
from pdcluster.kv_transfer.tiers.disk import PAGE, CorruptBlock, DiskStore

L, BS, H, D = 3, 4, 2, 8
GEOM = Geometry(L, BS, H, D, torch.float32)
QGEOM = Geometry(L, BS, H, D, torch.float32, codec="int8")


def staging(n=3, seed=0):
    """A copy-out's staging [2L, n, bs, h, d]: block i is staging[:, i], not contiguous."""
    return torch.randn(2 * L, n, BS, H, D, generator=torch.Generator().manual_seed(seed))


def test_a_block_file_is_whole_pages_and_reads_back_bit_for_bit_from_a_strided_view(tmp_path):
    store = DiskStore(tmp_path, GEOM)
    st = staging()
    for i in range(3):
        assert store.write(100 + i, st[:, i], None) == store.file_bytes
    assert store.file_bytes % PAGE == 0 and store.header_bytes == PAGE
    for i in range(3):
        data, scales = store.read(100 + i)
        assert scales is None and torch.equal(data, st[:, i])
        assert os.path.getsize(store.path(100 + i)) == store.file_bytes
    assert store.scan() == (sorted([100, 101, 102], key=lambda h: os.stat(store.path(h)).st_mtime_ns), 0)
    assert not list(tmp_path.glob("*.tmp"))


def test_codes_and_scales_round_trip_and_the_payload_ends_in_zero_padding(tmp_path):
    store = DiskStore(tmp_path, QGEOM)
    codes = torch.randint(-127, 128, (2 * L, BS, H, D), dtype=torch.int8)
    scales = torch.rand(2 * L, H)
    store.write(7, codes, scales)
    data, sc = store.read(7)
    assert torch.equal(data, codes) and torch.equal(sc, scales)
    raw = store.path(7).read_bytes()
    assert len(raw) == store.file_bytes and raw[store.header_bytes + QGEOM.block_bytes:] == bytes(
        store.file_bytes - store.header_bytes - QGEOM.block_bytes)


def test_a_filesystem_that_refuses_o_direct_gets_page_cache_writes(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open, opened = os.open, []

    def no_direct(path, flags, mode=0o777):
        opened.append(bool(flags & os.O_DIRECT))
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(disk_mod.os, "open", no_direct)
    store = DiskStore(tmp_path, GEOM)
    st = staging()
    store.write(1, st[:, 0], None)
    store.write(2, st[:, 1], None)
    assert opened == [True, False, False] and not store.direct          # asked once, then page cache only
    assert torch.equal(store.read(1)[0], st[:, 0]) and torch.equal(store.read(2)[0], st[:, 1])


def test_other_write_errors_are_not_taken_for_a_refusal(tmp_path, monkeypatch):
    def full(path, flags, mode=0o777):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_mod.os, "open", full)
    store = DiskStore(tmp_path, GEOM)
    with pytest.raises(OSError, match="No space"):
        store.write(1, staging()[:, 0], None)
    assert store.direct == hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("where, why", [(40, "header checksum mismatch"), (PAGE - 2, "header checksum mismatch"),
                                        (-1, "nonzero padding")])
def test_a_flipped_byte_in_header_padding_or_tail_padding_is_corrupt(tmp_path, where, why):
    store = DiskStore(tmp_path, QGEOM)                                  # int8: 1,488 payload bytes, a padded page
    store.write(9, torch.zeros(2 * L, BS, H, D, dtype=torch.int8), torch.ones(2 * L, H))
    raw = bytearray(store.path(9).read_bytes())
    raw[where] ^= 0x01
    store.path(9).write_bytes(raw)
    with pytest.raises(CorruptBlock, match=why):
        store.read(9)
    assert not store.path(9).exists()
