"""The GRPO trainer for BCR: rollout → grading → advantages → clipped policy-gradient updates, with exact resume.

One training step (rows are prompt-major: row p * G + g is sample g of prompt p):

    P groups of N problems (data.GroupIterator)  →  bcr.pack_problems  →  chat template  →  token ids
    sampling.generate(G samples per prompt, max_new_tokens = the shared budget)      [device, current params]
    decode → bcr.split_answers → grading (worker processes, started at once)          [host, in a thread]
        meanwhile: old log-probs by teacher forcing under the rollout params          [device]
    [rollout.dynamic_sampling: groups whose advantages are all 0 are dropped and rounds of P fresh groups are
     sampled, graded and scored the same way until P informative groups are found or the rounds run out]
    rl.compute_advantages (rewards → group-normalised → per-token)                    [device]
    μ passes over the rollout in mini-batches; each mini-batch one optimizer step, its gradient accumulated
    over micro-batches inside one jitted `update_step`                                [device]
    metrics (TensorBoard, metrics.jsonl, console) → orbax checkpoint

Rollout and update are colocated: the sampler reads the training params on the training mesh (an optional bf16
copy is cast once per step); there is no second engine and no weight copy. `update_step` is a pure
`(state, batch) -> (state, metrics)` function, jitted with explicit in/out shardings and the state donated.
Aggregation weights are computed over the whole mini-batch before it is split, so micro-batching changes nothing
but peak memory. A non-finite loss or gradient norm skips the update (params and optimizer state untouched) and
counts it.

Exact resume: the checkpoint holds the TrainState (params, optimizer state, update count, RNG, skipped count) and
the data iterator's position; a step's sampling seed is drawn from the state's RNG (a resampling round's from the
same key folded with the round's index), so a resumed run repeats the uninterrupted one.

Several processes (`config.distributed`, bcr_jax/distributed.py): the mesh spans every process's devices and every
process runs this same loop. Each packs the prompts of its block of the step's groups and decodes, splits and grades
the responses of those groups (a group's G rows never straddle two processes); prompts and per-row results are
gathered, so advantages, loss weights and mini-batches are computed identically everywhere, and each process feeds
its own devices their rows. Process 0 alone writes metrics, run files and console lines; all save checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import pathlib
import re
import time
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bcr_jax import bcr, build, data, distributed, grading, models, rl, sampling, sharding
from bcr_jax import tokenizer as tokenizer_lib
from bcr_jax.build import ConfigError

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates attempted (applied + skipped)
    params: Any
    opt_state: Any
    rng: jax.Array  # [2] uint32 key data: each training step's sampling seed is drawn from it
    skipped_updates: jax.Array  # [] int32: updates skipped for a non-finite loss or gradient


class UpdateBatch(NamedTuple):
    """One mini-batch as [micro-batches K, rows m, positions T]; rows split over the mesh's batch axes."""

    tokens: jax.Array  # int32, right-padded: prompt, response, padding
    input_mask: jax.Array  # bool: prompt and response tokens
    weights: jax.Array  # float32: aggregation weights, zero off the loss tokens (see rl.loss_weights)
    advantages: jax.Array  # float32 per token
    old_logprobs: jax.Array  # float32, under the rollout params
    ref_logprobs: jax.Array  # float32, under the reference params (zeros when the KL weight is 0)


# ------------------------------------------------------------------------------------------------ optimizer

def learning_rate_schedule(config, total_updates: int) -> optax.Schedule:
    """Linear warm-up to `optim.learning_rate`, then constant, cosine or linear decay to 0 at `total_updates`."""
    peak, warmup = config.optim.learning_rate, config.optim.warmup_steps
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)
    rest = max(total_updates - warmup, 1)
    after = {"constant": optax.constant_schedule(peak),
             "cosine": optax.cosine_decay_schedule(peak, rest),
             "linear": optax.linear_schedule(peak, 0.0, rest)}[config.optim.schedule]
    return optax.join_schedules([warm, after], [warmup])


def _decay_mask(params):
    """Weight decay on matrices only: norm scales and biases are left alone."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not re.search(r"norm|bias", sharding.path_name(path)), params)


def make_optimizer(config, total_updates: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config, total_updates), b1=config.optim.b1, b2=config.optim.b2,
                        eps=config.optim.eps, weight_decay=config.optim.weight_decay, mask=_decay_mask)
    if config.optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), adamw)
    return adamw


def updates_per_step(config) -> int:
    rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    return config.train.epochs_per_rollout * (rows // (config.train.mini_batch_size or rows))


# ------------------------------------------------------------------------------------------------ state

def state_shardings(optimizer, param_shapes, mesh: Mesh) -> TrainState:
    replicated = NamedSharding(mesh, P())
    param_sh = sharding.param_shardings(param_shapes, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
    # Optimizer moments are laid out like the params they track; counters are replicated.
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated, skipped_updates=replicated)


def abstract_state(config, cfg: models.ModelConfig, mesh: Mesh) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their shardings (to restore a checkpoint into)."""
    optimizer = make_optimizer(config, config.total_steps * updates_per_step(config))
    param_shapes = models.param_shapes(cfg)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=param_shapes,
                        opt_state=jax.eval_shape(optimizer.init, param_shapes),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32), skipped_updates=jax.ShapeDtypeStruct((), jnp.int32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(optimizer, param_shapes, mesh))


def init_state(optimizer, params, seed: int, mesh: Mesh) -> TrainState:
    shardings = state_shardings(optimizer, jax.eval_shape(lambda: params), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    place = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
    return TrainState(step=place(jnp.zeros((), jnp.int32)), params=params, opt_state=opt_state,
                      rng=place(jax.random.key_data(jax.random.key(seed))),
                      skipped_updates=place(jnp.zeros((), jnp.int32)))


# ------------------------------------------------------------------------------------------------ update step

def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_update_step(cfg: models.ModelConfig, optimizer, loss_config: rl.LossConfig, *, temperature: float = 1.0,
                     learning_rate: optax.Schedule | None = None):
    """The pure update `(state, batch) -> (state, metrics)`: accumulates the gradient over the batch's micro-batches
    (a `lax.scan`), applies one optimizer step unless the loss or the gradient is non-finite. With `learning_rate`
    (the optimizer's schedule), the metrics include the rate this update used, computed on the device so the host
    never waits for the step count.

    `cfg` is the compute config (its dtype is the activations' dtype; params are cast to it inside the loss, so the
    state keeps f32 master weights and the gradient arrives in the master dtype).
    """

    def loss_fn(params, micro: UpdateBatch):
        compute_params = _cast(params, cfg.jnp_dtype)
        logprobs, entropy = models.token_logprobs(cfg, compute_params, micro.tokens, micro.input_mask,
                                                  temperature=temperature)
        return rl.policy_loss(loss_config, logprobs, micro.old_logprobs, micro.advantages, micro.weights,
                              ref_logprobs=micro.ref_logprobs, entropy=entropy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update_step(state: TrainState, batch: UpdateBatch):
        def accumulate(carry, micro):
            grads_sum, loss_sum, sums_total = carry
            (loss, sums), grads = grad_fn(state.params, micro)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
                    jax.tree.map(jnp.add, sums_total, sums)), None

        sums_shape = jax.eval_shape(loss_fn, state.params, jax.tree.map(lambda x: x[0], batch))[1]
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), zero_sums)
        (grads, loss, sums), _ = jax.lax.scan(accumulate, init, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(step=state.step + 1, params=keep_if_finite(new_params, state.params),
                                  opt_state=keep_if_finite(new_opt_state, state.opt_state),
                                  skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {"optim/loss": loss, "optim/grad_norm": grad_norm, "optim/finite": finite.astype(jnp.float32),
                   "policy/clip_fraction": sums["clipped"] / tokens, "policy/entropy": sums["entropy"] / tokens,
                   "policy/loss_tokens": sums["tokens"]}
        if "kl" in sums:
            metrics["policy/kl"] = sums["kl"] / tokens
        if "dual_clipped" in sums:
            metrics["policy/dual_clip_fraction"] = sums["dual_clipped"] / tokens
        if learning_rate is not None:  # optax counts applied updates only
            metrics["optim/learning_rate"] = learning_rate(state.step - state.skipped_updates)
        return new_state, metrics

    return update_step


def batch_sharding(mesh: Mesh, micro_rows: int) -> NamedSharding:
    """[K, m, T]: micro-batch rows split over the batch axes, so every micro-batch uses every device."""
    row_spec = sharding.batch_spec(1, micro_rows, mesh)
    return NamedSharding(mesh, P(None, row_spec[0], None))


def jit_update_step(update_step, shardings: TrainState, mesh: Mesh, micro_rows: int):
    batch_sh = UpdateBatch(*([batch_sharding(mesh, micro_rows)] * len(UpdateBatch._fields)))
    replicated = NamedSharding(mesh, P())
    return jax.jit(update_step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def _logprob_program(cfg: models.ModelConfig, temperature: float, mesh: Mesh, rows: int):
    row2 = sharding.batch_sharding(mesh, 2, rows)
    fn = functools.partial(models.token_logprobs, cfg, temperature=temperature, with_entropy=False)
    return jax.jit(lambda params, tokens, mask: fn(params, tokens, mask)[0], out_shardings=row2)


def teacher_forced_logprobs(cfg, params, tokens_bt, mask_bt, *, chunk_rows: int, temperature: float, mesh: Mesh):
    """Per-token log-probs [B, T] (numpy), computed `chunk_rows` rows at a time to bound activation memory."""
    program = _logprob_program(cfg, temperature, mesh, chunk_rows)
    row2 = sharding.batch_sharding(mesh, 2, chunk_rows)
    chunks = [program(params, distributed.put(tokens_bt[i:i + chunk_rows], row2),
                      distributed.put(mask_bt[i:i + chunk_rows], row2)) for i in range(0, len(tokens_bt), chunk_rows)]
    return np.concatenate([distributed.fetch(c) for c in chunks])


# ------------------------------------------------------------------------------------------------ config checks

def validate(config) -> None:
    """Every user error a training config can hold, named by its key, before anything compiles or writes."""

    def need(ok, key, message):
        if not ok:
            raise ConfigError(f"config.{key}: {message}")

    build.check_model(config)
    need(config.total_steps >= 1, "total_steps", f"must be >= 1, got {config.total_steps}")
    need(config.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {config.checkpoint_every}")
    need(config.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {config.keep_checkpoints}")
    need(config.data.problems_per_prompt >= 1, "data.problems_per_prompt", "must be >= 1")
    need(config.data.grouping in ("stratified", "random"), "data.grouping", f"{config.data.grouping!r}; choose "
         "stratified or random")
    need(config.data.template in bcr.TEMPLATES, "data.template", f"{config.data.template!r}; choose from "
         f"{', '.join(bcr.TEMPLATES)}")
    if data.synthetic.is_synthetic(config.data.source):
        need(config.data.source.removeprefix(data.synthetic.PREFIX) in data.synthetic.GENERATORS, "data.source",
             f"unknown synthetic source {config.data.source!r}")
    elif config.data.source == "local":
        need(bool(config.data.path), "data.path", "data.source=local reads data.path; it is empty")
        path = pathlib.Path(config.data.path).expanduser()
        need(path.is_file(), "data.path", f"{path} does not exist")
    else:
        need(config.data.source in data.SOURCES, "data.source", f"unknown source {config.data.source!r}; "
             f"registered: {', '.join(data.SOURCES)} or synthetic:<{'|'.join(data.synthetic.GENERATORS)}>")
        if config.data.path:
            path = pathlib.Path(config.data.path).expanduser()
            need(path.is_file(), "data.path", f"{path} does not exist")
    rollout = config.rollout
    need(rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    need(rollout.samples_per_prompt >= 2, "rollout.samples_per_prompt", "GRPO needs >= 2 samples per prompt")
    need(rollout.budget >= 1, "rollout.budget", "must be >= 1")
    need(rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    need(rollout.dtype in ("", "float32", "bfloat16"), "rollout.dtype", f"{rollout.dtype!r}; choose '', float32 "
         "or bfloat16")
    need(isinstance(rollout.dynamic_sampling, bool), "rollout.dynamic_sampling", "must be True or False")
    need(rollout.max_resample_rounds >= 0, "rollout.max_resample_rounds", f"must be >= 0, got "
         f"{rollout.max_resample_rounds}")
    need(config.reward.estimator in rl.ADVANTAGE_ESTIMATORS, "reward.estimator",
         f"{config.reward.estimator!r}; choose from {', '.join(rl.ADVANTAGE_ESTIMATORS)}")
    need(config.reward.reduction in ("sum", "mean"), "reward.reduction", "choose sum or mean")
    need(config.reward.credit in ("sequence", "segment"), "reward.credit", "choose sequence or segment")
    need(config.reward.length_penalty >= 0, "reward.length_penalty", "must be >= 0")
    need(0 <= config.reward.overlong_buffer <= rollout.budget, "reward.overlong_buffer", f"must be in 0..rollout.budget"
         f"={rollout.budget} (tokens; 0 = off), got {config.reward.overlong_buffer}")
    need(config.reward.overlong_penalty_factor >= 0, "reward.overlong_penalty_factor", "must be >= 0")
    need(config.loss.policy_loss in rl.POLICY_LOSSES, "loss.policy_loss", f"{config.loss.policy_loss!r}; choose "
         f"from {', '.join(rl.POLICY_LOSSES)}")
    need(config.loss.aggregation in rl.AGGREGATIONS, "loss.aggregation", f"{config.loss.aggregation!r}; choose "
         f"from {', '.join(rl.AGGREGATIONS)}")
    need(0 <= config.loss.clip_low < 1, "loss.clip_low", "must be in [0, 1)")
    need(config.loss.clip_high >= 0, "loss.clip_high", "must be >= 0")
    need(config.loss.clip_ratio_c == 0 or config.loss.clip_ratio_c > 1, "loss.clip_ratio_c",
         f"must be 0 (off) or > 1, got {config.loss.clip_ratio_c}")
    need(config.loss.clip_ratio_c == 0 or config.loss.policy_loss == "clipped", "loss.clip_ratio_c",
         f"the dual clip needs policy_loss='clipped', not {config.loss.policy_loss!r}")
    need(config.optim.schedule in ("constant", "cosine", "linear"), "optim.schedule", "choose constant, cosine or "
         "linear")
    need(config.optim.learning_rate >= 0, "optim.learning_rate", "must be >= 0")
    need(config.train.compute_dtype in ("float32", "bfloat16"), "train.compute_dtype", "choose float32 or bfloat16")
    need(config.train.attention in models.ATTENTION_IMPLEMENTATIONS, "train.attention",
         f"{config.train.attention!r}; choose from {', '.join(models.ATTENTION_IMPLEMENTATIONS)}")
    need(config.train.remat in models.REMAT_POLICIES, "train.remat", f"{config.train.remat!r}; choose from "
         f"{', '.join(models.REMAT_POLICIES)}")
    need(config.train.epochs_per_rollout >= 1, "train.epochs_per_rollout", "must be >= 1")
    rows = rollout.prompts_per_step * rollout.samples_per_prompt
    mini = config.train.mini_batch_size or rows
    micro = config.train.micro_batch_size or mini
    need(rows % mini == 0, "train.mini_batch_size", f"{mini} does not divide the {rows} rollout rows")
    need(mini % micro == 0, "train.micro_batch_size", f"{micro} does not divide the mini-batch of {mini} rows")


# ------------------------------------------------------------------------------------------------ data

# data.source = "local": a file of our own with the fields problem / answer / difficulty / id.
LOCAL_SOURCE = data.SourceSpec("local", "train", None, "problem", "answer", "difficulty", "id")


def load_training_problems(config) -> list[data.Problem]:
    if data.synthetic.is_synthetic(config.data.source):
        return data.synthetic.generate_problems(config.data.source, config.data.num_problems, seed=config.seed)
    source = LOCAL_SOURCE if config.data.source == "local" else config.data.source
    try:
        return data.load_problems(source, config.data.path or None, on_error=config.data.on_error,
                                  limit=config.data.limit or None)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.data: {e}") from None


# ------------------------------------------------------------------------------------------------ rollout

SEQUENCE_MULTIPLE = 64


class Rollout(NamedTuple):
    """One step's rollout on the host: B = P * G rows, T = prompt width + budget positions.

    The arrays hold all B rows on every process. The texts (`responses`, `answers`, `golds`) hold only the rows
    `own_rows` whose decoding and grading fall to this process (all rows with one process; see bcr_jax/distributed.py).
    """

    tokens: np.ndarray  # [B, T] int32
    input_mask: np.ndarray  # [B, T] bool
    response_mask: np.ndarray  # [B, T] bool
    sampler_logprobs: np.ndarray  # [B, T] float32 at response positions
    response_lengths: np.ndarray  # [B] int32
    truncated: np.ndarray  # [B] bool
    responses: list[str]  # [own rows]
    answers: list[list[str | None]]  # [own rows][N]
    golds: list[list[str]]  # [own rows][N]
    segment_ids: np.ndarray | None  # [B, T] int32 (segment credit only)
    answered: np.ndarray  # [B, N] bool: a well-formed answer for problem k
    text_counts: np.ndarray | None  # [B] occurrences of config.train.count_text in the response (when set)
    own_rows: slice  # the rows of `responses` / `answers` / `golds`: whole groups


def _segment_ids_for(tokenizer, response_ids, n, width, offset, require_think_close) -> np.ndarray:
    """Segment ids of one response, placed at its positions in a [width] row starting at `offset`."""
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in response_ids]
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    offsets = np.stack([ends - [len(p) for p in pieces], ends], axis=1) if pieces else np.zeros((0, 2), int)
    spans = bcr.answer_spans(text, n, require_think_close=require_think_close)
    row = np.zeros(width, np.int32)
    row[offset:offset + len(response_ids)] = bcr.segment_ids(spans, offsets)
    return row


def rollout(config, cfg, params, tokenizer, groups, *, seed: int, mesh: Mesh) -> Rollout:
    """Samples G responses to each of the step's groups and lays them out as rows (prompt-major).

    With several processes, `groups` is the whole step's list on every process: each packs and tokenizes its
    `distributed.block` of the groups, and the gathered prompts are the single-process batch, in order. Decoding,
    answer splitting and segment ids run on the process's own rows (those groups' samples) and are gathered as arrays.
    """
    n, samples = config.data.problems_per_prompt, config.rollout.samples_per_prompt
    template = bcr.TEMPLATES[config.data.template]
    mine = distributed.block(len(groups))
    own_prompts = [tokenizer_lib.build_chat_prompt(tokenizer, bcr.pack_problems([p.text for p in g], template),
                                                   thinking=config.rollout.thinking) for g in groups[mine]]
    prompts = distributed.gather_token_lists(own_prompts, len(groups))
    out = sampling.generate(cfg, params, prompts, max_new_tokens=config.rollout.budget,
                            temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                            top_k=config.rollout.top_k, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                            seed=seed, num_samples=samples, mesh=mesh, decode_blocks=config.rollout.decode_blocks)
    rows = len(prompts) * samples
    # Sequences are right-padded (prompt, response) rows, so the width only has to hold the longest one: rounded up
    # to a multiple of 64 (few compiled shapes) instead of prompt + the whole budget, which most rows never reach.
    longest = max(len(prompts[row // samples]) + len(out.tokens[row]) for row in range(rows))
    width = min(-(-longest // SEQUENCE_MULTIPLE) * SEQUENCE_MULTIPLE,
                sampling.bucket(max(len(p) for p in prompts), minimum=16) + config.rollout.budget)
    tokens = np.full((rows, width), tokenizer.pad_id, np.int32)
    input_mask = np.zeros((rows, width), bool)
    response_mask = np.zeros((rows, width), bool)
    sampler_logprobs = np.zeros((rows, width), np.float32)
    for row in range(rows):
        prompt, response = prompts[row // samples], out.tokens[row]
        start, end = len(prompt), len(prompt) + len(response)
        tokens[row, :start], tokens[row, start:end] = prompt, response
        input_mask[row, :end] = True
        response_mask[row, start:end] = True
        sampler_logprobs[row, start:end] = out.logprobs[row]
    # The text work, on this process's rows only (all of them with one process).
    own_rows = slice(mine.start * samples, mine.stop * samples)
    segment = np.zeros((own_rows.stop - own_rows.start, width), np.int32) if config.reward.credit == "segment" else None
    responses, answers, golds = [], [], []
    for i, row in enumerate(range(own_rows.start, own_rows.stop)):
        response = out.tokens[row]
        text = tokenizer.decode(response, skip_special_tokens=True)
        responses.append(text)
        answers.append(bcr.split_answers(text, n, require_think_close=config.rollout.require_think_close))
        golds.append([p.gold for p in groups[row // samples]])
        if segment is not None:
            segment[i] = _segment_ids_for(tokenizer, response, n, width, len(prompts[row // samples]),
                                          config.rollout.require_think_close)
    answered = np.array([[a is not None for a in row] for row in answers], bool).reshape(len(answers), n)
    counts = (np.array([text.count(config.train.count_text) for text in responses], np.int32)
              if config.train.count_text else None)
    gather = functools.partial(distributed.gather_blocks, count=len(groups), rows_per_item=samples)
    return Rollout(tokens, input_mask, response_mask, sampler_logprobs, out.lengths.astype(np.int32),
                   out.truncated, responses, answers, golds, None if segment is None else gather(segment),
                   gather(answered), None if counts is None else gather(counts), own_rows)


def _grade(grader: grading.Grader, answers, golds) -> tuple[np.ndarray, dict[str, float]]:
    """Verdicts [B, N] and the count of each verdict reason (`grading/<reason>`)."""
    flat_answers = [a for row in answers for a in row]
    flat_golds = [g for row in golds for g in row]
    names = [v.value for v in grader.grade_batch_verdicts(flat_answers, flat_golds)]
    correct = [name == grading.Verdict.EQUAL.value for name in names]
    counters = {f"grading/{name}": float(names.count(name)) for name in sorted(set(names))}
    return np.asarray(correct, bool).reshape(len(answers), -1) if answers else np.zeros((0, 0), bool), counters


VERDICT_NAMES = tuple(v.value for v in grading.Verdict)


def _gather_grades(correct: np.ndarray, counters: dict[str, float], num_groups: int, samples: int, n: int):
    """This process's verdicts ([own rows, N]) and counters → the whole step's, on every process."""
    if jax.process_count() == 1:
        return correct, counters
    unknown = sorted(set(counters) - {f"grading/{name}" for name in VERDICT_NAMES})
    if unknown:  # counts are summed as a fixed vector over grading.Verdict
        raise ValueError(f"grading counters {unknown} are not grading.Verdict values")
    totals = distributed.sum_over_processes(np.array([counters.get(f"grading/{name}", 0) for name in VERDICT_NAMES],
                                                     np.int32))
    correct = distributed.gather_blocks(correct.reshape(-1, n), num_groups, samples)
    return correct, {f"grading/{name}": float(t) for name, t in zip(VERDICT_NAMES, totals) if t}


# ------------------------------------------------------------------------------------------------ dynamic sampling

class Sampled(NamedTuple):
    """A graded rollout with its log-probs: one sampling round, or the step's picked groups of several."""

    rollout: Rollout
    correct: np.ndarray  # [B, N] bool
    old_logprobs: np.ndarray  # [B, T] float32, under the rollout params
    ref_logprobs: np.ndarray  # [B, T] float32 (zeros when the KL weight is 0)
    grading_counters: dict[str, float]


def zero_advantage_groups(sequence_rewards, group_size: int, instance_rewards=None) -> np.ndarray:
    """``[P]`` bool: every advantage of the group is 0 -- its sequence rewards ``[B]`` tie across its G samples and,
    for segment credit, so do its per-problem rewards ``[B, N]`` (BCR: equal mean accuracy over the N problems is
    not enough when the samples got different problems right)."""
    rewards = np.asarray(sequence_rewards, np.float32)[:, None]
    if instance_rewards is not None:
        rewards = np.concatenate([rewards, np.asarray(instance_rewards, np.float32)], axis=1)
    return np.asarray(rl.tied_groups(jnp.asarray(rewards), group_size))[::group_size]


def dynamic_sampling_picks(tied_per_round, groups_per_step: int) -> tuple[list[tuple[int, int]], int]:
    """DAPO's group filter over the rounds sampled so far (``tied_per_round``: a ``[P]`` bool per round).

    Returns the step's ``(round, group)`` picks and how many of them are informative: the informative (untied)
    groups in sampling order, cut to P (as verl keeps the first ``train_batch_size``); if the rounds ran out before
    P were found, tied groups fill the rest (the trainer takes them out of the loss).
    """
    informative = [(r, int(g)) for r, tied in enumerate(tied_per_round) for g in np.flatnonzero(~tied)]
    tied_groups = [(r, int(g)) for r, tied in enumerate(tied_per_round) for g in np.flatnonzero(tied)]
    kept = min(len(informative), groups_per_step)
    return informative[:kept] + tied_groups[:groups_per_step - kept], kept


def take_groups(rounds: list[Sampled], picks: list[tuple[int, int]], group_size: int, pad_id: int) -> Sampled:
    """The rows of the picked ``(round, group)`` groups as one Sampled, right-padded to the widest round.

    The result carries no texts (`responses`, `answers`, `golds`: they were graded in their round); every array it
    holds is the whole step's on every process, so each process picks the same rows.
    """
    if len(rounds) == 1 and picks == [(0, g) for g in range(len(rounds[0].correct) // group_size)]:
        return rounds[0]  # one round, all of it: the step without dynamic sampling
    width = max(rounds[r].rollout.tokens.shape[1] for r, _ in picks)

    def stack(get, fill=None):
        parts = []
        for r, g in picks:
            part = get(rounds[r])
            if part is None:
                return None
            part = part[g * group_size:(g + 1) * group_size]
            if fill is not None:  # a [rows, T] array of a narrower round
                part = np.pad(part, ((0, 0), (0, width - part.shape[1])), constant_values=fill)
            parts.append(part)
        return np.concatenate(parts)

    field = lambda name: (lambda sampled: getattr(sampled.rollout, name))
    roll = Rollout(tokens=stack(field("tokens"), pad_id), input_mask=stack(field("input_mask"), False),
                   response_mask=stack(field("response_mask"), False),
                   sampler_logprobs=stack(field("sampler_logprobs"), 0.0),
                   response_lengths=stack(field("response_lengths")), truncated=stack(field("truncated")),
                   responses=[], answers=[], golds=[], segment_ids=stack(field("segment_ids"), 0),
                   answered=stack(field("answered")), text_counts=stack(field("text_counts")), own_rows=slice(0, 0))
    counters: dict[str, float] = {}
    for sampled in rounds:  # every graded row counts, kept or not
        for key, value in sampled.grading_counters.items():
            counters[key] = counters.get(key, 0.0) + value
    return Sampled(roll, stack(lambda x: x.correct), stack(lambda x: x.old_logprobs, 0.0),
                   stack(lambda x: x.ref_logprobs, 0.0), counters)


def loss_mask(response_mask: np.ndarray, excluded_rows: np.ndarray) -> np.ndarray:
    """The loss tokens ``[B, T]``: the response tokens of the rows not excluded. An excluded row (truncated under
    `mask_truncated`, tied under `drop_tied_groups`, a dynamic-sampling filler) keeps no token and follows rl's
    convention for rows without loss tokens."""
    return response_mask & ~np.asarray(excluded_rows, bool)[:, None]


# ------------------------------------------------------------------------------------------------ the loop

class Trainer:
    """Holds what lives across steps: mesh, model config, tokenizer, optimizer, compiled steps, data, grader."""

    def __init__(self, config):
        validate(config)
        self.config = config
        self.mesh = build.make_mesh(config)
        self.tokenizer = build.load_tokenizer(config)
        if self.tokenizer is None:
            raise ConfigError("config.tokenizer: training needs a tokenizer; set config.model.hf_path or "
                              "config.tokenizer.kind='chars'")
        self.problems = load_training_problems(config)
        self.n = config.data.problems_per_prompt
        try:
            self.iterator = data.GroupIterator(self.problems, self.n, seed=config.seed, strategy=config.data.grouping)
        except ValueError as e:
            raise ConfigError(f"config.data: {e}") from None
        self.cfg = build.model_config(config)
        build.check_vocab(self.cfg, self.tokenizer)
        self.rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
        self.mini_rows = config.train.mini_batch_size or self.rows
        self.micro_rows = config.train.micro_batch_size or self.mini_rows
        # Whole-sequence attention and chunked log-probs for the update step and the teacher-forced log-probs
        # (the sampler's prefill attends the same way; decode reads the cache); hidden states pinned to rows over
        # the mesh's batch axes.
        memory = dict(attention=config.train.attention, attention_block=config.train.attention_block,
                      logprob_chunk=config.train.logprob_chunk, mesh=self.mesh)
        try:
            self.compute_cfg = self.cfg.replace(dtype=config.train.compute_dtype, remat=config.train.remat,
                                                scan_layers=config.train.scan_layers, **memory)
            rollout_dtype = config.rollout.dtype or config.train.compute_dtype
            self.rollout_cfg = self.cfg.replace(dtype=rollout_dtype, **memory)
        except ValueError as e:  # e.g. an unknown attention implementation, named by its ModelConfig field
            raise ConfigError(f"config.train: {e}") from None
        total_updates = config.total_steps * updates_per_step(config)
        self.optimizer = make_optimizer(config, total_updates)
        self.loss_config = rl.LossConfig(
            policy_loss=config.loss.policy_loss, clip_low=config.loss.clip_low, clip_high=config.loss.clip_high,
            clip_ratio_c=config.loss.clip_ratio_c, aggregation=config.loss.aggregation, budget=config.rollout.budget,
            kl_weight=config.loss.kl_weight, entropy_weight=config.loss.entropy_weight)
        self.reward_config = rl.RewardConfig(
            estimator=config.reward.estimator, reduction=config.reward.reduction,
            format_weight=config.reward.format_weight, credit=config.reward.credit,
            length_penalty=config.reward.length_penalty, overlong_buffer=config.reward.overlong_buffer,
            overlong_penalty_factor=config.reward.overlong_penalty_factor)
        self.temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        self.shardings = state_shardings(self.optimizer, models.param_shapes(self.cfg), self.mesh)
        self.update_step = jit_update_step(
            make_update_step(self.compute_cfg, self.optimizer, self.loss_config, temperature=self.temperature,
                             learning_rate=learning_rate_schedule(config, total_updates)),
            self.shardings, self.mesh, self.micro_rows)
        self.batch_sharding = batch_sharding(self.mesh, self.micro_rows)
        self.cast_for_rollout = jax.jit(functools.partial(_cast, dtype=self.rollout_cfg.jnp_dtype),
                                        out_shardings=self.shardings.params)

    # -- pieces of a step ------------------------------------------------------------------------

    def rollout_params(self, params):
        same = self.rollout_cfg.dtype == self.cfg.dtype
        return params if same else self.cast_for_rollout(params)

    def advantages(self, rollout: Rollout, correct: np.ndarray):
        answered = rollout.answered
        problem_mask = np.ones_like(answered)
        result = rl.compute_advantages(
            self.reward_config, self.config.rollout.samples_per_prompt, jnp.asarray(correct), jnp.asarray(answered),
            jnp.asarray(problem_mask), jnp.asarray(rollout.response_mask),
            None if rollout.segment_ids is None else jnp.asarray(rollout.segment_ids),
            jnp.asarray(rollout.response_lengths), self.config.rollout.budget)
        return jax.device_get(result), answered

    def tied_rows(self, rollout: Rollout, correct: np.ndarray, sequence_rewards: np.ndarray) -> np.ndarray:
        """``[B]`` bool: the row's group has all-zero advantages (see `zero_advantage_groups`)."""
        G = self.config.rollout.samples_per_prompt
        instance = None
        if self.config.reward.credit == "segment":
            instance = rl.instance_rewards(jnp.asarray(correct), jnp.asarray(rollout.answered),
                                           jnp.ones(correct.shape, bool), self.config.reward.format_weight)
        return np.repeat(zero_advantage_groups(sequence_rewards, G, instance), G)

    def loss_mask(self, rollout: Rollout, tied_rows: np.ndarray, filler_rows: np.ndarray) -> np.ndarray:
        excluded = filler_rows.copy()
        if self.config.loss.mask_truncated:
            excluded |= rollout.truncated
        if self.config.loss.drop_tied_groups:
            excluded |= tied_rows
        return loss_mask(rollout.response_mask, excluded)

    def update_batches(self, rollout: Rollout, token_advantages, old_logprobs, ref_logprobs, loss_mask, rng):
        """μ epochs of shuffled mini-batches, each with aggregation weights over the whole mini-batch."""
        G = self.config.rollout.samples_per_prompt
        num_groups = self.rows // G
        for _ in range(self.config.train.epochs_per_rollout):
            # Shuffle whole groups (mini-batches then hold complete groups when their size allows).
            order = (rng.permutation(num_groups)[:, None] * G + np.arange(G)[None, :]).reshape(-1)
            for start in range(0, self.rows, self.mini_rows):
                rows = order[start:start + self.mini_rows]
                weights = np.asarray(rl.loss_weights(self.loss_config, jnp.asarray(loss_mask[rows])))
                arrays = (rollout.tokens[rows], rollout.input_mask[rows], weights,
                          np.asarray(token_advantages)[rows], old_logprobs[rows], ref_logprobs[rows])
                k = self.mini_rows // self.micro_rows
                yield UpdateBatch(*(a.reshape(k, self.micro_rows, *a.shape[1:]) for a in arrays))

    # -- a step ----------------------------------------------------------------------------------

    def sample_round(self, params, groups, seed: int, grader, ref_params, timings: dict) -> Sampled:
        """Samples, grades and scores (old and reference log-probs) one round of groups."""
        config = self.config
        t0 = time.perf_counter()
        roll = rollout(config, self.rollout_cfg, params, self.tokenizer, groups, seed=seed, mesh=self.mesh)
        _add_time(timings, "time/rollout_s", t0)

        # Grading runs in worker processes while the device recomputes old log-probs.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            graded = pool.submit(_grade, grader, roll.answers, roll.golds)
            t0 = time.perf_counter()
            chunk = self.micro_rows
            old_logprobs = teacher_forced_logprobs(self.rollout_cfg, params, roll.tokens, roll.input_mask,
                                                   chunk_rows=chunk, temperature=self.temperature, mesh=self.mesh)
            if ref_params is not None:
                ref_logprobs = teacher_forced_logprobs(self.compute_cfg, ref_params, roll.tokens, roll.input_mask,
                                                       chunk_rows=chunk, temperature=self.temperature, mesh=self.mesh)
            else:
                ref_logprobs = np.zeros_like(old_logprobs)
            _add_time(timings, "time/logprobs_s", t0)
            t0 = time.perf_counter()
            correct, grading_counters = graded.result()
            correct, grading_counters = _gather_grades(correct, grading_counters, len(groups),
                                                       config.rollout.samples_per_prompt, self.n)
            _add_time(timings, "time/grading_wait_s", t0)
        return Sampled(roll, correct, old_logprobs, ref_logprobs, grading_counters)

    def step(self, state: TrainState, step_index: int, grader, ref_params=None) -> tuple[TrainState, dict]:
        config, timings = self.config, {}
        P, G = config.rollout.prompts_per_step, config.rollout.samples_per_prompt
        dynamic = config.rollout.dynamic_sampling
        start = time.perf_counter()
        rng, sample_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        seed = int(jax.random.randint(sample_key, (), 0, 2**31 - 1))
        shuffle_rng = np.random.default_rng(seed)
        state = state.replace(rng=jax.device_put(jax.random.key_data(rng), self.shardings.rng))
        rollout_params = self.rollout_params(state.params)

        # Dynamic sampling (DAPO): rounds of P fresh groups until P informative ones are found or the rounds run out.
        # Every round's prompts come from the iterator, so its checkpointed position stays exact.
        rounds, tied_per_round = [], []
        for round_index in range(1 + (config.rollout.max_resample_rounds if dynamic else 0)):
            groups = [next(self.iterator) for _ in range(P)]
            round_seed = seed if round_index == 0 else int(jax.random.randint(
                jax.random.fold_in(sample_key, round_index), (), 0, 2**31 - 1))
            sampled = self.sample_round(rollout_params, groups, round_seed, grader, ref_params, timings)
            rounds.append(sampled)
            if not dynamic:
                break
            round_rewards = self.advantages(sampled.rollout, sampled.correct)[0].sequence_rewards
            tied_per_round.append(self.tied_rows(sampled.rollout, sampled.correct, round_rewards)[::G])
            if sum(int((~tied).sum()) for tied in tied_per_round) >= P:
                break
        del rollout_params
        if dynamic:
            picks, kept = dynamic_sampling_picks(tied_per_round, P)
            if kept < P:
                distributed.log(f"warning: step {step_index}: dynamic sampling found {kept} of {P} groups with a "
                                f"learning signal in {len(rounds)} rounds (rollout.max_resample_rounds="
                                f"{config.rollout.max_resample_rounds}); tied groups fill the rest, outside the loss")
        else:
            picks, kept = [(0, g) for g in range(P)], P
        batch = take_groups(rounds, picks, G, self.tokenizer.pad_id)
        roll, correct = batch.rollout, batch.correct

        adv, answered = self.advantages(roll, correct)
        tied = self.tied_rows(roll, correct, np.asarray(adv.sequence_rewards))
        filler = np.repeat(np.arange(P) >= kept, G)
        loss_mask = self.loss_mask(roll, tied, filler)
        t0 = time.perf_counter()
        update_metrics = []  # device arrays, fetched once after the loop: updates are dispatched back to back
        for update_batch in self.update_batches(roll, adv.token_advantages, batch.old_logprobs, batch.ref_logprobs,
                                                loss_mask, shuffle_rng):
            update_batch = UpdateBatch(*(distributed.put(a, self.batch_sharding) for a in update_batch))  # own rows
            state, metrics = self.update_step(state, update_batch)
            update_metrics.append(metrics)
        update_metrics = jax.device_get(update_metrics)
        timings["time/update_s"] = time.perf_counter() - t0
        timings["time/step_s"] = time.perf_counter() - start

        generated = float(sum(s.rollout.response_lengths.sum() for s in rounds))  # every round's tokens
        scalars = self._step_metrics(roll, correct, answered, adv, batch.old_logprobs, loss_mask, tied,
                                     update_metrics, timings, generated)
        scalars.update(batch.grading_counters)
        scalars["rollout/prompts_consumed"] = float(len(rounds) * P)
        if dynamic:
            scalars["rollout/kept_groups"] = float(kept)
            scalars["rollout/resample_rounds"] = float(len(rounds) - 1)
            scalars["accuracy/sampled"] = float(np.mean([s.correct.mean() for s in rounds]))  # all rounds: unbiased
        scalars["optim/skipped_updates"] = float(state.skipped_updates)
        return state, scalars

    def _step_metrics(self, roll, correct, answered, adv, old_logprobs, loss_mask, tied, update_metrics, timings,
                      generated_tokens):
        on_response = roll.response_mask
        gap = np.abs(roll.sampler_logprobs - old_logprobs)[on_response]
        scalars = {
            "reward/mean": float(np.mean(adv.sequence_rewards)),
            "reward/std_within_groups": float(np.mean(np.std(
                np.asarray(adv.sequence_rewards).reshape(-1, self.config.rollout.samples_per_prompt), axis=1))),
            "accuracy/instance": float(correct.mean()),
            "accuracy/answered": float(answered.mean()),
            "tokens/per_problem": float(roll.response_lengths.mean() / self.n),
            "rollout/response_length": float(roll.response_lengths.mean()),
            "rollout/truncation_rate": float(roll.truncated.mean()),
            "rollout/logprob_gap": float(gap.mean()) if gap.size else 0.0,
            "rollout/tied_group_fraction": float(np.mean(tied)),  # of the groups in the update batch
            "policy/loss_token_fraction": float(loss_mask.sum() / max(on_response.sum(), 1)),
            # loss tokens of groups with all-zero advantages (0 under drop_tied_groups and dynamic sampling)
            "policy/tied_loss_token_fraction": float((loss_mask & tied[:, None]).sum() / max(loss_mask.sum(), 1)),
            "throughput/rollout_tokens_per_s": generated_tokens / max(timings["time/rollout_s"], 1e-9),
            "throughput/update_tokens_per_s": (float(roll.input_mask.sum()) * self.config.train.epochs_per_rollout
                                               / max(timings["time/update_s"], 1e-9)),
            **timings,
        }
        for k in range(self.n):
            scalars[f"accuracy/position_{k + 1}"] = float(correct[:, k].mean())
        if self.config.reward.overlong_buffer:  # DAPO's shaping, apart from accuracy (reward/mean includes it)
            penalty = np.asarray(rl.overlong_penalty(roll.response_lengths, self.config.rollout.budget,
                                                     self.config.reward.overlong_buffer,
                                                     self.config.reward.overlong_penalty_factor))
            scalars["reward/overlong_penalty"] = float(penalty.mean())
            scalars["reward/overlong_fraction"] = float(np.mean(penalty < 0))
        if self.config.train.count_text:  # e.g. the toy world's redundant "check " lines
            scalars["rollout/count_per_problem"] = float(np.mean(roll.text_counts) / self.n)
        for key in update_metrics[0]:
            scalars[key] = float(np.mean([m[key] for m in update_metrics]))
        return scalars


def _add_time(timings: dict, key: str, since: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - since  # summed over a step's sampling rounds


def check_golds(problems, grader, sample_size: int, seed: int) -> grading.GoldReport:
    """Parses (a seeded sample of) the golds as the grader will, and warns about those that do not parse whole:
    a bad data set shows up before training, not as a reward that never comes."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(problems), size=min(sample_size, len(problems)), replace=False)
    report = grader.check_golds([problems[i].gold for i in chosen])
    if not report.ok:
        share = report.num_incomplete / max(report.num_golds, 1)
        print(f"warning: {report.num_incomplete} of {report.num_golds} sampled golds ({share:.1%}) do not parse to a "
              f"complete expression; answers to them score 0. {report}", flush=True)
    return report


def load_reference_params(config, mesh):
    """The frozen reference for the KL term: the initial weights, reloaded (so a resumed run has the same ones),
    sharded like the policy and held in the compute dtype (they are only ever read by forward passes)."""
    _, params = build.load_model(config, mesh)
    return _cast(params, jnp.dtype(config.train.compute_dtype))


def run_train(config) -> TrainState:
    """Trains as configured, resuming from the workdir's latest checkpoint when `resume` is set."""
    from bcr_jax import checkpoint, metrics as metrics_lib, paths

    trainer = Trainer(config)
    workdir = paths.check_writable(config.workdir, "config.workdir")  # a local directory or gs://
    # Every process saves and restores checkpoints (orbax coordinates them); only process 0 writes everything else.
    checkpointer = checkpoint.Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
    is_main = distributed.is_main()
    start_step = 0
    latest = checkpointer.latest_step() if config.resume else None
    if latest is not None:
        state, meta = checkpointer.restore(latest, abstract_state(config, trainer.cfg, trainer.mesh))
        trainer.iterator.load_state_dict(meta["data"])
        start_step = int(meta["step"])
        distributed.log(f"resumed from {checkpointer.directory / str(latest)} (step {start_step})")
    else:
        if checkpointer.all_steps():
            raise ConfigError(f"config.resume=False but {checkpointer.directory} already holds checkpoints "
                              f"{checkpointer.all_steps()}; choose another config.workdir")
        _, params = build.load_model(config, trainer.mesh)
        state = init_state(trainer.optimizer, params, config.seed, trainer.mesh)
    if is_main:
        checkpoint.write_run_files(workdir, config, trainer.cfg)
    ref_params = load_reference_params(config, trainer.mesh) if config.loss.kl_weight else None
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=is_main)
    grader = grading.Grader(config.grading.num_workers or None, timeout_s=config.grading.timeout_s)
    if is_main and start_step == 0 and config.data.check_golds:
        check_golds(trainer.problems, grader, config.data.check_golds, config.seed)
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            state, scalars = trainer.step(state, step, grader, ref_params)
            writer.write(step, scalars)
            if is_main and (step % config.train.log_every == 0 or step == config.total_steps):
                print(metrics_lib.console_line(step, config.total_steps, scalars), flush=True)
            checkpointer.save(step, state, {"step": step, "data": trainer.iterator.state_dict()},
                              force=step == config.total_steps)
        checkpointer.wait()
    finally:
        grader.close()
        writer.close()
        checkpointer.close()
    return state


def run_export(config):
    """Writes a checkpoint of the run in `workdir` as an HF directory: workdir/export/step_<k>."""
    from bcr_jax import checkpoint, paths

    workdir = paths.resolve(config.workdir)
    if not checkpoint.is_run_dir(workdir):
        raise ConfigError(f"config.workdir: {workdir} holds no training run (config.json, model_config.json, "
                          "checkpoints/)")
    paths.check_writable(workdir, "config.workdir")
    try:
        cfg, params, _, step = checkpoint.load_run(workdir, config.export.step)
    except FileNotFoundError as e:
        raise ConfigError(f"config.export.step: {e}") from None
    out = workdir / "export" / f"step_{step}"
    models.save_hf(cfg, params, out)  # with several processes: all gather the weights, process 0 writes
    if not distributed.is_main():
        return out
    run_config = checkpoint.read_run_config(workdir)
    if run_config.model.hf_path:  # tokenizer and generation files travel with the weights
        source = pathlib.Path(run_config.model.hf_path).expanduser()
        for file in source.iterdir():
            if file.is_file() and file.suffix not in (".safetensors", ".bin") and file.name not in (
                    "config.json", "model.safetensors.index.json"):
                paths.put_file(file, out / file.name)
    print(f"exported step {step} to {out}")
    return out
