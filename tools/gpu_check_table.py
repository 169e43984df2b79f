"""One Markdown table for BENCHMARKS.md from the logs `tools/gpu_check.sh` leaves in OUT.

python tools/gpu_check_table.py OUT
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _lines(path: Path, pattern: str) -> list[str]:
    """The lines of `path` that match `pattern` (none when the file is missing)."""
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = (" ".join(line.split()) for line in text.splitlines())  # spaces collapsed
    return [line for line in lines if re.search(pattern, line)]


def _first(path: Path, pattern: str, missing: str = "not run") -> str:
    found = _lines(path, pattern)
    return found[0] if found else missing


def _last(path: Path, pattern: str, missing: str = "not run") -> str:
    found = _lines(path, pattern)
    return found[-1] if found else missing


def _step_rc(path: Path, step: str) -> str:
    failed = _lines(path, rf"^STEP {step} FAILED")
    return failed[-1] if failed else ""


def rows(out: Path) -> list[tuple[str, str]]:
    """(check, result) pairs, in the order the script runs the steps."""
    env, a = out / "env.log", out / "a_pytest.log"
    b, c = out / "b_bench_similarity.log", out / "c_bench_train_step.log"
    e, d = out / "e_bench_vit_step.log", out / "d_train_eval.log"
    f, g = out / "f_bench_resnext_step.log", out / "g_bench_decode.log"
    table = [
        ("device", _first(env, r"^gpu 0:", "no CUDA device reported")),
        ("software", _first(env, r"^python .*torch", "?")),
        ("a. tests (cuda, kernels, decoding, model, towers)", _last(a, r"\d+ (passed|failed)")),
        ("b. smooth-Chamfer matrix", _first(b, r"^smooth_chamfer matrix")),
        ("b. same, torch kernel", _first(b, r"^smooth_chamfer matrix .*torch kernel", "-")),
        ("b. vs the official loop", _first(b, r"^at \d+x\d+", "-")),
    ]
    for step, log, name in (("c", c, "ROI + bi-GRU"), ("e", e, "ViT-B/16 set heads"),
                            ("f", f, "ResNeXt-101 + BERT, 512 px")):  # fmt: skip
        table += [
            (f"{step}. {name} step, bf16", _first(log, r"^training step")),
            (f"{step}. batch", _first(log, r"^recipe", "-")),
            (f"{step}. FLOPs and MFU", _first(log, r"^model FLOPs", "-")),
            (f"{step}. similarity + loss", _first(log, r"^similarity\+loss fwd\+bwd: setdiv", "-")),
            (f"{step}. same, torch kernel", _first(log, r"^similarity\+loss fwd\+bwd, torch", "-")),
        ]
    table += [
        ("g. decode images/s per core: today, fast, ratio, |diff| (, device path)", r)
        for r in _lines(g, r"^(CC12M|COCO)")
    ]
    table += [
        ("d. train -> export -> eval", _last(d, r"^--- d\.\w+ rc=")),
        ("d. test RSUM", _first(d, r'"rsum"', "-")),
    ]
    for step, log in (("a", a), ("b", b), ("c", c), ("e", e), ("f", f), ("g", g), ("d", d)):
        failed = _step_rc(log, step)
        if failed:
            table.append((f"{step}. FAILED", failed))
    return table


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    print("| check | result |")
    print("|---|---|")
    for check, result in rows(out):
        print(f"| {check} | {result.replace('|', '/')} |")


if __name__ == "__main__":
    main()
