"""The file names inside a run directory and an export directory: their one owner.

RUN/                       (`setdiv train --run-dir RUN`)
  config.yaml              the resolved config the run trains with
  vocab.json               its bi-GRU vocabulary (bigru models)
  metrics.jsonl            one JSON record per logged step / validation
  tb/                      TensorBoard events
  checkpoints/             DeepSpeed checkpoints (`latest` names the newest)
  train.lock               the pid and host of the training using RUN
  export/                  `setdiv export RUN` (an export directory)

EXPORT/                    (`setdiv export`, read by eval, index, search, `setdiv.load`)
  model.safetensors        fp32 weights
  config.yaml              the config
  vocab.json               bi-GRU vocabulary (bigru models)
  bert/                    the Hugging Face config and tokenizer (bert models)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ExportFiles", "RunFiles"]


class _Directory:
    """A directory whose files have fixed names; what runs and exports share."""

    __slots__ = ("root",)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab.json"


class RunFiles(_Directory):
    """The paths of a run directory's files."""

    __slots__ = ()

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.root / "train.lock"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def marks(self) -> tuple[Path, ...]:
        """What a training leaves: a checkpoint or a record in them means RUN holds a run."""
        return (self.checkpoints, self.metrics, self.tb)

    @property
    def written(self) -> tuple[Path, ...]:
        """Everything a training writes (what `--overwrite` deletes)."""
        return (*self.marks, self.config, self.vocab, self.export)


class ExportFiles(_Directory):
    """The paths of an export directory's files."""

    __slots__ = ()

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def bert(self) -> Path:
        return self.root / "bert"

    def complete(self) -> bool:
        """Whether the weights and the config are there."""
        return self.weights.is_file() and self.config.is_file()
