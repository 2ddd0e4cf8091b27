"""The task-scaling-law evaluation and solve mode: exact accounting with scripted policies, outputs, resume,
rescoring, config errors, and an end-to-end run through `main.MODES` on a tiny random model."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import sys
import types

import jax
import pytest
from config_files import load_config

from bcr_jax import evaluate, main as main_lib, sampling
from bcr_jax.build import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLD_OFFSET = 10  # problem q<i> has gold answer str(10 + i)


def base_config(workdir):
    config = load_config("base")
    config.workdir = str(workdir)
    config.data.template = "compact"
    config.grading.num_workers = 1
    return config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def six_problems(tmp_path):
    """q0..q5 with golds 10..15, as a local JSONL benchmark."""
    return write_jsonl(tmp_path / "six.jsonl",
                       [{"problem": f"q{i}", "answer": str(GOLD_OFFSET + i)} for i in range(6)])


def problems_of(prompt_text):
    """The problem texts of a compact-template prompt (N = 1: the text itself)."""
    return re.findall(r"### Problem \d+\n(\S+)", prompt_text) or [prompt_text]


class ScriptedPolicy:
    """A test double for `evaluate.GenerateFn` with known lengths and answers.

    Each problem costs `cost` tokens; the first problem that would overrun the budget is cut off mid-box
    ("Answer k::\\boxed{", truncated, num_tokens = budget). Per problem index: "right", "wrong" or "malformed" (two
    boxes); in sample 1, `sample1_wrong` problems are answered wrong too.
    """

    def __init__(self, cost, quality, sample1_wrong=(0,)):
        self.cost, self.quality, self.sample1_wrong = cost, quality, set(sample1_wrong)
        self.calls = []  # (num_prompts, n, budget, samples, seed)

    def __call__(self, prompt_texts, *, n, budget, samples, seed):
        self.calls.append((len(prompt_texts), n, budget, samples, seed))
        out = []
        for text in prompt_texts:
            problems = problems_of(text)
            assert len(problems) == n
            out.append([self._respond(problems, budget, sample) for sample in range(samples)])
        return out

    def _respond(self, problems, budget, sample):
        lines, used = [], 0
        for k, problem in enumerate(problems, start=1):
            i = int(problem[1:])
            if used + self.cost > budget:
                lines.append(f"Answer {k}::\\boxed{{")
                return evaluate.Completion("\n".join(lines), budget, True)
            used += self.cost
            quality = "wrong" if sample == 1 and i in self.sample1_wrong else self.quality[i]
            value = GOLD_OFFSET + i + (100 if quality == "wrong" else 0)
            box = f"\\boxed{{{value}}}" * (2 if quality == "malformed" else 1)
            lines.append(f"work on {problem}\nAnswer {k}::{box}")
        return evaluate.Completion("\n".join(lines), used, False)


BASE_QUALITY = {0: "right", 1: "right", 2: "wrong", 3: "right", 4: "malformed", 5: "right"}
BCR_QUALITY = {**BASE_QUALITY, 4: "right"}


def exact_grader(answers, golds):
    return [(a == g, "equal" if a == g else "not_equal") for a, g in zip(answers, golds)]


def scripted_config(tmp_path, benchmark, n_values=(1, 2, 3, 4)):
    config = base_config(tmp_path / "run")
    config.eval.benchmarks = (str(benchmark),)
    config.eval.n_values = n_values
    config.eval.samples = 2
    config.eval.budget_rule = "fixed"
    config.eval.budget = 100
    return config


# Hand-derived from BASE_QUALITY / BCR_QUALITY (cost 30 / 15, budget 100, 2 samples, q0 wrong in sample 1):
# base N=4 is cut after 3 problems (the 4th would need 120 tokens); in its second prompt [q4, q5 | q0, q1] the
# fillers q0 (position 3) and q1 are not counted.
EXPECTED = {
    ("base", 1): dict(accuracy=7 / 12, tokens_per_problem=30, truncation_rate=0, answered_rate=5 / 6,
                      accuracy_by_position=[7 / 12]),
    ("base", 2): dict(accuracy=7 / 12, tokens_per_problem=30, truncation_rate=0, answered_rate=5 / 6,
                      accuracy_by_position=[1 / 6, 1]),
    ("base", 3): dict(accuracy=7 / 12, tokens_per_problem=30, truncation_rate=0, answered_rate=5 / 6,
                      accuracy_by_position=[3 / 4, 1 / 2, 1 / 2]),
    ("base", 4): dict(accuracy=5 / 12, tokens_per_problem=25, truncation_rate=1, answered_rate=2 / 3,
                      accuracy_by_position=[1 / 4, 1, 0, 0]),
    ("bcr", 1): dict(accuracy=3 / 4, tokens_per_problem=15, truncation_rate=0, answered_rate=1,
                     accuracy_by_position=[3 / 4], delta_accuracy=1 / 6, delta_tokens_pct=-50),
    ("bcr", 2): dict(accuracy=3 / 4, tokens_per_problem=15, truncation_rate=0, answered_rate=1,
                     accuracy_by_position=[1 / 2, 1], delta_accuracy=1 / 6, delta_tokens_pct=-50),
    ("bcr", 3): dict(accuracy=3 / 4, tokens_per_problem=15, truncation_rate=0, answered_rate=1,
                     accuracy_by_position=[3 / 4, 1, 1 / 2], delta_accuracy=1 / 6, delta_tokens_pct=-50),
    ("bcr", 4): dict(accuracy=3 / 4, tokens_per_problem=15, truncation_rate=0, answered_rate=1,
                     accuracy_by_position=[3 / 4, 1, 0, 1], delta_accuracy=1 / 3, delta_tokens_pct=-40),
}


def test_packing_counts_every_problem_once_per_ordering_and_pads_the_last_prompt():
    prompts = evaluate.pack_benchmark(7, 3, orderings=3, seed=5)
    assert len(prompts) == 3 * 3 and all(len(p.problems) == 3 for p in prompts)
    orders = []
    for r in range(3):
        mine = [p for p in prompts if p.ordering == r]
        counted = [i for p in mine for i, c in zip(p.problems, p.counted) if c]
        assert sorted(counted) == list(range(7))  # each problem counted exactly once per ordering
        assert mine[-1].counted == (True, False, False)  # 7 = 3 + 3 + 1: two fillers...
        assert mine[-1].problems[1:] == tuple(counted[:2])  # ...taken from the start of the same ordering
        orders.append(counted)
    assert orders[0] == list(range(7))  # ordering 0 is the benchmark's own order
    assert orders[1] != orders[0] and orders[2] != orders[1]  # the others are seeded shuffles
    assert orders[1] == [p for p in evaluate.ordering(7, 1, seed=5)]
    with pytest.raises(ValueError):
        evaluate.pack_benchmark(2, 3, orderings=1, seed=0)


def test_accounting_is_exact_for_two_scripted_checkpoints(tmp_path, six_problems):
    config = scripted_config(tmp_path, six_problems)
    policies = {"base": ScriptedPolicy(30, BASE_QUALITY), "bcr": ScriptedPolicy(15, BCR_QUALITY)}
    rows = evaluate.run_eval(config, policies)  # the library grader (math-verify pool), not a stand-in

    assert [(r["checkpoint"], r["n"]) for r in rows] == list(EXPECTED)
    for row in rows:
        expected = EXPECTED[row["checkpoint"], row["n"]]
        for key, value in expected.items():
            assert row[key] == pytest.approx(value), (row["checkpoint"], row["n"], key)
        if row["checkpoint"] == "base":
            assert row["delta_accuracy"] is None and row["delta_tokens_pct"] is None
        assert row["benchmark"] == "six" and row["budget"] == 100 and row["num_problems"] == 6
    base_1 = rows[0]
    assert base_1["reasons"] == {"equal": 7, "missing": 2, "not_equal": 3}  # 12 counted slots
    assert base_1["num_prompts"] == 6 and base_1["num_responses"] == 12

    workdir = pathlib.Path(config.workdir)
    assert json.loads((workdir / "scaling_law.json").read_text()) == rows
    with open(workdir / "scaling_law.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and float(table[7]["delta_tokens_pct"]) == pytest.approx(-40)
    assert table[3]["accuracy_pos_4"] == "0.0" and table[0]["accuracy_pos_2"] == ""
    markdown = (workdir / "scaling_law.md").read_text()
    header = "| N | budget | base acc | base tok/problem | bcr acc | bcr tok/problem | bcr Δacc | bcr Δtok |"
    assert header in markdown
    assert "| 1 | 100 | 58.3 | 30.0 | 75.0 | 15.0 | +16.7 | -50.0% |" in markdown
    assert "| 4 | 100 | 41.7 | 25.0 | 75.0 | 15.0 | +33.3 | -40.0% |" in markdown
    from PIL import Image

    with Image.open(workdir / "scaling_law.png") as image:
        assert image.size[0] > 200 and image.size[1] > 200

    # Raw responses: one JSONL row per response, with everything a re-scoring needs.
    cell = json.loads((workdir / "eval_cells" / f"{rows[3]['cell']}.json").read_text())
    raw = [json.loads(line) for line in (workdir / "eval_cells" / cell["responses"]).read_text().splitlines()]
    assert len(raw) == 4 and raw[2]["problem_ids"][2].endswith("/0") and raw[2]["counted"] == [True, True, False, False]
    assert raw[0]["truncated"] and raw[0]["num_tokens"] == 100 and raw[0]["answers"][3] is None
    assert raw[0]["reasons"] == ["equal", "equal", "not_equal", "missing"]


def test_budget_rule_and_batching(tmp_path, six_problems):
    config = scripted_config(tmp_path, six_problems, n_values=(1, 2, 4))
    config.eval.budget_rule = "per_problem"
    config.eval.budget_per_problem = 40
    config.eval.batch_prompts = 4
    policy = ScriptedPolicy(30, BASE_QUALITY)
    rows = evaluate.run_eval(config, {"base": policy}, grade_fn=exact_grader)
    # N=1: 6 prompts in batches of 4 and 2; N=2: 3 prompts; N=4: 2 prompts. The budget is 40 x N.
    assert [(c[0], c[1], c[2]) for c in policy.calls] == [(4, 1, 40), (2, 1, 40), (3, 2, 80), (2, 4, 160)]
    assert [r["budget"] for r in rows] == [40, 80, 160]
    assert [r["truncation_rate"] for r in rows] == [0, 0, 0]  # 30 tokens per problem fit 40 per problem
    assert len({c[4] for c in policy.calls}) == 4  # every call its own sampling seed
    with pytest.raises(ConfigError, match="config.eval.budget_rule"):
        config.eval.budget_rule = "per_token"
        evaluate.run_eval(config, {"base": policy}, grade_fn=exact_grader)


def test_finished_cells_are_not_resampled_and_rescore_regrades_without_sampling(tmp_path, six_problems):
    config = scripted_config(tmp_path, six_problems, n_values=(1, 2))
    first = ScriptedPolicy(30, BASE_QUALITY)
    rows = evaluate.run_eval(config, {"base": first}, grade_fn=exact_grader)
    again = ScriptedPolicy(30, BASE_QUALITY)
    config.eval.n_values = (1, 2, 3)
    rows3 = evaluate.run_eval(config, {"base": again}, grade_fn=exact_grader)
    assert [c[1] for c in again.calls] == [3]  # only the new N=3 cell was sampled
    assert rows3[:2] == rows

    def lenient(answers, golds):  # a grading change: every well-formed answer counts
        return [(True, "equal") for _ in answers]

    rescored = evaluate.rescore(config.workdir, grade_fn=lenient)
    assert [r["accuracy"] for r in rescored] == pytest.approx([5 / 6] * 3)  # = the answered rate
    assert json.loads((pathlib.Path(config.workdir) / "scaling_law.json").read_text()) == rescored
    config.eval.rescore = True  # the same through the config flag
    assert evaluate.run_eval(config, grade_fn=exact_grader)[0]["accuracy"] == pytest.approx(7 / 12)


def test_local_files_and_field_overrides(tmp_path):
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"question": f"q{i}", "final": GOLD_OFFSET + i} for i in range(3)])
    config = scripted_config(tmp_path, path, n_values=(1, 3))
    with pytest.raises(ConfigError, match=r"config.eval.benchmarks\[0\].*renamed.jsonl.*'problem'"):
        evaluate.run_eval(config, {"base": ScriptedPolicy(30, BASE_QUALITY)})
    config.eval.problem_field, config.eval.answer_field = "question", "final"
    rows = evaluate.run_eval(config, {"base": ScriptedPolicy(30, BASE_QUALITY)}, grade_fn=exact_grader)
    assert [r["accuracy"] for r in rows] == pytest.approx([1 / 2, 1 / 2])  # q0 right once, q1 twice, q2 never


@pytest.mark.parametrize("field, value, message", [
    ("benchmarks", ("no-such-benchmark",), r"config.eval.benchmarks\[0\]: unknown benchmark 'no-such-benchmark'"),
    ("benchmarks", ("synthetic:nope",), r"config.eval.benchmarks\[0\]: unknown synthetic source"),
    ("benchmarks", ("missing.jsonl",), r"config.eval.benchmarks\[0\]: .*missing.jsonl does not exist"),
    ("n_values", (1, 0), r"config.eval.n_values"),
    ("n_values", (1, 7), r"config.eval.n_values: N=7 exceeds the 6 problems"),
    ("checkpoints", ("/no/such/checkpoint",), r"config.eval.checkpoints\[0\]: /no/such/checkpoint does not exist"),
    ("samples", 0, r"config.eval.samples"),
    ("top_p", 0.0, r"config.eval.top_p"),
])
def test_config_errors_name_the_key_before_any_sampling(tmp_path, six_problems, monkeypatch, field, value, message):
    config = scripted_config(tmp_path, six_problems)
    config.tokenizer.kind, config.tokenizer.characters = "chars", ALPHABET  # a valid model: only `field` is wrong
    config.eval[field] = value
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampled despite a config error"))
    with pytest.raises(ConfigError, match=message):
        main_lib.MODES["eval"](config)


def test_checkpoint_entries_resolve_without_loading(tmp_path):
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    run = tmp_path / "my-run"
    for step in (3, 7):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
    (run / "config.json").write_text("{}")  # a run's own config does not make it an HF directory
    config = base_config(tmp_path)
    assert evaluate.resolve_checkpoint(str(hf), "k") == evaluate.CheckpointSpec("hf-model", "hf", str(hf))
    latest = evaluate.resolve_checkpoint(str(run), "k")
    assert (latest.kind, latest.label, latest.step) == ("run", "my-run@7", 7)  # pinned: the cache key never drifts
    assert evaluate.resolve_checkpoint(f"{run}@3", "k").label == "my-run@3"
    with pytest.raises(ConfigError, match="config.k: .*no step 5"):
        evaluate.resolve_checkpoint(f"{run}@5", "k")
    with pytest.raises(ConfigError, match="config.k: .*HF directory, not a run"):
        evaluate.resolve_checkpoint(f"{hf}@2", "k")
    with pytest.raises(ConfigError, match="config.k: .*neither an HF checkpoint"):
        evaluate.resolve_checkpoint(str(tmp_path), "k")
    (tmp_path / "fresh-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="config.k: .*without a saved checkpoint"):
        evaluate.resolve_checkpoint(str(tmp_path / "fresh-run"), "k")
    config.eval.checkpoints = (str(hf), f"{run}@3")
    config.eval.labels = ("base", "bcr")
    assert [s.label for s in evaluate.resolve_checkpoints(config)] == ["base", "bcr"]
    config.eval.labels = ("only-one",)
    with pytest.raises(ConfigError, match="config.eval.labels"):
        evaluate.resolve_checkpoints(config)


def test_solve_writes_one_row_per_problem_in_input_order(tmp_path, capsys):
    config = base_config(tmp_path / "run")
    config.solve.path = str(tmp_path / "problems.txt")
    (tmp_path / "problems.txt").write_text("q3\n\nq4\nq0\nq2\nq5\n")  # the blank line is skipped
    config.solve.n = 2
    config.eval.budget = 100
    policy = ScriptedPolicy(30, BASE_QUALITY, sample1_wrong=())
    rows = evaluate.run_solve(config, policy)
    written = [json.loads(line) for line in (tmp_path / "run" / "solutions.jsonl").read_text().splitlines()]
    assert written == rows
    assert [r["problem"] for r in rows] == ["q3", "q4", "q0", "q2", "q5"]
    assert [r["id"] for r in rows] == ["1", "3", "4", "5", "6"]  # line numbers
    assert [r["answer"] for r in rows] == ["13", None, "10", "112", "15"]  # q4 malformed; q2 wrong
    assert [r["tokens"] for r in rows] == [60, 60, 60, 60, 30]  # the last prompt holds one problem
    assert [(c[0], c[1]) for c in policy.calls] == [(2, 2), (1, 1)]
    assert "5 problems in 3 prompts of up to 2: 150 response tokens, 30.0 tokens per problem, 4/5 answered" in \
        capsys.readouterr().out

    write_jsonl(tmp_path / "problems.jsonl", [{"id": "a", "problem": "q1"}, {"problem": "q5"}])
    config.solve.path = str(tmp_path / "problems.jsonl")
    config.solve.output = str(tmp_path / "out" / "answers.jsonl")
    rows = evaluate.run_solve(config, ScriptedPolicy(30, BASE_QUALITY))
    assert [(r["id"], r["answer"]) for r in rows] == [("a", "11"), ("2", "15")]
    assert (tmp_path / "out" / "answers.jsonl").is_file()

    write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "question": "q1"}])
    config.solve.path = str(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match=r"config.solve.path: .*bad.jsonl, line 1: field 'problem'"):
        evaluate.run_solve(config, policy)
    config.solve.path = str(tmp_path / "absent.txt")
    with pytest.raises(ConfigError, match="config.solve.path: .*absent.txt does not exist"):
        evaluate.run_solve(config, policy)


# ------------------------------------------------------------------------------------- the real model, end to end

ALPHABET = "".join(sorted(set("### Problem 0123456789\n+-Answer::\\boxed{}")))


def tiny_model_config(workdir):
    config = base_config(workdir)
    config.model.preset = "tiny-qwen3"
    config.tokenizer.kind = "chars"
    config.tokenizer.characters = ALPHABET
    config.eval.benchmarks = ("synthetic:digit-sums",)
    config.eval.num_problems = 6
    config.eval.n_values = (1, 2, 3)
    config.eval.samples = 2
    config.eval.budget = 8
    config.eval.temperature = 1.0
    config.eval.batch_prompts = 8  # one sampler call per cell
    config.rollout.decode_blocks = 1
    return config


def test_eval_end_to_end_on_a_tiny_model_resumes_after_an_interruption(tmp_path, monkeypatch, capsys):
    config = tiny_model_config(tmp_path / "run")
    real_generate = sampling.generate
    calls = []

    def counting_generate(*args, interrupt_at=None, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", lambda *a, **k: counting_generate(*a, interrupt_at=3, **k))
    with pytest.raises(KeyboardInterrupt):
        main_lib.MODES["eval"](config)
    assert calls == [6, 3, 2]  # N=1 (6 prompts), N=2 (3), interrupted in N=3 (2)
    cells = pathlib.Path(config.workdir) / "eval_cells"
    assert len(list(cells.glob("*.json"))) == 2 and len(list(cells.glob("*.jsonl"))) == 2

    calls.clear()
    monkeypatch.setattr(sampling, "generate", counting_generate)
    rows = main_lib.MODES["eval"](config)
    assert calls == [2]  # only the unfinished cell
    assert [r["n"] for r in rows] == [1, 2, 3] and all(r["checkpoint"] == "tiny-qwen3" for r in rows)
    for row in rows:
        assert 0 <= row["accuracy"] <= row["answered_rate"] <= 1 and len(row["accuracy_by_position"]) == row["n"]
        assert 0 < row["tokens_per_problem"] <= 8 / row["n"]  # at most the budget, shared by N problems
    assert "# Task-scaling law" in capsys.readouterr().out
    for suffix in ("json", "csv", "md", "png"):
        assert (pathlib.Path(config.workdir) / f"scaling_law.{suffix}").is_file()

    calls.clear()
    monkeypatch.setattr(evaluate, "load_policy", lambda *a, **k: pytest.fail("loaded a model with every cell cached"))
    assert main_lib.MODES["eval"](config) == rows and calls == []

    # solve with the same model: one row per problem, in input order, whatever the random model writes.
    config.solve.path = str(write_jsonl(tmp_path / "p.jsonl", [{"problem": f"{i}+1"} for i in range(5)]))
    config.solve.n = 2
    monkeypatch.undo()
    rows = main_lib.MODES["solve"](config)
    assert [r["problem"] for r in rows] == [f"{i}+1" for i in range(5)]
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5"] and [r["group"] for r in rows] == [0, 0, 1, 1, 2]
    assert all(isinstance(r["tokens"], int) and 1 <= r["tokens"] <= 8 for r in rows)


def test_a_random_preset_without_a_tokenizer_is_a_config_error(tmp_path, six_problems):
    config = scripted_config(tmp_path, six_problems, n_values=(1,))
    config.tokenizer.kind = "auto"  # a random preset has no tokenizer
    with pytest.raises(ConfigError, match="config.eval.checkpoints: empty, .* random preset without a tokenizer"):
        evaluate.run_eval(config)


def test_two_hf_checkpoints_get_delta_columns(tmp_path):
    from bcr_jax import models

    config = tiny_model_config(tmp_path / "run")
    cfg = models.get_preset("tiny-qwen3")
    for seed in (0, 1):
        models.save_hf(cfg, models.init_params(cfg, jax.random.key(seed)), tmp_path / f"model-{seed}")
    config.eval.checkpoints = (str(tmp_path / "model-0"), str(tmp_path / "model-1"))
    config.eval.n_values = (1, 2)
    rows = evaluate.run_eval(config)  # tokenizer.kind=chars wins over the directories' (absent) tokenizers
    assert [(r["checkpoint"], r["n"]) for r in rows] == [("model-0", 1), ("model-0", 2), ("model-1", 1),
                                                         ("model-1", 2)]
    for base, other in zip(rows[:2], rows[2:]):
        assert other["delta_tokens_pct"] == pytest.approx(
            100 * (other["tokens_per_problem"] - base["tokens_per_problem"]) / base["tokens_per_problem"])
        assert other["delta_accuracy"] == pytest.approx(other["accuracy"] - base["accuracy"])
    assert "model-1 Δtok" in (pathlib.Path(config.workdir) / "scaling_law.md").read_text()


def test_a_training_run_is_loaded_through_checkpoint_load_run(tmp_path, monkeypatch):
    from bcr_jax import models, sharding

    run = tmp_path / "my-run"
    for step in (5, 10):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
    loaded = []

    def load_run(workdir, step=None, mesh=None):  # the trainer's API: (ModelConfig, params, tokenizer, step)
        loaded.append((workdir, step))
        cfg = models.get_preset("tiny-qwen3")
        return cfg, sharding.shard_params(models.init_params(cfg, jax.random.key(step)), mesh), None, step

    monkeypatch.setitem(sys.modules, "bcr_jax.checkpoint", types.SimpleNamespace(load_run=load_run))
    config = tiny_model_config(tmp_path / "eval")
    config.eval.checkpoints = (f"{run}@5", str(run))
    config.eval.n_values = (1,)
    rows = evaluate.run_eval(config)  # the run's tokenizer is None here: the config's (chars) is used
    assert loaded == [(str(run.resolve()), 5), (str(run.resolve()), 10)]  # the latest step, pinned at resolution
    assert [r["checkpoint"] for r in rows] == ["my-run@5", "my-run@10"]


def test_phrase_counts_per_problem_from_the_kept_responses(tmp_path, six_problems):
    config = scripted_config(tmp_path, six_problems, n_values=(1, 4))
    config.eval.count_phrases = ("WORK on", "boxed")
    policy = ScriptedPolicy(30, BASE_QUALITY)
    rows = evaluate.run_eval(config, {"base": policy}, grade_fn=exact_grader)
    # Hand-derived: N=1, one "work on" per response and one box, two for the malformed q4 (both samples):
    # 14 boxes / 12 problems. N=4 is cut after 3 problems (the 4th box opened, never closed): prompt [q0..q3]
    # 3 + 1 boxes, prompt [q4, q5, q0, q1] 2 + 1 + 1 + 1, twice each, over 4 responses x 4 problems.
    assert rows[0]["phrase_counts"] == pytest.approx({"WORK on": 1.0, "boxed": 14 / 12})
    assert rows[1]["phrase_counts"] == pytest.approx({"WORK on": 3 / 4, "boxed": 18 / 16})
    header, first = list(csv.reader((pathlib.Path(config.workdir) / "scaling_law.csv").read_text().splitlines()))[:2]
    assert float(first[header.index("per_problem:boxed")]) == pytest.approx(14 / 12)
    assert "## Phrases per problem" in (pathlib.Path(config.workdir) / "scaling_law.md").read_text()

    # Cached cells are recounted from their responses for new phrases, without sampling again.
    config.eval.count_phrases = ("answer 1::",)
    again = ScriptedPolicy(30, BASE_QUALITY)
    rows = evaluate.run_eval(config, {"base": again}, grade_fn=exact_grader)
    assert again.calls == [] and [r["phrase_counts"] for r in rows] == [{"answer 1::": 1.0}, {"answer 1::": 1 / 4}]
    rescored = evaluate.rescore(config.workdir, grade_fn=exact_grader, count_phrases=("q4",))
    # q4: once in each response of its prompt (2 of 12 at N=1, 2 of 4 x 4 problem slots at N=4).
    assert [r["phrase_counts"] for r in rescored] == [pytest.approx({"q4": 2 / 12}), pytest.approx({"q4": 2 / 16})]
    config.eval.count_phrases = ("wait", "")
    with pytest.raises(ConfigError, match="config.eval.count_phrases"):
        evaluate.run_eval(config, {"base": again}, grade_fn=exact_grader)
