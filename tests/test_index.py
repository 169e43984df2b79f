"""Search indexes: two-stage search against brute force, reranked scores against a naive
smooth-Chamfer, export identity, appending, the CLI."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from setdiv import cli
from setdiv import config as config_lib
from setdiv import similarity as sim
from setdiv.data.convert import synthetic_samples
from setdiv.data.shards import write_shards
from setdiv.data.vocab import Vocab
from setdiv.export import export_model, load_exported
from setdiv.index.search import (
    AutoBudget,
    SetSearcher,
    adaptive_top_k,
    exact_top_k,
    two_stage_top_k,
)
from setdiv.index.store import AnnSpec, IndexMeta, SetIndexStore
from setdiv.index.summary import query_summaries, set_summaries
from setdiv.model import build_model

ROOT = Path(__file__).parents[1]


def make_export(root: Path, seed: int) -> Path:
    cfg = config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [f"model.text.vocab_path={root / 'vocab.json'}", "model.text.vocab_size=null"],
    )
    torch.manual_seed(seed)
    return export_model(build_model(cfg.model), cfg, root / f"export{seed}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("index")
    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    make_export(root, 0)
    make_export(root, 1)
    write_shards(synthetic_samples("test", 40, 0), root / "a", "test", "regions", "synthetic", 20)
    write_shards(synthetic_samples("val", 20, 0), root / "b", "val", "regions", "synthetic", 20)
    build = ["index", "build", str(root / "export0"), "--modality"]
    assert (
        cli.main([*build, "image", "--data", f"{root}/a/test-*.tar", "--out", str(root / "img")])
        == 0
    )
    assert (
        cli.main([*build, "text", "--data", f"{root}/a/test-*.tar", "--out", str(root / "txt")])
        == 0
    )
    return root


def naive_smooth_chamfer(x_NKD: torch.Tensor, y_MLD: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per pair, the docs/method.md §1 formula written out (fp64)."""
    out = torch.empty(x_NKD.shape[0], y_MLD.shape[0], dtype=torch.float64)
    for n in range(x_NKD.shape[0]):
        for m in range(y_MLD.shape[0]):
            c = x_NKD[n].double() @ y_MLD[m].double().T  # (K, L) cosines
            a = torch.logsumexp(alpha * c, dim=1).mean() + torch.logsumexp(alpha * c, dim=0).mean()
            out[n, m] = a / (2 * alpha)
    return out


def test_full_candidate_budget_equals_brute_force(setup: Path) -> None:
    s = SetSearcher(setup / "img")
    queries = s.encode_texts(["a red circle", "two blue squares and a green triangle", "a star"])
    n_elements = len(s.store) * s.store.meta.num_embeds
    fast = s.search(queries, k=10, candidates=n_elements)
    exact = s.exact(queries, k=10)
    assert fast.candidates == [len(s.store)] * 3
    assert torch.equal(fast.items, exact.items)
    torch.testing.assert_close(fast.scores, exact.scores, atol=1e-5, rtol=0)
    # Reranked scores are the export's smooth-Chamfer on the same sets (a naive reference).
    gallery = s.store.elements(fast.items[0].numpy())
    alpha = s.exported.cfg.similarity.alpha
    ref = naive_smooth_chamfer(gallery, queries[0:1], alpha)[:, 0]
    torch.testing.assert_close(fast.scores[0].double(), ref, atol=1e-5, rtol=0)
    # And the stored elements are the model's own encodings.
    ex = load_exported(setup / "export0")
    sample = next(iter(synthetic_samples("test", 40, 0)))
    with torch.no_grad():
        own = ex.model.encode_image(torch.from_numpy(sample.regions)[None]).embeds
    torch.testing.assert_close(s.store.elements(np.array([0]))[0], own[0], atol=1e-5, rtol=0)
    assert s.store.items[0]["id"] == sample.image_id and s.store.items[0]["captions"] == list(
        sample.captions
    )
    # A smaller budget re-scores fewer items.
    assert max(s.search(queries, k=5, candidates=2).candidates) < len(s.store)
    assert torch.isfinite(sim.smooth_chamfer(gallery, queries[0:1], alpha=alpha)).all()


def test_index_from_another_export_is_refused(setup: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="holds other weights .*rebuild the index"):
        SetSearcher(setup / "img", export=setup / "export1")
    args = ["search", str(setup / "img"), "a red circle", "--export", str(setup / "export1")]
    assert cli.main(args) == 2
    assert "rebuild the index with this export" in capsys.readouterr().err
    add = ["index", "build", str(setup / "export1"), "--modality", "image"]
    add += ["--data", f"{setup}/b/val-*.tar", "--out", str(setup / "img")]
    assert cli.main(add) == 2
    assert "was built with another export" in capsys.readouterr().err


def test_append_hnsw_and_cli_json(setup: Path, capsys: pytest.CaptureFixture) -> None:
    out = setup / "hnsw"
    build = ["index", "build", str(setup / "export0"), "--modality", "image", "--kind", "hnsw"]
    build += ["--fp16", "--out", str(out)]
    assert cli.main([*build, "--data", f"{setup}/a/test-*.tar"]) == 0
    assert cli.main([*build, "--data", f"{setup}/b/val-*.tar"]) == 0
    s = SetSearcher(out)
    assert len(s.store) == 60 and s.store.ann.ntotal == 60 * 4
    assert s.store.items[40]["id"] == "val0000000"
    capsys.readouterr()
    assert cli.main(["search", str(out), "a red circle", "--k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    q = s.encode_texts(["a red circle"])
    exact = s.exact(q, 3)
    assert [h["index"] for h in hits] == exact.items[0].tolist()  # fp16 elements, same order


def test_text_gallery_with_an_image_sample_query(
    setup: Path, capsys: pytest.CaptureFixture
) -> None:
    s = SetSearcher(setup / "txt")
    assert len(s.store) == 200 and s.store.items[7]["image_id"] == "test0000001"
    args = ["search", str(setup / "txt"), "--sample", f"{setup}/a/test-*.tar", "test0000003"]
    assert cli.main([*args, "--json", "--k", "5", "--candidates", "1000"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and all("text" in h for h in hits)
    assert cli.main(["search", str(setup / "txt"), "a red circle"]) == 2
    assert "holds text items" in capsys.readouterr().err
    assert cli.main(["index", "eval", str(setup / "img"), "--queries", f"{setup}/a/test-*.tar",
                     "--candidates", "1000", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recall@10_vs_exact"] == 1.0 and result["queries"] == 200
    assert result["indexed"] == result["exact"]


@pytest.mark.distributed
def test_two_processes_build_the_same_index(setup: Path) -> None:
    out = setup / "img2"
    args = ["index", "build", str(setup / "export0"), "--modality", "image", "--nproc", "2"]
    assert cli.main([*args, "--data", f"{setup}/a/test-*.tar", "--out", str(out)]) == 0
    one, two = SetSearcher(setup / "img").store, SetSearcher(out).store
    assert two.items == one.items
    assert torch.equal(two.elements(), one.elements())


def test_an_append_that_dies_leaves_the_previous_index_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from setdiv.index.store import AnnSpec, IndexMeta, SetIndexStore

    meta = IndexMeta("image", "x", "0" * 64, "", AnnSpec("flat"), 2, 8, "float32")
    store = SetIndexStore.create(tmp_path, meta)
    first = torch.nn.functional.normalize(torch.randn(5, 2, 8), dim=-1)
    store.append(first, [{"id": i} for i in range(5)], "a")

    def crash() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_meta", crash)
    with pytest.raises(OSError):
        store.append(torch.randn(3, 2, 8), [{"id": 9}] * 3, "b")
    again = SetIndexStore.open(tmp_path)
    assert len(again) == 5 and again.ann.ntotal == 10 and len(again.items) == 5
    assert torch.equal(again.elements(), first)
    again.append(torch.randn(3, 2, 8), [{"id": 7}] * 3, "c")  # and it goes on from there
    assert len(SetIndexStore.open(tmp_path).items) == 8


def test_image_queries_to_a_region_model_are_refused(setup: Path) -> None:
    from setdiv.index.service import Service

    service = Service(SetSearcher(setup / "txt"))
    with pytest.raises(ValueError, match="reads region features"):
        service.decode_images([b"\x89PNG not really"])


# --- broken index files, appends, arguments: one line and exit 2 --------------------------------


def _corrupt_copy(setup: Path, name: str) -> Path:
    import shutil

    out = setup / f"broken_{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(setup / "img", out)
    return out


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("meta_not_json", "not a valid setdiv index"),
        ("meta_count_text", "count must be a non-negative integer"),
        ("meta_dtype_int8", "dtype must be one of"),
        ("meta_nested", "not a valid setdiv index"),
        ("meta_counts_disagree", "do not add up"),
        ("npy_truncated", "not a readable element file"),
        ("npy_other_dtype", "meta.json says float32"),
        ("items_bad_line", "items-00000.jsonl:3: not a JSON item"),
        ("items_missing_line", "39 lines, meta.json says 40 items"),
        ("ann_garbage", "not a readable FAISS index"),
    ],
)
def test_broken_index_files_are_one_line_errors(
    setup: Path, capsys: pytest.CaptureFixture, what: str, message: str
) -> None:
    root = _corrupt_copy(setup, what)
    meta = json.loads((root / "meta.json").read_text())
    if what == "meta_not_json":
        (root / "meta.json").write_text("{format: 1")
    elif what.startswith("meta_"):
        field, value = {
            "meta_count_text": ("count", "x"),
            "meta_dtype_int8": ("dtype", "int8"),
            "meta_nested": ("ann", json.loads("[" * 50 + "]" * 50)),
            "meta_counts_disagree": ("count", 41),
        }[what]
        meta[field] = value
        text = json.dumps(meta)
        if what == "meta_nested":
            text = text.replace(
                '"ann": ' + json.dumps(value), '"ann": ' + "[" * 10**5 + "]" * 10**5
            )
        (root / "meta.json").write_text(text)
    elif what == "npy_truncated":
        data = (root / "elements-00000.npy").read_bytes()
        (root / "elements-00000.npy").write_bytes(data[: len(data) // 2])
    elif what == "npy_other_dtype":
        part = np.load(root / "elements-00000.npy")
        np.save(root / "elements-00000.npy", part.astype(np.int8))
    elif what.startswith("items_"):
        lines = (root / "items-00000.jsonl").read_text().splitlines()
        lines = lines[:-1] if what == "items_missing_line" else lines
        if what == "items_bad_line":
            lines[2] = '{"id": "x", '
        (root / "items-00000.jsonl").write_text("\n".join(lines) + "\n")
    elif what == "ann_garbage":
        (root / "ann-00001.faiss").write_bytes(b"IxF2 not really an index" * 10)
    assert cli.main(["search", str(root), "a red circle"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err


def test_an_append_cannot_change_options_or_repeat_shards(
    setup: Path, capsys: pytest.CaptureFixture
) -> None:
    build = ["index", "build", str(setup / "export0"), "--modality", "image"]
    same = [*build, "--data", f"{setup}/a/test-*.tar", "--out", str(setup / "img")]
    assert cli.main(same) == 2
    assert "already in" in capsys.readouterr().err
    other = [*build, "--data", f"{setup}/b/val-*.tar", "--out", str(setup / "img")]
    assert cli.main([*other, "--kind", "hnsw"]) == 2
    assert "--kind hnsw (the index has flat)" in capsys.readouterr().err
    assert cli.main([*other, "--fp16"]) == 2
    assert "--fp16 (the index stores float32)" in capsys.readouterr().err
    assert len(SetSearcher(setup / "img").store) == 40  # nothing was added


@pytest.mark.parametrize("k", ["0", "-3", "x"])
def test_index_eval_k_must_be_at_least_one(
    setup: Path, capsys: pytest.CaptureFixture, k: str
) -> None:
    args = ["index", "eval", str(setup / "img"), "--queries", f"{setup}/a/test-*.tar"]
    assert cli.main([*args, "--k", k]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "setdiv index eval: error: argument --k" in err[0], err


def test_a_deeply_nested_vocabulary_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text("[" * 10**6 + "]" * 10**6)
    with pytest.raises(ValueError, match="nested too deeply"):
        Vocab.load(path)


def test_exported_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        Vocab.build(c for s in synthetic_samples("train", 20, 0) for c in s.captions).save(
            tmp_path / "vocab.json"
        )
        export = make_export(tmp_path, 0)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in export.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_set_summaries_are_the_second_order_expansion_of_smooth_chamfer() -> None:
    """With the projection the identity, a summary inner product plus log(K L) / (2 alpha) is
    the second-order Taylor expansion of smooth-Chamfer, written out per pair (fp64), and it
    approaches smooth-Chamfer as alpha -> 0."""
    torch.manual_seed(0)
    K, L, D = 4, 3, 6
    x = torch.nn.functional.normalize(torch.randn(5, K, D, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(7, L, D, dtype=torch.float64), dim=-1)
    eye = torch.eye(D)
    for alpha in (0.05, 0.5, 2.0):
        got = (
            set_summaries(x.float(), eye).double()
            @ query_summaries(y.float(), eye, alpha).double().T
        )
        got = got + math.log(K * L) / (2 * alpha)
        ref = torch.zeros(5, 7, dtype=torch.float64)
        for n in range(5):
            for m in range(7):
                c = x[n] @ y[m].T  # (K, L)
                var_rows = c.var(dim=1, unbiased=False).mean()  # each x element over y's
                var_cols = c.var(dim=0, unbiased=False).mean()
                ref[n, m] = (
                    math.log(K * L) / (2 * alpha) + c.mean() + alpha / 4 * (var_rows + var_cols)
                )
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        exact = naive_smooth_chamfer(x, y, alpha)
        assert (got - exact).abs().max() < 0.05 * alpha**2 + 1e-6, alpha


def item_sets(n: int, K: int, D: int, rows: torch.Tensor | None = None, L: int = 0) -> torch.Tensor:
    """(n, K, D) unit sets shaped like a trained model's: each item's elements share the item's
    own component and add one of 64 shared topics (its parts); with `rows`, (len(rows), L, D)
    noisy queries about those items and L of their parts."""
    g = torch.Generator().manual_seed(0)
    topics = F.normalize(torch.randn(64, D, generator=g), dim=-1)
    own = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    parts = torch.randint(0, 64, (n, K), generator=g)
    noise = 0.9 / D**0.5
    if rows is None:
        x = own[:, None] + topics[parts] + noise * torch.randn(n, K, D, generator=g)
    else:
        g = torch.Generator().manual_seed(1)
        x = own[rows, None] + topics[parts[rows, :L]]
        x = x + 1.5 * noise * torch.randn(len(rows), L, D, generator=g)
    return F.normalize(x, dim=-1)


def test_auto_candidates_keep_recall_and_score_a_fraction(tmp_path: Path) -> None:
    """On a gallery of 4000 sets shaped like a trained model's, the adaptive search finds the
    exact top 10 (recall >= 0.95) while scoring <= 10% of the gallery, and beats the element
    two-stage search at the same cost; it reports its rounds, grows past a first round that is
    too small and stops at its cap. (On sets of independent topics with no shared part the
    summaries are weaker and it spends up to `max_fraction`: BENCHMARKS.md.)"""
    n, K, D, alpha = 4000, 4, 32, 16.0
    gallery = item_sets(n, K, D)
    meta = IndexMeta("image", "export", "0" * 64, "", AnnSpec("flat"), K, D, "float32")
    store = SetIndexStore.create(tmp_path / "idx", meta)
    store.append(gallery, [{"id": str(i), "captions": []} for i in range(n)], "test")
    store = SetIndexStore.open(tmp_path / "idx")
    queries = item_sets(n, K, D, torch.arange(0, n, 100), L=3)
    similarity = functools.partial(sim.smooth_chamfer, alpha=alpha)
    exact = exact_top_k(store, similarity, queries, 10)
    auto = adaptive_top_k(store, similarity, queries, 10, alpha)
    recall = np.mean(
        [
            len(set(a.tolist()) & set(e.tolist())) / 10
            for a, e in zip(auto.items, exact.items, strict=True)
        ]
    )
    assert recall >= 0.95, recall
    assert np.mean(auto.candidates) / n <= 0.10, auto.candidates
    per_element = int(np.mean(auto.candidates)) // 3  # about as many items scored
    two = two_stage_top_k(store, similarity, queries, 10, max(per_element, 1))
    assert np.mean(two.candidates) >= 0.8 * np.mean(auto.candidates)
    assert recall > np.mean(
        [
            len(set(a.tolist()) & set(e.tolist())) / 10
            for a, e in zip(two.items, exact.items, strict=True)
        ]
    )
    assert auto.rounds is not None and min(auto.rounds) >= 1
    # Found scores are the exact ones of the items found.
    torch.testing.assert_close(
        auto.scores[0],
        naive_smooth_chamfer(store.elements(auto.items[0].numpy()), queries[:1], alpha)[
            :, 0
        ].float(),
        atol=1e-4,
        rtol=0,
    )
    tiny = adaptive_top_k(store, similarity, queries, 10, alpha, AutoBudget(first_per_k=1))
    assert max(tiny.rounds) > 1  # 32 candidates were not enough for some query: it grew
    # The cap: a round that reaches 2% of the gallery (80 items) is the last one.
    capped = adaptive_top_k(
        store, similarity, queries, 10, alpha, AutoBudget(first_per_k=1, max_fraction=0.02)
    )
    assert max(capped.candidates) <= 0.02 * n * 1.5, capped.candidates


def test_a_codec_faiss_cannot_build_and_an_out_file_are_one_line_before_any_work(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--codec pq999` was FAISS's traceback after the gallery was encoded, leaving an empty
    index folder behind; `--out` naming a file was a traceback too. Both are one line, exit 2,
    before any encoding, and nothing is left behind."""
    build = ["index", "build", str(setup / "export0"), "--modality", "image", "--data"]
    data = f"{setup}/a/test-*.tar"
    capsys.readouterr()
    assert cli.main([*build, data, "--out", str(setup / "pq"), "--codec", "pq999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--codec pq999" in err[0] and "pq32" in err[0], err
    assert not (setup / "pq").exists()
    (setup / "afile").write_text("x")
    assert cli.main([*build, data, "--out", str(setup / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0], err
    # The summary index takes the largest pq<M'> whose M' divides its own width.
    assert AnnSpec(codec="pq16").summary_factory(4, 1000) == "PQ10"
    assert AnnSpec("ivf", nlist=64, codec="pq8").summary_factory(4, 1088) == "IVF16,PQ8"
