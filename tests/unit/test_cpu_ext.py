"""engine/cpu_ext.py: which library each host builds, what loaded, and the warning for emulated half-precision
GEMMs on CPU. Pure: the CPU's flags and the loaded ops are set by the tests."""
from pdcluster.engine import cpu_ext
from pdcluster.engine.quant import q4x8


def test_each_host_builds_the_library_its_cpu_runs(monkeypatch):
    """AVX-512 VNNI hosts build the whole set; AVX2 hosts (AMD Zen 2/3) the AVX2 subset with q4x8_mm, the float32
    linears and the greedy head; others none.
    The AVX2 subset alone does not make available() (the AVX-512-only callers' gate) true."""
    avx512 = set(cpu_ext.FLAGS) | {"avx2", "fma"}
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: avx512)
    assert cpu_ext.variant()[0] == cpu_ext.SOURCES
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"avx", "avx2", "fma", "f16c"})
    srcs, flags = cpu_ext.variant()
    assert srcs == cpu_ext.AVX2_SOURCES and "-mavx2" in flags and not any("avx512" in f for f in flags)
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"avx", "sse4_2"})
    assert cpu_ext.variant() is None
    monkeypatch.setattr(cpu_ext, "ops", lambda: frozenset(cpu_ext.AVX2_OPS))
    assert cpu_ext.has("q4x8_mm") and q4x8.available() and cpu_ext.has("paged_chunk_attention")
    assert cpu_ext.has("f32_mm") and cpu_ext.has("q4f32_mm") and cpu_ext.has("greedy_head")
    assert not cpu_ext.has("int8_amx_mm") and not cpu_ext.has("quantize_rows")
    assert not cpu_ext.available()


def test_a_half_precision_cpu_engine_without_native_gemms_is_warned_about(monkeypatch):
    """bfloat16 on an AVX2 host (no avx512_bf16 / amx_bf16) is emulated: a 128-token prompt 6.6x float32's here."""
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert "float32" in cpu_ext.slow_dtype_warning("bfloat16") and cpu_ext.slow_dtype_warning("float16")
    assert cpu_ext.slow_dtype_warning("float32") is None
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert cpu_ext.slow_dtype_warning("bfloat16") is None and cpu_ext.slow_dtype_warning("float16") is not None
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"amx_bf16", "amx_fp16"})
    assert cpu_ext.slow_dtype_warning("bfloat16") is None and cpu_ext.slow_dtype_warning("float16") is None
