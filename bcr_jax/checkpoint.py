"""Checkpoints of training runs (orbax `CheckpointManager`) and loading a run's model back.

Layout of a workdir:

    config.json            the run's config (ml_collections JSON), written once at the start
    model_config.json      the decoder's HF config.json dict (what `models.config_from_hf` reads)
    checkpoints/<step>/    orbax: `state` (TrainState: params, optimizer state, step, RNG, skipped-update count)
                           and `meta` (JSON: data-iterator position, training step)

Orbax writes a step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest one, never half a checkpoint.

Paths go through `bcr_jax.paths` (etils.epath), so a workdir may be a local directory or a `gs://` bucket; orbax
writes either (on GCS it marks a finished step with a commit file instead of a rename). With several processes every process calls
`save` / `restore` (orbax shards the arrays between them and lets process 0 finalize the step), so the directory must
be one they all see: a bucket or a shared file system.
"""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp
from ml_collections import config_dict

from bcr_jax import models, paths


class Checkpointer:
    """Saves every `every` steps (and when forced), keeps the last `keep`."""

    def __init__(self, workdir: paths.PathLike, *, every: int, keep: int):
        self.directory = paths.resolve(workdir) / "checkpoints"
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at `step`, placed as `abstract_state` (ShapeDtypeStructs with shardings) says, and its meta."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                      meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def write_run_files(workdir: paths.PathLike, config, cfg: models.ModelConfig) -> None:
    """config.json and model_config.json, written atomically (process 0 only, with several processes)."""
    workdir = paths.resolve(workdir)
    for name, text in (("config.json", config.to_json(indent=2)),
                       ("model_config.json", json.dumps(models.config_to_hf(cfg), indent=2))):
        paths.write_atomic(workdir / name, text)


def read_run_config(workdir: paths.PathLike) -> config_dict.ConfigDict:
    path = paths.resolve(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not the workdir of a training run (no config.json)")
    return config_dict.ConfigDict(json.loads(path.read_text()))


def is_run_dir(path: paths.PathLike) -> bool:
    path = paths.resolve(path)
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir() and (path / "model_config.json").is_file()


def load_run(workdir: paths.PathLike, step: int | None = None, mesh=None):
    """(ModelConfig, params, tokenizer, step) of a training run's checkpoint (default: the latest).

    The model config is the run's, with params in its master dtype; the tokenizer is rebuilt from the run's config.
    """
    from bcr_jax import build, sharding, train

    workdir = paths.resolve(workdir)
    run_config = read_run_config(workdir)
    cfg = models.config_from_hf(json.loads((workdir / "model_config.json").read_text()),
                                dtype=run_config.model.dtype, source=str(workdir / "model_config.json"))
    mesh = mesh or sharding.make_mesh()
    checkpointer = Checkpointer(workdir, every=1, keep=run_config.keep_checkpoints)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"{checkpointer.directory}: no checkpoints")
        step = max(steps) if step is None or step < 0 else step
        if step not in steps:
            raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint for step {step} (have {sorted(steps)})")
        abstract = train.abstract_state(run_config, cfg, mesh)
        state, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return cfg, state.params, build.load_tokenizer(run_config), step
