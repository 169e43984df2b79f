"""Set-based image-text retrieval with diverse embeddings (DivE) at cluster scale.

`setdiv.load(path)` gives a trained model's encoders and similarity (`setdiv.api`)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":  # (imported on first use: `import setdiv` stays light, no torch)
        from setdiv.api import load

        return load
    raise AttributeError(f"module 'setdiv' has no attribute {name!r}")
