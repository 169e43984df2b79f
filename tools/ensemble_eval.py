"""Average the similarity matrices of several runs (e.g. seeds) and compare with each alone.

    python tools/ensemble_eval.py runs/s0/eval/sims.npy runs/s1/eval/sims.npy --protocol coco \
        [--out runs/ensemble]

Each sims.npy needs its sims_meta.json beside it; all must share shape, image ids and caption ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from setdiv.eval.evaluator import EvalResult, format_table, protocol_metrics, write_result


def load_sims(path: Path) -> tuple[np.ndarray, dict]:
    meta_path = path.with_name("sims_meta.json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no sims_meta.json beside it")
    return np.load(path, allow_pickle=False), json.loads(meta_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sims", nargs="+", type=Path, help="sims.npy files")
    parser.add_argument("--protocol", choices=("coco", "f30k"), default="coco")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the ensemble's sims + metrics"
    )
    args = parser.parse_args(argv)

    loaded = [load_sims(p) for p in args.sims]
    first_sims, first_meta = loaded[0]
    for path, (sims, meta) in zip(args.sims[1:], loaded[1:], strict=True):
        if sims.shape != first_sims.shape:
            raise SystemExit(f"{path}: shape {sims.shape} differs from {first_sims.shape}")
        for key in ("image_ids", "caption_ids"):
            if meta[key] != first_meta[key]:
                raise SystemExit(f"{path}: {key} differ from {args.sims[0]}")
    ensemble = np.mean(np.stack([s for s, _ in loaded]), axis=0, dtype=np.float64).astype(
        np.float32
    )
    ids = (first_meta["image_ids"], first_meta["caption_ids"])
    rows: dict[str, dict[str, float]] = {}
    for path, (sims, _) in zip(args.sims, loaded, strict=True):
        for name, m in protocol_metrics(sims, args.protocol, *ids).items():
            rows[f"{path.parent.name or path.stem}:{name}"] = m
    ens_metrics = protocol_metrics(ensemble, args.protocol, *ids)
    rows.update({f"ensemble:{name}": m for name, m in ens_metrics.items()})
    print(format_table(rows, title=f"{len(loaded)} models, protocol {args.protocol}"))
    if args.out:
        meta = {"members": [str(p) for p in args.sims], "protocol": args.protocol}
        write_result(EvalResult(ensemble, *ids, ens_metrics, meta), args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
