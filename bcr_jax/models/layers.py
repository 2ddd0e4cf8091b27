"""The decoder's primitives, each written once: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Shape letters: b batch, t query positions, s key positions, d model width, n query heads, k key/value heads,
g query heads per kv head (n = k * g), h head dim, f MLP width, v vocabulary, j / i key / query blocks, c positions
within a block.
Numerics follow Hugging Face: norms, RoPE angles, attention scores and softmax run in float32; matmul inputs stay in
the param dtype (bf16 on accelerators) with float32 accumulation for the attention scores.

Attention comes in two shapes. `attend` reads keys/values held in KV-cache blocks under an explicit [b, t, s] mask
(decode, and any forward that reads a cache). `causal_attention` is for a whole sequence attending to itself (training
forward/backward, prefill into an empty cache) under the causal mask and a [b, s] key-padding mask, with one of
`ATTENTION_IMPLEMENTATIONS`: "plain" (`attend` on the full [b, t, s] scores: memory quadratic in t), "blocked"
(pure-JAX online softmax over key blocks, rematerialised per query block: memory linear in t, any backend),
"cudnn" (`jax.nn.dot_product_attention(implementation="cudnn")`, GPU), "splash" (the Pallas splash-attention
kernel, TPU), or "auto" (`resolve_attention`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bcr_jax.models.config import ATTENTION_IMPLEMENTATIONS, ModelConfig

# Large finite negative instead of -inf: a fully masked row (a padding query) then softmaxes to uniform, not NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def rms_norm(x, scale, eps: float):
    """RMSNorm over the last axis, computed in float32, returned in the input dtype (as transformers does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [h/2] (float64 numpy, exact) and the cos/sin scale, for every supported `rope_type`."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    params = dict(cfg.rope_scaling)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        # Long wavelengths are interpolated by `factor`, short ones kept, with a smooth blend in between.
        low_freq_factor, high_freq_factor = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_context = float(params["original_max_position_embeddings"])
        low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        old_context = float(params.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)

        def correction_dim(num_rotations):
            return dim * math.log(old_context / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation_weight = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        return inv_freq, float(attention_factor)
    raise ValueError(f"rope_type={rope_type!r} is not supported")


def rope_cos_sin(cfg: ModelConfig, positions_bt):
    """cos and sin [b, t, h/2] in float32 (bf16 cannot represent positions past 256 exactly)."""
    inv_freq, scale = rope_frequencies(cfg)
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles_bth) * scale, jnp.sin(angles_bth) * scale


def apply_rope(x_btnh, cos_bth, sin_bth):
    """Rotates halves (the Hugging Face convention, not interleaved pairs); float32 math, input dtype out."""
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


def attend(q_btnh, key_blocks, value_blocks, mask_bts):
    """Grouped-query softmax attention over keys/values held in one or more blocks of slots; `mask_bts` is True where
    query t may read key s (s runs over the blocks in order). Returns [b, t, n, h].

    Keys come as [b, k, h, s_i] and values as [b, k, s_i, h] (the KV-cache layouts): both contractions are then
    plain batched matmuls over (b, k) whose right operand is already in row-major [contracted, free] order. With
    keys as [b, k, s, h], XLA:CPU re-packed the whole key cache on every decode step (4x slower scores). Blocks are
    read in place, never concatenated: one softmax runs over the concatenated scores (a few floats per slot), so the
    result is exactly that of one block holding every slot.
    """
    b, t, n, h = q_btnh.shape
    kv_heads = key_blocks[0].shape[1]
    q_bkgth = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    scores = jnp.concatenate([jnp.einsum("bkgth,bkhs->bkgts", q_bkgth, k_bkhs, preferred_element_type=jnp.float32)
                              for k_bkhs in key_blocks], axis=-1)
    scores = scores * (1.0 / math.sqrt(h))
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(value_blocks[0].dtype)
    starts = np.cumsum([0] + [v_bksh.shape[2] for v_bksh in value_blocks])
    parts = [jnp.einsum("bkgts,bksh->bkgth", probs[..., start:end], v_bksh, preferred_element_type=jnp.float32)
             for start, end, v_bksh in zip(starts[:-1], starts[1:], value_blocks)]
    out_bkgth = sum(parts[1:], parts[0]).astype(value_blocks[0].dtype)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)  # a free bitcast when t = 1 (decode)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x, w, transpose_w: bool = False, out_dtype=None):
    """`x [..., i] @ w [i, o]` (or `@ w.T` for `w [o, i]` with `transpose_w`), with a backward pass laid out for
    XLA:CPU.

    The weight gradient contracts the two activations over their rows (tokens). XLA:CPU's matmuls take the left
    operand with its contracted axis last, so it copies the left one into a transposed layout first. JAX's own
    transpose rule always puts the output cotangent on the left: for the MLP's gate/up projections and the lm_head
    that is the wide [tokens, f or v] array, and the copy (fused with the SiLU backward) cost more than the matmul.
    Here the narrower activation goes on the left, so the copy is the small one. Same values as the plain einsum
    (one f32 matmul either way); no effect on other backends' results.
    """
    spec = "...i,oi->...o" if transpose_w else "...i,io->...o"
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def _dense_fwd(x, w, transpose_w, out_dtype):
    return dense(x, w, transpose_w, out_dtype), (x, w)


def _dense_bwd(transpose_w, out_dtype, residuals, g):
    x, w = residuals
    dx = jnp.einsum("...o,oi->...i" if transpose_w else "...o,io->...i", g, w,
                    preferred_element_type=jnp.float32).astype(x.dtype)
    x_ti, g_to = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if x_ti.shape[1] <= g_to.shape[1]:  # transpose x (the narrower): dw[i, o] directly
        dw_io = jnp.einsum("ti,to->io", x_ti, g_to, preferred_element_type=jnp.float32)
        dw = dw_io.T if transpose_w else dw_io
    else:  # transpose g: dw[o, i], then the (small) weight-shaped transpose if needed
        dw_oi = jnp.einsum("to,ti->oi", g_to, x_ti, preferred_element_type=jnp.float32)
        dw = dw_oi if transpose_w else dw_oi.T
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def swiglu_mlp(p, x_btd):
    gate_btf = dense(x_btd, p["gate_proj"]["kernel"])
    up_btf = dense(x_btd, p["up_proj"]["kernel"])
    return dense(jax.nn.silu(gate_btf) * up_btf, p["down_proj"]["kernel"])


# ------------------------------------------------------------------------------------------- full-sequence attention

def resolve_attention(implementation: str, seq_len: int, block_size: int, dtype) -> str:
    """The implementation "auto" stands for on this backend and length (others are returned as they are).

    Sequences of at most one block use "plain" (its memory is then one block's anyway). Longer ones: cuDNN's fused
    kernel on GPU when it supports the dtype (bf16/f16 only), the splash kernel on TPU, the blocked path elsewhere.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if seq_len <= block_size:
        return "plain"
    backend = jax.default_backend()
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "blocked"


def causal_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, *, implementation: str = "plain", block_size: int = 512,
                     mesh=None, interpret: bool = False):
    """Causal grouped-query attention of a whole sequence over itself: query t reads key s when s <= t and
    `key_valid_bs[:, s]` (False marks padding, left or right). Returns [b, t, n, h] in the value dtype.

    Rows whose query is padding have no meaning (as in `attend`, they may read anything). `mesh`: the training mesh,
    over which the splash kernel runs per device. `interpret` runs the splash kernel in the Pallas interpreter (tests
    on CPU).
    """
    implementation = resolve_attention(implementation, q_btnh.shape[1], block_size, v_btkh.dtype)
    if implementation == "plain":
        t = q_btnh.shape[1]
        mask_bts = key_valid_bs[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
        return attend(q_btnh, (k_btkh.transpose(0, 2, 3, 1),), (v_btkh.transpose(0, 2, 1, 3),), mask_bts)
    if implementation == "blocked":
        return blocked_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, block_size=block_size)
    if implementation == "cudnn":
        if jax.default_backend() not in ("gpu", "cuda"):
            raise ValueError(f"attention='cudnn' needs a GPU backend, this one is {jax.default_backend()!r}; "
                             "use attention='auto' or 'blocked'")
        return fused_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, implementation="cudnn")
    return splash_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, block_size=block_size, mesh=mesh,
                            interpret=interpret)


def blocked_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, *, block_size: int):
    """Flash-style attention in pure JAX: for each query block (`lax.map`), an online softmax over the key blocks at
    or before it (`lax.scan`; blocks after the diagonal are skipped by a `lax.cond`). Each query block is a
    `jax.checkpoint`, so the backward pass keeps only its inputs and recomputes one block's scores at a time: memory
    grows linearly in t (the plain path's [b, n, t, s] scores grow quadratically). Equal to `attend` up to float
    rounding: same float32 scores and softmax, in a different summation order.
    """
    b, t, n, h = q_btnh.shape
    kv_heads, c = k_btkh.shape[2], block_size
    g, num_blocks = n // kv_heads, -(-t // block_size)
    pad = num_blocks * c - t
    if pad:  # padded keys are invalid; padded queries are dropped at the end
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_btnh, k_btkh, v_btkh))
        key_valid_bs = jnp.pad(key_valid_bs, ((0, 0), (0, pad)))
    q_ibkgch = q_btnh.reshape(b, num_blocks, c, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5)
    k_jbkch = k_btkh.reshape(b, num_blocks, c, kv_heads, h).transpose(1, 0, 3, 2, 4)
    v_jbkch = v_btkh.reshape(b, num_blocks, c, kv_heads, h).transpose(1, 0, 3, 2, 4)
    valid_jbc = key_valid_bs.reshape(b, num_blocks, c).transpose(1, 0, 2)
    within_c = jnp.arange(c)
    scale = 1.0 / math.sqrt(h)

    def query_block(i, q_bkgch):
        def key_block(carry, key_xs):
            j, k_bkch, v_bkch, valid_bc = key_xs

            def update(carry):
                m_bkgc, l_bkgc, acc_bkgch = carry
                s_bkgcs = jnp.einsum("bkgch,bksh->bkgcs", q_bkgch, k_bkch, preferred_element_type=jnp.float32) * scale
                causal_cs = (j * c + within_c)[None, :] <= (i * c + within_c)[:, None]
                s_bkgcs = jnp.where(valid_bc[:, None, None, None, :] & causal_cs, s_bkgcs, _MASK_VALUE)
                # The result does not depend on the running max (it cancels): no gradient through it.
                m_new = jax.lax.stop_gradient(jnp.maximum(m_bkgc, s_bkgcs.max(axis=-1)))
                correction = jnp.exp(m_bkgc - m_new)
                p_bkgcs = jnp.exp(s_bkgcs - m_new[..., None])
                pv_bkgch = jnp.einsum("bkgcs,bksh->bkgch", p_bkgcs.astype(v_bkch.dtype), v_bkch,
                                      preferred_element_type=jnp.float32)
                return m_new, l_bkgc * correction + p_bkgcs.sum(axis=-1), acc_bkgch * correction[..., None] + pv_bkgch

            return jax.lax.cond(j <= i, update, lambda carry: carry, carry), None

        stats = jnp.full((b, kv_heads, g, c), _MASK_VALUE, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros((b, kv_heads, g, c, h), jnp.float32))
        (_, l_bkgc, acc_bkgch), _ = jax.lax.scan(key_block, init, (jnp.arange(num_blocks), k_jbkch, v_jbkch, valid_jbc))
        return (acc_bkgch / l_bkgc[..., None]).astype(v_btkh.dtype)

    out_ibkgch = jax.lax.map(lambda xs: jax.checkpoint(query_block, prevent_cse=False)(*xs),
                             (jnp.arange(num_blocks), q_ibkgch))
    out_btnh = out_ibkgch.transpose(1, 0, 4, 2, 3, 5).reshape(b, num_blocks * c, n, h)
    return out_btnh[:, :t]


def _compact_valid_first(key_valid_bs):
    """Per row, the permutation that moves valid positions first (stable, so their order is kept), its inverse and
    the number of valid positions. Causal attention among valid tokens only depends on their order, so any padding
    (left, right, holes) becomes right padding, which the fused kernels express as sequence lengths."""
    order_bs = jnp.argsort(~key_valid_bs, axis=1, stable=True)
    inverse_bs = jnp.argsort(order_bs, axis=1)
    return order_bs, inverse_bs, key_valid_bs.sum(axis=1).astype(jnp.int32)


def fused_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, *, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` with `implementation` ("cudnn": cuDNN's fused flash attention on GPU, bf16/f16,
    GQA native; "xla" runs the same call anywhere, for tests). Padding is moved to the right and passed as sequence
    lengths, so no [b, t, s] mask or bias is built."""
    order_bs, inverse_bs, lengths_b = _compact_valid_first(key_valid_bs)
    gather = lambda x, index_bs: jnp.take_along_axis(x, index_bs[:, :, None, None], axis=1)
    out_btnh = jax.nn.dot_product_attention(
        gather(q_btnh, order_bs), gather(k_btkh, order_bs), gather(v_btkh, order_bs), is_causal=True,
        query_seq_lengths=lengths_b, key_value_seq_lengths=lengths_b, implementation=implementation)
    return gather(out_btnh, inverse_bs)


def _splash_block(seq_len: int, block_size: int) -> int:
    """Largest multiple of 128 (the TPU lane width) that is <= block_size and divides seq_len."""
    for size in range(max(128, block_size - block_size % 128), 127, -128):
        if seq_len % size == 0:
            return size
    return 128


@functools.lru_cache(maxsize=64)
def _splash_kernel(seq_len: int, query_heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * query_heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_btnh, k_btkh, v_btkh, key_valid_bs, *, block_size: int = 512, mesh=None,
                     interpret: bool = False):
    """The Pallas splash-attention kernel (TPU): one MQA kernel per (row, kv head) over its g query heads; padding
    as segment ids (0 padding, 1 tokens), so a padding query reads only padding keys and never an empty row.

    With a multi-device `mesh` (ModelConfig.mesh, else the context mesh of `jax.sharding.use_mesh`), the kernel runs
    per device in a `shard_map` over the batch ("data", "fsdp") and kv-head ("tensor") axes: XLA cannot partition a
    Pallas call itself and would gather its operands onto every device.
    """
    if jax.default_backend() != "tpu" and not interpret:
        raise ValueError(f"attention='splash' needs a TPU backend, this one is {jax.default_backend()!r}; "
                         "use attention='auto' or 'blocked'")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, t, n, h = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    g = n // kv_heads
    pad = -t % 128
    if pad:  # the kernel tiles by 128; padded keys are their own segment, padded queries are dropped
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_btnh, k_btkh, v_btkh))
        key_valid_bs = jnp.pad(key_valid_bs, ((0, 0), (0, pad)))
    seq_len = t + pad
    kernel = _splash_kernel(seq_len, g, _splash_block(seq_len, block_size), interpret)
    # The kernel applies no softmax scale: scale the queries (in float32, then back to their dtype).
    q_bkgth = (q_btnh.astype(jnp.float32) / math.sqrt(h)).astype(q_btnh.dtype)
    q_bkgth = q_bkgth.reshape(b, seq_len, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
    k_bkth, v_bkth = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)

    def per_device(q_bkgth, k_bkth, v_bkth, valid_bt):
        segments_bt = valid_bt.astype(jnp.int32)
        per_head = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
        per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None))  # over kv heads
        return jax.vmap(per_row)(q_bkgth, k_bkth, v_bkth, segments_bt)

    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or mesh.size == 1:
        out_bkgth = per_device(q_bkgth, k_bkth, v_bkth, key_valid_bs)
    else:
        from jax.sharding import PartitionSpec as P

        batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape and b % mesh.shape[a] == 0) or None
        if batch and b % math.prod(mesh.shape[a] for a in batch):
            batch = batch[:1]
        heads = "tensor" if "tensor" in mesh.shape and kv_heads % mesh.shape["tensor"] == 0 else None
        spec4, spec2 = P(batch, heads, None, None), P(batch, None)
        out_bkgth = jax.shard_map(per_device, mesh=mesh, in_specs=(P(batch, heads, None, None, None), spec4, spec4,
                                                                    spec2),
                                  out_specs=P(batch, heads, None, None, None), check_vma=False)(
            q_bkgth, k_bkth, v_bkth, key_valid_bs)
    out_btnh = out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, seq_len, n, h)
    return out_btnh[:, :t].astype(v_btkh.dtype)
