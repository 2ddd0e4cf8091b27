"""XLA:CPU threading: our sampler and our update step under XLA's default flags and the chosen ones, run by run.

Run::

    python benchmarks/xla_threading.py [--runs 5] [--passes 5] [--wait-idle 90 | --load 1]
    python benchmarks/xla_threading.py --flags "conc0=--xla_cpu_enable_concurrency_optimized_scheduler=false"

Method
------
* Workloads: the sampler benchmark's first case (`benchmarks/sampling.py`: bench-qwen3, B=32 random prompts of 32
  tokens, 128 greedy new tokens, EOS off, fp32, `bcr_jax.sampling.generate`) and the update-step benchmark's step
  (`benchmarks/train_step.py`: bench-qwen3 untied, 16 x 256 tokens, fp32, the jitted GRPO update step + AdamW).
  Both reuse those scripts' workload and engine code, so the figures are theirs.
* Settings: `chosen` is what `bcr_jax.cpu_threading.configure()` adds when `XLA_FLAGS` is unset (the process
  calls it, as `python -m bcr_jax.main` does); `default` sets `XLA_FLAGS` to XLA's own values of the same flags
  (`cpu_threading.default_flags()`), which `configure` leaves alone; `--flags NAME=FLAGS` adds a setting run with
  exactly those flags. `transformers` (sampler: `generate`; step: the transformers + AdamW step) is a control:
  torch does not read XLA_FLAGS, so its figures show how much the machine itself drifted.
* A run starts one fresh process per setting, which builds its engine and makes two untimed warm-up calls
  (compilation), all at once; then `--passes` passes time one call of every process, one process at a time, the
  order rotating, with `perf_counter` until the tokens / loss are on the host (idle processes block on a pipe).
  Fresh processes per run, because the spread that matters is also between processes (the issue behind this saw
  one sampler benchmark give 1,758 to 3,061 tok/s in identical runs); interleaved passes, because the machine's
  own drift then hits every setting alike. `--wait-idle PCT` starts each pass only once the CPUs were that idle
  over 3 s; `--load N` instead keeps N busy-looping processes running throughout (another job on the cores).
* Reported per (workload, setting): each run's tok/s (the median of its passes), the median of the runs, their
  spread (slowest-fastest run) and its width relative to the median, the slowest and fastest single pass, and the
  median over every pass of the paired ratio default time / this setting's time (same run, same pass).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


HERE = Path(__file__).resolve().parent
MESSAGE = "@@"
WORKLOADS = ("sampler", "train_step")
STEP_BATCH, STEP_SEQ = 16, 256  # train_step.py's defaults


def _load(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_TRAIN_STEP = _load("train_step")  # its workload, engines, worker handle, idle wait and report helpers


# ------------------------------------------------------------------------------------------------ one run


def worker_main(workload: str, engine: str, scratch: Path) -> None:
    """A run's process for one setting: build the engine, warm up twice, then time one call per 'step' on stdin."""
    def emit(**message):
        print(MESSAGE + json.dumps(message), flush=True)

    if workload == "prepare":  # what every run loads, written once: the step's batch and weights, the sampler's model
        _TRAIN_STEP.make_workload(scratch, STEP_BATCH, STEP_SEQ, STEP_BATCH)
        sampling = _load("sampling")
        sampling.make_workload(sampling.CASES[0], scratch)
        return
    added = ()
    if engine == "ours-configured":  # `chosen`: XLA_FLAGS unset, configured as `python -m bcr_jax.main` does
        from bcr_jax import cpu_threading

        added = cpu_threading.configure()
        engine = "ours"
    if engine != "ours":
        import torch

        torch.set_num_threads(_TRAIN_STEP.CORES)
    if workload == "sampler":
        sampling = _load("sampling")
        case = sampling.CASES[0]
        w = sampling.make_workload(case, scratch)
        runner = sampling.ours(w) if engine == "ours" else sampling.hf_transformers(w)
        tokens = case.batch * case.new_tokens
    else:
        w = _TRAIN_STEP.load_workload(scratch)
        runner = _TRAIN_STEP.ENGINES["ours" if engine == "ours" else _TRAIN_STEP.REFERENCE](w)
        tokens = w.batch * w.seq
    runner()  # compiles
    runner()  # a step fed its own donated outputs may compile again
    emit(ready=True, tokens=tokens, added=list(added), xla_flags=os.environ.get("XLA_FLAGS", ""))
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        runner()
        emit(seconds=time.perf_counter() - start)


class Worker(_TRAIN_STEP.Worker):
    """The parent's handle on one setting's process (train_step.py's, started on this script's worker);
    `flags` None leaves XLA_FLAGS unset (the `chosen` path)."""

    def __init__(self, workload: str, setting: str, flags: str | None, scratch: Path):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        if flags is not None:
            env["XLA_FLAGS"] = flags
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("JAX_PLATFORMS", "cpu")
        engine = {"transformers": "transformers", "chosen": "ours-configured"}.get(setting, "ours")
        self.label, self.engine = f"{workload} / {setting}", engine
        self.log = scratch / f"{workload}_{setting}.log".replace(" ", "_")
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--run", workload, "--engine", engine, "--scratch",
             str(scratch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file, text=True, env=env)
        self.ready: dict | None = None
        self.error: str | None = None


# ------------------------------------------------------------------------------------------------ the runs


def parse_settings(text: str, extra: Sequence[str]) -> list[tuple[str, str | None]]:
    from bcr_jax import cpu_threading

    settings = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item == "default":
            settings.append((item, cpu_threading.default_flags()))
        elif item == "chosen":
            settings.append((item, None))
        elif item == "transformers":
            settings.append((item, ""))
        else:
            raise SystemExit(f"--settings: {item!r} is not default, chosen or transformers (see --flags)")
    for item in extra:
        name, sep, flags = item.partition("=")
        if not sep or not name or not flags.startswith("--"):
            raise SystemExit(f"--flags: {item!r} is not NAME=--xla_flag=value ...")
        settings.append((name, flags))
    return settings


def summarise(results: dict, ratios: dict, tokens: dict[str, int], settings: Sequence[str]) -> list[str]:
    lines = ["| workload | setting | tok/s, run by run (median of its passes) | median of runs | spread of runs "
             "(min-max) | spread / median | every pass (min-max) | x default (median of paired passes) |",
             "|---|---|---|---|---|---|---|---|"]
    for workload, by_setting in results.items():
        n = tokens[workload]
        for setting in settings:
            runs = by_setting.get(setting)
            if not runs:
                continue
            rates = [n / statistics.median(passes) for passes in runs]
            every = [n / s for passes in runs for s in passes]
            median = statistics.median(rates)
            paired = ratios[workload].get(setting)
            ratio = "1" if setting == "default" else (f"{statistics.median(paired):.2f}" if paired else "—")
            lines.append(f"| {workload} | {setting} | {' · '.join(f'{r:,.0f}' for r in rates)} | {median:,.0f} "
                         f"| {min(rates):,.0f}-{max(rates):,.0f} | {100 * (max(rates) - min(rates)) / median:.0f}% "
                         f"| {min(every):,.0f}-{max(every):,.0f} | {ratio} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per (workload, setting) (default 5)")
    parser.add_argument("--passes", type=int, default=5, help="interleaved timed calls per run (default 5)")
    parser.add_argument("--settings", default="default,chosen,transformers",
                        help="comma-separated subset of default, chosen, transformers (default: all three)")
    parser.add_argument("--flags", action="append", default=[], metavar="NAME=FLAGS",
                        help="another setting: ours with XLA_FLAGS=FLAGS exactly (repeatable)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="PCT",
                        help="start each pass once the CPUs were PCT%% idle over 3 s (at most --max-wait s)")
    parser.add_argument("--max-wait", type=float, default=300.0)
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="N busy-looping processes run throughout (another job sharing the cores)")
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return worker_main(args.run, args.engine, Path(args.scratch))
    if args.runs < 1 or args.passes < 1:
        parser.error("--runs and --passes must be >= 1")
    if args.load and args.wait_idle:
        parser.error("--load and --wait-idle exclude each other")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := [w for w in workloads if w not in WORKLOADS]:
        parser.error(f"--workloads: unknown {unknown}; choose from {WORKLOADS}")
    settings = parse_settings(args.settings, args.flags)
    _TRAIN_STEP.WAIT_IDLE.update(threshold=args.wait_idle / 100, max_wait_s=args.max_wait)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        measure(args, workloads, settings)
    finally:
        for process in busy:
            process.kill()
            process.wait()


def measure(args, workloads: Sequence[str], settings: Sequence[tuple[str, str | None]]) -> None:
    train_step = _TRAIN_STEP
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"Machine: {train_step.versions()}; 1-min load average {load_before:.1f}", flush=True)
    results: dict[str, dict[str, list[list[float]]]] = {w: {} for w in workloads}  # seconds per pass, per run
    ratios: dict[str, dict[str, list[float]]] = {w: {} for w in workloads}  # default / setting, pass by pass
    tokens: dict[str, int] = {}
    flags_seen: dict[str, str] = {}
    names = [name for name, _ in settings]
    with tempfile.TemporaryDirectory(prefix="bcr_xla_threading_") as scratch_name:
        scratch = Path(scratch_name)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", "prepare", "--scratch", str(scratch)],
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        for r in range(args.runs):
            for workload in workloads:
                workers = [Worker(workload, name, flags, scratch) for name, flags in settings]  # build concurrently
                try:
                    for worker, name in zip(workers, names):
                        worker.wait_ready()
                        if worker.error:
                            raise RuntimeError(f"{worker.label}: {worker.error}")
                        tokens[workload], flags_seen[name] = worker.ready["tokens"], worker.ready["xla_flags"]
                    times = {name: [] for name in names}
                    for p in range(args.passes):
                        waited = train_step.wait_for_idle()
                        k = (r * args.passes + p) % len(workers)
                        order = list(zip(workers, names))[k:] + list(zip(workers, names))[:k]
                        this_pass = {name: worker.step() for worker, name in order}
                        for name, seconds in this_pass.items():
                            times[name].append(seconds)
                            if "default" in this_pass:
                                ratios[workload].setdefault(name, []).append(this_pass["default"] / seconds)
                        print(f"  run {r + 1}/{args.runs} pass {p + 1}/{args.passes} {workload:<10} "
                              + "  ".join(f"{name} {tokens[workload] / s:,.0f}" for name, s in this_pass.items())
                              + f" tok/s{waited}", flush=True)
                finally:
                    for worker in workers:
                        worker.close()
                for name in names:
                    results[workload].setdefault(name, []).append(times[name])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### XLA:CPU threading ({date})",
        "",
        f"Machine: {train_step.versions()}; {train_step.source_state()}.",
        f"1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({train_step.CORES} cores).",
        f"{args.runs} runs per workload; a run starts one fresh process per setting (each builds its engine and "
        f"makes two untimed warm-up calls), then times {args.passes} passes of one call per process, the order "
        "rotating"
        + (f"; each pass started once the CPUs had been {args.wait_idle:.0f}% idle over 3 s" if args.wait_idle else "")
        + (f"; {args.load} busy-looping process(es) ran throughout, sharing the cores" if args.load else "")
        + ". XLA_FLAGS per setting: " + "; ".join(f"{n}: `{f or '(unset)'}`" for n, f in flags_seen.items()
                                                   if n != "transformers") + ".",
        "",
        *summarise(results, ratios, tokens, names),
    ]
    print()
    print("\n".join(lines))
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
