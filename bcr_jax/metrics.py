"""Training metrics: TensorBoard event files (tensorboardX), `metrics.jsonl` in the workdir, and a console line.

Only scalars are written. On resume, `metrics.jsonl` rows from steps after the restored checkpoint are dropped, so
the file always describes one run without duplicated or orphaned steps.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile

from bcr_jax import paths

# The console line: (metric key, label, format). Everything else goes to the files only.
CONSOLE_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("accuracy/instance", "acc", "{:.3f}"),
    ("tokens/per_problem", "tok/prob", "{:.1f}"),
    ("rollout/truncation_rate", "trunc", "{:.2f}"),
    ("policy/entropy", "ent", "{:.3f}"),
    ("policy/clip_fraction", "clip", "{:.3f}"),
    ("policy/kl", "kl", "{:.4f}"),
    ("optim/grad_norm", "|g|", "{:.3f}"),
    ("optim/learning_rate", "lr", "{:.1e}"),
    ("rollout/logprob_gap", "gap", "{:.1e}"),
    ("optim/skipped_updates", "skip", "{:.0f}"),
    ("time/step_s", "s", "{:.1f}"),
)


class MetricsWriter:
    """Writes each step's scalars to TensorBoard and `metrics.jsonl`; `enabled=False` (non-zero processes) writes
    nothing.

    A local `metrics.jsonl` is appended to. A GCS object cannot be appended to, so in a `gs://` workdir the file is
    rewritten whole each step (one small upload; readers see the previous version until it finishes). tensorboardX
    writes `gs://` only through google-cloud-storage, re-uploading the whole event file from memory at every flush and
    bypassing the workdir's file system; so with a remote workdir its events go to a local directory that is copied
    to `workdir/tensorboard` after each step's flush.
    """

    def __init__(self, workdir: paths.PathLike, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        workdir = paths.resolve(workdir)
        self.path = workdir / "metrics.jsonl"
        self._remote = paths.is_remote(workdir)
        self._lines: list[str] = []  # remote workdirs: the whole file, rewritten at every step
        self._tensorboard = None
        self._mirror = None
        if not enabled:
            return
        if not self._remote:
            workdir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        if self._remote:
            self._mirror = _Mirror(workdir / "tensorboard")
            logdir = str(self._mirror.local)
        else:
            logdir = str(workdir / "tensorboard")
        self._tensorboard = SummaryWriter(logdir, purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        paths.write_atomic(self.path, "".join(line + "\n" for line in kept))  # never half a file
        if self._remote:
            self._lines = kept

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = json.dumps({"step": step, **{k: float(v) for k, v in sorted(scalars.items())}})
        if self._remote:
            self._lines.append(row)
            paths.write_atomic(self.path, "".join(line + "\n" for line in self._lines))
        else:
            with self.path.open("a") as f:
                f.write(row + "\n")
        for key, value in scalars.items():
            if math.isfinite(float(value)):
                self._tensorboard.add_scalar(key, float(value), step)
        self._tensorboard.flush()
        if self._mirror is not None:
            self._mirror.sync()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._mirror is not None:
            self._mirror.close()


class _Mirror:
    """A local directory whose files are copied to `dest` on `sync` (those whose size changed since the last)."""

    def __init__(self, dest: paths.Path):
        self.dest = dest
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="bcr_jax-tensorboard-"))
        self._synced: dict[str, int] = {}

    def sync(self) -> None:
        for file in sorted(self.local.iterdir()):
            size = file.stat().st_size
            if self._synced.get(file.name) != size:
                paths.put_file(file, self.dest / file.name)
                self._synced[file.name] = size

    def close(self) -> None:
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)


def console_line(step: int, total_steps: int, scalars: dict[str, float]) -> str:
    """One line per step: the headline metrics, then the time split."""
    parts = [f"step {step}/{total_steps}"]
    for key, label, fmt in CONSOLE_FIELDS:
        if key in scalars:
            parts.append(f"{label} {fmt.format(scalars[key])}")
    split = [(k.removeprefix("time/").removesuffix("_s"), v) for k, v in scalars.items()
             if k.startswith("time/") and k != "time/step_s"]
    if split:
        parts.append("[" + " ".join(f"{name} {value:.1f}s" for name, value in split) + "]")
    return " | ".join(parts)
