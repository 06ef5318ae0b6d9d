"""A minimal gRPC client for the multi-node tests: one greedy Generate, its tokens and placement."""
from __future__ import annotations

from dataclasses import dataclass

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg


@dataclass
class Reply:
    token_ids: list[int]
    finish: str                 # "STOP" | "LENGTH" | "ABORT" | ...
    prefill_worker: str
    decode_worker: str


async def generate(stub: pbg.GenerationStub, ids: list[int], max_tokens: int, timeout: float = 120.0) -> Reply:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    toks, finish, placement = [], "", None
    async for m in stub.Generate(req, timeout=timeout):
        toks += list(m.token_ids)
        if m.HasField("placement"):
            placement = m.placement
        if m.finish_reason:
            finish = pb.FinishReason.Name(m.finish_reason).removeprefix("FINISH_REASON_")
    return Reply(toks, finish, placement.prefill_worker if placement else "",
                 placement.decode_worker if placement else "")
