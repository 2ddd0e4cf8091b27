"""Problem sets for BCR: loading with gold answers, and grouping N problems per prompt."""

from bcr_jax.data import synthetic
from bcr_jax.data.grouping import GroupIterator, Strategy, group_indices
from bcr_jax.data.problems import (
    SOURCES,
    LoadedProblems,
    MalformedRowError,
    Problem,
    RowError,
    SourceSpec,
    load_problems,
)

__all__ = [
    "SOURCES",
    "GroupIterator",
    "LoadedProblems",
    "MalformedRowError",
    "Problem",
    "RowError",
    "SourceSpec",
    "Strategy",
    "group_indices",
    "load_problems",
    "synthetic",
]
