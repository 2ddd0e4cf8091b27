"""Update-step throughput: our jitted GRPO update step against transformers + AdamW and tunix's `PeftTrainer` step.

Run::

    python benchmarks/train_step.py [--passes 5] [--batch 16] [--seq 256]   # the side-by-side table (< 3 min)
    python benchmarks/train_step.py --parts       # where our step's time goes: its pieces and GEMM floors, timed alone
    python benchmarks/train_step.py --xla-sweep   # our step under XLA:CPU flag settings, one warm process each

Method
------
* Model: bench-qwen3 with an untied lm_head (hidden 256, MLP 1024, 4 layers, 8 query / 4 kv heads of 32, vocab
  1000), random fp32 weights (`init_params`, key 0) saved once with `save_hf`; every engine loads that directory, so
  every engine starts from the same weights.
* Batch: B rows x T tokens of random ids in [1, vocab), no padding; the first T/4 positions of a row are its prompt
  and the rest its response, the loss tokens. Advantages: one N(0, 1) value per row on its response tokens.
  Old log-probs: the initial params' own teacher-forced log-probs plus N(0, 0.05) noise, so the ratio is near 1
  and the clip is active on some tokens. Token-mean aggregation (`rl.loss_weights`), no KL, no entropy bonus.
* Same work in every engine: forward over all B x T tokens, per-token log-probs of the taken tokens (log-softmax
  over the vocabulary), the clipped surrogate -min(r A, clip(r, 0.8, 1.28) A) summed with the token-mean weights,
  backward, the global gradient norm, AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every
  parameter), all in float32. Engines:
  - ours: `train.jit_update_step(train.make_update_step(...))`, one micro-batch of B rows, on a one-device mesh
    (XLA:CPU spreads each op over the cores' intra-op thread pool). It also computes the entropy metric and the
    non-finite guard, which the others do not.
  - ours, 1 device/core: the same step with one XLA host device per core and the rows split over the mesh's data
    axis (each core runs its own half-batch program; the gradient is all-reduced).
  - transformers (the reference): `Qwen3ForCausalLM` with sdpa attention (faster than eager for this step on this
    CPU: see the "transformers eager" row), the loss written in torch, `loss.backward()`,
    `torch.nn.utils.get_total_norm`, and `torch.optim.AdamW(fused=True)` (the fastest of its CPU implementations
    here, see --parts). "transformers, OMP passive" is the same with OMP_WAIT_POLICY=PASSIVE (see Threads).
  - tunix: `tunix.sft.peft_trainer.PeftTrainer` (full-parameter: no LoRA params, so it differentiates every
    `nnx.Param`) with the same policy loss through `with_loss_fn`; one call of its jitted train step
    (`jit_train_and_eval_step`), the function its `train()` loop calls, without the loop's logging and checkpoint
    hooks. Its Qwen3 model is loaded with `create_model_from_safe_tensors`.
  - plain jax: a textbook JAX+optax version (~60 lines below: 2-D weight matrices, `jnp.repeat` for GQA, dense
    causal attention, `jax.value_and_grad`, `optax.adamw`, one `jax.jit` with donated state) — what a
    straightforward JAX implementation of this step gets here.
* Sanity: the first (warm-up) call of every engine starts from the same weights, so its loss and gradient norm must
  agree across engines to float32 precision; both are printed in the table.
* Timing. Every engine runs in its own worker process (so torch's OpenMP threads and XLA's thread pools never
  share a process, and tunix can live in another virtualenv), builds its step, and runs two untimed warm-up steps
  (compilation; a step fed its own donated outputs may compile again on its second call). Then, for each pass, the
  engines run one step each, in turn, the order rotating from pass to pass; a worker times its step with
  `perf_counter` until the loss and gradient norm are on the host (for JAX that waits for the whole executable).
  Idle workers block on a pipe. Reported: median tokens/s (B x T / step time),
  the spread (slowest-fastest pass) and the median over passes of the per-pass ratio to transformers, which
  cancels most of the drift of a noisy machine, and the same ratio against the fastest transformers row of each
  pass. On a shared machine, `--wait-idle 90` starts each pass only once the CPUs were 90% idle over 3 s.
* FLOPs per step, counted analytically: 6 x (matmul params: q, k, v, o, gate, up, down of every layer and the
  lm_head; not the embedding lookup) x B x T, plus causal attention 12 x layers x heads x head_dim x (T (T + 1) / 2)
  per row (QK^T and PV, forward and twice backward, on the key positions each query may see).
* Peak: the best of 10 timings of an fp32 GEMM the size of the step's MLP up-projection ([B T, d] x [d, f]), as a
  jitted `jnp.dot` and as `torch.mm`, before the run and after every pass; % peak is against the larger of the two.
  A 2048 x 2048 GEMM is measured too and printed for reference.
* Threads: torch uses as many intra-op threads as there are cores; libgomp spin-waits by default, which is torch's
  best setting on an idle machine but makes it collapse when other processes compete for the cores (3-7x slower
  here; OMP_WAIT_POLICY=PASSIVE then does far better, hence that row). The 1-minute load average before and after
  is printed: above the core count, other processes competed and the figures are not comparable.

Other modes: `--parts` times our step's pieces and the same pieces in torch, each in its own process, one after the
other; `--xla-sweep` runs our step under XLA:CPU flag settings, one warm worker per setting, interleaved;
`--trainer-profile` runs `python -m bcr_jax.main` on configs/tiny.py made heavier and prints the trainer's own split
of a step into rollout, log-probs, grading wait and update; `--ours-tree DIR` adds our engines imported from
another bcr_jax tree (a patched copy), for before/after figures in one interleaved run.

tunix: google-tunix 0.1.7's requirements would downgrade transformers and huggingface_hub, so it is not a test
extra. Install it without dependencies into a virtualenv that sees this one's packages, and the benchmark runs its
worker from there (`--tunix-python`, default: this interpreter if it can import tunix, else
/tmp/tunix_venv/bin/python)::

    python -m venv /tmp/tunix_venv --system-site-packages
    /tmp/tunix_venv/bin/pip install --no-deps google-tunix google-metrax clu tensorboardX jaxtyping \
        wadler-lindig sentencepiece perfetto
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

try:
    from bcr_jax import cpu_threading
except ImportError:  # a worker importing an --ours-tree from before it; the parent has configured XLA_FLAGS
    cpu_threading = None

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
REFERENCE = "transformers"
PRESET = "bench-qwen3"
LR, BETAS, EPS, WEIGHT_DECAY = 1e-5, (0.9, 0.999), 1e-8, 0.01
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
PROMPT_FRACTION = 4  # the first T // 4 positions of every row are prompt, the rest are the loss tokens
TUNIX_VENV_PYTHON = "/tmp/tunix_venv/bin/python"
TUNIX_INSTALL = ("python -m venv /tmp/tunix_venv --system-site-packages && /tmp/tunix_venv/bin/pip install "
                 "--no-deps google-tunix google-metrax clu tensorboardX jaxtyping wadler-lindig sentencepiece perfetto")
MESSAGE = "@@"  # prefix of the worker's protocol lines on its stdout (anything else there is library chatter)


def model_config():
    from bcr_jax import models

    return models.get_preset(PRESET).replace(tie_embeddings=False)


def count_flops(cfg, batch: int, seq: int) -> float:
    """Useful FLOPs of one update step (see the module docstring)."""
    d, hd, n, k = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    per_layer = d * n * hd * 2 + d * k * hd * 2 + 3 * d * cfg.intermediate_size  # q, o; k, v; gate, up, down
    matmul_params = cfg.num_layers * per_layer + d * cfg.vocab_size  # + lm_head
    attention = 12 * cfg.num_layers * n * hd * (seq * (seq + 1) // 2)
    return float(batch * (6 * matmul_params * seq + attention))


# ------------------------------------------------------------------------------------------------ workload


@dataclasses.dataclass
class Workload:
    """What every engine loads: the HF directory of the initial weights and the batch (numpy)."""

    hf_dir: Path
    batch: int
    seq: int
    micro_rows: int
    arrays: dict[str, np.ndarray]  # tokens, input_mask, loss_mask, weights, advantages, old_logprobs ([B, T] each)


def make_workload(scratch: Path, batch: int, seq: int, micro_rows: int) -> Workload:
    import jax
    import jax.numpy as jnp

    from bcr_jax import models, rl, sharding, train

    cfg = model_config()
    params = models.init_params(cfg, jax.random.key(0))
    hf_dir = scratch / "hf"
    models.save_hf(cfg, params, hf_dir)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
    input_mask = np.ones((batch, seq), bool)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // PROMPT_FRACTION:] = True
    weights = np.asarray(rl.loss_weights(rl.LossConfig(budget=seq), jnp.asarray(loss_mask)), np.float32)
    advantages = np.where(loss_mask, rng.standard_normal((batch, 1)), 0.0).astype(np.float32)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    logprobs = train.teacher_forced_logprobs(cfg, params, tokens, input_mask, chunk_rows=batch, temperature=1.0,
                                             mesh=mesh)
    old_logprobs = np.where(loss_mask, logprobs + 0.05 * rng.standard_normal((batch, seq)), 0.0).astype(np.float32)
    arrays = dict(tokens=tokens, input_mask=input_mask, loss_mask=loss_mask, weights=weights, advantages=advantages,
                  old_logprobs=old_logprobs)
    np.savez(scratch / "batch.npz", **arrays)
    (scratch / "meta.json").write_text(json.dumps({"batch": batch, "seq": seq, "micro_rows": micro_rows}))
    return Workload(hf_dir, batch, seq, micro_rows, arrays)


def load_workload(scratch: Path) -> Workload:
    meta = json.loads((scratch / "meta.json").read_text())
    with np.load(scratch / "batch.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return Workload(scratch / "hf", meta["batch"], meta["seq"], meta["micro_rows"], arrays)


# ------------------------------------------------------------------------------------------------ engines
#
# An engine is a factory: Workload -> runner. runner() runs one update step and returns (loss, grad norm) as Python
# floats, so it has waited for all of the step's work. A factory may raise EngineUnavailable.

Runner = Callable[[], tuple[float, float]]


class EngineUnavailable(Exception):
    """The engine cannot run here (missing package, too few cores); the message says why."""


def adamw_jax():
    import optax

    return optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)


def clipped_loss_jax(logprobs, old_logprobs, advantages, weights):
    """The same scalar loss as `rl.policy_loss` with the clipped surrogate (written out for the other engines)."""
    import jax.numpy as jnp

    ratio = jnp.exp(logprobs - old_logprobs)
    per_token = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * advantages)
    return jnp.sum(jnp.where(weights > 0, weights * per_token, 0.0))


def ours(w: Workload, per_core: bool = False) -> Runner:
    import jax

    from bcr_jax import models, rl, sharding, train

    devices = jax.devices()
    if per_core:
        if len(devices) < 2:
            raise EngineUnavailable("one XLA device: start with --xla_force_host_platform_device_count")
        mesh = sharding.make_mesh(data=len(devices))
    else:
        mesh = sharding.make_mesh(devices=devices[:1])
    cfg, params = models.load_hf(w.hf_dir, dtype="float32", mesh=mesh)
    cfg = cfg.replace(tie_embeddings=False)
    optimizer = adamw_jax()
    shardings = train.state_shardings(optimizer, models.param_shapes(cfg), mesh)
    state = train.init_state(optimizer, params, seed=0, mesh=mesh)
    loss_config = rl.LossConfig(budget=w.seq, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    step = train.jit_update_step(train.make_update_step(cfg, optimizer, loss_config), shardings, mesh,
                                 micro_rows=w.micro_rows)
    a = w.arrays
    k = w.batch // w.micro_rows
    arrays = (a["tokens"], a["input_mask"], a["weights"], a["advantages"], a["old_logprobs"],
              np.zeros_like(a["old_logprobs"]))
    batch_sharding = train.batch_sharding(mesh, w.micro_rows)
    batch = train.UpdateBatch(*(jax.device_put(x.reshape(k, w.micro_rows, w.seq), batch_sharding) for x in arrays))
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        metrics = jax.device_get(metrics)
        return float(metrics["optim/loss"]), float(metrics["optim/grad_norm"])

    return run


def hf_transformers(w: Workload, attn: str = "sdpa") -> Runner:
    import torch
    import transformers

    torch.set_num_threads(CORES)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(w.hf_dir, dtype=torch.float32,
                                                              attn_implementation=attn).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    a = {k: torch.from_numpy(v) for k, v in w.arrays.items()}
    tokens, attention_mask = a["tokens"].long(), a["input_mask"].long()
    targets = tokens[:, 1:, None]
    old, adv, weights = a["old_logprobs"][:, 1:], a["advantages"][:, 1:], a["weights"][:, 1:]
    on_loss = weights > 0

    def run():
        logits = model(input_ids=tokens, attention_mask=attention_mask).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets)[..., 0]
        ratio = torch.exp(logprobs - old)
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
        loss = torch.where(on_loss, weights * per_token, 0.0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        optimizer.step()
        return loss.item(), grad_norm.item()

    return run


def tunix(w: Workload) -> Runner:
    try:
        import jax
        import jax.numpy as jnp
        from tunix.generate import utils as tunix_utils
        from tunix.models.qwen3 import model as model_lib
        from tunix.models.qwen3 import params as params_lib
        from tunix.rl import common as rl_common
        from tunix.sft import peft_trainer
    except Exception as e:  # ImportError, or an API drift between tunix and the installed jax / flax
        raise EngineUnavailable(f"cannot import tunix ({type(e).__name__}: {e}); install: {TUNIX_INSTALL}") from e
    cfg = model_config()
    tcfg = model_lib.ModelConfig(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
        use_tied_embedding=False)
    # tunix 0.1.7's Qwen3 attention ignores config.rope_theta (always 1e6; see benchmarks/sampling.py): bind ours.
    original = getattr(model_lib.apply_rope, "func", model_lib.apply_rope)
    model_lib.apply_rope = functools.partial(original, rope_theta=cfg.rope_theta)
    model = params_lib.create_model_from_safe_tensors(str(w.hf_dir), tcfg, dtype=jnp.float32)
    trainer = peft_trainer.PeftTrainer(model, adamw_jax(), peft_trainer.TrainingConfig(eval_every_n_steps=10**9))

    def loss_fn(model, tokens, input_mask, weights, advantages, old_logprobs):
        # As tunix's own RL losses do: positions and the causal mask from the input mask, logits, log-softmax.
        positions = tunix_utils.build_positions_from_mask(input_mask)
        attn_mask = tunix_utils.make_causal_attn_mask(input_mask, tokens.shape[1])
        logits, _ = model(tokens, positions, None, attn_mask)
        logprobs = rl_common.selective_log_softmax(logits[:, :-1], tokens[:, 1:])
        return clipped_loss_jax(logprobs, old_logprobs[:, 1:], advantages[:, 1:], weights[:, 1:])

    trainer.with_loss_fn(loss_fn, has_aux=False)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    a = w.arrays
    inputs = {k: jnp.asarray(a[k]) for k in ("tokens", "input_mask", "weights", "advantages", "old_logprobs")}

    def run():
        loss, _, grad_norm = train_step(inputs)
        loss, grad_norm = jax.device_get((loss, grad_norm))
        return float(loss), float(grad_norm)

    return run


def plain_jax(w: Workload) -> Runner:
    """A textbook JAX + optax step: what a straightforward implementation of this model gets."""
    import jax
    import jax.numpy as jnp
    import optax

    from bcr_jax import models

    cfg, stacked = models.load_hf(w.hf_dir, dtype="float32")
    d, n, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lay = stacked["layers"]
    params = {
        "embed": stacked["embed"]["embedding"], "final_norm": stacked["final_norm"]["scale"],
        "lm_head": stacked["lm_head"]["kernel"],
        "layers": [{
            "input_norm": lay["input_norm"]["scale"][i], "post_norm": lay["post_attn_norm"]["scale"][i],
            "q": lay["attn"]["q_proj"]["kernel"][i].reshape(d, n * hd),
            "k": lay["attn"]["k_proj"]["kernel"][i].reshape(d, k * hd),
            "v": lay["attn"]["v_proj"]["kernel"][i].reshape(d, k * hd),
            "o": lay["attn"]["o_proj"]["kernel"][i].reshape(n * hd, d),
            "q_norm": lay["attn"]["q_norm"]["scale"][i], "k_norm": lay["attn"]["k_norm"]["scale"][i],
            "gate": lay["mlp"]["gate_proj"]["kernel"][i], "up": lay["mlp"]["up_proj"]["kernel"][i],
            "down": lay["mlp"]["down_proj"]["kernel"][i],
        } for i in range(cfg.num_layers)],
    }
    eps = cfg.rms_norm_eps
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
    angles = np.arange(w.seq)[:, None] * inv_freq[None, :]
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    causal = jnp.tril(jnp.ones((w.seq, w.seq), bool))

    def rms(x, scale):
        return scale * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)

    def rope(x):  # [b, t, heads, hd]
        x1, x2 = jnp.split(x, 2, axis=-1)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def forward(p, tokens):
        b, t = tokens.shape
        x = p["embed"][tokens]
        for lp in p["layers"]:
            h = rms(x, lp["input_norm"])
            q = rope(rms((h @ lp["q"]).reshape(b, t, n, hd), lp["q_norm"]))
            kk = rope(rms((h @ lp["k"]).reshape(b, t, k, hd), lp["k_norm"]))
            v = (h @ lp["v"]).reshape(b, t, k, hd)
            kk, v = jnp.repeat(kk, n // k, axis=2), jnp.repeat(v, n // k, axis=2)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd)
            probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
            x = x + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, n * hd) @ lp["o"]
            h = rms(x, lp["post_norm"])
            x = x + (jax.nn.silu(h @ lp["gate"]) * (h @ lp["up"])) @ lp["down"]
        return rms(x, p["final_norm"]) @ p["lm_head"]

    def loss_fn(p, batch):
        logits = forward(p, batch["tokens"])[:, :-1]
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], axis=-1)[..., 0]
        return clipped_loss_jax(logprobs, batch["old_logprobs"][:, 1:], batch["advantages"][:, 1:],
                                batch["weights"][:, 1:])

    optimizer = adamw_jax()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, optax.global_norm(grads)

    a = w.arrays
    batch = {key: jnp.asarray(a[key]) for key in ("tokens", "weights", "advantages", "old_logprobs")}
    holder = [params, optimizer.init(params)]

    def run():
        holder[0], holder[1], loss, grad_norm = step(holder[0], holder[1], batch)
        loss, grad_norm = jax.device_get((loss, grad_norm))
        return float(loss), float(grad_norm)

    return run


ENGINES: dict[str, Callable[[Workload], Runner]] = {
    "ours": ours,
    "ours, 1 device/core": functools.partial(ours, per_core=True),
    REFERENCE: hf_transformers,  # sdpa attention: the faster of the two here
    "transformers eager": functools.partial(hf_transformers, attn="eager"),
    "transformers, OMP passive": hf_transformers,  # run with OMP_WAIT_POLICY=PASSIVE (see the module docstring)
    "tunix": tunix,
    "plain jax": plain_jax,
}
ENGINE_KEYS = {"ours": "ours", "ours-per-core": "ours, 1 device/core", "transformers": REFERENCE,
               "transformers-eager": "transformers eager", "transformers-passive": "transformers, OMP passive",
               "tunix": "tunix", "plain-jax": "plain jax"}
DEFAULT_ENGINES = ("ours", "ours-per-core", "transformers", "transformers-eager", "transformers-passive", "tunix",
                   "plain-jax")


# ------------------------------------------------------------------------------------------------ workers


def worker_main(engine: str, scratch: Path, affinity: str, repeats: int) -> None:
    """A worker process: build the engine, warm up, then one timed step per 'step' line on stdin."""
    if affinity:  # before jax / torch start their thread pools
        os.sched_setaffinity(0, {int(c) for c in affinity.split(",")})

    def emit(**message):
        print(MESSAGE + json.dumps(message), flush=True)

    w = load_workload(scratch)
    start = time.perf_counter()
    if engine.startswith("parts:"):
        parts = (jax_parts if engine == "parts:jax" else torch_parts)(w, repeats)
        bcr_jax = sys.modules.get("bcr_jax")
        emit(ready=True, parts=parts, setup_s=time.perf_counter() - start,
             bcr_jax=str(Path(bcr_jax.__file__).parent.parent) if bcr_jax else "")
        return
    try:
        runner = ENGINES[engine](w)
        loss, grad_norm = runner()  # warm-up: compiles
        # A second untimed step: a jitted step whose donated state comes back committed to the device (plain jax,
        # tunix) compiles again on its second call, which would otherwise land in the first timed pass.
        runner()
    except EngineUnavailable as e:
        emit(error=str(e))
        return
    except Exception as e:  # reported by the parent; a third-party engine failing must not sink the others
        emit(error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        raise
    bcr_jax = sys.modules.get("bcr_jax")
    emit(ready=True, loss=loss, grad_norm=grad_norm, setup_s=time.perf_counter() - start,
         bcr_jax=str(Path(bcr_jax.__file__).parent.parent) if bcr_jax else "")
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        t0 = time.perf_counter()
        loss, grad_norm = runner()
        emit(seconds=time.perf_counter() - t0, loss=loss)


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, label: str, engine: str, scratch: Path, python: str = sys.executable, xla_flags: str = "",
                 affinity: str = "", pythonpath: str = "", extra: Sequence[str] = (), env: dict | None = None):
        self.label, self.engine = label, engine
        env = {**os.environ, **(env or {})}
        if pythonpath:  # another bcr_jax tree first on the path (wins over the editable install)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
        if xla_flags:  # these flags replace any of the same name (e.g. the project's threading choice)
            named = cpu_threading.flag_names(xla_flags)
            kept = [f for f in env.get("XLA_FLAGS", "").split() if not cpu_threading.flag_names(f) & named]
            env["XLA_FLAGS"] = " ".join([*kept, xla_flags])
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.log = scratch / f"worker_{len(list(scratch.glob('worker_*.log')))}.log"
        self._log_file = open(self.log, "w")
        command = [python, str(Path(__file__).resolve()), "--worker", engine, "--scratch", str(scratch)]
        if affinity:
            command += ["--affinity", affinity]
        command += list(extra)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log_file, text=True, env=env)
        self.ready: dict | None = None
        self.error: str | None = None

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MESSAGE):
                return json.loads(line[len(MESSAGE):])
        tail = self.log.read_text().strip().splitlines()[-3:]
        return {"error": f"worker exited ({self.process.wait()}): {' | '.join(tail)[-300:]}"}

    def wait_ready(self) -> None:
        message = self.read()
        if "error" in message:
            self.error = message["error"]
        else:
            self.ready = message

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        message = self.read()
        if "error" in message:
            raise RuntimeError(f"{self.label}: {message['error']}")
        return message["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def tunix_python(requested: str) -> str | None:
    if requested:
        return requested
    if importlib.util.find_spec("tunix") is not None:
        return sys.executable
    return TUNIX_VENV_PYTHON if Path(TUNIX_VENV_PYTHON).exists() else None


def cpu_idle(seconds: float) -> float:
    """Fraction of all CPU time that was idle over the next `seconds` (from /proc/stat; 1.0 where it is missing)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 1.0
    return (idle1 - idle0) / max(total1 - total0, 1)


WAIT_IDLE = {"threshold": 0.0, "max_wait_s": 300.0}  # --wait-idle / --max-wait


def wait_for_idle() -> str:
    """With --wait-idle, blocks until the CPUs were that idle over 3 s (other processes quiet), at most --max-wait."""
    if not WAIT_IDLE["threshold"]:
        return ""
    start = time.perf_counter()
    while True:
        idle = cpu_idle(3.0)
        waited = time.perf_counter() - start
        if idle >= WAIT_IDLE["threshold"]:
            return f" (started after {waited:.0f} s, {100 * idle:.0f}% idle)"
        if waited >= WAIT_IDLE["max_wait_s"]:
            return f" (gave up waiting after {waited:.0f} s: only {100 * idle:.0f}% idle)"


def interleave(workers: Sequence[Worker], passes: int, tokens: int, after_pass: Callable[[], None] = lambda: None,
               reference: str | None = REFERENCE) -> dict[str, dict[str, list[float]]]:
    """`passes` rounds of one step per ready worker, the order rotating; per label: seconds and per-pass ratios."""
    live = [w for w in workers if w.ready is not None]
    results = {w.label: {"seconds": [], "ratios": []} for w in live}
    for p in range(passes):
        waited = wait_for_idle()
        order = live[p % len(live):] + live[:p % len(live)]
        times = {}
        for w in order:
            times[w.label] = w.step()
            results[w.label]["seconds"].append(times[w.label])
        if reference in times:
            for label, seconds in times.items():
                results[label]["ratios"].append(times[reference] / seconds)
        torch_times = [t for label, t in times.items() if label.startswith(REFERENCE)]
        if torch_times:  # against whichever transformers variant was fastest in this pass
            for label, seconds in times.items():
                results[label].setdefault("ratios_best", []).append(min(torch_times) / seconds)
        print(f"  pass {p + 1}/{passes}{waited}: " + "  ".join(f"{label} {tokens / s:,.0f}" for label, s in
                                                              times.items()) + " tok/s", flush=True)
        after_pass()
    return results


# ------------------------------------------------------------------------------------------------ peak


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `fn()` (which must block until its work is done) over `repeats` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class MatmulPeak:
    """Best fp32 GFLOP/s seen for a [m, k] x [k, n] GEMM, as a jitted `jnp.dot` and as `torch.mm`."""

    def __init__(self, m: int, k: int, n: int, repeats: int = 10):
        import jax
        import jax.numpy as jnp
        import torch

        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        a_jax, b_jax, dot = jnp.asarray(a), jnp.asarray(b), jax.jit(jnp.dot)
        a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
        self._calls = {"jax": lambda: dot(a_jax, b_jax).block_until_ready(),
                       "torch": lambda: torch.mm(a_torch, b_torch)}
        self._flops, self._repeats = 2.0 * m * k * n, repeats
        self.shape = f"[{m},{k}]x[{k},{n}]"
        self.best = dict.fromkeys(self._calls, 0.0)

    def measure(self) -> None:
        for name, call in self._calls.items():
            self.best[name] = max(self.best[name], self._flops / best_seconds(call, self._repeats) / 1e9)


# ------------------------------------------------------------------------------------------------ report


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{CORES} cores ({cpu}, {platform.machine()}), Python {platform.python_version()}, "
            f"jax {version('jax')}, torch {version('torch')} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
            f"transformers {version('transformers')}, optax {version('optax')}, flax {version('flax')}")


def source_state() -> str:
    """The commit of this checkout, and whether bcr_jax/ differs from it (the benchmark runs the working tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bcr_jax"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "bcr_jax: not a git checkout"
    return f"bcr_jax at {commit}" + (" with uncommitted changes in bcr_jax/" if dirty else "")


def table(workers: Sequence[Worker], results, flops: float, tokens: int, peak: float,
          reference: str | None = REFERENCE) -> list[str]:
    lines = ["| engine | tok/s (median) | spread (min-max) | ms/step | x transformers | x fastest transformers "
             "| GFLOP/s | % peak | step-1 loss | step-1 grad norm |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for w in workers:
        if w.ready is None:
            lines.append(f"| {w.label} | — | — | — | — | — | — | — | — | — |")
            notes.append(f"- {w.label}: not run: {w.error}")
            continue
        seconds = results[w.label]["seconds"]
        median = statistics.median(seconds)
        ratios = results[w.label]["ratios"]
        ratio = "1" if w.label == reference else (f"{statistics.median(ratios):.2f}" if ratios else "—")
        best = results[w.label].get("ratios_best")
        best = f"{statistics.median(best):.2f}" if best else "—"
        gflops = flops / median / 1e9
        lines.append(f"| {w.label} | {tokens / median:,.0f} | {tokens / max(seconds):,.0f}-{tokens / min(seconds):,.0f}"
                     f" | {1e3 * median:,.0f} | {ratio} | {best} | {gflops:.1f} | {100 * gflops / peak:.0f}% "
                     f"| {w.ready['loss']:.6f} | {w.ready['grad_norm']:.6f} |")
    return lines + ([""] + notes if notes else [])


def start_workers(specs, scratch: Path) -> list[Worker]:
    """Starts every worker (they build and compile concurrently) and waits until each is ready or has failed."""
    workers = [Worker(scratch=scratch, **spec) for spec in specs]
    for w in workers:
        w.wait_ready()
        status = f"ready ({w.ready['setup_s']:.0f} s to build + warm up)" if w.ready else f"not run: {w.error}"
        print(f"  {w.label}: {status}", flush=True)
    return workers


def run_table(args) -> None:
    import torch

    torch.set_num_threads(CORES)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    cfg = model_config()
    tokens, flops = args.batch * args.seq, count_flops(cfg, args.batch, args.seq)
    print(f"Machine: {versions()}; 1-min load average {load_before:.1f}", flush=True)
    peak = MatmulPeak(tokens, cfg.hidden_size, cfg.intermediate_size)
    square = MatmulPeak(2048, 2048, 2048)
    measure = lambda: (peak.measure(), square.measure())
    measure()
    wanted = [ENGINE_KEYS[e.strip()] for e in args.engines.split(",") if e.strip()]
    with tempfile.TemporaryDirectory(prefix="bcr_train_step_bench_") as scratch_name:
        scratch = Path(scratch_name)
        make_workload(scratch, args.batch, args.seq, args.micro_rows or args.batch)
        specs = []
        for label in wanted:
            spec = {"label": label, "engine": label}
            if label == "tunix":
                python = tunix_python(args.tunix_python)
                if python is None:
                    print(f"  tunix: not run: not importable and no {TUNIX_VENV_PYTHON}; install: {TUNIX_INSTALL}")
                    continue
                spec["python"] = python
            if label == "ours, 1 device/core":
                spec["xla_flags"] = f"--xla_force_host_platform_device_count={CORES}"
            if label == "transformers, OMP passive":
                spec["env"] = {"OMP_WAIT_POLICY": "PASSIVE"}
            specs.append(spec)
        for tree in args.ours_tree:  # the same ours engines, from another bcr_jax tree
            for spec in [spec for spec in specs if spec["engine"].startswith("ours") and "pythonpath" not in spec]:
                specs.append({**spec, "label": f"{spec['label']} @ {tree}", "pythonpath": str(Path(tree).resolve())})
        workers = start_workers(specs, scratch)
        for w in workers:
            if w.ready and " @ " in w.label and not w.label.endswith(w.ready["bcr_jax"]):
                raise RuntimeError(f"{w.label}: imported bcr_jax from {w.ready['bcr_jax']}")
        try:
            results = interleave(workers, args.passes, tokens, after_pass=measure)
        finally:
            for w in workers:
                w.close()
    machine_peak = max(peak.best.values())
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_after = os.getloadavg()[0]
    lines = [
        f"### Update step ({date})",
        "",
        f"Machine: {versions()}; {source_state()}.",
        f"1-min load average: {load_before:.1f} before, {load_after:.1f} after the run ({CORES} cores).",
        (f"fp32 GEMM peak (best of 10 timings before the run and after each pass): {peak.shape} (the step's MLP "
         f"up-projection): jnp.dot {peak.best['jax']:.1f} GFLOP/s, torch.mm {peak.best['torch']:.1f} GFLOP/s; "
         f"2048^3: jnp.dot {square.best['jax']:.1f}, torch.mm {square.best['torch']:.1f} GFLOP/s. "
         f"% peak is against {machine_peak:.1f} GFLOP/s."),
        (f"{PRESET} untied, B={args.batch} x T={args.seq} ({tokens:,} tokens per step, loss on the last "
         f"{args.seq - args.seq // PROMPT_FRACTION} positions of each row), fp32, micro-batch rows "
         f"{args.micro_rows or args.batch}; {flops / 1e9:.1f} GFLOP per step; {args.passes} interleaved passes; "
         f"tok/s = B x T / step time, median over passes; x {REFERENCE} = median of the per-pass ratios; "
         f"x fastest {REFERENCE} = the same against the fastest {REFERENCE} row of each pass"
         + (f"; each pass started once the CPUs had been {100 * WAIT_IDLE['threshold']:.0f}% idle over 3 s "
            f"(waits above)" if WAIT_IDLE["threshold"] else "") + "."),
        "",
        *table(workers, results, flops, tokens, machine_peak),
    ]
    print()
    print("\n".join(lines))
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")


# ------------------------------------------------------------------------------------------------ XLA sweep

def xla_settings() -> tuple[tuple[str, str], ...]:
    """(label, XLA_FLAGS) rows of --xla-sweep; each row runs with the project's threading flags unless it sets them."""
    return (
        ("default", cpu_threading.default_flags()),
        ("chosen (bcr_jax.cpu_threading)", cpu_threading.chosen_flags()),
        ("one XLA device per core, rows split (ours, 1 device/core)", f"--xla_force_host_platform_device_count={CORES}"),
        ("--xla_cpu_use_xnnpack=false", "--xla_cpu_use_xnnpack=false"),
        ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
         "--xla_cpu_enable_concurrency_optimized_scheduler=false"),
        ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
         "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"),
        ("--xla_cpu_use_onednn=true", "--xla_cpu_use_onednn=true"),
        ("--xla_cpu_enable_fast_math=true", "--xla_cpu_enable_fast_math=true"),
        ("--xla_cpu_prefer_vector_width=512", "--xla_cpu_prefer_vector_width=512"),
        ("--xla_cpu_use_thunk_runtime=false (deprecated)", "--xla_cpu_use_thunk_runtime=false"),
        ("one core (sched_setaffinity {0})", "@affinity=0"),
    )


def run_xla_sweep(args) -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    tokens = args.batch * args.seq
    print(f"Machine: {versions()}; 1-min load average {load_before:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bcr_train_step_sweep_") as scratch_name:
        scratch = Path(scratch_name)
        make_workload(scratch, args.batch, args.seq, args.micro_rows or args.batch)
        specs = [{"label": REFERENCE, "engine": REFERENCE}]
        for label, flags in xla_settings():
            engine = "ours, 1 device/core" if "device_count" in flags else "ours"
            if flags.startswith("@affinity="):
                specs.append({"label": label, "engine": engine, "affinity": flags.removeprefix("@affinity=")})
            else:
                specs.append({"label": label, "engine": engine, "xla_flags": flags})
        workers = start_workers(specs, scratch)
        try:
            results = interleave(workers, args.passes, tokens)
        finally:
            for w in workers:
                w.close()
    print(f"\n### XLA:CPU settings, our update step ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC})\n")
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {args.passes} interleaved "
          f"passes; B={args.batch} x T={args.seq}.\n")
    print("| setting | tok/s (median) | spread (min-max) | x transformers | x default |")
    print("|---|---|---|---|---|")
    default = results.get("default", {}).get("seconds")
    for w in workers:
        if w.ready is None:
            print(f"| {w.label} | — | — | — | — |  not run: {w.error}")
            continue
        s = results[w.label]["seconds"]
        med = statistics.median(s)
        vs_default = (f"{statistics.median(d / x for d, x in zip(default, s)):.2f}" if default else "—")
        ratio = statistics.median(results[w.label]["ratios"])
        print(f"| {w.label} | {tokens / med:,.0f} | {tokens / max(s):,.0f}-{tokens / min(s):,.0f} | {ratio:.2f} "
              f"| {vs_default} |")
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")


# ------------------------------------------------------------------------------------------------ parts


PARTS = (  # (key, description, counted GFLOP as a function of (cfg, B, T) or None)
    ("step", "whole update step (ours: jitted step; torch: transformers + fused AdamW)", "step"),
    ("fwd", "forward + loss only (no backward)", "fwd"),
    ("fwd_bwd", "forward + backward (no optimizer)", "step"),
    ("fwd_bwd_no_entropy", "forward + backward, entropy metric off", "step"),
    ("optimizer", "AdamW update alone (optax / torch fused)", None),
    ("optimizer_loop", "AdamW update alone (torch default for-loop)", None),
    ("guard", "non-finite guard alone (a where over params and both moments)", None),
    ("attention", "attention alone: scores, causal mask, softmax, PV, every layer, fwd + bwd", "attention"),
    ("mlp", "SwiGLU MLP alone, every layer, fwd + bwd", "mlp"),
    ("head", "log-prob head alone: lm_head + log-softmax + taken token, fwd + bwd", "head"),
    ("head_entropy", "log-prob head with the entropy metric, fwd + bwd", "head"),
    ("embedding_grad", "embedding lookup gradient alone (scatter-add of B T rows)", None),
    ("gemm_floor", "GEMM floor: the step's matmuls only (q k v o gate up down x layers + lm_head), fwd + bwd", "gemm"),
)


def part_flops(cfg, batch: int, seq: int) -> dict[str, float]:
    d, n, hd, f, v, layers_ = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size,
                               cfg.vocab_size, cfg.num_layers)
    tokens = batch * seq
    step = count_flops(cfg, batch, seq)
    attention = 12 * layers_ * n * hd * (seq * (seq + 1) // 2) * batch
    return {"step": step, "fwd": step / 3, "attention": attention, "mlp": 6 * layers_ * 3 * d * f * tokens,
            "head": 6 * d * v * tokens, "gemm": step - attention}


def timed_median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()  # twice: a jitted function fed its own donated outputs may compile again on its second call
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def gemm_shapes(cfg) -> list[tuple[int, int]]:
    d, n, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return [(d, n * hd), (d, k * hd), (d, k * hd), (n * hd, d), (d, f), (d, f), (f, d)] * cfg.num_layers + [
        (d, cfg.vocab_size)]


def jax_parts(w: Workload, repeats: int) -> dict[str, float]:
    """Our step and its pieces, each jitted and timed alone (median of `repeats`). Library functions are used
    wherever they exist, so a patched bcr_jax tree (--ours-tree) shows in every piece it changes."""
    import jax
    import jax.numpy as jnp
    import optax

    from bcr_jax import models, rl
    from bcr_jax.models import layers

    cfg = model_config()
    B, T = w.batch, w.seq
    d, n, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {"step": timed_median(ours(w), repeats)}
    _, params = models.load_hf(w.hf_dir, dtype="float32")
    a = {key: jnp.asarray(value) for key, value in w.arrays.items()}
    loss_config = rl.LossConfig(budget=T, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)

    def loss_fn(p, with_entropy=True):
        logprobs, entropy = models.token_logprobs(cfg, p, a["tokens"], a["input_mask"], with_entropy=with_entropy)
        return rl.policy_loss(loss_config, logprobs, a["old_logprobs"], a["advantages"], a["weights"],
                              entropy=entropy)[0]

    fwd = jax.jit(loss_fn)
    out["fwd"] = timed_median(lambda: fwd(params).block_until_ready(), repeats)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    out["fwd_bwd"] = timed_median(lambda: jax.block_until_ready(grad(params)), repeats)
    grad_no_entropy = jax.jit(jax.value_and_grad(functools.partial(loss_fn, with_entropy=False)))
    out["fwd_bwd_no_entropy"] = timed_median(lambda: jax.block_until_ready(grad_no_entropy(params)), repeats)

    optimizer = adamw_jax()
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def opt_update(grads, opt_state, p):
        updates, new_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), new_state

    holder = [optimizer.init(params), jax.tree.map(jnp.copy, params)]

    def run_opt():
        holder[1], holder[0] = opt_update(grads, holder[0], holder[1])
        jax.block_until_ready(holder[1])

    out["optimizer"] = timed_median(run_opt, repeats)
    guard = jax.jit(lambda new, old, finite: jax.tree.map(lambda x, y: jnp.where(finite, x, y), new, old))
    both = (params, optimizer.init(params))
    out["guard"] = timed_median(lambda: jax.block_until_ready(guard(both, both, jnp.bool_(True))), repeats)

    rng = np.random.default_rng(1)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    q, kk, vv = normal(B, T, n, hd), normal(B, k, hd, T), normal(B, k, T, hd)
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0) & a["input_mask"][:, None, :]

    def attention_loss(q, kk, vv):
        return sum(jnp.sum(layers.attend(q, (kk,), (vv,), mask) ** 2) for _ in range(cfg.num_layers))

    attention_grad = jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2)))
    out["attention"] = timed_median(lambda: jax.block_until_ready(attention_grad(q, kk, vv)), repeats)

    x = 0.1 * normal(B, T, d)
    mlps = [jax.tree.map(lambda p_, i=i: p_[i], params["layers"]["mlp"]) for i in range(cfg.num_layers)]

    def mlp_loss(mlps, x):
        for p_ in mlps:
            x = x + layers.swiglu_mlp(p_, x)
        return jnp.sum(x ** 2)

    mlp_grad = jax.jit(jax.grad(mlp_loss, argnums=(0, 1)))
    out["mlp"] = timed_median(lambda: jax.block_until_ready(mlp_grad(mlps, x)), repeats)

    def head_loss(p, hidden, with_entropy):
        logits = models.logits_from_hidden(cfg, p, hidden[:, :-1])
        norm = jax.nn.logsumexp(logits, axis=-1)
        taken = jnp.take_along_axis(logits, a["tokens"][:, 1:, None], axis=-1)[..., 0]
        loss = jnp.sum(a["weights"][:, 1:] * (taken - norm))
        if with_entropy:  # as token_logprobs computes it (a metric: no gradient flows through it in the step)
            probs = jnp.exp(logits - norm[..., None])
            loss = loss + jax.lax.stop_gradient(jnp.sum(norm - jnp.sum(probs * logits, -1)))
        return loss

    head_params = {"lm_head": params["lm_head"]}
    for key, with_entropy in (("head", False), ("head_entropy", True)):
        g = jax.jit(jax.grad(functools.partial(head_loss, with_entropy=with_entropy), argnums=(0, 1)))
        out[key] = timed_median(lambda g=g: jax.block_until_ready(g(head_params, x)), repeats)

    emb_grad = jax.jit(jax.grad(lambda e: jnp.sum(e[a["tokens"]] * x)))
    out["embedding_grad"] = timed_median(lambda: emb_grad(params["embed"]["embedding"]).block_until_ready(), repeats)

    weights = [0.02 * normal(*shape) for shape in gemm_shapes(cfg)]
    x0 = normal(B * T, d)

    def gemm_loss(ws, x):  # the matmuls chained through residual adds; k/v feed o through a cheap broadcast
        it = iter(ws)
        for _ in range(cfg.num_layers):
            wq, wk, wv, wo, wg, wu, wd = (next(it) for _ in range(7))
            x = x + (x @ wq + jnp.tile(x @ wk + x @ wv, (1, n // k))) @ wo
            x = x + ((x @ wg) * (x @ wu)) @ wd
        return jnp.sum((x @ next(it)) ** 2)

    gemm_grad = jax.jit(jax.grad(gemm_loss, argnums=(0, 1)))
    out["gemm_floor"] = timed_median(lambda: jax.block_until_ready(gemm_grad(weights, x0)), repeats)
    return out


def torch_parts(w: Workload, repeats: int) -> dict[str, float]:
    """transformers' step and the same pieces in torch (sdpa attention, as in the table's reference row)."""
    import torch
    import transformers

    torch.set_num_threads(CORES)
    cfg = model_config()
    B, T = w.batch, w.seq
    d, n, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {"step": timed_median(hf_transformers(w), repeats)}
    model = transformers.AutoModelForCausalLM.from_pretrained(w.hf_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").train()
    a = {key: torch.from_numpy(value) for key, value in w.arrays.items()}
    tokens = a["tokens"].long()
    old, adv, weights_t = a["old_logprobs"][:, 1:], a["advantages"][:, 1:], a["weights"][:, 1:]

    def loss():
        logits = model(input_ids=tokens).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
        ratio = torch.exp(logprobs - old)
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
        return torch.where(weights_t > 0, weights_t * per_token, 0.0).sum()

    def fwd():
        with torch.no_grad():
            loss().item()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss().backward()

    out["fwd"] = timed_median(fwd, repeats)
    out["fwd_bwd"] = timed_median(fwd_bwd, repeats)
    fwd_bwd()
    fused = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    out["optimizer"] = timed_median(fused.step, repeats)
    loop = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    out["optimizer_loop"] = timed_median(loop.step, repeats)

    gen = torch.Generator().manual_seed(1)
    normal = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()
    q, kk, vv = normal(B, n, T, hd), normal(B, k, T, hd), normal(B, k, T, hd)

    def attention():  # as transformers' sdpa_attention_forward calls it for an unpadded batch: causal, GQA
        for t_ in (q, kk, vv):
            t_.grad = None
        total = 0.0
        for _ in range(cfg.num_layers):
            out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=True)
            total = total + (out ** 2).sum()
        total.backward()

    out["attention"] = timed_median(attention, repeats)
    x = (0.1 * torch.randn(B, T, d, generator=gen)).requires_grad_()
    mlps = model.model.layers

    def mlp():
        model.zero_grad(set_to_none=True)
        x.grad = None
        y = x
        for layer in mlps:
            y = y + layer.mlp(y)
        (y ** 2).sum().backward()

    out["mlp"] = timed_median(mlp, repeats)

    def head():
        model.zero_grad(set_to_none=True)
        x.grad = None
        logits = model.lm_head(x[:, :-1])
        (weights_t * torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]).sum().backward()

    out["head"] = timed_median(head, repeats)
    emb = model.model.embed_tokens

    def embedding_grad():
        model.zero_grad(set_to_none=True)
        (emb(tokens) * x.detach()).sum().backward()

    out["embedding_grad"] = timed_median(embedding_grad, repeats)
    rng = np.random.default_rng(1)
    ws = [torch.from_numpy(0.02 * rng.standard_normal(shape, dtype=np.float32)).requires_grad_()
          for shape in gemm_shapes(cfg)]
    x0 = torch.from_numpy(rng.standard_normal((B * T, d), dtype=np.float32)).requires_grad_()

    def gemm_floor():
        for t_ in ws + [x0]:
            t_.grad = None
        it, y = iter(ws), x0
        for _ in range(cfg.num_layers):
            wq, wk, wv, wo, wg, wu, wd = (next(it) for _ in range(7))
            y = y + (y @ wq + (y @ wk + y @ wv).repeat(1, n // k)) @ wo
            y = y + ((y @ wg) * (y @ wu)) @ wd
        ((y @ next(it)) ** 2).sum().backward()

    out["gemm_floor"] = timed_median(gemm_floor, repeats)
    return out


def run_parts(args) -> None:
    """Our step's pieces and transformers', each timed alone in its own worker process, side by side."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    cfg = model_config()
    B, T = args.batch, args.seq
    flops = part_flops(cfg, B, T)
    print(f"Machine: {versions()}; {source_state()}; 1-min load average {load_before:.1f}", flush=True)
    columns = [("ours (JAX)", "parts:jax", "")] + [(f"ours @ {tree}", "parts:jax", str(Path(tree).resolve()))
                                                   for tree in args.ours_tree] + [("transformers", "parts:torch", "")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bcr_train_step_parts_") as scratch_name:
        scratch = Path(scratch_name)
        make_workload(scratch, B, T, B)
        for label, engine, tree in columns:  # one at a time: each times its pieces alone on an otherwise idle machine
            worker = Worker(label, engine, scratch, pythonpath=tree, extra=["--repeats", str(args.repeats)])
            worker.wait_ready()
            worker.close()
            if worker.ready is None:
                raise RuntimeError(f"{label}: {worker.error}")
            results[label] = worker.ready["parts"]
            print(f"  {label}: done", flush=True)
    labels = [c[0] for c in columns]
    print(f"\n### Where the update step's time goes ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC})\n")
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; B={B} x T={T}, fp32; each "
          f"piece jitted (JAX) or eager (torch) on the step's shapes, median of {args.repeats} timings after a "
          f"warm-up; ms (GFLOP/s where the piece has a FLOP count).\n")
    print("| part | GFLOP | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for key, description, flop_key in PARTS:
        if not any(key in results[label] for label in labels):
            continue
        gflop = flops[flop_key] / 1e9 if flop_key else None
        cells = []
        for label in labels:
            seconds = results[label].get(key)
            if seconds is None:
                cells.append("—")
            else:
                cells.append(f"{1e3 * seconds:,.1f}" + (f" ({gflop / seconds:.0f})" if gflop else ""))
        print(f"| {description} | {f'{gflop:.1f}' if gflop else '—'} | " + " | ".join(cells) + " |")
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")


# ------------------------------------------------------------------------------------------------ trainer profile

TRAINER_WORDS = tuple(f"\\boxed{{{d}}}" for d in range(10)) + ("### Problem ", "Answer 1::", "Answer 2::", "Answer 3::")
TRAINER_CHARACTERS = "0123456789+-\n"  # configs/tiny.py's


def trainer_command(workdir: Path, steps: int, budget: int, problems: int) -> list[str]:
    """`python -m bcr_jax.main` on configs/tiny.py made heavier: a longer budget, N problems per prompt, and whole-word
    `Answer k::` markers so that a random policy's answers parse now and then and grading has real work."""
    words = TRAINER_WORDS[:11 + problems]
    return [sys.executable, "-m", "bcr_jax.main", "--config", "configs/tiny.py", f"--config.workdir={workdir}",
            f"--config.total_steps={steps}", "--config.resume=False", f"--config.checkpoint_every={steps}",
            f"--config.rollout.budget={budget}", f"--config.data.problems_per_prompt={problems}",
            f"--config.tokenizer.words={words!r}",
            f"--config.model.vocab_size={2 + len(words) + len(TRAINER_CHARACTERS)}"]


def run_trainer_profile(args) -> None:
    """Time split of real BCR training steps (the trainer's own time/* metrics), steps 2.. (step 1 compiles); with
    --ours-tree, the same run from each tree (which must hold configs/ too), one after the other."""
    root = Path(__file__).resolve().parent.parent
    trees = [("this checkout", root)] + [(f"@ {tree}", Path(tree).resolve()) for tree in args.ours_tree]
    load_before = os.getloadavg()[0]
    steady, walls = {}, {}
    with tempfile.TemporaryDirectory(prefix="bcr_trainer_profile_") as scratch_name:
        for i, (label, tree) in enumerate(trees):
            workdir = Path(scratch_name) / f"run{i}"
            command = trainer_command(workdir, args.trainer_steps, args.trainer_budget, args.trainer_problems)
            print(f"({tree}) $ python " + shlex.join(command[1:]), flush=True)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", ""))
                                                               if p)}
            started = time.perf_counter()
            subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls[label] = time.perf_counter() - started
            rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            steady[label] = [r for r in rows if r["step"] >= 2]
    keys = [("time/rollout_s", "rollout (sampling, decoding, answer parsing)"),
            ("time/logprobs_s", "old log-probs (teacher forcing; grading runs meanwhile)"),
            ("time/grading_wait_s", "waiting for grading after the log-probs"),
            ("time/update_s", "update (optimizer steps)")]
    print(f"\n### One BCR training step, by phase ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC})\n")
    first = steady[trees[0][0]]
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {args.trainer_steps} steps "
          f"per run ({', '.join(f'{w:.0f} s' for w in walls.values())} with compilation); medians over steps "
          f"2-{args.trainer_steps} (step 1 compiles); answers parsed: "
          f"{statistics.mean(r['accuracy/answered'] for r in first):.1%} of problems, mean response length "
          f"{statistics.mean(r['rollout/response_length'] for r in first):.1f} of {args.trainer_budget} tokens.\n")
    labels = list(steady)
    print("| phase | " + " | ".join(f"{label}: ms (share)" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    medians = {label: {k: statistics.median(r[k] for r in steady[label]) for k, _ in keys + [("time/step_s", "")]}
               for label in labels}
    for key, description in keys:
        print(f"| {description} | " + " | ".join(
            f"{1e3 * medians[l][key]:,.0f} ({100 * medians[l][key] / medians[l]['time/step_s']:.1f}%)" for l in labels)
            + " |")
    rest = {l: max(medians[l]["time/step_s"] - sum(medians[l][k] for k, _ in keys), 0.0) for l in labels}
    print("| rest (advantages, batching, metrics) | " + " | ".join(
        f"{1e3 * rest[l]:,.0f} ({100 * rest[l] / medians[l]['time/step_s']:.1f}%)" for l in labels) + " |")
    print("| whole step | " + " | ".join(f"{1e3 * medians[l]['time/step_s']:,.0f} (100%)" for l in labels) + " |")


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=5, help="interleaved timing passes (default 5)")
    parser.add_argument("--batch", type=int, default=16, help="rows per update step (default 16)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    parser.add_argument("--micro-rows", type=int, default=0, help="ours: rows per micro-batch (default: --batch)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help=f"comma-separated, from {', '.join(ENGINE_KEYS)} (default: {','.join(DEFAULT_ENGINES)})")
    parser.add_argument("--tunix-python", default="", help="interpreter that can import tunix (default: this one "
                        f"if it can, else {TUNIX_VENV_PYTHON})")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="PCT",
                        help="on a shared machine: start each pass only once the CPUs were PCT%% idle over 3 s "
                        "(default 0: off)")
    parser.add_argument("--max-wait", type=float, default=300.0, help="--wait-idle: seconds to wait at most per "
                        "pass (default 300), then run anyway and say so")
    parser.add_argument("--ours-tree", action="append", default=[], metavar="DIR",
                        help="also run ours from the bcr_jax package under DIR (a patched copy: before/after in one "
                        "interleaved run); repeatable")
    parser.add_argument("--parts", action="store_true", help="time our step's pieces and the GEMM floors instead")
    parser.add_argument("--repeats", type=int, default=5, help="--parts: timings per piece (default 5)")
    parser.add_argument("--xla-sweep", action="store_true", help="our step under XLA:CPU settings, one process each")
    parser.add_argument("--trainer-profile", action="store_true",
                        help="time split of real BCR training steps (python -m bcr_jax.main on configs/tiny.py)")
    parser.add_argument("--trainer-steps", type=int, default=8, help="--trainer-profile: steps (default 8)")
    parser.add_argument("--trainer-budget", type=int, default=64, help="--trainer-profile: rollout budget (default 64)")
    parser.add_argument("--trainer-problems", type=int, default=3, choices=(1, 2, 3),
                        help="--trainer-profile: problems per prompt (default 3)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    parser.add_argument("--affinity", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Before JAX's backend starts, in the parent and in every worker (which inherit it): the project's XLA:CPU
    # threading, unless XLA_FLAGS names the flags.
    threading_added = cpu_threading.configure() if cpu_threading else ()
    if args.worker:
        return worker_main(args.worker, Path(args.scratch), args.affinity, args.repeats)
    if args.passes < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--passes and --batch must be >= 1, --seq >= 2")
    if args.micro_rows and args.batch % args.micro_rows:
        parser.error("--micro-rows must divide --batch")
    unknown = [e for e in args.engines.split(",") if e.strip() and e.strip() not in ENGINE_KEYS]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINE_KEYS)}")
    WAIT_IDLE.update(threshold=args.wait_idle / 100, max_wait_s=args.max_wait)
    if args.trainer_profile:
        return run_trainer_profile(args)
    if args.parts:
        return run_parts(args)
    print(cpu_threading.describe(threading_added), flush=True)
    if args.xla_sweep:
        return run_xla_sweep(args)
    return run_table(args)


if __name__ == "__main__":
    sys.exit(main())
