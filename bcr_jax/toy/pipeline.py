"""The toy replication (`mode=toy`, the README's main job): warm start → four RL runs → the scaling-law evaluation.

1. Data: training problems from `toy.train_seed`, held-out evaluation problems from `toy.eval_seed` (never used to
   tune anything), written as local JSONL files the trainer and the evaluation read. The warm start is checked on
   a third set, `toy.dev_seed`.
2. Warm start: the shipped one (`bcr_jax/toy/warm_start`, made by this project's `mode=sft`; rebuild it with
   `--config.toy.rebuild_warm_start=True`, add `--config.toy.stop_after=warm_start` to stop after measuring it).
3. RL with the real trainer, the same rollout budget (prompts x samples x steps) and the same response budget
   (`toy.budget` tokens) for every run: `grpo` (N = 1), `bcr` (N = 3, the budget shared by three problems),
   `length_penalty` and `length_penalty_high` (N = 1, reward - lambda |y| / budget at two lambdas), and optionally
   `bcr_segment` (bcr with per-problem segment credit).
4. Evaluation on the held-out problems at every N of `toy.n_values`, at temperature 1 and greedy, one fixed budget
   per prompt; checks per problem counted by the evaluation's `eval.count_phrases`.
5. Results: `toy_replication.json` (rows per model x N x temperature), `toy_replication.md`, `toy_training.png`
   (per-step reward, accuracy, tokens and checks per problem, truncation) and `toy_scaling_law.png`, in the workdir,
   copied to `toy.results_dir` for the registered held-out seed. Another `toy.eval_seed` reuses the finished runs
   and only evaluates (`eval_seed<seed>/` in the workdir).
"""

from __future__ import annotations

import copy
import datetime
import json
import io
import pathlib
import sys
import tempfile
import time

import numpy as np

from bcr_jax import bcr, evaluate, paths, train
from bcr_jax.toy import world

WARM_START_DIR = pathlib.Path(__file__).resolve().parent / "warm_start"
RUNS = ("grpo", "bcr", "length_penalty", "length_penalty_high", "bcr_segment")
REGISTERED_EVAL_SEED = 1000  # the held-out seed the shipped results use; other seeds write beside them
CHECK_BUCKETS = ("0", "1", "2", "3+")


def _stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


def toy_tokenizer_fields(config) -> None:
    config.tokenizer.kind = "chars"
    config.tokenizer.characters = world.ALPHABET
    config.tokenizer.words = world.WORDS
    config.data.template = "compact"
    config.rollout.thinking = "off"
    config.eval.count_phrases = (world.CHECK,)


def verbosity(config) -> world.Verbosity:
    return world.Verbosity(config.toy.first_check_prob, config.toy.repeat_check_prob)


def exact_grader(answers, golds):
    """The toy's answers are single digits: an exact comparison decides them (no worker pool)."""
    return [(a.strip() == g, "equal" if a.strip() == g else "not_equal") for a, g in zip(answers, golds)]


def sft_config(config, data_path: pathlib.Path, workdir: pathlib.Path):
    sft = copy.deepcopy(config)
    sft.mode, sft.workdir = "sft", str(workdir)
    sft.model.hf_path, sft.model.preset = "", config.toy.model_preset
    sft.model.vocab_size = world.vocab_size()
    sft.sft.path = str(data_path)
    sft.sft.steps = config.toy.sft_steps
    return sft


def rl_config(config, name: str, warm_start: pathlib.Path, train_path: pathlib.Path, workdir: pathlib.Path):
    """The trainer config of one RL run; everything but N and the reward is shared."""
    toy = config.toy
    run = copy.deepcopy(config)
    run.mode, run.workdir = "train", str(workdir)
    run.model.hf_path = str(warm_start)
    run.data.source, run.data.path = "local", str(train_path)
    run.total_steps = toy.rl_steps
    run.checkpoint_every = toy.rl_steps
    run.rollout.prompts_per_step = toy.prompts_per_step
    run.rollout.samples_per_prompt = toy.samples_per_prompt
    run.rollout.temperature = 1.0
    run.rollout.budget = toy.budget
    run.train.count_text = world.CHECK
    run.data.problems_per_prompt = 3 if name in ("bcr", "bcr_segment") else 1
    if name == "bcr_segment":
        run.reward.credit = "segment"
    elif name == "length_penalty":
        run.reward.length_penalty = toy.length_penalty
    elif name == "length_penalty_high":
        run.reward.length_penalty = toy.length_penalty_high
    elif name not in ("grpo", "bcr"):
        raise train.ConfigError(f"config.toy.runs: unknown run {name!r}; choose from {', '.join(RUNS)}")
    return run


def eval_config(config, checkpoints: dict[str, str], problems: pathlib.Path, workdir: pathlib.Path, temperature,
                n_values=None, budget=None):
    ev = copy.deepcopy(config)
    ev.mode, ev.workdir = "eval", str(workdir)
    ev.eval.checkpoints = tuple(checkpoints.values())
    ev.eval.labels = tuple(checkpoints)
    ev.eval.benchmarks = (str(problems),)
    ev.eval.n_values = tuple(n_values or config.toy.n_values)
    ev.eval.temperature, ev.eval.top_p = float(temperature), 1.0
    ev.eval.samples = config.toy.eval_samples if temperature > 0 else 1
    ev.eval.orderings = 1
    ev.eval.budget_rule, ev.eval.budget = "fixed", budget or config.toy.eval_budget
    ev.eval.batch_prompts = 256
    return ev


def _records(eval_dir: pathlib.Path, row: dict) -> list[dict]:
    path = eval_dir / evaluate.CELLS_DIR / f"{row['cell']}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def accuracy_by_checks(records: list[dict], n: int) -> dict[str, float | None]:
    """Accuracy of the problems that were given 0, 1, 2 or 3+ check lines, with the count of each bucket."""
    hits = {b: [] for b in CHECK_BUCKETS}
    for record in records:
        for k, checks in enumerate(world.checks_by_problem(record["response"], n)):
            if record["counted"][k]:
                hits[CHECK_BUCKETS[min(checks, 3)]].append(bool(record["correct"][k]))
    return {b: (float(np.mean(v)) if v else None) for b, v in hits.items()} | \
        {f"count_{b}": len(v) for b, v in hits.items()}


def measure_warm_start(config, warm_start: pathlib.Path, workdir, inputs: pathlib.Path | None = None) -> dict:
    """The world's measured properties on the warm start, on `toy.dev_seed` problems (never the held-out ones):
    accuracy by checks written (greedy and T=1, N=1), accuracy by position at N=8, and the data's redundancy.
    The dev problems go to `inputs` (default: `workdir`), which must be local."""
    toy = config.toy
    dev = world.write_problems(pathlib.Path(inputs or workdir) / "data" / "dev.jsonl",
                               world.make_problems(toy.dev_problems, toy.dev_seed, "dev"))
    report = {"warm_start": str(warm_start), "dev_seed": toy.dev_seed, "dev_problems": toy.dev_problems,
              "budget": toy.dev_budget,
              "redundancy_share_n1": world.redundancy_share(n=1, seed=toy.train_seed, verbosity=verbosity(config)),
              "cells": []}
    for temperature, label in ((0.0, "greedy"), (1.0, "t1")):
        eval_dir = workdir / "warm_start_check" / label
        rows = evaluate.run_eval(eval_config(config, {"warm_start": str(warm_start)}, dev, eval_dir, temperature,
                                             n_values=(1, 8), budget=toy.dev_budget), grade_fn=exact_grader)
        for row in rows:
            records = _records(eval_dir, row)
            report["cells"].append({"temperature": temperature, "n": row["n"], "accuracy": row["accuracy"],
                                    "accuracy_by_position": row["accuracy_by_position"],
                                    "tokens_per_problem": row["tokens_per_problem"],
                                    "checks_per_problem": row["phrase_counts"][world.CHECK],
                                    "truncation_rate": row["truncation_rate"],
                                    "accuracy_by_checks": accuracy_by_checks(records, row["n"])})
    paths.write_atomic(workdir / "warm_start_check.json", json.dumps(report, indent=1))
    for cell in report["cells"]:
        by_checks = " / ".join("-" if cell["accuracy_by_checks"][b] is None else
                               f"{cell['accuracy_by_checks'][b]:.1%}" for b in CHECK_BUCKETS)
        positions = " / ".join(f"{a:.0%}" for a in cell["accuracy_by_position"])
        print(f"warm start T={cell['temperature']:g} N={cell['n']}: accuracy {cell['accuracy']:.1%}, "
              f"{cell['checks_per_problem']:.2f} checks/problem, by checks 0/1/2/3+ {by_checks}, "
              f"by position {positions}", flush=True)
    return report


def training_curves(run_dirs: dict[str, pathlib.Path]) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
            for name, d in run_dirs.items()}


def smooth(values, window: int = 5) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start): per-step rollouts of 8 prompts are noisy."""
    values = np.asarray(values, float)
    return np.array([np.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))])


def plot_training(curves: dict[str, list[dict]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward/mean", "reward"), ("accuracy/instance", "accuracy (training rollouts)"),
              ("tokens/per_problem", "tokens per problem"), ("rollout/count_per_problem", "checks per problem"),
              ("rollout/truncation_rate", "truncation rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for i, (name, rows) in enumerate(curves.items()):
            steps, values = [r["step"] for r in rows], [r.get(key, np.nan) for r in rows]
            ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values), color=f"C{i}", label=name)
        ax.set_title(title + " (5-step mean)")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    paths.write_atomic(path, png.getvalue())


TRAINING_KEYS = ("reward/mean", "accuracy/instance", "tokens/per_problem", "rollout/count_per_problem",
                 "rollout/truncation_rate")


def training_summary(curves: dict[str, list[dict]], window: int = 10) -> dict:
    """Per run and metric, the mean over the first, the second-to-last and the last `window` steps (whether a
    run has stopped moving is read off the last two) and the extremes of any logged step (a collapse)."""
    summary = {}
    for name, rows in curves.items():
        summary[name] = {}
        for key in TRAINING_KEYS:
            values = np.array([r.get(key, np.nan) for r in rows], float)
            summary[name][key] = {"first": float(np.mean(values[:window])),
                                  "previous": float(np.mean(values[-2 * window:-window])) if len(values) > window
                                  else None,
                                  "last": float(np.mean(values[-window:])),
                                  "min": float(np.min(values)), "max": float(np.max(values)),
                                  "min_5_step_mean": float(np.min(smooth(values)))}
    return summary


def markdown(rows: list[dict], share: float) -> str:
    lines = [f"Held-out toy problems; check lines are {share:.0%} of a verbose N=1 trace's tokens.", "",
             "| model | T | N | accuracy | tokens / problem | checks / problem | answered | truncated | "
             "accuracy by position |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        positions = " / ".join(f"{a:.0%}" for a in r["accuracy_by_position"])
        lines.append(f"| {r['model']} | {r['temperature']:g} | {r['n']} | {r['accuracy']:.1%} | "
                     f"{r['tokens_per_problem']:.1f} | {r['checks_per_problem']:.2f} | {r['answered_rate']:.0%} | "
                     f"{r['truncation_rate']:.0%} | {positions} |")
    return "\n".join(lines) + "\n"


def claims(rows: list[dict], summary: dict) -> dict:
    """The issue's four checks, computed from the held-out rows at temperature 1 and the training curves (the
    criteria were fixed before any held-out result was seen; see the README's toy section)."""
    at = {(r["model"], r["n"]): r for r in rows if r["temperature"] == 1.0}
    ns = sorted({n for _, n in at})
    out = {}
    if not {"warm_start", "grpo", "bcr"} <= {m for m, _ in at} or 1 not in ns:
        return out
    first, last = ns[0], ns[-1]

    def drop(model):
        return at[(model, first)]["accuracy"] - at[(model, last)]["accuracy"]

    tokens = [at[("bcr", n)]["tokens_per_problem"] for n in ns]
    out["a_scaling_law"] = {
        "bcr_tokens_per_problem": dict(zip(map(str, ns), tokens)),
        "tokens_fall_strictly": all(b < a for a, b in zip(tokens, tokens[1:])),
        "accuracy_drop_points": {m: 100 * drop(m) for m in ("warm_start", "grpo", "bcr")},
        "bcr_within_15_points": 100 * drop("bcr") <= 15,
        "bcr_drop_at_most_half_of_others_or_5_points": 100 * drop("bcr") <= 5 or
        all(drop("bcr") <= 0.5 * drop(m) for m in ("warm_start", "grpo")),
    }
    bcr1, ws1, grpo1 = at[("bcr", 1)], at[("warm_start", 1)], at[("grpo", 1)]
    out["b_free_lunch"] = {
        "tokens_vs_warm_start": bcr1["tokens_per_problem"] / ws1["tokens_per_problem"],
        "tokens_vs_grpo": bcr1["tokens_per_problem"] / grpo1["tokens_per_problem"],
        "accuracy_minus_warm_start_points": 100 * (bcr1["accuracy"] - ws1["accuracy"]),
        "accuracy_minus_grpo_points": 100 * (bcr1["accuracy"] - grpo1["accuracy"]),
    }
    out["b_free_lunch"]["met"] = (out["b_free_lunch"]["tokens_vs_warm_start"] <= 0.75
                                  and out["b_free_lunch"]["tokens_vs_grpo"] <= 0.80
                                  and min(out["b_free_lunch"]["accuracy_minus_warm_start_points"],
                                          out["b_free_lunch"]["accuracy_minus_grpo_points"]) >= -2)
    for name in ("length_penalty", "length_penalty_high"):
        if (name, 1) in at and name in summary:
            lowest = summary[name]["accuracy/instance"]["min"]
            out[f"c_{name}"] = {
                "heldout_accuracy_n1": at[(name, 1)]["accuracy"], "warm_start_accuracy_n1": ws1["accuracy"],
                "lowest_training_accuracy": lowest,
                "lowest_5_step_mean": summary[name]["accuracy/instance"]["min_5_step_mean"],
                "last10_training_accuracy": summary[name]["accuracy/instance"]
                ["last"], "collapsed": max(ws1["accuracy"] - lowest, ws1["accuracy"] - at[(name, 1)]["accuracy"])
                >= 0.10}
    out["d_checks_per_problem"] = {f"{m}@N={n}": r["checks_per_problem"] for (m, n), r in sorted(at.items())}
    return out


def _apply_quick(toy) -> None:
    toy.rl_steps, toy.eval_problems, toy.sft_steps = toy.quick_rl_steps, toy.quick_eval_problems, toy.quick_sft_steps
    toy.eval_samples = min(toy.eval_samples, 2)
    toy.prompts_per_step = toy.quick_prompts_per_step
    toy.dev_problems = min(toy.dev_problems, toy.quick_eval_problems)
    toy.results_dir = ""  # a quick run never overwrites the full run's results


def run_toy(config) -> dict:
    toy = config.toy
    if config.quick:
        _apply_quick(toy)
    for name in toy.runs:
        if name not in RUNS:
            raise train.ConfigError(f"config.toy.runs: unknown run {name!r}; choose from {', '.join(RUNS)}")
    if toy.stop_after not in ("", "warm_start"):
        raise train.ConfigError(f"config.toy.stop_after: {toy.stop_after!r}; choose '' or 'warm_start'")
    toy_tokenizer_fields(config)
    workdir = paths.resolve(config.workdir)
    if config.quick:  # never mix a quick run's files with a full run's
        workdir = workdir.with_name(workdir.name + "_quick")
    paths.check_writable(workdir, "config.workdir")  # a local directory or gs://
    # The trainer, sft and the evaluation read problem files and the warm start from local files; with a gs://
    # workdir these inputs (deterministic in the seeds) are made in a local scratch directory, the results go to gs.
    inputs = workdir if not paths.is_remote(workdir) else pathlib.Path(tempfile.mkdtemp(prefix="bcr_jax-toy-"))
    started = time.perf_counter()

    _stage("data: training and held-out problems")
    train_path = world.write_problems(inputs / "data" / "train.jsonl",
                                      world.make_problems(toy.train_problems, toy.train_seed, "train"))
    registered = toy.eval_seed == REGISTERED_EVAL_SEED
    out_dir = workdir if registered else workdir / f"eval_seed{toy.eval_seed}"
    heldout_path = world.write_problems((inputs if registered else inputs / out_dir.name) / "data" / "heldout.jsonl",
                                        world.make_problems(toy.eval_problems, toy.eval_seed, "heldout"))
    share = world.redundancy_share(n=1, seed=toy.train_seed, verbosity=verbosity(config))
    print(f"{toy.train_problems} training problems, {toy.eval_problems} held-out (seed {toy.eval_seed}); checks "
          f"are {share:.0%} of a verbose N=1 trace", flush=True)

    _stage("warm start")
    if toy.rebuild_warm_start or not (WARM_START_DIR / "config.json").is_file():
        from bcr_jax import sft

        sft_data = world.write_sft_data(inputs / "data" / "sft.jsonl", toy.sft_examples, toy.train_seed + 1,
                                        {int(k): float(v) for k, v in toy.sft_n_mix}, verbosity(config),
                                        toy.sft_concise_share)
        warm_start = sft.run_sft(sft_config(config, sft_data, inputs / "warm_start"))
        measure_warm_start(config, warm_start, workdir, inputs)
    elif toy.warm_start:
        warm_start = pathlib.Path(toy.warm_start).expanduser()
        if not (warm_start / "config.json").is_file():
            raise train.ConfigError(f"config.toy.warm_start: {warm_start} is not an HF directory (no config.json)")
        print(f"using the warm start {warm_start}")
    else:
        warm_start = WARM_START_DIR
        print(f"using the shipped warm start {warm_start} (rebuild: --config.toy.rebuild_warm_start=True)")
    if toy.stop_after == "warm_start":
        if not toy.rebuild_warm_start:
            measure_warm_start(config, warm_start, workdir, inputs)
        return {"warm_start": str(warm_start)}

    run_dirs = {}
    for name in toy.runs:
        _stage(f"RL run: {name}")
        run_dir = workdir / "runs" / name
        steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())
        if steps and steps[-1] > toy.rl_steps:
            raise train.ConfigError(f"config.workdir: {run_dir} holds a run of {steps[-1]} steps, longer than "
                                    f"toy.rl_steps={toy.rl_steps}; choose another config.workdir")
        if steps and steps[-1] == toy.rl_steps:
            print(f"{run_dir} is complete; reusing it")
        else:  # new, or interrupted: the trainer resumes from its latest checkpoint
            train.run_train(rl_config(config, name, warm_start, train_path, run_dir))
        run_dirs[name] = run_dir

    checkpoints = {"warm_start": str(warm_start), **{name: str(d) for name, d in run_dirs.items()}}
    rows = []
    for temperature, label in ((1.0, "t1"), (0.0, "greedy")):
        _stage(f"evaluation at temperature {temperature:g}")
        eval_dir = out_dir / f"eval_{label}"
        for row in evaluate.run_eval(eval_config(config, checkpoints, heldout_path, eval_dir, temperature),
                                     grade_fn=exact_grader):
            rows.append({"model": row["checkpoint"], "n": row["n"], "temperature": temperature,
                         "accuracy": row["accuracy"], "tokens_per_problem": row["tokens_per_problem"],
                         "checks_per_problem": row["phrase_counts"][world.CHECK],
                         "truncation_rate": row["truncation_rate"], "answered_rate": row["answered_rate"],
                         "accuracy_by_position": row["accuracy_by_position"],
                         "accuracy_by_checks": accuracy_by_checks(_records(eval_dir, row), row["n"]),
                         "budget": row["budget"], "num_problems": row["num_problems"],
                         "num_responses": row["num_responses"]})

    curves = training_curves(run_dirs)
    plot_training(curves, out_dir / "toy_training.png")
    result = {
        "rows": rows,
        "workdir": str(workdir),
        "command": "python -m bcr_jax.main " + " ".join(sys.argv[1:]) if sys.argv and "main" in sys.argv[0]
        else "bcr_jax.toy.pipeline.run_toy",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(config.quick),
        "minutes": (time.perf_counter() - started) / 60,
        "redundancy_share": share,
        "settings": {"rl_steps": toy.rl_steps, "prompts_per_step": toy.prompts_per_step,
                     "samples_per_prompt": toy.samples_per_prompt, "budget": toy.budget,
                     "length_penalty": toy.length_penalty, "length_penalty_high": toy.length_penalty_high,
                     "eval_budget": toy.eval_budget, "eval_problems": toy.eval_problems, "eval_seed": toy.eval_seed,
                     "learning_rate": config.optim.learning_rate, "warm_start": str(warm_start),
                     "first_check_prob": toy.first_check_prob, "repeat_check_prob": toy.repeat_check_prob},
        "training": training_summary(curves),
    }
    result["claims"] = claims(rows, result["training"])
    paths.write_atomic(out_dir / "toy_replication.json", json.dumps(result, indent=1))
    paths.write_atomic(out_dir / "toy_replication.md", markdown(rows, share))
    paths.write_atomic(out_dir / "toy_scaling_law.png", (out_dir / "eval_t1" / "scaling_law.png").read_bytes())
    if toy.results_dir and registered:
        results = paths.resolve(toy.results_dir)
        for name in ("toy_replication.json", "toy_replication.md", "toy_training.png", "toy_scaling_law.png"):
            paths.write_atomic(results / name, (out_dir / name).read_bytes())
    _stage(f"done in {result['minutes']:.1f} min: {out_dir / 'toy_replication.md'}")
    print(markdown(rows, share), flush=True)
    return result
