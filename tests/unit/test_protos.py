"""The committed protobuf/gRPC stubs are what the .proto files generate."""
from pdcluster.deploy.protogen import proto_files, stale_stubs


def test_committed_stubs_are_current():
    assert "router/proto/generation.proto" in proto_files()
    assert stale_stubs() == []


def test_api_field_numbers_are_the_contract():
    from pdcluster.router.proto import generation_pb2 as pb
    f = {x.name: x.number for x in pb.GenerateRequest.DESCRIPTOR.fields}
    assert f == {"request_id": 1, "text": 2, "token_ids": 3, "chat": 4, "sampling": 5}
    s = {x.name: x.number for x in pb.SamplingParams.DESCRIPTOR.fields}
    assert s == {"max_tokens": 1, "temperature": 2, "top_p": 3, "top_k": 4, "seed": 5, "stop": 6,
                 "stop_token_ids": 7, "ignore_eos": 8, "min_p": 9, "presence_penalty": 10, "frequency_penalty": 11,
                 "repetition_penalty": 12, "logprobs": 13, "response_format": 14, "n": 15,
                 "min_tokens": 16, "logit_bias": 17, "prompt_logprobs": 18}
    r = {x.name: x.number for x in pb.GenerateResponse.DESCRIPTOR.fields}
    assert r == {"request_id": 1, "token_ids": 2, "text": 3, "finish_reason": 4, "usage": 5, "placement": 6,
                 "logprobs": 7, "index": 8, "prompt_logprobs": 9}
    p = {x.name: x.number for x in pb.Placement.DESCRIPTOR.fields}
    assert p == {"prefill_worker": 1, "decode_worker": 2, "remote_prefill": 3, "kv_bytes_transferred": 4,
                 "kv_transfer_ms": 5}
