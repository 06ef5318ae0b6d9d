"""Wide steps of a packed int4 CPU linear through an int8 copy of its weights (`cpu_int8_rows`).

torch's int4 kernel (_weight_int4pack_mm_for_cpu) costs about linearly in rows: SmolLM2's 30 layers' linears,
30 distinct weights per shape as in a step, 1 thread: 15.6 ms at 4 rows, 27 at 8, 50 at 16, 94 at 32.
An int8 copy through cpu_linear.int8_rows (x rounded to int8 per row, torch._int_mm, int32 sums) reads twice
the bytes but costs nearly the same at any row count: 28-30 ms at 4-8 rows, 31.5 at 16, 41 at 32. So from
~10 rows on the copy is faster, 1.6x at 16 rows, 2.3x at 32 (bench/RESULTS.md, "int8 copy for wide
steps"). A bfloat16 copy was measured too and dropped: at 2 bytes per weight it is bound by this host's
memory bandwidth, 42-44 ms at any row count.

The copy is the packed weights' own values (their dequantize()) rounded to int8 per output row (symmetric,
amax / 127): one more rounding of the weights, well inside the 4-bit one (a Q4 step is a group's range / 15,
an int8 step the row's |max| / 127), and x is rounded to 8 bits per row as llama.cpp rounds activations.
Greedy output stays inside transformers' top-5 (tests/e2e/test_quantized_vs_hf.py). Cost: 1 byte per weight
(and a float32 scale per row) resident beside the packed ones.
"""
from __future__ import annotations

import torch

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant import int8_amx
from pdcluster.engine.quant.cpu_linear import DENSE_MIN_ROWS, Int4Linear, OneDNNRows, int8_rows, onednn_int8_usable
from pdcluster.engine.quant.packed import quantize

ONEDNN_MIN_ROWS = DENSE_MIN_ROWS    # rows from which the copy runs on oneDNN's prepacked form (where exact)


class Int8Rows:
    """`inner` (a packed int4 linear) for steps of fewer than min_rows rows; int8_rows on an int8 copy of its
    weights for the others (decode batches, draft verification, prefill chunks). From ONEDNN_MIN_ROWS rows on
    (prefill chunks, big batches) the copy runs on oneDNN's prepacked form where its sums are exact (VNNI / AMX:
    cpu_linear.OneDNNRows, the same integer sums): torch._int_mm re-blocks the weight on every call. A layer's
    four linears, 2 threads: 1.48 -> 1.27 ms at 128 rows, 5.25 -> 3.15 at 512, 30.6 -> 16.1 at 2048; equal at
    32 (bench/int4_kernels.py --variants intmm onednn; bench/RESULTS.md, "oneDNN's prepacked int8 copy for
    prefill"). That form is one more byte per weight, resident."""
    __slots__ = ("inner", "q", "scale", "bias", "min_rows", "onednn", "tiles")

    def __init__(self, inner, min_rows: int):            # Int4Linear | q4x8.Q4x8Linear
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        w8 = quantize(inner.dequantize(), "int8")                         # per output row, symmetric
        self.q, self.scale = w8.q.contiguous(), w8.scale.float()          # int8 [N, K], float32 [N]
        self.inner, self.bias, self.min_rows = inner, inner.bias, min_rows
        self.onednn = OneDNNRows(self.q, self.scale) if onednn_int8_usable() else None
        # below ONEDNN_MIN_ROWS, the same sums on AMX tiles where the CPU has them (int8_amx.py): 1.4-2.8x
        # torch._int_mm at 32 rows. The tiles then replace the plain codes (q = None; int8_amx.unpack reads them
        # back): the copy stays twice the weights' int8 bytes, as with oneDNN's form alone.
        self.tiles = int8_amx.pack(self.q) if int8_amx.usable() and int8_amx.fits(*self.q.shape) else None
        if self.tiles is not None:
            self.q = None

    @property
    def N(self) -> int:
        return self.scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.min_rows:
            return self.inner(x)
        if self.onednn is not None and x.shape[0] >= ONEDNN_MIN_ROWS:
            y = self.onednn(x).to(x.dtype)
        else:
            y = int8_rows(x, self.q, self.scale, self.tiles).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        """The packed weights, the int8 copy (plain or in AMX tiles; again in oneDNN's prepacked form where that
        runs) and its scales."""
        codes = self.tiles if self.tiles is not None else self.q
        return self.inner.nbytes + codes.numel() * (1 + (self.onednn is not None)) + 4 * self.scale.numel()


def copy_pays(lin) -> bool:
    """Whether an int8 copy can beat lin's own kernel at wide steps: a packed int4 CPU linear whose weights can be
    read back (q4x8's, or torch's in a known int4pack layout), except q4x8 on the AVX2 library. There the op
    (vpmaddubsw on the 4-bit codes) was 1.4-1.6x faster than the copy through int8_mm at 12-512 rows even before its
    kernel's 1.4x speed-up, and no exact oneDNN form runs (no VNNI): a decode step at 16 rows took 66.4 ms with the
    copy against 60.4 without (bench/RESULTS.md, "AVX2 hosts: the attention ops, and int4 prefill on q4x8")."""
    from pdcluster.engine.quant.q4x8 import Q4x8Linear
    if isinstance(lin, Q4x8Linear):
        return cpu_ext.available()
    return isinstance(lin, Int4Linear) and lin.layout is not None


def widen(lin, min_rows: int):
    """lin with an int8 copy for steps of >= min_rows rows where copy_pays(lin); else lin unchanged (int8 linears
    run int8 already)."""
    return Int8Rows(lin, min_rows) if copy_pays(lin) else lin
