"""The OpenAI-compatible HTTP API (router/openai/) driven by the official `openai` client, sync and
async, on the shared e2e cluster; greedy output over HTTP equals gRPC's, token for token."""
import json
import logging

import grpc
import httpx
import openai
import pytest

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.e2e.conftest import PROMPTS, base_url, sync
from tests.e2e.test_cluster import collect, idle_pools
from tests.e2e.test_openai_tools import WEATHER_TOOL

MODEL = "SmolLM2-135M-Instruct"


def test_models_and_health(cluster, client, model):
    assert model.startswith("SmolLM2") and sync(cluster, client.models.list).data[0].max_model_len > 0
    assert sync(cluster, lambda: client.models.retrieve(model)).id == model
    with pytest.raises(openai.NotFoundError):
        sync(cluster, lambda: client.models.retrieve("gpt-4"))
    r = sync(cluster, lambda: httpx.get(f"http://127.0.0.1:{cluster.http.port}/health"))
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_an_explicit_null_is_the_field_s_default(cluster, model):
    """As OpenAI's and vLLM's servers read it; a required field's null is still refused."""
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "echo", "presence_penalty", "frequency_penalty",
                           "top_k", "min_tokens", "ignore_eos", "seed", "stop", "logprobs", "stream_options"))
    url = base_url(cluster)

    def go():
        whole = httpx.post(f"{url}/completions", timeout=60, json={"model": model, "prompt": PROMPTS[0],
                                                                   "max_tokens": 4, **nulls})
        chat = httpx.post(f"{url}/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Hi", "name": None}], "max_tokens": 4,
            "logprobs": None, "parallel_tool_calls": None, "tools": None, "temperature": None})
        required = httpx.post(f"{url}/completions", timeout=60, json={"model": model, "prompt": None})
        return whole, chat, required
    whole, chat, required = sync(cluster, go)
    assert whole.status_code == 200 and len(whole.json()["choices"]) == 1, whole.text     # n: 1, not streamed
    # temperature null is 1.0: a sampled EOS (ignore_eos null is false) may end it first, as a stop
    c = whole.json()["choices"][0]
    assert whole.json()["usage"]["completion_tokens"] == 4 or (c["finish_reason"] == "stop" and
                                                              whole.json()["usage"]["completion_tokens"] < 4)
    assert chat.status_code == 200 and chat.json()["choices"][0]["logprobs"] is None, chat.text
    assert required.status_code == 400 and required.json()["error"]["param"] == "prompt"


def test_the_served_context_is_what_the_kv_pools_hold_and_chat_without_max_tokens_fits_it(cluster, client, model):
    """The session cluster's decode pool holds fewer tokens than the model's 8,192 positions. The
    served context length is the pool's, as vLLM's max_model_len: /v1/models and GetModelInfo say
    so, and a chat request without max_tokens (which may fill the context) is served. Before, it
    was refused (400): 8,192 - prompt output tokens cannot fit the pool."""
    pool = max(w.num_blocks for w in cluster.router.workers.loads_of("decode")) * cluster.router.cfg.block_size
    assert pool < cluster.router.max_context
    assert sync(cluster, client.models.list).data[0].max_model_len == pool

    async def info():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            return await pbg.GenerationStub(ch).GetModelInfo(pb.ModelInfoRequest())
    assert cluster.run(info()).max_context_tokens == pool
    r = sync(cluster, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours."}], temperature=0, stop=[" "]))
    assert r.choices[0].finish_reason == "stop" and 0 < r.usage.completion_tokens < 8
    over = sync(cluster, lambda: httpx.post(f"{base_url(cluster)}/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": pool}))
    assert over.status_code == 400 and f"context length {pool}" in over.json()["error"]["message"]


def test_greedy_completion_over_http_equals_grpc(cluster, client, model):
    async def grpc_text(prompt):
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            msgs = await collect(pbg.GenerationStub(ch), pb.GenerateRequest(
                text=prompt, sampling=pb.SamplingParams(max_tokens=12, temperature=0.0)))
        return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)
    for prompt in PROMPTS[:3]:
        ids, text = cluster.run(grpc_text(prompt))
        r = sync(cluster, lambda: client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                            logprobs=0))
        c = r.choices[0]
        assert c.text == text and c.finish_reason == "length"
        assert len(c.logprobs.tokens) == len(ids) == r.usage.completion_tokens
        assert "".join(c.logprobs.tokens) == text


def test_a_stop_token_ends_the_answer_without_its_text_over_grpc_and_http(cluster, client, model):
    """A stop_token_ids token stays in the token ids but not in the text (vLLM's, include_stop_str_in_output
    off); before, its text was returned. The router detokenizes what the workers send."""
    async def grpc_run(stop_ids):
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            msgs = await collect(pbg.GenerationStub(ch), pb.GenerateRequest(text=PROMPTS[0], sampling=pb.SamplingParams(
                max_tokens=12, temperature=0.0, stop_token_ids=stop_ids)))
        return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs[-1].finish_reason
    ids, _, _ = cluster.run(grpc_run([]))
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])      # a token not seen before it
    got, text, reason = cluster.run(grpc_run([ids[k]]))
    want = cluster.router.tokenizer.decode(ids[:k])
    assert got == ids[:k + 1] and reason == pb.FINISH_REASON_STOP and text == want
    r = sync(cluster, lambda: client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                        extra_body={"stop_token_ids": [ids[k]]}))
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == k + 1


def test_chat_streamed_with_usage_equals_unstreamed(cluster, client, model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    whole = sync(cluster, lambda: client.chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                                                 temperature=0))

    def streamed():
        chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        return chunks
    chunks = sync(cluster, streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    def continuous():
        return list(client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True,
                                                                                "continuous_usage_stats": True}))
    every = [c for c in sync(cluster, continuous) if c.choices]
    out = [c.usage.completion_tokens for c in every]
    assert out == sorted(out) and out[-1] == whole.usage.completion_tokens and len(set(out)) > 1
    assert all(c.usage.prompt_tokens == whole.usage.prompt_tokens for c in every)


def test_async_client_n_choices_share_one_prefill(cluster, model):
    prompt = PROMPTS[-1]                                    # ~50 tokens: 3 full blocks to share

    async def go():
        async with openai.AsyncOpenAI(base_url=base_url(cluster), api_key="unused", max_retries=0) as c:
            return await c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=2)
    r = cluster.run(go())
    assert sorted(c.index for c in r.choices) == [0, 1] and all(c.text for c in r.choices)
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens < 80           # the prompt counts once
    assert r.usage.prompt_tokens_details.cached_tokens >= 16                          # the second choice hit it
    again = cluster.run(go())
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(r.choices, key=lambda c: c.index)]                    # seeded: reproducible


def test_chat_logprobs_come_with_each_token(cluster, client, model):
    r = sync(cluster, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3))
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token   # greedy: the best
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_json_schema_response_parses_and_validates(cluster, client, model):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = sync(cluster, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=48,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}))
    doc = json.loads(r.choices[0].message.content)
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int) and len(doc["name"]) <= 16


@pytest.mark.parametrize("kw, status, param", [
    (dict(frobnicate=1), 400, "frobnicate"),                       # unknown: never silently ignored
    ({"max-tokens": 4}, 400, "max-tokens"),                        # named even when not an identifier
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(logprobs=21), 400, "logprobs"),
    (dict(stop=[""]), 400, "stop"),
    (dict(prompt=[10**9]), 400, "prompt"),
    (dict(prompt="x " * 20000), 400, "max_tokens"),              # prompt + max_tokens past the context
    (dict(model="gpt-4"), 404, "model"),
    (dict(logit_bias={"x": 1}), 400, "logit_bias"),
    (dict(logit_bias={"7": 250}), 400, "logit_bias"),
    (dict(min_tokens=9), 400, "min_tokens"),                       # more than max_tokens
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}),
     400, "response_format"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),    # without stream: vLLM's 400
    # more choices than the router ever runs at once: a 429 no retry could pass (each try started them all)
    (dict(prompt=["Hi"] * 64, n=16), 400, "n"),
])
def test_bad_input_gets_an_openai_error_and_leaks_nothing(cluster, model, kw, status, param):
    body = {"model": model, "prompt": "Hello", "max_tokens": 4} | kw

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{base_url(cluster)}/completions", json=body)
        await idle_pools(cluster)
        return r
    r = cluster.run(go())
    err = r.json()["error"]
    assert r.status_code == status and set(err) == {"message", "type", "param", "code"}, r.text
    assert param in (err["param"] or "") or param in err["message"], err
    ok = sync(cluster, lambda: httpx.post(f"{base_url(cluster)}/completions", timeout=60,
                                          json={"model": model, "prompt": "Hi", "max_tokens": 2}))
    assert ok.status_code == 200                                   # and the next request is served


def done_lines(caplog) -> list[dict]:
    """The router's per-request lines (router/lifecycle/log.py) captured so far."""
    return [r.request for r in caplog.records if hasattr(r, "request")]


def test_logit_bias_and_min_tokens_cross_the_cluster_over_http_and_grpc(cluster, client, model, caplog):
    """The prefill worker samples the first token and the decode worker the rest: both apply them.
    And they prefill remotely: min_tokens past the prefill's one token was refused there, and every
    such request fell back to a local prefill ("placing again")."""
    caplog.set_level(logging.INFO, logger="pdcluster.router")
    forced = sync(cluster, lambda: client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6,
                                                             temperature=0.7, seed=3, logit_bias={"42": 100}))
    assert forced.choices[0].text == cluster.router.tokenizer.decode([42] * 6)

    async def grpc_ids():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            msgs = await collect(pbg.GenerationStub(ch), pb.GenerateRequest(
                text=PROMPTS[0], sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, logit_bias={42: 100})))
        return [t for m in msgs for t in m.token_ids]
    assert cluster.run(grpc_ids()) == [42] * 6
    msgs = [{"role": "user", "content": "Say hi."}]
    free = sync(cluster, lambda: client.chat.completions.create(model=model, messages=msgs, max_tokens=64,
                                                                temperature=0))
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 40
    m = free.usage.completion_tokens + 10
    held = sync(cluster, lambda: client.chat.completions.create(model=model, messages=msgs, max_tokens=64,
                                                                temperature=0, extra_body={"min_tokens": m}))
    assert held.usage.completion_tokens >= m
    assert held.choices[0].message.content.startswith(free.choices[0].message.content)
    assert not [r for r in caplog.records if "placing again" in r.getMessage()]
    assert {r["kind"] for r in done_lines(caplog)} == {"remote"}


def test_a_client_gone_before_its_whole_answer_frees_its_blocks(cluster, model, caplog):
    """A non-streamed request whose client leaves is cancelled on every worker, as a stream is; before,
    it generated to max_tokens for no one."""
    caplog.set_level(logging.INFO, logger="pdcluster.router")

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=2.0)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(f"{base_url(cluster)}/completions", json={
                    "model": model, "prompt": "Tell a very long story.", "max_tokens": 1500, "ignore_eos": True})
        return await idle_pools(cluster, timeout=10.0)     # 1,500 tokens take far longer than that here
    cluster.run(go())
    line = done_lines(caplog)[-1]
    assert line["status"] == "cancelled" and 0 < line["completion"] < 1500


def test_a_stream_whose_client_leaves_during_the_prefill_never_gets_a_first_token(cluster, model, caplog):
    """The client leaves while its ~1,800-token prompt is being prefilled: the request is cancelled
    then, not when its first token finds the client gone."""
    caplog.set_level(logging.INFO, logger="pdcluster.router")
    prompt = [9 + (i * 7) % 40000 for i in range(1800)]          # token ids: no prefix of them is cached

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=0.3)) as c:
            with pytest.raises(httpx.ReadTimeout):
                async with c.stream("POST", f"{base_url(cluster)}/completions", json={
                        "model": model, "prompt": prompt, "max_tokens": 16, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        pass
        return await idle_pools(cluster)
    cluster.run(go())
    line = [r for r in done_lines(caplog) if r["prompt"] == len(prompt)][-1]
    assert line["status"] == "cancelled" and line["ttft_ms"] is None and line["completion"] == 0, line


def test_a_client_gone_mid_stream_frees_its_blocks(cluster, model, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.router")

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", f"{base_url(cluster)}/completions",
                                json={"model": model, "prompt": "Tell a long story.", "max_tokens": 200,
                                      "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break                                      # leave after the first chunk
        return await idle_pools(cluster)
    cluster.run(go())
    line = done_lines(caplog)[-1]
    assert line["status"] == "cancelled" and line["completion"] >= 1       # what went out is counted


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_past_4_mib_is_refused_before_it_is_buffered(cluster, model, chunked):
    big = json.dumps({"model": model, "prompt": "x" * (5 * 2**20)}).encode()

    async def chunks():
        for i in range(0, len(big), 2**16):
            yield big[i:i + 2**16]

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            return await c.post(f"{base_url(cluster)}/completions", content=chunks() if chunked else big,
                                headers={"content-type": "application/json"})
    r = cluster.run(go())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text


def test_a_wrong_path_method_or_unparsable_body_still_gets_an_openai_error(cluster):
    async def go():
        async with httpx.AsyncClient(timeout=30) as c:
            return [await c.get(f"{base_url(cluster)}/nope"), await c.get(f"{base_url(cluster)}/completions"),
                    await c.post(f"{base_url(cluster)}/completions", content=b"{not json",
                                 headers={"content-type": "application/json"})]
    got = cluster.run(go())
    assert [r.status_code for r in got] == [404, 405, 400]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in got), [r.text for r in got]


def test_streamed_completion_logprobs_text_offset_continues_across_chunks(cluster, client, model):
    kw = dict(model=model, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=1)
    whole = sync(cluster, lambda: client.completions.create(**kw)).choices[0].logprobs
    chunks = sync(cluster, lambda: list(client.completions.create(stream=True, **kw)))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(streamed) > 1                                        # several chunks carry tokens
    assert sum((lp.tokens for lp in streamed), []) == whole.tokens
    assert sum((lp.text_offset for lp in streamed), []) == whole.text_offset    # was 0 at each chunk's start
    ends = [o + len(t) for o, t in zip(whole.text_offset, whole.tokens)]
    assert whole.text_offset == [0] + ends[:-1]


def test_without_a_valid_token_every_request_is_401_before_its_body_is_looked_at(cluster, model):
    """Auth runs before the body is read: a bad (or oversized, or unparsable) body without a valid
    token is 401, not 400/413; with the token the same body gets its 400. The real app on the
    cluster's router, through httpx's in-process ASGI transport."""
    from pdcluster.router.auth import TokenAuth
    from pdcluster.router.openai.app import Api, asgi_app
    token = "tok-alice-0123456789"
    api = Api(cluster.router, model, cluster.http.api.vocab_size, auth=TokenAuth({token: "alice"}))
    bad = {"model": model, "prompt": "Hi", "max_tokens": 0, "frobnicate": 1}

    async def go():
        transport = httpx.ASGITransport(app=asgi_app(api))
        async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=60) as c:
            out = {}
            for name, auth in (("none", None), ("wrong", "Bearer tok-mallory-0123456789"),
                               ("not bearer", f"Basic {token}"), ("right", f"Bearer {token}")):
                h = {"authorization": auth} if auth else {}
                out[name] = [await c.post("/v1/completions", json=bad, headers=h),
                             await c.post("/v1/completions", content=b"{not json", headers=h),
                             await c.post("/v1/chat/completions", content=b"x" * (5 * 2**20), headers=h),
                             await c.get("/v1/nope", headers=h)]
            health = await c.get("/health")
            ok = await c.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2},
                              headers={"authorization": f"bearer {token}"})     # the scheme in any case
            return out, health, ok
    out, health, ok = cluster.run(go())         # (api tokenizes on the router's thread: the router's to close)
    for name in ("none", "wrong", "not bearer"):
        assert [r.status_code for r in out[name]] == [401] * 4, (name, [r.text for r in out[name]])
        assert all(r.json()["error"]["type"] == "authentication_error" for r in out[name])
    assert [r.status_code for r in out["right"]] == [400, 400, 413, 404], [r.text for r in out["right"]]
    assert health.status_code == 200 and ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_grpc_n_choices_carry_their_index_and_equal_http_s_choices(cluster, model):
    """gRPC's sampling.n fans out as the HTTP API's n does (one shared code path): each choice's
    messages carry its index, a first message with placement and a last with usage; seeded choice j
    uses seed + j, so gRPC's choices equal HTTP's; the choices share the prompt's prefill."""
    prompt = PROMPTS[-1]

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            msgs = await collect(pbg.GenerationStub(ch), pb.GenerateRequest(
                text=prompt, sampling=pb.SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3)))
        async with openai.AsyncOpenAI(base_url=base_url(cluster), api_key="unused", max_retries=0) as c:
            r = await c.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=3)
        await idle_pools(cluster)
        return msgs, r
    msgs, r = cluster.run(go())
    by = {}
    for m in msgs:
        by.setdefault(m.index, []).append(m)
    assert sorted(by) == [0, 1, 2]
    for ms in by.values():
        assert ms[0].HasField("placement") and not any(m.HasField("placement") for m in ms[1:])
        assert ms[-1].finish_reason == pb.FINISH_REASON_LENGTH and ms[-1].usage.completion_tokens == 6
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in ms[:-1])
    texts = ["".join(m.text for m in by[k]) for k in range(3)]
    assert texts == [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1                                      # seeds 11, 12, 13 differ
    assert max(by[k][-1].usage.cached_prompt_tokens for k in by) >= 16   # a choice hit the shared prefix


def test_echo_with_logprobs_gives_the_prompt_s_logprobs_as_transformers_does(cluster, client, model, hf_ref):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 1), prefilled remotely, and over gRPC with
    a local prefill (the cost model kept local: left free, it may choose either by the rates it has learnt
    so far): every prompt token's logprob from the reference's own forward."""
    import torch
    from pdcluster.router.placement import make_policy
    text = "The capital of France is Paris"
    ids = cluster.router.tokenizer.encode(text, add_special_tokens=False)
    with torch.inference_mode():
        ref = hf_ref(torch.tensor([ids])).logits[0].log_softmax(-1)
    r = sync(cluster, lambda: client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0,
                                                        logprobs=1, echo=True))
    c = r.choices[0]
    assert c.text.startswith(text) and len(c.text) > len(text)
    lp = c.logprobs
    assert lp.tokens[:len(ids)] == [cluster.router.tokenizer.decode([t]) for t in ids]
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for q in range(1, len(ids)):
        assert abs(lp.token_logprobs[q] - float(ref[q - 1, ids[q]])) < 2e-3, q
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    plain = sync(cluster, lambda: client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0,
                                                            echo=True))
    assert plain.choices[0].text == c.text and plain.choices[0].logprobs is None

    def streamed():
        return list(client.completions.create(model=model, prompt=text, max_tokens=3, temperature=0, echo=True,
                                              stream=True))
    chunks = sync(cluster, streamed)
    assert chunks[0].choices[0].text.startswith(text)

    async def local():
        r = cluster.router
        old = r.policy
        r.policy = make_policy("cost-model", index=r.index, telemetry=r.telemetry, remote_prefill=False)
        try:
            async with grpc.aio.insecure_channel(cluster.address) as ch:
                return await collect(pbg.GenerationStub(ch), pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=ids),
                    sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)))
        finally:
            r.policy = old
    msgs = cluster.run(local())
    assert msgs[0].placement.remote_prefill is False
    got = msgs[0].prompt_logprobs
    assert [x.token_id for x in got] == ids[1:] and all(not m.prompt_logprobs for m in msgs[1:])
    for q, x in enumerate(got, start=1):
        assert abs(x.logprob - float(ref[q - 1, ids[q]])) < 2e-3 and len(x.top) == 2


def test_tokenize_counts_what_the_completions_and_chat_prompts_take_and_detokenize_inverts_it(cluster, client, model):
    url = f"http://127.0.0.1:{cluster.http.port}"

    def post(path, body):
        return sync(cluster, lambda: httpx.post(url + path, json={"model": model} | body, timeout=60))
    r = post("/tokenize", {"prompt": PROMPTS[2], "return_token_strs": True}).json()
    done = sync(cluster, lambda: client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=1))
    assert r["count"] == len(r["tokens"]) == done.usage.prompt_tokens
    assert r["max_model_len"] == cluster.router.context_tokens
    assert "".join(r["token_strs"]).replace("Ġ", " ") == PROMPTS[2]
    assert post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": PROMPTS[2]}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    chat = post("/tokenize", {"messages": msgs, "tools": [WEATHER_TOOL]}).json()
    answered = sync(cluster, lambda: client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_TOOL],
                                                                    max_tokens=1))
    assert chat["count"] == answered.usage.prompt_tokens
    assert post("/tokenize", {"messages": msgs}).json()["count"] < chat["count"]      # the tools' system text
    for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"), ("/tokenize", {"prompt": ""}, "prompt")]:
        bad = post(path, body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    assert post("/detokenize", {"tokens": [1], "model": "gpt-4"}).status_code == 404
    for path, body in (("/tokenize", {"prompt": PROMPTS[2]}), ("/detokenize", {"tokens": r["tokens"]})):
        unnamed = sync(cluster, lambda: httpx.post(url + path, json=body, timeout=60))     # (was a 400: model required)
        assert unnamed.status_code == 200 and unnamed.json() == post(path, body).json(), unnamed.text
