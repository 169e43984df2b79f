"""Collectives on 2 gloo processes (free port, timeout): the loss split over ranks equals the
whole-batch loss in value and gradient, and so does a synchronised BatchNorm, without deprecated
collectives; gathers tolerate empty ranks; failures reach all ranks."""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from setdiv import similarity
from setdiv.config import LossConfig
from setdiv.distributed import (
    all_gather_rows,
    all_gather_with_grad,
    free_port,
    job_from_env,
    on_all_ranks,
    process_group,
)
from setdiv.losses import build_loss, similarity_spread
from setdiv.model.layers import SyncMaskedBatchNorm
from setdiv.model.set_modules import SetOutput

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def global_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(30, 2, 8, generator=g, dtype=torch.float64), dim=-1)
    slots_i = torch.randn(6, 3, 8, generator=g, dtype=torch.float64)
    slots_t = torch.randn(30, 2, 8, generator=g, dtype=torch.float64)
    return img, txt, slots_i, slots_t


LOSSES = {
    "hardest": LossConfig(margin=0.2, negatives="hardest", mmd_weight=0.5, div_weight=0.5),
    "selective_robust": LossConfig(
        margin=0.2, negatives="selective", robust_q=0.5, mmd_weight=0.5, div_weight=0.5
    ),
    "infonce_hn_robust": LossConfig(
        name="infonce", temperature=0.1, hn_beta=0.5, robust_q=0.5, mmd_weight=0.5
    ),
}
"""Each objective whose 2-rank shares must sum to the whole batch's loss and gradient."""


def loss_and_grads(img, txt, si, st, cfg: LossConfig):  # noqa: ANN001, ANN201
    """Terms, input leaves (their .grad after backward) + the objective's own parameters."""
    leaves = [t.clone().requires_grad_() for t in (img, txt, si, st)]
    loss = build_loss(cfg, similarity.smooth_chamfer).double()  # temperature in float64 too
    terms = loss(SetOutput(leaves[0], leaves[2]), SetOutput(leaves[1], leaves[3]))
    return terms, leaves + list(loss.parameters()), loss.sim_moments


def run_two_ranks(target: Callable, *args: object) -> dict[int, tuple]:
    """Run `target(rank, port, queue, *args)` on 2 spawned processes; {rank: what it put}. A
    worker puts (rank, tuple) or, when it failed, (rank, traceback text)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue, *args)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        rank, result = queue.get(timeout=100)
        assert not isinstance(result, str), result  # a traceback from the worker
        results[rank] = result
    for p in procs:
        p.join(timeout=30)
    return results


def _join_gloo(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)


def _worker(rank: int, port: int, queue: mp.Queue, cfg: LossConfig) -> None:
    try:
        _join_gloo(rank, port)
        assert job_from_env().rank == rank
        img, txt, si, st = global_batch()
        terms, leaves, moments = loss_and_grads(
            img[3 * rank : 3 * rank + 3],
            txt[15 * rank : 15 * rank + 15],
            si[3 * rank : 3 * rank + 3],
            st[15 * rank : 15 * rank + 15],
            cfg,
        )
        total = sum(terms.values())
        total.backward()
        values = torch.stack([t.detach() for t in terms.values()])
        dist.all_reduce(values)
        dist.all_reduce(moments)  # this rank's rows of the similarity matrix -> all of it
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
        # numpy, pickled by value: a tensor would travel as a shared-memory handle that dies
        # with this process if the parent reads it late
        spread = similarity_spread(moments)
        queue.put((rank, (values.numpy(), [g.numpy() for g in grads], rows.shape, failure, spread)))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- report to the parent instead of hanging it
        queue.put((rank, traceback.format_exc()))


@pytest.mark.parametrize("objective", list(LOSSES))
def test_loss_split_over_two_ranks_equals_whole_batch(objective: str) -> None:
    """On 2 gloo ranks, the ranks' loss shares sum to the single-process loss of the whole
    batch, each rank's input gradients are the whole batch's for its samples, and the
    objective's own parameters (InfoNCE's temperature) get gradient shares that sum to the
    whole batch's (the engine then averages world_size x them): float64 tolerance."""
    cfg = LOSSES[objective]
    results = run_two_ranks(_worker, cfg)
    terms, leaves, _ = loss_and_grads(*global_batch(), cfg)
    sum(terms.values()).backward()
    whole = torch.stack([t.detach() for t in terms.values()])
    img, txt = global_batch()[:2]
    whole_std = similarity.smooth_chamfer(img, txt).numpy().std()  # the 6 x 30 matrix
    for rank in range(2):
        values, grads, shape, failure, spread = results[rank]
        assert spread == pytest.approx(whole_std, rel=1e-9)
        torch.testing.assert_close(torch.from_numpy(values), whole)
        for i, (local, full) in enumerate(zip(grads[:4], leaves[:4], strict=True)):
            n = local.shape[0]
            expected = full.grad[rank * n : (rank + 1) * n]
            torch.testing.assert_close(
                torch.from_numpy(local), expected, msg=lambda m, i=i: f"leaf {i}: {m}"
            )
        assert shape == (2, 4)
    assert results[1][3] == "own" and "failed on another rank" in results[0][3]
    for j, whole_param in enumerate(leaves[4:]):  # the temperature: shares sum to the whole
        shares = sum(torch.from_numpy(results[r][1][4 + j]) for r in range(2))
        assert whole_param.grad.abs().sum() > 0
        torch.testing.assert_close(shares, whole_param.grad, rtol=1e-10, atol=1e-12)
    assert len(leaves) == 4 + (cfg.name == "infonce")


def batchnorm_batch() -> tuple[torch.Tensor, torch.Tensor, nn.BatchNorm1d]:
    """(8, 5) rows, (8, 8) weights of a loss over every pair of rows, a BatchNorm1d(5) with
    non-trivial affine parameters."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g) * 3 + 1
    pair_weights = torch.randn(8, 8, generator=g)
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(5, generator=g))
    return x, pair_weights, bn


DEPRECATIONS = ("FutureWarning", "DeprecationWarning")
"""How torch announces a collective it will remove (torch.distributed.nn's, for one)."""


def _batchnorm_worker(rank: int, port: int, queue: mp.Queue) -> None:
    """This rank's 4 rows through SyncMaskedBatchNorm, a loss of its rows against every
    rank's (gathered with gradient), as the retrieval losses do; every warning recorded."""
    try:
        _join_gloo(rank, port)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, pair_weights, ref = batchnorm_batch()
            rows = slice(4 * rank, 4 * rank + 4)
            bn = SyncMaskedBatchNorm(5)
            bn.load_state_dict(ref.state_dict())
            x = x[rows].clone().requires_grad_()
            out = bn(x)  # (4, 5)
            loss = (out @ all_gather_with_grad(out).T * pair_weights[rows]).sum()
            loss.backward()
        params = [p.grad.numpy() for p in (bn.weight, bn.bias)]
        stats = [bn.running_mean.numpy(), bn.running_var.numpy()]
        messages = [f"{w.category.__name__}: {w.message}" for w in caught]
        queue.put((rank, (out.detach().numpy(), x.grad.numpy(), params, stats, messages)))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- report to the parent instead of hanging it
        queue.put((rank, traceback.format_exc()))


def test_sync_batchnorm_over_two_ranks_equals_whole_batch_without_deprecated_collectives() -> None:
    """SyncMaskedBatchNorm on 2 gloo ranks normalises, back-propagates and tracks running
    statistics like nn.BatchNorm1d on the whole batch in one process (the affine parameters'
    gradient shares sum to the whole batch's), and neither it nor the gradient gather warns
    (torch.distributed.nn's collectives are deprecated: FutureWarning)."""
    x, pair_weights, ref = batchnorm_batch()
    results = run_two_ranks(_batchnorm_worker)
    x = x.requires_grad_()
    out = ref(x)
    (out @ out.T * pair_weights).sum().backward()
    for rank in range(2):
        local_out, local_grad, _, stats, messages = results[rank]
        rows = slice(4 * rank, 4 * rank + 4)
        assert [m for m in messages if m.startswith(DEPRECATIONS)] == []
        torch.testing.assert_close(torch.from_numpy(local_out), out.detach()[rows])
        torch.testing.assert_close(torch.from_numpy(local_grad), x.grad[rows])
        torch.testing.assert_close(torch.from_numpy(stats[0]), ref.running_mean)
        torch.testing.assert_close(torch.from_numpy(stats[1]), ref.running_var)
    for j, whole in enumerate((ref.weight.grad, ref.bias.grad)):
        shares = sum(torch.from_numpy(results[r][2][j]) for r in range(2))
        torch.testing.assert_close(shares, whole)


# --- the job from the environment, one device picker, local spawning ---------------------------

JOB_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def slurm_task(procid: int, nodes: int = 4, gpus: int = 8) -> dict[str, str]:
    """The variables srun gives task `procid` of a nodes x gpus job (one task per GPU)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(nodes * gpus),
        "SLURM_LOCALID": str(procid % gpus),
        "SLURM_NODEID": str(procid // gpus),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu-a[017-019],gpu-b001",
        "SLURM_STEP_NODELIST": "gpu-a[017-019],gpu-b001",
        "SLURM_TASKS_PER_NODE": f"{gpus}(x{nodes})",
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(gpus)),
    }


@pytest.mark.parametrize("procid", [0, 1, 7, 8, 13, 23, 24, 31])
def test_slurm_four_nodes_eight_gpus_mapping(procid: int) -> None:
    from setdiv.distributed import Job

    job = job_from_env(slurm_task(procid))
    assert job == Job(
        rank=procid,
        world_size=32,
        local_rank=procid % 8,
        master_addr="gpu-a017",  # first host of the step, the same for every task
        master_port=20000 + 4242,  # derived from the job id: every task agrees, requeue too
        launcher="slurm",
    )


def test_explicit_variables_win_and_bad_ones_fail() -> None:
    env = slurm_task(9)
    job = job_from_env({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"})
    assert (job.master_addr, job.master_port) == ("10.1.2.3", 1234)
    torchrun = {**env, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}
    torchrun |= {"MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    job = job_from_env(torchrun)
    assert (job.rank, job.world_size, job.local_rank, job.master_addr, job.master_port) == (
        2,
        4,
        2,
        "node0",
        29400,
    )
    with pytest.raises(ValueError, match="rank 4 outside world of size 4"):
        job_from_env({**torchrun, "RANK": "4"})
    no_rendezvous = process_group(job_from_env({"RANK": "0", "WORLD_SIZE": "2"}))
    with pytest.raises(ValueError, match="set MASTER_ADDR and MASTER_PORT"), no_rendezvous:
        pass
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        job_from_env({**env, "SLURM_PROCID": "x"})


def test_submitit_local_and_single_process() -> None:
    from setdiv.distributed import Job

    local = {
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_JOB_ID": "31337",
    }
    assert job_from_env(local) == Job(1, 2, 1, "127.0.0.1", 20000 + 31337 % 20000, "submitit-local")
    assert job_from_env({"PATH": "/bin"}) == Job.single()


def test_hostlist_expansion_by_hand() -> None:
    from setdiv.distributed import expand_hostlist

    assert expand_hostlist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert expand_hostlist("r[1-2]-n[09-10]") == ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]
    assert expand_hostlist("node7") == ["node7"]


@pytest.mark.parametrize(("visible", "expected"), [(8, [0, 5, 7]), (1, [0, 0, 0])])
def test_device_by_local_rank_among_visible_gpus(
    monkeypatch: pytest.MonkeyPatch, visible: int, expected: list[int]
) -> None:
    """A task that sees the node's 8 GPUs takes GPU local_rank; one bound to a single GPU
    (CUDA_VISIBLE_DEVICES left as SLURM set it) takes that one."""
    from setdiv.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    got = [pick_device(job_from_env(slurm_task(p))).index for p in (8, 13, 15)]
    assert got == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(job_from_env(slurm_task(13))) == torch.device("cpu")


def _spawned_sum(out: str, fail_rank: int) -> None:
    from setdiv.distributed import process_group

    with process_group() as job:
        with open(f"{out}/pid{job.rank}", "w") as f:
            f.write(str(os.getpid()))
        if job.rank == fail_rank:
            raise RuntimeError("rank failure on purpose")
        t = torch.tensor([float(job.rank + 1)])
        dist.all_reduce(t)  # rank 0 waits here forever if rank 1 failed
        with open(f"{out}/rank{job.rank}", "w") as f:
            f.write(f"{job.world_size} {job.local_rank} {t.item()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_spawn_local_forms_one_job_and_a_failure_stops_every_rank(tmp_path: Path) -> None:
    from setdiv.distributed import spawn_local

    spawn_local(_spawned_sum, 2, str(tmp_path), -1)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == [f"2 {r} 3.0" for r in (0, 1)]
    assert "RANK" not in os.environ or os.environ["RANK"] != "1"  # the parent's env untouched

    (tmp_path / "f").mkdir()
    with pytest.raises(RuntimeError, match="rank failure on purpose"):  # rank 1's own error
        spawn_local(_spawned_sum, 2, str(tmp_path / "f"), 1)
    pids = [int((tmp_path / f"f/pid{r}").read_text()) for r in range(2)]
    assert not any(_alive(p) for p in pids)


def test_killing_the_launcher_leaves_no_rank_behind(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time, os\n"
        "from setdiv.distributed import spawn_local\n"
        "def hang(out):\n"
        "    open(f'{out}/pid{os.environ[\"RANK\"]}', 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    spawn_local(hang, 2, sys.argv[1])\n"
    )
    (tmp_path / "hang.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "hang.py"), str(tmp_path)])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(tmp_path.glob("pid*"))) < 2:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)  # no handler, no finally: the kernel tells the ranks
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_cpu_threads_share_the_cores_between_ranks_and_data_workers() -> None:
    from setdiv.distributed import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0, {}) == cores
    assert cpu_threads(1, {}) == max(1, cores - 1)
    assert cpu_threads(1, {"LOCAL_WORLD_SIZE": str(2 * cores)}) == 1  # never below one
    assert cpu_threads(0, {"SLURM_NTASKS_PER_NODE": "1"}) == cores
    assert cpu_threads(2, {"OMP_NUM_THREADS": "3"}) is None  # the user decided


def test_a_master_that_does_not_resolve_fails_at_once_naming_it() -> None:
    from setdiv.distributed import Job, RendezvousError

    job = Job(1, 2, 1, "no-such-node.invalid", free_port(), "slurm")
    start = time.monotonic()
    with pytest.raises(RendezvousError) as err, process_group(job, timeout_s=60):
        pass
    assert time.monotonic() - start < 10  # not after the 60 s timeout
    assert "'no-such-node.invalid'" in str(err.value) and f"port {job.master_port}" in str(
        err.value
    )
    assert err.value.exit_code == 4 and not dist.is_initialized()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rendezvous_missing_a_rank_fails_within_the_timeout(rank: int) -> None:
    """Rank 0 alone waits for the others, rank 1 alone for the master: both give up after
    `timeout_s`, naming the address and port (torch's default would wait 30 minutes)."""
    from setdiv.distributed import Job, RendezvousError

    job = Job(rank, 2, rank, "127.0.0.1", free_port(), "spawn/torchrun")
    start = time.monotonic()
    with pytest.raises(RendezvousError) as err, process_group(job, timeout_s=3):
        pass
    assert 2.5 < time.monotonic() - start < 30
    assert f"127.0.0.1:{job.master_port} did not complete within 3 s" in str(err.value)
    assert not dist.is_initialized()


_STOPPED_TRAINING = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[3])
from run_helpers import tiny_overrides
from pathlib import Path
from setdiv.train.launch import train
data = Path(sys.argv[1])
def stop():  # SIGTERM to the rank and its data workers, as Slurm signals a whole step
    while not (Path(sys.argv[2]) / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(os.getpgid(0), signal.SIGTERM)
threading.Thread(target=stop, daemon=True).start()
train("configs/demo.yaml", [*tiny_overrides(data, epochs=50), "data.num_workers=2"], sys.argv[2])
"""


@pytest.mark.timeout(300)
def test_sigterm_stops_a_rank_cleanly_and_its_workers_do_not_die_of_it(tmp_path: Path) -> None:
    """What a Slurm requeue or cancel does to a step: SIGTERM to every process. The rank
    stops with one line (exit 143), its data workers ignore the signal and are shut down by
    the rank, so there is no `DataLoader worker ... killed` error and no traceback; the run
    resumes from its checkpoint as usual."""
    import subprocess
    import sys

    from run_helpers import CLEAN_ENV, ROOT, write_data

    data = write_data(tmp_path / "data", train=256)
    (tmp_path / "script.py").write_text(_STOPPED_TRAINING)
    r = subprocess.run(
        [sys.executable, tmp_path / "script.py", data, tmp_path / "run", Path(__file__).parent],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=CLEAN_ENV,
        start_new_session=True,  # its own process group, which it signals
    )  # fmt: skip
    assert r.returncode == 128 + 15, r.stderr[-3000:]
    assert "training stopped: SIGTERM" in r.stderr
    for bad in ("Traceback", "DataLoader worker", "killed by signal"):
        assert bad not in r.stderr, r.stderr[-3000:]
