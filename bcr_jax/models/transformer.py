"""One decoder for Qwen2, Qwen3 and Llama, as pure functions over a params pytree.

Params (a nested dict; per-layer weights are stacked along a leading layer axis `l`, so the decoder can run as one
`lax.scan` and one partition rule covers all layers):

    embed/embedding                 [v, d]
    layers/input_norm/scale         [l, d]
    layers/attn/{q,k,v}_proj/kernel [l, d, n|k, h]      layers/attn/{q,k,v}_proj/bias  [l, n|k, h]   (qkv_bias)
    layers/attn/o_proj/kernel       [l, n, h, d]
    layers/attn/{q,k}_norm/scale    [l, h]                                                           (qk_norm)
    layers/post_attn_norm/scale     [l, d]
    layers/mlp/{gate,up}_proj/kernel [l, d, f]          layers/mlp/down_proj/kernel    [l, f, d]
    final_norm/scale                [d]
    lm_head/kernel                  [d, v]                                                           (untied only)

The KV cache is an explicit pytree (`KVCache`) passed in and returned; nothing is hidden in mutable state.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from bcr_jax import sharding
from bcr_jax.models import layers
from bcr_jax.models.config import ModelConfig

Params = dict[str, Any]

# Named jax.checkpoint policies for a decoder layer (ModelConfig.remat): what the backward pass may keep instead of
# recomputing. "none" keeps everything (no remat); "full" keeps only the layer inputs. The offload policy keeps the
# same matmul outputs as dots_with_no_batch_dims_saveable but in pinned host memory instead of HBM (fetched back for
# the backward pass): it needs a backend with a "pinned_host" memory space (TPU, GPU, and XLA:CPU).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots_with_no_batch_dims": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
_OFFLOADING_POLICIES = ("offload_dots_with_no_batch_dims",)


def remat_policy(name: str):
    """The jax.checkpoint policy called `name`; raises naming the field for an unknown name or an offload policy on
    a backend without pinned host memory."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r}; choose from {sorted(REMAT_POLICIES)}")
    if name in _OFFLOADING_POLICIES:
        kinds = {memory.kind for memory in jax.local_devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise ValueError(f"remat={name!r} offloads to pinned host memory, which the {jax.default_backend()!r} "
                             f"backend lacks (memory kinds {sorted(kinds)}); use 'dots_with_no_batch_dims_saveable'")
    return REMAT_POLICIES[name]


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for a fixed number of slots, filled left to right, held in one or more blocks.

    One buffer per layer and block, not one stacked array: inside the decode `while_loop`, XLA updates a per-layer
    buffer in place, whereas writing into and reading from one stacked buffer in the same step makes it copy the
    whole cache every layer (measured 25x slower on XLA:CPU). `valid` marks slots that hold a real token (False for
    left padding), so ragged prompts share one write index: slot `index` (counted over all blocks) is written next
    for every row.

    Blocks. `extend` appends an empty block; new tokens are always written into the last block, and attention reads
    every block. A sampler that grows the cache a block at a time as decoding proceeds therefore reads only the slots
    that exist so far (attention cost follows the filled length, not the whole budget), and never copies or
    reallocates the blocks it already has, so peak memory is that of the final cache.
    """

    k: tuple[tuple[jax.Array, ...], ...]  # blocks x layers x [b, k, h, s_block]  (layouts: see layers.attend)
    v: tuple[tuple[jax.Array, ...], ...]  # blocks x layers x [b, k, s_block, h]
    valid: tuple[jax.Array, ...]  # blocks x [b, s_block] bool
    index: jax.Array  # [] int32

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, num_slots: int, dtype=None) -> "KVCache":
        """A cache of one block of `num_slots` empty slots."""
        empty = cls(k=(), v=(), valid=(), index=jnp.zeros((), jnp.int32))
        return empty.extend(cfg, num_slots, dtype, batch_size=batch_size)

    def extend(self, cfg: ModelConfig, num_slots: int, dtype=None, batch_size: int | None = None) -> "KVCache":
        """This cache with a new empty block of `num_slots` slots after the existing ones (which are kept as they are)."""
        batch_size = self.valid[0].shape[0] if self.valid else batch_size
        dtype = dtype or (self.k[0][0].dtype if self.k else cfg.jnp_dtype)
        k_shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, num_slots)
        v_shape = (batch_size, cfg.num_kv_heads, num_slots, cfg.head_dim)
        return self.replace(
            k=self.k + (tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),),
            v=self.v + (tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),),
            valid=self.valid + (jnp.zeros((batch_size, num_slots), bool),),
        )

    @property
    def num_slots(self) -> int:
        return sum(self.block_sizes)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(block.shape[1] for block in self.valid)


def param_shapes(cfg: ModelConfig) -> Params:
    """The params pytree as `jax.ShapeDtypeStruct`s: the single source of truth for names and shapes."""
    d, f, v, l = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, cfg.jnp_dtype)

    attn = {
        "q_proj": {"kernel": s(l, d, n, h)},
        "k_proj": {"kernel": s(l, d, k, h)},
        "v_proj": {"kernel": s(l, d, k, h)},
        "o_proj": {"kernel": s(l, n, h, d)},
    }
    if cfg.qkv_bias:
        attn["q_proj"]["bias"], attn["k_proj"]["bias"], attn["v_proj"]["bias"] = s(l, n, h), s(l, k, h), s(l, k, h)
    if cfg.qk_norm:
        attn["q_norm"], attn["k_norm"] = {"scale": s(l, h)}, {"scale": s(l, h)}
    params = {
        "embed": {"embedding": s(v, d)},
        "layers": {
            "input_norm": {"scale": s(l, d)},
            "attn": attn,
            "post_attn_norm": {"scale": s(l, d)},
            "mlp": {"gate_proj": {"kernel": s(l, d, f)}, "up_proj": {"kernel": s(l, d, f)}, "down_proj": {"kernel": s(l, f, d)}},
        },
        "final_norm": {"scale": s(d)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": s(d, v)}
    return params


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random params (normal(0, std) weights and biases, unit norm scales) — for tests and benchmarks."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    def init_leaf(path, spec, leaf_key):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(spec.shape, spec.dtype)
        return (std * jax.random.normal(leaf_key, spec.shape)).astype(spec.dtype)

    return jax.tree_util.tree_unflatten(treedef, [init_leaf(p, s, k) for (p, s), k in zip(leaves, keys)])


def _attention_block(cfg: ModelConfig, p: Params, x_btd, cos_bth, sin_bth, mask, kv, write_offset,
                     fresh_cache: bool, attention: str):
    """Self-attention for one layer. With a cache, `kv` is this layer's (key blocks, value blocks): this step's
    keys/values are written into the last block at `write_offset` (in place), then attention reads every block — or,
    for a prefill into an empty cache (`fresh_cache`), only the new tokens, skipping the empty slots.

    `mask` is [b, t, s] (True: query t reads slot s) when attention reads the cache; otherwise the sequence attends to
    itself causally, `mask` is the [b, t] key-padding mask and `attention` names the implementation
    (layers.causal_attention)."""
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, p["q_proj"]["kernel"])
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, p["k_proj"]["kernel"])
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, p["v_proj"]["kernel"])
    if cfg.qkv_bias:
        q_btnh, k_btkh, v_btkh = q_btnh + p["q_proj"]["bias"], k_btkh + p["k_proj"]["bias"], v_btkh + p["v_proj"]["bias"]
    if cfg.qk_norm:  # Qwen3: per-head RMSNorm on queries and keys, before RoPE.
        q_btnh = layers.rms_norm(q_btnh, p["q_norm"]["scale"], cfg.rms_norm_eps)
        k_btkh = layers.rms_norm(k_btkh, p["k_norm"]["scale"], cfg.rms_norm_eps)
    q_btnh = layers.apply_rope(q_btnh, cos_bth, sin_bth)
    k_btkh = layers.apply_rope(k_btkh, cos_bth, sin_bth)
    reads_cache = kv is not None and not fresh_cache
    if kv is not None:
        k_bkht, v_bkth = k_btkh.transpose(0, 2, 3, 1), v_btkh.transpose(0, 2, 1, 3)  # the cache layouts
        *k_before, k_last = kv[0]
        *v_before, v_last = kv[1]
        k_last = jax.lax.dynamic_update_slice(k_last, k_bkht.astype(k_last.dtype), (0, 0, 0, write_offset))
        v_last = jax.lax.dynamic_update_slice(v_last, v_bkth.astype(v_last.dtype), (0, 0, write_offset, 0))
        kv = ((*k_before, k_last), (*v_before, v_last))
    if reads_cache:
        out_btnh = layers.attend(q_btnh, kv[0], kv[1], mask)
    else:
        out_btnh = layers.causal_attention(q_btnh, k_btkh, v_btkh, mask, implementation=attention,
                                           block_size=cfg.attention_block, mesh=cfg.mesh)
    # One merged contraction axis (n*h): einsum orders several contracted labels alphabetically ("hn"), which made
    # XLA transpose the o_proj weights on every decode step.
    b, t = out_btnh.shape[:2]
    out_btx = out_btnh.reshape(b, t, cfg.num_heads * cfg.head_dim)
    o_xd = p["o_proj"]["kernel"].reshape(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    return jnp.einsum("btx,xd->btd", out_btx, o_xd), kv


def split_rows(cfg: ModelConfig, x):
    """`x` with its leading (row) axis split over the batch axes of `cfg.mesh` (unchanged without a mesh)."""
    if cfg.mesh is None or cfg.mesh.size == 1:
        return x
    spec = sharding.batch_spec(x.ndim, x.shape[0], cfg.mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(cfg.mesh, spec))


def _decoder_layer(cfg: ModelConfig, p: Params, x_btd, cos_bth, sin_bth, mask, kv, write_offset, fresh_cache,
                   attention):
    x_btd = split_rows(cfg, x_btd)
    attn_out, kv = _attention_block(
        cfg, p["attn"], layers.rms_norm(x_btd, p["input_norm"]["scale"], cfg.rms_norm_eps),
        cos_bth, sin_bth, mask, kv, write_offset, fresh_cache, attention)
    x_btd = x_btd + attn_out
    x_btd = x_btd + layers.swiglu_mlp(p["mlp"], layers.rms_norm(x_btd, p["post_attn_norm"]["scale"], cfg.rms_norm_eps))
    return x_btd, kv


def forward(cfg: ModelConfig, params: Params, tokens_bt, *, positions_bt=None, input_mask_bt=None,
            cache: KVCache | None = None, fresh_cache: bool = False):
    """Runs the decoder and returns (final hidden states [b, t, d] after the last norm, updated cache or None).

    tokens_bt: int32 token ids. positions_bt: RoPE positions (default 0..t-1). input_mask_bt: True for real tokens,
    False for padding (default all True); padding keys are never attended to. With a `cache`, the t new tokens are
    written into slots [cache.index, cache.index + t), which must lie in the cache's last block, and attend to every
    valid earlier slot. `fresh_cache=True` promises the cache is empty (index 0, a prefill): attention then skips the
    cache's unwritten slots.
    """
    b, t = tokens_bt.shape
    if input_mask_bt is None:
        input_mask_bt = jnp.ones((b, t), bool)
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos_bth, sin_bth = layers.rope_cos_sin(cfg, positions_bt)

    if cache is not None:
        if t > cache.block_sizes[-1]:
            raise ValueError(f"forward: {t} new tokens do not fit the cache's last block ({cache.block_sizes[-1]} slots)")
        write_offset = cache.index - (cache.num_slots - cache.block_sizes[-1])  # within the last block
        *valid_before, valid_last = cache.valid
        valid_blocks = (*valid_before, jax.lax.dynamic_update_slice(valid_last, input_mask_bt, (0, write_offset)))
        key_valid_bs = jnp.concatenate(valid_blocks, axis=1)
    else:
        write_offset = None
    if cache is None or fresh_cache:  # the sequence attends to itself: causal + key padding, no [b, t, s] mask
        mask, attention = input_mask_bt, layers.resolve_attention(cfg.attention, t, cfg.attention_block, cfg.jnp_dtype)
    else:
        query_slot_t, key_slot_s = cache.index + jnp.arange(t), jnp.arange(cache.num_slots)
        mask = key_valid_bs[:, None, :] & (key_slot_s[None, None, :] <= query_slot_t[None, :, None])
        attention = None

    x_btd = split_rows(cfg, params["embed"]["embedding"][tokens_bt].astype(cfg.jnp_dtype))
    policy = remat_policy(cfg.remat)
    decoder_layer = functools.partial(_decoder_layer, cfg, fresh_cache=fresh_cache, attention=attention)
    if cfg.remat != "none":
        decoder_layer = jax.checkpoint(decoder_layer, policy=policy)
    new_k, new_v = [], []  # per layer: its tuple of blocks
    if cfg.scan_layers:
        # One traced layer body (fast compiles). With a cache the per-layer buffers are stacked for the scan, which
        # costs a cache copy per call: decode loops should use scan_layers=False.
        def body(x, per_layer):
            p, kv = per_layer
            return decoder_layer(p, x, cos_bth, sin_bth, mask, kv, write_offset)

        kv_in = None if cache is None else (tuple(map(jnp.stack, cache.k)), tuple(map(jnp.stack, cache.v)))
        x_btd, kv_out = jax.lax.scan(body, x_btd, (params["layers"], kv_in))
        if cache is not None:  # kv_out: (key blocks, value blocks), each [l, ...]
            new_k = [tuple(block[layer] for block in kv_out[0]) for layer in range(cfg.num_layers)]
            new_v = [tuple(block[layer] for block in kv_out[1]) for layer in range(cfg.num_layers)]
    else:
        for layer, p in enumerate(unstack_layers(params)["layers"]):
            kv = None
            if cache is not None:
                kv = (tuple(block[layer] for block in cache.k), tuple(block[layer] for block in cache.v))
            x_btd, kv = decoder_layer(p, x_btd, cos_bth, sin_bth, mask, kv, write_offset)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])

    hidden_btd = split_rows(cfg, layers.rms_norm(x_btd, params["final_norm"]["scale"], cfg.rms_norm_eps))
    if cache is not None:  # back to blocks x layers
        cache = KVCache(k=tuple(zip(*new_k)), v=tuple(zip(*new_v)), valid=valid_blocks, index=cache.index + t)
    return hidden_btd, cache


def unstack_layers(params: Params) -> Params:
    """params with `layers` as a tuple of per-layer trees instead of stacked arrays (`forward` takes either).

    Decode loops call this once, outside the `while_loop`: slicing stacked weights inside the loop body makes XLA
    copy every layer's weights on every step.
    """
    stacked = params["layers"]
    if isinstance(stacked, (list, tuple)):
        return params
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers))}


def logits_from_hidden(cfg: ModelConfig, params: Params, hidden_btd):
    """Vocabulary logits in float32 (the lm_head, or the tied embedding)."""
    if cfg.tie_embeddings:
        return layers.dense(hidden_btd, params["embed"]["embedding"], True, jnp.float32)
    return layers.dense(hidden_btd, params["lm_head"]["kernel"], False, jnp.float32)


def forward_logits(cfg: ModelConfig, params: Params, tokens_bt, *, positions_bt=None, input_mask_bt=None):
    """tokens int32 [b, t] → float32 logits [b, t, v] (teacher forcing, no cache)."""
    hidden_btd, _ = forward(cfg, params, tokens_bt, positions_bt=positions_bt, input_mask_bt=input_mask_bt)
    return logits_from_hidden(cfg, params, hidden_btd)


def token_logprobs(cfg: ModelConfig, params: Params, tokens_bt, input_mask_bt=None, *, temperature: float = 1.0,
                   with_entropy: bool = True):
    """Teacher-forced log-probs of each token given the ones before it, and the entropy of that next-token distribution.

    Returns float32 (logprobs [b, t], entropy [b, t] or None): column t scores tokens_bt[:, t] under the logits at
    t - 1 (column 0, which has no context, is 0). Logits are divided by `temperature` first (the distribution the
    sampler drew from, before top-p / top-k). Sequences are right-padded (positions 0..t-1); padding is masked out
    of attention and its columns are meaningless. This is the trainer's one log-prob function.

    With `cfg.logprob_chunk` = c > 0 the lm_head, log-softmax, gather and entropy run c positions at a time in a
    `lax.map` whose body is a `jax.checkpoint`: no [b, t, v] logits exist in the forward pass, and the backward pass
    recomputes one chunk's logits at a time instead of storing them (blockwise cross-entropy). Same values and
    gradients as c = 0, which computes all positions at once.
    """
    hidden_btd, _ = forward(cfg, params, tokens_bt, input_mask_bt=input_mask_bt)
    hidden_btd, targets_bt = hidden_btd[:, :-1], tokens_bt[:, 1:]
    head = functools.partial(_logprobs_and_entropy, cfg, temperature=temperature, with_entropy=with_entropy)
    b, t = targets_bt.shape
    c = cfg.logprob_chunk
    if c == 0 or t <= c:
        logprobs_bt, entropy_bt = head(params, hidden_btd, targets_bt)
    else:
        num_chunks = -(-t // c)
        pad = num_chunks * c - t  # padded positions score token 0 and are dropped below
        hidden_ubcd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, num_chunks, c, -1).swapaxes(0, 1)
        targets_ubc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, num_chunks, c).swapaxes(0, 1)
        chunk = jax.checkpoint(head, prevent_cse=False)  # saves only its inputs: the chunk's logits are recomputed
        logprobs_ubc, entropy_ubc = jax.lax.map(lambda xs: chunk(params, *xs), (hidden_ubcd, targets_ubc))
        unchunk = lambda x_ubc: x_ubc.swapaxes(0, 1).reshape(b, num_chunks * c)[:, :t]
        logprobs_bt = unchunk(logprobs_ubc)
        entropy_bt = None if entropy_ubc is None else unchunk(entropy_ubc)
    shift = lambda x_bt: jnp.pad(x_bt, ((0, 0), (1, 0)))
    return shift(logprobs_bt), None if entropy_bt is None else shift(entropy_bt)


def _logprobs_and_entropy(cfg: ModelConfig, params: Params, hidden_btd, targets_bt, *, temperature: float,
                          with_entropy: bool):
    """log p(target) and the entropy of the next-token distribution, float32 [b, t] each (entropy None if not asked),
    from the final hidden states: the one head computation, whole or per chunk."""
    logits_btv = logits_from_hidden(cfg, params, split_rows(cfg, hidden_btd)) / temperature
    log_normaliser_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    taken_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    if not with_entropy:
        return taken_bt - log_normaliser_bt, None
    probs_btv = jnp.exp(logits_btv - log_normaliser_bt[..., None])
    return taken_bt - log_normaliser_bt, log_normaliser_bt - jnp.sum(probs_btv * logits_btv, axis=-1)
