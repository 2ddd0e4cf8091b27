"""Batched autoregressive sampling: a jitted prefill and a jitted `lax.while_loop` decode over an explicit state.

Layout. Prompts are left-padded to a bucketed length P, so every row's last prompt token sits in slot P-1 and all
rows share one cache write index; `KVCache.valid` hides the padding. Each prompt is prefilled once and its cache is
repeated for its G samples. The decode loop writes one token per row per step into a fixed [rows, max_new_tokens]
buffer and stops as soon as every row has emitted an EOS id or the budget is spent.

Growing cache. The prefill's cache holds the prompt only; decoding appends cache blocks (`KVCache.extend`) a segment
at a time, each segment its own compiled `while_loop`, so a step attends over the slots that exist so far rather than
the whole budget. With BCR's long shared budgets (5k-8k tokens, most rows ending well before), this reads about
P + 5/8 of the budget on average with 4 blocks instead of P + all of it, and never runs the blocks past the step at
which every row ended. Existing blocks are never copied: peak memory is that of one full-budget cache.

Knobs. Temperature, top-p, top-k, the EOS ids and the pad id are traced arrays: changing them never recompiles.
Temperature 0 means greedy. A `lax.switch` picks the cheapest token choice each step: no random bits when every row
is greedy, and a vocabulary sort (for top-p / top-k) only when some row asks for filtering.

Log-probs are those of the distribution each token was drawn from: log_softmax(logits / T) restricted to the top-k /
top-p support and renormalised; for greedy rows (T = 0), log_softmax(logits) of the chosen token.

Compilation. Prompt lengths are bucketed to powers of two (>= 16) and the number of prompts to powers of two (and to a
multiple of the mesh's batch axes), so a training run compiles a handful of shapes (a prefill per bucket and a decode
segment per bucket and block); `TRACE_COUNTS` counts traces.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bcr_jax import distributed, sharding as sharding_lib
from bcr_jax.models import transformer
from bcr_jax.models.config import ModelConfig

# How many times each jitted entry point was traced (== compiled) in this process; tests bound it.
TRACE_COUNTS: collections.Counter = collections.Counter()

_NEG_INF = -jnp.inf
MAX_EOS_IDS = 8  # eos ids travel as a fixed-size traced array


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries. r = rows (prompts x samples), n = max_new_tokens."""

    tokens: jax.Array  # [r, n] int32, pad_id after a row ends
    logprobs: jax.Array  # [r, n] float32, 0 after a row ends
    last_token: jax.Array  # [r] int32, the token fed to the next step
    next_position: jax.Array  # [r] int32, its RoPE position
    done: jax.Array  # [r] bool, EOS emitted (or a padding row)
    hit_eos: jax.Array  # [r] bool
    lengths: jax.Array  # [r] int32, tokens generated (EOS included)
    step: jax.Array  # [] int32, next column of `tokens` to write
    rng: jax.Array  # PRNG key
    temperature: jax.Array  # [r] float32
    top_p: jax.Array  # [r] float32
    top_k: jax.Array  # [r] int32, 0 = off
    eos_ids: jax.Array  # [e] int32, -1 = unused slot (traced: another tokenizer's ids never recompile)
    pad_id: jax.Array  # [] int32
    cache: transformer.KVCache


@dataclasses.dataclass
class SampleOutput:
    """Per row (prompt-major: row i * num_samples + g is sample g of prompt i)."""

    tokens: list[list[int]]  # new tokens, EOS included, padding removed
    logprobs: list[np.ndarray]  # [len] float32 log-probs of those tokens under the sampling distribution
    lengths: np.ndarray  # [rows] int32
    truncated: np.ndarray  # [rows] bool: cut off by the budget rather than ended by EOS
    token_array: np.ndarray  # [rows, max_new_tokens] int32, pad_id past each row's length
    logprob_array: np.ndarray  # [rows, max_new_tokens] float32, 0 past each row's length


# ------------------------------------------------------------------------------------------------ token choice

def _filtered_sorted_logits(scaled_bv, top_p_b, top_k_b):
    """Vocabulary sorted by descending logit, with everything outside the top-k / top-p support set to -inf."""
    order_bv = jnp.argsort(-scaled_bv, axis=-1)
    sorted_bv = jnp.take_along_axis(scaled_bv, order_bv, axis=-1)
    rank_v = jnp.arange(scaled_bv.shape[-1])
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    # A token is kept while the mass strictly before it is < top_p (so the top token always survives).
    keep_bv = mass_before_bv < top_p_b[:, None]
    keep_bv &= (top_k_b[:, None] <= 0) | (rank_v[None, :] < top_k_b[:, None])
    return jnp.where(keep_bv, sorted_bv, _NEG_INF), order_bv


def _logprob_of(logits_bv, token_b):
    """log_softmax(logits)[token] without materialising the [b, v] log-softmax."""
    chosen_b = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
    return chosen_b - jax.nn.logsumexp(logits_bv, axis=-1)


def _greedy(logits_bv):
    """argmax (the first maximal id, as jnp.argmax) and its log-prob, as plain max/min reductions: XLA:CPU's
    variadic argmax reduction cost more than the lm_head matmul's tail on small models."""
    max_b = jnp.max(logits_bv, axis=-1)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, 1)
    token_b = jnp.min(jnp.where(logits_bv == max_b[:, None], vocab_ids, logits_bv.shape[-1]), axis=-1)
    return token_b, -jnp.log(jnp.sum(jnp.exp(logits_bv - max_b[:, None]), axis=-1))


def choose_tokens(logits_bv, rng, temperature_b, top_p_b, top_k_b):
    """Samples one token per row; returns (tokens [b] int32, their log-probs [b] float32)."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = temperature_b <= 0
    needs_filter = jnp.any(~greedy_b & ((top_p_b < 1.0) | (top_k_b > 0)))

    def scaled():
        return logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]

    def filtered(_):
        sorted_bv, order_bv = _filtered_sorted_logits(scaled(), top_p_b, top_k_b)
        choice_b = jax.random.categorical(rng, sorted_bv, axis=-1)
        return jnp.take_along_axis(order_bv, choice_b[:, None], axis=-1)[:, 0], _logprob_of(sorted_bv, choice_b)

    def unfiltered(_):
        scaled_bv = scaled()
        token_b = jax.random.categorical(rng, scaled_bv, axis=-1)
        return token_b, _logprob_of(scaled_bv, token_b)

    greedy_token_b, greedy_logprob_b = _greedy(logits_bv)

    def all_greedy(_):  # no random bits at all: threefry over [b, v] costs more than a small model's forward
        return greedy_token_b, greedy_logprob_b

    branch = jnp.where(jnp.all(greedy_b), 0, jnp.where(needs_filter, 2, 1))
    sampled_b, sampled_logprob_b = jax.lax.switch(branch, (all_greedy, unfiltered, filtered), None)
    token_b = jnp.where(greedy_b, greedy_token_b, sampled_b).astype(jnp.int32)
    return token_b, jnp.where(greedy_b, greedy_logprob_b, sampled_logprob_b)


# ------------------------------------------------------------------------------------------- prefill and decode

def _record(state: SamplingState, token_b, logprob_b) -> SamplingState:
    """Writes this step's tokens into column `state.step`; rows that were already done get padding."""
    token_b = jnp.where(state.done, state.pad_id, token_b)
    logprob_b = jnp.where(state.done, 0.0, logprob_b)
    is_eos_b = jnp.any(token_b[:, None] == state.eos_ids[None, :], axis=1) & ~state.done
    return state.replace(
        tokens=jax.lax.dynamic_update_slice(state.tokens, token_b[:, None], (0, state.step)),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob_b[:, None], (0, state.step)),
        last_token=token_b,
        lengths=state.lengths + (~state.done).astype(jnp.int32),
        hit_eos=state.hit_eos | is_eos_b,
        done=state.done | is_eos_b,
        step=state.step + 1,
    )


def _prefill(cfg: ModelConfig, params, prompt_bp, prompt_mask_bp, row_is_real_r, rng, temperature_r, top_p_r, top_k_r,
             eos_ids, pad_id, *, num_samples: int, max_new_tokens: int) -> SamplingState:
    TRACE_COUNTS["prefill"] += 1
    b, p = prompt_bp.shape
    cache = transformer.KVCache.init(cfg, b, p)  # the prompt's block; decoding appends its own blocks
    positions_bp = jnp.maximum(jnp.cumsum(prompt_mask_bp, axis=1) - 1, 0).astype(jnp.int32)
    hidden_bpd, cache = transformer.forward(cfg, params, prompt_bp, positions_bt=positions_bp,
                                            input_mask_bt=prompt_mask_bp, cache=cache, fresh_cache=True)
    last_logits_bv = transformer.logits_from_hidden(cfg, params, hidden_bpd[:, -1:])[:, 0]

    # One prefill per prompt; its cache and logits are repeated for the prompt's samples.
    repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else repeat(x), cache)
    rows = b * num_samples
    rng, step_rng = jax.random.split(rng)
    state = SamplingState(
        tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
        last_token=jnp.zeros((rows,), jnp.int32),
        next_position=repeat(prompt_mask_bp.sum(axis=1).astype(jnp.int32)),
        done=~row_is_real_r,
        hit_eos=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        temperature=temperature_r, top_p=top_p_r, top_k=top_k_r,
        eos_ids=eos_ids, pad_id=pad_id,
        cache=cache,
    )
    token_r, logprob_r = choose_tokens(repeat(last_logits_bv), step_rng, temperature_r, top_p_r, top_k_r)
    return _record(state, token_r, logprob_r)


def _decode(cfg: ModelConfig, params, state: SamplingState, *, block_slots: int, stop_step: int) -> SamplingState:
    """One decode segment: appends a cache block of `block_slots` slots, then decodes until `stop_step` tokens per row
    are recorded (the block is full or the budget spent) or every row is done."""
    TRACE_COUNTS["decode"] += 1
    if not cfg.scan_layers:
        params = transformer.unstack_layers(params)  # once, outside the loop (see unstack_layers)
    state = state.replace(cache=state.cache.extend(cfg, block_slots))

    def step(state: SamplingState) -> SamplingState:
        hidden_r1d, cache = transformer.forward(cfg, params, state.last_token[:, None],
                                                positions_bt=state.next_position[:, None], cache=state.cache)
        logits_rv = transformer.logits_from_hidden(cfg, params, hidden_r1d)[:, 0]
        rng, step_rng = jax.random.split(state.rng)
        token_r, logprob_r = choose_tokens(logits_rv, step_rng, state.temperature, state.top_p, state.top_k)
        state = state.replace(cache=cache, rng=rng, next_position=state.next_position + 1)
        return _record(state, token_r, logprob_r)

    def keep_going(state: SamplingState):
        return (state.step < stop_step) & ~jnp.all(state.done)

    return jax.lax.while_loop(keep_going, step, state)


def decode_blocks_for(max_new_tokens: int, num_blocks: int) -> tuple[int, ...]:
    """The cache blocks the decode phase appends: `num_blocks` (or fewer, after rounding) equal blocks, a multiple of
    16 slots each (128 from 1,024 up), covering the max_new_tokens - 1 tokens that are fed back."""
    fed_back = max_new_tokens - 1
    if fed_back <= 0:
        return ()
    size = -(-fed_back // max(1, num_blocks))
    multiple = 128 if size >= 1024 else 16
    size = -(-size // multiple) * multiple
    return (size,) * -(-fed_back // size)


# -------------------------------------------------------------------------------------------- compiled programs

def _state_shardings(mesh: Mesh, cfg: ModelConfig, rows: int, block_sizes: tuple[int, ...]) -> SamplingState:
    row = lambda rank: sharding_lib.batch_sharding(mesh, rank, rows)
    replicated = NamedSharding(mesh, P())

    def block(slots):  # one layer's keys [r, k, h, s] or values [r, k, s, h]: the same spec
        return NamedSharding(mesh, sharding_lib.kv_cache_spec((rows, cfg.num_kv_heads, slots, cfg.head_dim), mesh))

    blocks = tuple((block(slots),) * cfg.num_layers for slots in block_sizes)
    return SamplingState(
        tokens=row(2), logprobs=row(2), last_token=row(1), next_position=row(1), done=row(1), hit_eos=row(1),
        lengths=row(1), step=replicated, rng=replicated, temperature=row(1), top_p=row(1), top_k=row(1),
        eos_ids=replicated, pad_id=replicated,
        cache=transformer.KVCache(k=blocks, v=blocks, valid=(row(2),) * len(block_sizes), index=replicated),
    )


@functools.lru_cache(maxsize=64)
def _prefill_program(cfg: ModelConfig, num_samples: int, max_new_tokens: int, mesh: Mesh | None = None,
                     param_shardings_key=None, batch: int = 0, prompt_len: int = 0):
    """The jitted prefill. Without a mesh, one program serves every bucket (jax.jit caches by shape); with one, a
    program per bucket carries the explicit in/out shardings."""
    prefill = functools.partial(_prefill, cfg, num_samples=num_samples, max_new_tokens=max_new_tokens)
    if mesh is None:
        return jax.jit(prefill)
    rows = batch * num_samples
    prompt = sharding_lib.batch_sharding(mesh, 2, batch)
    row = sharding_lib.batch_sharding(mesh, 1, rows)
    replicated = NamedSharding(mesh, P())
    return jax.jit(prefill, in_shardings=(param_shardings_key.tree, prompt, prompt, row, replicated, row, row, row,
                                          replicated, replicated),
                   out_shardings=_state_shardings(mesh, cfg, rows, (prompt_len,)))


@functools.lru_cache(maxsize=256)
def _decode_program(cfg: ModelConfig, block_slots: int, stop_step: int, mesh: Mesh | None = None,
                    param_shardings_key=None, rows: int = 0, block_sizes: tuple[int, ...] = ()):
    """The jitted decode segment that appends a `block_slots` block to a cache of `block_sizes` blocks (its state is
    donated: the loop updates the cache in place)."""
    decode = functools.partial(_decode, cfg, block_slots=block_slots, stop_step=stop_step)
    if mesh is None:
        return jax.jit(decode, donate_argnums=(1,))
    return jax.jit(decode, in_shardings=(param_shardings_key.tree, _state_shardings(mesh, cfg, rows, block_sizes)),
                   out_shardings=_state_shardings(mesh, cfg, rows, block_sizes + (block_slots,)),
                   donate_argnums=(1,))


class _HashableTree:
    """Wraps a pytree of shardings so it can key an lru_cache."""

    def __init__(self, tree):
        self.tree = tree
        self._key = tuple(jax.tree.leaves(tree)), jax.tree.structure(tree)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _HashableTree) and self._key == other._key


def bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
    """Smallest power of two >= max(n, minimum), rounded up to a multiple of `multiple`."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return -(-size // multiple) * multiple


def _per_row(value, count: int, name: str, dtype) -> np.ndarray:
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 0:
        return np.full((count,), array, dtype)
    if array.shape != (count,):
        raise ValueError(f"{name}: expected a scalar or {count} values (one per prompt), got shape {array.shape}")
    return array


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature=0.0, top_p=1.0, top_k=0, eos_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
             num_samples: int = 1, mesh: Mesh | None = None, min_prompt_bucket: int = 16,
             decode_blocks: int = 4) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt (a list of token-id lists of any lengths).

    temperature / top_p / top_k: a scalar or one value per prompt (traced; never recompiles). eos_ids: every id that
    ends a row. With a `mesh`, rows are split over its ("data", "fsdp") axes and `params` should already carry the
    partition-rule shardings (e.g. from `models.load_hf(..., mesh=mesh)`). decode_blocks: the KV cache grows in this
    many blocks as decoding proceeds, so attention reads only the slots filled so far, not the whole budget
    (`decode_blocks_for`); each block is its own compiled segment of the decode loop, and blocks after the step at
    which every row ended are never run. 1 = one block of the whole budget (fewest compilations).
    """
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompts: prompt {[len(p) for p in prompts].index(0)} is empty")
    if max_new_tokens < 1 or num_samples < 1 or decode_blocks < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, num_samples={num_samples} and decode_blocks={decode_blocks} "
                         "must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    num_prompts = len(prompts)
    batch_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    batch = bucket(num_prompts, multiple=batch_multiple)
    prompt_len = bucket(longest, minimum=min_prompt_bucket)

    prompt_bp = np.full((batch, prompt_len), pad_id, np.int32)
    mask_bp = np.zeros((batch, prompt_len), bool)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends in column prompt_len - 1
        prompt_bp[i, prompt_len - len(prompt):] = prompt
        mask_bp[i, prompt_len - len(prompt):] = True
    mask_bp[num_prompts:, -1] = True  # padding rows hold one dummy token so their attention is well defined
    temperature_p = _per_row(temperature, num_prompts, "temperature", np.float32)
    top_p_p = _per_row(top_p, num_prompts, "top_p", np.float32)
    top_k_p = _per_row(top_k, num_prompts, "top_k", np.int32)
    if np.any(temperature_p < 0) or np.any((top_p_p <= 0) | (top_p_p > 1)) or np.any(top_k_p < 0):
        raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0 (0 = off)")

    def per_row(per_prompt, fill):  # padding prompts get neutral knobs; then one entry per sample
        return np.repeat(np.concatenate([per_prompt, np.full((batch - num_prompts,), fill, per_prompt.dtype)]),
                         num_samples)

    temperature_r, top_p_r, top_k_r = per_row(temperature_p, 0), per_row(top_p_p, 1), per_row(top_k_p, 0)
    row_is_real_r = np.repeat(np.arange(batch) < num_prompts, num_samples)

    if len(eos_ids) > MAX_EOS_IDS:
        raise ValueError(f"eos_ids: at most {MAX_EOS_IDS} ids, got {len(eos_ids)}")
    eos_array = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos_array[:len(eos_ids)] = list(eos_ids)

    shardings_key = None if mesh is None else _HashableTree(jax.tree.map(lambda x: x.sharding, params))

    def placement(*bucket):  # without a mesh, one jitted program serves every bucket (jax.jit caches by shape)
        return () if mesh is None else (mesh, shardings_key, *bucket)

    prefill = _prefill_program(cfg, num_samples, max_new_tokens, *placement(batch, prompt_len))
    if mesh is not None:
        # Every process holds the same prompts; each places only the rows its own devices hold (with several
        # processes jit refuses host arrays split over other processes' devices).
        prompt_sh, row_sh = (sharding_lib.batch_sharding(mesh, rank, rows) for rank, rows in
                             ((2, batch), (1, batch * num_samples)))
        prompt_bp, mask_bp = distributed.put(prompt_bp, prompt_sh), distributed.put(mask_bp, prompt_sh)
        row_is_real_r, temperature_r, top_p_r, top_k_r = (distributed.put(x, row_sh) for x in
                                                          (row_is_real_r, temperature_r, top_p_r, top_k_r))
    state = prefill(params, prompt_bp, mask_bp, row_is_real_r, jax.random.key(seed), temperature_r, top_p_r, top_k_r,
                    eos_array, np.int32(pad_id))
    block_sizes = (prompt_len,)
    for block_slots in decode_blocks_for(max_new_tokens, decode_blocks):
        if bool(jax.device_get(jnp.all(state.done))):  # every row ended: skip the remaining blocks
            break
        stop_step = min(max_new_tokens, sum(block_sizes[1:]) + block_slots + 1)
        decode = _decode_program(cfg, block_slots, stop_step, *placement(batch * num_samples, block_sizes))
        state = decode(params, state)
        block_sizes += (block_slots,)

    real_rows = num_prompts * num_samples
    # Whole on every process (all-gathered when the rows are split over several processes' devices).
    tokens, logprobs, lengths, hit_eos = distributed.fetch((state.tokens, state.logprobs, state.lengths, state.hit_eos))
    tokens, logprobs, lengths = tokens[:real_rows], logprobs[:real_rows], lengths[:real_rows]
    return SampleOutput(
        tokens=[row[:n].tolist() for row, n in zip(tokens, lengths)],
        logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
        lengths=lengths,
        truncated=~hit_eos[:real_rows],
        token_array=tokens,
        logprob_array=logprobs,
    )
