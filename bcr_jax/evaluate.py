"""The task-scaling-law evaluation (`mode=eval`) and batch solving of unlabelled problems (`mode=solve`).

The paper's central table: for each checkpoint, benchmark and N, pack the benchmark N problems per prompt, sample
under one response budget per prompt, and report accuracy and tokens per problem as N grows.

Packing
-------
Each of `eval.orderings` orderings lists every problem of the benchmark once: ordering 0 is the benchmark's own
order, ordering r >= 1 a permutation seeded by (`eval.seed`, r). Consecutive runs of N problems of an ordering form
the prompts, so every problem is evaluated once per ordering and, across orderings, at different positions. The
orderings do not depend on N or on the checkpoint: every checkpoint sees the same prompts (a paired comparison).

The last prompt of an ordering is *padded*: when the benchmark size is not a multiple of N, it is completed with
problems from the start of the same ordering. Those fillers are answered and graded like any other (the raw
responses keep them) but never counted, so every prompt holds exactly N problems under the same budget and every
problem counts exactly once per ordering. N may not exceed the benchmark's size.

Figures per cell (checkpoint x benchmark x N), over all orderings and `eval.samples` samples per prompt:

* accuracy: correct counted answers / counted problem slots (pass@1 averaged over samples);
* tokens_per_problem: mean over responses of response tokens / N (EOS included; every prompt holds N problems);
* truncation_rate: responses cut off by the budget / responses;
* answered_rate: counted slots with a well-formed answer (`bcr.split_answers` not None) / counted slots;
* accuracy_by_position: accuracy of the counted slots at position k = 1..N within the prompt.

Budget per prompt (`eval.budget_rule`): `fixed` = `eval.budget` whatever N, `per_problem` = `eval.budget_per_problem`
x N.

The harness only talks to a *policy*, `GenerateFn(prompt_texts, *, n, budget, samples, seed)` returning, per
prompt, `samples` `Completion`s. `ModelPolicy` is the real one (chat template, `sampling.generate`); tests plug
in scripted doubles.

Files in `config.workdir`: `scaling_law.{json,csv,md,png}`, and `eval_cells/<hash>.json` (a finished cell's key and
figures) with `eval_cells/<hash>.jsonl` (its raw responses: problem ids, golds, response text, answers, verdicts and
reasons, lengths, truncation). A cell whose `.json` exists is never sampled again (resume after an interruption);
`rescore(workdir)` (or `eval.rescore=True`) re-parses and re-grades the raw responses of the table's cells without
sampling. The cell hash covers everything that changes the samples: the checkpoint (its path and step), the
benchmark's problems, N, the budget, the sampling knobs, the seed, the prompt template and the answer parser.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from bcr_jax import bcr, build, paths
from bcr_jax.build import ConfigError

CELLS_DIR = "eval_cells"
OUTPUT_STEM = "scaling_law"
BUDGET_RULES = ("fixed", "per_problem")
# Bumped when the meaning of a cached cell changes, so old caches are not silently reused.
_CELL_FORMAT = 1
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_STEP_SUFFIX = re.compile(r"^(?P<path>.+)@(?P<step>\d+)$")


# ------------------------------------------------------------------------------------------------ the policy

class Completion(NamedTuple):
    """One sampled response: its text (special tokens removed), its length in tokens, and whether the budget cut
    it off."""

    text: str
    num_tokens: int
    truncated: bool


class GenerateFn(Protocol):
    def __call__(self, prompt_texts: Sequence[str], *, n: int, budget: int, samples: int,
                 seed: int) -> list[list[Completion]]:
        """Samples `samples` responses for each packed user message (`n` problems each) with at most `budget`
        response tokens; returns one list of `samples` completions per prompt, in order."""
        ...


GradeFn = Callable[[Sequence[str], Sequence[str]], list[tuple[bool, str]]]


class ModelPolicy:
    """A `GenerateFn` over a loaded model: chat template (`tokenizer.build_chat_prompt`), then `sampling.generate`
    for all prompts of a call in one batch."""

    def __init__(self, cfg, params, tokenizer, *, mesh=None, temperature: float, top_p: float, top_k: int = 0,
                 thinking: str = "auto", decode_blocks: int = 4):
        self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.thinking, self.decode_blocks = thinking, decode_blocks

    def encode(self, text: str) -> list[int]:
        from bcr_jax import tokenizer as tokenizer_lib

        return tokenizer_lib.build_chat_prompt(self.tokenizer, text, thinking=self.thinking)

    def check_fits(self, prompt_texts: Sequence[str], budget: int) -> None:
        """Fails before sampling if a prompt cannot be tokenized, or a prompt plus the budget exceeds the model's
        positions."""
        try:
            longest = max(len(self.encode(text)) for text in prompt_texts)
        except ValueError as e:  # e.g. a character outside a CharTokenizer's alphabet
            raise ConfigError(f"config.tokenizer: cannot encode a prompt: {e}") from None
        if longest + budget > self.cfg.max_position_embeddings:
            raise ConfigError(f"config.eval.budget / budget_per_problem: the longest prompt ({longest} tokens) + "
                              f"budget {budget} exceeds max_position_embeddings={self.cfg.max_position_embeddings}")

    def __call__(self, prompt_texts, *, n, budget, samples, seed):
        from bcr_jax import sampling

        del n  # the prompt text says how many problems it holds
        out = sampling.generate(
            self.cfg, self.params, [self.encode(text) for text in prompt_texts], max_new_tokens=budget,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, eos_ids=self.tokenizer.eos_ids,
            pad_id=self.tokenizer.pad_id, seed=seed, num_samples=samples, mesh=self.mesh,
            decode_blocks=self.decode_blocks)
        rows = [Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), int(length), bool(truncated))
                for tokens, length, truncated in zip(out.tokens, out.lengths, out.truncated)]
        return [rows[i * samples:(i + 1) * samples] for i in range(len(prompt_texts))]


# ------------------------------------------------------------------------------------------- config → settings

@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The validated `config.eval` knobs (and the few other sections evaluation reads)."""

    n_values: tuple[int, ...]
    orderings: int
    samples: int
    temperature: float
    top_p: float
    top_k: int
    budget_rule: str
    budget: int
    budget_per_problem: int
    batch_prompts: int
    seed: int
    template_name: str
    thinking: str
    require_think_close: bool
    count_phrases: tuple[str, ...] = ()

    @property
    def template(self) -> bcr.PromptTemplate:
        return bcr.TEMPLATES[self.template_name]

    def budget_for(self, n: int) -> int:
        """Response tokens allowed for one prompt of `n` problems."""
        return self.budget if self.budget_rule == "fixed" else self.budget_per_problem * n


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"config.{key}: expected an integer >= 1, got {value!r}")
    return int(value)


def settings_from_config(config, *, n_values: Sequence[int] | None = None) -> EvalSettings:
    """Checks `config.eval` (and the template / rollout knobs it uses); every bad value raises `ConfigError`
    naming its key."""
    ev = config.eval
    if n_values is None:
        n_values = tuple(ev.n_values)
        if not n_values:
            raise ConfigError("config.eval.n_values: empty; give at least one N, e.g. (1, 2, 3)")
        n_values = tuple(_positive_int(n, f"eval.n_values (N={n!r})") for n in n_values)
        if len(set(n_values)) != len(n_values):
            raise ConfigError(f"config.eval.n_values: duplicates in {n_values}")
    if ev.budget_rule not in BUDGET_RULES:
        raise ConfigError(f"config.eval.budget_rule: {ev.budget_rule!r}; choose {' or '.join(BUDGET_RULES)}")
    budget = _positive_int(ev.budget, "eval.budget")
    budget_per_problem = _positive_int(ev.budget_per_problem, "eval.budget_per_problem")
    if not ev.temperature >= 0:
        raise ConfigError(f"config.eval.temperature: {ev.temperature!r}; expected >= 0 (0 = greedy)")
    if not 0 < ev.top_p <= 1:
        raise ConfigError(f"config.eval.top_p: {ev.top_p!r}; expected in (0, 1]")
    if config.rollout.top_k < 0:
        raise ConfigError(f"config.rollout.top_k: {config.rollout.top_k!r}; expected >= 0 (0 = off)")
    if config.data.template not in bcr.TEMPLATES:
        raise ConfigError(f"config.data.template: {config.data.template!r}; choose from {', '.join(bcr.TEMPLATES)}")
    if config.rollout.thinking not in ("auto", "force", "off"):
        raise ConfigError(f"config.rollout.thinking: {config.rollout.thinking!r}; choose auto, force or off")
    phrases = ev.get("count_phrases", ())
    if isinstance(phrases, str) or not all(isinstance(x, str) and x.strip() for x in phrases):
        raise ConfigError(f"config.eval.count_phrases: expected a tuple of non-empty strings, got {phrases!r}")
    return EvalSettings(
        count_phrases=tuple(phrases), n_values=tuple(n_values),
        orderings=_positive_int(ev.orderings, "eval.orderings"),
        samples=_positive_int(ev.samples, "eval.samples"), temperature=float(ev.temperature), top_p=float(ev.top_p),
        top_k=int(config.rollout.top_k), budget_rule=ev.budget_rule, budget=budget,
        budget_per_problem=budget_per_problem, batch_prompts=_positive_int(ev.batch_prompts, "eval.batch_prompts"),
        seed=int(ev.seed), template_name=config.data.template, thinking=config.rollout.thinking,
        require_think_close=bool(config.rollout.require_think_close))


# -------------------------------------------------------------------------------------------------- benchmarks

@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A named problem list; `fingerprint` changes whenever a problem, gold or id does."""

    name: str
    problems: tuple  # tuple[data.Problem, ...]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for p in self.problems:
            digest.update(json.dumps([p.id, p.text, p.gold]).encode())
        return digest.hexdigest()[:16]


def _load_local(path: pathlib.Path, spec, key: str, *, limit: int | None, display: str) -> tuple:
    from bcr_jax import data

    if path.suffix.lower() not in _LOCAL_SUFFIXES:
        raise ConfigError(f"config.{key}: {path} is not a {'/'.join(_LOCAL_SUFFIXES)} file")
    if not path.is_file():
        raise ConfigError(f"config.{key}: {path} does not exist")
    try:
        return tuple(data.load_problems(spec, path, limit=limit))
    except (ValueError, data.MalformedRowError) as e:
        raise ConfigError(f"config.{key} ({display}): {e}") from None


def load_benchmark(entry: str, config, index: int = 0) -> Benchmark:
    """One `eval.benchmarks` entry: a `data.SOURCES` name (from the hub), `<name>=<path>` (a local copy of a
    registered source, read with its field names), `synthetic:<generator>` (`eval.num_problems` problems, seeded
    by `eval.seed`), or a local .jsonl/.json/.parquet path whose fields are `eval.problem_field` /
    `eval.answer_field` (default `problem` / `answer`)."""
    from bcr_jax import data
    from bcr_jax.data import synthetic

    key = f"eval.benchmarks[{index}]"
    limit = config.eval.limit or None
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"config.{key}: expected a benchmark name or path, got {entry!r}")
    if synthetic.is_synthetic(entry):
        try:
            problems = synthetic.generate_problems(entry, _positive_int(config.eval.num_problems, "eval.num_problems"),
                                                   seed=config.eval.seed)
        except ValueError as e:
            raise ConfigError(f"config.{key}: {e}") from None
        return Benchmark(entry, tuple(problems[:limit]))
    name, _, local_copy = entry.partition("=")
    if local_copy and name in data.SOURCES:
        path = pathlib.Path(local_copy).expanduser()
        return Benchmark(name, _load_local(path, data.SOURCES[name], key, limit=limit, display=entry))
    if entry in data.SOURCES:
        try:
            return Benchmark(entry, tuple(data.load_problems(entry, limit=limit)))
        except (ValueError, data.MalformedRowError) as e:
            raise ConfigError(f"config.{key} ({entry}): {e}") from None
        except (ConnectionError, OSError) as e:  # offline: say how to use a local copy instead
            raise ConfigError(f"config.{key} ({entry}): cannot read {data.SOURCES[entry].hub_name} from the hub "
                              f"({type(e).__name__}: {e}); give a local copy as '{entry}=<path>'") from None
    path = pathlib.Path(entry).expanduser()
    if path.suffix.lower() in _LOCAL_SUFFIXES or path.exists():
        spec = data.SourceSpec(str(path), "train", None, config.eval.problem_field or "problem",
                               config.eval.answer_field or "answer")
        return Benchmark(path.stem, _load_local(path, spec, key, limit=limit, display=str(path)))
    raise ConfigError(f"config.{key}: unknown benchmark {entry!r}; use a registered source "
                      f"({', '.join(data.SOURCES)}), <source>=<local file>, synthetic:<generator> "
                      f"({', '.join(synthetic.PREFIX + g for g in synthetic.GENERATORS)}), "
                      f"or a local {'/'.join(_LOCAL_SUFFIXES)} file")


def load_benchmarks(config, n_values: Sequence[int]) -> list[Benchmark]:
    """Every `eval.benchmarks` entry, checked to hold at least max(N) problems, with distinct names."""
    entries = tuple(config.eval.benchmarks)
    if not entries:
        raise ConfigError("config.eval.benchmarks: empty; name at least one benchmark")
    benchmarks = [load_benchmark(entry, config, i) for i, entry in enumerate(entries)]
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.eval.benchmarks: two benchmarks are named alike in {names}")
    for i, benchmark in enumerate(benchmarks):
        if max(n_values) > len(benchmark.problems):
            raise ConfigError(f"config.eval.n_values: N={max(n_values)} exceeds the {len(benchmark.problems)} "
                              f"problems of config.eval.benchmarks[{i}] ({benchmark.name})")
    return benchmarks


# ------------------------------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """What to load: kind "config" (the config's own model), "hf" (an HF directory) or "run" (a training run's
    workdir at `step`, None = its latest). `key` identifies the weights in cell hashes."""

    label: str
    kind: str
    path: str = ""
    step: int | None = None

    @property
    def key(self) -> str:
        if self.kind == "config":
            return f"config:{self.path}"
        return f"{self.kind}:{self.path}" + ("" if self.step is None else f"@{self.step}")


def _run_steps(workdir: paths.Path) -> list[int]:
    """Finished steps under `workdir/checkpoints/` (numbered sub-directories, orbax's layout; on GCS a step's
    directory exists before orbax's commit file marks it finished)."""
    from orbax.checkpoint import step as ocp_step

    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit() and p.is_dir() and ocp_step.is_path_finalized(p))


def resolve_checkpoint(entry: str, key: str) -> CheckpointSpec:
    """An `eval.checkpoints` / `solve.checkpoint` entry: an HF directory (with config.json), or a training run's
    workdir (with a `checkpoints/` folder), optionally `workdir@step`. Nothing is loaded."""
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"config.{key}: expected a directory, got {entry!r}")
    match = _STEP_SUFFIX.match(entry)
    path_text, step = (match["path"], int(match["step"])) if match else (entry, None)
    path = paths.resolve(path_text)
    if not path.is_dir():
        raise ConfigError(f"config.{key}: {path} does not exist (expected an HF checkpoint directory or a "
                          f"training run's workdir)")
    resolved = str(path if paths.is_remote(path) else pathlib.Path(path).resolve())
    # A run's workdir holds a config.json too (the run's config), so its checkpoints/ folder is what tells them apart.
    if (path / "checkpoints").is_dir():
        steps = _run_steps(path)
        if not steps:
            raise ConfigError(f"config.{key}: {path} is a training run without a saved checkpoint yet")
        if step is None:
            step = steps[-1]  # pinned now, so the cache key does not drift while training goes on
        elif step not in steps:
            raise ConfigError(f"config.{key}: {path} has no step {step}; saved steps: {steps}")
        return CheckpointSpec(f"{path.name}@{step}", "run", resolved, step)
    if (path / "config.json").is_file():
        if step is not None:
            raise ConfigError(f"config.{key}: {entry!r} names a step, but {path} is an HF directory, not a run")
        if paths.is_remote(path):  # safetensors are read from local files
            raise ConfigError(f"config.{key}: {path} is an HF directory in a bucket; copy it to a local directory "
                              f"(a training run's workdir may stay in the bucket)")
        return CheckpointSpec(path.name, "hf", resolved)
    raise ConfigError(f"config.{key}: {path} is neither an HF checkpoint directory (no config.json) nor a "
                      f"training run's workdir (no checkpoints/ folder)")


def config_checkpoint(config, key: str = "eval.checkpoints") -> CheckpointSpec:
    """The config's own model: `model.hf_path`, or the random preset (its key covers preset, seed and tokenizer)."""
    build.check_model(config)
    if not config.model.hf_path and config.tokenizer.kind != "chars":
        raise ConfigError(f"config.{key}: empty, so the config's own model is used, but it is a random preset without "
                          f"a tokenizer; name a checkpoint, set model.hf_path, or set tokenizer.kind=chars")
    if config.model.hf_path:
        path = pathlib.Path(config.model.hf_path).expanduser().resolve()
        return CheckpointSpec(path.name, "config", f"{path}:{config.model.dtype}")
    tok = config.tokenizer
    identity = json.dumps([config.model.preset, config.model.init_seed, config.model.dtype,
                           config.model.get("vocab_size", 0), tok.kind, tok.characters, list(tok.words)])
    return CheckpointSpec(config.model.preset, "config", identity)


def resolve_checkpoints(config) -> list[CheckpointSpec]:
    """`eval.checkpoints` (empty = the config's model), labelled by `eval.labels` or their directory names."""
    entries = tuple(config.eval.checkpoints)
    specs = ([resolve_checkpoint(e, f"eval.checkpoints[{i}]") for i, e in enumerate(entries)]
             if entries else [config_checkpoint(config)])
    labels = tuple(config.eval.labels)
    if labels:
        if len(labels) != len(specs):
            raise ConfigError(f"config.eval.labels: {len(labels)} labels for {len(specs)} checkpoints")
        specs = [dataclasses.replace(s, label=str(label)) for s, label in zip(specs, labels)]
    names = [s.label for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.eval.labels: checkpoint labels {names} are not distinct; set config.eval.labels")
    return specs


def _tokenizer_for(config, hf_dir: str | None):
    """`tokenizer.kind=chars` wins; otherwise the checkpoint's own tokenizer (or the config's, for its model)."""
    from bcr_jax import tokenizer as tokenizer_lib

    if config.tokenizer.kind == "chars" or hf_dir is None:
        tok = build.load_tokenizer(config)
    else:
        tok = tokenizer_lib.load_tokenizer(hf_dir)
    if tok is None:
        raise ConfigError("config.tokenizer.kind: evaluation reads answers, so it needs a tokenizer; a random preset "
                          "has none -- set tokenizer.kind=chars (and tokenizer.characters) or model.hf_path")
    return tok


def load_policy(config, spec: CheckpointSpec, mesh, settings: EvalSettings) -> ModelPolicy:
    """Loads the weights and tokenizer `spec` names, as a `ModelPolicy` with the eval sampling knobs."""
    from bcr_jax import models

    if spec.kind == "config":
        tok = _tokenizer_for(config, None)
        cfg, params = build.load_model(config, mesh)
    elif spec.kind == "hf":
        tok = _tokenizer_for(config, spec.path)
        cfg, params = models.load_hf(spec.path, dtype=config.model.dtype, mesh=mesh)
    else:
        try:
            from bcr_jax.checkpoint import load_run
        except ImportError:
            raise ConfigError(f"config.eval.checkpoints: {spec.path} is a training run, but this version has no "
                              f"bcr_jax.checkpoint.load_run to read it") from None
        cfg, params, tok, _ = load_run(spec.path, step=spec.step, mesh=mesh)
        if tok is None or config.tokenizer.kind == "chars":
            tok = _tokenizer_for(config, None)
    build.check_vocab(cfg, tok)
    return ModelPolicy(cfg, params, tok, mesh=mesh, temperature=settings.temperature, top_p=settings.top_p,
                       top_k=settings.top_k, thinking=settings.thinking,
                       decode_blocks=int(config.rollout.decode_blocks))


# ------------------------------------------------------------------------------------------------------ packing

class PackedPrompt(NamedTuple):
    """One prompt of a cell: `problems` indexes the benchmark; `counted[k]` is False for a filler (padding)."""

    ordering: int
    group: int
    problems: tuple[int, ...]
    counted: tuple[bool, ...]


def ordering(num_problems: int, index: int, seed: int) -> np.ndarray:
    """Ordering `index` of the benchmark: 0 = its own order, else a permutation seeded by (seed, index)."""
    if index == 0:
        return np.arange(num_problems)
    return np.random.default_rng([seed, index]).permutation(num_problems)


def pack_benchmark(num_problems: int, n: int, orderings: int, seed: int) -> list[PackedPrompt]:
    """Every ordering cut into prompts of `n` problems; each ordering's last prompt is padded with fillers from the
    start of the same ordering (see the module docstring)."""
    if not 1 <= n <= num_problems:
        raise ValueError(f"n={n} must be in 1..{num_problems} (the benchmark's size)")
    prompts = []
    for r in range(orderings):
        order = ordering(num_problems, r, seed)
        for group, start in enumerate(range(0, num_problems, n)):
            real = [int(i) for i in order[start:start + n]]
            fillers = [int(i) for i in order[:n - len(real)]]
            prompts.append(PackedPrompt(r, group, tuple(real + fillers), (True,) * len(real) + (False,) * len(fillers)))
    return prompts


def derive_seed(*parts: int) -> int:
    """A 31-bit sampling seed from integers (the eval seed, N, ordering, chunk...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------------------ grading

def _verdict_fields(verdict) -> tuple[bool, str]:
    """(correct, reason) of a `grading.Verdict` (an enum: equal / not_equal / missing / unparsable / timeout)."""
    reason = str(getattr(verdict, "value", verdict))
    return reason == "equal", reason


def library_grader(*, timeout_s: float | None = None, num_workers: int | None = None) -> GradeFn:
    """`grading.grade_batch_verdicts` where it exists (verdicts with reasons), else `grading.grade_batch`."""

    def grade(answers, golds):
        from bcr_jax import grading

        options = {"timeout_s": timeout_s, "num_workers": num_workers}
        if hasattr(grading, "grade_batch_verdicts"):
            return [_verdict_fields(v) for v in grading.grade_batch_verdicts(list(answers), list(golds), **options)]
        return [(ok, "equal" if ok else "not_equal")
                for ok in grading.grade_batch(list(answers), list(golds), **options)]

    return grade


def _config_grader(config) -> GradeFn:
    return library_grader(timeout_s=config.grading.timeout_s, num_workers=config.grading.num_workers or None)


def score_records(records: list[dict], n: int, require_think_close: bool, grade_fn: GradeFn) -> list[dict]:
    """Fills `answers`, `correct` and `reasons` of raw response records (each with `response` and `golds`):
    a missing / malformed answer is reason "missing"; the rest go to `grade_fn` in one batch."""
    pending = []  # (record, position, answer, gold)
    for record in records:
        answers = bcr.split_answers(record["response"], n, require_think_close=require_think_close)
        record["answers"] = answers
        record["correct"] = [False] * n
        record["reasons"] = ["missing"] * n
        pending += [(record, k, a, record["golds"][k]) for k, a in enumerate(answers) if a is not None]
    if pending:  # no grader pool is started for a cell without a single answer
        verdicts = grade_fn([p[2] for p in pending], [p[3] for p in pending])
        for (record, k, _, _), (correct, reason) in zip(pending, verdicts, strict=True):
            record["correct"][k], record["reasons"][k] = bool(correct), reason
    return records


def cell_metrics(records: Sequence[Mapping], n: int) -> dict:
    """The cell's figures (module docstring) from its scored records; fillers (`counted` False) are left out of
    every per-problem figure."""
    num_responses = len(records)
    if num_responses == 0:
        raise ValueError("a cell without responses has no figures")
    slots = [(k, r["correct"][k], r["answers"][k] is not None, r["reasons"][k])
             for r in records for k in range(n) if r["counted"][k]]
    by_position = []
    for position in range(n):
        here = [correct for k, correct, _, _ in slots if k == position]
        by_position.append(sum(here) / len(here) if here else None)
    return {
        "accuracy": sum(s[1] for s in slots) / len(slots),
        "tokens_per_problem": sum(r["num_tokens"] for r in records) / (num_responses * n),
        "truncation_rate": sum(bool(r["truncated"]) for r in records) / num_responses,
        "answered_rate": sum(s[2] for s in slots) / len(slots),
        "accuracy_by_position": by_position,
        "num_responses": num_responses,
        "num_slots": len(slots),
        "reasons": dict(sorted(collections.Counter(s[3] for s in slots).items())),
    }


def phrase_counts(records: Sequence[Mapping], n: int, phrases: Sequence[str]) -> dict[str, float]:
    """Occurrences per problem of each phrase (case-insensitive, overlapping matches not counted) in the raw
    responses: the metacognitive-loop column ("wait", "let me double-check", ... or the toy's "check ")."""
    responses = [r["response"].lower() for r in records]
    return {phrase: sum(text.count(phrase.lower()) for text in responses) / (len(records) * n) for phrase in phrases}


# --------------------------------------------------------------------------------------------------- cell files

def _cell_hash(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _read_cell(cells_dir: paths.Path, cell_hash: str, key: Mapping) -> dict | None:
    """The cached cell if its `.json` exists and was written for exactly this key."""
    path = cells_dir / f"{cell_hash}.json"
    if not path.is_file():
        return None
    cell = json.loads(path.read_text(encoding="utf-8"))
    return cell if cell.get("key") == key else None


def _write_cell(cells_dir: paths.Path, cell_hash: str, key: Mapping, records: list[dict], metrics: dict) -> dict:
    # The raw responses first: a `.json` (the "finished" marker) never points at missing responses.
    paths.write_atomic(cells_dir / f"{cell_hash}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    cell = {"key": dict(key), "metrics": metrics, "responses": f"{cell_hash}.jsonl"}
    paths.write_atomic(cells_dir / f"{cell_hash}.json", json.dumps(cell, indent=1))
    return cell


def _read_records(cells_dir: paths.Path, cell: Mapping) -> list[dict]:
    path = cells_dir / cell["responses"]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ progress

class _Progress:
    """tqdm when installed, else one plain line per update on stderr."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.done, self.description, self.enabled = total, 0, description, enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=description, unit="prompt", dynamic_ncols=True) if enabled else None

    def update(self, count: int, note: str = "") -> None:
        self.done += count
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(count)
        elif self.enabled:
            print(f"{self.description}: {self.done}/{self.total} prompts {note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _chunks(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start:start + size]


# ----------------------------------------------------------------------------------------------------- the eval

@dataclasses.dataclass
class _Cell:
    checkpoint: CheckpointSpec
    benchmark: Benchmark
    n: int
    key: dict
    hash: str
    prompts: list[PackedPrompt]
    cached: dict | None


def _plan(specs, benchmarks, settings: EvalSettings, cells_dir: paths.Path) -> list[_Cell]:
    cells = []
    for spec in specs:
        for benchmark in benchmarks:
            for n in settings.n_values:
                key = {
                    "format": _CELL_FORMAT, "checkpoint": spec.key, "benchmark": benchmark.name,
                    "problems": benchmark.fingerprint, "n": n, "budget": settings.budget_for(n),
                    "samples": settings.samples, "orderings": settings.orderings, "seed": settings.seed,
                    "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                    "template": settings.template_name, "thinking": settings.thinking,
                    "require_think_close": settings.require_think_close,
                }
                cell_hash = _cell_hash(key)
                prompts = pack_benchmark(len(benchmark.problems), n, settings.orderings, settings.seed)
                cells.append(_Cell(spec, benchmark, n, key, cell_hash, prompts, _read_cell(cells_dir, cell_hash, key)))
    return cells


def _sample_cell(cell: _Cell, policy: GenerateFn, settings: EvalSettings, grade_fn: GradeFn,
                 progress: _Progress, score: bool = True) -> tuple[list[dict], dict | None]:
    """Samples, parses and grades every prompt of one cell; returns its records and figures (None unscored)."""
    problems, n = cell.benchmark.problems, cell.n
    budget = settings.budget_for(n)
    records = []
    for chunk_index, chunk in _chunks(cell.prompts, settings.batch_prompts):
        texts = [bcr.pack_problems([problems[i].text for i in p.problems], settings.template) for p in chunk]
        completions = policy(texts, n=n, budget=budget, samples=settings.samples,
                             seed=derive_seed(settings.seed, n, chunk_index))
        if len(completions) != len(chunk):
            raise RuntimeError(f"the policy returned {len(completions)} prompts' completions for {len(chunk)} prompts")
        for prompt_index, (prompt, samples) in enumerate(zip(chunk, completions)):
            if len(samples) != settings.samples:
                raise RuntimeError(f"the policy returned {len(samples)} samples, expected {settings.samples}")
            for sample, completion in enumerate(samples):
                text, num_tokens, truncated = Completion(*completion)
                records.append({
                    "prompt": chunk_index * settings.batch_prompts + prompt_index, "ordering": prompt.ordering,
                    "group": prompt.group, "sample": sample, "problem_ids": [problems[i].id for i in prompt.problems],
                    "golds": [problems[i].gold for i in prompt.problems], "counted": list(prompt.counted),
                    "response": text, "num_tokens": int(num_tokens), "truncated": bool(truncated),
                })
        progress.update(len(chunk), f"{cell.checkpoint.label} {cell.benchmark.name} N={n}")
    if not score:
        return records, None
    score_records(records, n, settings.require_think_close, grade_fn)
    return records, cell_metrics(records, n)


def _follow_process_0(cells: list[_Cell]) -> bool:
    """Whether this process writes (process 0). With several processes all sample every cell together (each
    sampler call is a collective), so process 0's cache decides which cells are sampled (another host's disk may hold
    other cells); the other processes only sample: they neither grade, write cells, nor return the table."""
    import jax

    if jax.process_count() == 1:
        return True
    from bcr_jax import distributed

    cached = distributed.broadcast_from_main(np.array([c.cached is not None for c in cells], bool))
    if not distributed.is_main():
        for cell, hit in zip(cells, cached):
            cell.cached = {"metrics": None} if hit else None
    return distributed.is_main()


def _row(cell: _Cell, metrics: Mapping, settings: EvalSettings, phrases: Mapping[str, float]) -> dict:
    return {
        "checkpoint": cell.checkpoint.label, "benchmark": cell.benchmark.name, "n": cell.n,
        "accuracy": metrics["accuracy"], "tokens_per_problem": metrics["tokens_per_problem"],
        "truncation_rate": metrics["truncation_rate"], "answered_rate": metrics["answered_rate"],
        "accuracy_by_position": metrics["accuracy_by_position"], "delta_accuracy": None, "delta_tokens_pct": None,
        "budget": settings.budget_for(cell.n), "num_problems": len(cell.benchmark.problems),
        "num_prompts": len(cell.prompts), "num_responses": metrics["num_responses"], "samples": settings.samples,
        "orderings": settings.orderings, "temperature": settings.temperature, "top_p": settings.top_p,
        "reasons": metrics["reasons"], "phrase_counts": dict(phrases), "cell": cell.hash,
    }


def add_deltas(rows: list[dict]) -> list[dict]:
    """Sets `delta_accuracy` (absolute, a fraction) and `delta_tokens_pct` (relative, %) of every row against the
    first checkpoint's row of the same benchmark and N (None for the first checkpoint itself)."""
    if not rows:
        return rows
    first = rows[0]["checkpoint"]
    base = {(r["benchmark"], r["n"]): r for r in rows if r["checkpoint"] == first}
    for row in rows:
        ref = base.get((row["benchmark"], row["n"]))
        if row["checkpoint"] == first or ref is None:
            row["delta_accuracy"] = row["delta_tokens_pct"] = None
            continue
        row["delta_accuracy"] = row["accuracy"] - ref["accuracy"]
        row["delta_tokens_pct"] = (100.0 * (row["tokens_per_problem"] - ref["tokens_per_problem"])
                                   / ref["tokens_per_problem"] if ref["tokens_per_problem"] else None)
    return rows


def run_eval(config, policies: Mapping[str, GenerateFn] | None = None, *, grade_fn: GradeFn | None = None,
             write: bool = True) -> list[dict]:
    """The task-scaling-law table for `config` (module docstring); returns its rows and writes the outputs.

    Args:
      config: The full config (`eval`, `data.template`, `rollout`, `grading`, `model`, `tokenizer`, `mesh`).
      policies: Label → policy, in table order, instead of loading `eval.checkpoints` (tests, custom models).
      grade_fn: (answers, golds) → [(correct, reason)]; default: `grading` with the config's workers/timeout.
      write: Write `scaling_law.*` into `config.workdir` (cells are cached either way).
    """
    if config.eval.rescore:  # host-only work: process 0 alone, with several processes
        return (rescore(config.workdir, grade_fn=grade_fn or _config_grader(config),
                        count_phrases=settings_from_config(config).count_phrases or None) if _is_process_0() else [])
    settings = settings_from_config(config)
    if policies is None:  # checked before the benchmarks, which may take long to download
        specs = resolve_checkpoints(config)
        mesh = build.make_mesh(config)
    else:
        specs = [CheckpointSpec(str(label), "given", str(label)) for label in policies]
        mesh = None
    workdir = paths.check_writable(config.workdir, "config.workdir")  # a local directory or gs://
    benchmarks = load_benchmarks(config, settings.n_values)
    grade_fn = grade_fn or _config_grader(config)
    cells_dir = workdir / CELLS_DIR
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells = _plan(specs, benchmarks, settings, cells_dir)
    writer = _follow_process_0(cells)

    todo = [c for c in cells if c.cached is None]
    progress = _Progress(sum(len(c.prompts) for c in todo), "eval", enabled=writer)
    metrics_by_hash = {c.hash: c.cached["metrics"] for c in cells if c.cached is not None}
    phrases_by_hash = {}
    try:
        for spec in specs:
            mine = [c for c in todo if c.checkpoint is spec]
            if not mine:
                continue  # every cell of this checkpoint is cached: its weights are never loaded
            policy = policies[spec.label] if policies is not None else load_policy(config, spec, mesh, settings)
            check_fits = getattr(policy, "check_fits", None)
            if check_fits is not None:
                for cell in mine:
                    problems = cell.benchmark.problems
                    check_fits([bcr.pack_problems([problems[i].text for i in p.problems], settings.template)
                                for p in cell.prompts], settings.budget_for(cell.n))
            for cell in mine:
                records, metrics = _sample_cell(cell, policy, settings, grade_fn, progress, score=writer)
                if writer:
                    _write_cell(cells_dir, cell.hash, cell.key, records, metrics)
                    metrics_by_hash[cell.hash] = metrics
                    phrases_by_hash[cell.hash] = phrase_counts(records, cell.n, settings.count_phrases)
            del policy  # frees this checkpoint's weights before the next one loads
    finally:
        progress.close()

    if not writer:
        return []
    for cell in cells:  # cached cells: counted from their kept responses (phrases are not part of a cell's key)
        if cell.hash not in phrases_by_hash:
            records = _read_records(cells_dir, cell.cached) if settings.count_phrases else [{"response": ""}]
            phrases_by_hash[cell.hash] = phrase_counts(records, cell.n, settings.count_phrases)
    rows = add_deltas([_row(c, metrics_by_hash[c.hash], settings, phrases_by_hash[c.hash]) for c in cells])
    if write:
        write_outputs(rows, workdir)
    return rows


def rescore(workdir: str | os.PathLike, *, grade_fn: GradeFn | None = None,
            require_think_close: bool | None = None, count_phrases: Sequence[str] | None = None) -> list[dict]:
    """Re-parses and re-grades the raw responses of every cell in `workdir/scaling_law.json` (no sampling), updates
    the cell files and rewrites the outputs. `require_think_close` overrides the parser setting the cells were
    sampled with (the cell keys keep the original, so a later run still finds them). `count_phrases` recounts these
    phrases (default: the ones the table already counts)."""
    workdir = paths.resolve(workdir)
    table = workdir / f"{OUTPUT_STEM}.json"
    if not table.is_file():
        raise ConfigError(f"config.workdir: {table} does not exist; run mode=eval first")
    grade_fn = grade_fn or library_grader()
    cells_dir = workdir / CELLS_DIR
    rows = json.loads(table.read_text(encoding="utf-8"))
    for row in rows:
        cell_path = cells_dir / f"{row['cell']}.json"
        if not cell_path.is_file():
            raise ConfigError(f"config.workdir: {cell_path} is missing; rerun mode=eval")
        cell = json.loads(cell_path.read_text(encoding="utf-8"))
        n = cell["key"]["n"]
        think_close = cell["key"]["require_think_close"] if require_think_close is None else require_think_close
        records = score_records(_read_records(cells_dir, cell), n, think_close, grade_fn)
        metrics = cell_metrics(records, n)
        _write_cell(cells_dir, row["cell"], cell["key"], records, metrics)
        row.update({k: metrics[k] for k in ("accuracy", "tokens_per_problem", "truncation_rate", "answered_rate",
                                            "accuracy_by_position", "num_responses", "reasons")})
        phrases = row.get("phrase_counts", {}) if count_phrases is None else count_phrases
        row["phrase_counts"] = phrase_counts(records, n, tuple(phrases))
    rows = add_deltas(rows)
    write_outputs(rows, workdir)
    return rows


# ------------------------------------------------------------------------------------------------------ outputs

_CSV_SCALARS = ("checkpoint", "benchmark", "n", "budget", "accuracy", "tokens_per_problem", "truncation_rate",
                "answered_rate", "delta_accuracy", "delta_tokens_pct")
_CSV_TAIL = ("num_problems", "num_prompts", "num_responses", "samples", "orderings", "temperature", "top_p", "cell")


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def mean_rows(rows: Sequence[Mapping]) -> list[dict]:
    """Per checkpoint and N, the unweighted mean over benchmarks of accuracy and tokens per problem (benchmark
    "mean"), with deltas against the first checkpoint."""
    out = []
    for checkpoint in _ordered(r["checkpoint"] for r in rows):
        for n in _ordered(r["n"] for r in rows):
            cell = [r for r in rows if r["checkpoint"] == checkpoint and r["n"] == n]
            if cell:
                out.append({"checkpoint": checkpoint, "benchmark": "mean", "n": n, "budget": cell[0]["budget"],
                            "accuracy": float(np.mean([r["accuracy"] for r in cell])),
                            "tokens_per_problem": float(np.mean([r["tokens_per_problem"] for r in cell]))})
    return add_deltas(out)


def _csv_text(rows: Sequence[Mapping]) -> str:
    import io

    max_n = max(r["n"] for r in rows)
    positions = [f"accuracy_pos_{k}" for k in range(1, max_n + 1)]
    phrases = _ordered(p for r in rows for p in r.get("phrase_counts", {}))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_CSV_SCALARS, *positions, *(f"per_problem:{p}" for p in phrases), *_CSV_TAIL])
    for r in rows:
        by_position = list(r["accuracy_by_position"]) + [None] * (max_n - len(r["accuracy_by_position"]))
        counts = [r.get("phrase_counts", {}).get(p) for p in phrases]
        writer.writerow(["" if v is None else v for v in (*(r[k] for k in _CSV_SCALARS), *by_position, *counts,
                                                            *(r[k] for k in _CSV_TAIL))])
    return buffer.getvalue()


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _signed(x, unit: str = "") -> str:
    return "–" if x is None else f"{x:+.1f}{unit}"


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The paper-style table: per benchmark (and the mean over benchmarks), rows N and, per checkpoint, accuracy
    (%) and tokens per problem; every checkpoint after the first adds Δacc (points) and Δtok (%) against the
    first."""
    checkpoints = _ordered(r["checkpoint"] for r in rows)
    first = rows[0]
    lines = ["# Task-scaling law", "",
             f"Accuracy (%, pass@1 over {first['samples']} sample(s) x {first['orderings']} ordering(s), temperature "
             f"{first['temperature']}, top-p {first['top_p']}) and response tokens per problem; N problems per "
             f"prompt share one budget. Δ: against {checkpoints[0]} (accuracy in points, tokens in %)."]
    benchmarks = _ordered(r["benchmark"] for r in rows)
    blocks = []
    for benchmark in benchmarks:
        block = [r for r in rows if r["benchmark"] == benchmark]
        blocks.append((f"{benchmark} ({block[0]['num_problems']} problems)", block))
    if len(benchmarks) > 1:
        blocks.append(("mean over benchmarks", mean_rows(rows)))
    header = ["N", "budget"]
    for i, checkpoint in enumerate(checkpoints):
        header += [f"{checkpoint} acc", f"{checkpoint} tok/problem"]
        if i:
            header += [f"{checkpoint} Δacc", f"{checkpoint} Δtok"]
    for title, block in blocks:
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for n in _ordered(r["n"] for r in block):
            by_checkpoint = {r["checkpoint"]: r for r in block if r["n"] == n}
            cells = [str(n), f"{next(iter(by_checkpoint.values()))['budget']:,}"]
            for i, checkpoint in enumerate(checkpoints):
                r = by_checkpoint.get(checkpoint)
                if r is None:
                    cells += ["–"] * (4 if i else 2)
                    continue
                cells += [_pct(r["accuracy"]), f"{r['tokens_per_problem']:,.1f}"]
                if i:
                    delta_points = None if r["delta_accuracy"] is None else 100 * r["delta_accuracy"]
                    cells += [_signed(delta_points), _signed(r["delta_tokens_pct"], "%")]
            lines.append("| " + " | ".join(cells) + " |")
    phrases = _ordered(p for r in rows for p in r.get("phrase_counts", {}))
    if phrases:
        lines += ["", "## Phrases per problem", "", "Occurrences per problem in the responses (case-insensitive).", "",
                  "| checkpoint | benchmark | N | " + " | ".join(f"`{p.strip()}`" for p in phrases) + " |",
                  "|---|---|---:|" + "---:|" * len(phrases)]
        for r in rows:
            counts = [r.get("phrase_counts", {}).get(p) for p in phrases]
            lines.append(f"| {r['checkpoint']} | {r['benchmark']} | {r['n']} | "
                         + " | ".join("–" if c is None else f"{c:.2f}" for c in counts) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping], path) -> None:
    """Accuracy vs N (top) and tokens per problem vs N (bottom), a panel per benchmark (plus the mean when there
    are several), one line per checkpoint. Uses the Agg canvas directly: no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benchmarks = _ordered(r["benchmark"] for r in rows)
    panels = [(b, [r for r in rows if r["benchmark"] == b]) for b in benchmarks]
    if len(benchmarks) > 1:
        panels.append(("mean", mean_rows(rows)))
    checkpoints = _ordered(r["checkpoint"] for r in rows)
    figure = Figure(figsize=(3.6 * len(panels), 6.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(panels), squeeze=False)
    for column, (title, panel) in enumerate(panels):
        for checkpoint in checkpoints:
            mine = sorted((r for r in panel if r["checkpoint"] == checkpoint), key=lambda r: r["n"])
            ns = [r["n"] for r in mine]
            axes[0, column].plot(ns, [100 * r["accuracy"] for r in mine], marker="o", label=checkpoint)
            axes[1, column].plot(ns, [r["tokens_per_problem"] for r in mine], marker="o", label=checkpoint)
        axes[0, column].set_title(title)
        axes[1, column].set_xlabel("N (problems per prompt)")
        for row in (0, 1):
            axes[row, column].set_xticks(_ordered(r["n"] for r in panel))
            axes[row, column].grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[1, 0].set_ylabel("tokens per problem")
    axes[0, -1].legend(fontsize="small")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    paths.write_atomic(path, png.getvalue())


def write_outputs(rows: list[dict], workdir: paths.PathLike) -> dict[str, paths.Path]:
    """`scaling_law.json` / `.csv` / `.md` / `.png` in `workdir`; returns their paths by suffix."""
    workdir = paths.resolve(workdir)
    files = {suffix: workdir / f"{OUTPUT_STEM}.{suffix}" for suffix in ("json", "csv", "md", "png")}
    paths.write_atomic(files["json"], json.dumps(rows, indent=1))
    paths.write_atomic(files["csv"], _csv_text(rows))
    paths.write_atomic(files["md"], markdown_table(rows))
    plot(rows, files["png"])
    return files


# -------------------------------------------------------------------------------------------------------- solve

def read_solve_input(path_text: str) -> list[tuple[str, str]]:
    """(id, problem) pairs of `solve.path`: JSONL with `problem` and optional `id` (default: the 1-based line
    number), or .txt with one problem per non-empty line (id: its line number)."""
    if not path_text:
        raise ConfigError("config.solve.path: empty; give a .jsonl (problem, optional id) or .txt file")
    path = pathlib.Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"config.solve.path: {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    problems = []
    if path.suffix.lower() == ".txt":
        problems = [(str(i), line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
    elif path.suffix.lower() == ".jsonl":
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"config.solve.path: {path}, line {i}: not JSON ({e})") from None
            problem = row.get("problem") if isinstance(row, dict) else None
            if not isinstance(problem, str) or not problem.strip():
                raise ConfigError(f"config.solve.path: {path}, line {i}: field 'problem' missing or not a non-empty "
                                  f"string")
            problems.append((str(row.get("id", i)), problem))
    else:
        raise ConfigError(f"config.solve.path: {path} is not a .jsonl or .txt file")
    if not problems:
        raise ConfigError(f"config.solve.path: {path} holds no problems")
    return problems


def run_solve(config, policy: GenerateFn | None = None) -> list[dict]:
    """Answers the problems of `solve.path`, `solve.n` per prompt (the last prompt may hold fewer), one sample each
    with the eval sampling knobs and budget rule; writes one row per problem, in input order, to `solve.output`
    (default `workdir/solutions.jsonl`) and prints the tokens spent per problem."""
    n = _positive_int(config.solve.n, "solve.n")
    settings = settings_from_config(config, n_values=(n,))
    problems = read_solve_input(config.solve.path)
    output = paths.resolve(config.solve.output or paths.resolve(config.workdir) / "solutions.jsonl")
    paths.check_writable(output.parent, "config.solve.output" if config.solve.output else "config.workdir")
    if policy is None:
        spec = (resolve_checkpoint(config.solve.checkpoint, "solve.checkpoint") if config.solve.checkpoint
                else config_checkpoint(config, "solve.checkpoint"))
        policy = load_policy(config, spec, build.make_mesh(config), settings)
    groups = [list(range(start, min(start + n, len(problems)))) for start in range(0, len(problems), n)]
    texts = [bcr.pack_problems([problems[i][1] for i in group], settings.template) for group in groups]
    check_fits = getattr(policy, "check_fits", None)
    if check_fits is not None:
        check_fits(texts, settings.budget_for(n))

    rows: list[dict | None] = [None] * len(problems)
    progress = _Progress(len(groups), "solve")
    try:
        for size in sorted({len(g) for g in groups}, reverse=True):  # a short last group has its own N and budget
            indices = [g for g, group in enumerate(groups) if len(group) == size]
            for chunk_index, chunk in _chunks(indices, settings.batch_prompts):
                completions = policy([texts[g] for g in chunk], n=size, budget=settings.budget_for(size), samples=1,
                                     seed=derive_seed(settings.seed, size, chunk_index))
                for g, (completion,) in zip(chunk, completions, strict=True):
                    text, num_tokens, truncated = Completion(*completion)
                    answers = bcr.split_answers(text, size, require_think_close=settings.require_think_close)
                    for position, (i, answer) in enumerate(zip(groups[g], answers)):
                        rows[i] = {"id": problems[i][0], "problem": problems[i][1], "answer": answer,
                                   "tokens": int(num_tokens), "group": g, "position": position + 1,
                                   "truncated": bool(truncated)}
                progress.update(len(chunk), f"N={size}")
    finally:
        progress.close()

    paths.write_atomic(output, "".join(json.dumps(row) + "\n" for row in rows))
    total_tokens = sum(row["tokens"] for row in rows if row["position"] == 1)  # each group's tokens once
    answered = sum(row["answer"] is not None for row in rows)
    print(f"solve: {len(problems)} problems in {len(groups)} prompts of up to {n}: {total_tokens:,} response tokens, "
          f"{total_tokens / len(problems):,.1f} tokens per problem, {answered}/{len(problems)} answered -> {output}")
    return rows


def summary(rows: Sequence[Mapping], workdir) -> str:
    """The console report of `run_eval`: the Markdown table and where the files are."""
    workdir = paths.resolve(workdir)
    return markdown_table(rows) + f"\nwritten: {workdir / OUTPUT_STEM}.{{json,csv,md,png}}, raw responses in " \
                                  f"{workdir / CELLS_DIR}/\n"


def main_eval(config) -> list[dict]:
    """`mode=eval`: `run_eval`, then the table on stdout."""
    rows = run_eval(config)
    if _is_process_0():  # the others return no table
        print(summary(rows, config.workdir))
    return rows


def _is_process_0() -> bool:
    import jax

    return jax.process_index() == 0


def main_solve(config) -> list[dict]:
    """`mode=solve`."""
    return run_solve(config)


__all__ = [
    "BUDGET_RULES", "Benchmark", "CheckpointSpec", "Completion", "EvalSettings", "GenerateFn", "ModelPolicy",
    "PackedPrompt", "add_deltas", "cell_metrics", "derive_seed", "library_grader", "load_benchmark",
    "load_benchmarks", "load_policy", "main_eval", "main_solve", "markdown_table", "mean_rows", "ordering",
    "pack_benchmark", "plot", "read_solve_input", "rescore", "resolve_checkpoint", "resolve_checkpoints",
    "run_eval", "run_solve", "score_records", "settings_from_config", "write_outputs",
]
