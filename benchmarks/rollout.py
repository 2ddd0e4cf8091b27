"""Rollout throughput on a long-tailed workload: the slot engine against the static sampler in waves and against
transformers continuous batching.

    python benchmarks/rollout.py [--passes 3] [--slots 8] [--budget 256]     # CPU, float32, bench-qwen3
    python benchmarks/rollout.py --gpu                                        # an accelerator host (see below)

Workload. rows = 4 x slots prompts of `--prompt-len` random tokens, one sample each, greedy, EOS disabled. Row i
ends after L_i tokens: the rows' evenly spaced quantiles of a lognormal(0, 1), scaled so the mean is 0.3 x budget
after clipping to [1, budget] (median ~0.2 x budget; the top ~5% of rows run to the budget), seeded order. Rows
end at their preset position through a per-row budget (`sampling.generate(budgets=...)`; transformers: the
request's `max_new_tokens`), the same as an EOS emitted there. Useful tokens = sum of L_i; no engine is credited
with anything past a row's end.

Engines, each with the same number of rows in flight (`--slots`):
* engine: `sampling.generate(max_rows_in_flight=slots)`, every row in one call; a slot is refilled when its row ends.
* static waves: today's static sampler (`sampling.generate`, decode_blocks=4) called on consecutive waves of `slots`
  rows: each wave runs until its longest row ends.
* transformers CB: `ContinuousBatchingManager` (what `generate_batch` runs) with `max_requests_per_batch=slots`,
  one request per row with max_new_tokens = L_i; the manager is started once, outside the timing.

Exactness column: rows whose tokens equal the static sampler's (greedy; from the warm-up call).

Timing. One warm-up call per engine (compiles), then `--passes` interleaved passes (engine order rotates); each
call is timed end to end (prompts in, host tokens out). Reported: median useful tokens/s, spread (slowest-fastest),
and the median per-pass ratio to the static sampler and to transformers CB.

GPU (`--gpu`): the same workload on a 1.5B-shaped model (deepseek-r1-distill-qwen-1.5b's shapes) with random bf16
weights, default slots 64 / budget 1024 / prompt 128 / 2 passes, plus a decode roofline: the engine's decode steps
(rows / slots ... measured from its own useful tokens) against (weight bytes + KV bytes of all slots at the full
cache) / HBM copy bandwidth measured on the device. Imports only jax, numpy, bcr_jax's model and sampler, and
(for the transformers column) torch + transformers; finishes in a few minutes on an H200.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def lengths_for(rows: int, budget: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed preset lengths: the rows' evenly spaced quantiles of a lognormal(0, 1) (so every run and row count
    gets the same shape, not a lucky draw), scaled so that the mean is 0.3 x budget after clipping to [1, budget]
    (the top few per cent of rows run to the budget), in a seeded random order."""
    x = np.exp([statistics.NormalDist().inv_cdf(p) for p in (np.arange(rows) + 0.5) / rows])
    lengths = lambda scale: np.clip(np.ceil(scale * x), 1, budget)
    low, high = 0.0, float(budget)
    for _ in range(60):  # the mean grows with the scale: bisect for 0.3 x budget
        mid = (low + high) / 2
        low, high = (mid, high) if lengths(mid).mean() < 0.3 * budget else (low, mid)
    return np.random.default_rng(seed).permutation(lengths(high)).astype(np.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="accelerator defaults: 1.5B shapes, bf16 (see docstring)")
    parser.add_argument("--passes", type=int, default=None, help="interleaved passes (3; 2 with --gpu)")
    parser.add_argument("--slots", type=int, default=None, help="rows in flight (8; 64 with --gpu)")
    parser.add_argument("--budget", type=int, default=None, help="max new tokens (256; 1024 with --gpu)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (32; 128 with --gpu)")
    parser.add_argument("--model", default=None, help="preset (bench-qwen3; deepseek-r1-distill-qwen-1.5b with --gpu)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers CB column")
    args = parser.parse_args(argv)
    gpu = args.gpu
    passes = args.passes or (2 if gpu else 3)
    slots = args.slots or (64 if gpu else 8)
    budget = args.budget or (1024 if gpu else 256)
    prompt_len = args.prompt_len or (128 if gpu else 32)
    model_name = args.model or ("deepseek-r1-distill-qwen-1.5b" if gpu else "bench-qwen3")
    dtype = "bfloat16" if gpu else "float32"
    if not gpu:
        from bcr_jax import cpu_threading

        print(cpu_threading.describe(cpu_threading.configure()), flush=True)

    import jax

    from bcr_jax import models, sampling

    rows = 4 * slots
    lengths = lengths_for(rows, budget)
    cfg = models.get_preset(model_name, dtype=dtype)
    prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(rows, prompt_len)).tolist()
    useful = int(lengths.sum())
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} {jax.devices()[0].device_kind}; jax {jax.__version__}; "
          f"model {model_name} {dtype} random weights; rows {rows}, slots {slots}, prompt {prompt_len}, budget {budget}; "
          f"lengths mean {lengths.mean():.0f} ({lengths.mean() / budget:.2f} x budget), median {np.median(lengths):.0f}, "
          f"{int((lengths == budget).sum())} at the budget; useful tokens {useful}; load {os.getloadavg()[0]:.1f}",
          flush=True)
    params = models.init_params(cfg, jax.random.key(0), std=0.1)

    def engine():
        out = sampling.generate(cfg, params, prompts, max_new_tokens=budget, budgets=lengths, eos_ids=(),
                                max_rows_in_flight=slots)
        return out.tokens

    def static_waves():
        tokens = []
        for start in range(0, rows, slots):
            out = sampling.generate(cfg, params, prompts[start:start + slots], max_new_tokens=budget,
                                    budgets=lengths[start:start + slots], eos_ids=())
            tokens += out.tokens
        return tokens

    engines = {"engine": engine, "static waves": static_waves}
    scratch = tempfile.TemporaryDirectory(prefix="bcr_rollout_bench_")
    stop = []
    if not args.no_transformers:
        engines["transformers CB"] = _transformers_cb(cfg, params, prompts, lengths, slots, budget, gpu,
                                                      Path(scratch.name), stop)

    try:
        seconds, agreement, names = _measure(engines, lengths, passes)
    finally:
        for s in stop:  # the transformers manager's thread would keep the process alive
            s()

    def ratio(name, against):
        return statistics.median(a / b for a, b in zip(seconds[against], seconds[name])) if against in seconds else None

    print(f"\n| engine | useful tok/s | spread (min-max) | x static waves | x transformers CB | rows = static |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rates = [useful / s for s in seconds[name]]
        vs_hf = ratio(name, "transformers CB")
        print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
              f"{ratio(name, 'static waves'):.2f} | {'-' if vs_hf is None else f'{vs_hf:.2f}'} | "
              f"{agreement[name]:.0%} |")
    print(f"(load average after: {os.getloadavg()[0]:.1f})")
    if gpu:
        _roofline(cfg, params, slots, prompt_len, budget, useful, statistics.median(seconds["engine"]))


def _measure(engines, lengths, passes):
    seconds = {name: [] for name in engines}
    warm = {}
    for name, run in engines.items():  # warm-up: compiles; its tokens give the agreement column
        start = time.perf_counter()
        warm[name] = run()
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        assert [len(t) for t in warm[name]] == lengths.tolist(), name
    agreement = {name: _agree(tokens, warm["static waves"]) for name, tokens in warm.items()}
    names = list(engines)
    for p in range(passes):
        for name in names[p % len(names):] + names[:p % len(names)]:
            start = time.perf_counter()
            engines[name]()
            seconds[name].append(time.perf_counter() - start)
        print(f"pass {p + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names), flush=True)
    return seconds, agreement, names


def _agree(tokens, reference) -> float:
    return float(np.mean([a == b for a, b in zip(tokens, reference)]))


def _transformers_cb(cfg, params, prompts, lengths, slots, budget, gpu, scratch: Path, stop: list):
    """transformers continuous batching on the same weights (saved with save_hf), one request per row."""
    import torch
    import transformers
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingConfig

    from bcr_jax import models

    transformers.utils.logging.disable_progress_bar()
    models.save_hf(cfg, params, scratch / "model")
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(scratch / "model", dtype=dtype).eval().to(device)
    generation_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=budget, eos_token_id=None,
                                                      pad_token_id=0)
    manager = model.init_continuous_batching(
        generation_config=generation_config,
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=slots))
    manager.start()
    stop.append(lambda: manager.stop(block=True, timeout=10))
    calls = [0]

    def run():
        calls[0] += 1
        ids = [manager.add_request(p, request_id=f"c{calls[0]}r{i}", max_new_tokens=int(n))
               for i, (p, n) in enumerate(zip(prompts, lengths))]
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result.generated_tokens
        return [list(results[i]) for i in ids]

    return run


def _roofline(cfg, params, slots, prompt_len, budget, useful, engine_seconds) -> None:
    """The slot engine's decode against the HBM roofline: every step reads the weights once and every slot's whole
    cache (prompt bucket + budget; the engine attends over all of it, masked)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1 << 29,), jnp.float32)  # 2 GiB
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    bandwidth = 2 * x.nbytes / statistics.median(times)
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    itemsize = jnp.dtype(cfg.jnp_dtype).itemsize
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    cache_bytes = slots * (prompt_len + budget) * kv_per_token
    step_seconds = (weight_bytes + cache_bytes) / bandwidth
    roofline_rate = slots / step_seconds  # every slot busy every step
    rate = useful / engine_seconds
    print(f"\nHBM copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights {weight_bytes / 2**30:.2f} GiB, all slots' cache "
          f"{cache_bytes / 2**30:.2f} GiB -> roofline step {step_seconds * 1e3:.2f} ms = {roofline_rate:,.0f} tok/s "
          f"at {slots} slots; engine {rate:,.0f} useful tok/s (prefill and refills included) = "
          f"{rate / roofline_rate:.0%} of the roofline")


if __name__ == "__main__":
    sys.exit(main())
