"""The benchmark's ambiguous region-feature dataset (SCAN precomputed layout), its shards and
vocabulary."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from learning_bench.runner import run_cmd, setdiv_cmd
from learning_bench.variants import CAPS, FEAT_DIM, NUM_REGIONS

# --- data ------------------------------------------------------------------------------------

NOUNS = (  # noqa: SIM905
    "car dog cat horse bus tree man woman boat bird chair table cup bottle kite train plane "
    "bike clock phone laptop pizza cake umbrella bench sheep cow elephant giraffe zebra bear "
    "truck sign lamp vase book ball bowl banana apple couch bed oven sink teddy skateboard "
    "surfboard racket fork knife spoon sandwich orange carrot donut toilet tv mouse keyboard "
    "remote microwave toaster fridge scissors toothbrush hydrant backpack handbag tie suitcase "
    "frisbee skis snowboard glove helmet pillow blanket bucket basket pot"
).split()
COLOURS = (
    "red", "blue", "green", "yellow", "white", "black", "brown", "purple", "pink", "grey", "silver",
    "golden",
)  # fmt: skip
ONE = (
    "a photo of {a}",
    "there is {a} in the picture",
    "{a} in the scene",
    "a close up view of {a}",
    "an image with {a}",
    "{a} can be seen here",
)
TWO = (
    "a photo of {a} next to {b}",
    "{a} and {b}",
    "there is {a} near {b}",
    "an image of {a} beside {b} in the scene",
    "{a} with {b} behind it",
)
SPLIT_CODE = {"train": 0, "dev": 1, "test": 2}


@dataclass(frozen=True)
class DataSpec:
    """The generated dataset; its JSON is stamped next to the files (regenerated on change)."""

    train: int = 4000
    dev: int = 500
    test: int = 1000
    train_eval: int = 1000
    """Images of train (its first ones) evaluated for the train-split RSUM."""
    seed: int = 0
    num_types: int = 80
    num_colours: int = 12
    min_objects: int = 3
    max_objects: int = 6
    colour_prob: float = 0.85
    """Probability that a caption names an object's colour."""
    pair_prob: float = 0.7
    """Probability that a caption names a second object."""
    clutter_prob: float = 0.5
    """Probability that a background region is a faint copy of an unnamed object type."""
    colour_min: float = 0.3
    colour_max: float = 0.7
    """Range of the colour prototype's strength in an object region (the type's is 1)."""


class World:
    """Fixed non-negative prototypes of object types and colours, shared by all splits."""

    def __init__(self, spec: DataSpec) -> None:
        rng = np.random.default_rng([spec.seed, 999])
        self.spec = spec
        self.types_TC = _sparse(rng, (spec.num_types, FEAT_DIM), 0.08, 1.0)
        self.colours_PC = _sparse(rng, (spec.num_colours, FEAT_DIM), 0.05, 0.8)

    def image(self, split_code: int, index: int) -> tuple[np.ndarray, list[str]]:
        """One image: (36, 2048) float32 regions and its 5 captions."""
        s = self.spec
        rng = np.random.default_rng([s.seed, split_code, index])
        n = int(rng.integers(s.min_objects, s.max_objects + 1))
        types = rng.choice(s.num_types, n, replace=False)
        colours = rng.integers(s.num_colours, size=n)
        rows = []
        for t, c in zip(types, colours, strict=True):
            for _ in range(int(rng.integers(1, 3))):  # a detector boxes an object 1-2 times
                keep = rng.random(FEAT_DIM) < 0.75
                gain = np.clip(1 + 0.3 * rng.standard_normal(FEAT_DIM), 0, None)
                strength = rng.uniform(s.colour_min, s.colour_max)
                rows.append(
                    self.types_TC[t] * keep * gain
                    + strength * self.colours_PC[c] * keep
                    + _sparse(rng, FEAT_DIM, 0.1, 0.5)
                )
        while len(rows) < NUM_REGIONS:
            row = _sparse(rng, FEAT_DIM, 0.1, 0.5)
            if rng.random() < s.clutter_prob:
                faint = self.types_TC[rng.integers(s.num_types)] * (rng.random(FEAT_DIM) < 0.5)
                row = row + rng.uniform(0.2, 0.5) * faint
            rows.append(row)
        regions_RC = np.stack(rows)[rng.permutation(NUM_REGIONS)].astype(np.float32)
        return regions_RC, self._captions(rng, types, colours)

    def _captions(self, rng: np.random.Generator, types: np.ndarray, colours: np.ndarray) -> list:
        def phrase(o: int) -> str:
            noun = NOUNS[types[o]]
            if rng.random() < self.spec.colour_prob:
                noun = f"{COLOURS[colours[o]]} {noun}"
            return ("an " if noun[0] in "aeiou" else "a ") + noun

        n, order, caps = len(types), rng.permutation(len(types)), []
        for j in range(CAPS):  # consecutive captions name different objects
            a = int(order[j % n])
            if rng.random() < self.spec.pair_prob:
                b = int(rng.choice([o for o in range(n) if o != a]))
                caps.append(TWO[rng.integers(len(TWO))].format(a=phrase(a), b=phrase(b)))
            else:
                caps.append(ONE[rng.integers(len(ONE))].format(a=phrase(a)))
        return caps


def _sparse(rng: np.random.Generator, shape, density: float, scale: float) -> np.ndarray:
    return (rng.random(shape) < density) * rng.exponential(scale, shape)


def _write_split(world: World, root: Path, split: str, n: int) -> None:
    ims = np.lib.format.open_memmap(
        root / f"{split}_ims.npy", mode="w+", dtype=np.float32, shape=(n, NUM_REGIONS, FEAT_DIM)
    )
    caps, ids = [], []
    for i in range(n):
        ims[i], c = world.image(SPLIT_CODE[split], i)
        caps += c
        ids.append(f"{split}{i:06d}")
    ims.flush()
    del ims
    (root / f"{split}_caps.txt").write_text("".join(c + "\n" for c in caps))
    (root / f"{split}_ids.txt").write_text("".join(i + "\n" for i in ids))


def _write_train_subset(root: Path, n: int) -> None:
    """`trainsub`: the first n train images, for the train-split RSUM."""
    train = np.load(root / "train_ims.npy", mmap_mode="r")
    np.save(root / "trainsub_ims.npy", np.ascontiguousarray(train[:n]))
    for kind, per in (("caps", CAPS), ("ids", 1)):
        lines = (root / f"train_{kind}.txt").read_text().splitlines()[: n * per]
        (root / f"trainsub_{kind}.txt").write_text("".join(x + "\n" for x in lines))


def prepare_data(spec: DataSpec, work: Path) -> tuple[Path, Path, Path]:
    """Generate (or reuse) the SCAN-layout files, shards and vocabulary -> (raw, shards, vocab)."""
    raw, shards, vocab = (
        work / "data" / "raw",
        work / "data" / "shards",
        work / "data" / "vocab.json",
    )
    stamp = work / "data" / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return raw, shards, vocab
    t0 = time.perf_counter()
    for d in (raw, shards):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            f.unlink()
    world = World(spec)
    for split in ("train", "dev", "test"):
        _write_split(world, raw, split, getattr(spec, split))
    _write_train_subset(raw, min(spec.train_eval, spec.train))
    log = work / "data" / "convert.log"
    for split in ("train", "dev", "test", "trainsub"):
        cmd = [*setdiv_cmd(), "shards", "precomp", "--root", str(raw), "--split", split]
        run_cmd([*cmd, "--out", str(shards), "--shard-size", "500"], log)
    build_vocab(shards, vocab, log)
    stamp.write_text(json.dumps(asdict(spec)))
    print(f"data: generated and converted in {(time.perf_counter() - t0) / 60:.1f} min -> {work}")
    return raw, shards, vocab


def build_vocab(shards: Path, out: Path, log: Path) -> None:
    """`setdiv vocab` over the training shards."""
    run_cmd([*setdiv_cmd(), "vocab", "--shards", f"{shards}/train-*.tar", "--out", str(out)], log)
