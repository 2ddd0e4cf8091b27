"""Entry point: `python -m bcr_jax.main --config configs/<name>.py [--config.section.field=value ...]`."""

from __future__ import annotations

import importlib
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bcr_jax import build, cpu_threading, distributed, models, sampling, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def _load_model(config, mesh):
    """(cfg, params, tokenizer or None) from an HF directory, or a random-weight preset (no tokenizer)."""
    if config.model.hf_path:
        from bcr_jax import tokenizer as tokenizer_lib

        cfg, params = models.load_hf(config.model.hf_path, dtype=config.model.dtype, mesh=mesh)
        return cfg, params, tokenizer_lib.load_tokenizer(config.model.hf_path)
    cfg = models.get_preset(config.model.preset, dtype=config.model.dtype)
    params = models.init_params(cfg, jax.random.key(config.model.init_seed))
    return cfg, sharding.shard_params(params, mesh), None


def _prompts(config) -> list[str]:
    if config.sample.prompt_file:
        path = pathlib.Path(config.sample.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"sample.prompt_file: {path} does not exist")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(config.sample.prompts)
    if not prompts:
        raise ValueError("sample.prompts / sample.prompt_file: no prompts")
    return prompts


def run_sample(config) -> sampling.SampleOutput:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, params, tokenizer = _load_model(config, mesh)
    texts = _prompts(config)
    if tokenizer is None:
        # A random-weight preset has no tokenizer: prompts become UTF-8 bytes folded into the vocabulary, and the
        # output is token ids. This exercises the engine end to end; it is not meant to read.
        prompt_ids = [[b % cfg.vocab_size for b in text.encode()] for text in texts]
        eos_ids, pad_id = (), 0
    else:
        from bcr_jax import tokenizer as tokenizer_lib

        if config.sample.chat_template:
            prompt_ids = [tokenizer_lib.build_chat_prompt(tokenizer, t, thinking=config.sample.thinking) for t in texts]
        else:
            prompt_ids = [tokenizer.encode(t) for t in texts]
        eos_ids, pad_id = tokenizer.eos_ids, tokenizer.pad_id

    start = time.perf_counter()
    out = sampling.generate(
        cfg, params, prompt_ids, max_new_tokens=config.sample.max_new_tokens,
        temperature=config.sample.temperature, top_p=config.sample.top_p, top_k=config.sample.top_k,
        eos_ids=eos_ids, pad_id=pad_id, seed=config.sample.seed, num_samples=config.sample.num_samples, mesh=mesh)
    seconds = time.perf_counter() - start
    for row, tokens in enumerate(out.tokens):
        prompt = texts[row // config.sample.num_samples]
        shown = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer else tokens
        stop = "budget" if out.truncated[row] else "eos"
        print(f"--- prompt {row // config.sample.num_samples} sample {row % config.sample.num_samples} "
              f"({out.lengths[row]} tokens, stopped by {stop}, mean logprob {np.mean(out.logprobs[row]):.3f})")
        print(f">>> {prompt}")
        print(shown)
    print(f"{int(out.lengths.sum())} tokens in {seconds:.2f}s (compile included) on {mesh.devices.size} "
          f"{jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}")
    return out


def _lazy(module: str, function: str):
    """A mode that imports its module on first use: modes load only what they need (the data stack and matplotlib
    for eval, the toy world for toy; plan may ask XLA:CPU for more devices, which only works before JAX starts)."""

    def run(config):
        return getattr(importlib.import_module(module), function)(config)

    run.__name__ = f"run_{function}"
    return run


MODES = {
    "toy": _lazy("bcr_jax.toy.pipeline", "run_toy"),
    "sample": run_sample,
    "sft": _lazy("bcr_jax.sft", "run_sft"),
    "train": _lazy("bcr_jax.train", "run_train"),
    "export": _lazy("bcr_jax.train", "run_export"),
    "eval": _lazy("bcr_jax.evaluate", "main_eval"),
    "solve": _lazy("bcr_jax.evaluate", "main_solve"),
    "plan": _lazy("bcr_jax.plan", "run_plan"),
}


def main(argv):
    del argv
    try:
        config = _CONFIG.value
        config is None or config.mode  # the loaded config is a proxy that fails on first use
    except OSError:  # ml_collections could not load the --config file
        print(f"error: --config: cannot load {flags.FLAGS['config'].config_filename!r} (no such file, or it failed "
              "to import)", file=sys.stderr)
        sys.exit(2)
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/base.py")
    if config.mode not in MODES:
        print(f"error: config.mode: {config.mode!r}; choose from {', '.join(sorted(MODES))}", file=sys.stderr)
        sys.exit(2)
    try:
        # Before any mode touches a JAX backend: with several processes, jax.devices() must list all of theirs.
        distributed.initialize(config)
        logging.info(cpu_threading.describe(_THREADING_ADDED))
        logging.info("config:\n%s", config)
        MODES[config.mode](config)
    except build.ConfigError as e:  # a user error: one line naming the key or path, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv):
    """absl flag parsing, with a user's mistake (an unknown config key, a bad value) reported as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
        missing = str(e).strip("\"'")
        overrides = [arg.split("=")[0].removeprefix("--config.") for arg in argv[1:] if arg.startswith("--config.")]
        named = [o for o in overrides if missing in o.split(".")]
        print(f"error: unknown config key {named[0] if named else missing!r} (not defined in the config file)",
              file=sys.stderr)
    sys.exit(2)


_THREADING_ADDED: tuple[str, ...] = ()  # what cpu_threading.configure() added to XLA_FLAGS for this run

if __name__ == "__main__":
    # First of all, so that no config file or mode can start JAX's backend before XLA_FLAGS is final.
    _THREADING_ADDED = cpu_threading.configure()
    app.run(main, flags_parser=parse_flags)
