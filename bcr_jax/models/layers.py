"""The decoder's primitives, each written once: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Shape letters: b batch, t query positions, s key positions, d model width, n query heads, k key/value heads,
g query heads per kv head (n = k * g), h head dim, f MLP width, v vocabulary.
Numerics follow Hugging Face: norms, RoPE angles, attention scores and softmax run in float32; matmul inputs stay in
the param dtype (bf16 on accelerators) with float32 accumulation for the attention scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bcr_jax.models.config import ModelConfig

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


def swiglu_mlp(p, x_btd):
    gate_btf = jnp.einsum("btd,df->btf", x_btd, p["gate_proj"]["kernel"])
    up_btf = jnp.einsum("btd,df->btf", x_btd, p["up_proj"]["kernel"])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, p["down_proj"]["kernel"])
