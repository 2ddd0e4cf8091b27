"""N-problem groups for BCR prompts, and a deterministic, resumable iterator over them.

Grouping
--------
``"stratified"`` (the default; the paper groups DeepMath-103K so that every group has a similar
average difficulty): problems are ordered by difficulty and cut into N equal strata (quantile
bands); group g takes one problem from every stratum, with a seeded shuffle inside each stratum, so
each group's mean is an average over all difficulty levels. Compared with random grouping this cuts
the spread of group means by about N for evenly spread difficulties. The order of the problems
inside a group is shuffled too, so problem 1 is not always the easiest. Problems without a
difficulty are placed at uniformly random positions of the difficulty order -- for them, and for a
dataset without difficulties, stratified grouping is random grouping.

``"random"``: a seeded shuffle cut into groups of N.

Epochs
------
Every problem is used exactly once per epoch, except when ``len(problems) % N != 0``: then that
many problems, drawn uniformly at random anew each epoch, sit the epoch out
(``GroupIterator.dropped_per_epoch``); no problem is repeated within an epoch and none is
systematically starved. Epoch e's groups depend only on (seed, e) and the problem list, so an
iterator restored from ``state_dict()`` -- ``{"epoch", "position", "seed"}`` -- continues exactly
where the saved one stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from bcr_jax.data.problems import Problem

Strategy = Literal["stratified", "random"]
_STATE_KEYS = ("epoch", "position", "seed")


def _difficulty_order(order: np.ndarray, difficulties: Sequence[float | None], rng: np.random.Generator) -> np.ndarray:
    """``order`` sorted by difficulty; ties keep their (random) relative order, and problems
    without a difficulty take uniformly random positions."""
    known = np.array([difficulties[i] is not None for i in order], dtype=bool)
    ranked = order[known]
    values = np.array([difficulties[i] for i in ranked], dtype=np.float64)
    ranked = ranked[np.argsort(values, kind="stable")]
    unknown_slots = np.zeros(len(order), dtype=bool)
    unknown_slots[rng.choice(len(order), size=int((~known).sum()), replace=False)] = True
    result = np.empty_like(order)
    result[unknown_slots] = order[~known]
    result[~unknown_slots] = ranked
    return result


def group_indices(
    difficulties: Sequence[float | None],
    group_size: int,
    rng: np.random.Generator,
    strategy: Strategy = "stratified",
) -> np.ndarray:
    """One epoch's groups: ``[len(difficulties) // group_size, group_size]`` problem indices."""
    num_problems = len(difficulties)
    num_groups = num_problems // group_size if group_size >= 1 else 0
    if num_groups == 0:
        raise ValueError(f"{num_problems} problems cannot fill one group of group_size={group_size}")
    # A random prefix of a permutation: which problems play (the rest sit this epoch out), in random order.
    order = rng.permutation(num_problems)[: num_groups * group_size]
    if strategy == "random":
        return order.reshape(num_groups, group_size)
    if strategy != "stratified":
        raise ValueError(f"strategy must be 'stratified' or 'random', got {strategy!r}")
    strata = _difficulty_order(order, difficulties, rng).reshape(group_size, num_groups)
    groups = rng.permuted(strata, axis=1).T  # Group g: the g-th draw of every stratum.
    return rng.permuted(groups, axis=1)


class GroupIterator:
    """An endless stream of problem groups, epoch after epoch; checkpointable via ``state_dict``."""

    def __init__(
        self,
        problems: Sequence[Problem],
        group_size: int,
        *,
        seed: int = 0,
        strategy: Strategy = "stratified",
    ):
        if group_size < 1 or len(problems) < group_size:
            raise ValueError(f"{len(problems)} problems cannot fill one group of group_size={group_size}")
        if strategy not in ("stratified", "random"):
            raise ValueError(f"strategy must be 'stratified' or 'random', got {strategy!r}")
        self.problems = list(problems)
        self.group_size = group_size
        self.strategy = strategy
        self._difficulties = [p.difficulty for p in self.problems]
        self._set_state(epoch=0, position=0, seed=seed)

    @property
    def groups_per_epoch(self) -> int:
        return len(self.problems) // self.group_size

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.problems) % self.group_size

    def epoch_groups(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s groups as ``[groups_per_epoch, group_size]`` problem indices."""
        rng = np.random.default_rng([self.seed, epoch])
        return group_indices(self._difficulties, self.group_size, rng, self.strategy)

    def __iter__(self) -> GroupIterator:
        return self

    def __next__(self) -> tuple[Problem, ...]:
        if self.position == self.groups_per_epoch:
            self._set_state(epoch=self.epoch + 1, position=0, seed=self.seed)
        if self._groups is None:
            self._groups = self.epoch_groups(self.epoch)
        group = self._groups[self.position]
        self.position += 1
        return tuple(self.problems[i] for i in group)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores a ``state_dict()``; the next group is the one the saved iterator would yield."""
        if sorted(state) != sorted(_STATE_KEYS):
            raise ValueError(f"iterator state must have exactly the keys {_STATE_KEYS}, got {sorted(state)}")
        self._set_state(**{key: state[key] for key in _STATE_KEYS})

    def _set_state(self, *, epoch: int, position: int, seed: int) -> None:
        for key, value in (("epoch", epoch), ("position", position), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"iterator state {key!r} must be a non-negative int, got {value!r}")
        if position > self.groups_per_epoch:
            raise ValueError(f"position {position} is past the {self.groups_per_epoch} groups of an epoch")
        self.epoch, self.position, self.seed = int(epoch), int(position), int(seed)
        self._groups = None
