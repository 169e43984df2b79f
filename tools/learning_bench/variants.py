"""What the benchmark trains: the variants (setdiv models and the reference), their recipe and
reduced width, and the setdiv overrides each becomes; shared constants. Imports nothing from
setdiv."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
    """Training recipe of both implementations (docs/method.md §4-§5 at CPU scale)."""

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
    """LR multiplier per parameter group: x0.1 for the set modules (docs/method.md §5).
    (setdiv's own default follows the official train.py, which also gives the image head x0.1.)"""
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
    objective: str = "official"
    """setdiv: a key of `OBJECTIVES` (the reference: hardest after `warmup` epochs of mean)."""

    def lr_groups(self, r: Recipe) -> dict[str, float]:
        return {**r.lr_mult, **dict(self.lr_mult)}

    def warmup_epochs(self, r: Recipe) -> int:
        if self.warmup is None:  # only the official objective needs a warm-up
            return r.warmup if self.objective in ("official", "guarded") else 0
        return self.warmup


OBJECTIVES = {
    # as the paper trains: hardest negatives, nothing acting on a collapse
    "official": ("loss.negatives=hardest", "train.collapse.action=warn"),
    # the same with the trainer's collapse guard (its default)
    "guarded": ("loss.negatives=hardest",),
    "sel": ("loss.negatives=selective",),
    "mean": ("loss.negatives=mean",),
    "nce": ("loss.name=infonce",),
    "hnnce": ("loss.name=infonce", "loss.hn_beta=0.5"),
    "hnnce1": ("loss.name=infonce", "loss.hn_beta=1.0"),
    "rnce": ("loss.name=infonce", "loss.robust_q=0.5"),
    "rnce3": ("loss.name=infonce", "loss.robust_q=0.3"),
    "hnrnce": ("loss.name=infonce", "loss.hn_beta=0.5", "loss.robust_q=0.5"),
    "rsel": ("loss.negatives=selective", "loss.robust_q=0.5"),
}
"""Objective -> setdiv overrides: the official (hardest negatives after `Recipe.warmup`
epochs of mean; no collapse guard), the same guarded, selective negatives, mean negatives,
InfoNCE, InfoNCE + HN-NCE weighting (the last ones from the first step)."""


VARIANTS = {
    "k4": Variant("setdiv"),
    "k1": Variant("setdiv", k=1),
    "k4_mil": Variant("setdiv", similarity="mil"),
    "k4_chamfer": Variant("setdiv", similarity="chamfer"),
    "k4_hardest": Variant("setdiv", warmup=0),
    "k4_mean": Variant("setdiv", warmup=1000),  # mean negatives throughout
    **{
        f"k{k}_{obj}": Variant("setdiv", k=k, objective=obj)
        for k in (4, 1)
        for obj in OBJECTIVES
        if obj not in ("official", "guarded")
    },
    "k4_hardest_guarded": Variant("setdiv", objective="guarded", warmup=0),
    "k4_sel_warm": Variant("setdiv", objective="sel", warmup=1),
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
    v: Variant, dropout: bool, seed: int, w: Width, r: Recipe, data: Path, vocab: Path,
    noise: float = 0.0,
) -> list[str]:  # fmt: skip
    """Dotted overrides of configs/roi_bigru.yaml for one setdiv run; `noise`: the share of
    training captions replaced by other images' (seeded by the run's seed)."""
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
        *OBJECTIVES[v.objective],
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
        f"data.caption_noise={noise}",
        f"data.caption_noise_seed={seed}",
    ]
    out += [f"{k}={p if dropout else 0.0}" for k, p in DROPOUT_ON.items()]
    return out + _lr_overrides(v.lr_groups(r)) + list(v.overrides)


def _lr_overrides(mult: dict[str, float]) -> list[str]:
    return [f"optim.lr_mult.{g}={m}" for g, m in mult.items()]
