"""Training metrics: TensorBoard event files (tensorboardX), `metrics.jsonl` in the workdir, and a console line.

Only scalars are written. On resume, `metrics.jsonl` rows from steps after the restored checkpoint are dropped, so
the file always describes one run without duplicated or orphaned steps.
"""

from __future__ import annotations

import json
import math
import pathlib

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
    nothing."""

    def __init__(self, workdir: str | pathlib.Path, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)  # atomic: never half a file

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in sorted(scalars.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in scalars.items():
            if math.isfinite(float(value)):
                self._tensorboard.add_scalar(key, float(value), step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


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
