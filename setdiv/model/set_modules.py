"""Set prediction modules: local features + global feature -> a set of K unit embeddings.

Shape legend: B batch, R inputs (regions / grid cells / tokens), K slots, H heads,
C head width, Din input width, D embedding width.

Every module maps `(local_BRDin, mask_BR, global_BD, pos_BRDin)` to a `SetOutput`:
  embeds (B,K,D)  L2-normalised set elements, e_k = l2norm(LN(g) + slot_k)
  slots  (B,K,D)  pre-fusion slots (what the diversity regulariser reads)
  attn   list of (B,H,K,R) attention maps, one per iteration (for analysis plots)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setdiv.registry import Registry

if TYPE_CHECKING:  # setdiv.config reads the registry's names: type hints only, no cycle
    from setdiv.config import SetModuleConfig

__all__ = [
    "SET_MODULES",
    "PIENet",
    "SetOutput",
    "SlotSetModule",
    "build_set_module",
]


class SetOutput(NamedTuple):
    # A NamedTuple (not a dataclass) so ZeRO-3 sees the tensors and hooks their backward.
    embeds: Tensor
    """(B,K,D) unit-norm set elements."""
    slots: Tensor
    """(B,K,D) pre-fusion slots."""
    attn: list[Tensor] | tuple[Tensor, ...] = ()
    """Per iteration (B,H,K,R) attention over inputs (each row sums to 1 over valid inputs)."""


class SlotAttention(nn.Module):
    """Multi-head cross-attention from K slots to R inputs.

    `axis="slots"` is the DivE aggregation: logits are softmax-normalised over the slot axis
    (slots compete for each input) and then re-normalised over the inputs (weighted mean).
    `axis="inputs"` is plain transformer cross-attention (softmax over inputs).
    """

    def __init__(
        self,
        dim: int,
        dim_in: int,
        heads: int,
        head_dim: int,
        dropout: float,
        axis: str,
        compat_mask: bool = False,
    ) -> None:
        super().__init__()
        if axis not in ("slots", "inputs"):
            raise ValueError(f"attention axis must be 'slots' or 'inputs', got {axis!r}")
        inner = heads * head_dim
        self.heads, self.axis, self.compat_mask = heads, axis, compat_mask
        self.scale = head_dim**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim_in, inner, bias=False)
        self.to_v = nn.Linear(dim_in, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(
        self, slots_BKD: Tensor, ctx_BRDin: Tensor, mask_BR: Tensor, pos_BRDin: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        B, K, _ = slots_BKD.shape
        R, H = ctx_BRDin.shape[1], self.heads
        keys_in = ctx_BRDin if pos_BRDin is None else ctx_BRDin + pos_BRDin  # pos on keys only
        q_BHKC = self.to_q(slots_BKD).view(B, K, H, -1).transpose(1, 2)
        k_BHRC = self.to_k(keys_in).view(B, R, H, -1).transpose(1, 2)
        v_BHRC = self.to_v(ctx_BRDin).view(B, R, H, -1).transpose(1, 2)
        logits_BHKR = (q_BHKC @ k_BHRC.transpose(-1, -2)) * self.scale
        valid_B11R = mask_BR[:, None, None, :]
        if self.axis == "inputs":
            logits_BHKR = logits_BHKR.masked_fill(~valid_B11R, float("-inf"))
            attn_BHKR = logits_BHKR.softmax(dim=-1)
        elif self.compat_mask:
            # Official DivE: masking before the slot softmax leaves 1/K on every padded input.
            logits_BHKR = logits_BHKR.masked_fill(~valid_B11R, -torch.finfo(logits_BHKR.dtype).max)
            attn_BHKR = logits_BHKR.softmax(dim=2)
            attn_BHKR = attn_BHKR / (attn_BHKR.sum(dim=-1, keepdim=True) + 1e-7)
        else:
            # Slots compete for each input; padded inputs then get exactly zero weight.
            attn_BHKR = logits_BHKR.softmax(dim=2) * valid_B11R
            attn_BHKR = attn_BHKR / (attn_BHKR.sum(dim=-1, keepdim=True) + 1e-7)
        out_BHKC = attn_BHKR @ v_BHRC
        out_BKD = self.to_out(out_BHKC.transpose(1, 2).reshape(B, K, -1))
        return out_BKD, attn_BHKR


class SlotSetModule(nn.Module):
    """DivE set prediction: K learned slots refined by T applications of ONE shared block.

    Block: slots += Attn(LN(slots), LN(F)); slots += MLP(LN(slots)). Then a final LN and fusion
    with the LayerNorm'd global feature. `axis="inputs"` gives the transformer-decoder ablation.
    """

    def __init__(self, cfg: SetModuleConfig, dim_in: int, dim: int, axis: str = "slots") -> None:
        super().__init__()
        self.num_iters = cfg.num_iters
        self.slots = nn.Parameter(torch.randn(cfg.num_embeds, dim))  # shared by all samples
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_inputs = nn.LayerNorm(dim_in)
        self.attn = SlotAttention(
            dim, dim_in, cfg.num_heads, cfg.head_dim, cfg.dropout, axis, cfg.compat_mask
        )
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, cfg.mlp_ratio * dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_ratio * dim, dim),
        )
        self.norm_out = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)

    def forward(
        self, local_BRDin: Tensor, mask_BR: Tensor, global_BD: Tensor, pos_BRDin: Tensor | None
    ) -> SetOutput:
        B = local_BRDin.shape[0]
        ctx_BRDin = self.norm_inputs(local_BRDin)  # normalised once: the inputs do not change
        slots_BKD = self.slots.unsqueeze(0).expand(B, -1, -1)
        maps = []
        for _ in range(self.num_iters):
            update_BKD, attn_BHKR = self.attn(
                self.norm_slots(slots_BKD), ctx_BRDin, mask_BR, pos_BRDin
            )
            slots_BKD = slots_BKD + update_BKD  # residual update, not a GRU
            slots_BKD = slots_BKD + self.mlp(self.norm_mlp(slots_BKD))
            maps.append(attn_BHKR)
        slots_BKD = self.norm_out(slots_BKD)
        embeds_BKD = F.normalize(self.norm_global(global_BD).unsqueeze(1) + slots_BKD, dim=-1)
        return SetOutput(embeds=embeds_BKD, slots=slots_BKD, attn=maps)


class PIENet(nn.Module):
    """PVSE's polysemous instance embedding: global feature + K attention-pooled residuals.

    a = softmax_R(W2 tanh(W1 F)) gives K maps over the inputs; r_k = dropout(sigmoid(fc(a_k F)));
    e_k = l2norm(LN(g + r_k)).
    """

    def __init__(self, cfg: SetModuleConfig, dim_in: int, dim: int) -> None:
        super().__init__()
        hidden = cfg.pie_hidden or max(dim_in // 2, 1)
        self.w1 = nn.Linear(dim_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.num_embeds, bias=False)
        self.fc = nn.Linear(dim_in, dim)
        for linear in (self.w1, self.w2, self.fc):  # official init of all three
            nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(self.fc.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, local_BRDin: Tensor, mask_BR: Tensor, global_BD: Tensor, pos_BRDin: Tensor | None
    ) -> SetOutput:
        del pos_BRDin  # PIE-Net has no positional input
        logits_BRK = self.w2(torch.tanh(self.w1(local_BRDin)))
        logits_BRK = logits_BRK.masked_fill(~mask_BR[:, :, None], float("-inf"))
        attn_BKR = logits_BRK.softmax(dim=1).transpose(1, 2)
        residual_BKD = self.dropout(torch.sigmoid(self.fc(attn_BKR @ local_BRDin)))
        embeds_BKD = F.normalize(self.norm(global_BD.unsqueeze(1) + residual_BKD), dim=-1)
        return SetOutput(embeds=embeds_BKD, slots=residual_BKD, attn=[attn_BKR.unsqueeze(1)])


def _transformer(cfg: SetModuleConfig, dim_in: int, dim: int) -> SlotSetModule:
    return SlotSetModule(cfg, dim_in, dim, axis="inputs")


SET_MODULES: Registry[Callable[[SetModuleConfig, int, int], nn.Module]] = Registry(
    "set module", {"slot": SlotSetModule, "transformer": _transformer, "pienet": PIENet}
)
"""The names `model.image_set.name` and `model.text_set.name` accept."""


def build_set_module(cfg: SetModuleConfig, dim_in: int, dim: int) -> nn.Module:
    """The set module registered as `cfg.name`, reading inputs of width dim_in into D = dim."""
    return SET_MODULES[cfg.name](cfg, dim_in, dim)
