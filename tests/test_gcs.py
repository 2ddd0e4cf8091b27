"""gs:// workdirs (served by tests/fake_gcs.py from a local folder): training, export, evaluation and solve write
what they write in a local workdir, byte for byte where the content is deterministic; unusable buckets are named
before anything loads. The SIGKILL/resume run on gs:// is in test_train.py, the two-process job in
test_distributed.py."""

from __future__ import annotations

import json
import pathlib

import fake_gcs
import jax
import numpy as np
import pytest
from config_files import load_config
from etils import epath

from bcr_jax import build, checkpoint, evaluate, paths, train
from bcr_jax.build import ConfigError

VARIABLE = ("time/", "throughput/")  # wall-clock metrics: never equal between two runs


@pytest.fixture
def gcs(tmp_path):
    with fake_gcs.serve(tmp_path / "gcs", buckets=("bucket", "frozen")) as root:
        yield root


def test_paths_keep_the_scheme_and_make_local_paths_absolute():
    assert str(paths.resolve("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    assert paths.resolve("runs/a").is_absolute() and not paths.is_remote("runs/a")
    assert paths.is_remote(paths.resolve("gs://bucket/runs/a"))


def test_atomic_writes_leave_no_temporary_files(tmp_path, gcs):
    for directory in (tmp_path / "local", "gs://bucket/dir"):
        paths.write_atomic(paths.resolve(directory) / "a.json", "first")
        paths.write_atomic(paths.resolve(directory) / "a.json", b"second")
        (tmp_path / "src.bin").write_bytes(b"\x00\x01")
        paths.put_file(tmp_path / "src.bin", paths.resolve(directory) / "sub" / "b.bin")
        assert paths.resolve(directory).joinpath("a.json").read_text() == "second"
        assert sorted(p.name for p in paths.resolve(directory).iterdir()) == ["a.json", "sub"]
        assert [p.name for p in paths.resolve(directory).joinpath("sub").iterdir()] == ["b.bin"]


def _tiny(workdir, **overrides):
    config = load_config("tiny")
    config.workdir = str(workdir)
    config.total_steps, config.checkpoint_every = 2, 1  # two checkpoints
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def _scalars(tensorboard_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if not tag.startswith(VARIABLE)}


def _rows(workdir) -> list[dict]:
    text = paths.resolve(workdir).joinpath("metrics.jsonl").read_text()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(VARIABLE)} for line in text.splitlines()]


def test_train_export_eval_and_solve_on_gs_write_what_a_local_workdir_gets(tmp_path, gcs):
    local, remote = tmp_path / "local" / "run", "gs://bucket/run"
    for workdir in (local, remote):
        train.run_train(_tiny(workdir))
    stored = fake_gcs.local_path(remote)  # what the bucket holds
    assert sorted(p.name for p in (stored / "checkpoints").iterdir()) == ["1", "2"]
    for step in (1, 2):
        _, a, _, _ = checkpoint.load_run(local, step)
        _, b, _, _ = checkpoint.load_run(remote, step)
        for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
            np.testing.assert_array_equal(x, y)  # bit-identical
    assert _rows(local) == _rows(remote) and [r["step"] for r in _rows(remote)] == [1, 2]
    assert (local / "model_config.json").read_bytes() == (stored / "model_config.json").read_bytes()
    assert json.loads((stored / "config.json").read_text())["workdir"] == remote
    # TensorBoard: written locally, copied into the bucket; the same scalars.
    assert _scalars(local / "tensorboard") == _scalars(stored / "tensorboard") != {}

    exported = [train.run_export(_tiny(workdir, mode="export")) for workdir in (local, remote)]
    assert str(exported[1]) == "gs://bucket/run/export/step_2"
    files = sorted(p.name for p in (stored / "export" / "step_2").iterdir())
    assert files == ["config.json", "model.safetensors"]
    for name in files:
        assert (local / "export" / "step_2" / name).read_bytes() == (stored / "export" / "step_2" / name).read_bytes()

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n"
                             for a, b in ((1, 2), (3, 4), (2, 5), (0, 6))))
    outputs = {}
    for name, run, workdir in (("local", local, tmp_path / "local" / "eval"), ("gs", remote, "gs://bucket/eval")):
        config = _tiny(workdir, mode="eval")
        config.eval.checkpoints, config.eval.benchmarks = (f"{run}@1",), (str(bench),)
        config.eval.n_values, config.eval.samples, config.eval.budget, config.eval.temperature = (1, 2), 2, 2, 1.0
        rows = evaluate.run_eval(config)
        config.solve.path, config.solve.n, config.solve.checkpoint = str(bench), 2, str(run)
        evaluate.run_solve(config)
        out = paths.resolve(workdir)
        outputs[name] = {
            "rows": [{k: v for k, v in r.items() if k != "cell"} for r in rows],  # cell: a hash of the path
            "table": json.loads(out.joinpath("scaling_law.json").read_text()),
            "responses": sorted(p.read_text() for p in out.joinpath(evaluate.CELLS_DIR).glob("*.jsonl")),
            "csv": [line.rsplit(",", 1)[0] for line in out.joinpath("scaling_law.csv").read_text().splitlines()],
            "solutions": out.joinpath("solutions.jsonl").read_bytes(),
            "png": out.joinpath("scaling_law.png").read_bytes(),
        }
    assert outputs["gs"]["rows"][0]["checkpoint"] == "run@1" and len(outputs["gs"]["responses"]) == 2
    assert [{k: v for k, v in r.items() if k != "cell"} for r in outputs["gs"]["table"]] == outputs["gs"]["rows"]
    for key in ("rows", "responses", "csv", "solutions", "png"):
        assert outputs["gs"][key] == outputs["local"][key], key
    assert outputs["gs"]["png"].startswith(b"\x89PNG\r\n\x1a\n")
    leftovers = [p for p in stored.parent.rglob("*") if "tmp" in p.name or "staging" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("workdir, message", [
    ("gs://nowhere/run", "config.workdir: gs://nowhere/run: bucket gs://nowhere does not exist"),
    ("gs://frozen/run", "config.workdir: gs://frozen/run is not writable: PermissionError: gs://frozen: 403"),
])
def test_an_unusable_bucket_is_named_before_the_model_loads(workdir, message, gcs, monkeypatch):
    monkeypatch.setenv(fake_gcs.READ_ONLY_ENV, "frozen")
    monkeypatch.setattr(build, "load_model", lambda *a: pytest.fail("the model was loaded"))
    for config in (_tiny(workdir), _tiny(workdir, mode="eval")):
        config.eval.checkpoints, config.eval.benchmarks = (), ("/no/benchmark/needed.jsonl",)
        with pytest.raises(ConfigError) as error:
            (train.run_train if config.mode == "train" else evaluate.run_eval)(config)
        assert str(error.value).startswith(message), error.value
    assert not fake_gcs.local_path(workdir).exists()  # nothing written


def test_the_fake_refuses_appends_and_writes_objects_whole(gcs):
    """What the code above must live with on GCS (and the fake enforces): no appends, whole objects."""
    target = epath.Path("gs://bucket/log.txt")
    target.write_text("one\n")
    with pytest.raises(NotImplementedError):
        target.open("a")
    with target.open("w") as f:
        f.write("two\n")
        assert target.read_text() == "one\n"  # the old object until the upload finishes
    assert target.read_text() == "two\n"
    assert pathlib.Path(fake_gcs.local_path("gs://bucket/log.txt")).read_text() == "two\n"
