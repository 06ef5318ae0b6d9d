"""Speculative decoding in the engine: n-gram (prompt lookup) drafts, verified in the batched step.

    ngram.py     propose up to k tokens by matching the sequence's last n tokens earlier in it
    verify.py    which drafts a step's logits accept: greedy prefix match, rejection sampling
    decoder.py   per-request policy: who may draft, how many (adaptive), acceptance counters

Flow (the scheduler and runner call these; nothing here touches the KV cache):
  schedule  a running request with one token to compute gets drafts d1..dk (SpecDecoder.drafts);
            it is scheduled for 1 + k tokens
  run       1 + k decode rows on the torch path (ModelRunner.prepare: each attends up to its own
            position), a small prefill chunk over its cached KV on the Triton path; logits at all
            1 + k positions; verify.accept -> d1..da + one token drawn at position a
  update    num_computed_tokens counts only the verified tokens; blocks past them are freed
"""
