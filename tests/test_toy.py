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
        lines = verbose.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("check "):  # a check repeats the last non-check line verbatim
                previous = next(x for x in reversed(lines[:i]) if not x.startswith("check "))
                assert line == f"check {previous} ok"


def test_each_rewrite_line_follows_from_the_line_above_alone():
    """The format's point: line i+1 is line i with its first operation done, so nothing else is read."""
    for p in world.make_problems(300, seed=7):
        chain = [p.text] + world.rewrites(p)
        for above, below in zip(chain, chain[1:]):
            digits_ops = re.findall(r"[+-]|\d", above)
            first = int(digits_ops[0]) + (int(digits_ops[2]) if digits_ops[1] == "+" else -int(digits_ops[2]))
            assert below == str(first) + "".join(digits_ops[3:])
        assert chain[-1] == str(p.answer) and _value(p.text)[0] == p.answer


def test_checks_by_problem_and_accuracy_by_checks_by_hand():
    from bcr_jax.toy import pipeline

    response = ("5+1\n6\ncheck 6 ok\ncheck 6 ok\nAnswer 1::\\boxed{6}\n3-1+1\n2+1\n3\nAnswer 2::\\boxed{3}\n"
                "4+4-1\n8-1\ncheck 8-1 ok\n")  # cut off in problem 3
    assert world.checks_by_problem(response, 3) == [2, 0, 1]
    records = [{"response": response, "counted": [True, True, True], "correct": [True, False, False]},
               {"response": "1+1\n2\nAnswer 1::\\boxed{2}\n", "counted": [True, False, True],
                "correct": [True, False, False]}]
    by_checks = pipeline.accuracy_by_checks(records, 3)
    # 0 checks: record 0 problem 2 (wrong), record 1 problems 1 (right) and 3 (wrong); record 1 problem 2 a filler.
    assert by_checks["0"] == pytest.approx(1 / 3) and by_checks["count_0"] == 3
    assert by_checks["1"] == 0.0 and by_checks["2"] == 1.0 and by_checks["3+"] is None


def test_greedy_safe_check_probabilities_and_bad_values():
    assert world.VERBOSE.first > 0.5 > world.VERBOSE.repeat  # greedy: one check per line, never a loop
    with pytest.raises(ValueError, match="Verbosity.repeat"):
        world.Verbosity(0.5, 1.0)


def test_tokenizer_round_trips_and_uses_whole_word_markers():
    tok = world.tokenizer()
    assert tok.vocab_size == world.vocab_size() == 21
    text = world.prompt_text(world.make_problems(2, 0)) + "\n" + "3+4-2\n7-2\ncheck 7-2 ok\nAnswer 1::\\boxed{5}\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("Answer 1::\\boxed{7}") == [tok.encode("Answer ")[0], tok.encode("1")[0],
                                                    tok.encode("::\\boxed{")[0], tok.encode("7")[0],
                                                    tok.encode("}")[0]]


def test_redundancy_share_matches_the_expected_check_tokens():
    """The measured share against one computed from the check probabilities: per rewrite line, checks_per_line
    checks of len(line) + 3 tokens ("check ", " ok", newline); the concise part is every line plus its newline, the
    six-token answer line and EOS."""
    verbosity = world.Verbosity(0.8, 0.3)
    check_tokens = concise_tokens = 0.0
    for p in world.make_problems(4000, seed=11):
        lines = world.rewrites(p)
        check_tokens += verbosity.checks_per_line * sum(len(line) + 3 for line in lines)
        concise_tokens += len(p.text) + 1 + sum(len(line) + 1 for line in lines) + 6 + 1
    expected = check_tokens / (check_tokens + concise_tokens)
    measured = world.redundancy_share(num_prompts=4000, verbosity=verbosity)
    assert abs(measured - expected) < 0.01 and measured >= 0.40  # the floor: a >= 30% cut is possible


def test_sft_data_mixes_every_n_and_a_concise_share(tmp_path):
    path = world.write_sft_data(tmp_path / "sft.jsonl", 800, seed=3, n_mix={1: 1.0, 8: 1.0}, concise_share=0.25)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ns = [r["response"].count("Answer ") for r in rows]
    assert set(ns) == {1, 8} and 0.4 < np.mean(np.array(ns) == 8) < 0.6
    concise = np.mean([world.count_checks(r["response"]) == 0 for r in rows if r["response"].count("Answer ") == 8])
    assert 0.15 < concise < 0.35  # an N=8 verbose trace without a single check is vanishingly rare (0.2^~24)


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
    assert models == {"warm_start", "grpo", "bcr", "length_penalty", "length_penalty_high"}
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


def test_another_eval_seed_reuses_the_finished_runs_and_only_evaluates(monkeypatch):
    """Runs after the notebook test (same quick workdir): a new held-out seed trains nothing and writes beside."""
    from bcr_jax import train
    from bcr_jax.toy import pipeline
    from configs import toy as toy_config

    workdir = ROOT / "runs" / "toy_notebook"
    if not (workdir.with_name("toy_notebook_quick") / "toy_replication.json").is_file():
        pytest.fail("needs the notebook test's quick run (run the whole file)")

    def no_training(config):
        raise AssertionError(f"trained {config.workdir} again")

    monkeypatch.setattr(train, "run_train", no_training)
    config = toy_config.get_config()
    config.quick, config.workdir, config.toy.eval_seed = True, str(workdir), 1001
    result = pipeline.run_toy(config)
    out = workdir.with_name("toy_notebook_quick") / "eval_seed1001"
    assert json.loads((out / "toy_replication.json").read_text())["settings"]["eval_seed"] == 1001
    heldout = [json.loads(line)["id"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert heldout and all(i.startswith("heldout/1001/") for i in heldout)
    assert {r["model"] for r in result["rows"]} == {"warm_start", "grpo", "bcr", "length_penalty",
                                                    "length_penalty_high"}
