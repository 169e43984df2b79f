"""Learning-quality benchmark: does training make the set model (K = 4) beat one embedding?

1. Generates an ambiguous region-feature dataset in the SCAN precomputed layout
   (`{split}_ims.npy` N x 36 x 2048, `{split}_caps.txt` 5 per image, `{split}_ids.txt`): every
   image holds 3-6 coloured objects (80 types, 12 colours) among noise and clutter regions, and
   each of its 5 captions names only 1-2 of them ("a photo of a red car next to a dog"), so one
   image must match captions about different things. Converts it with `setdiv shards precomp`
   and builds the vocabulary (`setdiv vocab` where it exists, else `Vocab.build`).
2. Trains the variants of `VARIANTS` with `setdiv train` at reduced width (`Width`, `Recipe`),
   exports the final checkpoint, evaluates with `setdiv eval --protocol coco` on the test split
   and on the first 1000 train images (train vs test RSUM tells under- from over-fitting).
3. Trains a minimal reference written here in plain PyTorch from SPEC §2-§4 (nothing from
   setdiv) on the same files, and scores it with its own recall computation.
4. Prints a markdown table (mean ± std over seeds); writes `results.md` and `results.json`.

    python tools/bench_learning.py                  # default table, ~33 min on a 2-core CPU
    python tools/bench_learning.py --quick          # smoke run, ~1.5 min
    python tools/bench_learning.py --variants k4,k1,ref_k4 --dropout off,on --seeds 0,1
    python tools/bench_learning.py --runs k4_hardest:off,ref_k4_hardest:off

Data, shards and runs live under --work (the data is reused while its spec is unchanged).

Shape legend (reference model): B images, R regions / tokens, K / L set sizes, D embedding
width, I input width, H heads, C head width, N images, M captions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "roi_bigru.yaml"
CAPS = 5
FEAT_DIM, NUM_REGIONS = 2048, 36

# --- variants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Width:
    """Model width of both implementations: D = 128 (paper 1024), one head, T = 3 (paper 4)."""

    embed_dim: int = 128
    head_dim: int = 128
    num_heads: int = 1
    num_iters: int = 3
    hidden_dim: int = 128
    word_dim: int = 300


@dataclass
class Recipe:
    """Training recipe of both implementations (SPEC §4-§5 at CPU scale)."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    """The ROI recipe's LR. (2e-4 reaches test RSUM ~80 in 6 epochs: far too slow here.)"""
    weight_decay: float = 1e-4
    lr_mult: dict[str, float] = field(
        default_factory=lambda: {
            "image_head": 1.0,
            "image_set": 0.1,
            "text_encoder": 1.0,
            "text_set": 0.1,
        }
    )
    """LR multiplier per parameter group: x0.1 for the set modules (SPEC §5). (setdiv's own
    default follows the official train.py, which also gives the image head x0.1.)"""
    warmup: int = 1
    """Epochs of mean-over-negatives triplet before the hardest negative. From scratch, the
    hardest negative alone stays at chance level for the whole budget (VSE++'s observation)."""
    grad_clip: float = 1.0
    margin: float = 0.2
    alpha: float = 16.0
    mmd_weight: float = 0.01
    div_weight: float = 0.01


@dataclass(frozen=True)
class Variant:
    impl: str
    """setdiv (CLI train/export/eval) or ref (the plain-PyTorch loop in this file)."""
    k: int = 4
    """Set size of both modalities."""
    similarity: str = "smooth_chamfer"
    """setdiv: any registered similarity; ref: smooth_chamfer only."""
    warmup: int | None = None
    """Mean-negative warm-up epochs; None = `Recipe.warmup`."""
    lr_mult: tuple[tuple[str, float], ...] = ()
    """Entries replacing `Recipe.lr_mult` ones, e.g. (("image_head", 0.1),)."""
    overrides: tuple[str, ...] = ()
    """Extra dotted overrides (setdiv only)."""

    def lr_groups(self, r: Recipe) -> dict[str, float]:
        return {**r.lr_mult, **dict(self.lr_mult)}

    def warmup_epochs(self, r: Recipe) -> int:
        return r.warmup if self.warmup is None else self.warmup


VARIANTS = {
    "k4": Variant("setdiv"),
    "k1": Variant("setdiv", k=1),
    "k4_mil": Variant("setdiv", similarity="mil"),
    "k4_chamfer": Variant("setdiv", similarity="chamfer"),
    "k4_hardest": Variant("setdiv", warmup=0),
    "k4_mean": Variant("setdiv", warmup=1000),  # mean negatives throughout
    "k1_hardest": Variant("setdiv", k=1, warmup=0),
    "k4_headlr": Variant("setdiv", lr_mult=(("image_head", 0.1),)),  # official train.py groups
    # Which dropout stalls K=4: run `k4_no_set_dropout:on` (the data and encoder dropouts
    # only) and `k4_set_dropout:off` (the set modules' dropout only).
    "k4_no_set_dropout": Variant(
        "setdiv", overrides=("model.image_set.dropout=0.0", "model.text_set.dropout=0.0")
    ),
    "k4_set_dropout": Variant(
        "setdiv", overrides=("model.image_set.dropout=0.1", "model.text_set.dropout=0.1")
    ),
    # ... and of the rest, the data dropouts (regions, words) or the encoders' dropout:
    "k4_data_dropout": Variant(
        "setdiv", overrides=("data.region_dropout=0.2", "data.word_dropout=0.2")
    ),
    "k4_encoder_dropout": Variant(
        "setdiv", overrides=("model.image.dropout=0.1", "model.text.dropout=0.1")
    ),
    "ref_k4": Variant("ref"),
    "ref_k1": Variant("ref", k=1),
    "ref_k4_hardest": Variant("ref", warmup=0),
}
"""Name -> variant. A new row of the table is one line here."""

DEFAULT_TABLE = (
    "k4:off,k1:off,k4_mil:off,k4_chamfer:off,ref_k4:off,ref_k1:off,"
    "k4:on,k1:on,ref_k4:on,k4_hardest:off,k4_hardest:on"
)
"""The default runs, `variant:dropout`: ~40 min on a 2-core CPU at the default size
(measured: setdiv K=4 4.1 min, K=1 3.0 min, reference K=4 2.7 min, each incl. evaluation)."""

DROPOUT_ON = {
    "data.region_dropout": 0.2,
    "data.word_dropout": 0.2,
    "model.image.dropout": 0.1,
    "model.text.dropout": 0.1,
    "model.image_set.dropout": 0.1,
    "model.text_set.dropout": 0.1,
}
"""The recipe's dropouts ("on"); "off" sets all of them to 0."""


def setdiv_overrides(
    v: Variant, dropout: bool, seed: int, w: Width, r: Recipe, data: Path, vocab: Path
) -> list[str]:
    """Dotted overrides of configs/roi_bigru.yaml for one setdiv run."""
    out = [f"model.embed_dim={w.embed_dim}", f"model.text.hidden_dim={w.hidden_dim}"]
    for side in ("image_set", "text_set"):
        out += [
            f"model.{side}.num_embeds={v.k}",
            f"model.{side}.num_heads={w.num_heads}",
            f"model.{side}.head_dim={w.head_dim}",
            f"model.{side}.num_iters={w.num_iters}",
        ]
    out += [
        f"model.text.word_dim={w.word_dim}",
        "model.text.glove_path=null",
        f"model.text.vocab_path={vocab}",
        f"similarity.name={v.similarity}",
        f"similarity.alpha={r.alpha}",
        f"loss.margin={r.margin}",
        f"loss.mmd_weight={r.mmd_weight}",
        f"loss.div_weight={r.div_weight}",
        f"loss.mean_negative_epochs={v.warmup_epochs(r)}",
        f"optim.lr={r.lr}",
        f"optim.weight_decay={r.weight_decay}",
        f"optim.grad_clip={r.grad_clip}",
        "optim.schedule=cosine",
        f"data.train_shards={data}/train-*.tar",
        f"data.val_shards={data}/dev-*.tar",
        f"data.batch_size={r.batch_size}",
        "data.num_workers=1",
        f"train.epochs={r.epochs}",
        f"train.seed={seed}",
        "train.precision=fp32",
        "train.log_every=1",  # every step: exact final-epoch loss means
        "train.ckpt_every=1000000",  # epoch-end checkpoints only
        "train.keep_last=1",
    ]
    out += [f"{k}={p if dropout else 0.0}" for k, p in DROPOUT_ON.items()]
    return out + _lr_overrides(v.lr_groups(r)) + list(v.overrides)


def _lr_overrides(mult: dict[str, float]) -> list[str]:
    return [f"optim.lr_mult.{g}={m}" for g, m in mult.items()]


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


def setdiv_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("setdiv")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "setdiv.cli"]


def run_cmd(cmd: list[str], log: Path, retries: int = 2, fresh: Path | None = None) -> None:
    """Run a setdiv command, output appended to `log`; on failure retry after a minute (the
    tree is edited concurrently: a failure may be a half-saved file). `fresh`: a directory
    removed before each attempt (a training run starts clean, not resumed)."""
    for attempt in range(retries + 1):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        if rc == 0:
            return
        tail = "\n".join(log.read_text().splitlines()[-15:])
        print(f"  command failed (rc {rc}, attempt {attempt + 1}); log {log}:\n{tail}", flush=True)
        if attempt < retries:
            time.sleep(60)
    raise RuntimeError(f"failed: {' '.join(cmd)} (see {log})")


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


# --- setdiv runs -----------------------------------------------------------------------------


def run_setdiv(
    v: Variant, dropout: bool, seed: int, w: Width, r: Recipe, shards: Path, vocab: Path, rd: Path
) -> dict:
    """Train, export the final checkpoint, evaluate on test and the train subset."""
    log = rd.parent / f"{rd.name}.log"
    log.unlink(missing_ok=True)
    rd.parent.mkdir(parents=True, exist_ok=True)
    overrides = setdiv_overrides(v, dropout, seed, w, r, shards, vocab)
    t0 = time.perf_counter()
    run_cmd([*setdiv_cmd(), "train", str(CONFIG), *overrides, "--run-dir", str(rd)], log, fresh=rd)
    train_s = time.perf_counter() - t0
    run_cmd([*setdiv_cmd(), "export", str(rd), "--tag", "latest"], log)
    scores = {}
    for name, split in (("test", "test"), ("train", "trainsub")):
        cmd = [*setdiv_cmd(), "eval", str(rd), "--data", f"{shards}/{split}-*.tar"]
        run_cmd([*cmd, "--protocol", "coco", "--out", str(rd / f"eval_{name}")], log)
        scores[name] = _full_set(rd / f"eval_{name}")
    records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x]
    last = [x for x in records if "i2t_loss" in x and x["epoch"] == r.epochs - 1]
    return {
        **scores,
        "train_min": train_s / 60,
        "eval_min": (time.perf_counter() - t0 - train_s) / 60,
        "final_i2t_loss": statistics.fmean(x["i2t_loss"] for x in last) if last else None,
        "final_t2i_loss": statistics.fmean(x["t2i_loss"] for x in last) if last else None,
        "val_rsum": [x["val_rsum"] for x in records if "val_rsum" in x],
        "run_dir": str(rd),
    }


def similarity_spread(rd: Path, shards: Path) -> dict[str, dict[str, float]]:
    """The collapse diagnostic of a finished setdiv run, on one evaluation batch of training
    images (eval mode): for the model at initialisation (its config, its seed) and for the
    exported final model, the mean and std of the image-caption similarities, the mean over
    captions of (hardest negative image - positive image), and the share of captions whose
    hardest negative outscores the positive. A collapsed model has a tiny std and a gap ~0."""
    from setdiv.data.loaders import build_eval_reader
    from setdiv.export import load_exported
    from setdiv.losses import positive_mask
    from setdiv.model import build_model
    from setdiv.similarity import build_similarity

    final = load_exported(rd)
    cfg = final.cfg
    batch = next(
        iter(build_eval_reader(cfg.data, f"{shards}/train-*.tar", "regions", final.tokenizer, 0, 1))
    )
    torch.manual_seed(cfg.train.seed)  # as the trainer does before building the model
    init = build_model(cfg.model, pretrained=False).eval()
    similarity = build_similarity(cfg.similarity)
    out = {}
    for name, model in (("init", init), ("final", final.model.eval())):
        with torch.no_grad():
            img = model.encode_image(batch.images, batch.image_mask).embeds
            txt = model.encode_text(batch.tokens, batch.token_mask).embeds
            sims_NM = similarity(img, txt).float()
        pos_NM = positive_mask(*sims_NM.shape)
        positive_M = sims_NM.masked_fill(~pos_NM, float("-inf")).amax(dim=0)
        hardest_M = sims_NM.masked_fill(pos_NM, float("-inf")).amax(dim=0)
        gap_M = hardest_M - positive_M
        out[name] = {
            "mean": float(sims_NM.mean()),
            "std": float(sims_NM.std()),
            "hardest_minus_positive": float(gap_M.mean()),
            "hardest_wins": float((gap_M > 0).float().mean()),
        }
    return out


def diagnose(run_dirs: list[Path], shards: Path) -> str:
    """A markdown table of `similarity_spread` for finished setdiv runs."""
    lines = [
        "| run | S at init: mean ± std | S final: mean ± std | final hardest neg − pos "
        "| captions whose hardest negative wins |",
        "|---|---|---|---:|---:|",
    ]
    for rd in run_dirs:
        d = similarity_spread(rd, shards)
        i, f = d["init"], d["final"]
        lines.append(
            f"| {rd.name} | {i['mean']:.3f} ± {i['std']:.4f} | {f['mean']:.3f} ± {f['std']:.4f} "
            f"| {f['hardest_minus_positive']:+.3f} | {100 * f['hardest_wins']:.0f}% |"
        )
    return "\n".join(lines)


def _full_set(eval_dir: Path) -> dict[str, float]:
    """The whole-set recall group (`coco_<N>`) of a `setdiv eval` output directory."""
    from setdiv.eval.evaluator import full_set_key

    n = len(json.loads((eval_dir / "sims_meta.json").read_text())["image_ids"])
    return json.loads((eval_dir / "metrics.json").read_text())[full_set_key("coco", n)]


# --- reference: plain PyTorch from SPEC §2-§4 (nothing from setdiv) --------------------------

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
PAD, START, END, UNK = 0, 1, 2, 3


class RefData:
    """A split of the SCAN files as tensors: regions rounded through float16 like the shards,
    captions tokenised with the shared vocabulary JSON."""

    def __init__(self, raw: Path, split: str, words: dict[str, int]) -> None:
        ims = np.load(raw / f"{split}_ims.npy", mmap_mode="r")
        self.regions_NRC = torch.from_numpy(np.asarray(ims, dtype=np.float16))
        lines = (raw / f"{split}_caps.txt").read_text().splitlines()
        self.tokens = [
            [START, *(words.get(t, UNK) for t in _TOKEN.findall(c.lower())), END] for c in lines
        ]
        assert len(self.tokens) == CAPS * len(self.regions_NRC)

    def __len__(self) -> int:
        return len(self.regions_NRC)


def _pad(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids_BR = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BR[i, : len(s)] = torch.tensor(s)
    return ids_BR, lengths


def _word_dropout(ids: list[int], p: float, vocab_size: int, mask_id: int, rng) -> list[int]:
    """Each inner token with prob p: 50% -> <mask>, 10% -> random word, 40% deleted."""
    out = [ids[0]]
    for t in ids[1:-1]:
        u = rng.random()
        if u >= p:
            out.append(t)
        elif u < 0.5 * p:
            out.append(mask_id)
        elif u < 0.6 * p:
            out.append(int(rng.integers(5, vocab_size)))
    return [*out, ids[-1]]


def sine_1d(length: int, dim: int) -> Tensor:
    """Transformer sine positions (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pe = torch.zeros(length, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)[:, : dim // 2]
    return pe


class RefImage(nn.Module):
    """Linear(2048, D) + residual D -> D/2 -> D MLP (BatchNorm over real regions); max pool."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(FEAT_DIM, dim)
        self.mlp1, self.bn = nn.Linear(dim, dim // 2), nn.BatchNorm1d(dim // 2)
        self.mlp2 = nn.Linear(dim // 2, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BRC: Tensor, mask_BR: Tensor) -> tuple[Tensor, Tensor]:
        h_BRD = self.fc(x_BRC)
        z_BRH = self.mlp1(h_BRD)
        zn_BRH = torch.zeros_like(z_BRH)
        zn_BRH[mask_BR] = self.bn(z_BRH[mask_BR])
        local_BRD = self.drop(h_BRD + self.mlp2(F.relu(zn_BRH)))
        return local_BRD, local_BRD.masked_fill(~mask_BR[..., None], -1e4).amax(1)


class RefText(nn.Module):
    """Trainable word vectors (local features) + 1-layer bi-GRU (global = mean of final states)."""

    def __init__(self, vocab_size: int, word_dim: int, hidden: int, dim: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=PAD)
        self.gru = nn.GRU(word_dim, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Identity() if hidden == dim else nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids_BR: Tensor, lengths_B: Tensor) -> tuple[Tensor, Tensor]:
        w_BRW = self.drop(self.embed(ids_BR))
        packed = pack_padded_sequence(w_BRW, lengths_B, batch_first=True, enforce_sorted=False)
        _, h_2BH = self.gru(packed)
        return w_BRW, self.drop(self.proj(h_2BH.mean(0)))


class RefSlots(nn.Module):
    """K learned slots, T passes of one block (slot-axis softmax, then renormalised over the
    inputs; residual; MLP residual); final LN; e_k = l2norm(LN(g) + slot_k)."""

    def __init__(self, k: int, dim_in: int, dim: int, w: Width, dropout: float) -> None:
        super().__init__()
        inner = w.num_heads * w.head_dim
        self.iters, self.heads = w.num_iters, w.num_heads
        self.init = nn.Parameter(torch.randn(k, dim))
        self.ln_in, self.ln_q = nn.LayerNorm(dim_in), nn.LayerNorm(dim)
        self.ln_mlp, self.ln_out, self.ln_g = (nn.LayerNorm(dim) for _ in range(3))
        self.wq, self.wk = nn.Linear(dim, inner, bias=False), nn.Linear(dim_in, inner, bias=False)
        self.wv, self.wo = nn.Linear(dim_in, inner, bias=False), nn.Linear(inner, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.scale = w.head_dim**-0.5

    def forward(self, f_BRI: Tensor, mask_BR: Tensor, g_BD: Tensor, pos_RI: Tensor | None):
        B = f_BRI.shape[0]
        x = self.ln_in(f_BRI)

        def split(t_BXI: Tensor) -> Tensor:  # (B, X, H*C) -> (B, H, X, C)
            return t_BXI.view(B, t_BXI.shape[1], self.heads, -1).transpose(1, 2)

        k_BHRC = split(self.wk(x if pos_RI is None else x + pos_RI))
        v_BHRC = split(self.wv(x))
        s_BKD = self.init.expand(B, -1, -1)
        for _ in range(self.iters):
            q_BHKC = split(self.wq(self.ln_q(s_BKD)))
            a_BHKR = (q_BHKC @ k_BHRC.transpose(2, 3) * self.scale).softmax(dim=2)
            a_BHKR = a_BHKR * mask_BR[:, None, None, :]
            a_BHKR = a_BHKR / (a_BHKR.sum(-1, keepdim=True) + 1e-7)
            upd_BKD = (a_BHKR @ v_BHRC).transpose(1, 2).reshape(B, s_BKD.shape[1], -1)
            s_BKD = s_BKD + self.wo(upd_BKD)
            s_BKD = s_BKD + self.mlp(self.ln_mlp(s_BKD))
        s_BKD = self.ln_out(s_BKD)
        return F.normalize(self.ln_g(g_BD)[:, None] + s_BKD, dim=-1), s_BKD


class RefModel(nn.Module):
    """Both encoders and set modules; `dropout` switches all dropouts to the recipe's 0.1."""

    def __init__(self, k: int, vocab_size: int, w: Width, dropout: bool) -> None:
        super().__init__()
        p_enc, p_set = (0.1, 0.1) if dropout else (0.0, 0.0)
        self.image = RefImage(w.embed_dim, p_enc)
        self.text = RefText(vocab_size, w.word_dim, w.hidden_dim, w.embed_dim, p_enc)
        self.image_set = RefSlots(k, w.embed_dim, w.embed_dim, w, p_set)
        self.text_set = RefSlots(k, w.word_dim, w.embed_dim, w, p_set)
        self.word_dim = w.word_dim

    def encode_image(self, x_BRC: Tensor, mask_BR: Tensor) -> tuple[Tensor, Tensor]:
        local, g = self.image(x_BRC, mask_BR)
        return self.image_set(local, mask_BR, g, None)

    def encode_text(self, ids_BR: Tensor, lengths_B: Tensor) -> tuple[Tensor, Tensor]:
        mask_BR = torch.arange(ids_BR.shape[1])[None] < lengths_B[:, None]
        local, g = self.text(ids_BR, lengths_B)
        return self.text_set(local, mask_BR, g, sine_1d(ids_BR.shape[1], self.word_dim))


def smooth_chamfer(x_NKD: Tensor, y_MLD: Tensor, alpha: float) -> Tensor:
    """SPEC §1: 1/(2aK) sum_a lse_b(a s) + 1/(2aL) sum_b lse_a(a s) -> (N, M)."""
    s_NMKL = alpha * torch.einsum("nkd,mld->nmkl", x_NKD, y_MLD)
    rows = torch.logsumexp(s_NMKL, dim=3).mean(dim=2)
    cols = torch.logsumexp(s_NMKL, dim=2).mean(dim=2)
    return (rows + cols) / (2 * alpha)


def triplet(S_NM: Tensor, margin: float, hardest: bool) -> tuple[Tensor, Tensor]:
    """Mean hinge i2t (each image x each own caption) and t2i (each caption), image-major."""
    N, M = S_NM.shape
    owner_M = torch.arange(M) // (M // N)
    pos_NM = owner_M[None] == torch.arange(N)[:, None]
    pos_sim_M = S_NM[owner_M, torch.arange(M)]
    if hardest:
        neg = S_NM.masked_fill(pos_NM, -1e4)
        i2t = (margin + neg.amax(1)[owner_M] - pos_sim_M).clamp(min=0).mean()
        t2i = (margin + neg.amax(0) - pos_sim_M).clamp(min=0).mean()
        return i2t, t2i
    i2t_MM = (margin + S_NM[owner_M] - pos_sim_M[:, None]).clamp(min=0) * ~pos_NM[owner_M]
    t2i_MN = (margin + S_NM.T - pos_sim_M[:, None]).clamp(min=0) * ~pos_NM.T
    return (i2t_MM.sum(1) / (M - M // N)).mean(), (t2i_MN.sum(1) / (N - 1)).mean()


def mmd(x_PD: Tensor, y_QD: Tensor) -> Tensor:
    """Biased MMD with k(x, y) = exp(-0.5 ||x - y||)."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None] - 2 * a @ b.T
        return torch.exp(-0.5 * d2.clamp(min=1e-12).sqrt()).mean()

    return k(x_PD, x_PD) + k(y_QD, y_QD) - 2 * k(x_PD, y_QD)


def diversity(slots_BKD: Tensor) -> Tensor:
    """Mean over samples and slot pairs of exp(-2 ||r_i - r_j||^2), r = l2norm(slot)."""
    K = slots_BKD.shape[1]
    if K < 2:
        return slots_BKD.new_zeros(())
    r = F.normalize(slots_BKD, dim=-1)
    d2_BKK = 2 - 2 * r @ r.transpose(1, 2)
    i, j = torch.triu_indices(K, K, 1)
    return torch.exp(-2 * d2_BKK[:, i, j]).mean()


def _check_reference() -> None:
    """SPEC §1 golden value: A = {e1, e2}, B = {e1, e1}, alpha 16 -> 0.771661."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = float(smooth_chamfer(torch.stack([e1, e2])[None], torch.stack([e1, e1])[None], 16.0))
    assert abs(got - 0.771661) < 1e-5, got


def _image_batch(data: RefData, idx: Tensor, region_p: float, rng) -> tuple[Tensor, Tensor]:
    x_BRC = data.regions_NRC[idx].float()
    mask_BR = torch.ones(x_BRC.shape[:2], dtype=torch.bool)
    if region_p > 0:  # drop each region with prob p, keeping at least one
        mask_BR = torch.from_numpy(rng.random(tuple(mask_BR.shape)) >= region_p)
        mask_BR[~mask_BR.any(1), 0] = True
    return x_BRC, mask_BR


@torch.no_grad()
def ref_encode(model: RefModel, data: RefData, batch: int = 250) -> tuple[Tensor, Tensor]:
    model.eval()
    imgs, caps = [], []
    for i in range(0, len(data), batch):
        idx = torch.arange(i, min(i + batch, len(data)))
        x, m = _image_batch(data, idx, 0.0, None)
        imgs.append(model.encode_image(x, m)[0])
        caps.append(model.encode_text(*_pad(data.tokens[CAPS * i : CAPS * (i + len(idx))]))[0])
    return torch.cat(imgs), torch.cat(caps)


def ref_scores(x_NKD: Tensor, y_MLD: Tensor, alpha: float, chunk: int = 100) -> np.ndarray:
    return torch.cat(
        [smooth_chamfer(x_NKD[i : i + chunk], y_MLD, alpha) for i in range(0, len(x_NKD), chunk)]
    ).numpy()


def ref_recalls(S_NM: np.ndarray) -> dict[str, float]:
    """i2t: rank of the best of an image's 5 captions; t2i: rank of the caption's image."""
    N, M = S_NM.shape
    owner = np.arange(M) // CAPS
    best_gt = S_NM.reshape(N, N, CAPS)[np.arange(N), np.arange(N)].max(1)
    i2t = (S_NM > best_gt[:, None]).sum(1)
    t2i = (S_NM > S_NM[owner, np.arange(M)][None]).sum(0)
    out = {
        f"{d}_r{k}": 100.0 * float((r < k).mean())
        for d, r in (("i2t", i2t), ("t2i", t2i))
        for k in (1, 5, 10)
    }
    out["rsum"] = sum(out.values())
    return out


def _ref_optimizer(model: RefModel, mult: dict[str, float], r: Recipe, total: int):
    """AdamW with one group per part (LR x multiplier), cosine annealed per iteration."""
    parts = {
        "image_head": model.image,
        "image_set": model.image_set,
        "text_encoder": model.text,
        "text_set": model.text_set,
    }
    groups = [{"params": list(m.parameters()), "lr": r.lr * mult[g]} for g, m in parts.items()]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, weight_decay=r.weight_decay)
    cosine = lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def _ref_loss(model: RefModel, batch: tuple, r: Recipe, hardest: bool) -> tuple[Tensor, ...]:
    """(total, i2t, t2i): triplet + 0.01 MMD + 0.01 diversity (SPEC §4)."""
    x_BRC, mask_BR, ids, lengths = batch
    img_e, img_s = model.encode_image(x_BRC, mask_BR)
    txt_e, txt_s = model.encode_text(ids, lengths)
    i2t, t2i = triplet(smooth_chamfer(img_e, txt_e, r.alpha), r.margin, hardest)
    D = img_e.shape[-1]
    reg = r.mmd_weight * mmd(img_e.reshape(-1, D), txt_e.reshape(-1, D))
    reg = reg + r.div_weight * (diversity(img_s) + diversity(txt_s))
    return i2t + t2i + reg, i2t, t2i


def _ref_evaluate(model: RefModel, data: RefData, alpha: float) -> dict[str, float]:
    return ref_recalls(ref_scores(*ref_encode(model, data), alpha))


def run_reference(
    v: Variant, dropout: bool, seed: int, w: Width, r: Recipe, raw: Path, vocab: Path
) -> dict:
    """Train the reference for `r.epochs` (dev RSUM after each), score test and train subset."""
    if v.similarity != "smooth_chamfer":
        raise ValueError(f"the reference implements smooth_chamfer only, not {v.similarity}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    words = {x: i for i, x in enumerate(json.loads(vocab.read_text())["words"])}
    train, dev = RefData(raw, "train", words), RefData(raw, "dev", words)
    model = RefModel(v.k, len(words), w, dropout)
    per_epoch = len(train) // r.batch_size
    opt, sched = _ref_optimizer(model, v.lr_groups(r), r, per_epoch * r.epochs)
    p_region, p_word = (0.2, 0.2) if dropout else (0.0, 0.0)
    t0, last_losses, val = time.perf_counter(), [], []
    for epoch in range(r.epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(train)))
        for b in range(per_epoch):
            idx = perm[b * r.batch_size : (b + 1) * r.batch_size]
            seqs = [train.tokens[CAPS * int(i) + c] for i in idx for c in range(CAPS)]
            if p_word > 0:
                seqs = [_word_dropout(s, p_word, len(words), words["<mask>"], rng) for s in seqs]
            batch = (*_image_batch(train, idx, p_region, rng), *_pad(seqs))
            loss, i2t, t2i = _ref_loss(model, batch, r, hardest=epoch >= v.warmup_epochs(r))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            sched.step()
            if epoch == r.epochs - 1:
                last_losses.append((i2t.item(), t2i.item()))
        val.append(_ref_evaluate(model, dev, r.alpha)["rsum"])
        print(f"  ref epoch {epoch + 1}/{r.epochs}: loss {loss.item():.4f}, dev RSUM {val[-1]:.1f}")
    train_s = time.perf_counter() - t0
    scores = {
        "test": _ref_evaluate(model, RefData(raw, "test", words), r.alpha),
        "train": _ref_evaluate(model, RefData(raw, "trainsub", words), r.alpha),
    }
    return {
        **scores,
        "train_min": train_s / 60,
        "eval_min": (time.perf_counter() - t0 - train_s) / 60,
        "final_i2t_loss": statistics.fmean(a for a, _ in last_losses),
        "final_t2i_loss": statistics.fmean(b for _, b in last_losses),
        "val_rsum": val,
        "run_dir": None,
    }


# --- report ----------------------------------------------------------------------------------


def _mean_std(xs: list[float | None], digits: int = 1) -> str:
    """`mean ± std` over seeds (sample std), or the one value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def table(results: list[dict], recipe: Recipe) -> str:
    """One row per (variant, dropout), mean ± std over its seeds."""
    lines = [
        "| variant | impl | K | similarity | dropout | negatives | test RSUM | R@1 i2t | R@1 t2i "
        "| train-subset RSUM | last-epoch triplet i2t / t2i | train min | eval min | seeds |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for res in results:
        groups.setdefault((res["variant"], res["dropout"]), []).append(res)
    for (name, dropout), runs in groups.items():
        v, wu = VARIANTS[name], VARIANTS[name].warmup_epochs(recipe)
        col = {key: [x[key] for x in runs] for key in runs[0] if key not in ("test", "train")}
        test = {key: [x["test"][key] for x in runs] for key in ("rsum", "i2t_r1", "t2i_r1")}
        train_rsum = [x["train"]["rsum"] for x in runs]
        cells = [
            name,
            v.impl,
            str(v.k),
            v.similarity,
            dropout,
            "mean" if wu >= recipe.epochs else f"mean {wu} ep, then hardest" if wu else "hardest",
            _mean_std(test["rsum"]),
            _mean_std(test["i2t_r1"]),
            _mean_std(test["t2i_r1"]),
            _mean_std(train_rsum),
            f"{_mean_std(col['final_i2t_loss'], 3)} / {_mean_std(col['final_t2i_loss'], 3)}",
            _mean_std(col["train_min"]),
            _mean_std(col["eval_min"]),
            ",".join(str(x) for x in col["seed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def parse_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(variant, dropout) pairs: `--runs v:d,...`, or `--variants` x `--dropout`."""
    if args.variants:
        pairs = [(v, d) for v in args.variants.split(",") for d in args.dropout.split(",")]
    else:
        pairs = [tuple(x.split(":")) for x in (args.runs or DEFAULT_TABLE).split(",")]
    for v, d in pairs:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        if d not in ("on", "off"):
            raise SystemExit(f"dropout must be on or off, got {d!r}")
    return pairs


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="/tmp/setdiv_bench_learning", help="data, shards and runs")
    p.add_argument("--out", default=None, help="results.md / results.json (default WORK/report)")
    p.add_argument("--runs", default=None, help=f"variant:dropout list (default {DEFAULT_TABLE})")
    p.add_argument("--variants", default=None, help=f"instead of --runs: some of {list(VARIANTS)}")
    p.add_argument("--dropout", default="off", help="with --variants: off, on or off,on")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 6)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="mean-negative epochs (default 1)")
    p.add_argument("--train-images", type=int, default=None, help="train split size (default 4000)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: on a shared 2-core machine more threads "
        "oversubscribe the cores and run up to 10x slower; the data worker takes the other)",
    )
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, k4 + ref_k4 (smoke)")
    p.add_argument(
        "--diagnose",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="instead of training: the similarity spread (collapse diagnostic) of finished runs",
    )
    return p.parse_args()


def main() -> int:
    args = _arguments()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the setdiv processes
        os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    _check_reference()
    spec, recipe = DataSpec(), Recipe()
    if args.quick:
        spec, recipe = DataSpec(train=640, dev=200, test=200, train_eval=200), Recipe(epochs=1)
        if not (args.runs or args.variants):
            args.runs = "k4:off,ref_k4:off"
    for flag, key in (("epochs", "epochs"), ("lr", "lr"), ("warmup", "warmup")):
        if getattr(args, flag) is not None:
            setattr(recipe, key, getattr(args, flag))
    if args.train_images:
        spec = replace(spec, train=args.train_images)
    work = Path(args.work)
    if args.diagnose:
        print(diagnose([Path(d) for d in args.diagnose], work / "data" / "shards"))
        return 0
    pairs, seeds = parse_runs(args), [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else work / "report"
    out.mkdir(parents=True, exist_ok=True)
    raw, shards, vocab = prepare_data(spec, work)
    results, width, t0 = [], Width(), time.perf_counter()
    for name, dropout in pairs:
        v = VARIANTS[name]
        for seed in seeds:
            rd = work / "runs" / f"{name}_drop{dropout}_seed{seed}"
            print(f"run {rd.name} ...", flush=True)
            if v.impl == "setdiv":
                res = run_setdiv(v, dropout == "on", seed, width, recipe, shards, vocab, rd)
            else:
                res = run_reference(v, dropout == "on", seed, width, recipe, raw, vocab)
            res.update(variant=name, dropout=dropout, seed=seed, impl=v.impl)
            print(
                f"  test RSUM {res['test']['rsum']:.1f} (train subset {res['train']['rsum']:.1f})"
                f", train {res['train_min']:.1f} min, eval {res['eval_min']:.1f} min",
                flush=True,
            )
            results.append(res)
            _write(out, spec, recipe, width, results)
    print(_write(out, spec, recipe, width, results))
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}/results.md, results.json")
    return 0


def _write(out: Path, spec: DataSpec, recipe: Recipe, width: Width, results: list[dict]) -> str:
    text = (
        f"data: {asdict(spec)}\nrecipe: {asdict(recipe)}\nwidth: {asdict(width)}\n\n"
        + table(results, recipe)
        + "\n"
    )
    (out / "results.md").write_text(text)
    payload = {"spec": asdict(spec), "recipe": asdict(recipe), "width": asdict(width)}
    (out / "results.json").write_text(json.dumps({**payload, "runs": results}, indent=1))
    return text


if __name__ == "__main__":
    sys.exit(main())
