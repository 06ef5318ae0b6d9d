"""Turns a ScheduledBatch into tensors, runs the model, samples. Owns the KV cache tensors.

KV cache memory (per layer, K and V each):   [num_blocks, block_size, num_kv_heads, head_dim]
    block 0 | block 1 | ... | block N-1       <- block ids handed out by the BlockPool
(kv_cache_dtype int8 / fp8: a QuantKV per layer, codes of that shape + float32 scales
[num_blocks, num_kv_heads]; engine/kv_quant.py)
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from pdcluster.engine.attention import AttnMeta, PrefillSeq
from pdcluster.engine.config import EngineConfig
from pdcluster.engine.cuda_graphs import DecodeGraphs, batch_buckets, pure_decode
from pdcluster.engine.kv_quant import QuantKV, new_quant_kv_pair
from pdcluster.engine.llama import LlamaModel
from pdcluster.engine.logits_processors import stop_ids
from pdcluster.engine.prefault import prefault
from pdcluster.engine.request import Request
from pdcluster.engine.sampler import History, make_generator, sample_rows, token_seed
from pdcluster.engine.sampling_params import TokenLogprobs
from pdcluster.engine.scheduler import ScheduledBatch
from pdcluster.engine.spec.verify import accept_greedy, verify
from pdcluster.kernels.greedy_head import MAX_ROWS as GREEDY_MAX_ROWS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def num_kv_blocks(cfg: EngineConfig) -> int:
    """Pool size from the explicit count, the byte budget, or a fraction of free memory."""
    c = cfg.cache
    if c.num_blocks is not None:
        return c.num_blocks
    per_block = cfg.model.kv_bytes_per_block(cfg.kv_cache_dtype, DTYPES[cfg.dtype].itemsize, c.block_size)
    budget = c.kv_cache_memory
    if budget is None:
        if cfg.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
        else:
            free = host_available_bytes()
        budget = int(free * c.memory_fraction)
        # Never more than every sequence slot filled to the context length.
        budget = min(budget, cfg.sched.max_num_seqs * cfg.max_model_len * per_block // c.block_size)
    n = budget // per_block
    if n < 1:
        raise ValueError(f"KV cache budget {budget} bytes is smaller than one block ({per_block} bytes)")
    return n


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """A zero tensor. On CPU through numpy's calloc: a large one is fresh mmap'd pages that the
    kernel zeroes on first touch, so a multi-GB KV pool costs nothing until its blocks are used
    (torch.zeros writes every byte up front: ~3 s for the default 30%-of-RAM pool here)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = np.zeros(shape[:-1] + (shape[-1] * dtype.itemsize,), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)


def uses_cuda_graphs(cfg: EngineConfig, model: LlamaModel) -> bool:
    """Decode steps captured as CUDA graphs: asked for, on CUDA, with the compiled Triton kernels."""
    from pdcluster.kernels._triton import INTERPRET
    return cfg.cuda_graphs and model.triton and torch.device(cfg.device).type == "cuda" and not INTERPRET


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model: LlamaModel, num_blocks: int):
        self.cfg = cfg
        self.model = model
        self.device = cfg.device
        self.block_size = cfg.cache.block_size
        m, dt = cfg.model, DTYPES[cfg.dtype]
        graphs = uses_cuda_graphs(cfg, model)
        # CUDA graphs: one block past the pool (never handed out) takes the padding rows' KV
        shape = (num_blocks + graphs, self.block_size, m.num_kv_heads, m.head_dim)
        # zeros, not empty: masked positions must hold finite values (0 * NaN would poison SDPA)
        zeros = lambda s, d: _zeros(s, d, self.device)   # noqa: E731
        if cfg.kv_cache_dtype == "auto":
            self.k_caches = [zeros(shape, dt) for _ in range(m.num_layers)]
            self.v_caches = [zeros(shape, dt) for _ in range(m.num_layers)]
            prefault(self.k_caches + self.v_caches)     # the pool's first blocks, off the steps (prefault.py)
        else:
            pairs = [new_quant_kv_pair(cfg.kv_cache_dtype, shape, dt, zeros) for _ in range(m.num_layers)]
            self.k_caches, self.v_caches = [p[0] for p in pairs], [p[1] for p in pairs]
        self.generators: dict[str, torch.Generator | None] = {}
        self.grammars = None            # engine/structured.Grammars, set by the engine on first use
        self.matchers: dict[str, object] = {}   # request id -> its grammar matcher
        self.graphs = None                      # engine/cuda_graphs.py: pure-decode steps replayed
        if cfg.cpu_compile and torch.device(self.device).type == "cpu":
            from pdcluster.engine.cpu_compile import CompiledDecode
            model.compiled = CompiledDecode.build(model, self.k_caches[0], self.v_caches[0])
        if graphs:
            width = -(-(cfg.max_model_len + cfg.spec_ngram_k) // self.block_size) + 1
            self.graphs = DecodeGraphs(model.forward, self.k_caches, self.v_caches,
                                       buckets=batch_buckets(cfg.sched.max_num_seqs), block_size=self.block_size,
                                       max_blocks=width, scratch_block=num_blocks, device=self.device)

    def kv_cache_bytes(self) -> int:
        return sum(t.nbytes if isinstance(t, QuantKV) else t.numel() * t.element_size()
                   for t in self.k_caches + self.v_caches)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttnMeta, list[int]]:
        """Flatten the batch (prefill chunks first, then decodes). Returns input ids, positions,
        attention metadata and, per request in `order`, its row in the flat batch (its last row).
        On the torch path a request verifying drafts (engine/spec/) takes 1 + k decode rows, not a prompt
        chunk: row j attends over the positions up to its own (its mask), and the step's K/V is stored
        before any row attends, so the drafts see each other causally. Such a step stays a pure-decode
        step, which the compiled CPU layer (engine/cpu_compile.py) takes, with every row's attention in
        one batched call instead of one prompt-attention call per request."""
        bs = self.block_size
        rows_for_drafts = not self.model.triton     # a request with drafts is scheduled for exactly 1 + k tokens
        is_pre = [r.num_computed_tokens == 0 or (n > 1 and not (rows_for_drafts and r.spec_token_ids))
                  for r, n in zip(batch.reqs, batch.num_new_tokens)]
        pre = [i for i, p in enumerate(is_pre) if p]
        dec = [i for i, p in enumerate(is_pre) if not p]
        ids, pos, slots, prefills, last_row = [], [], [], [], [0] * len(batch)
        for i in pre + dec:
            r, n = batch.reqs[i], batch.num_new_tokens[i]
            start = r.num_computed_tokens
            p = list(range(start, start + n))
            if is_pre[i]:
                prefills.append(PrefillSeq(len(ids), n, start + n,
                                           torch.tensor(r.block_ids[:-(-(start + n) // bs)], dtype=torch.int64)))
            ids += r.token_ids[start:start + n] + r.spec_token_ids   # drafts after the last token (engine/spec/)
            pos += p
            slots += [r.block_ids[t // bs] * bs + t % bs for t in p]
            last_row[i] = len(ids) - 1
        P = sum(s.q_len for s in prefills)
        tables = lens = mask = None
        if dec:                     # one row per new token: a plain decode's 1, a verify's 1 + k
            width = max(len(batch.reqs[i].block_ids) for i in dec)
            rows = [(batch.reqs[i], j) for i in dec for j in range(batch.num_new_tokens[i])]
            tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r, _ in rows], dtype=torch.int64)
            lens = torch.tensor([r.num_computed_tokens + j + 1 for r, j in rows], dtype=torch.int64)
            mask = (torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)).view(len(rows), 1, 1, -1)
        pt = cu = sk = None
        if prefills and self.model.triton:
            w = max(len(s.block_table) for s in prefills)
            pt = torch.tensor([s.block_table.tolist() + [0] * (w - len(s.block_table)) for s in prefills],
                              dtype=torch.int32)
            cu = torch.tensor([0] + [s.q_start + s.q_len for s in prefills], dtype=torch.int32)
            sk = torch.tensor([s.ctx_len for s in prefills], dtype=torch.int32)
        dev = self.device
        to = (lambda t: t.to(dev) if t is not None else None)
        meta = AttnMeta(to(torch.tensor(slots, dtype=torch.int64)),
                        [PrefillSeq(s.q_start, s.q_len, s.ctx_len, to(s.block_table)) for s in prefills], P,
                        to(tables), to(lens), to(mask), to(pt), to(cu), to(sk))
        return (torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(pos, dtype=torch.int64, device=dev),
                meta, last_row)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, layer_hook: Callable[[int], None] | None = None,
            layer_wait: Callable[[int], None] | None = None, drop: Callable[[], set[str]] | None = None
            ) -> tuple[list[int | list[int] | None], list[TokenLogprobs | None]]:
        """One forward step. Returns per request a sampled token (None for a partial prefill chunk;
        a list for a request with drafts: the accepted ones and the token after them) and its
        logprobs (None unless asked). drop(), asked after the forward pass: request ids not to
        sample (their KV load failed in the step: no token, no grammar or generator advanced)."""
        if self._replayable(batch):
            hidden, rows = self._replay(batch, layer_hook, layer_wait), list(range(len(batch)))
        else:
            ids, pos, meta, rows = self.prepare(batch)
            hidden = self.model.forward(ids, pos, meta, self.k_caches, self.v_caches, layer_hook, layer_wait)
            self._prompt_logprobs(batch, hidden, rows)
        dropped = drop() if drop is not None else ()
        want = [i for i in range(len(batch)) if batch.samples(i) and batch.reqs[i].request_id not in dropped]
        out: list[int | list[int] | None] = [None] * len(batch)
        lps: list[TokenLogprobs | None] = [None] * len(batch)
        spec = [i for i in want if batch.reqs[i].spec_token_ids]
        if spec:
            want = [i for i in want if not batch.reqs[i].spec_token_ids]
            self._verify(batch, spec, hidden, rows, out)
        if self.model.greedy is not None:
            want = self._greedy(batch, want, hidden, rows, out)
        if not want:
            return out, lps
        logits = self.model.logits(hidden[[rows[i] for i in want]])
        reqs = [batch.reqs[i] for i in want]
        constrained = [k for k, r in enumerate(reqs) if r.params.structured is not None]
        if constrained:
            self.grammars.mask(logits, constrained, [self._matcher(reqs[k]) for k in constrained])
        hist = [History(r.prompt_token_ids, r.output_token_ids, stop_ids(r.params, r.eos_token_ids))
                if r.params.has_penalties or r.params.min_tokens else None for r in reqs]
        toks, logprobs = sample_rows(logits, [r.params for r in reqs], [self._generator(r) for r in reqs], hist,
                                     raw_logprobs=self.cfg.logprobs_mode == "raw_logprobs")
        for k in constrained:
            m = self.matchers[reqs[k].request_id]
            self.grammars.accept(m, toks[k])
            reqs[k].grammar_ended = m.is_terminated()   # a stop token of the grammar's own (engine/scheduler.py)
        for k, i in enumerate(want):
            out[i], lps[i] = toks[k], logprobs[k]
        return out, lps

    PROMPT_LOGITS_ROWS = 256        # prompt rows per head call: [256, V] float32 logits at a time (~50 MB at V=49152)

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor, rows: list[int]) -> None:
        """Requests that ask for prompt logprobs: each prompt chunk's rows through the head, row p giving the
        logprob of prompt token p + 1 (the last prompt row gives the first output token, sampled as usual).
        Appended to req.prompt_logprobs from the chunk's start on, so a recomputed chunk replaces its entries."""
        for i, r in enumerate(batch.reqs):
            if not r.wants_prompt_logprobs:
                continue
            start, n = r.num_computed_tokens, batch.num_new_tokens[i]
            stop = min(start + n, r.num_prompt_tokens - 1)      # rows start..stop-1 predict tokens start+1..stop
            if stop <= start:
                continue
            first = rows[i] - n + 1
            k = r.params.prompt_logprobs
            out = []
            for a in range(start, stop, self.PROMPT_LOGITS_ROWS):
                b = min(stop, a + self.PROMPT_LOGITS_ROWS)
                logp = self.model.logits(hidden[first + a - start:first + b - start]).float().log_softmax(-1)
                target = torch.tensor(r.token_ids[a + 1:b + 1], dtype=torch.int64, device=logp.device)
                got = logp.gather(1, target[:, None])[:, 0].tolist()
                top = torch.topk(logp, k) if k else None
                for j, t in enumerate(r.token_ids[a + 1:b + 1]):
                    alts = tuple(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else ()
                    out.append(TokenLogprobs(t, got[j], alts))
            del r.prompt_logprobs[start:]
            r.prompt_logprobs += out

    def _replayable(self, batch: ScheduledBatch) -> bool:
        g = self.graphs
        return (g is not None and g.bucket(len(batch)) is not None and pure_decode(batch.reqs, batch.num_new_tokens)
                and all(len(r.block_ids) <= g.width for r in batch.reqs)
                and not any(r.wants_prompt_logprobs for r in batch.reqs))   # (a 1-token prompt chunk is "decode")

    def _replay(self, batch: ScheduledBatch, layer_hook, layer_wait) -> torch.Tensor:
        """A pure-decode step as one graph replay. The connector's per-layer calls keep their meaning:
        every wait before the step (a pure-decode batch loads nothing in step), every layer's hook after it."""
        L = len(self.k_caches)
        if layer_wait is not None:
            for li in range(L):
                layer_wait(li)
        hidden = self.graphs.run(batch.reqs)
        if layer_hook is not None:
            for li in range(L):
                layer_hook(li)
        return hidden

    def _greedy(self, batch: ScheduledBatch, want: list[int], hidden: torch.Tensor, rows: list[int],
                out: list) -> list[int]:
        """Rows whose token is the plain argmax (greedy, no penalties, logprobs or grammar) take it from the
        head's screen (kernels/greedy_head.py: the same float32 argmax) when there are at most GREEDY_MAX_ROWS of
        them (past that the full head costs less); returns the rows left for the logits."""
        fast = [i for i in want if batch.reqs[i].params.greedy and batch.reqs[i].params.plain
                and batch.reqs[i].params.structured is None]
        if not fast or len(fast) > GREEDY_MAX_ROWS:
            return want
        toks = self.model.greedy_tokens(hidden[[rows[i] for i in fast]])
        for i, t in zip(fast, toks):
            out[i] = t if t >= 0 else None
        return [i for i in want if out[i] is None]

    def _verify(self, batch: ScheduledBatch, spec: list[int], hidden: torch.Tensor, rows: list[int],
                out: list) -> None:
        """Requests with drafts (engine/spec/verify.py): logits at the last token and every draft. Greedy ones
        take each row's argmax from the head's screen where there is one (kernels/greedy_head.py)."""
        reqs = [batch.reqs[i] for i in spec]
        drafts = [r.spec_token_ids for r in reqs]
        idx = [[rows[i] - len(d) + j for j in range(len(d) + 1)] for i, d in zip(spec, drafts)]
        left = list(range(len(reqs)))
        g = [k for k in left if reqs[k].params.greedy] if self.model.greedy is not None else []
        if g and sum(len(idx[k]) for k in g) <= GREEDY_MAX_ROWS:
            targets = self.model.greedy_tokens(hidden[[i for k in g for i in idx[k]]])
            off = 0
            for k in g:
                t, off = targets[off:off + len(idx[k])], off + len(idx[k])
                if min(t) >= 0:                     # else (a non-finite row) the logits decide, below
                    out[spec[k]] = accept_greedy(drafts[k], t)
            left = [k for k in left if out[spec[k]] is None]
        if not left:
            return
        toks = verify(self.model.logits(hidden[[i for k in left for i in idx[k]]]), [reqs[k].params for k in left],
                      [drafts[k] for k in left], [self._generator(reqs[k]) for k in left])
        for k, t in zip(left, toks):
            out[spec[k]] = t

    def accept(self, req: Request, token_ids: list[int]) -> None:
        """Advance req's grammar over tokens sampled elsewhere (a remote prefill's first token)."""
        m = self._matcher(req)
        for t in token_ids:
            self.grammars.accept(m, t)
        req.grammar_ended = m.is_terminated()

    def _matcher(self, req: Request):
        if req.request_id not in self.matchers:
            self.matchers[req.request_id] = self.grammars.matcher(req.params.structured)
        return self.matchers[req.request_id]

    def _generator(self, req: Request) -> torch.Generator | None:
        """req's RNG for the token it samples now; a seeded one at that token's own seed (engine/sampler.py)."""
        g = self.generators.get(req.request_id)
        if g is None:
            g = self.generators[req.request_id] = make_generator(req.params)
        if g is not None and req.params.seed is not None:
            g.manual_seed(token_seed(req.params.seed, req.num_output_tokens))
        return g

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.matchers.pop(request_id, None)
