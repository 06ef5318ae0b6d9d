"""engine/cuda_graphs.py's host side, without a GPU: buckets, which steps replay, and the static input
buffer a replay reads (values, padding rows, the copied prefix). The replay itself is checked on CUDA by
tests/kernels/test_cuda_graphs.py (skipped here) and bench/gpu_engine.py."""
from types import SimpleNamespace

import numpy as np
import pytest

from pdcluster.engine.cuda_graphs import ID, LEN, POS, SLOT, batch_buckets, bucket_for, fill_inputs, pure_decode


def req(tokens, computed, blocks, drafts=()):
    return SimpleNamespace(token_ids=list(tokens), num_computed_tokens=computed, block_ids=list(blocks),
                           spec_token_ids=list(drafts))


def test_buckets_cover_every_batch_size_up_to_max_num_seqs_with_the_smallest_fit():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert batch_buckets(5) == (1, 2, 4, 5) and batch_buckets(1) == (1,)
    assert batch_buckets(1000)[-1] == 256                       # capped: larger steps run eagerly
    bs = batch_buckets(40)
    for n in range(1, 41):
        b = bucket_for(bs, n)
        assert b >= n and all(x < n for x in bs if x < b)       # the smallest bucket that holds n
    assert bucket_for(bs, 41) is None


def test_only_single_token_decodes_without_drafts_replay():
    a, b = req(range(10), 9, [3]), req(range(20), 19, [4, 5])
    assert pure_decode([a, b], [1, 1])
    assert not pure_decode([a, b], [1, 2])                      # a prefill chunk
    assert not pure_decode([req(range(5), 0, [1])], [1])        # a one-token prompt's first pass
    assert not pure_decode([req(range(10), 9, [3], drafts=[7, 8])], [1])    # drafts to verify


def test_inputs_land_in_their_segments_and_padding_rows_point_at_the_scratch_block():
    bmax, width, bs, scratch = 8, 6, 4, 99
    host = np.full(4 * bmax + bmax * width, -7, dtype=np.int64)
    r0 = req([5, 6, 7, 8, 9, 10], 5, [11, 12])              # position 5: block 12, row 1
    r1 = req([1, 2, 3], 2, [30])                            # position 2: block 30, row 2
    n = fill_inputs(host, bmax, width, 4, [r0, r1], bs, scratch)
    assert n == 4 * bmax + 4 * width                        # the prefix up to the end of 4 table rows
    seg, tables = host[:4 * bmax].reshape(4, bmax), host[4 * bmax:].reshape(bmax, width)
    assert list(seg[ID, :4]) == [10, 3, 0, 0] and list(seg[POS, :4]) == [5, 2, 0, 0]
    assert list(seg[SLOT, :4]) == [12 * bs + 1, 30 * bs + 2, scratch * bs, scratch * bs]
    assert list(seg[LEN, :4]) == [6, 3, 1, 1]
    assert list(tables[0, :2]) == [11, 12] and tables[1, 0] == 30 and list(tables[2:4, 0]) == [scratch, scratch]
    assert (seg[:, 4:] == -7).all() and (tables[4:] == -7).all()    # rows past the bucket untouched


def test_graphs_only_where_asked_on_cuda_with_the_compiled_kernels(monkeypatch):
    from dataclasses import replace

    from pdcluster.engine.config import EngineConfig, ModelConfig
    from pdcluster.engine.model_runner import uses_cuda_graphs
    m = ModelConfig("t", "t", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4)
    cuda, triton, torch_path = EngineConfig(m, device="cuda"), SimpleNamespace(triton=True), SimpleNamespace(triton=False)
    import pdcluster.kernels._triton as kt
    monkeypatch.setattr(kt, "INTERPRET", False)          # the suite runs with TRITON_INTERPRET=1
    assert uses_cuda_graphs(cuda, triton)
    assert not uses_cuda_graphs(replace(cuda, cuda_graphs=False), triton)      # --enforce-eager
    assert not uses_cuda_graphs(cuda, torch_path)                               # the torch backend
    assert not uses_cuda_graphs(EngineConfig(m), triton)                        # CPU
    monkeypatch.setattr(kt, "INTERPRET", True)
    assert not uses_cuda_graphs(cuda, triton)                                   # interpreted kernels
