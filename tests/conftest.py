"""Shared fixtures: CPU DeepSpeed, deterministic seeds, tiny configs."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # The Triton kernels (tests/test_kernels.py) run on the CPU under Triton's interpreter, which
    # must be on before anything imports triton.language (transformers, timm and open_clip do):
    # its own helpers (tl.max, tl.sum) are decorated at that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from setdiv import config as config_lib  # noqa: E402

TINY = [
    "model.embed_dim=16",
    "model.image.feature_dim=12",
    "model.text.word_dim=8",
    "model.text.hidden_dim=16",
    "model.image_set.num_heads=2",
    "model.image_set.head_dim=4",
    "model.text_set.num_heads=2",
    "model.text_set.head_dim=4",
]
"""Overrides that shrink any config to a model that builds and runs in milliseconds."""


# --- two tests at a time (pytest-xdist: `-n 2 --dist loadscope` in pyproject.toml) ----------

ONE_CLUSTER_AT_A_TIME = frozenset({
    "test_cluster_ensemble.py", "test_cluster_jobs.py", "test_cluster_ray_slurm.py",
    "test_cluster_slurm.py", "test_cluster_submit.py", "test_cluster_sweep.py",
    "test_index_ray.py", "test_index_sharded.py",
})  # fmt: skip
"""Files whose tests start Ray or Slurm on this machine. They run one after another on one
worker: a plain `ray.init()` joins the newest cluster that `ray start` made here, and Slurm's
nodes are this machine's CPUs. Together they are the suite's longest group."""

START_FIRST = ("cluster", "test_demo.py")
"""The longest groups, queued first so that the other tests fill in beside them."""


def work_unit(nodeid: str) -> str:
    """What runs on one worker, in order: a test file, or all the Ray and Slurm files."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "cluster" if name in ONE_CLUSTER_AT_A_TIME else name


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadscope` with `work_unit`'s units. (xdist's own `--dist loadgroup` would do
    this from marks, but under pytest 9.2 its renamed node ids never reach the scheduler.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByGroup(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest groups first (`--no-loadscope-reorder` keeps this order)."""

    def rank(item: pytest.Item) -> int:
        group = work_unit(item.nodeid)
        return START_FIRST.index(group) if group in START_FIRST else len(START_FIRST)

    items.sort(key=rank)  # stable: collection order within each rank


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Each worker's in-process tests take their share of the cores (spawned jobs size their
    # own threads).
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_log_handlers() -> Iterator[None]:
    """A test that configures logging in-process (`setdiv.cli.main`, `log_as_rank`) binds a
    handler to the stream pytest captured for it, which is closed after the test; later
    records would go there ("--- Logging error ---"), and a later `basicConfig` would not
    replace it. Drop such handlers after each test (pytest's own stay)."""
    yield
    for handler in list(logging.root.handlers):
        if type(handler) is logging.StreamHandler:
            logging.root.removeHandler(handler)


def tiny_config(*overrides: str, paths: tuple[str, ...] = ()) -> config_lib.Config:
    extra = (
        []
        if any(o.startswith("model.text.vocab_path") for o in overrides)
        else ["model.text.vocab_size=40"]
    )
    return config_lib.load(paths, [*TINY, *extra, *overrides])


# --- a real Slurm of two nodes on this machine (tools/slurm_local.sh), for the `slurm` tests --


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    """State, spool, logs and pid files of the throw-away cluster."""
    conf: str
    """Its slurm.conf: clients find the cluster through SLURM_CONF alone."""

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": self.conf}


SLURM_LOCAL = Path(__file__).parents[1] / "tools" / "slurm_local.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Nodes n1, n2 (partition debug) and one whose name does not resolve (partition
    unresolvable), up for the session; stopped at its end, and checked to be gone. Skipped,
    with the reason, only where Slurm cannot be installed (tools/slurm_local.sh exit 4)."""
    state = Path(tempfile.mkdtemp(prefix="sdslurm", dir="/tmp"))  # short: munge's socket path
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state)}
    env.pop("SLURM_CONF", None)
    up = subprocess.run(
        ["bash", str(SLURM_LOCAL), "up", "2", "--unresolvable"],
        capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    if up.returncode == 4:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"no local Slurm: {up.stderr.strip().splitlines()[-1]}")
    pids = [int(p.read_text()) for p in (state / "run").glob("*.pid")]
    try:
        assert up.returncode == 0, up.stderr
        yield SlurmCluster(state, up.stdout.strip().split("=", 1)[1])
    finally:
        down = subprocess.run(
            ["bash", str(SLURM_LOCAL), "down"], capture_output=True, text=True, timeout=120, env=env
        )
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        assert down.returncode == 0 and not alive, (down.stderr, alive)
        shutil.rmtree(state, ignore_errors=True)


def register_tiny_clip(
    directory: Path,
    name: str,
    *,
    image_size: int = 32,
    width: int = 64,
    patch_size: int = 8,
    text_layers: int = 1,
    embed_dim: int = 32,
    **vision: int,
) -> str:
    """A tiny open_clip model config written to `directory` and registered as `name` (for
    this process); `vision`: further vision_cfg keys (head_width, ...)."""
    import json

    import open_clip

    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps({
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": width,
                       "patch_size": patch_size, **vision},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": text_layers},
    }))  # fmt: skip
    open_clip.add_model_config(path)
    return name


# --- the search service's fixtures (tests/test_serve*.py) ---------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export (random demo model), 40 synthetic test images with their pictures in the
    shards, and an image index over them."""
    from test_index import make_export

    from setdiv import cli
    from setdiv.data.convert import synthetic_samples
    from setdiv.data.shards import write_shards
    from setdiv.data.vocab import Vocab

    root = tmp_path_factory.mktemp("serve")
    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    make_export(root, 0)
    samples = synthetic_samples("test", 40, 0, picture=True)
    write_shards(samples, root / "a", "test", "regions", "synthetic", 20)
    build = ["index", "build", str(root / "export0"), "--modality", "image"]
    assert cli.main([*build, "--data", f"{root}/a/test-*.tar", "--out", str(root / "img")]) == 0
    return root


@pytest.fixture(scope="module")
def service(gallery: Path) -> Any:
    """The `setdiv.index.service.Service` over `gallery`'s image index."""
    from setdiv.index.search import SetSearcher
    from setdiv.index.service import Service

    return Service(SetSearcher(gallery / "img"))


@pytest.fixture(scope="module")
def server(service: Any):  # noqa: ANN201
    """The port of a real uvicorn server over `service`."""
    from serve_helpers import running_server

    with running_server(service) as port:
        yield port


@pytest.fixture(scope="module")
def text_server(gallery: Path):  # noqa: ANN201
    """(port, service) of a caption gallery whose model reads pixels: queries are images."""
    from serve_helpers import build_index, pixel_export, running_server

    from setdiv.data.convert import synthetic_samples
    from setdiv.index.search import SetSearcher
    from setdiv.index.service import Service

    samples = synthetic_samples("test", 20, 0, kind="image")
    index = build_index(gallery, pixel_export(gallery), samples, "image", "text", "txt")
    service = Service(SetSearcher(index))
    with running_server(service) as port:
        yield port, service
