"""Training records: the only writer of a run's metrics.

    RUN/metrics.jsonl   one JSON object a line: every `train.log_every` steps
                        {"step", "epoch", <loss terms>, "loss", "lr", "samples_per_s",
                        "skipped_samples", "nonfinite_steps"}; after every validation
                        {"step", "epoch", "val_rsum"}
    RUN/tb/             the same numbers as TensorBoard scalars (`train/<key>`, `val/rsum`)

Rank 0 writes; on the other ranks the writer only keeps time. A resumed run first drops the
records past its restart step: those steps are trained, and recorded, again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from setdiv.paths import RunFiles
from setdiv.train.checkpoint import TrainState

__all__ = ["MetricsWriter"]


class MetricsWriter:
    """Writes `metrics.jsonl` and TensorBoard scalars (when `enabled`: rank 0), decides when a
    step is logged, and measures the training throughput between two logged steps."""

    def __init__(self, run_dir: str | Path, log_every: int, enabled: bool) -> None:
        self.path = RunFiles(run_dir).metrics
        self.log_every, self.enabled = log_every, enabled
        self.tb = SummaryWriter(str(RunFiles(run_dir).tb)) if enabled else None
        self.start_timing()

    def truncate(self, step: int) -> None:
        """Drop the records of steps after `step` (a resume's restart point; 0: all)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(k + "\n" for k in kept))

    def start_timing(self) -> None:
        """Measure the throughput from now on (an epoch's start: validation is not training)."""
        self._since, self._samples = time.perf_counter(), 0

    def count(self, samples: int) -> None:
        """`samples` more trained (on all ranks together) since the last logged step."""
        self._samples += samples

    def should_log(self, step: int) -> bool:
        """Whether the step just taken is recorded (a skipped non-finite step never is)."""
        return step % self.log_every == 0

    def log_train(self, state: TrainState, terms: dict[str, float], lr: float) -> float:
        """Record a training step's global loss terms with the run's counters; returns the
        samples per second since the last logged step (on every rank)."""
        now = time.perf_counter()
        samples_per_s = self._samples / max(now - self._since, 1e-9)
        self._since, self._samples = now, 0
        record = {
            "step": state.step,
            "epoch": state.epoch,
            **terms,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "skipped_samples": state.skipped_samples,
            "data_retries": state.data_retries,
            "nonfinite_steps": state.nonfinite_steps,
        }
        self._append(record)
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, state.step)
        return samples_per_s

    def log_validation(self, state: TrainState, rsum: float) -> None:
        """Record a validation RSUM (NaN for a model whose scores are not finite)."""
        self._append({"step": state.step, "epoch": state.epoch, "val_rsum": rsum})
        if self.tb is not None:
            self.tb.add_scalar("val/rsum", rsum, state.step)

    def close(self) -> None:
        """Flush and close TensorBoard's event file."""
        if self.tb is not None:
            self.tb.close()

    def _append(self, record: dict[str, float]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
