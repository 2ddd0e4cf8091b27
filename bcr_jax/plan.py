"""Memory plan (`--config.mode=plan`): bytes per device of a training run, and whether it fits an accelerator.

For the configured model, mesh, batch and budget, per device:

  params_bytes          the master weights (model.dtype), sharded by the partition rules
  optimizer_bytes       the optimizer state (AdamW moments, sharded like the params)
  gradient_bytes        the accumulated gradient plus one micro-batch's (master dtype, sharded like the params)
  activation_bytes      everything else the update step needs at its peak: layer inputs kept for the backward pass,
                        one layer's recomputation, attention blocks, the log-prob chunk, the compute-dtype param copy
  kv_cache_bytes        the sampler's KV cache for the whole rollout (P x G rows, prompt bucket + budget slots)
  rollout_params_bytes  the rollout copy of the weights (when rollout.dtype differs from model.dtype)

Two phases alternate, so the peak is the larger of them: update = params + optimizer + gradients + activations +
batch; rollout = params + optimizer + rollout params + KV cache + sampler buffers.

Sources. Params, optimizer state, gradients and the KV cache are shapes: their bytes are exact for any mesh, taken
from the shardings on an `AbstractMesh` of the target's device count (no devices or weights needed). The update
step's peak comes from XLA itself where possible: the trainer's own jitted update step is lowered with
`jax.ShapeDtypeStruct` inputs carrying their shardings and compiled, and `compiled.memory_analysis()` gives its
argument, output and temporary bytes per device. That needs as many local devices as the target has; on a CPU host
the plan asks XLA:CPU for them (`jax_num_cpu_devices`, before the backend starts), so the figures are XLA:CPU's
buffer assignment of the same program (TPU/GPU fuse differently, and XLA:CPU picks the blocked attention where a
TPU would run splash). XLA:CPU keeps bf16 intermediates in float32 buffers, so for a bf16 step its figures are kept
as a cross-check and the plan uses the analytic ones. Otherwise (`plan.compile=False`, too few devices, or bf16 on
CPU) the activations come from `analytic_activation_bytes`, a per-token model of the decoder's buffers whose
coefficients were fit to XLA:CPU with remat="full" and scanned layers: within -7%..+13% of the compiled update step
on small models (tests/test_long_sequences.py checks one), and 12-15% above it (conservative) for the 1.5B and 4B
presets at their budgets in float32.

The last printed line is one JSON object (the selected accelerator's plan).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from bcr_jax import models, rl, sampling, sharding
from bcr_jax.build import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    devices: int  # devices JAX sees (TPU chips; GPUs of one node)
    hbm_bytes: int  # per device
    platform: str
    note: str


# Per-device memory as the runtime reports it. A v4 / v5p chip is one JAX device (megacore); GPU entries are one
# 8-GPU node (plan.devices=1 for a single GPU).
ACCELERATORS: dict[str, Accelerator] = {
    "v4-8": Accelerator(4, 32 * GiB, "tpu", "4 chips x 32 GiB"),
    "v5e-8": Accelerator(8, 16 * GiB, "tpu", "8 chips x 16 GiB"),
    "v5p-8": Accelerator(4, 95 * GiB, "tpu", "4 chips x 95 GiB"),
    "h100-80gb": Accelerator(8, 81559 * 2**20, "gpu", "8 x H100 80 GB (79.6 GiB)"),
    "h200": Accelerator(8, 143771 * 2**20, "gpu", "8 x H200 141 GB (140.4 GiB)"),
}

# XLA:CPU's compile-time options for a program that is never run: the buffer assignment (and so the memory analysis)
# is the same, LLVM's code generation much faster.
_ANALYSIS_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# analytic_activation_bytes: float32 values per token per device, least-squares fits to XLA:CPU's compiled
# temporaries (remat="full", scanned layers; 2-layer models from d=128 to d=2560, within 10% of each fit point).
# One layer's recomputation + backward: its projections and MLP (the peak while the MLP is differentiated) ...
_LAYER_PER_TOKEN = {"d": 12.15, "f": 7.84, "nh": 7.72, "kh": 9.9}
# ... or, when larger, while the attention is: the blocked path's scores of one query block (x n x block) ...
_BLOCK_SCORES_PER_TOKEN = 2.13
# ... and the plain path's [b, n, t, s] scores, probabilities and their cotangents (x n x t), alive throughout.
_PLAIN_SCORES_PER_TOKEN = 2.98
_HEAD_PER_TOKEN = 6.4  # x d: hidden states around the log-prob head
_LOGITS_COPIES = 2  # float32 [rows, chunk, v] buffers alive at once in a chunk's backward pass


def _tree_shard_bytes(shapes, shardings) -> int:
    leaves, shards = jax.tree.leaves(shapes), jax.tree.leaves(shardings)
    return sum(math.prod(sh.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x, sh in zip(leaves, shards))


def resolve_mesh_shape(config, devices: int) -> tuple[dict[str, int], str]:
    """The config's (data, fsdp, tensor) sizes for `devices` devices (-1 filled in), or pure FSDP when they do not
    fit that count; returns the sizes and a note saying which."""
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    unknown = [a for a, s in sizes.items() if s == -1]
    known = math.prod(s for s in sizes.values() if s != -1)
    if len(unknown) <= 1 and known > 0 and devices % known == 0:
        if unknown:
            sizes[unknown[0]] = devices // known
        if math.prod(sizes.values()) == devices:
            return sizes, "config.mesh"
    return {"data": 1, "fsdp": devices, "tensor": 1}, f"config.mesh does not fit {devices} devices: fsdp={devices}"


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)


def compute_model_config(config, cfg: models.ModelConfig) -> models.ModelConfig:
    """The update step's ModelConfig, as train.Trainer builds it (compute dtype, remat, scanned layers, attention,
    log-prob chunk)."""
    return cfg.replace(dtype=config.train.compute_dtype, remat=config.train.remat, scan_layers=config.train.scan_layers,
                       attention=config.train.attention, attention_block=config.train.attention_block,
                       logprob_chunk=config.train.logprob_chunk)


def loss_config(config) -> rl.LossConfig:
    return rl.LossConfig(policy_loss=config.loss.policy_loss, clip_low=config.loss.clip_low,
                         clip_high=config.loss.clip_high, clip_ratio_c=config.loss.clip_ratio_c,
                         aggregation=config.loss.aggregation,
                         budget=config.rollout.budget, kl_weight=config.loss.kl_weight,
                         entropy_weight=config.loss.entropy_weight)


def sequence_length(config) -> int:
    """Training row width: the sampler's prompt bucket + the budget (as train.rollout lays rows out)."""
    return sampling.bucket(config.plan.prompt_tokens, minimum=16) + config.rollout.budget


def _rows_per_device(rows: int, mesh) -> int:
    return NamedSharding(mesh, sharding.batch_spec(1, rows, mesh)).shard_shape((rows,))[0]


def analytic_activation_bytes(cfg: models.ModelConfig, rows: int, seq_len: int, tensor: int = 1,
                              attention: str | None = None) -> int:
    """Peak bytes of one micro-batch's forward + backward beyond params, gradients and optimizer state, per device
    holding `rows` rows of `seq_len` tokens (`cfg` is the compute config; heads, MLP width and vocabulary split
    `tensor` ways where they divide; `attention`: the implementation "auto" resolves to on the target, default
    this backend's).

    The layer inputs kept for the backward pass (L x tokens x d with remat, every layer's intermediates without),
    plus the larger of two phases: one layer recomputed and differentiated (its projections, MLP, and attention
    scores: a block per query block for the blocked path, t per query for the plain path, none for the fused
    kernels), or the log-prob head (a chunk's float32 logits and their cotangent, or all positions' when unchunked).
    """
    split = lambda x: x // tensor if x % tensor == 0 else x
    d, f, v, h = cfg.hidden_size, split(cfg.intermediate_size), split(cfg.vocab_size), cfg.head_dim
    n, k = split(cfg.num_heads), split(cfg.num_kv_heads)
    a = jnp.dtype(cfg.jnp_dtype).itemsize
    tokens = rows * seq_len
    attention = attention or models.layers.resolve_attention(cfg.attention, seq_len, cfg.attention_block, cfg.jnp_dtype)
    c = _LAYER_PER_TOKEN
    projections = c["d"] * d + c["nh"] * n * h + c["kh"] * k * h  # in the compute dtype
    layer = tokens * a * (projections + c["f"] * f)
    if attention == "blocked":
        block = min(cfg.attention_block, seq_len)
        layer = max(layer, tokens * (a * projections + 4 * _BLOCK_SCORES_PER_TOKEN * n * block))
    elif attention == "plain":
        layer += tokens * 4 * _PLAIN_SCORES_PER_TOKEN * n * seq_len
    saved_per_layer = {"full": d, "none": 2 * d + 3 * f + 2 * (n + 2 * k) * h}.get(
        cfg.remat, d + f + (n + 2 * k) * h)  # dots policies keep the matmul outputs
    saved = tokens * a * cfg.num_layers * saved_per_layer
    chunk = cfg.logprob_chunk if 0 < cfg.logprob_chunk < seq_len else seq_len
    head = _LOGITS_COPIES * 4 * rows * chunk * v + a * v * d + 4 * _HEAD_PER_TOKEN * tokens * d
    return int(saved + max(layer, head))


@dataclasses.dataclass
class MemoryPlan:
    accelerator: str
    devices: int
    mesh: dict[str, int]
    mesh_note: str
    seq_len: int
    micro_rows: int
    micro_rows_per_device: int
    micro_batches: int
    rollout_rows: int
    rollout_rows_per_device: int
    kv_slots: int
    attention: str
    logprob_chunk: int
    remat: str
    compute_dtype: str
    params_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    activation_bytes: int
    analytic_activation_bytes: int
    batch_bytes: int
    kv_cache_bytes: int
    rollout_params_bytes: int
    sampler_bytes: int
    update_bytes: int
    rollout_bytes: int
    total_bytes_per_device: int
    hbm_bytes_per_device: int
    usable_bytes_per_device: int
    fits: bool
    source: str
    compiled: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan(config, accelerator: str, *, devices: int = 0, compile: bool | None = None) -> MemoryPlan:
    """The memory plan of `config` on `accelerator` (a key of ACCELERATORS) with `devices` devices (0: its own)."""
    from bcr_jax import build, train

    if accelerator not in ACCELERATORS:
        raise ConfigError(f"config.plan.accelerator: {accelerator!r}; choose from {', '.join(ACCELERATORS)}")
    target = ACCELERATORS[accelerator]
    devices = devices or target.devices
    compile = config.plan.compile if compile is None else compile
    cfg = build.model_config(config)
    try:
        compute_cfg = compute_model_config(config, cfg)
    except ValueError as e:
        raise ConfigError(f"config.train: {e}") from None
    rollout_cfg = cfg.replace(dtype=config.rollout.dtype or config.train.compute_dtype)
    sizes, mesh_note = resolve_mesh_shape(config, devices)
    mesh = abstract_mesh(sizes)

    rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    mini = config.train.mini_batch_size or rows
    micro = config.train.micro_batch_size or mini
    if rows % mini or mini % micro:
        raise ConfigError(f"config.train: mini_batch_size={mini} / micro_batch_size={micro} must divide the "
                          f"{rows} rollout rows")
    seq_len = sequence_length(config)
    micro_per_device = _rows_per_device(micro, mesh)

    # The state: exact shard bytes on the target mesh.
    optimizer = train.make_optimizer(config, max(1, config.total_steps * train.updates_per_step(config)))
    param_shapes = models.param_shapes(cfg)
    state_sh = train.state_shardings(optimizer, param_shapes, mesh)
    params_bytes = _tree_shard_bytes(param_shapes, state_sh.params)
    optimizer_bytes = _tree_shard_bytes(jax.eval_shape(optimizer.init, param_shapes), state_sh.opt_state)
    gradient_bytes = 2 * params_bytes  # the accumulator and the micro-batch's gradient before it is added
    master, compute = jnp.dtype(cfg.jnp_dtype), jnp.dtype(compute_cfg.jnp_dtype)
    cast_bytes = 0 if compute == master else params_bytes * compute.itemsize // master.itemsize
    batch_bytes = (mini // micro) * micro_per_device * seq_len * (5 * 4 + 1)  # UpdateBatch: 5 x 4-byte + 1 bool
    attention = resolve_attention_for(target.platform, compute_cfg, seq_len)
    # FSDP: the vocabulary matrices (embedding, lm_head) are gathered whole for the lookup and the log-prob chunks,
    # and their gradient is reduced whole after the chunk loop: about 1.5 unsharded copies each per device (fit to
    # XLA:CPU; the decoder layers' weights are gathered one layer at a time, a small share).
    vocab_matrices = 1 if cfg.tie_embeddings else 2
    gathered = int(1.5 * vocab_matrices * cfg.vocab_size * cfg.hidden_size * compute.itemsize) // sizes["tensor"] \
        if sizes["fsdp"] > 1 else 0
    analytic_act = cast_bytes + gathered + analytic_activation_bytes(
        compute_cfg, micro_per_device, seq_len, sizes["tensor"], attention)

    # The rollout: the sampler's cache for every row at once (prompt bucket + the blocks decoding appends).
    prompts = sampling.bucket(config.rollout.prompts_per_step,
                              multiple=sizes["data"] * sizes["fsdp"])
    rollout_rows = prompts * config.rollout.samples_per_prompt
    slots = sampling.bucket(config.plan.prompt_tokens, minimum=16) + sum(
        sampling.decode_blocks_for(config.rollout.budget, config.rollout.decode_blocks))
    rollout_dtype = rollout_cfg.jnp_dtype
    k_shape = (rollout_rows, cfg.num_kv_heads, cfg.head_dim, slots)
    kv_shard = NamedSharding(mesh, sharding.kv_cache_spec(k_shape, mesh)).shard_shape(k_shape)
    kv_cache_bytes = 2 * cfg.num_layers * math.prod(kv_shard) * jnp.dtype(rollout_dtype).itemsize
    rollout_rows_per_device = kv_shard[0]
    rollout_params_bytes = 0 if rollout_cfg.dtype == cfg.dtype else (
        params_bytes * jnp.dtype(rollout_dtype).itemsize // master.itemsize)
    # Per row: the decode step's float32 logits (and their top-p sort / softmax), tokens and log-probs.
    sampler_bytes = rollout_rows_per_device * (3 * 4 * cfg.vocab_size + 8 * config.rollout.budget)

    compiled = None
    source = "analytic"
    activation_bytes = analytic_act
    if compile:
        compiled = compiled_update_memory(config, cfg, compute_cfg, optimizer, sizes, micro, seq_len)
        if compiled is not None:
            platform = compiled.pop("platform")
            # XLA:CPU computes bf16 matmuls and elementwise ops in float32 buffers, so its temporaries for a bf16
            # step overstate a TPU's or GPU's: there the compiled figures are a cross-check, not the plan.
            if platform == target.platform or compute == jnp.float32:
                source = f"compiled:{platform}"
                # Temporaries beyond the gradients (which the split counts separately).
                activation_bytes = max(0, compiled["temp_size_in_bytes"] - gradient_bytes)
            else:
                source = f"analytic (compiled:{platform} in compiled)"
    update_bytes = params_bytes + optimizer_bytes + gradient_bytes + activation_bytes + batch_bytes
    rollout_bytes = params_bytes + optimizer_bytes + rollout_params_bytes + kv_cache_bytes + sampler_bytes
    total = max(update_bytes, rollout_bytes)
    usable = int(target.hbm_bytes * config.plan.usable_fraction)
    return MemoryPlan(
        accelerator=accelerator, devices=devices, mesh=sizes, mesh_note=mesh_note, seq_len=seq_len,
        micro_rows=micro, micro_rows_per_device=micro_per_device, micro_batches=mini // micro,
        rollout_rows=rollout_rows, rollout_rows_per_device=rollout_rows_per_device, kv_slots=slots,
        attention=attention,
        logprob_chunk=compute_cfg.logprob_chunk, remat=compute_cfg.remat, compute_dtype=compute_cfg.dtype,
        params_bytes=params_bytes, optimizer_bytes=optimizer_bytes, gradient_bytes=gradient_bytes,
        activation_bytes=activation_bytes, analytic_activation_bytes=analytic_act, batch_bytes=batch_bytes,
        kv_cache_bytes=kv_cache_bytes, rollout_params_bytes=rollout_params_bytes, sampler_bytes=sampler_bytes,
        update_bytes=update_bytes, rollout_bytes=rollout_bytes, total_bytes_per_device=total,
        hbm_bytes_per_device=target.hbm_bytes, usable_bytes_per_device=usable, fits=total <= usable, source=source,
        compiled=compiled)


def resolve_attention_for(platform: str, cfg: models.ModelConfig, seq_len: int) -> str:
    """What attention='auto' becomes on the target platform (the rule of layers.resolve_attention)."""
    if cfg.attention != "auto":
        return cfg.attention
    if seq_len <= cfg.attention_block:
        return "plain"
    if platform == "gpu":
        return "cudnn" if cfg.dtype in ("bfloat16", "float16") else "blocked"
    return "splash" if platform == "tpu" else "blocked"


def _compile_devices(count: int):
    """`count` local devices to compile on: the default backend's, else XLA:CPU's (None if neither has enough)."""
    if len(jax.devices()) >= count:
        return jax.devices()[:count]
    try:
        cpus = jax.devices("cpu")
    except RuntimeError:
        return None
    return cpus[:count] if len(cpus) >= count else None


def compiled_update_memory(config, cfg, compute_cfg, optimizer, sizes: dict[str, int], micro: int,
                           seq_len: int) -> dict[str, int] | None:
    """`memory_analysis()` of the trainer's update step compiled for this mesh from abstract inputs (no weights),
    or None when there are not enough local devices for the mesh."""
    from bcr_jax import train

    devices = _compile_devices(math.prod(sizes.values()))
    if devices is None:
        return None
    mesh = Mesh(np.asarray(devices).reshape(tuple(sizes[a] for a in sharding.AXES)), sharding.AXES)
    state_sh = train.state_shardings(optimizer, models.param_shapes(cfg), mesh)
    shapes = train.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=models.param_shapes(cfg),
        opt_state=jax.eval_shape(optimizer.init, models.param_shapes(cfg)),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32), skipped_updates=jax.ShapeDtypeStruct((), jnp.int32))
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    mini = config.train.mini_batch_size or config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    batch_sh = train.batch_sharding(mesh, micro)
    shape = (mini // micro, micro, seq_len)
    batch = train.UpdateBatch(*(jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for dtype in (
        jnp.int32, jnp.bool_, jnp.float32, jnp.float32, jnp.float32, jnp.float32)))
    temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
    step = train.make_update_step(compute_cfg.replace(mesh=mesh), optimizer, loss_config(config),
                                  temperature=temperature)
    jitted = train.jit_update_step(step, state_sh, mesh, micro)
    options = _ANALYSIS_ONLY if devices[0].platform == "cpu" else None
    stats = jitted.lower(state, batch).compile(options).memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    result = {name: int(getattr(stats, name)) for name in fields}
    result["peak_bytes"] = (result["argument_size_in_bytes"] + result["output_size_in_bytes"]
                            - result["alias_size_in_bytes"] + result["temp_size_in_bytes"])
    result["platform"] = devices[0].platform
    return result


def _ensure_cpu_devices(count: int) -> None:
    """Asks XLA:CPU for `count` devices to compile multi-device programs on; a no-op once JAX has started (the
    plan then compiles only meshes that fit the devices there are)."""
    try:
        if jax.config.jax_num_cpu_devices < count:
            jax.config.update("jax_num_cpu_devices", count)
    except (RuntimeError, AttributeError):
        pass


def _gib(x: int) -> str:
    return f"{x / GiB:6.2f}"


def format_table(plans: list[MemoryPlan]) -> str:
    head = (f"{'accelerator':<11} {'dev':>3} {'mesh d/f/t':>10} {'m/dev':>5} {'params':>6} {'optim':>6} {'grads':>6} "
            f"{'activ':>6} {'update':>6} {'kv':>6} {'rollout':>7} {'total':>6} {'usable':>6}  fits  source")
    lines = [head + "   (GiB per device)"]
    for p in plans:
        mesh = "/".join(str(p.mesh[a]) for a in sharding.AXES)
        lines.append(
            f"{p.accelerator:<11} {p.devices:>3} {mesh:>10} {p.micro_rows_per_device:>5} {_gib(p.params_bytes)} "
            f"{_gib(p.optimizer_bytes)} {_gib(p.gradient_bytes)} {_gib(p.activation_bytes)} {_gib(p.update_bytes)} "
            f"{_gib(p.kv_cache_bytes)} {_gib(p.rollout_bytes):>7} {_gib(p.total_bytes_per_device)} "
            f"{_gib(p.usable_bytes_per_device)}  {'yes ' if p.fits else 'NO  '}  {p.source}")
    return "\n".join(lines)


def _candidate_meshes(devices: int) -> list[dict[str, int]]:
    """FSDP over every device, FSDP x tensor=2, data=2 x FSDP: the layouts worth trying for a dense decoder."""
    meshes = [{"data": 1, "fsdp": devices, "tensor": 1}]
    if devices % 2 == 0 and devices > 2:
        meshes += [{"data": 1, "fsdp": devices // 2, "tensor": 2}, {"data": 2, "fsdp": devices // 2, "tensor": 1}]
    return meshes


# A recommendation keeps the update step within this share of the usable memory, leaving room for the analytic
# activation model's error (within 10-15% of XLA's figures in our checks) and for what it does not count
# (collectives' buffers, fragmentation). The rollout phase is exact shapes and only has to fit.
_RECOMMEND_MARGIN = 0.85


def recommend(config, accelerator: str, devices: int = 0) -> MemoryPlan | None:
    """The analytic plan for `accelerator` with the largest micro-batch (fewest accumulation steps) whose update step
    stays within _RECOMMEND_MARGIN of the usable memory (and whose rollout fits), over `_candidate_meshes` and the
    micro-batch sizes that divide the mini-batch; ties go to no tensor parallelism, then the smaller peak. None when
    nothing fits (the rollout's KV cache alone may not)."""
    devices = devices or ACCELERATORS[accelerator].devices
    rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    mini = config.train.mini_batch_size or rows
    best = None
    for sizes in _candidate_meshes(devices):
        shards = sizes["data"] * sizes["fsdp"]
        for micro in (m for m in range(shards, mini + 1, shards) if mini % m == 0):
            trial = config.copy_and_resolve_references()
            trial.mesh.data, trial.mesh.fsdp, trial.mesh.tensor = sizes["data"], sizes["fsdp"], sizes["tensor"]
            trial.train.micro_batch_size = micro
            candidate = plan(trial, accelerator, devices=devices, compile=False)
            if candidate.rollout_bytes > candidate.usable_bytes_per_device:
                break  # the rollout (exact shapes) does not fit this mesh whatever the micro-batch
            if candidate.update_bytes > _RECOMMEND_MARGIN * candidate.usable_bytes_per_device:
                break  # larger micro-batches only need more
            rank = lambda p: (p.micro_rows, -p.mesh["tensor"], -p.total_bytes_per_device)
            if best is None or rank(candidate) > rank(best):
                best = candidate
    return best


def run_plan(config) -> dict[str, Any]:
    """mode=plan: a table over ACCELERATORS (analytic, fast), then the selected accelerator's plan (compiled where
    the devices allow), its last line one JSON object."""
    accelerator = config.plan.accelerator
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"config.plan.accelerator: {accelerator!r}; choose from {', '.join(ACCELERATORS)}")
    if config.plan.devices < 0:
        raise ConfigError(f"config.plan.devices: {config.plan.devices}; must be >= 0 (0 = the accelerator's count)")
    if not 0 < config.plan.usable_fraction <= 1:
        raise ConfigError(f"config.plan.usable_fraction: {config.plan.usable_fraction}; must be in (0, 1]")
    devices = config.plan.devices or ACCELERATORS[accelerator].devices
    if config.plan.compile:
        _ensure_cpu_devices(devices)
    cfg = _model_name(config)
    table = [plan(config, name, compile=False) for name in ACCELERATORS]
    print(f"memory plan: {cfg}, {config.rollout.prompts_per_step} x {config.rollout.samples_per_prompt} rollout rows, "
          f"budget {config.rollout.budget}, row width {table[0].seq_len}, micro-batch {table[0].micro_rows} rows "
          f"x {table[0].micro_batches}; analytic activations, config.mesh on each accelerator's device count")
    print(format_table(table))
    if config.plan.search:
        print(f"\nrecommended (analytic): the largest micro-batch whose update step is within "
              f"{_RECOMMEND_MARGIN:.0%} of the usable memory")
        found = {name: recommend(config, name) for name in ACCELERATORS}
        print(format_table([p for p in found.values() if p is not None]))
        for name, p in found.items():
            print(f"  {name}: " + ("nothing fits (see kv / rollout)" if p is None else
                                   f"--config.mesh.data={p.mesh['data']} --config.mesh.fsdp={p.mesh['fsdp']} "
                                   f"--config.mesh.tensor={p.mesh['tensor']} --config.train.micro_batch_size="
                                   f"{p.micro_rows}"))
    selected = plan(config, accelerator, devices=devices)
    print(f"\n{accelerator} ({ACCELERATORS[accelerator].note}, {devices} devices, mesh {selected.mesh}: "
          f"{selected.mesh_note}):")
    print(format_table([selected]))
    result = selected.to_dict()
    print(json.dumps(result, sort_keys=True))
    return result


def _model_name(config) -> str:
    return config.model.hf_path or f"preset {config.model.preset}"
