"""Supervised next-token training (`mode=sft`): a warm start on (prompt, response) text pairs.

`sft.path` is a JSONL file of {"prompt": user message, "response": target text}. Each prompt goes through the
tokenizer's chat template (as in rollouts), the response is followed by EOS, and the loss is the mean negative
log-likelihood of the response tokens only. Batches hold examples of similar length (sorted into length buckets, a
`sft.length_multiple` times a power of two tokens each, rows = `sft.tokens_per_batch` // length), so padding stays small and
only a handful of shapes compile. The schedule is warm-up, stable, then a linear decay over the last
`sft.decay_fraction` of the steps (WSD). The result is an HF directory, `workdir/hf`, that every other mode loads
with `model.hf_path` (and transformers too).

The update is the trainer's: same TrainState, shardings and jitted, donated step structure, with the NLL as loss.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bcr_jax import build, models, paths, sharding, tokenizer as tokenizer_lib, train
from bcr_jax.build import ConfigError


def read_examples(config, tokenizer) -> list[tuple[list[int], list[int]]]:
    path = pathlib.Path(config.sft.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config.sft.path: {path} does not exist")
    examples = []
    for row, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise ConfigError(f"config.sft.path: {path}, row {row}: needs string fields 'prompt' and 'response'")
        prompt = tokenizer_lib.build_chat_prompt(tokenizer, record["prompt"], thinking=config.rollout.thinking)
        examples.append((prompt, tokenizer.encode(record["response"]) + [tokenizer.eos_ids[0]]))
    if not examples:
        raise ConfigError(f"config.sft.path: {path} holds no examples")
    return examples


def schedule(config) -> optax.Schedule:
    steps, peak = config.sft.steps, config.sft.learning_rate
    warmup = min(config.sft.warmup_steps, steps)
    decay = int(round(steps * config.sft.decay_fraction))
    stable = max(steps - warmup - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak),
         optax.linear_schedule(peak, 0.0, max(decay, 1))], [warmup, warmup + stable])


def make_batches(examples, config, rng: np.random.Generator):
    """An endless stream of (tokens, input mask, loss mask) numpy batches of one length bucket each."""
    multiple, budget = config.sft.length_multiple, config.sft.tokens_per_batch
    lengths = np.array([len(p) + len(r) for p, r in examples])
    # Powers of two times the multiple: at most ~log2(longest / multiple) compiled shapes, padding below 2x.
    buckets = multiple * 2 ** np.ceil(np.log2(np.maximum(-(-lengths // multiple), 1))).astype(int)
    by_bucket = {int(b): np.flatnonzero(buckets == b) for b in np.unique(buckets)}
    weights = np.array([len(ix) * b for b, ix in by_bucket.items()], float)  # tokens each bucket holds
    keys = list(by_bucket)
    while True:
        width = keys[rng.choice(len(keys), p=weights / weights.sum())]
        rows = max(1, budget // width)
        rows = -(-rows // 8) * 8 if rows >= 8 else rows  # divisible by small meshes
        chosen = rng.choice(by_bucket[width], size=rows, replace=True)
        tokens = np.zeros((rows, width), np.int32)
        input_mask = np.zeros((rows, width), bool)
        loss_mask = np.zeros((rows, width), bool)
        for i, index in enumerate(chosen):
            prompt, response = examples[index]
            tokens[i, :len(prompt) + len(response)] = prompt + response
            input_mask[i, :len(prompt) + len(response)] = True
            loss_mask[i, len(prompt):len(prompt) + len(response)] = True
        yield tokens, input_mask, loss_mask


def make_sft_step(cfg, optimizer):
    def loss_fn(params, tokens, input_mask, loss_mask):
        logprobs, _ = models.token_logprobs(cfg, params, tokens, input_mask, with_entropy=False)
        return -jnp.sum(jnp.where(loss_mask, logprobs, 0.0)) / jnp.maximum(loss_mask.sum(), 1)

    def step(state: train.TrainState, tokens, input_mask, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens, input_mask, loss_mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def run_sft(config) -> paths.Path:
    """Trains as configured and writes `workdir/hf`; returns that directory."""
    if config.sft.steps < 1:
        raise ConfigError(f"config.sft.steps: must be >= 1, got {config.sft.steps}")
    mesh = build.make_mesh(config)
    tokenizer = build.load_tokenizer(config)
    if tokenizer is None:
        raise ConfigError("config.tokenizer: sft needs a tokenizer (model.hf_path or tokenizer.kind=chars)")
    examples = read_examples(config, tokenizer)
    workdir = paths.check_writable(config.workdir, "config.workdir")  # a local directory or gs://
    cfg, params = build.load_model(config, mesh)
    build.check_vocab(cfg, tokenizer)
    cfg = cfg.replace(remat=config.train.remat)
    optimizer = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip or 1e9),
                            optax.adamw(schedule(config), b1=config.optim.b1, b2=config.optim.b2,
                                        weight_decay=config.sft.weight_decay, mask=train._decay_mask))
    state = train.init_state(optimizer, params, config.seed, mesh)
    shardings = train.state_shardings(optimizer, models.param_shapes(cfg), mesh)
    batches = make_batches(examples, config, np.random.default_rng(config.seed))
    programs = {}
    log = []  # sft_metrics.jsonl, rewritten whole at each logged step (a GCS object cannot be appended to)
    start, tokens_seen = time.perf_counter(), 0
    for step in range(1, config.sft.steps + 1):
        tokens, input_mask, loss_mask = next(batches)
        if tokens.shape not in programs:
            rows = NamedSharding(mesh, sharding.batch_spec(2, tokens.shape[0], mesh))
            programs[tokens.shape] = (jax.jit(make_sft_step(cfg, optimizer), in_shardings=(shardings, rows, rows, rows),
                                              out_shardings=(shardings, NamedSharding(mesh, P())),
                                              donate_argnums=(0,)), rows)
        program, rows = programs[tokens.shape]
        state, metrics = program(state, *(jax.device_put(a, rows) for a in (tokens, input_mask, loss_mask)))
        tokens_seen += int(input_mask.sum())
        if step % config.sft.log_every == 0 or step == config.sft.steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - start
            row = {"step": step, **metrics, "learning_rate": float(schedule(config)(step - 1)),
                   "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            log.append(json.dumps(row) + "\n")
            paths.write_atomic(workdir / "sft_metrics.jsonl", "".join(log))
            print(f"sft step {step}/{config.sft.steps} | loss {row['loss']:.4f} | lr {row['learning_rate']:.1e} | "
                  f"{row['tokens_per_s']:.0f} tok/s | {elapsed:.0f}s", flush=True)
    out = workdir / "hf"
    models.save_hf(cfg.replace(remat="none"), state.params, out)
    print(f"saved the warm start to {out}", flush=True)
    return out
