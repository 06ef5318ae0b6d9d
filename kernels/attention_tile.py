"""One K/V tile of online-softmax attention (FlashAttention-2, base-2 exponent), shared by the
paged decode and prefill kernels; their torch references are beside them
(decode_attention.paged_decode_attention_ref, prefill_attention.paged_prefill_attention_ref)."""
from pdcluster.kernels._triton import tl, triton


@triton.jit
def attend_tile(q, k_ptrs, v_ptrs, kv_mask, valid, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr,
                ks=None, vs=None, QUANT: tl.constexpr = False):
    """q [M, D] against one tile of N keys/values at k_ptrs / v_ptrs [N, D] (loaded under kv_mask);
    scores are q.k * qk_scale, in log2 units; valid [M, N] or [1, N] marks those that count.
    Returns the running row max m_i [M], denominator l_i [M] and output acc [M, D], updated.
    QUANT: K/V are int8 / fp8 codes with float32 scales ks, vs [N] per row (its block's, for its kv
    head): the codes go into the dots as exact integers/fp8 values in q's dtype, the K scale
    multiplies the scores' columns and the V scale the probabilities' columns."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if QUANT:
        k = k.to(tl.float32).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if QUANT:
        s = s * ks[None, :]
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if QUANT:
        v = v.to(tl.float32).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(v.dtype), v, input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
