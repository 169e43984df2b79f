"""A minimal reference written in plain PyTorch from docs/method.md §2-§4: nothing from
setdiv. Its own model, similarity, losses, training loop and recall computation, trained on
the same files.

Shape legend: B images, R regions / tokens, K / L set sizes, D embedding width, I input width,
H heads, C head width, N images, M captions."""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from learning_bench.variants import CAPS, FEAT_DIM, Recipe, Variant, Width

# --- reference: plain PyTorch from docs/method.md §2-§4 (nothing from setdiv) ---------------

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
    """docs/method.md §1: 1/(2aK) sum_a lse_b(a s) + 1/(2aL) sum_b lse_a(a s) -> (N, M)."""
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
    """docs/method.md §1 golden value: A = {e1, e2}, B = {e1, e1}, alpha 16 -> 0.771661."""
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
    """(total, i2t, t2i): triplet + 0.01 MMD + 0.01 diversity (docs/method.md §4)."""
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
