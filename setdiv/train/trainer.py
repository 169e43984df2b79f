"""The training loop: DeepSpeed engine, streaming shards, global hardest negatives, logging,
validation, checkpoints and resume.

`Trainer(cfg, run_dir).train()` runs on every rank of an initialised job (or alone). It decides
what a step does; when to log is the `MetricsWriter`'s call, when to save the `Checkpointer`'s.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from setdiv import config as config_lib
from setdiv.data.features import check_training_cache
from setdiv.data.loaders import build_eval_reader, build_train_reader, per_rank_batch_size
from setdiv.data.reader import Batch
from setdiv.data.text import build_tokenizer, config_vocab
from setdiv.distributed import (
    all_gather_list,
    all_reduce_sum,
    broadcast_float,
    is_rank_zero,
    limit_cpu_threads,
    on_all_ranks,
    pick_device,
    rank_and_world,
)
from setdiv.eval.evaluator import encode, gather_and_score, whole_set
from setdiv.losses import build_loss, describe_objective, similarity_spread
from setdiv.model import build_model
from setdiv.model.encoders import image_input_kind
from setdiv.model.towers import with_tower_preprocessing
from setdiv.paths import RunFiles
from setdiv.similarity import build_similarity
from setdiv.train import engine as ds
from setdiv.train.checkpoint import Checkpointer, TrainState
from setdiv.train.metrics_writer import MetricsWriter
from setdiv.train.optim import build_optimizer, group_lr_lambdas
from setdiv.train.watch import CollapseGuard, MarginStall, NonFiniteLossError, margin_share

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


class Trainer:
    """Builds model, data, loss and engine from `cfg`; `train()` runs to `train.epochs`."""

    def __init__(
        self, cfg: config_lib.Config, run_dir: str | Path, resume: str | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank, self.world = rank_and_world()
        self.device = pick_device()
        limit_cpu_threads(self.device, cfg.data.num_workers)
        # User errors (shards, checksums, ranks x workers, weights paths) surface here, before
        # any training, and on every rank at once so none waits in a collective.
        model = on_all_ranks(lambda: self._build(cfg), "building data and model")
        self.engine = self._engine(model)
        remote = cfg.train.remote_dir if is_rank_zero(self.rank) else None  # (rank 0 uploads)
        self.checkpointer = Checkpointer(
            self.engine, self.run_dir, cfg.train.ckpt_every, cfg.train.keep_last, remote
        )
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)  # independent dropout per rank
        # Inputs in the weights' dtype: fp32 under autocast, bf16/fp16 with half weights.
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self.dtype = half if cfg.train.half_weights and half is not None else torch.float32
        self.state = TrainState(world_size=self.world)
        self.guard = CollapseGuard(cfg.train.collapse)
        if resume is not None:  # a checkpoint that does not fit fails before RUN is written
            self._resume(resume)
            self.guard.load(self.state.collapse)
        if is_rank_zero(self.rank):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_lib.save(self.cfg, RunFiles(self.run_dir).config)
            if self.vocab is not None:
                self.vocab.save(RunFiles(self.run_dir).vocab)
        self.metrics = MetricsWriter(self.run_dir, cfg.train.log_every, is_rank_zero(self.rank))
        if resume is not None:  # records past the restart point (all, when fresh) are redone
            self.metrics.truncate(self.state.step)

    def _build(self, cfg: config_lib.Config) -> torch.nn.Module:
        """Tokenizer, training reader, model (same init on every rank), similarity, loss."""
        cfg = with_tower_preprocessing(cfg)  # (idempotent: `launch` has done it already)
        text = cfg.model.text
        self.vocab = config_vocab(text, "training a bigru model") if text.name == "bigru" else None
        self.tokenizer = build_tokenizer(text, self.vocab)
        # A feature cache (`setdiv extract`) replaces the images: the tower's tokens are read.
        kind = "regions" if cfg.data.features else image_input_kind(cfg.model.image.name)
        if cfg.data.features:  # (of this tower, its weights and transform)
            check_training_cache(cfg)
        self.cfg, self.kind = cfg, kind
        self.batch_size = per_rank_batch_size(cfg.data, self.world)
        if is_rank_zero(self.rank):
            log.info(
                "batch: %d images per rank x %d ranks = %d (data.batch_size)",
                self.batch_size,
                self.world,
                cfg.data.batch_size,
            )
        self.reader = build_train_reader(
            cfg.data, self.kind, self.tokenizer, self.rank, self.world, cfg.train.seed,
            batch_size=self.batch_size,
        )  # fmt: skip
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        model = build_model(cfg.model)
        self.similarity = build_similarity(cfg.similarity)
        self.loss_fn = build_loss(cfg.loss, self.similarity)
        # The objective's own parameters (InfoNCE's temperature) train and are checkpointed
        # with the model's; `setdiv export` leaves them out of the exported weights.
        model.add_module("objective", self.loss_fn)
        if is_rank_zero(self.rank):
            log.info("objective: %s", describe_objective(cfg.loss))
        return model

    def _engine(self, model: torch.nn.Module) -> Any:
        """Optimizer and per-step LR schedule around `model`, wrapped in a DeepSpeed engine."""
        cfg = self.cfg
        optimizer = build_optimizer(model, cfg.optim)
        lambdas = group_lr_lambdas(
            cfg.optim, optimizer.param_groups, self.reader.batches_per_epoch, cfg.train.epochs
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        # Parameters the freeze switches off and on: those trainable when the engine is built
        # (ZeRO partitions exactly these), so not a frozen-BN CNN's BatchNorm. Read before
        # DeepSpeed swaps the groups' parameters for flat partitions.
        frozen = set(cfg.optim.freeze_groups) if cfg.optim.freeze_epochs > 0 else set()
        self._freezable = [
            (i, g["name"], [p for p in g["params"] if p.requires_grad])
            for i, g in enumerate(optimizer.param_groups)
            if g["name"] in frozen
        ]
        ds_config = ds.deepspeed_config(cfg.train, cfg.optim, self.batch_size)
        return ds.initialize(model, optimizer, scheduler, ds_config)

    # --- resume ------------------------------------------------------------------------------

    def _resume(self, which: str) -> None:
        state = self.checkpointer.load(which)
        if state is None:
            log.info("--resume %s: no checkpoint in %s, starting fresh", which, self.run_dir)
        else:
            self.state = state
            log.info(
                "resumed at epoch %d, batch %d (step %d)",
                state.epoch,
                state.batch_in_epoch,
                state.step,
            )

    # --- one step ----------------------------------------------------------------------------

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        images = batch.images.to(self.device, self.dtype)
        mask = batch.image_mask.to(self.device) if batch.image_mask is not None else None
        return images, mask, batch.tokens.to(self.device), batch.token_mask.to(self.device)

    def train_step(self, batch: Batch) -> dict[str, float] | None:
        """Forward, loss, backward, optimizer step. Returns the global loss terms (summed over
        ranks) and `sim_std`, the standard deviation of the batch's similarity matrix (one
        all-reduce for both), or None when the step was skipped for a non-finite loss."""
        self.engine.train()
        images, image_mask, tokens, token_mask = self._to_device(batch)
        img, txt = self.engine(images, image_mask, tokens, token_mask)
        fallback = self.guard.fallback
        terms = self.loss_fn(img, txt, epoch=self.state.epoch, all_negatives=fallback)
        local = sum(terms.values())
        moments = getattr(self.loss_fn, "sim_moments", None)
        parts = [t.detach().double().reshape(1) for t in terms.values()]
        if moments is not None:
            parts.append(moments.to(local.device))
        packed = all_reduce_sum(torch.cat(parts))
        values = packed[: len(terms)]
        if not torch.isfinite(values).all():  # same verdict on every rank: all skip together
            return None
        # The engine averages gradients over ranks; the loss shares sum to the global loss.
        self.engine.backward(local * self.world)
        self.engine.step()
        out = {name: float(v) for name, v in zip(terms, values, strict=True)}
        out["loss"] = float(values.sum())
        if moments is not None:  # the spread of the whole batch's similarity matrix
            out["sim_std"] = similarity_spread(packed[len(terms) :])
        temperature = getattr(self.loss_fn, "last_temperature", None)
        if temperature is not None:
            out["temperature"] = temperature
        out["all_negatives"] = float(fallback)
        return out

    # --- loop ----------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Train from the current state to `train.epochs`: each epoch streams its batches
        through `train_step`, then validates. The metrics writer decides which steps are
        recorded, the checkpointer which are saved (every `ckpt_every` steps, epoch ends)."""
        cfg, st = self.cfg, self.state
        total = self.reader.batches_per_epoch * cfg.train.epochs
        log.info(
            "training from step %d (epoch %d, batch %d) to step %d",
            st.step,
            st.epoch,
            st.batch_in_epoch,
            total,
        )
        bar = tqdm(
            total=total,
            initial=st.step,
            disable=not is_rank_zero(self.rank),
            unit="step",
            dynamic_ncols=True,
        )
        self.consecutive_bad = 0
        while st.epoch < cfg.train.epochs:
            self._apply_freeze()
            self.metrics.start_timing()
            margin = cfg.loss.margin if cfg.loss.name == "triplet" else 0.0  # (0: off)
            stalled = MarginStall(margin, cfg.loss.reduction)
            start = st.data_positions[self.rank] if st.data_positions else None
            batches = self.reader.epoch(st.epoch, st.batch_in_epoch, start)
            # Closed here, not by a finaliser, should an error end the loop: a SIGTERM that
            # arrives while it closes then stops the rank cleanly (no "Exception ignored").
            with contextlib.closing(batches):
                for batch in batches:
                    counts = all_reduce_sum(torch.tensor([batch.skipped, batch.retries]))
                    st.skipped_samples += int(counts[0])
                    st.data_retries += int(counts[1])
                    result = self.train_step(batch)
                    st.step, st.batch_in_epoch = st.step + 1, st.batch_in_epoch + 1
                    self.metrics.count(batch.images.shape[0] * self.world)
                    bar.update(1)
                    self._track_nonfinite(result)
                    if result is not None:
                        stalled.update(result)
                        self._watch_collapse(result)
                        if self.metrics.should_log(st.step):
                            rate = self.metrics.log_train(st, result, self._lr())
                            bar.set_postfix(loss=f"{result['loss']:.4f}", img_s=f"{rate:.0f}")
                    if self.checkpointer.should_save(st.step):
                        self._save()
            self._warn_if_stalled(stalled)
            st.epoch, st.batch_in_epoch, st.data_positions = st.epoch + 1, 0, []
            self._validate()
            if self.checkpointer.should_save_epoch_end(st.step):
                self._save()
        bar.close()
        self.checkpointer.flush()
        self.metrics.close()
        self.guard.finish(st.step)
        return st

    def _track_nonfinite(self, result: dict[str, float] | None) -> None:
        """Count a skipped (non-finite) step; stop after `train.max_nonfinite` in a row."""
        if result is not None:
            self.consecutive_bad = 0
            return
        st = self.state
        st.nonfinite_steps += 1
        self.consecutive_bad += 1
        log.warning(
            "non-finite loss at step %d: step skipped (%d in a row)",
            st.step,
            self.consecutive_bad,
        )
        if self.consecutive_bad >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_bad} consecutive non-finite losses at step "
                f"{st.step}; {self._last_finite()}"
            )

    def _watch_collapse(self, result: dict[str, float]) -> None:
        """Hand the step's score spread to the collapse guard, which may stop the run. InfoNCE
        ranks logits: their spread is sim_std / temperature."""
        if "sim_std" in result:
            spread = result["sim_std"] / result.get("temperature", 1.0)
            st = self.state
            can = self.loss_fn.can_fall_back(st.epoch)
            share = margin_share(self.cfg.loss, result)
            rank0_log = log if is_rank_zero(self.rank) else None
            self.guard.update(spread, can, st.step, rank0_log, margin_share=share)

    def _warn_if_stalled(self, stalled: MarginStall) -> None:
        """At an epoch end: the margin-stall warning, when the triplet terms sat at the margin
        for the whole epoch."""
        if stalled.whole_epoch() and is_rank_zero(self.rank):
            negatives = self.loss_fn.negatives(self.state.epoch, self.guard.fallback)
            log.warning(stalled.warning(self.state.epoch, negatives))

    def _apply_freeze(self) -> None:
        """At an epoch start: during the first `optim.freeze_epochs` the `freeze_groups` do not
        require grad (no gradient, so none in the clip norm; their LR is 0 as well). At the
        first unfrozen epoch's start their optimizer state is dropped: ZeRO 1-3 keep stepping
        a flat partition with zero gradients while it is frozen, so Adam's step count (and its
        bias correction) must start again. Decided by (epoch, batch) alone, so a resumed run
        does exactly what an uninterrupted one did."""
        if not self._freezable:
            return
        st, epochs = self.state, self.cfg.optim.freeze_epochs
        frozen = st.epoch < epochs
        for _, _, params in self._freezable:
            for p in params:
                p.requires_grad_(not frozen)
        if st.epoch == epochs and st.batch_in_epoch == 0:
            for index, _, _ in self._freezable:
                ds.reset_optimizer_state(self.engine, index)
        names = [name for _, name, _ in self._freezable]
        if frozen or st.epoch == epochs:
            log.info("epoch %d: %s %s", st.epoch, names, "frozen" if frozen else "unfrozen")

    def _lr(self) -> float:
        """The text encoder's current LR (the base LR x its multiplier), else the first
        group's: the LR the records show."""
        groups = self.engine.optimizer.param_groups
        return float(
            next((g["lr"] for g in groups if g.get("name") == "text_encoder"), groups[0]["lr"])
        )

    # --- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        """Validation RSUM through the evaluator on every rank; a better one becomes `best`."""
        if self.cfg.data.val_shards is None:
            return
        reader = build_eval_reader(
            self.cfg.data,
            self.cfg.data.val_shards,
            self.kind,
            self.tokenizer,
            self.rank,
            self.world,
        )
        enc = encode(self.engine.module, reader, self.device)
        protocol = self.cfg.data.val_protocol

        def score() -> float:
            result = gather_and_score(enc, self.similarity, self.cfg.data.eval_batch_size, protocol)
            if result is None:  # not rank 0
                return 0.0
            bad = int((~np.isfinite(result.sims)).sum())
            if bad:  # a diverged model: never a good score, never `best`
                log.warning(
                    "validation: %d of %d scores are not finite; val_rsum recorded as NaN",
                    bad,
                    result.sims.size,
                )
                return float("nan")
            return whole_set(result.metrics)["rsum"]

        rsum_value = broadcast_float(on_all_ranks(score, "validation"))
        if is_rank_zero(self.rank):
            log.info("epoch %d validation RSUM %.2f", self.state.epoch, rsum_value)
        self.metrics.log_validation(self.state, rsum_value)
        if rsum_value > self.state.best_rsum:  # NaN never is
            previous, self.state.best_rsum = self.state.best_rsum, rsum_value
            if not self._save(tag="best"):
                self.state.best_rsum = previous

    # --- checkpoints ---------------------------------------------------------------------------

    def _save(self, tag: str | None = None) -> bool:
        """Checkpoint (a step tag, or `best`) unless a streak of non-finite losses is under
        way; stops the run if the model's parameters or buffers are no longer finite, so every
        checkpoint written is one a resume or an export can use. Returns whether it saved."""
        if self.consecutive_bad:
            log.warning(
                "step %d: no checkpoint during a streak of non-finite losses", self.state.step
            )
            return False
        bad = self._nonfinite_tensors()
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteLossError(
                f"step {self.state.step}: the model holds non-finite values ({shown}); "
                f"not checkpointed; {self._last_finite()}"
            )
        # Mid-epoch, where each rank's data stream stands (batch_in_epoch is the same on all).
        st = self.state
        st.data_positions = all_gather_list([self.reader.position]) if st.batch_in_epoch else []
        st.collapse = self.guard.state()
        self.checkpointer.save(st, tag=tag)
        return True

    def _nonfinite_tensors(self) -> list[str]:
        """Names of parameters and floating buffers holding NaN or inf on any rank (ZeRO-3:
        each rank checks its partition)."""
        module = self.engine.module
        names = []
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            data = getattr(t, "ds_tensor", t)
            if data.is_floating_point() and data.numel() and not torch.isfinite(data).all():
                names.append(name)
        return sorted(set(all_gather_list(names)))

    def _last_finite(self) -> str:
        path = self.checkpointer.latest_path()
        return "no checkpoint was written" if path is None else f"last finite checkpoint: {path}"
