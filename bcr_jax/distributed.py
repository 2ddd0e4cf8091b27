"""Multi-process JAX (several hosts, or several processes on one host): `jax.distributed.initialize` from
`config.distributed`, and the few host-side helpers that let training, sampling and evaluation run unchanged on one
process or many.

Every process runs the same program (multi-controller JAX). After `initialize`, `jax.devices()` lists the devices of
all processes, so `sharding.make_mesh` builds one global mesh; params, optimizer state, the sampler's state and the
update batches are global arrays on it, and XLA does all cross-process communication inside the jitted programs.

Who does what on the host (the design; see `bcr_jax/train.py`):

* Every process reads the problem list and advances the (seeded) group iterator identically, so all agree on the
  step's P groups without communicating. Process p then packs and tokenizes only its contiguous `block` of those
  groups; `gather_token_lists` assembles the global prompt batch in group order, exactly the single-process batch.
* Device inputs: every process holds the (small) global host batch and `put`s it with
  `jax.make_array_from_callback`, which copies to each device only the rows that device holds — each host feeds
  its own devices, with no host-to-host traffic. (The sampler's rows are laid out by the mesh, not by `block`, so a
  process's devices need not hold the rows of the groups it packed; holding the whole prompt batch, a few hundred
  KB, avoids tying the two together.)
* Device outputs the host needs (sampled tokens, log-probs) come back whole to every process (`fetch`: a
  `process_allgather`).
* The CPU-heavy host work — decoding responses, splitting answers, segment ids, grading (math-verify in worker
  processes) — runs on each process's own rows only, i.e. the rows of the groups in its `block`. A prompt's G
  samples are consecutive rows, so a GRPO group never straddles two processes. The per-row results (verdicts,
  answered flags, segment ids) are gathered as arrays (`gather_blocks`), after which every process holds identical
  global arrays and computes advantages, loss weights and mini-batch shuffles identically.
* Only process 0 writes metrics, run files, logs and console lines; orbax checkpoints are saved and restored by all
  processes together (orbax coordinates them; the checkpoint directory must be one all processes see: a `gs://`
  bucket or a shared file system).

In a single process every helper is the identity (or `jax.device_put` / `jax.device_get`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from bcr_jax.build import ConfigError

INITIALIZE_MODES = ("auto", "on", "off")
CPU_COLLECTIVES = ("gloo", "mpi")
# Environment variables that mark a multi-process launch `jax.distributed.initialize()` can configure by itself.
# Cloud TPU VMs (GKE, queued resources, multislice) and Slurm / Open MPI jobs; a plain shell has none of them.
TPU_ENV_VARS = ("TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


# ------------------------------------------------------------------------------------------------ initialize

def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment `jax.distributed.initialize()` can fill its arguments from, or None.

    A Slurm job counts only with more than one task: `srun python ...` with one task (or a login shell inside an
    allocation) is a plain single process.
    """
    environ = os.environ if environ is None else environ
    for name in TPU_ENV_VARS:
        if environ.get(name):
            return f"Cloud TPU ({name} is set)"
    if environ.get("SLURM_JOB_ID"):
        tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
        if tasks.isdigit() and int(tasks) > 1:
            return f"Slurm ({tasks} tasks)"
    if environ.get("OMPI_MCA_orte_hnp_uri"):
        return "Open MPI (OMPI_MCA_orte_hnp_uri is set)"
    return None


def initialize_arguments(dist, environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` that `config.distributed` asks for, or None for a plain
    single process. Raises `ConfigError` naming the key on an inconsistent section."""

    def fail(key, message):
        raise ConfigError(f"config.distributed.{key}: {message}")

    mode = dist.initialize
    if mode not in INITIALIZE_MODES:
        fail("initialize", f"{mode!r}; choose {', '.join(INITIALIZE_MODES)}")
    address, num_processes, process_id = dist.coordinator_address, int(dist.num_processes), int(dist.process_id)
    local_device_ids = tuple(int(i) for i in dist.local_device_ids)
    if address and not _ADDRESS.match(address):
        fail("coordinator_address", f"{address!r}; expected host:port of process 0, e.g. 10.0.0.2:8476")
    if num_processes < 0:
        fail("num_processes", f"must be >= 1 (0 = auto-detect), got {num_processes}")
    if process_id < -1:
        fail("process_id", f"must be >= 0 (-1 = auto-detect), got {process_id}")
    if num_processes and process_id >= num_processes:
        fail("process_id", f"{process_id} is not below num_processes={num_processes}")
    if dist.cpu_collectives not in CPU_COLLECTIVES:
        fail("cpu_collectives", f"{dist.cpu_collectives!r}; choose {', '.join(CPU_COLLECTIVES)}")
    if dist.initialization_timeout_s < 1:
        fail("initialization_timeout_s", f"must be >= 1, got {dist.initialization_timeout_s}")
    explicit = bool(address) or num_processes > 0 or process_id >= 0 or bool(local_device_ids)
    if mode == "off":
        if explicit:  # never ignore a setting: off with a coordinator is a contradiction, not a default
            fail("initialize", "is 'off' but coordinator_address / num_processes / process_id / local_device_ids "
                 "are set; clear them or use initialize='auto'")
        return None
    cluster = detect_cluster(environ)
    if mode == "auto" and not explicit and cluster is None:
        return None  # a plain single process
    if mode == "auto" and cluster is None:  # some arguments given, and no environment to detect the others from
        missing = [key for key, unset in (("coordinator_address", not address), ("num_processes", not num_processes),
                                          ("process_id", process_id < 0)) if unset]
        if missing:
            fail(missing[0], f"not set, and no Cloud TPU / Slurm / Open MPI environment was detected to fill it in; "
                 f"set {', '.join('config.distributed.' + m for m in missing)} (the same coordinator and "
                 f"num_processes on every process, process_id 0..num_processes-1), or initialize='on' to let "
                 f"jax.distributed detect them (e.g. on a Cloud TPU VM, from its metadata server)")
    # initialize='on': whatever is unset is left to jax.distributed.initialize() to detect (Cloud TPU VMs answer from
    # their metadata server without any environment variable); it fails, named below, where nothing can be detected.
    return dict(coordinator_address=address or None, num_processes=num_processes or None,
                process_id=process_id if process_id >= 0 else None,
                local_device_ids=list(local_device_ids) or None,
                initialization_timeout=int(dist.initialization_timeout_s))


def initialize(config) -> bool:
    """Starts the JAX distributed system as `config.distributed` says (see configs/base.py); returns whether it did.

    Must run before anything touches a JAX backend (`jax.devices()`, any computation): `main` calls it first.
    """
    dist = config.get("distributed")
    if dist is None:  # a config built without the section (e.g. from an older run's config.json)
        return False
    arguments = initialize_arguments(dist)
    if arguments is None:
        return False
    # XLA:CPU needs a cross-process collectives implementation (gloo: TCP, no extra install), chosen before the CPU
    # backend is created; TPU and GPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    try:
        jax.distributed.initialize(**arguments)
    except (RuntimeError, ValueError) as e:  # a coordinator that never answered, a port in use, nothing detected
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "before any JAX" in first_line or "only be called once" in first_line:
            raise  # a caller's mistake (JAX already started, or initialized twice), not a setting
        if arguments["coordinator_address"]:
            raise ConfigError(f"config.distributed.coordinator_address: could not join "
                              f"{arguments['coordinator_address']} as process {arguments['process_id']} of "
                              f"{arguments['num_processes']} ({first_line})") from None
        raise ConfigError(f"config.distributed.initialize: jax.distributed.initialize() could not detect the job "
                          f"({first_line}); set config.distributed.coordinator_address, num_processes and process_id"
                          ) from None
    if is_main():
        print(f"distributed: {jax.process_count()} processes, {jax.device_count()} {jax.devices()[0].platform} "
              f"devices ({jax.local_device_count()} on this process)", flush=True)
    else:  # process 0 logs for the job; the others only warn (absl's INFO lines would repeat its own)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    return True


# ------------------------------------------------------------------------------------------------ who does what

def is_main() -> bool:
    """Process 0 writes files, logs and the console; the others only compute."""
    return jax.process_index() == 0


def block(count: int, index: int | None = None, processes: int | None = None) -> slice:
    """Process `index`'s contiguous share of `count` items (sizes differ by at most one, the larger ones first), so
    the blocks of processes 0, 1, ... concatenated are the items in order. Default: this process's block."""
    processes = jax.process_count() if processes is None else processes
    index = jax.process_index() if index is None else index
    base, extra = divmod(count, processes)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


# ------------------------------------------------------------------------------------------------ host <-> device

def put(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array of `value`, a host array every process holds in full (and identically).

    Each process copies to its devices only the shards they hold: no host-to-host traffic, no check that the
    processes agree (`jax.device_put` of a host array onto other processes' devices would all-gather it to check).
    Needed because jit refuses host arrays for arguments split over other processes' devices.
    """
    value = np.asarray(value)
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(tree):
    """Host (numpy) copies of a pytree of arrays, whole on every process: arrays split over other processes' devices
    are all-gathered (every process must call this together)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def gather_blocks(local: np.ndarray, count: int, rows_per_item: int = 1) -> np.ndarray:
    """The inverse of `block`: every process passes the rows of its `block(count)` items (`rows_per_item` rows each,
    trailing dimensions equal on all processes); all get the whole `count * rows_per_item` rows, in order."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    sizes = [(block(count, i).stop - block(count, i).start) * rows_per_item for i in range(jax.process_count())]
    mine = sizes[jax.process_index()]
    if local.shape[0] != mine:
        raise ValueError(f"gather_blocks: process {jax.process_index()} holds {local.shape[0]} rows, its block {mine}")
    padded = np.zeros((max(sizes), *local.shape[1:]), local.dtype)  # process_allgather needs equal shapes
    padded[:mine] = local
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max(sizes), ...]
    return np.concatenate([stacked[i, :size] for i, size in enumerate(sizes)])


def gather_token_lists(local: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """Token-id lists of this process's `block(count)` items → all `count` lists, in order, on every process."""
    if jax.process_count() == 1:
        return [list(ids) for ids in local]
    lengths = gather_blocks(np.array([len(ids) for ids in local], np.int32), count)
    padded = np.zeros((len(local), max(int(lengths.max()), 1)), np.int32)
    for row, ids in enumerate(local):
        padded[row, :len(ids)] = ids
    gathered = gather_blocks(padded, count)
    return [gathered[i, :lengths[i]].tolist() for i in range(count)]


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of a host array over all processes (each passes its own, same shape)."""
    if jax.process_count() == 1:
        return np.asarray(values)
    return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(axis=0)


def broadcast_from_main(values: np.ndarray) -> np.ndarray:
    """Process 0's host array, on every process (each passes one of the same shape)."""
    if jax.process_count() == 1:
        return np.asarray(values)
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))


def log(message: str, *, file=None) -> None:
    """print() on process 0 only."""
    if is_main():
        print(message, file=file or sys.stdout, flush=True)
