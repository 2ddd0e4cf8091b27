"""The toy replication (`mode=toy`, the README's main job): warm start → three RL runs → the scaling-law evaluation.

1. Data: training problems from `toy.train_seed`, held-out evaluation problems from `toy.eval_seed` (never used to
   tune anything), written as local JSONL files the trainer and the evaluation read.
2. Warm start: the shipped one (`bcr_jax/toy/warm_start`, made by this project's `mode=sft`; rebuild it with
   `--config.toy.rebuild_warm_start=True`) or a fresh `mode=sft` run on verbose traces of an N mix.
3. RL with the real trainer, the same rollout budget (prompts x samples x steps) for every run:
   `grpo` (N = 1, a budget that fits verbose traces), `bcr` (N = 3, a shared budget that three verbose traces
   overflow), `length_penalty` (N = 1, reward - |y| / budget), and optionally `bcr_segment` (bcr with per-problem
   segment credit).
4. Evaluation on the held-out problems at every N of `toy.n_values`, at temperature 1 and greedy, one fixed budget
   per prompt; checks per problem are counted in the kept raw responses.
5. Results: `toy_replication.json` (rows per model x N x temperature), `toy_replication.md`, `toy_training.png`
   (per-step reward, tokens per problem, truncation, checks per problem) and the evaluation's `scaling_law.png`,
   in the workdir, copied to `toy.results_dir` when set.
"""

from __future__ import annotations

import copy
import datetime
import json
import pathlib
import shutil
import sys
import time

import numpy as np

from bcr_jax import evaluate, train
from bcr_jax.toy import world

WARM_START_DIR = pathlib.Path(__file__).resolve().parent / "warm_start"
MODELS = ("warm_start", "grpo", "bcr", "length_penalty", "bcr_segment")


def _stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


def toy_tokenizer_fields(config) -> None:
    config.tokenizer.kind = "chars"
    config.tokenizer.characters = world.ALPHABET
    config.tokenizer.words = world.WORDS
    config.data.template = "compact"
    config.rollout.thinking = "off"


def sft_config(config, data_path: pathlib.Path, workdir: pathlib.Path):
    sft = copy.deepcopy(config)
    sft.mode, sft.workdir = "sft", str(workdir)
    sft.model.hf_path, sft.model.preset = "", config.toy.model_preset
    sft.model.vocab_size = world.vocab_size()
    sft.sft.path = str(data_path)
    sft.sft.steps = config.toy.sft_steps
    return sft


def rl_config(config, name: str, warm_start: pathlib.Path, train_path: pathlib.Path, workdir: pathlib.Path):
    """The trainer config of one RL run; everything but N, the budget and the reward is shared."""
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
    run.train.count_text = world.CHECK
    if name == "grpo":
        run.data.problems_per_prompt, run.rollout.budget = 1, toy.grpo_budget
    elif name in ("bcr", "bcr_segment"):
        run.data.problems_per_prompt, run.rollout.budget = 3, toy.bcr_budget
        run.reward.credit = "segment" if name == "bcr_segment" else "sequence"
    elif name == "length_penalty":
        run.data.problems_per_prompt, run.rollout.budget = 1, toy.grpo_budget
        run.reward.length_penalty = toy.length_penalty
    else:
        raise ValueError(f"config.toy.runs: unknown run {name!r}; choose from {', '.join(MODELS[1:])}")
    return run


def eval_config(config, checkpoints: dict[str, str], heldout: pathlib.Path, workdir: pathlib.Path, temperature):
    ev = copy.deepcopy(config)
    ev.mode, ev.workdir = "eval", str(workdir)
    ev.eval.checkpoints = tuple(checkpoints.values())
    ev.eval.labels = tuple(checkpoints)
    ev.eval.benchmarks = (str(heldout),)
    ev.eval.n_values = tuple(config.toy.n_values)
    ev.eval.temperature, ev.eval.top_p = float(temperature), 1.0
    ev.eval.samples = config.toy.eval_samples if temperature > 0 else 1
    ev.eval.orderings = 1
    ev.eval.budget_rule, ev.eval.budget = "fixed", config.toy.eval_budget
    ev.eval.batch_prompts = 256
    return ev


def _checks_per_problem(eval_dir: pathlib.Path, row: dict) -> float:
    records = [json.loads(line) for line in (eval_dir / evaluate.CELLS_DIR / f"{row['cell']}.jsonl").read_text()
               .splitlines() if line]
    return float(np.mean([world.count_checks(r["response"]) for r in records]) / row["n"])


def training_curves(run_dirs: dict[str, pathlib.Path]) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
            for name, d in run_dirs.items()}


def plot_training(curves: dict[str, list[dict]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward/mean", "reward"), ("tokens/per_problem", "tokens per problem"),
              ("rollout/truncation_rate", "truncation rate"), ("rollout/count_per_problem", "checks per problem"),
              ("accuracy/instance", "accuracy (training rollouts)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r.get(key, np.nan) for r in rows], label=name)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], share: float) -> str:
    lines = [f"Held-out toy problems; verbose-trace redundancy (check lines) = {share:.0%} of warm-start-style "
             "tokens at N=1.", "",
             "| model | T | N | accuracy | tokens / problem | checks / problem | truncated | accuracy by position |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        positions = " / ".join(f"{a:.0%}" for a in r["accuracy_by_position"])
        lines.append(f"| {r['model']} | {r['temperature']:g} | {r['n']} | {r['accuracy']:.1%} | "
                     f"{r['tokens_per_problem']:.1f} | {r['checks_per_problem']:.2f} | {r['truncation_rate']:.0%} | "
                     f"{positions} |")
    return "\n".join(lines) + "\n"


def run_toy(config) -> dict:
    toy = config.toy
    if config.quick:
        toy.rl_steps, toy.eval_problems, toy.sft_steps = toy.quick_rl_steps, toy.quick_eval_problems, toy.quick_sft_steps
        toy.eval_samples = min(toy.eval_samples, 2)
        toy.prompts_per_step = toy.quick_prompts_per_step
        toy.results_dir = ""  # a quick run never overwrites the full run's results
    for name in toy.runs:
        if name not in MODELS[1:]:
            raise train.ConfigError(f"config.toy.runs: unknown run {name!r}; choose from {', '.join(MODELS[1:])}")
    toy_tokenizer_fields(config)
    workdir = pathlib.Path(config.workdir)
    if config.quick:  # never mix a quick run's files with a full run's
        workdir = workdir.with_name(workdir.name + "_quick")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _stage("data: training and held-out problems")
    train_path = world.write_problems(workdir / "data" / "train.jsonl",
                                      world.make_problems(toy.train_problems, toy.train_seed, "train"))
    heldout_path = world.write_problems(workdir / "data" / "heldout.jsonl",
                                        world.make_problems(toy.eval_problems, toy.eval_seed, "heldout"))
    share = world.redundancy_share(n=1, seed=toy.train_seed)
    print(f"{toy.train_problems} training problems, {toy.eval_problems} held-out; checks are {share:.0%} of a "
          "verbose N=1 trace", flush=True)

    _stage("warm start")
    if toy.rebuild_warm_start or not (WARM_START_DIR / "config.json").is_file():
        from bcr_jax import sft

        sft_data = world.write_sft_data(workdir / "data" / "sft.jsonl", toy.sft_examples, toy.train_seed + 1,
                                        {int(k): float(v) for k, v in toy.sft_n_mix})
        warm_start = sft.run_sft(sft_config(config, sft_data, workdir / "warm_start"))
    else:
        warm_start = WARM_START_DIR
        print(f"using the shipped warm start {warm_start} (rebuild: --config.toy.rebuild_warm_start=True)")

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
        eval_dir = workdir / f"eval_{label}"
        for row in evaluate.run_eval(eval_config(config, checkpoints, heldout_path, eval_dir, temperature)):
            rows.append({"model": row["checkpoint"], "n": row["n"], "temperature": temperature,
                         "accuracy": row["accuracy"], "tokens_per_problem": row["tokens_per_problem"],
                         "checks_per_problem": _checks_per_problem(eval_dir, row),
                         "truncation_rate": row["truncation_rate"], "answered_rate": row["answered_rate"],
                         "accuracy_by_position": row["accuracy_by_position"], "budget": row["budget"],
                         "num_problems": row["num_problems"], "num_responses": row["num_responses"]})

    curves = training_curves(run_dirs)
    plot_training(curves, workdir / "toy_training.png")
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
                     "samples_per_prompt": toy.samples_per_prompt, "grpo_budget": toy.grpo_budget,
                     "bcr_budget": toy.bcr_budget, "length_penalty": toy.length_penalty,
                     "eval_budget": toy.eval_budget, "eval_problems": toy.eval_problems, "eval_seed": toy.eval_seed,
                     "learning_rate": config.optim.learning_rate, "warm_start": str(warm_start)},
        "training": {name: {key: float(np.mean([r[key] for r in rows_[-10:]])) for key in
                            ("reward/mean", "tokens/per_problem", "rollout/truncation_rate",
                             "rollout/count_per_problem", "accuracy/instance")}
                     for name, rows_ in curves.items()},
    }
    (workdir / "toy_replication.json").write_text(json.dumps(result, indent=1))
    (workdir / "toy_replication.md").write_text(markdown(rows, share))
    shutil.copy2(workdir / "eval_t1" / "scaling_law.png", workdir / "toy_scaling_law.png")
    if toy.results_dir:
        results = pathlib.Path(toy.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        for name in ("toy_replication.json", "toy_replication.md", "toy_training.png", "toy_scaling_law.png"):
            shutil.copy2(workdir / name, results / name)
    _stage(f"done in {result['minutes']:.1f} min: {workdir / 'toy_replication.md'}")
    print(markdown(rows, share), flush=True)
    return result
