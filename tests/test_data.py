"""Tests for bcr_jax.data: loading problems from local files, grouping, resumable iteration."""

import json

import datasets
import numpy as np
import pytest

from bcr_jax.data import (
    SOURCES,
    GroupIterator,
    MalformedRowError,
    Problem,
    SourceSpec,
    group_indices,
    load_problems,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Local files only: any attempt to reach the hub fails instead of downloading."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _deepmath_rows(count):
    return [
        {"question": f"Compute {i} + {i}.", "final_answer": str(2 * i), "difficulty": 1.0 + i % 5} for i in range(count)
    ]


# --------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------


def test_registry():
    expected = {
        "deepmath-103k": ("zwhe99/DeepMath-103K", "train", "question", "final_answer", "difficulty"),
        "math-500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer", "level"),
        "aime-2025": ("yentinglin/aime_2025", "train", "problem", "answer", None),
        "amc-2023": ("math-ai/amc23", "test", "question", "answer", None),
        "minerva-math": ("math-ai/minervamath", "test", "question", "answer", None),
        "olympiadbench": ("math-ai/olympiadbench", "test", "question", "final_answer", None),
    }
    got = {
        name: (s.hub_name, s.split, s.problem_field, s.answer_field, s.difficulty_field) for name, s in SOURCES.items()
    }
    assert got == expected


def test_without_a_path_the_registered_hub_dataset_is_requested(cache_dir):
    with pytest.raises(ConnectionError, match="HuggingFaceH4/MATH-500"):  # Offline: the request fails.
        load_problems("math-500", cache_dir=cache_dir)


def test_load_deepmath_jsonl(tmp_path, cache_dir):
    path = _write_jsonl(tmp_path / "deepmath.jsonl", _deepmath_rows(3))
    problems = load_problems("deepmath-103k", path, cache_dir=cache_dir)
    assert problems == [
        Problem("deepmath-103k/0", "Compute 0 + 0.", "0", 1.0, "deepmath-103k"),
        Problem("deepmath-103k/1", "Compute 1 + 1.", "2", 2.0, "deepmath-103k"),
        Problem("deepmath-103k/2", "Compute 2 + 2.", "4", 3.0, "deepmath-103k"),
    ]
    assert problems.num_skipped == 0


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_mapping_loads_a_local_copy(name, tmp_path, cache_dir):
    spec = SOURCES[name]
    row = {spec.problem_field: "What is 6 times 7?", spec.answer_field: "42", "unrelated": 1}
    if spec.difficulty_field:
        row[spec.difficulty_field] = 4
    if spec.id_field:
        row[spec.id_field] = "test/algebra/1.json"
    (problem,) = load_problems(name, _write_jsonl(tmp_path / "copy.jsonl", [row]), cache_dir=cache_dir)
    assert (problem.text, problem.gold, problem.source) == ("What is 6 times 7?", "42", name)
    assert problem.difficulty == (4.0 if spec.difficulty_field else None)
    assert problem.id == ("test/algebra/1.json" if spec.id_field else f"{name}/0")


def test_answer_values_are_rendered_as_text(tmp_path, cache_dir):
    spec = SourceSpec("local", "train", None, "q", "a")
    rows = [{"q": "p0", "a": [" 1 ", "2"]}, {"q": "p1", "a": ["x"]}]
    assert [p.gold for p in load_problems(spec, _write_jsonl(tmp_path / "lists.jsonl", rows), cache_dir=cache_dir)] == [
        "1, 2",
        "x",
    ]
    rows = [{"q": "p0", "a": 70}, {"q": "p1", "a": 27.0}, {"q": "p2", "a": 0.5}]
    assert [
        p.gold for p in load_problems(spec, _write_jsonl(tmp_path / "numbers.jsonl", rows), cache_dir=cache_dir)
    ] == [
        "70",
        "27",
        "0.5",
    ]


def test_parquet_and_json_array_files_load_like_jsonl(tmp_path, cache_dir):
    rows = _deepmath_rows(4)
    from_jsonl = load_problems("deepmath-103k", _write_jsonl(tmp_path / "a.jsonl", rows), cache_dir=cache_dir)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    assert load_problems("deepmath-103k", tmp_path / "a.parquet", cache_dir=cache_dir) == from_jsonl
    assert load_problems("deepmath-103k", tmp_path / "a.json", cache_dir=cache_dir) == from_jsonl


def test_limit_reads_a_prefix(tmp_path, cache_dir):
    path = _write_jsonl(tmp_path / "deepmath.jsonl", _deepmath_rows(5))
    assert [p.id for p in load_problems("deepmath-103k", path, limit=2, cache_dir=cache_dir)] == [
        "deepmath-103k/0",
        "deepmath-103k/1",
    ]


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("question", None, "missing"),
        ("question", "   ", "empty"),
        ("question", 5, "expected a string, got int"),
        ("final_answer", None, "missing"),
        ("final_answer", "", "empty"),
        ("final_answer", [], "empty list"),
        ("final_answer", True, "got bool"),
        ("difficulty", "hard", "not a number: 'hard'"),
        ("difficulty", None, "missing"),
        ("difficulty", [3], "expected a number, got list"),
    ],
)
def test_malformed_rows_raise_or_are_counted(tmp_path, cache_dir, field, value, reason):
    rows = _deepmath_rows(4)
    rows[2][field] = value
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MalformedRowError) as raised:
        load_problems("deepmath-103k", path, cache_dir=cache_dir)
    message = str(raised.value)
    assert str(path) in message and "row 2" in message and repr(field) in message and reason in message

    problems = load_problems("deepmath-103k", path, on_error="skip", cache_dir=cache_dir)
    assert [p.id for p in problems] == ["deepmath-103k/0", "deepmath-103k/1", "deepmath-103k/3"]
    assert problems.num_skipped == 1
    assert (problems.skipped[0].row, problems.skipped[0].field) == (2, field)


def test_loader_errors(tmp_path, cache_dir):
    path = _write_jsonl(tmp_path / "deepmath.jsonl", _deepmath_rows(2))
    with pytest.raises(ValueError, match="unknown source 'gsm8k'; registered: deepmath-103k"):
        load_problems("gsm8k", path)
    missing_column = SourceSpec("local", "train", None, "question", "final_answer", difficulty_field="level")
    with pytest.raises(
        ValueError, match=r"deepmath.jsonl: difficulty field 'level' not found; columns are \['question'"
    ):
        load_problems(missing_column, path, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_problems("deepmath-103k", tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems("deepmath-103k", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_problems("deepmath-103k", path, on_error="ignore")


# --------------------------------------------------------------------------------------------------
# Grouping.
# --------------------------------------------------------------------------------------------------


def _group_mean_spread(difficulties, groups):
    return np.asarray(difficulties)[groups].mean(axis=1).std()


@pytest.mark.parametrize("strategy", ["stratified", "random"])
@pytest.mark.parametrize("num_problems, group_size", [(30, 3), (31, 3), (32, 3), (7, 1), (10, 4)])
def test_every_problem_is_used_at_most_once_per_epoch(strategy, num_problems, group_size):
    difficulties = list(np.random.default_rng(0).random(num_problems))
    groups = group_indices(difficulties, group_size, np.random.default_rng(1), strategy)
    assert groups.shape == (num_problems // group_size, group_size)
    used = groups.ravel()
    assert len(set(used)) == len(used) == num_problems - num_problems % group_size
    assert set(used) <= set(range(num_problems))


def test_stratified_groups_take_one_problem_per_quantile_band():
    difficulties = list(range(30))  # Bands: 0-9, 10-19, 20-29.
    groups = group_indices(difficulties, 3, np.random.default_rng(0))
    bands = np.sort(groups // 10, axis=1)
    np.testing.assert_array_equal(bands, np.tile([0, 1, 2], (10, 1)))
    # Within a group the order is shuffled: the easiest problem is not always problem 1.
    assert len({int(np.argmin(group)) for group in groups}) > 1


@pytest.mark.parametrize(
    "difficulties",
    [
        np.random.default_rng(0).uniform(0, 10, size=3000),  # Continuous.
        np.random.default_rng(0).integers(6, 19, size=3000) / 2,  # DeepMath-like half steps 3..9.
    ],
    ids=["uniform", "half-steps"],
)
def test_stratified_spread_is_much_smaller_than_random(difficulties):
    stratified = _group_mean_spread(difficulties, group_indices(list(difficulties), 3, np.random.default_rng(1)))
    random = _group_mean_spread(difficulties, group_indices(list(difficulties), 3, np.random.default_rng(1), "random"))
    # Random groups: std(d) / sqrt(3). Stratified: about three times smaller.
    np.testing.assert_allclose(random, np.std(difficulties) / np.sqrt(3), rtol=0.1)
    assert stratified < random / 2.5


def test_problems_without_difficulty_are_grouped_randomly():
    difficulties = [None] * 9 + list(range(21))
    groups = group_indices(difficulties, 3, np.random.default_rng(0))
    assert sorted(groups.ravel()) == list(range(30))
    assert len(group_indices([None] * 12, 4, np.random.default_rng(0))) == 3


def test_grouping_errors():
    with pytest.raises(ValueError, match="cannot fill one group"):
        group_indices([1.0, 2.0], 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="strategy"):
        group_indices([1.0, 2.0], 1, np.random.default_rng(0), "sorted")


# --------------------------------------------------------------------------------------------------
# Iteration.
# --------------------------------------------------------------------------------------------------


def _problems(count, with_difficulty=True):
    return [
        Problem(f"p{i}", f"problem {i}", str(i), float(i % 7) if with_difficulty else None, "test")
        for i in range(count)
    ]


def _ids(groups):
    return [tuple(p.id for p in group) for group in groups]


def test_iterator_walks_epochs_using_each_problem_once():
    problems = _problems(10)
    iterator = GroupIterator(problems, 3, seed=5)
    assert (iterator.groups_per_epoch, iterator.dropped_per_epoch) == (3, 1)
    dropped = set()
    for epoch in range(6):
        epoch_ids = [i for group in _ids(next(iterator) for _ in range(3)) for i in group]
        assert len(set(epoch_ids)) == 9
        dropped |= {p.id for p in problems} - set(epoch_ids)
        assert iterator.state_dict() == {"epoch": epoch, "position": 3, "seed": 5}
    assert len(dropped) > 1  # A fresh random sit-out each epoch, not always the same problem.


def test_iterator_is_deterministic_per_seed():
    problems = _problems(12)  # 4 groups per epoch.
    iterators = [
        GroupIterator(problems, 3, seed=1),
        GroupIterator(problems, 3, seed=1),
        GroupIterator(problems, 3, seed=2),
    ]
    same, again, other = (_ids(next(it) for _ in range(8)) for it in iterators)
    assert same == again != other
    assert same[:4] != same[4:]  # Each epoch is reshuffled.


@pytest.mark.parametrize("stop_after", [0, 1, 4, 5, 9])
@pytest.mark.parametrize("with_difficulty", [True, False])
def test_iterator_resumes_exactly_from_a_saved_state(stop_after, with_difficulty):
    problems = _problems(16, with_difficulty)  # 5 groups per epoch, one problem sits out.
    uninterrupted = GroupIterator(problems, 3, seed=3)
    reference = _ids(next(uninterrupted) for _ in range(stop_after + 7))
    interrupted = GroupIterator(problems, 3, seed=3)
    for _ in range(stop_after):
        next(interrupted)
    saved = json.loads(json.dumps(interrupted.state_dict()))  # Survives a checkpoint file.
    resumed = GroupIterator(problems, 3, seed=0)
    resumed.load_state_dict(saved)
    assert _ids(next(resumed) for _ in range(7)) == reference[stop_after:]


def test_iterator_state_validation():
    iterator = GroupIterator(_problems(9), 3)
    for bad, match in [
        ({"epoch": 0, "position": 0}, "exactly the keys"),
        ({"epoch": -1, "position": 0, "seed": 0}, "'epoch' must be a non-negative int"),
        ({"epoch": 0, "position": 1.5, "seed": 0}, "'position' must be a non-negative int"),
        ({"epoch": 0, "position": 4, "seed": 0}, "past the 3 groups"),
    ]:
        with pytest.raises(ValueError, match=match):
            iterator.load_state_dict(bad)
    with pytest.raises(ValueError, match="cannot fill one group"):
        GroupIterator(_problems(2), 3)
    with pytest.raises(ValueError, match="strategy"):
        GroupIterator(_problems(6), 3, strategy="sorted")
