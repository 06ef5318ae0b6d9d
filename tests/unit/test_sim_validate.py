"""The simulator-vs-cluster validation's pure parts (sim/validate.py) and `pdcluster plan --validate`'s
argument handling (no cluster is started here: bad arguments are refused before the probe)."""
import math
from dataclasses import replace

import pytest

from pdcluster.sim import validate as V
from pdcluster.sim.cluster import Simulator
from pdcluster.sim.roofline import Roofline
from pdcluster.sim.models import model as model_profile


def _probe_from(hw, batches=(1, 2, 4, 8), ctx=96, read_bw=None) -> V.StepProbe:
    roof = Roofline(model_profile(V.LOCAL_MODEL), hw, 1)
    return V.StepProbe(1, tuple((n, roof.prefill_s([(n, 0)])) for n in (32, 128, 384)),
                       tuple((b, b * ctx, roof.decode_s(b, b * ctx)) for b in batches), read_bw)


TRUE = replace(V.HARDWARE["cpu"], peak_flops=40e9, mfu=1.0, mem_bw=8e9, bw_eff=1.0, step_overhead_s=0.02,
               per_seq_overhead_s=0.01)


def test_fit_recovers_a_known_profile_and_not_another():
    hw = V.fit_profile(_probe_from(TRUE))
    assert hw.peak_flops == pytest.approx(40e9, rel=0.02)
    assert hw.step_overhead_s == pytest.approx(0.02, rel=0.1)
    assert hw.mem_bw == pytest.approx(8e9, rel=0.05)            # a 60-per-decade grid
    assert hw.per_seq_overhead_s == pytest.approx(0.01, rel=0.1)
    for step, meas, fit in V.fit_report(_probe_from(TRUE), hw):
        assert fit == pytest.approx(meas, rel=0.03), step
    other = V.fit_profile(_probe_from(replace(TRUE, step_overhead_s=0.05, per_seq_overhead_s=0.03)))   # control
    assert other.step_overhead_s == pytest.approx(0.05, rel=0.1)
    assert other.per_seq_overhead_s == pytest.approx(0.03, rel=0.1)
    # a prompt step's own fixed cost, with the read bandwidth measured beside the steps
    third = V.fit_profile(_probe_from(replace(TRUE, prefill_overhead_s=0.1), read_bw=8e9))
    assert third.mem_bw == 8e9 and third.prefill_overhead_s == pytest.approx(0.1, rel=1e-3)
    assert third.step_overhead_s == pytest.approx(0.02, rel=1e-3) and hw.prefill_overhead_s < 1e-3
    with pytest.raises(ValueError, match="read_bw"):
        V.fit_profile(_probe_from(TRUE, read_bw=-1.0))


def test_step_share_and_scaling():
    hw = V.fit_profile(_probe_from(TRUE))
    roof = Roofline(model_profile(V.LOCAL_MODEL), hw, 1)
    c = dict(steps=12, decode_steps=10, decode_seqs=30, decode_s=10 * roof.decode_s(3, 0),
             prefill_tokens=256, prefill_s=2 * roof.prefill_s([(128, 0)]))
    assert V.step_share(hw, [c]) == pytest.approx(1.0)
    slow = dict(c, decode_s=c["decode_s"] * 2, prefill_s=c["prefill_s"] * 2)
    assert V.step_share(hw, [slow]) == pytest.approx(2.0)                  # control: half the CPU
    assert V.step_share(hw, []) is None
    prefill_only = dict(c, prefill_s=c["prefill_s"] * 3)
    assert V.step_share(hw, [prefill_only], kind="prefill") == pytest.approx(3.0)
    assert V.step_share(hw, [prefill_only], kind="decode") == pytest.approx(1.0)
    assert V.step_share(hw, [dict(c, steps=10)], kind="prefill") is None     # no prompt steps
    half = Roofline(model_profile(V.LOCAL_MODEL), V.scaled(hw, 2.0), 1)
    assert half.decode_s(3, 0) == pytest.approx(2 * roof.decode_s(3, 0))
    assert half.prefill_s([(128, 0)]) == pytest.approx(2 * roof.prefill_s([(128, 0)]))
    split = Roofline(model_profile(V.LOCAL_MODEL), V.scaled(hw, 1.0, 2.0), 1)     # decode side only
    assert split.decode_s(3, 0) == pytest.approx(2 * roof.decode_s(3, 0))
    assert split.prefill_s([(128, 0)]) < 1.5 * roof.prefill_s([(128, 0)])
    with pytest.raises(ValueError):
        V.scaled(hw, 0.0)


def test_fit_sizes_the_kv_pool_and_refuses_a_flat_probe():
    hw = V.fit_profile(_probe_from(TRUE), kv_blocks=112, block_size=16)
    assert Roofline(model_profile(V.LOCAL_MODEL), hw, 1).capacity_tokens // 16 == 112
    flat = V.StepProbe(1, ((32, 0.5), (128, 0.4)), ((1, 10, 0.1),))
    with pytest.raises(ValueError, match="compute rate"):
        V.fit_profile(flat)
    with pytest.raises(ValueError, match="two or more lengths"):
        V.StepProbe(1, ((32, 0.5),), ((1, 10, 0.1),))


def test_sim_requests_keep_token_level_prefix_structure():
    a = list(range(40))
    b = list(range(32)) + [99] * 8            # same first 2 blocks of 16, different third
    c = [7] + list(range(1, 40))              # differs in the first block
    reqs = V.sim_requests([a, b, c], [4, 4, 4], [0.0, 0.5, 1.0], 16)
    assert [len(r.hashes) for r in reqs] == [2, 2, 2] and reqs[1].input_len == 40
    assert reqs[0].hashes == reqs[1].hashes
    assert reqs[0].hashes[0] != reqs[2].hashes[0] and reqs[0].hashes[1] != reqs[2].hashes[1]  # chained
    with pytest.raises(ValueError):
        V.sim_requests([a], [0], [0.0], 16)
    with pytest.raises(ValueError):
        V.sim_requests([a, b], [1], [0.0], 16)


def test_compare_and_table():
    c = V.compare("x", [1.0, 2.0, 3.0, 4.0], [0.10, 0.10], [1.25, 2.5, 3.75, 5.0], [0.14, 0.14])
    assert c.measured["ttft_mean"] == pytest.approx(2.5) and c.measured["ttft_p90"] == 4.0   # nearest rank
    assert c.error("ttft_mean") == pytest.approx(0.25) and c.within("ttft_mean")
    assert c.error("tpot_mean") == pytest.approx(0.4) and not c.within("tpot_mean")             # control
    table = V.format_table([c])
    assert "+40%" in table and "NO" in table and "+25%" in table
    empty = V.compare("y", [], [], [1.0], [0.1])
    assert math.isnan(empty.error("ttft_mean")) and not empty.within("ttft_mean")
    assert "n/a" in V.format_table([empty])
    assert set(c.as_dict()["error"]) == set(V.STATS)


def test_sim_config_follows_the_cluster():
    from pdcluster.bench.scenario import SCENARIOS
    from pdcluster.bench.scenarios import KV_BLOCK_BYTES, PREFIX_POOL_BLOCKS
    hw = V.fit_profile(_probe_from(TRUE))
    disagg = V.sim_config(SCENARIOS["colocated-vs-disagg"].candidate, hw)
    assert disagg.prefill.count == 1 and disagg.decode.count == 1 and disagg.policy == "least-loaded"
    colo = V.sim_config(SCENARIOS["colocated-vs-disagg"].baseline, hw)
    assert colo.prefill is None and colo.decode.count == 2
    pr = SCENARIOS["prefix-routing"].candidate
    assert V.sim_config(pr, hw).policy == "cost-model" and V.sim_config(pr, hw).block_tokens == 16
    assert V.kv_blocks_of(pr, KV_BLOCK_BYTES) == PREFIX_POOL_BLOCKS


def test_cached_prompt_blocks_are_held_once():
    """Two requests on one 30-block decode worker, sharing a 16-block prefix: counted once, the second
    fits beside the first and hits its prefix; counted twice (the old model), it waits for the first."""
    hw = V.fit_profile(_probe_from(TRUE), kv_blocks=30, block_size=16)
    prefix = list(range(256))
    prompts = [prefix + [1000 + i] * 32 for i in range(2)]          # 18 blocks each (+1 output block)
    reqs = V.sim_requests(prompts, [40, 40], [0.0, 1.0], 16)
    from pdcluster.bench.scenario import SCENARIOS
    cfg = replace(V.sim_config(SCENARIOS["colocated-vs-disagg"].baseline, hw),
                  decode=V.PoolSpec(hw.name, 1))
    shared = Simulator(cfg, reqs).run()
    assert shared.router_waits == 0 and shared.records[1].cached == 256
    double = Simulator(replace(cfg, share_prefix_blocks=False), reqs).run()
    assert double.router_waits == 1 or double.records[1].first_s > shared.records[1].first_s


@pytest.mark.parametrize("argv, msg", [
    (["plan"], "needs --trace and --model"),
    (["plan", "--validate", "--validate-max-requests", "0"], "must be >= 1"),
    (["plan", "--validate", "--validate-time-scale", "0"], "--time-scale > 0"),
    (["plan", "--validate", "--trace", "/nonexistent/trace.jsonl"], "not found"),
])
def test_plan_validate_arguments(argv, msg, capsys):
    from pdcluster.deploy.cli import main
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_plan_validate_unknown_case_is_an_argparse_error(capsys):
    from pdcluster.deploy.cli import main
    with pytest.raises(SystemExit) as e:
        main(["plan", "--validate", "--validate-cases", "bogus"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_shared_host_slowdown_slows_only_concurrent_steps():
    from pdcluster.bench.scenario import SCENARIOS
    hw = V.fit_profile(_probe_from(TRUE), kv_blocks=200, block_size=16)
    cfg = V.sim_config(SCENARIOS["colocated-vs-disagg"].baseline, hw)          # 2 colocated workers
    two = V.sim_requests([list(range(100)), list(range(200, 300))], [2, 2], [0.0, 0.0], 16)
    alone = Simulator(cfg, two).run().records[0].ttft_s
    both = Simulator(replace(cfg, shared_host_slowdown=0.5), two).run().records
    assert both[0].decode != both[1].decode                                    # one on each worker
    assert both[1].ttft_s == pytest.approx(1.5 * alone, rel=0.02)              # the other one was stepping
    one = V.sim_requests([list(range(100))], [2], [0.0], 16)                   # control: nobody else steps
    assert Simulator(replace(cfg, shared_host_slowdown=0.5), one).run().records[0].ttft_s == pytest.approx(alone)


def test_fit_separates_the_prompt_attentions_rate_with_four_lengths():
    """Attention at a third of the linears' FLOP rate (torch's CPU flash kernel runs below the GEMMs): 4 prompt
    lengths recover both rates, and the 1,024-token step; the 3-length probe (one rate) misses it."""
    slow = replace(TRUE, attn_flops=TRUE.peak_flops / 3)
    roof = Roofline(model_profile(V.LOCAL_MODEL), slow, 1)
    lens = (32, 128, 384, 1024)
    probe = V.StepProbe(1, tuple((n, roof.prefill_s([(n, 0)])) for n in lens),
                        tuple((b, b * 96, roof.decode_s(b, b * 96)) for b in (1, 2, 4, 8)))
    hw = V.fit_profile(probe)
    assert hw.peak_flops == pytest.approx(40e9, rel=0.02) and hw.attn_flops == pytest.approx(40e9 / 3, rel=0.02)
    fit = Roofline(model_profile(V.LOCAL_MODEL), hw, 1)
    assert fit.prefill_s([(2048, 0)]) == pytest.approx(roof.prefill_s([(2048, 0)]), rel=0.02)
    assert fit.decode_s(2, 192, chunk=(64, 512)) == pytest.approx(roof.decode_s(2, 192, chunk=(64, 512)), rel=0.02)
    # control: three lengths fit one rate, which under-predicts a long prompt
    three = V.fit_profile(V.StepProbe(1, probe.prefill[:3], probe.decode))
    assert three.attn_flops is None
    assert Roofline(model_profile(V.LOCAL_MODEL), three, 1).prefill_s([(2048, 0)]) < 0.9 * roof.prefill_s([(2048, 0)])
    # one rate for both (attention as fast as the linears): no separate attention rate is kept
    same = Roofline(model_profile(V.LOCAL_MODEL), TRUE, 1)
    one = V.fit_profile(V.StepProbe(1, tuple((n, same.prefill_s([(n, 0)])) for n in lens), probe.decode))
    assert one.peak_flops == pytest.approx(40e9, rel=0.02)
    assert one.attn_flops is None or one.attn_flops == pytest.approx(40e9, rel=0.02)
    # scaled() slows both rates alike
    assert V.scaled(hw, 2.0).attn_flops == pytest.approx(hw.attn_flops / 2)
