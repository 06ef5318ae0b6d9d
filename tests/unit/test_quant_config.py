"""--quantization through the config tree: serve's flag, pools.yaml per pool, the offline engine's edge."""
import argparse

import pytest

from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.flags import add_flags, apply_flags
from pdcluster.deploy.pools import PoolsConfigError, parse_pools_config


def _serve(argv):
    p = argparse.ArgumentParser()
    flags = add_flags(p, ClusterConfig())
    return apply_flags(ClusterConfig(), p.parse_args(argv), flags)


def test_serve_flag_reaches_both_pools():
    c = _serve(["--quantization", "int8"])
    assert c.engine.quantization == "int8"
    assert c.engine_kwargs("prefill")["quantization"] == c.engine_kwargs("decode")["quantization"] == "int8"
    assert _serve([]).engine_kwargs("decode")["quantization"] == "none"      # float by default
    with pytest.raises(SystemExit):
        _serve(["--quantization", "fp4"])


def test_pools_yaml_sets_it_per_pool():
    c = parse_pools_config("decode: {quantization: int4}\nprefill: {quantization: none}\n",
                           base=_serve(["--quantization", "int8"]))
    assert c.engine_kwargs("decode")["quantization"] == "int4"
    assert c.engine_kwargs("prefill")["quantization"] == "none"
    # a pool that leaves it out (or sets null) gets the engine section's
    c = parse_pools_config("decode: {quantization: null}\n", base=_serve(["--quantization", "int8"]))
    assert c.engine_kwargs("decode")["quantization"] == c.engine_kwargs("prefill")["quantization"] == "int8"
    with pytest.raises(PoolsConfigError, match=r"<string>:2: decode.quantization: must be one of none, int8, int4"):
        parse_pools_config("prefill: {}\ndecode: {quantization: q4}\n")


def test_offline_engine_refuses_an_unknown_mode_before_loading():
    from pdcluster.engine.llm_engine import build_config
    with pytest.raises(ValueError, match="quantization must be one of none, int8, int4"):
        build_config(None, quantization="fp8")
    assert build_config(None, quantization="int4").quantization == "int4"
