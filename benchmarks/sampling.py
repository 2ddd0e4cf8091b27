"""Sampling throughput: `bcr_jax.sampling.generate` against transformers `generate` (and tunix's `Sampler`).

Run::

    python benchmarks/sampling.py [--passes 3] [--quick]

Method
------
* Same model, same weights. Random-weight cases save `init_params` with `save_hf`; the SmolLM2 case uses the real
  checkpoint from `ensure_smollm2()`. Every engine loads that one HF directory: ours with `load_hf`, transformers
  with `AutoModelForCausalLM.from_pretrained`, tunix with its own safetensors loader
  (`tunix.models.{qwen3,llama3}.params.create_model_from_safe_tensors`). Everything runs in float32.
* Same work. Each case has a batch of B random prompts of exactly P tokens (ids in [1, vocab), so no prompt token
  equals the pad id 0 that tunix masks out) and asks for exactly N new tokens, greedily, with EOS disabled
  (ours: `eos_ids=()`; transformers: `do_sample=False, eos_token_id=None`; tunix: an EOS id of -1, which no token
  has). Every timed call is checked to return exactly N tokens per row.
* Sanity column: the fraction of rows whose N greedy tokens equal transformers' exactly, and in brackets the mean
  number of leading tokens that do (fp32 engines can still part ways at a near-tie of the top two logits, after
  which the row differs). Taken from the warm-up call.
* Timing. Each engine is built and warmed up once per case (the warm-up call compiles; it is not timed). Then, for
  each pass, every case runs every engine once, in turn (the engine order rotates from pass to pass); one call is
  timed end to end with `perf_counter` (prompts in, host token array out, so JAX's asynchronous dispatch is fully
  waited for). Engines never overlap: JAX work
  ends with a device-to-host copy before torch starts. Reported: the median tokens/s per engine (new tokens only,
  B * N / seconds), its spread (slowest-fastest pass), and the median over passes of the per-pass ratio engine /
  transformers, which cancels most of the drift of a noisy machine.
* FLOPs are counted analytically and include the prefill, since the timed call does too. Per row: every position
  that goes through the layers (the P prompt positions and the N - 1 fed-back new tokens) costs
  2 x (non-embedding matmul params); each of the N sampled tokens costs 2 x (lm_head params) (the prefill needs
  logits at its last position only); attention costs 4 x layers x heads x head_dim x (context length) per position,
  the context of position j (1-based) being j. These are the useful FLOPs; an engine that attends over a padded
  cache does more work than it is credited with.
* Peak: the best of several timings of a 2048 x 2048 float32 matmul, both as a jitted JAX function and as
  `torch.mm`, measured in the same run (before it and after every pass); the larger of the two is the machine's
  fp32 matmul peak for the "% peak" column.
* Threads: torch uses as many intra-op threads as this process may use cores; XLA's CPU backend uses all of them,
  with the project's threading flags (`bcr_jax.cpu_threading`, printed first) unless XLA_FLAGS names them. libgomp's default spin-waiting is left alone, because it is torch's best setting on an idle machine
  (measured here, idle: bench-qwen3 B=32 3,400-3,800 tok/s with the default, 1,750-1,900 with
  OMP_WAIT_POLICY=PASSIVE — PASSIVE would halve the reference and inflate every ratio). On a *loaded* machine,
  spin-waiting makes torch's 2-thread `generate` 7-20x slower; set `OMP_WAIT_POLICY=PASSIVE` in the environment
  there and say so. The 1-minute load average before and after the run is printed with the results: above the
  core count, other processes competed for the cores and the figures are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

import jax
import jax.numpy as jnp
import torch

from bcr_jax import cpu_threading
from bcr_jax.models import ModelConfig, get_preset, init_params, load_hf, read_hf_config, save_hf
from bcr_jax.sampling import generate
from bcr_jax.sharding import make_mesh
from bcr_jax.tools.smollm2 import ensure_smollm2

REFERENCE = "transformers"  # the engine every ratio and agreement is taken against
# init_params' default std (0.02) makes bench-qwen3's greedy rows repeat one token (1.75 distinct tokens per 128),
# which would make the agreement check vacuous; at 0.1 rows look random (~109 distinct). Speed does not depend on it.
RANDOM_INIT_STD = 0.1
# A plain `pip install google-tunix` would downgrade transformers and huggingface_hub (0.1.7 pins older ones); these
# are the packages its sampler and Qwen3/Llama3 models need at import time.
TUNIX_INSTALL = ("pip install --no-deps google-tunix google-metrax clu tensorboardX jaxtyping wadler-lindig "
                 "sentencepiece perfetto")


# ------------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration: a model (random preset or the real SmolLM2) and a batch shape."""

    label: str
    model: str  # a `get_preset` name with random weights, or "smollm2" for the real checkpoint
    batch: int
    prompt_len: int
    new_tokens: int


CASES = (
    Case("bench-qwen3 B=32", "bench-qwen3", batch=32, prompt_len=32, new_tokens=128),
    Case("bench-qwen3 B=8", "bench-qwen3", batch=8, prompt_len=32, new_tokens=128),
    Case("SmolLM2-135M B=8", "smollm2", batch=8, prompt_len=32, new_tokens=128),
    # A longer budget: attention over the cache, not the matmuls, starts to dominate (see generate's decode_blocks).
    Case("bench-qwen3 B=32 N=512", "bench-qwen3", batch=32, prompt_len=32, new_tokens=512),
)
QUICK_CASES = (CASES[1],)


@dataclasses.dataclass
class Workload:
    """A case made concrete: the HF directory every engine loads, its config, and the prompts."""

    case: Case
    cfg: ModelConfig
    hf_dir: Path
    prompts: np.ndarray  # [B, P] int, ids in [1, vocab)


def make_workload(case: Case, scratch: Path) -> Workload:
    if case.model == "smollm2":
        hf_dir = ensure_smollm2()
        cfg = read_hf_config(hf_dir)
    else:
        cfg = get_preset(case.model)
        hf_dir = scratch / case.model
        if not (hf_dir / "config.json").exists():
            save_hf(cfg, init_params(cfg, jax.random.key(0), std=RANDOM_INIT_STD), hf_dir)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, size=(case.batch, case.prompt_len))
    return Workload(case, cfg, Path(hf_dir), prompts)


def count_flops(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Useful FLOPs of one call, prefill included (see the module docstring)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * cfg.intermediate_size
    body_params = cfg.num_layers * per_layer  # q, o; k, v; gate, up, down
    lm_head_params = cfg.vocab_size * d
    positions = prompt_len + new_tokens - 1  # prompt, then every new token but the last is fed back
    context_sum = positions * (positions + 1) // 2  # position j attends to j positions
    per_row = (2 * body_params * positions + 2 * lm_head_params * new_tokens
               + 4 * cfg.num_layers * cfg.num_heads * hd * context_sum)
    return float(batch * per_row)


# ------------------------------------------------------------------------------------------------ engines
#
# An engine is a factory: Workload -> runner, where runner() generates the workload's continuations and returns
# them as a host int array [B, N]. A factory loads the model and may raise EngineUnavailable; the harness does the
# warm-up, checking and timing.

Runner = Callable[[], np.ndarray]


class EngineUnavailable(Exception):
    """The engine cannot run this workload here (missing package, unsupported architecture); the message says why."""


DECODE_BLOCKS = 4  # generate's decode_blocks for our engines (--decode-blocks)


def ours(w: Workload, mesh=None) -> Runner:
    _, params = load_hf(w.hf_dir, dtype="float32", mesh=mesh)
    prompts = w.prompts.tolist()

    def run() -> np.ndarray:
        out = generate(w.cfg, params, prompts, max_new_tokens=w.case.new_tokens, temperature=0.0, eos_ids=(),
                       pad_id=0, mesh=mesh, decode_blocks=DECODE_BLOCKS)
        if not np.all(out.lengths == w.case.new_tokens):
            raise AssertionError(f"ours: row lengths {sorted(set(out.lengths.tolist()))}, expected all "
                                 f"{w.case.new_tokens}")
        return np.asarray(out.token_array)

    return run


def hf_transformers(w: Workload) -> Runner:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(w.hf_dir, dtype=torch.float32).eval()
    # The checkpoint's generation_config.json names an EOS id; clear it so no row can stop early.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    input_ids = torch.from_numpy(w.prompts.astype(np.int64))
    attention_mask = torch.ones_like(input_ids)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=w.case.new_tokens, eos_token_id=None,
                                 pad_token_id=0)
        return out[:, w.case.prompt_len:].numpy()

    return run


def tunix(w: Workload) -> Runner:
    try:
        from tunix.generate import sampler as tunix_sampler
    except Exception as e:  # ImportError, or an API drift between tunix and the installed jax / flax
        raise EngineUnavailable(f"cannot import tunix ({type(e).__name__}: {e}); {TUNIX_INSTALL}") from e
    cfg = w.cfg
    common = {"num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "embed_dim": cfg.hidden_size,
              "hidden_dim": cfg.intermediate_size, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
              "num_kv_heads": cfg.num_kv_heads, "rope_theta": int(cfg.rope_theta), "norm_eps": cfg.rms_norm_eps}
    if cfg.rope_scaling:
        raise EngineUnavailable(f"tunix models implement plain RoPE only; this config has {dict(cfg.rope_scaling)}")
    if cfg.model_type == "qwen3":
        from tunix.models.qwen3 import model as model_lib
        from tunix.models.qwen3 import params as params_lib
        tcfg = model_lib.ModelConfig(**common, use_tied_embedding=cfg.tie_embeddings)
    elif cfg.model_type == "llama":
        from tunix.models.llama3 import model as model_lib
        from tunix.models.llama3 import params as params_lib
        tcfg = model_lib.ModelConfig(**common, weight_tying=cfg.tie_embeddings)
    else:
        raise EngineUnavailable(f"no tunix adapter here for model_type={cfg.model_type!r}")
    _bind_tunix_rope_theta(model_lib, cfg.rope_theta)
    model = params_lib.create_model_from_safe_tensors(str(w.hf_dir), tcfg, dtype=jnp.float32)
    cache = tunix_sampler.CacheConfig(cache_size=w.case.prompt_len + w.case.new_tokens, num_layers=cfg.num_layers,
                                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    engine = tunix_sampler.Sampler(model, _IdTokenizer(), cache)
    texts = [" ".join(map(str, row)) for row in w.prompts.tolist()]

    def run() -> np.ndarray:
        out = engine(texts, max_generation_steps=w.case.new_tokens, max_prompt_length=w.case.prompt_len,
                     eos_tokens=[-1], temperature=0.0)
        lengths = {len(row) for row in out.tokens}
        if lengths != {w.case.new_tokens}:
            raise AssertionError(f"tunix: row lengths {sorted(lengths)}, expected all {w.case.new_tokens}")
        return np.stack([np.asarray(row) for row in out.tokens])

    return run


def _bind_tunix_rope_theta(model_lib, rope_theta: float) -> None:
    """Works around a tunix bug (0.1.7): its Qwen3 and Llama3 attention call `apply_rope(x, pos, head_dim=...)`
    without the config's rope_theta, so RoPE always uses the default 1e6 (SmolLM2 needs 1e5: without this its
    outputs part from transformers' after the first token). Rebinding the module-level function fixes it for the
    next trace; an explicit rope_theta argument, should tunix ever pass one, still wins."""
    original = getattr(model_lib.apply_rope, "func", model_lib.apply_rope)
    model_lib.apply_rope = functools.partial(original, rope_theta=rope_theta)


class _IdTokenizer:
    """tunix's Sampler takes strings: this 'tokenizer' reads and writes space-separated token ids. bos_id 0 means
    no BOS is prepended; pad id 0 matches ours (prompts never contain it)."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: Sequence[int], **_) -> str:
        return " ".join(map(str, ids))

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def ours_data_parallel(w: Workload) -> Runner:
    """Ours with one XLA device per core and the rows split over the mesh's data axis: each core runs its own
    half-batch program, instead of every op spreading over the cores' shared intra-op thread pool."""
    if jax.device_count() < 2:
        raise EngineUnavailable("one CPU core: nothing to split")
    return ours(w, mesh=make_mesh(data=jax.device_count()))


ENGINES: dict[str, Callable[[Workload], Runner]] = {
    "ours": ours, "ours, 1 device/core": ours_data_parallel, REFERENCE: hf_transformers, "tunix": tunix}


# ------------------------------------------------------------------------------------------------ harness


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `fn()` (which must block until its work is done) over `repeats` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class MatmulPeak:
    """Best fp32 GFLOP/s seen for an n x n matmul, as a jitted JAX function and as `torch.mm`.

    `measure()` times `repeats` calls of each and keeps the best; it runs before the benchmark and after every pass,
    since a busy machine can only make the peak look lower.
    """

    def __init__(self, n: int = 2048, repeats: int = 10):
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        a_jax, b_jax, matmul = jnp.asarray(a), jnp.asarray(b), jax.jit(jnp.matmul)
        a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
        self._calls: dict[str, Callable[[], object]] = {
            "jax": lambda: matmul(a_jax, b_jax).block_until_ready(),
            "torch": lambda: torch.mm(a_torch, b_torch),
        }
        self._flops, self._repeats = 2.0 * n ** 3, repeats
        self.best = dict.fromkeys(self._calls, 0.0)

    def measure(self) -> None:
        for name, call in self._calls.items():
            self.best[name] = max(self.best[name], self._flops / best_seconds(call, self._repeats) / 1e9)


@dataclasses.dataclass
class Measured:
    """One (case, engine) cell: per-pass timings, or why it did not run."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)  # per pass: this engine's tok/s / reference's
    agree: float | None = None  # fraction of rows equal to the reference's tokens
    prefix: float | None = None  # mean length of the leading run of tokens equal to the reference's
    skipped: str | None = None


def agreement(tokens: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(fraction of rows equal to the reference's, mean number of leading tokens equal to the reference's)."""
    same = tokens == reference
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same.all(axis=1).mean()), float(prefix.mean())


def check_shape(name: str, tokens: np.ndarray, case: Case) -> None:
    if tokens.shape != (case.batch, case.new_tokens):
        raise AssertionError(f"{name}: got tokens of shape {tokens.shape}, expected {(case.batch, case.new_tokens)}")


def run_benchmark(cases: Sequence[Case], engines: dict[str, Callable[[Workload], Runner]], passes: int,
                  scratch: Path, after_pass: Callable[[], None] = lambda: None,
                  ) -> tuple[list[Workload], dict[tuple[str, str], Measured]]:
    """Builds and warms up every (case, engine), then times them in `passes` interleaved passes."""
    workloads = [make_workload(case, scratch) for case in cases]
    runners: dict[tuple[str, str], Runner] = {}
    results: dict[tuple[str, str], Measured] = {}
    for w in workloads:
        outputs: dict[str, np.ndarray] = {}
        for name, factory in engines.items():
            cell = results[w.case.label, name] = Measured()
            start = time.perf_counter()
            try:
                runner = factory(w)
                outputs[name] = runner()  # warm-up: compiles
            except EngineUnavailable as e:
                cell.skipped = str(e)
                print(f"  [{w.case.label}] {name}: skipped: {e}", flush=True)
                continue
            except Exception as e:  # a third-party engine failing must not sink the others
                if name in ("ours", REFERENCE):
                    raise
                cell.skipped = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                print(f"  [{w.case.label}] {name}: skipped after an error: {cell.skipped}", flush=True)
                continue
            check_shape(name, outputs[name], w.case)
            runners[w.case.label, name] = runner
            print(f"  [{w.case.label}] {name}: loaded + warm-up {time.perf_counter() - start:.1f} s", flush=True)
        for name, tokens in outputs.items():
            cell = results[w.case.label, name]
            cell.agree, cell.prefix = agreement(tokens, outputs[REFERENCE])

    names = list(engines)
    for p in range(passes):
        order = names[p % len(names):] + names[:p % len(names)]  # rotate, so no engine always runs first
        for w in workloads:
            times: dict[str, float] = {}
            for name in order:
                runner = runners.get((w.case.label, name))
                if runner is None:
                    continue
                start = time.perf_counter()
                tokens = runner()
                times[name] = time.perf_counter() - start
                check_shape(name, tokens, w.case)
                results[w.case.label, name].seconds.append(times[name])
            for name, seconds in times.items():
                results[w.case.label, name].ratios.append(times[REFERENCE] / seconds)  # tok/s ratio
            print(f"  pass {p + 1}/{passes} [{w.case.label}] "
                  + "  ".join(f"{n} {w.case.batch * w.case.new_tokens / s:,.0f} tok/s" for n, s in times.items()),
                  flush=True)
        after_pass()
    return workloads, results


# ------------------------------------------------------------------------------------------------ report


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{CORES} cores ({cpu}, {platform.machine()}), Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
            f"transformers {version('transformers')}, google-tunix {version('google-tunix')}, flax {version('flax')}")


def report(workloads: Sequence[Workload], results: dict[tuple[str, str], Measured], engines: Sequence[str],
           peak: dict[str, float], passes: int, load: tuple[float, float]) -> str:
    machine_peak = max(peak.values())
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Sampling throughput ({date})",
        "",
        f"Machine: {versions()}.",
        f"1-min load average: {load[0]:.1f} before, {load[1]:.1f} after the run ({CORES} cores).",
        (f"fp32 matmul peak (2048x2048, best of 10 timings before the run and after each pass): "
         f"JAX {peak['jax']:.1f} GFLOP/s, torch.mm {peak['torch']:.1f} GFLOP/s; % peak is against "
         f"{machine_peak:.1f} GFLOP/s."),
        (f"Greedy, EOS disabled, float32, exactly N new tokens per row; ours with decode_blocks={DECODE_BLOCKS}; "
         f"{passes} interleaved pass(es); tok/s = new "
         f"tokens / wall time of the whole call (prefill included), median over passes, spread = slowest-fastest "
         f"pass; "
         f"x {REFERENCE} = median of the per-pass ratios; GFLOP/s counts prefill + decode analytically; "
         f"rows = {REFERENCE}: fraction of rows with identical greedy tokens (mean leading tokens identical)."),
        "",
        f"| case | P | N | engine | tok/s | spread (min-max) | x {REFERENCE} | GFLOP/s | % peak | rows = {REFERENCE} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for w in workloads:
        c = w.case
        flops = count_flops(w.cfg, c.batch, c.prompt_len, c.new_tokens)
        for name in engines:
            cell = results[c.label, name]
            if cell.skipped is not None or not cell.seconds:
                notes.append(f"- {c.label}, {name}: not run: {cell.skipped or 'no timings'}")
                lines.append(f"| {c.label} | {c.prompt_len} | {c.new_tokens} | {name} | — | — | — | — | — | — |")
                continue
            seconds = statistics.median(cell.seconds)
            gflops = flops / seconds / 1e9
            ratio = "1" if name == REFERENCE else f"{statistics.median(cell.ratios):.2f}"
            agree = "—" if name == REFERENCE else f"{cell.agree:.2f} ({cell.prefix:.0f})"
            tokens = c.batch * c.new_tokens
            lines.append(f"| {c.label} | {c.prompt_len} | {c.new_tokens} | {name} | {tokens / seconds:,.0f} | "
                         f"{tokens / max(cell.seconds):,.0f}-{tokens / min(cell.seconds):,.0f} | {ratio} | {gflops:.1f} | "
                         f"{100 * gflops / machine_peak:.1f}% | {agree} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: Sequence[str] | None = None) -> None:
    global DECODE_BLOCKS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3, help="interleaved timing passes (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 pass of the batch-8 bench-qwen3 case")
    parser.add_argument("--cases", default="", help="comma-separated substrings: run only the cases whose label "
                        f"contains one (labels: {'; '.join(c.label for c in CASES)})")
    parser.add_argument("--decode-blocks", type=int, default=DECODE_BLOCKS,
                        help=f"generate's decode_blocks for our engines (default {DECODE_BLOCKS}; 1 = one cache block "
                        "of the whole budget)")
    args = parser.parse_args(argv)
    if args.passes < 1 or args.decode_blocks < 1:
        parser.error("--passes and --decode-blocks must be >= 1")
    DECODE_BLOCKS = args.decode_blocks
    passes = 1 if args.quick else args.passes
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        cases = tuple(c for c in cases if any(w in c.label for w in wanted))
        if not cases:
            parser.error(f"--cases {args.cases!r} matches none of: {'; '.join(c.label for c in CASES)}")

    # Before JAX's backend starts: the project's XLA:CPU threading (bcr_jax.cpu_threading), and one XLA host device
    # per core for the "ours, 1 device/core" engine, which shards the batch over them.
    threading_added = cpu_threading.configure()
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={CORES}"
    print(cpu_threading.describe(threading_added), flush=True)
    torch.set_num_threads(CORES)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    print(f"Machine: {versions()}; 1-min load average {load_before:.1f}", flush=True)
    peak = MatmulPeak()
    peak.measure()
    print(f"fp32 matmul peak: JAX {peak.best['jax']:.1f} GFLOP/s, torch {peak.best['torch']:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bcr_sampling_bench_") as scratch:
        workloads, results = run_benchmark(cases, ENGINES, passes, Path(scratch), after_pass=peak.measure)
    print()
    print(report(workloads, results, list(ENGINES), peak.best, passes, (load_before, os.getloadavg()[0])))
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
