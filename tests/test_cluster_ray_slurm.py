"""cluster/ray_slurm.sbatch with stand-ins for srun, scontrol, ray and the driver: a Ray head on
the first node and a worker on every other with explicit CPUs/GPUs, a per-job token with
token auth on every node, the driver pointed at the head, its exit code passed on, the
token removed and the Ray processes stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from run_helpers import CLEAN_ENV, ROOT

SCRIPT = ROOT / "cluster" / "ray_slurm.sbatch"
BLOCK = f"300.{uuid.uuid4().int % 10**9:09d}"
"""The blocking `ray start` stand-in sleeps this long: a duration no other process on the
machine has, so the test finds exactly the sleeps it started."""


def stand_ins(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    scripts = {
        "scontrol": "echo n001; echo n002; echo n003\n",
        "srun": (
            f'echo "srun $*" >> {log}\n'
            'while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done\n'
            'if [ "$1" = hostname ]; then echo "10.0.0.1 fe80::1"; exit 0; fi\n'
            'exec "$@"\n'
        ),
        "ray": (
            f'echo "ray $* auth=$RAY_AUTH_MODE token=$(cat $RAY_AUTH_TOKEN_PATH)" >> {log}\n'
            f'case " $* " in *" --block "*) exec sleep {BLOCK};; esac\n'
        ),
        "python": (  # the driver; `python -c` (the token generator) goes to the real one
            f'if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
            # `-m setdiv_cluster.ray_cluster wait`: returns once every node's `ray start` ran
            # (its own line: the `srun ... ray start` lines name it too, before it runs)
            'if [ "$1" = -m ]; then\n'
            f'  for _ in $(seq 600); do [ "$(grep -c "^ray start" {log})" -ge 3 ] && break; '
            "sleep 0.1; done\n"
            f'  echo "wait $*" >> {log}; exit 0\n'
            "fi\n"
            f'echo "driver $* auth=$RAY_AUTH_MODE token=$(cat $RAY_AUTH_TOKEN_PATH)" >> {log}\n'
            "exit 7\n"
        ),
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)


def test_ray_head_workers_token_and_driver(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    stand_ins(tmp_path / "bin", log)
    env = {
        **CLEAN_ENV,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "SETDIV_PYTHON": str(tmp_path / "bin" / "python"),
        "SETDIV_RAY_TOKEN_DIR": str(tmp_path / "tokens"),
        "SLURM_JOB_ID": "555",
        "SLURM_JOB_NODELIST": "n[001-003]",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_GPUS_ON_NODE": "4",
    }
    r = subprocess.run(
        ["bash", str(SCRIPT), "cluster/sweep.py", "configs/demo.yaml", "--samples", "8"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 7, r.stderr  # the driver's own exit code
    calls = log.read_text().splitlines()
    token = next(c for c in calls if c.startswith("driver")).rsplit("token=", 1)[1]
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits, hex
    starts = [c for c in calls if c.startswith("ray start")]
    head = [c for c in starts if "--head" in c]
    workers = [c for c in starts if "--address=10.0.0.1:6379" in c]
    assert len(head) == 1 and len(workers) == 2
    for c in starts:
        assert "--num-cpus=32" in c and "--num-gpus=4" in c and "--block" in c
        assert c.endswith(f"auth=token token={token}")
    assert "--node-ip-address=10.0.0.1 --port=6379" in head[0]

    def node(call: str) -> str:
        return call.split("-w ")[1].split()[0]

    sruns = [c for c in calls if c.startswith("srun") and " start " in c]
    assert [node(c) for c in sruns if "--head" in c] == ["n001"]
    assert sorted(node(c) for c in sruns if "--head" not in c) == ["n002", "n003"]
    driver = next(c for c in calls if c.startswith("driver"))
    assert driver.startswith(
        "driver cluster/sweep.py configs/demo.yaml --samples 8 --address 10.0.0.1:6379 auth=token"
    )
    assert list((tmp_path / "tokens").iterdir()) == []  # the token is removed at the end
    alive = subprocess.run(["pgrep", "-f", f"sleep {BLOCK}"], capture_output=True, text=True).stdout
    assert alive.strip() == ""  # the blocking `ray start` steps were stopped


def test_usage_without_a_driver() -> None:
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr
