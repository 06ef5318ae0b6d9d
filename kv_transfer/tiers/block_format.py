"""How one KV block is laid out in the lower tiers, and its geometry.

A block in the device pool is, per layer, K and V of shape [block_size, kv_heads, head_dim]. Below
the device it is one tensor over every layer:

    kv      [2 * num_layers, block_size, kv_heads, head_dim]   rows: K of layer 0..L-1, then V of 0..L-1
codec "none": kv in the cache dtype. "int8" / "fp8": kv_transfer/codec.py's quantization, one scale
per (row, kv_head):
    q       [2L, block_size, kv_heads, head_dim]  int8 / float8_e4m3fn
    scales  [2L, kv_heads]                       float32
The disk tier stores exactly these bytes (q then scales), so a block round-trips bit for bit.
A device pool that is itself quantized (engine/kv_quant.py QuantKV: the same codes and per (block, kv
head) scales) is "native": its blocks go below as they are (codec = the cache's), never re-encoded.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from pdcluster.kv_transfer import codec as wire_codec


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype          # the device pool's (a quantized pool: the float dtype it stands for)
    codec: str = "none"         # the lower tiers': none | int8 | fp8
    native: bool = False        # the device pool holds this codec's codes + scales itself
    model: str = ""             # which weights computed the blocks (engine/weights_id.py kv_identity)

    @classmethod
    def of(cls, k_caches: list, codec: str, model: str = "") -> "Geometry":
        """codec: the tiers' (--kv-tier-codec). A quantized pool's blocks keep its own codec: codec must
        be none (as computed) or that codec. model: the weights' identity (disk files name it)."""
        wire_codec.check_codec(codec)
        _, bs, h, d = k_caches[0].shape
        own = getattr(k_caches[0], "codec", None)           # QuantKV: "int8" | "fp8"
        if own is not None:
            if codec not in ("none", own):
                raise ValueError(f"a {own} KV cache keeps its own codes in the tiers: tier codec must be none "
                                 f"or {own}, got {codec}")
            return cls(len(k_caches), bs, h, d, k_caches[0].dtype, own, native=True, model=model)
        return cls(len(k_caches), bs, h, d, k_caches[0].dtype, codec, model=model)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2 * self.num_layers, self.block_size, self.kv_heads, self.head_dim)

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.dtype if self.codec == "none" else wire_codec.QUANT[self.codec]

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.stored_dtype.itemsize

    @property
    def scale_bytes(self) -> int:
        return 0 if self.codec == "none" else 2 * self.num_layers * self.kv_heads * wire_codec.SCALE_BYTES

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes in a lower tier (payload + scales)."""
        return self.data_bytes + self.scale_bytes

    def fingerprint(self) -> int:
        """64 bits naming the layout and the weights: a disk file written under another layout (dtype,
        codec) or by other weights (`model`) is foreign."""
        text = (f"{self.num_layers}/{self.block_size}/{self.kv_heads}/{self.head_dim}/{self.dtype}/{self.codec}"
                f"/{self.model}")
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def encode(geom: Geometry, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kv [2L, bs, h, d] in the cache dtype (CPU) -> (data [2L, bs, h, d] stored dtype, scales [2L, h] or None)."""
    if geom.codec == "none":
        return kv, None
    return wire_codec.encode(geom.codec, kv)


def staged(geom: Geometry, staging, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block i of a device copy-out (DeviceCopier.copy_out's staging), encoded: a native pool's codes
    and scales as they are, anything else through encode."""
    if geom.native:
        return staging[0][:, i], staging[1][:, i]
    return encode(geom, staging[:, i])


def for_device(geom: Geometry, data: torch.Tensor, scales: torch.Tensor | None):
    """A stored block as the device copier writes it: (codes, scales) into a native pool as they are,
    else [2L, bs, h, d] in the cache dtype."""
    return (data, scales) if geom.native else decode(geom, data, scales)


def for_device_rows(geom: Geometry, data: torch.Tensor, scales: torch.Tensor | None):
    """for_device over one layer's rows of n blocks, data [2, n, bs, h, d] (scales [2, n, h]): as they
    are into a native pool, else [2, n, bs, h, d] in the cache dtype."""
    if geom.native or geom.codec == "none":
        return data, scales
    return decode(geom, data.flatten(0, 1), scales.flatten(0, 1)).view(data.shape), None


def decode(geom: Geometry, data: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The inverse of encode (lossy for int8 / fp8): [2L, bs, h, d] in the cache dtype."""
    if geom.codec == "none":
        return data
    return wire_codec.decode(data, scales, geom.dtype)


def from_bytes(geom: Geometry, buf) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data, scales) over `buf` (geom.block_bytes bytes, writable: torch.frombuffer shares it)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    data = raw[:geom.data_bytes].view(geom.stored_dtype).view(geom.shape)
    if geom.codec == "none":
        return data, None
    scales = raw[geom.data_bytes:geom.block_bytes].view(torch.float32).view(2 * geom.num_layers, geom.kv_heads)
    return data, scales
