"""The disk tier's storage: one file per block in a directory, each checksummed.

File `<chain hash as 16 hex digits>.kvb`:
    header   magic b"PDKVBLK1", u64 chain hash, u64 layout fingerprint (block_format.Geometry),
             u64 payload bytes, u32 crc32 of (the header's first 32 bytes + the payload)   little-endian
    payload  block_format's bytes: data, then scales
A file is written under a temporary name and renamed into place, so a crash leaves either the whole
file or none (a leftover temporary is removed by `scan`). `read` and `scan` check everything: a file
whose name, hash, layout, length or checksum is wrong is corrupt, and is deleted.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from pdcluster.kv_transfer.crc import crc32
from pdcluster.kv_transfer.tiers.block_format import Geometry, from_bytes, to_bytes

MAGIC = b"PDKVBLK1"
HEADER = struct.Struct("<8sQQQI")       # magic, hash, fingerprint, payload bytes, crc
SUFFIX = ".kvb"


class CorruptBlock(Exception):
    """A block file failed its checks (it has been deleted)."""


class DiskStore:
    def __init__(self, directory: str | os.PathLike, geom: Geometry):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.geom = geom
        self._fp = geom.fingerprint()

    @property
    def file_bytes(self) -> int:
        return HEADER.size + self.geom.block_bytes

    def path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}{SUFFIX}"

    def write(self, block_hash: int, data: torch.Tensor, scales: torch.Tensor | None) -> int:
        """Write one encoded block (block_format.encode's output); its file's bytes."""
        bufs = to_bytes(data, scales)
        head = HEADER.pack(MAGIC, block_hash, self._fp, self.geom.block_bytes, 0)[:HEADER.size - 4]
        c = crc32(head)
        for b in bufs:
            c = crc32(b, c)
        final = self.path(block_hash)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(head + struct.pack("<I", c))
            for b in bufs:
                f.write(b)
        os.replace(tmp, final)
        return HEADER.size + self.geom.block_bytes

    def read(self, block_hash: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, scales) of block_hash's file, checked. CorruptBlock (file deleted) or FileNotFoundError."""
        p = self.path(block_hash)
        with open(p, "rb") as f:
            raw = bytearray(f.read(self.file_bytes + 1))
        why = self._check(block_hash, raw)
        if why is not None:
            self.delete(block_hash)
            raise CorruptBlock(f"{p.name}: {why}")
        return from_bytes(self.geom, memoryview(raw)[HEADER.size:])

    def delete(self, block_hash: int) -> None:
        try:
            self.path(block_hash).unlink()
        except FileNotFoundError:
            pass

    def scan(self) -> tuple[list[int], int]:
        """Warm restart: (hashes of the intact files, oldest first by mtime; corrupt files deleted).
        Every file is read and checked."""
        good, bad = [], 0
        entries = []
        for p in self.dir.iterdir():
            if p.name.endswith(".tmp"):             # a write cut short
                p.unlink(missing_ok=True)
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                h = int(p.name[:-len(SUFFIX)], 16)
                entries.append((p.stat().st_mtime_ns, h, p))
            except (ValueError, OSError):
                p.unlink(missing_ok=True)
                bad += 1
        for _, h, p in sorted(entries):
            try:
                with open(p, "rb") as f:
                    raw = f.read(self.file_bytes + 1)
            except OSError:
                raw = b""
            if self._check(h, raw) is None:
                good.append(h)
            else:
                p.unlink(missing_ok=True)
                bad += 1
        return good, bad

    def _check(self, block_hash: int, raw) -> str | None:
        if len(raw) != self.file_bytes:
            return f"{len(raw)} bytes, expected {self.file_bytes}"
        magic, h, fp, n, c = HEADER.unpack_from(raw)
        if magic != MAGIC:
            return "bad magic"
        if h != block_hash:
            return "hash does not match the file name"
        if fp != self._fp or n != self.geom.block_bytes:
            return "written under another KV layout (model, dtype or codec)"
        mv = memoryview(raw)
        if crc32(mv[HEADER.size:], crc32(mv[:HEADER.size - 4])) != c:
            return "checksum mismatch"
        return None
