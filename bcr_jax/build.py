"""Builds what every mode needs from a config: the mesh, the model (HF directory or random preset) and its tokenizer.

Every check that can fail on a user's input (a missing directory, an unknown preset or tokenizer kind) raises
`ConfigError` naming the config key, before anything is compiled or written; `main` prints it as one line.
"""

from __future__ import annotations

import pathlib

import jax

from bcr_jax import models, sharding, tokenizer as tokenizer_lib


class ConfigError(ValueError):
    """A user error in the config: `main` prints it as one line and exits non-zero."""


def make_mesh(config):
    try:
        return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def check_model(config) -> None:
    """Fails fast on a model section that cannot load."""
    if config.model.hf_path:
        path = pathlib.Path(config.model.hf_path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"config.model.hf_path: {path} is not an HF checkpoint directory (no config.json)")
    elif config.model.preset not in models.PRESETS:
        raise ConfigError(f"config.model.preset: unknown preset {config.model.preset!r}; "
                          f"choose from {', '.join(sorted(models.PRESETS))}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype: {config.model.dtype!r}; choose float32 or bfloat16")


def model_config(config) -> models.ModelConfig:
    """The ModelConfig the config names (no weights are read)."""
    check_model(config)
    if config.model.hf_path:
        return models.read_hf_config(pathlib.Path(config.model.hf_path).expanduser(), dtype=config.model.dtype)
    cfg = models.get_preset(config.model.preset, dtype=config.model.dtype)
    vocab_size = config.model.get("vocab_size", 0)
    return cfg.replace(vocab_size=vocab_size) if vocab_size else cfg


def load_model(config, mesh):
    """(ModelConfig, params placed on `mesh` by the partition rules): HF weights, or a seeded random preset."""
    cfg = model_config(config)
    if config.model.hf_path:
        return models.load_hf(pathlib.Path(config.model.hf_path).expanduser(), dtype=config.model.dtype, mesh=mesh)
    params = models.init_params(cfg, jax.random.key(config.model.init_seed))
    return cfg, sharding.shard_params(params, mesh)


def load_tokenizer(config):
    """The config's tokenizer: `tokenizer.kind` = "chars" (a CharTokenizer from the config), "hf" (the checkpoint's),
    or "auto" (hf with an hf_path, else None: a random preset has no tokenizer)."""
    kind = config.tokenizer.kind
    if kind == "chars":
        try:
            return tokenizer_lib.CharTokenizer(config.tokenizer.characters, tuple(config.tokenizer.words))
        except ValueError as e:
            raise ConfigError(f"config.tokenizer: {e}") from None
    if kind in ("hf", "auto"):
        if config.model.hf_path:
            return tokenizer_lib.load_tokenizer(pathlib.Path(config.model.hf_path).expanduser())
        if kind == "hf":
            raise ConfigError("config.tokenizer.kind='hf' needs config.model.hf_path")
        return None
    raise ConfigError(f"config.tokenizer.kind: {kind!r}; choose auto, hf or chars")


def check_vocab(cfg: models.ModelConfig, tokenizer) -> None:
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"config.tokenizer: {tokenizer.vocab_size} token ids do not fit the model's "
                          f"vocab_size={cfg.vocab_size}")
