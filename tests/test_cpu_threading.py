"""bcr_jax.cpu_threading: what the entry points add to XLA_FLAGS, what they leave alone, and that XLA takes it."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
from config_files import ROOT

from bcr_jax import cpu_threading

CHOSEN = dict(cpu_threading.CHOSEN)


@pytest.fixture
def no_accelerator(monkeypatch):
    """Pretend no TPU/GPU plugin is installed, so `will_use_cpu` depends on JAX_PLATFORMS alone."""
    monkeypatch.setattr(cpu_threading, "_ACCELERATOR_MODULES", ())
    monkeypatch.setattr(cpu_threading.importlib.metadata, "entry_points", lambda group: [])


@pytest.fixture
def before_backend(monkeypatch):
    """Act as if JAX's backend had not started yet (in this test process it has)."""
    monkeypatch.setattr(cpu_threading, "backend_initialised", lambda: False)


def test_flag_names_reads_what_xla_reads():
    names = cpu_threading.flag_names("--a=1 --b --noc d=2 -e=3  --f=x=y")
    assert names == {"a", "b", "noc", "c", "f"}  # no "--": XLA ignores the token, so it names nothing
    assert cpu_threading.flag_names("") == set()


def test_chosen_and_default_strings_cover_the_same_flags():
    assert cpu_threading.flag_names(cpu_threading.chosen_flags()) == set(CHOSEN)
    assert cpu_threading.flag_names(cpu_threading.default_flags()) == set(CHOSEN)
    assert all(CHOSEN[name] != cpu_threading.XLA_DEFAULTS[name] for name in CHOSEN)  # else nothing is chosen


def test_configure_adds_the_chosen_flags_when_unset(no_accelerator, before_backend):
    environ = {"JAX_PLATFORMS": "cpu"}
    added = cpu_threading.configure(environ)
    assert added == tuple(f"--{k}={v}" for k, v in cpu_threading.CHOSEN)
    assert environ["XLA_FLAGS"] == cpu_threading.chosen_flags()
    assert cpu_threading.configure(environ) == () and environ["XLA_FLAGS"] == cpu_threading.chosen_flags()


def test_configure_keeps_the_users_other_flags_and_appends(no_accelerator, before_backend):
    environ = {"XLA_FLAGS": " --xla_force_host_platform_device_count=4 "}
    cpu_threading.configure(environ)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {cpu_threading.chosen_flags()}"


@pytest.mark.parametrize("users", [cpu_threading.default_flags(), "--xla_dump_to=/tmp/x " + " ".join(
    f"--{name}={value}" for name, value in cpu_threading.CHOSEN)])
def test_the_users_own_flag_wins(no_accelerator, before_backend, users):
    environ = {"XLA_FLAGS": users}
    assert cpu_threading.configure(environ) == ()
    assert environ["XLA_FLAGS"] == users


@pytest.mark.parametrize("platforms, applies", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu", False),
                                                 ("", True)])
def test_only_the_cpu_backend_is_tuned(no_accelerator, before_backend, platforms, applies):
    environ = {"JAX_PLATFORMS": platforms}
    assert bool(cpu_threading.configure(environ)) is applies
    assert ("XLA_FLAGS" in environ) is applies


def test_an_installed_accelerator_plugin_means_no_cpu_tuning_unless_asked(monkeypatch, before_backend):
    monkeypatch.setattr(cpu_threading, "_ACCELERATOR_MODULES", ("json",))  # any importable module stands in
    assert cpu_threading.configure({}) == ()
    environ = {"JAX_PLATFORMS": "cpu"}
    assert cpu_threading.configure(environ) and environ["XLA_FLAGS"] == cpu_threading.chosen_flags()


def test_after_the_backend_started_it_warns_and_changes_nothing(no_accelerator):
    jnp.zeros(1).block_until_ready()  # this process's backend exists now
    assert cpu_threading.backend_initialised()
    environ = {"JAX_PLATFORMS": "cpu"}
    with pytest.warns(RuntimeWarning, match="already initialised"):
        assert cpu_threading.configure(environ) == ()
    assert "XLA_FLAGS" not in environ


def _python(code: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def test_importing_the_library_changes_nothing_global():
    code = ("import os; import bcr_jax, bcr_jax.main, bcr_jax.train, bcr_jax.sampling, bcr_jax.evaluate, "
            "bcr_jax.toy.pipeline; import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready(); "
            "print(repr(os.environ.get('XLA_FLAGS')))")
    assert _python(code, _clean_env()).strip() == "None"


_FORWARD = """
import json, jax, jax.numpy as jnp, numpy as np
x = np.random.default_rng(0).standard_normal((64, 256), np.float32)
w = np.random.default_rng(1).standard_normal((256, 512), np.float32) / 16
y = jax.jit(lambda x, w: jax.nn.log_softmax(jnp.tanh(x @ w) @ w.T, -1))(x, w)
print(json.dumps(np.asarray(y).tolist()))
"""


@pytest.mark.parametrize("flags", ["chosen", "default"])
def test_xla_accepts_the_flags_and_computes_the_same(flags):
    """XLA aborts on a flag it does not know; and a threading choice must not change results."""
    import json

    import numpy as np

    xla_flags = cpu_threading.chosen_flags() if flags == "chosen" else cpu_threading.default_flags()
    got = np.asarray(json.loads(_python(_FORWARD, _clean_env(XLA_FLAGS=xla_flags))))
    x = np.random.default_rng(0).standard_normal((64, 256), np.float32).astype(np.float64)
    w = np.random.default_rng(1).standard_normal((256, 512), np.float32).astype(np.float64) / 16
    logits = np.tanh(x @ w) @ w.T
    shifted = logits - logits.max(-1, keepdims=True)
    reference = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("users, expected", [
    (None, f"added {cpu_threading.chosen_flags()}"),
    (cpu_threading.default_flags(), f"XLA_FLAGS left as it is ({cpu_threading.default_flags()})"),
])
def test_main_configures_before_the_backend_and_the_users_flags_win(tmp_path, users, expected):
    env = _clean_env(**({"XLA_FLAGS": users} if users else {}))
    # export from a workdir without checkpoints: main logs its setup, then stops with a one-line error.
    done = subprocess.run([sys.executable, "-m", "bcr_jax.main", "--config", "configs/tiny.py", "--config.mode=export",
                           f"--config.workdir={tmp_path / 'empty'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert f"XLA:CPU threading: {expected}" in done.stderr, done.stderr[-2000:]
