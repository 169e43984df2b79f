"""How fast the built-in synthetic dataset is generated (scenes with their region features,
`setdiv.data.synthetic`), against how fast the evaluation reader reads the same scenes back
from shards, measured in the same run: generation must never be what `setdiv demo` waits for.

    python tools/bench_synthetic.py [--scenes 10000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from setdiv.data import synthetic
from setdiv.data.convert import synthetic_samples
from setdiv.data.reader import EvalReader, SampleOptions
from setdiv.data.shards import write_shards
from setdiv.data.text import Tokenizer
from setdiv.data.vocab import SPECIALS, Vocab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=10_000)
    args = p.parse_args()
    t0 = time.perf_counter()
    for i in range(args.scenes):
        synthetic.render_regions(synthetic.make_scene(0, i))
    generate = args.scenes / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = list(synthetic_samples("test", args.scenes, 0))
        write_shards(samples, Path(tmp), "test", "regions", "synthetic", 1000)
        vocab = Vocab.build(c for s in samples[:500] for c in s.captions)
        tok = Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))
        reader = EvalReader(f"{tmp}/test-*.tar", SampleOptions("regions", tok, False), 256)
        t0 = time.perf_counter()
        read = sum(len(b.image_ids) for b in reader)
        read_rate = read / (time.perf_counter() - t0)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; {args.scenes} scenes")
    print(f"generate (scene + regions): {generate:9.0f} scenes/s")
    print(f"read back from shards:      {read_rate:9.0f} scenes/s")
    print(f"generation / reading:       {generate / read_rate:9.2f}x")


if __name__ == "__main__":
    main()
