"""XLA:CPU threading for this project's entry points, chosen from measurements instead of left to chance.

XLA:CPU runs an executable's ops on a thread pool as wide as the machine, in two ways: independent ops run at the
same time (its thunk executor), and an Eigen op may itself be split over the pool. `CHOSEN` keeps the first and
turns off the second (`--xla_cpu_multi_thread_eigen=false`): each Eigen op runs on one thread. It changes how a
compiled program runs, not what is compiled (the optimised HLO is the same), so memory plans (`mode=plan` compiles
on XLA:CPU) do not depend on it. `benchmarks/xla_threading.py` measured it against XLA's defaults on this
project's sampler and update step, and measured the alternatives (figures and the commands behind them:
benchmarks/RESULTS.md, "## CPU threading").

Only entry points call `configure()` (`python -m bcr_jax.main`, the benchmarks, the notebook), before JAX
initialises its backend, which is when XLA reads `XLA_FLAGS`; importing `bcr_jax` changes nothing global. A flag the
user already names in `XLA_FLAGS` is left as the user set it, so `XLA_FLAGS=--xla_cpu_multi_thread_eigen=true`
(`default_flags()`) brings XLA's default back. Nothing is set where JAX will pick an accelerator (a TPU / GPU plugin
is installed and `JAX_PLATFORMS` does not ask for the CPU): the flag only tunes the CPU backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings
from collections.abc import MutableMapping

# (flag, value) pairs set when the user has not named the flag; the measurements behind them are in the docstring.
CHOSEN: tuple[tuple[str, str], ...] = (("xla_cpu_multi_thread_eigen", "false"),)
# XLA's own values of the same flags (jaxlib 0.10), for the documentation and for benchmarks against the default.
XLA_DEFAULTS: dict[str, str] = {"xla_cpu_multi_thread_eigen": "true"}

# Python modules whose presence makes JAX choose an accelerator backend by default.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def flag_names(xla_flags: str) -> set[str]:
    """The flag names an `XLA_FLAGS` string sets: `--name=value`, `--name` and `--noname` (a bool set false).

    Tokens without the leading `--` are not flags to XLA (it ignores them), so they name nothing here either.
    """
    names = set()
    for token in xla_flags.split():
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0]
        names.add(name)
        if name.startswith("no") and "=" not in token:
            names.add(name[2:])
    return names


def chosen_flags() -> str:
    """The chosen setting as an `XLA_FLAGS` string."""
    return " ".join(f"--{name}={value}" for name, value in CHOSEN)


def default_flags() -> str:
    """XLA's own values for every flag in `CHOSEN`, as an `XLA_FLAGS` string (this opts out of `configure`)."""
    return " ".join(f"--{name}={XLA_DEFAULTS[name]}" for name, _ in CHOSEN)


def will_use_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether JAX's default backend will be the CPU, judged before it starts (from `JAX_PLATFORMS` and plugins)."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if any(importlib.util.find_spec(module) is not None for module in _ACCELERATOR_MODULES):
        return False
    return not any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def backend_initialised() -> bool:
    """Whether JAX has already created its backends (then `XLA_FLAGS` has been read and changing it does nothing)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def configure(environ: MutableMapping[str, str] = os.environ) -> tuple[str, ...]:
    """Appends to `XLA_FLAGS` each flag of `CHOSEN` that it does not name already; returns the flags it added.

    Adds nothing off the CPU backend. Call it before anything touches JAX's devices: once the backend exists, this
    warns and adds nothing rather than pretending to have changed the threading.
    """
    if not will_use_cpu(environ):
        return ()
    current = environ.get("XLA_FLAGS", "")
    named = flag_names(current)
    missing = tuple(f"--{name}={value}" for name, value in CHOSEN if name not in named)
    if not missing:
        return ()
    if backend_initialised():
        warnings.warn(f"bcr_jax.cpu_threading.configure(): JAX's backend is already initialised, so {' '.join(missing)} "
                      "cannot take effect; call it before the first JAX computation", RuntimeWarning, stacklevel=2)
        return ()
    environ["XLA_FLAGS"] = " ".join(part for part in (current.strip(), *missing) if part)
    return missing


def describe(added: tuple[str, ...], environ: MutableMapping[str, str] = os.environ) -> str:
    """One log line for what `configure` did."""
    if added:
        return (f"XLA:CPU threading: added {' '.join(added)} to XLA_FLAGS (bcr_jax.cpu_threading; "
                f"XLA_FLAGS=\"{default_flags()}\" restores XLA's defaults)")
    if not will_use_cpu(environ):
        return "XLA:CPU threading: not set (JAX will run on an accelerator)"
    return f"XLA:CPU threading: XLA_FLAGS left as it is ({environ.get('XLA_FLAGS', '') or 'unset'})"
