"""The entry point and the config files: every config parses, and the default job runs end to end."""

from __future__ import annotations

import shlex

import pytest
from config_files import CONFIG_FILES, ROOT, load_config as _load

from bcr_jax import main as main_lib


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_parses_with_a_known_mode(path):
    config = _load(path)
    assert config.mode in main_lib.MODES


def test_sample_mode_runs_on_the_default_config(capsys):
    config = _load(ROOT / "configs" / "base.py")
    config.sample.max_new_tokens = 5
    config.sample.num_samples = 2
    out = main_lib.run_sample(config)
    assert len(out.tokens) == 2 * len(config.sample.prompts) and (out.lengths == 5).all()
    assert "prompt 1 sample 1" in capsys.readouterr().out


def test_sample_mode_on_real_checkpoint_with_chat_template(smollm2_dir, capsys):
    config = _load(ROOT / "configs" / "smollm2_sample.py")
    config.model.hf_path = str(smollm2_dir)
    config.sample.prompts = ("What is 2 + 3?",)
    config.sample.max_new_tokens = 12
    out = main_lib.run_sample(config)
    assert not out.truncated[0]  # the instruct model answers and stops with <|im_end|>
    assert "5" in capsys.readouterr().out


def test_readme_commands_are_what_ci_runs():
    """The README's two set-up commands are the ones .ci/run executes; CI runs the main job's quick variant."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in readme.split("```")[1].strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0] == "pip install -e . && python -m bcr_jax.main --config configs/toy.py"
    assert commands[0] + " --config.quick=True" in ci
    assert commands[1] in ci
    shlex.split(commands[1])  # well-formed shell
