"""Math problems with gold answers, loaded through ``datasets`` from the hub or a local file.

Each source is described by a :class:`SourceSpec` (hub name, split, subset and the field mapping);
:data:`SOURCES` registers the ones BCR trains and evaluates on:

============== ============================ ====== =============================================
name           hub dataset                  split  problem / answer / difficulty (id)
============== ============================ ====== =============================================
deepmath-103k  zwhe99/DeepMath-103K         train  question / final_answer / difficulty
math-500       HuggingFaceH4/MATH-500       test   problem / answer / level (unique_id)
aime-2025      yentinglin/aime_2025         train  problem / answer
amc-2023       math-ai/amc23                test   question / answer
minerva-math   math-ai/minervamath          test   question / answer
olympiadbench  math-ai/olympiadbench        test   question / final_answer (a list)
============== ============================ ====== =============================================

AIME 2025 uses ``yentinglin/aime_2025``: one split with all 30 problems of AIME 2025 I and II
(``opencompass/AIME2025`` keeps the two papers in separate subsets).

:func:`load_problems` reads a registered name or a spec from the hub, or -- with ``path`` -- a local
``.jsonl`` / ``.json`` / ``.parquet`` copy with the same fields. Rows are validated:

* problem: a non-empty string;
* answer: a non-empty string, a number (rendered with ``str``; integral floats without ``.0``), or a
  non-empty list of those, joined with ``", "`` (OlympiadBench lists multi-part answers);
* difficulty (if the spec names a field): a finite number, or a string that parses as one;
* id (if the spec names a field): any present value, as a string; otherwise ``"<source>/<row>"``.

A malformed row raises :class:`MalformedRowError` naming the source or file, the row index and the
field; with ``on_error="skip"`` it is skipped instead and recorded in ``LoadedProblems.skipped``
(and logged), never dropped silently. A field absent from the whole dataset is a mapping mistake,
not a bad row, and always raises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where a problem set lives and which fields hold what."""

    hub_name: str
    split: str
    subset: str | None
    problem_field: str
    answer_field: str
    difficulty_field: str | None = None
    id_field: str | None = None


SOURCES: dict[str, SourceSpec] = {
    "deepmath-103k": SourceSpec("zwhe99/DeepMath-103K", "train", None, "question", "final_answer", "difficulty"),
    "math-500": SourceSpec("HuggingFaceH4/MATH-500", "test", None, "problem", "answer", "level", "unique_id"),
    "aime-2025": SourceSpec("yentinglin/aime_2025", "train", None, "problem", "answer"),
    "amc-2023": SourceSpec("math-ai/amc23", "test", None, "question", "answer"),
    "minerva-math": SourceSpec("math-ai/minervamath", "test", None, "question", "answer"),
    "olympiadbench": SourceSpec("math-ai/olympiadbench", "test", None, "question", "final_answer"),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem with its gold answer; ``difficulty`` is None where the source has none."""

    id: str
    text: str
    gold: str
    difficulty: float | None
    source: str


@dataclasses.dataclass(frozen=True)
class RowError:
    """Why one row was rejected."""

    origin: str  # The file path, or the hub name and split.
    row: int  # 0-based index in the file (or split).
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}, row {self.row}, field {self.field!r}: {self.reason}"


class MalformedRowError(ValueError):
    """A row failed validation; ``error`` says where and why."""

    def __init__(self, error: RowError):
        super().__init__(str(error))
        self.error = error


class LoadedProblems(list):
    """The loaded problems (a ``list[Problem]``) plus the rows skipped with ``on_error="skip"``."""

    def __init__(self, problems: Iterable[Problem], skipped: Sequence[RowError] = ()):
        super().__init__(problems)
        self.skipped = tuple(skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class _Malformed(ValueError):
    """A field value failed validation; the loader adds the row context."""


def _problem_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Malformed("missing" if value is None else f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _Malformed("empty")
    return value


def _answer_text(value: Any) -> str:
    if value is None:
        raise _Malformed("missing")
    if isinstance(value, bool):
        raise _Malformed("expected a string or a number, got bool")
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Malformed(f"not a finite number: {value}")
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, (list, tuple)):
        if not value:
            raise _Malformed("empty list")
        text = ", ".join(_answer_text(part) for part in value)
    else:
        raise _Malformed(f"expected a string, a number or a list, got {type(value).__name__}")
    if not text:
        raise _Malformed("empty")
    return text


def _difficulty(value: Any) -> float:
    if value is None:
        raise _Malformed("missing")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Malformed(f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise _Malformed(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise _Malformed(f"not a finite number: {value!r}")
    return number


def _identifier(value: Any) -> str:
    if value is None:
        raise _Malformed("missing")
    return str(value)


_FIELD_PARSERS = {"problem": _problem_text, "answer": _answer_text, "difficulty": _difficulty, "id": _identifier}


def _read(spec: SourceSpec, path: str | os.PathLike | None, cache_dir: str | None) -> tuple[datasets.Dataset, str]:
    """The dataset and a human-readable origin for error messages."""
    if path is None:
        dataset = datasets.load_dataset(spec.hub_name, spec.subset, split=spec.split, cache_dir=cache_dir)
        return dataset, f"{spec.hub_name} ({spec.subset or 'default'}, split {spec.split})"
    path = Path(path)
    builder = _LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(_LOCAL_BUILDERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    return dataset, str(path)


def load_problems(
    source: str | SourceSpec,
    path: str | os.PathLike | None = None,
    *,
    on_error: OnError = "raise",
    limit: int | None = None,
    cache_dir: str | None = None,
) -> LoadedProblems:
    """Loads and validates the problems of a source (see the module docstring).

    Args:
      source: A key of :data:`SOURCES` or a :class:`SourceSpec`. Problems record the key, or the
        spec's hub name, as their ``source``.
      path: A local ``.jsonl``/``.json``/``.parquet`` file to read instead of the hub.
      on_error: ``"raise"`` on the first malformed row, or ``"skip"`` malformed rows (recorded).
      limit: Read at most this many rows (in file order).
      cache_dir: The ``datasets`` cache directory.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(source, str):
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; registered: {', '.join(SOURCES)}")
        name, spec = source, SOURCES[source]
    else:
        name, spec = source.hub_name, source
    dataset, origin = _read(spec, path, cache_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))

    fields = {"problem": spec.problem_field, "answer": spec.answer_field}
    if spec.difficulty_field:
        fields["difficulty"] = spec.difficulty_field
    if spec.id_field:
        fields["id"] = spec.id_field
    for role, field in fields.items():
        if field not in dataset.column_names:
            raise ValueError(f"{origin}: {role} field {field!r} not found; columns are {dataset.column_names}")
    column_values = dataset.select_columns(list(dict.fromkeys(fields.values()))).to_dict()  # One bulk read.
    columns = {role: column_values[field] for role, field in fields.items()}

    problems, skipped = [], []
    for row in range(len(dataset)):
        values, error = {}, None
        for role, field in fields.items():
            try:
                values[role] = _FIELD_PARSERS[role](columns[role][row])
            except _Malformed as reason:
                error = RowError(origin, row, field, str(reason))
                break
        if error is not None:
            if on_error == "raise":
                raise MalformedRowError(error)
            skipped.append(error)
            continue
        problem_id = values.get("id", f"{name}/{row}")
        problems.append(Problem(problem_id, values["problem"], values["answer"], values.get("difficulty"), name))
    if skipped:
        logger.warning("%s: skipped %d malformed rows (first: %s)", origin, len(skipped), skipped[0])
    return LoadedProblems(problems, skipped)
