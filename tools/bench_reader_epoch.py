"""Time one training-reader epoch of BUTD-sized region shards with whichever `setdiv` is
importable, to compare two commits A/B in fresh processes (put a `git worktree` of the other
commit first on PYTHONPATH):

    for i in 1 2 3 4 5 6 7; do for w in 0 2; do
      PYTHONPATH=/tmp/wt-OTHER .venv/bin/python tools/bench_reader_epoch.py --workers $w
      .venv/bin/python tools/bench_reader_epoch.py --workers $w
    done; done

Prints the reader's checkout, the worker count and the median samples/s of `--repeats` epochs.
The shards (2000 x 36 x 2048 regions, 100 per shard) are written once to `--data`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_reader import write_region_shards  # noqa: E402

from setdiv.config import TextEncoderConfig  # noqa: E402
from setdiv.data import reader  # noqa: E402
from setdiv.data.text import build_tokenizer  # noqa: E402
from setdiv.data.vocab import Vocab  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("/tmp/setdiv_bench_reader_epoch"))
    args = parser.parse_args()
    if not (args.data / "regions").is_dir():
        args.data.mkdir(parents=True, exist_ok=True)
        write_region_shards(args.data, 2000)
    vocab = Vocab.build(["a man riding a horse on a beach number"])
    tok = build_tokenizer(TextEncoderConfig(), vocab)
    opts = reader.SampleOptions("regions", tok, True, region_dropout=0.2, word_dropout=0.2)
    rates = []
    for _ in range(args.repeats):
        train = reader.TrainReader(
            f"{args.data}/regions/train-*.tar", opts, 100, num_workers=args.workers,
            shuffle_buffer=200,
        )  # fmt: skip
        t0 = time.perf_counter()
        n = sum(b.images.shape[0] for b in train.epoch(0))
        rates.append(n / (time.perf_counter() - t0))
    checkout = Path(reader.__file__).parents[2]
    print(f"{checkout}  workers={args.workers}  {statistics.median(rates):.0f} samples/s")


if __name__ == "__main__":
    main()
