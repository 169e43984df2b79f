"""The package's shape, checked from its source: no import cycle among setdiv's modules, no
module over 400 lines, one way to start ranks, and launchers that import no torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("setdiv", "setdiv_cluster")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module in setdiv and setdiv_cluster."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import of a module: at module level, inside `if` / `try` blocks (TYPE_CHECKING
    included: a cycle there is still a cycle of the design) and inside functions and classes
    (run later, on first use, but a dependency all the same)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the setdiv modules it imports, anywhere in it (a `from pkg import name` counts
    as importing `pkg.name` when that is a module, else `pkg`)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                assert node.level == 0, f"{path}: relative import"
                base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]  # fmt: skip
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_setdiv_modules() -> None:
    """Counting imports inside functions: a lazy import that closes a cycle is still one."""
    graph = import_graph()
    assert len(graph) > 60 and graph["setdiv.train.trainer"], "the walk found the modules"
    assert "setdiv.model.towers" in graph["setdiv.model.encoders"], "function-level imports"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


LAYERS = {
    # lower layer (prefix) -> what it must never import (prefixes)
    "setdiv.errors": ("setdiv.",),
    "setdiv.registry": ("setdiv.",),
    "setdiv.paths": ("setdiv.",),
    "setdiv.kernels": ("setdiv.",),
    "setdiv.config": ("setdiv.data", "setdiv.model", "setdiv.export", "setdiv.train",
                      "setdiv.eval", "setdiv.index", "setdiv.cli"),
    "setdiv.data": ("setdiv.model", "setdiv.export", "setdiv.train", "setdiv.eval",
                    "setdiv.index", "setdiv.cli", "setdiv.api"),
    "setdiv.model": ("setdiv.export", "setdiv.train", "setdiv.eval", "setdiv.index",
                     "setdiv.cli", "setdiv.api"),
    "setdiv.export": ("setdiv.export_run", "setdiv.train", "setdiv.eval", "setdiv.index",
                      "setdiv.cli", "setdiv.api"),
    "setdiv.eval": ("setdiv.export_run", "setdiv.train", "setdiv.index", "setdiv.cli"),
    "setdiv.index": ("setdiv.export_run", "setdiv.train", "setdiv.cli"),
    "setdiv.train": ("setdiv.index", "setdiv.cli", "setdiv.api", "setdiv.demo"),
}  # fmt: skip
"""The layers, bottom up: the exchanged export format sits below training, evaluation and
search; making an export from a run (`setdiv.export_run`) above training; the CLI on top."""


def test_no_lower_layer_imports_a_higher_one() -> None:
    graph = import_graph()
    wrong = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for layer, banned in LAYERS.items()
        if m == layer or m.startswith(layer + ".")
        for t in targets
        if any(t == b or t.startswith(b if b.endswith(".") else b + ".") for b in banned)
        and not (t == layer or t.startswith(layer + "."))
    ]
    assert wrong == [], wrong


def test_no_module_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _calls(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text())
    return sum(
        isinstance(n, ast.Call)
        and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
        for n in ast.walk(tree)
    )


def test_every_command_starts_ranks_through_run_ranks() -> None:
    """train, eval, index build and extract start their ranks through `run_ranks`; no other
    module starts processes of its own (`multiprocessing`, `spawn_local`)."""
    mods = modules()
    spawners = {m for m, p in mods.items() if _calls(p, "spawn_local")}
    assert spawners == {"setdiv.distributed.group"}  # (inside run_ranks)
    for m in ("setdiv.train.launch", "setdiv.eval.run", "setdiv.index.build", "setdiv.extract"):
        assert _calls(mods[m], "run_ranks") == 1, m
    own = {
        m for m, p in mods.items() if re.search(r"\bmultiprocessing\b|\.Process\(", p.read_text())
    }
    assert own <= {"setdiv.distributed.group", "setdiv.data.workers"}, own


@pytest.mark.parametrize(
    "argv",
    [
        ["cluster/submit.py", "--help"],
        ["cluster/sweep.py", "--help"],
        ["cluster/ensemble.py", "--help"],
        ["-m", "setdiv.cli", "--help"],
    ],
    ids=str,
)
def test_launchers_import_no_torch(argv: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "setdiv.config" in imported  # (the parse found the import lines)
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision", "numpy")}


def test_user_errors_become_one_line_and_an_exit_code_in_one_place() -> None:
    """`setdiv.errors.report` (and its `ArgumentParser`) is the only code that writes
    `PROG: error: ...` or maps an exception to an exit code: every CLI (setdiv's, the cluster
    scripts, tools/ensemble_eval.py) goes through it."""
    owner = ROOT / "setdiv/errors.py"
    files = [*modules().values(), *(ROOT / "tools").glob("*.py"), *(ROOT / "cluster").glob("*.py")]
    offenders = []
    for path in files:
        if path == owner:
            continue
        text = path.read_text()
        for pattern in (r'f"[^"\n]*: error: ', r'getattr\([a-z_]+, "exit_code"', r"\breturn 2\b"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert offenders == [], offenders
    assert "def user_exit_code" in owner.read_text() and "def report" in owner.read_text()


def test_the_rank_count_is_checked_where_the_flag_is_defined() -> None:
    """`--nproc` is `positive_int` (in `add_nproc_argument`); no command checks it again."""
    for path in modules().values():
        text = path.read_text()
        assert not re.search(r"args\.nproc\s*<\s*1|\"--nproc\": \(", text), path


def test_every_tool_is_referenced_from_the_docs() -> None:
    """tools/ holds what is used: each script is named in the README, docs/, BENCHMARKS.md
    or .ci/run."""
    docs = "\n".join(
        p.read_text()
        for p in [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / ".ci/run",
                  *(ROOT / "docs").glob("*.md")]
    )  # fmt: skip
    tools = [*(ROOT / "tools").glob("*.py"), *(ROOT / "tools").glob("*.sh")]
    assert len(tools) > 10
    unnamed = [p.name for p in tools if f"tools/{p.name}" not in docs]
    assert unnamed == [], unnamed


def test_code_cites_the_repositorys_own_method_page() -> None:
    """Comments and docstrings cite docs/method.md, never a specification outside the
    repository."""
    files = [*modules().values(), *(ROOT / "tools").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    files += [*(ROOT / "configs").glob("*.yaml")]
    files = [p for p in files if p != Path(__file__)]  # (this test names what it looks for)
    citing = [p.name for p in files if re.search(r"\bSPEC §|\(SPEC\b|SPEC golden", p.read_text())]
    assert citing == [], citing
    assert "## §1" in (ROOT / "docs/method.md").read_text()


def test_the_readme_is_short_and_its_test_command_is_cis() -> None:
    """A newcomer's README: at most 150 lines, the two commands (the demo; the suite, which
    is what .ci/run runs), and every documentation page it maps exists."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "bash tools/bootstrap.sh && .venv/bin/setdiv demo" in text
    suite = "bash tools/bootstrap.sh && .venv/bin/python -m pytest -q"
    assert suite in text and suite in (ROOT / ".ci/run").read_text()
    pages = re.findall(r"`(docs/[a-z_]+\.md)`", text)
    assert len(set(pages)) >= 8 and all((ROOT / p).is_file() for p in pages), pages


def test_run_and_export_file_names_and_vocabularies_have_one_owner() -> None:
    """Run-directory and export file names are spelled only in setdiv/paths.py; a config's
    vocabulary is loaded only by `setdiv.data.text.config_vocab` (and `Vocab.load` itself)."""
    names = r"\"(metrics\.jsonl|config\.yaml|model\.safetensors|train\.lock|checkpoints)\""
    owner = "setdiv.paths"
    spelled = [m for m, p in modules().items() if m != owner and re.search(names, p.read_text())]
    assert spelled == [], spelled
    loading = {m for m, p in modules().items() if "Vocab.load(" in p.read_text()}
    assert loading <= {"setdiv.data.vocab", "setdiv.data.text", "setdiv.export_run"}, loading
