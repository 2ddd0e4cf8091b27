"""Continuous batching: a fixed number of decode slots that are refilled as their rows end.

`sampling.generate(..., max_rows_in_flight=s)` runs here. The static sampler decodes all prompts x samples rows at
once: every row waits for the longest, and the KV cache holds every row at the full budget. Here `s` slots decode
together; when a row ends (EOS or budget) its slot takes the next pending (prompt, sample) in prompt-major order, so
memory follows `s`, not prompts x samples, and long-tailed lengths do not idle the batch.

Layout. Each slot owns a cache of c = P + max_new_tokens slots (P: the call's prompt bucket): its prompt left-padded
into [0, P), its generated tokens from P on. Rows in flight are at different lengths, so the cache's write index is
one per slot (`KVCache.index` of shape [s]); attention reads slot <= index, so a refilled slot needs only its
prompt region rewritten (stale keys beyond the index are never read).

Schedule (host loop, fixed shapes). Prompts are prefilled `prefill_batch` at a time as the queue reaches them: one
prefill per prompt serves its G samples. `insert` copies a prefilled prompt's cache into free slots and draws each
new row's first token from the prompt's last logits. `decode` is a `lax.while_loop` over all slots that stops when
`refill_at` slots are done (a fraction of the slots while rows are pending: each refill costs a host round trip, a
prefill and an insert), or all are. Programs: one init, prefill, insert and decode per prompt bucket
(`sampling.TRACE_COUNTS`: engine_*).

Exactness. A row's token at position n is drawn with key fold_in(seed, prompt, sample, n), so its tokens depend on
(seed, prompt index, sample index) only: the same for any slot count and refill order, and greedy rows equal the
static sampler's (the same model math per row).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bcr_jax import distributed, sampling, sharding as sharding_lib
from bcr_jax.models import transformer
from bcr_jax.models.config import ModelConfig

TRACE_COUNTS = sampling.TRACE_COUNTS
REFILL_FRACTION = 1 / 8  # stop decoding to refill once this share of the slots is done (while rows are pending)


@flax.struct.dataclass
class EngineState:
    """The slots. s = slots, n = max_new_tokens; the cache has c = P + n slots per row and one write index per row."""

    cache: transformer.KVCache  # one block of c slots; index [s]
    tokens: jax.Array  # [s, n] int32: the row's tokens in [0, length), stale after
    logprobs: jax.Array  # [s, n] float32
    last_token: jax.Array  # [s] int32, fed to the next step
    position: jax.Array  # [s] int32, its RoPE position
    lengths: jax.Array  # [s] int32, tokens generated (EOS included)
    done: jax.Array  # [s] bool: EOS, budget, or an empty slot
    hit_eos: jax.Array  # [s] bool
    prompt_id: jax.Array  # [s] int32: which (prompt, sample) the slot holds (and its random stream)
    sample_id: jax.Array  # [s] int32
    temperature: jax.Array  # [s] float32
    top_p: jax.Array  # [s] float32
    top_k: jax.Array  # [s] int32
    budget: jax.Array  # [s] int32: the row ends (truncated) after this many tokens
    key_data: jax.Array  # [2] uint32: the seed's key
    eos_ids: jax.Array  # [e] int32, -1 = unused
    pad_id: jax.Array  # [] int32


def row_keys(key_data, prompt_s, sample_s, position_s):
    """Each row's key for its token at `position`: a function of (seed, prompt, sample, position) only."""
    base = jax.random.wrap_key_data(key_data)
    fold = jax.random.fold_in
    return jax.vmap(lambda p, g, n: fold(fold(fold(base, p), g), n))(prompt_s, sample_s, position_s)


def _is_eos(token_s, eos_ids):
    return jnp.any(token_s[:, None] == eos_ids[None, :], axis=1)


# ------------------------------------------------------------------------------------------------- programs

def _init(cfg: ModelConfig, key_data, eos_ids, pad_id, *, slots: int, cache_len: int, max_new_tokens: int):
    TRACE_COUNTS["engine_init"] += 1
    cache = transformer.KVCache.init(cfg, slots, cache_len)
    zeros = lambda dtype: jnp.zeros((slots,), dtype)
    return EngineState(
        cache=cache.replace(index=zeros(jnp.int32)),
        tokens=jnp.full((slots, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((slots, max_new_tokens), jnp.float32),
        last_token=zeros(jnp.int32), position=zeros(jnp.int32), lengths=zeros(jnp.int32),
        done=jnp.ones((slots,), bool), hit_eos=zeros(bool), prompt_id=zeros(jnp.int32), sample_id=zeros(jnp.int32),
        temperature=zeros(jnp.float32), top_p=jnp.ones((slots,), jnp.float32), top_k=zeros(jnp.int32),
        budget=zeros(jnp.int32), key_data=key_data, eos_ids=eos_ids, pad_id=pad_id,
    )


def _prefill(cfg: ModelConfig, params, prompt_bp, mask_bp):
    """The prompts' caches (one block of P slots) and their last logits [b, v] float32."""
    TRACE_COUNTS["engine_prefill"] += 1
    b, p = prompt_bp.shape
    positions_bp = jnp.maximum(jnp.cumsum(mask_bp, axis=1) - 1, 0).astype(jnp.int32)
    hidden_bpd, cache = transformer.forward(cfg, params, prompt_bp, positions_bt=positions_bp, input_mask_bt=mask_bp,
                                            cache=transformer.KVCache.init(cfg, b, p), fresh_cache=True)
    return cache, transformer.logits_from_hidden(cfg, params, hidden_bpd[:, -1:])[:, 0]


def _insert(state: EngineState, prompt_cache: transformer.KVCache, last_logits_bv, slot_m, local_m, prompt_m,
            sample_m, prompt_len_m, temperature_m, top_p_m, top_k_m, budget_m) -> EngineState:
    """Starts m rows: row i goes into slot `slot_m[i]` (== slots: no row, dropped) from prefilled prompt
    `local_m[i]`. Copies that prompt's cache into the slot's prompt region and draws the row's first token."""
    TRACE_COUNTS["engine_insert"] += 1
    p = prompt_cache.block_sizes[0]

    def put_prompt(slots_buffer, prompt_buffer, axis):  # slots_buffer[slot, ..., :p (on axis), ...] = prompt rows
        index = [slot_m] + [slice(None)] * (slots_buffer.ndim - 1)
        index[axis] = slice(0, p)
        return slots_buffer.at[tuple(index)].set(prompt_buffer[local_m], mode="drop")

    cache = state.cache
    cache = cache.replace(
        k=(tuple(put_prompt(dst, src, 3) for dst, src in zip(cache.k[0], prompt_cache.k[0])),),
        v=(tuple(put_prompt(dst, src, 2) for dst, src in zip(cache.v[0], prompt_cache.v[0])),),
        valid=(put_prompt(cache.valid[0], prompt_cache.valid[0], 1),),
        index=cache.index.at[slot_m].set(p, mode="drop"),
    )
    keys = row_keys(state.key_data, prompt_m, sample_m, jnp.zeros_like(prompt_m))
    token_m, logprob_m = sampling.choose_tokens(last_logits_bv[local_m], keys, temperature_m, top_p_m, top_k_m)
    is_eos_m = _is_eos(token_m, state.eos_ids)
    set_ = lambda buffer, value: buffer.at[slot_m].set(value, mode="drop")
    return state.replace(
        cache=cache,
        tokens=state.tokens.at[slot_m, 0].set(token_m, mode="drop"),
        logprobs=state.logprobs.at[slot_m, 0].set(logprob_m, mode="drop"),
        last_token=set_(state.last_token, token_m), position=set_(state.position, prompt_len_m),
        lengths=set_(state.lengths, jnp.ones_like(token_m)),
        done=set_(state.done, is_eos_m | (budget_m <= 1)), hit_eos=set_(state.hit_eos, is_eos_m),
        prompt_id=set_(state.prompt_id, prompt_m), sample_id=set_(state.sample_id, sample_m),
        temperature=set_(state.temperature, temperature_m), top_p=set_(state.top_p, top_p_m),
        top_k=set_(state.top_k, top_k_m), budget=set_(state.budget, budget_m),
    )


def _decode(cfg: ModelConfig, params, state: EngineState, refill_at, *, max_new_tokens: int) -> EngineState:
    """Decodes every live slot one token per step until at least `refill_at` slots are done (empty slots count)."""
    TRACE_COUNTS["engine_decode"] += 1
    if not cfg.scan_layers:
        params = transformer.unstack_layers(params)  # once, outside the loop (see unstack_layers)
    slots = state.done.shape[0]

    def step(state: EngineState) -> EngineState:
        live_s = ~state.done
        hidden_s1d, cache = transformer.forward(cfg, params, state.last_token[:, None],
                                                positions_bt=state.position[:, None], cache=state.cache)
        logits_sv = transformer.logits_from_hidden(cfg, params, hidden_s1d)[:, 0]
        keys = row_keys(state.key_data, state.prompt_id, state.sample_id, state.lengths)
        token_s, logprob_s = sampling.choose_tokens(logits_sv, keys, state.temperature, state.top_p, state.top_k)
        is_eos_s = _is_eos(token_s, state.eos_ids) & live_s
        column_s = jnp.where(live_s, state.lengths, max_new_tokens)  # finished rows write nothing (dropped)
        lengths_s = state.lengths + live_s
        return state.replace(
            # a finished row's write index stays put (it rewrites one unread slot) so it never leaves its cache
            cache=cache.replace(index=jnp.where(live_s, cache.index, state.cache.index)),
            tokens=state.tokens.at[jnp.arange(slots), column_s].set(token_s, mode="drop"),
            logprobs=state.logprobs.at[jnp.arange(slots), column_s].set(logprob_s, mode="drop"),
            last_token=jnp.where(live_s, token_s, state.last_token),
            position=state.position + live_s,
            lengths=lengths_s,
            hit_eos=state.hit_eos | is_eos_s,
            done=state.done | is_eos_s | (lengths_s >= state.budget),
        )

    return jax.lax.while_loop(lambda state: jnp.sum(state.done) < refill_at, step, state)


def _state_shardings(mesh: Mesh, cfg: ModelConfig, slots: int, cache_len: int) -> EngineState:
    row = lambda rank: sharding_lib.batch_sharding(mesh, rank, slots)
    replicated = NamedSharding(mesh, P())
    kv = NamedSharding(mesh, sharding_lib.kv_cache_spec((slots, cfg.num_kv_heads, cache_len, cfg.head_dim), mesh))
    layers = (kv,) * cfg.num_layers
    return EngineState(
        cache=transformer.KVCache(k=(layers,), v=(layers,), valid=(row(2),), index=row(1)),
        tokens=row(2), logprobs=row(2), last_token=row(1), position=row(1), lengths=row(1), done=row(1),
        hit_eos=row(1), prompt_id=row(1), sample_id=row(1), temperature=row(1), top_p=row(1), top_k=row(1),
        budget=row(1), key_data=replicated, eos_ids=replicated, pad_id=replicated,
    )


@functools.lru_cache(maxsize=64)
def _programs(cfg: ModelConfig, max_new_tokens: int, slots: int, prompt_len: int, prefill_batch: int,
              mesh: Mesh | None = None, param_shardings_key=None):
    """The four jitted programs of one (slots, prompt bucket): init, prefill, insert, decode. The state is donated
    (updated in place)."""
    cache_len = prompt_len + max_new_tokens
    init = functools.partial(_init, cfg, slots=slots, cache_len=cache_len, max_new_tokens=max_new_tokens)
    prefill = functools.partial(_prefill, cfg)
    insert = _insert
    decode = functools.partial(_decode, cfg, max_new_tokens=max_new_tokens)
    if mesh is None:
        return (jax.jit(init), jax.jit(prefill), jax.jit(insert, donate_argnums=(0,)),
                jax.jit(decode, donate_argnums=(1,)))
    replicated = NamedSharding(mesh, P())
    state = _state_shardings(mesh, cfg, slots, cache_len)
    prompt = sharding_lib.batch_sharding(mesh, 2, prefill_batch)
    prompt_kv = NamedSharding(mesh, sharding_lib.kv_cache_spec(
        (prefill_batch, cfg.num_kv_heads, prompt_len, cfg.head_dim), mesh))
    prompt_cache = transformer.KVCache(k=((prompt_kv,) * cfg.num_layers,), v=((prompt_kv,) * cfg.num_layers,),
                                       valid=(prompt,), index=replicated)
    row = sharding_lib.batch_sharding(mesh, 1, slots)
    params = param_shardings_key.tree
    return (
        jax.jit(init, in_shardings=(replicated,) * 3, out_shardings=state),
        jax.jit(prefill, in_shardings=(params, prompt, prompt), out_shardings=(prompt_cache, prompt)),
        jax.jit(insert, in_shardings=(state, prompt_cache, prompt) + (row,) * 9, out_shardings=state,
                donate_argnums=(0,)),
        jax.jit(decode, in_shardings=(params, state, replicated), out_shardings=state, donate_argnums=(1,)),
    )


# --------------------------------------------------------------------------------------------------- host loop

def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, slots: int,
             temperature_p: np.ndarray, top_p_p: np.ndarray, top_k_p: np.ndarray, budget_p: np.ndarray,
             eos_array: np.ndarray,
             pad_id: int, seed: int, num_samples: int, mesh: Mesh | None, prompt_len: int,
             refill_fraction: float = REFILL_FRACTION) -> sampling.SampleOutput:
    """`sampling.generate` with at most `slots` rows in flight (validated knobs, one value per prompt; see there)."""
    num_prompts, g = len(prompts), num_samples
    rows = num_prompts * g
    multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    # At most the asked-for slots (rounded up to the mesh's batch multiple); fewer rows than that get a power of two
    # (few compiled shapes across calls).
    slots = min(-(-slots // multiple) * multiple, sampling.bucket(rows, multiple=multiple))
    prefill_batch = min(sampling.bucket(-(-slots // g), multiple=multiple),
                        sampling.bucket(num_prompts, multiple=multiple))
    shardings_key = None if mesh is None else sampling._HashableTree(jax.tree.map(lambda x: x.sharding, params))
    init, prefill, insert, decode = _programs(cfg, max_new_tokens, slots, prompt_len, prefill_batch,
                                              *(() if mesh is None else (mesh, shardings_key)))
    put = (lambda x, rank, size: x) if mesh is None else \
        (lambda x, rank, size: distributed.put(x, sharding_lib.batch_sharding(mesh, rank, size)))

    state = init(jax.random.key_data(jax.random.key(seed)), eos_array, np.int32(pad_id))
    prefilled: dict[int, tuple] = {}  # chunk -> (cache, last logits) while its rows are being started

    def chunk_of(c):
        if c not in prefilled:
            prompt_bp = np.full((prefill_batch, prompt_len), pad_id, np.int32)
            mask_bp = np.zeros((prefill_batch, prompt_len), bool)
            mask_bp[:, -1] = True  # padding prompts hold one dummy token so their attention is well defined
            for i, prompt in enumerate(prompts[c * prefill_batch:(c + 1) * prefill_batch]):
                prompt_bp[i, prompt_len - len(prompt):], mask_bp[i, prompt_len - len(prompt):] = prompt, True
            prefilled[c] = prefill(params, put(prompt_bp, 2, prefill_batch), put(mask_bp, 2, prefill_batch))
        return prefilled[c]

    out_tokens = np.full((rows, max_new_tokens), pad_id, np.int32)
    out_logprobs = np.zeros((rows, max_new_tokens), np.float32)
    out_lengths = np.zeros((rows,), np.int32)
    out_hit_eos = np.zeros((rows,), bool)
    slot_row = np.full((slots,), -1)  # the row each slot holds, -1 = free
    next_row = 0
    threshold = max(1, int(np.ceil(slots * refill_fraction)))
    while True:
        free = np.flatnonzero(slot_row < 0)
        starts = np.arange(next_row, min(rows, next_row + len(free)))
        for c in np.unique(starts // g // prefill_batch):  # one insert per prefilled chunk the new rows come from
            mine = starts[starts // g // prefill_batch == c]
            slot_m = np.full((slots,), slots, np.int32)
            slot_m[:len(mine)] = free[mine - next_row]
            slot_row[slot_m[:len(mine)]] = mine
            prompt_m, sample_m = np.zeros((slots,), np.int32), np.zeros((slots,), np.int32)
            prompt_m[:len(mine)], sample_m[:len(mine)] = mine // g, mine % g
            local_m = prompt_m - c * prefill_batch
            local_m[len(mine):] = 0
            lengths_m = np.array([len(prompts[i]) for i in prompt_m], np.int32)
            knobs = (temperature_p[prompt_m], top_p_p[prompt_m], top_k_p[prompt_m], budget_p[prompt_m])
            cache, logits = chunk_of(int(c))
            state = insert(state, cache, logits, *(put(x, 1, slots) for x in
                                                   (slot_m, local_m, prompt_m, sample_m, lengths_m, *knobs)))
            if min(rows, (c + 1) * prefill_batch * g) <= starts[-1] + 1:  # every row of this chunk has started
                prefilled.pop(int(c))
        next_row += len(starts)
        if (slot_row < 0).all():
            break
        pending = rows - next_row
        refill_at = min(threshold, pending) if pending else slots
        state = decode(params, state, np.int32(refill_at))
        done, lengths, hit_eos = distributed.fetch((state.done, state.lengths, state.hit_eos))
        finished = np.flatnonzero(done & (slot_row >= 0))
        if len(finished):
            tokens, logprobs = distributed.fetch((state.tokens, state.logprobs))
            for s in finished:
                r, n = slot_row[s], lengths[s]
                out_tokens[r, :n], out_logprobs[r, :n] = tokens[s, :n], logprobs[s, :n]
                out_lengths[r], out_hit_eos[r] = n, hit_eos[s]
            slot_row[finished] = -1
    return sampling.SampleOutput(
        tokens=[row[:n].tolist() for row, n in zip(out_tokens, out_lengths)],
        logprobs=[row[:n] for row, n in zip(out_logprobs, out_lengths)],
        lengths=out_lengths, truncated=~out_hit_eos, token_array=out_tokens, logprob_array=out_logprobs,
    )
