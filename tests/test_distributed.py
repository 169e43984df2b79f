"""Collectives on 2 gloo processes (free port, timeout): the loss split over ranks equals the
whole-batch loss in value and gradient; gathers tolerate empty ranks; failures reach all ranks."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from setdiv import similarity
from setdiv.config import LossConfig
from setdiv.distributed import all_gather_rows, free_port, on_all_ranks, world_info
from setdiv.losses import build_loss
from setdiv.model.set_modules import SetOutput

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def global_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(30, 2, 8, generator=g, dtype=torch.float64), dim=-1)
    slots_i = torch.randn(6, 3, 8, generator=g, dtype=torch.float64)
    slots_t = torch.randn(30, 2, 8, generator=g, dtype=torch.float64)
    return img, txt, slots_i, slots_t


LOSS = LossConfig(margin=0.2, mmd_weight=0.5, div_weight=0.5)


def loss_and_grads(img, txt, si, st):  # noqa: ANN001, ANN201
    leaves = [t.clone().requires_grad_() for t in (img, txt, si, st)]
    terms = build_loss(LOSS, similarity.smooth_chamfer)(
        SetOutput(leaves[0], leaves[2]), SetOutput(leaves[1], leaves[3])
    )
    return terms, leaves


def _worker(rank: int, port: int, queue: mp.Queue) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
        assert world_info().rank == rank
        img, txt, si, st = global_batch()
        terms, leaves = loss_and_grads(
            img[3 * rank : 3 * rank + 3],
            txt[15 * rank : 15 * rank + 15],
            si[3 * rank : 3 * rank + 3],
            st[15 * rank : 15 * rank + 15],
        )
        total = sum(terms.values())
        total.backward()
        values = torch.stack([t.detach() for t in terms.values()])
        dist.all_reduce(values)
        grads = [leaf.grad for leaf in leaves]
        # An empty rank in a row gather.
        rows = all_gather_rows(
            torch.ones(2, 4) if rank == 0 else torch.zeros(0, 1, 1).reshape(0, 1)
        )
        try:
            on_all_ranks(lambda: 1 / 0 if rank == 1 else 1, "the test step")
            failure = "none"
        except ZeroDivisionError:
            failure = "own"
        except RuntimeError as exc:
            failure = str(exc)
        queue.put((rank, values, grads, rows.shape, failure))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- report to the parent instead of hanging it
        queue.put((rank, traceback.format_exc(), None, None, None))


def test_loss_split_over_two_ranks_equals_whole_batch() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        rank, values, grads, shape, failure = queue.get(timeout=100)
        assert grads is not None, values  # a traceback from the worker
        results[rank] = (values, grads, shape, failure)
    for p in procs:
        p.join(timeout=30)
    terms, leaves = loss_and_grads(*global_batch())
    sum(terms.values()).backward()
    whole = torch.stack([t.detach() for t in terms.values()])
    for rank in range(2):
        values, grads, shape, failure = results[rank]
        torch.testing.assert_close(values, whole)
        for i, (local, full) in enumerate(zip(grads, leaves, strict=True)):
            n = local.shape[0]
            expected = full.grad[rank * n : (rank + 1) * n]
            torch.testing.assert_close(local, expected, msg=lambda m, i=i: f"leaf {i}: {m}")
        assert shape == (2, 4)
    assert results[1][3] == "own" and "failed on another rank" in results[0][3]


def test_rank_world_and_rendezvous_from_torchrun_or_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    from setdiv.distributed import WorldInfo, rendezvous_address

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7")
    assert world_info() == WorldInfo(5, 8, 1)
    assert rendezvous_address() == ("10.0.0.7", str(20000 + 123456 % 20000))
    monkeypatch.setenv("RANK", "2")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert world_info() == WorldInfo(2, 4, 0) and rendezvous_address() == ("node0", "1234")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 outside world of size 4"):
        world_info()
