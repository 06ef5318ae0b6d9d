"""The disk tier's storage: one file per block in a directory, each row checksummed.

File `<chain hash as 16 hex digits>.kvb`, a whole number of 4 KiB pages:
    header   magic b"PDKVBLK3", u64 chain hash, u64 layout fingerprint (block_format.Geometry),
             u64 payload bytes, 2L x u32 row crc32s, zeros to the end of its page(s) but 4 bytes, then
             u32 crc32 of everything before it                                         little-endian
    payload  block_format's bytes: data [2L, bs, h, d], then scales [2L, h] (quantized codecs), then
             zeros to the end of the last page
Row r (K of layer r, r < L; V of layer r - L) has its own crc32, over its data bytes then its scale
bytes, so one layer (rows l and L + l) is checked without reading the others: a layer-wise load
(`open_rows`) verifies each layer before it is used. Every byte is under a checksum (the header's
over its page, the rows' over the payload) or checked to be zero (the tail).
Files are written with O_DIRECT from a page-aligned buffer, past the page cache: through it, each
block cost the writer thread a kernel copy into freshly allocated cache pages (on the 2-core bench
host, most of the writer threads' ~5% of all CPU in a trace replay, taken from the engine threads;
bench/RESULTS.md). Where the filesystem refuses O_DIRECT (tmpfs, some FUSE), writes go through the
page cache. Reads stay buffered.
A file is written under a temporary name and renamed into place, so a crash leaves either the whole
file or none (a leftover temporary is removed by `scan`). `read`, `scan` and `open_rows` check what
they read: a file whose name, hash, layout, length or checksum is wrong is corrupt, and is deleted;
so is one that cannot be read (EIO: a bad sector is a bad block), or is not a regular file (a FIFO,
which would block the open, a device, a symlink out of the directory). A failed write leaves no file.
The directory is one process's: `lock` takes a flock on its .lock file (released by `unlock`, when the
store is collected, or at exit; a forked child drops its copy of the descriptor).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import struct
import threading
import weakref
from pathlib import Path

import torch

from pdcluster.kv_transfer.crc import crc32
from pdcluster.kv_transfer.tiers.block_format import Geometry, from_bytes

log = logging.getLogger("pdcluster.kv_transfer.tiers.disk")

MAGIC = b"PDKVBLK3"
HEADER = struct.Struct("<8sQQQ")        # magic, hash, fingerprint, payload bytes (then row crcs, header crc)
SUFFIX = ".kvb"
LOCK = ".lock"              # held (flock) by the one process whose disk tier the directory is
_TMP = re.compile(r"\.[0-9a-f]{16}\.kvb\.\d+\.tmp")     # write()'s temporary names: the only .tmp scan removes
PAGE = 4096                             # file layout unit: O_DIRECT wants offsets and lengths aligned to it


def _open_file(path: Path):
    """path opened for reading (binary) if it is a regular file. A FIFO would block the open (a scan at
    start would never end), a device read a foreign stream, a symlink point outside the directory:
    OSError for those (ELOOP, EINVAL), as for an unreadable file; FileNotFoundError if none is there."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)    # (no effect on a regular file's reads)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_LOCKED: "weakref.WeakSet[DiskStore]" = weakref.WeakSet()     # stores holding their directory's flock


def _drop_locks_in_child() -> None:
    """After fork, in the child: close its copies of the lock descriptors. A flock belongs to the open
    file description, which fork shares: a child (a multiprocessing pool's worker) kept the directory
    locked after the parent's engine closed it, until the child exited. The parent keeps its lock."""
    for store in list(_LOCKED):
        store._release_fd()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _pages(n: int) -> int:
    """n bytes rounded up to whole pages."""
    return -(-n // PAGE) * PAGE


class CorruptBlock(Exception):
    """A block file failed its checks, or is gone (a corrupt one has been deleted)."""

    def __init__(self, msg: str, block_hash: int):
        super().__init__(msg)
        self.block_hash = block_hash


class DiskStore:
    def __init__(self, directory: str | os.PathLike, geom: Geometry):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.geom = geom
        self._fp = geom.fingerprint()
        self.rows = 2 * geom.num_layers
        self.row_data = geom.data_bytes // self.rows          # one row's data bytes
        self.row_scale = geom.scale_bytes // self.rows        # one row's scale bytes (0: codec none)
        self._crcs = struct.Struct(f"<{self.rows}I")
        self.head = _pages(HEADER.size + self._crcs.size + 4)   # header bytes (header_bytes, as a plain attribute)
        self._file_bytes = _pages(self.head + geom.block_bytes)  # header page(s), payload padded to whole pages
        self.direct = hasattr(os, "O_DIRECT")                   # False once the filesystem refuses it
        self._local = threading.local()                         # each writing thread's page-aligned buffer
        self._lock_fd: int | None = None                        # lock()'s descriptor
        self._lock_closer = None                                # closes it when the store is collected

    def lock(self) -> None:
        """Claim the directory for this process (flock on its .lock file) until unlock() or exit: two
        tiers in one directory would evict, and scan away, each other's files. RuntimeError if held."""
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"KV disk tier directory {self.dir} is in use by another engine (each worker or "
                               "offline LLM needs its own --kv-disk-cache-dir)") from None
        self._lock_fd = fd
        self._lock_closer = weakref.finalize(self, os.close, fd)    # a store dropped unclosed frees it too
        _LOCKED.add(self)

    def unlock(self) -> None:
        _LOCKED.discard(self)
        self._release_fd()                  # (closing the descriptor releases the flock)

    def _release_fd(self) -> None:
        closer, self._lock_fd, self._lock_closer = self._lock_closer, None, None
        if closer is not None:
            closer()

    @property
    def header_bytes(self) -> int:
        return self.head

    @property
    def file_bytes(self) -> int:
        return self._file_bytes

    def path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}{SUFFIX}"

    def write(self, block_hash: int, data: torch.Tensor, scales: torch.Tensor | None) -> int:
        """Write one encoded block (block_format.encode's output; any strides); its file's bytes."""
        buf, bufs, pdata, pscales = self._buffer()
        pdata.copy_(data)                       # the one copy: staging -> the aligned buffer
        if scales is not None:
            pscales.copy_(scales)
        crcs = [self._row_crc(bufs, r) for r in range(self.rows)]
        HEADER.pack_into(buf, 0, MAGIC, block_hash, self._fp, self.geom.block_bytes)
        self._crcs.pack_into(buf, HEADER.size, *crcs)
        struct.pack_into("<I", buf, self.head - 4, crc32(memoryview(buf)[:self.head - 4]))
        final = self.path(block_hash)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self._write_file(tmp, memoryview(buf))          # removes its file if the write fails
        try:
            os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        return self.file_bytes

    def _buffer(self) -> tuple:
        """This thread's page-aligned file image (an anonymous mapping: zeroed, and its padding never written),
        made once: (the image, its payload's (data bytes, scale bytes), data and scales as tensors over them)."""
        got = getattr(self._local, "buf", None)
        if got is None:
            buf = mmap.mmap(-1, self.file_bytes)
            payload, g = memoryview(buf)[self.head:], self.geom
            got = self._local.buf = (buf, [payload[:g.data_bytes], payload[g.data_bytes:g.block_bytes]],
                                     *from_bytes(g, payload))
        return got

    def _write_file(self, path: Path, image: memoryview) -> None:
        if self.direct:
            try:
                return _write_all(path, image, os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
                log.info("KV disk tier %s: the filesystem refuses O_DIRECT (%s); writing through the page cache",
                         self.dir, e.strerror)
        _write_all(path, image, 0)

    def _row_crc(self, bufs: list[memoryview], r: int) -> int:
        """crc32 of row r's data bytes then its scale bytes; bufs: (the payload's data bytes, its scale bytes on)."""
        c = crc32(bufs[0][r * self.row_data:(r + 1) * self.row_data])
        if self.row_scale:
            c = crc32(bufs[1][r * self.row_scale:(r + 1) * self.row_scale], c)
        return c

    def read(self, block_hash: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, scales) of block_hash's file, checked. CorruptBlock (file deleted; also for a read
        error: a bad sector is a bad block) or FileNotFoundError."""
        p = self.path(block_hash)
        try:
            with _open_file(p) as f:
                raw = bytearray(f.read(self.file_bytes + 1))
        except FileNotFoundError:
            raise
        except OSError as e:
            self._corrupt(block_hash, f"unreadable ({e.strerror or e})")
        why = self._check(block_hash, raw)
        if why is not None:
            self._corrupt(block_hash, why)
        return from_bytes(self.geom, memoryview(raw)[self.header_bytes:])

    def touch(self, hashes) -> None:
        """Mark blocks used now (their files' mtime): scan's order after a restart is the LRU's, so the
        hot blocks a restart keeps are the last evicted. Best effort (a file gone is skipped)."""
        for h in hashes:
            try:
                os.utime(self.path(h))
            except OSError:
                pass

    def open_rows(self, block_hash: int) -> "RowReader":
        """A layer-wise reader of block_hash's file (RowReader): each layer read and checked when asked,
        the header (and the scales, a few bytes) with the first. CorruptBlock if the file is gone (now)
        or its header is bad (at the first layer)."""
        return RowReader(self, block_hash)

    def _corrupt(self, block_hash: int, why: str):
        self.delete(block_hash)
        raise CorruptBlock(f"{self.path(block_hash).name}: {why}", block_hash)

    def delete(self, block_hash: int) -> None:
        _remove(self.path(block_hash))

    def scan(self) -> tuple[list[int], int]:
        """Warm restart: (hashes of the intact files, least recently used first: by mtime, which write and
        touch set; corrupt files deleted).
        Every file is read and checked."""
        good, bad = [], 0
        entries = []
        for p in self.dir.iterdir():
            if _TMP.fullmatch(p.name):              # a write cut short (no other file of the directory is ours)
                _remove(p)
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                h = int(p.name[:-len(SUFFIX)], 16)
                if p.name != self.path(h).name:     # "0x..", "_", upper case: int() takes them, path(h) is not it
                    raise ValueError(p.name)
                entries.append((p.stat().st_mtime_ns, h, p))
            except (ValueError, OSError):
                _remove(p)
                bad += 1
        for _, h, p in sorted(entries):
            try:
                with _open_file(p) as f:
                    raw = f.read(self.file_bytes + 1)
            except OSError:
                raw = b""
            if self._check(h, raw) is None:
                good.append(h)
            else:
                _remove(p)
                bad += 1
        return good, bad

    def _check_header(self, block_hash: int, raw, size: int) -> str | None:
        """Why the header in raw[:header_bytes] (of a `size`-byte file) is bad, or None."""
        if size != self.file_bytes or len(raw) < self.header_bytes:
            return f"{size} bytes, expected {self.file_bytes}"
        magic, h, fp, n = HEADER.unpack_from(raw)
        if magic != MAGIC:
            return "bad magic"
        if h != block_hash:
            return "hash does not match the file name"
        if fp != self._fp or n != self.geom.block_bytes:
            return "written under another KV layout (model, dtype or codec)"
        end = self.header_bytes - 4
        if crc32(memoryview(raw)[:end]) != struct.unpack_from("<I", raw, end)[0]:
            return "header checksum mismatch"
        return None

    def _check(self, block_hash: int, raw) -> str | None:
        why = self._check_header(block_hash, raw, len(raw))
        if why is not None:
            return why
        mv = memoryview(raw)[self.header_bytes:]
        bufs = [mv[:self.geom.data_bytes], mv[self.geom.data_bytes:]]
        crcs = self._crcs.unpack_from(raw, HEADER.size)
        bad = [r for r in range(self.rows) if self._row_crc(bufs, r) != crcs[r]]
        if bad:
            return f"checksum mismatch in rows {bad}"
        tail = mv[self.geom.block_bytes:]
        return "nonzero padding" if tail != bytes(len(tail)) else None


def _remove(path: Path) -> None:
    """Delete path if it is there; a failure (a directory in its place, a read-only filesystem) is
    logged, never raised: a scan or an eviction goes on past it."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("KV disk tier: cannot remove %s (%s)", path.name, e.strerror or e)


def _write_all(path: Path, image: memoryview, flags: int) -> None:
    """image into a new file at path (opened with `flags` added: O_DIRECT or 0); on any failure the
    file is removed (a full disk leaves nothing behind)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        done = 0
        while done < len(image):
            n = os.write(fd, image[done:])
            if n <= 0:                                  # never for a regular file; no endless loop if it is
                raise OSError(errno.EIO, f"wrote {done} of {len(image)} bytes of {path.name}")
            done += n
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    os.close(fd)


class RowReader:
    """One block file read a layer at a time (DiskStore.open_rows): `layer_into(l, ...)` reads rows l and L + l into the
    caller's tensors and checks their crcs there. Opening asks the kernel to read the whole file ahead
    (POSIX_FADV_WILLNEED), so the storage streams it while earlier layers compute and each layer's small reads mostly
    find it in the page cache; the header (and the scales) are read and checked at the first layer. A mismatch deletes
    the file and raises CorruptBlock. Not thread-safe; close() when done.
    """

    def __init__(self, store: DiskStore, block_hash: int):
        self.s, self.hash, self.crcs = store, block_hash, None
        try:
            self.f = _open_file(store.path(block_hash))
        except FileNotFoundError:
            raise CorruptBlock(f"{store.path(block_hash).name}: gone", block_hash) from None
        except OSError as e:
            store._corrupt(block_hash, f"unreadable ({e.strerror or e})")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    def _head(self) -> None:
        s, g = self.s, self.s.geom
        try:
            size = os.fstat(self.f.fileno()).st_size
            head = os.pread(self.f.fileno(), s.header_bytes, 0)
            why = s._check_header(self.hash, head, size)
            if why is not None:
                s._corrupt(self.hash, why)
            self.crcs = s._crcs.unpack_from(head, HEADER.size)
            self.scales = memoryview(os.pread(self.f.fileno(), g.scale_bytes, s.header_bytes + g.data_bytes))
        except OSError as e:
            self.close()
            s._corrupt(self.hash, f"unreadable ({e.strerror or e})")
        except BaseException:
            self.close()
            raise

    def layer_into(self, layer: int, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Rows l and L + l (K and V of layer `layer`) into data[0], data[1] ([bs, h, d] each, contiguous,
        the stored dtype) and their scales into scales[0], scales[1] ([h]; None for codec none), checked
        there: on a mismatch the file is deleted and CorruptBlock raised (the caller drops what it read)."""
        if self.crcs is None:
            self._head()
        s, L, fd = self.s, self.s.geom.num_layers, self.f.fileno()
        for j, r in enumerate((layer, L + layer)):
            dst = memoryview(data[j].view(torch.uint8).numpy()).cast("B")
            try:
                n = os.preadv(fd, [dst], s.head + r * s.row_data)
            except OSError as e:
                self.close()
                s._corrupt(self.hash, f"unreadable ({e.strerror or e})")
            c = crc32(dst)
            if s.row_scale:
                sc = self.scales[r * s.row_scale:(r + 1) * s.row_scale]
                c = crc32(sc, c)
                scales[j].copy_(torch.frombuffer(bytearray(sc), dtype=torch.float32))
            if n != s.row_data or c != self.crcs[r]:
                self.close()
                s._corrupt(self.hash, f"checksum mismatch in layer {layer}")

    def close(self) -> None:
        self.f.close()
