"""The toy world: problems, traces and tokenizer checked by hand; the quick replication run end to end through the
Colab notebook (so the notebook cannot drift from the code)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from config_files import ROOT

from bcr_jax import bcr, cpu_threading
from bcr_jax.toy import world


def _value(chain: str) -> tuple[int, list[int]]:
    """The chain's value and running totals, by hand (digits and signs, never eval)."""
    tokens = re.findall(r"[+-]|\d", chain)
    total, totals = int(tokens[0]), []
    for op, digit in zip(tokens[1::2], tokens[2::2]):
        total = total + int(digit) if op == "+" else total - int(digit)
        totals.append(total)
    return total, totals


def test_problems_are_single_digit_chains_with_the_right_answer():
    problems = world.make_problems(500, seed=3)
    for p in problems:
        value, totals = _value(p.text)
        assert p.answer == value and all(0 <= t <= 9 for t in totals)
        assert 2 <= p.difficulty == len(totals) <= 4
    assert len({p.answer for p in problems}) == 10  # every digit occurs
    assert [p.text for p in world.make_problems(20, 3)] == [p.text for p in problems[:20]]  # seeded
    assert {p.text for p in world.make_problems(200, 1000)} != {p.text for p in world.make_problems(200, 0)}


@pytest.mark.parametrize("n", [1, 3, 8])
def test_traces_parse_to_the_right_answers_and_checks_never_change_them(n):
    rng = np.random.default_rng(n)
    for _ in range(50):
        problems = [world.make_problem(rng, str(k)) for k in range(n)]
        verbose, concise = world.trace(problems, rng), world.trace(problems, None)
        for text in (verbose, concise):
            assert bcr.split_answers(text, n) == [str(p.answer) for p in problems]
        assert world.count_checks(concise) == 0
        # Removing the check lines of a verbose trace gives the concise one: they are pure redundancy.
        assert "".join(line + "\n" for line in verbose.splitlines() if not line.startswith("check ")) == concise


def test_tokenizer_round_trips_and_uses_whole_word_markers():
    tok = world.tokenizer()
    assert tok.vocab_size == world.vocab_size() == 22
    text = world.prompt_text(world.make_problems(2, 0)) + "\n" + "3+4=7\ncheck 3+4=7 ok\nAnswer 1::\\boxed{7}\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("Answer 1::\\boxed{7}") == [tok.encode("Answer ")[0], tok.encode("1")[0],
                                                    tok.encode("::\\boxed{")[0], tok.encode("7")[0],
                                                    tok.encode("}")[0]]


def test_redundancy_share_matches_the_geometric_check_count():
    # 0.4 / 0.6 checks per step of 8 tokens, against 6 tokens per step and a 6-token answer line, 3 steps on average.
    steps, checks = 3.0, 0.4 / 0.6
    expected = steps * checks * 8 / (steps * (6 + checks * 8) + 6 + 1)
    assert abs(world.redundancy_share(num_prompts=4000) - expected) < 0.02


def test_the_notebook_runs_the_quick_replication(monkeypatch):
    import shutil

    import nbformat
    from nbclient import NotebookClient

    workdir = ROOT / "runs" / "toy_notebook_quick"
    shutil.rmtree(workdir, ignore_errors=True)  # the pipeline reuses finished runs; this test must not
    # The kernel inherits this process's environment: run it on one CPU device, as a user's machine would, not on
    # the 8 simulated devices of the sharding tests (slower on 2 cores, same results), and without the threading
    # flags conftest set, which the notebook must set itself.
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
            if flag != "--xla_force_host_platform_device_count=8"
            and flag.removeprefix("--").split("=")[0] not in dict(cpu_threading.CHOSEN)]
    monkeypatch.setenv("XLA_FLAGS", " ".join(kept))
    notebook = nbformat.read(ROOT / "notebooks" / "small_scale_replication.ipynb", as_version=4)
    assert "QUICK = True" in notebook.cells[1].source
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    result = json.loads((workdir / "toy_replication.json").read_text())
    models = {row["model"] for row in result["rows"]}
    assert models == {"warm_start", "grpo", "bcr", "length_penalty"}
    assert {(row["n"], row["temperature"]) for row in result["rows"]} == {(n, t) for n in (1, 2, 4, 8)
                                                                         for t in (1.0, 0.0)}
    for row in result["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["tokens_per_problem"] > 0 and len(row["accuracy_by_position"]) == \
            row["n"]
    for name in ("toy_training.png", "toy_scaling_law.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the plots are shown
    assert any("N=1: bcr" in o.get("text", "") for o in outputs)
    assert any(f"XLA:CPU threading: added {cpu_threading.chosen_flags()}" in o.get("text", "") for o in outputs)
