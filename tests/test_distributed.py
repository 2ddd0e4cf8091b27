"""Several JAX processes: `config.distributed`, the host-side helpers, and whole jobs of two processes on 127.0.0.1
(4 simulated CPU devices each, gloo collectives) against one process with 8 devices — training, its checkpoint
restored elsewhere, export and evaluation."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import fake_gcs
import jax
import numpy as np
import pytest
from etils import epath
from config_files import ROOT, load_config

from bcr_jax import build, checkpoint, distributed, models, sharding
from bcr_jax.build import ConfigError

# ------------------------------------------------------------------------------------------------ config

def _section(**overrides):
    dist = load_config("base").distributed
    for key, value in overrides.items():
        dist[key] = value
    return dist


def test_a_plain_single_process_does_not_initialize():
    assert distributed.initialize_arguments(_section(), environ={}) is None
    assert distributed.initialize_arguments(_section(initialize="off"), environ={"TPU_WORKER_ID": "0"}) is None


def test_explicit_settings_become_initialize_arguments():
    args = distributed.initialize_arguments(_section(coordinator_address="10.0.0.2:8476", num_processes=4,
                                                     process_id=3, local_device_ids=(6, 7)), environ={})
    assert args == dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3, local_device_ids=[6, 7],
                        initialization_timeout=300)


@pytest.mark.parametrize("environ, cluster", [
    ({"TPU_WORKER_ID": "1"}, "Cloud TPU"), ({"CLOUD_TPU_TASK_ID": "0"}, "Cloud TPU"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "Slurm"), ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7"}, None), ({"OMPI_MCA_orte_hnp_uri": "x"}, "Open MPI"), ({}, None)])
def test_clusters_are_detected_and_left_to_jax(environ, cluster):
    detected = distributed.detect_cluster(environ)
    assert (detected is None) if cluster is None else detected.startswith(cluster)
    args = distributed.initialize_arguments(_section(), environ=environ)
    if cluster is None:
        assert args is None
    else:  # everything left for jax.distributed.initialize() to detect
        assert args["coordinator_address"] is None and args["num_processes"] is None and args["process_id"] is None
    # 'on' leaves detection to jax.distributed even without an environment variable (Cloud TPU VMs: metadata server).
    assert distributed.initialize_arguments(_section(initialize="on"), environ=environ)["process_id"] is None


@pytest.mark.parametrize("overrides, key", [
    (dict(initialize="sometimes"), "initialize"),
    (dict(initialize="off", num_processes=2), "initialize"),
    (dict(coordinator_address="localhost"), "coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234"), "num_processes"),  # nothing to detect the rest from
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "process_id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "process_id"),
    (dict(num_processes=-1), "num_processes"),
    (dict(cpu_collectives="nccl"), "cpu_collectives"),
])
def test_inconsistent_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^config\.distributed\.{key}: "):
        distributed.initialize_arguments(_section(**overrides), environ={})


def test_a_bad_distributed_setting_is_one_line_from_main(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "bcr_jax.main", "--config", "configs/tiny.py", f"--config.workdir={tmp_path / 'run'}",
         "--config.distributed.coordinator_address=127.0.0.1:1234"],
        cwd=ROOT, env=_env(devices=1), capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.splitlines()[-1].startswith("error: config.distributed.num_processes: not set")
    assert "Traceback" not in process.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ helpers

@pytest.mark.parametrize("processes", [1, 2, 3, 5])
def test_blocks_are_contiguous_balanced_and_in_order(processes):
    for count in range(0, 13):
        blocks = [distributed.block(count, i, processes) for i in range(processes)]
        assert [i for b in blocks for i in range(count)[b]] == list(range(count))
        sizes = [b.stop - b.start for b in blocks]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_helpers_are_identities_in_one_process():
    assert jax.process_count() == 1 and distributed.is_main()
    rows = np.arange(12).reshape(6, 2)
    assert distributed.gather_blocks(rows, 3, rows_per_item=2) is rows
    assert distributed.gather_token_lists([[1, 2], [3]], 2) == [[1, 2], [3]]
    mesh = sharding.make_mesh()
    placed = distributed.put(np.arange(16, dtype=np.float32).reshape(8, 2), sharding.batch_sharding(mesh, 2, 8))
    assert len(placed.sharding.device_set) == 8
    np.testing.assert_array_equal(distributed.fetch(placed), np.arange(16).reshape(8, 2))
    np.testing.assert_array_equal(distributed.sum_over_processes(np.array([1, 2])), [1, 2])


# ------------------------------------------------------------------------------------------------ whole jobs

# Variables from which jax.distributed would detect a cluster (the tests may run inside a Slurm job).
_CLUSTER_PREFIXES = ("SLURM_", "TPU_", "CLOUD_TPU_", "MEGASCALE_", "OMPI_")
# 64 rows a step; two mini-batches of 32 (each mixing both processes' groups), of two micro-batches each; segment
# credit and a text count: every per-row result the processes gather; dynamic sampling: the step's groups are picked
# from several rounds, each graded by both processes.
TRAIN = ["--config", "configs/tiny.py", "--config.total_steps=2", "--config.checkpoint_every=1",
         "--config.rollout.prompts_per_step=8", "--config.train.mini_batch_size=32", "--config.train.micro_batch_size=16",
         "--config.reward.credit=segment", "--config.train.count_text=boxed", "--config.rollout.dynamic_sampling=True"]
JOB_TIMEOUT_S = 600


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Job:
    """`python -m bcr_jax.main` as one process with 8 devices, or as two with 4 each; output in files. Every process
    serves gs:// from the fake bucket folder `gcs` (tests/fake_gcs.py)."""

    def __init__(self, name: str, args: list[str], processes: int, logs: pathlib.Path, gcs: pathlib.Path):
        self.name, self.args, self.processes, self.logs, self.gcs = name, args, processes, logs, gcs
        self.popens: list[subprocess.Popen] = []

    def start(self):
        port = _free_port()
        for i in range(self.processes):
            extra = [] if self.processes == 1 else [
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={self.processes}", f"--config.distributed.process_id={i}"]
            with open(self.log(i, "out"), "w") as out, open(self.log(i, "err"), "w") as err:
                # A session of its own, so that killing its group also kills its grading workers.
                self.popens.append(subprocess.Popen(
                    [*fake_gcs.command(), *self.args, *extra], cwd=ROOT,
                    env=_env(8 // self.processes) | {fake_gcs.ROOT_ENV: str(self.gcs)}, stdout=out, stderr=err,
                    start_new_session=True))

    def log(self, i: int, stream: str) -> pathlib.Path:
        return self.logs / f"{self.name}.{i}.{stream}"

    def read(self, i: int, stream: str) -> str:
        return self.log(i, stream).read_text()

    def kill(self):
        for popen in self.popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(30)


@contextlib.contextmanager
def _running(*jobs: _Job):
    """Starts the jobs; on leaving (normally, on a failure or on a pytest-timeout) kills whatever still runs."""
    try:
        for job in jobs:
            job.start()
        yield jobs
    finally:
        for job in jobs:
            job.kill()


def _wait(*jobs: _Job, timeout_s: float = JOB_TIMEOUT_S):
    """Until every process has exited 0; the first failure (its stderr's tail) or the deadline fails the test
    at once — its partner would otherwise wait for it at the next collective."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = 0
        for job in jobs:
            for i, popen in enumerate(job.popens):
                code = popen.poll()
                if code is None:
                    running += 1
                elif code != 0:
                    pytest.fail(f"{job.name} process {i} exited with {code}:\n{job.read(i, 'err')[-3000:]}")
        if not running:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{[j.name for j in jobs]} still running after {timeout_s} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Training (one process in a local workdir, two processes in a gs:// one), then on the two-process run: export by
    two processes, evaluation by one (local workdir) and by two processes (gs://). Each phase's jobs run side by
    side."""
    root = tmp_path_factory.mktemp("distributed")
    logs = root / "logs"
    logs.mkdir()
    gcs = root / "gcs"
    single, double = root / "train_single", epath.Path("gs://bucket/train_double")
    eval_single, eval_double = root / "eval_single", epath.Path("gs://bucket/eval_double")
    bench = root / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n"
                             for a, b in ((1, 2), (3, 4), (2, 5), (0, 6), (4, 4), (1, 1))))
    evaluate = ["--config", "configs/tiny.py", "--config.mode=eval", f"--config.eval.checkpoints=('{double}',)",
                f"--config.eval.benchmarks=('{bench}',)", "--config.eval.n_values=(1,2)", "--config.eval.samples=4",
                "--config.eval.budget=2", "--config.eval.temperature=1.0", "--config.eval.batch_prompts=8"]
    train_jobs = (_Job("train_single", [*TRAIN, f"--config.workdir={single}"], 1, logs, gcs),
                  _Job("train_double", [*TRAIN, f"--config.workdir={double}"], 2, logs, gcs))
    later = (_Job("export_double", ["--config", "configs/tiny.py", "--config.mode=export",
                                    f"--config.workdir={double}"], 2, logs, gcs),
             _Job("eval_single", [*evaluate, f"--config.workdir={eval_single}"], 1, logs, gcs),
             _Job("eval_double", [*evaluate, f"--config.workdir={eval_double}"], 2, logs, gcs))
    with fake_gcs.serve(gcs):  # here too: the tests read the bucket
        start = time.monotonic()
        with _running(*train_jobs):
            _wait(*train_jobs)
        with _running(*later):
            _wait(*later)
        print(f"distributed jobs: {time.monotonic() - start:.0f} s", file=sys.stderr)
        yield {job.name: job for job in (*train_jobs, *later)} | {
            "single": single, "double": double, "eval_single_dir": eval_single, "eval_double_dir": eval_double}


def _params(workdir, **kwargs):
    _, params, _, step = checkpoint.load_run(workdir, **kwargs)
    return step, jax.device_get(params)


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(1800, method="signal")
def test_two_processes_train_like_one(jobs):
    """Same groups, same samples, same grades, same updates: the final params agree to the f32 rounding of the
    collectives, and every metric but the timings matches."""
    step_1, one = _params(jobs["single"])
    step_2, two = _params(jobs["double"])  # restored here, in one process with 8 devices
    assert step_1 == step_2 == 2
    initial = jax.device_get(models.init_params(build.model_config(load_config("tiny")), jax.random.key(0)))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(initial)))
    differ = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)))
    assert moved > 1e-3 and differ < 1e-4, (moved, differ)

    rows_1, rows_2 = _metrics(jobs["single"]), _metrics(jobs["double"])
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2] == [1, 2]
    for row_1, row_2 in zip(rows_1, rows_2):
        assert row_1.keys() == row_2.keys()
        for key in row_1:
            if key.startswith(("time/", "throughput/")):
                continue
            if key.startswith(("reward/", "accuracy/", "grading/", "tokens/", "rollout/truncation",
                               "rollout/response")):
                assert row_1[key] == row_2[key], key  # sampled tokens and verdicts: identical
            else:
                assert row_1[key] == pytest.approx(row_2[key], rel=1e-4, abs=1e-6), key
    assert any(k.startswith("grading/") for k in rows_2[0])  # the verdicts of both processes were counted
    assert all(r["rollout/resample_rounds"] > 0 and r["rollout/kept_groups"] == 8 for r in rows_2)  # groups picked

    # Only process 0 wrote the console lines and logs; the other computed.
    job = jobs["train_double"]
    assert "step 2/2" in job.read(0, "out") and "step" not in job.read(1, "out")
    assert "config:" in job.read(0, "err") and "config:" not in job.read(1, "err")


@pytest.mark.timeout(1800, method="signal")
def test_the_two_process_checkpoint_restores_anywhere_and_exports(jobs):
    """Restored in one process on 8 devices or on 1, and by two processes for export: the same values, bit for bit."""
    _, on_8 = _params(jobs["double"])
    _, on_1 = _params(jobs["double"], mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    exported = fake_gcs.local_path(str(jobs["double"] / "export" / "step_2"))  # safetensors: read locally
    cfg, from_export = models.load_hf(exported)
    for a, b in zip(jax.tree.leaves(on_8), jax.tree.leaves(on_1)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(on_8), jax.tree.leaves(jax.device_get(from_export))):
        np.testing.assert_array_equal(a, b)
    assert "exported step 2" in jobs["export_double"].read(0, "out")
    assert "exported" not in jobs["export_double"].read(1, "out")


@pytest.mark.timeout(1800, method="signal")
def test_two_process_eval_writes_the_single_process_table(jobs):
    one = json.loads((jobs["eval_single_dir"] / "scaling_law.json").read_text())
    two = json.loads((jobs["eval_double_dir"] / "scaling_law.json").read_text())  # in the bucket
    assert [r["n"] for r in two] == [1, 2] and one == two
    responses = lambda workdir: sorted(p.read_text() for p in (workdir / "eval_cells").glob("*.jsonl"))
    assert responses(jobs["eval_single_dir"]) == responses(jobs["eval_double_dir"])
    job = jobs["eval_double"]
    assert "# Task-scaling law" in job.read(0, "out") and "Task-scaling" not in job.read(1, "out")
    progress = re.compile(r"eval: +(\d+%|\d+/\d+ prompts)")  # tqdm's bar or the plain progress line
    assert progress.search(job.read(0, "err")) and not progress.search(job.read(1, "err"))
