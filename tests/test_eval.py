"""Evaluator end to end: exported model + test shards -> sims.npy, metrics, ensembles, analysis."""

from __future__ import annotations

import json
import sys
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
from setdiv.eval.evaluator import eccv_metrics, protocol_metrics
from setdiv.eval.metrics import recall_at_k
from setdiv.eval.set_analysis import element_rsums
from setdiv.export import export_model, load_exported
from setdiv.model import build_model

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import ensemble_eval  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    vocab = Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions)
    vocab.save(root / "vocab.json")
    cfg = config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [
            f"model.text.vocab_path={root / 'vocab.json'}",
            "model.text.vocab_size=null",
            "data.eval_batch_size=8",
        ],
    )
    torch.manual_seed(0)
    export_model(build_model(cfg.model), cfg, root / "export", vocab)
    write_shards(
        synthetic_samples("test", 60, 0), root / "test", "test", "regions", "synthetic", 25
    )
    return root


def run_eval(root: Path, out: str, *extra: str) -> Path:
    args = ["eval", str(root / "export"), "--data", f"{root}/test/test-*.tar", "--protocol", "coco"]
    assert cli.main([*args, "--out", str(root / out), *extra]) == 0
    return root / out


def direct_encoding(setup: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,K,D) image and (M,L,D) caption sets of the 60 synthetic test samples, encoded by the
    export in one batch per modality, without the reader or the evaluator."""
    ex = load_exported(setup / "export")
    samples = list(synthetic_samples("test", 60, 0))
    regions = torch.from_numpy(np.stack([s.regions for s in samples]))
    ids = [ex.tokenizer.encode(c) for s in samples for c in s.captions]
    T = max(map(len, ids))
    tokens = torch.tensor([t + [0] * (T - len(t)) for t in ids])
    with torch.no_grad():
        img = ex.model.encode_image(regions).embeds
        return img, ex.model.encode_text(tokens, tokens != 0).embeds


def test_sims_match_direct_encoding_and_naive_similarity(setup: Path) -> None:
    out = run_eval(setup, "one")
    sims = np.load(out / "sims.npy")
    meta = json.loads((out / "sims_meta.json").read_text())
    assert sims.shape == (60, 300)
    assert meta["image_ids"] == [f"test{i:07d}" for i in range(60)]
    assert meta["caption_ids"] == list(range(300))
    assert len(meta["checkpoint_sha256"]) == 64 and meta["similarity"]["name"] == "smooth_chamfer"
    # Reference: encode all samples in one batch per modality, whole (N,K,M,L) tensor at once.
    img, txt = direct_encoding(setup)
    ref = sim.smooth_chamfer_reduce(torch.einsum("nkd,mld->nkml", img.double(), txt.double()))
    np.testing.assert_allclose(sims, ref.numpy(), atol=2e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["coco_60"] == pytest.approx(recall_at_k(sims))


@pytest.mark.distributed
def test_one_and_two_processes_give_identical_sims(setup: Path) -> None:
    one = np.load(run_eval(setup, "p1") / "sims.npy")
    two = np.load(run_eval(setup, "p2", "--nproc", "2") / "sims.npy")
    assert np.array_equal(one, two)
    meta = json.loads((setup / "p2/sims_meta.json").read_text())
    assert meta["processes"] == 2 and meta["image_ids"] == [f"test{i:07d}" for i in range(60)]


def test_block_size_does_not_change_sims(setup: Path) -> None:
    a = np.load(run_eval(setup, "b512", "--block-size", "512") / "sims.npy")
    b = np.load(run_eval(setup, "b3", "--block-size", "3") / "sims.npy")
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_ensemble_of_itself_and_of_two(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = run_eval(setup, "ens_a")
    b = setup / "ens_b"
    b.mkdir()
    other = np.load(a / "sims.npy") + np.random.default_rng(0).normal(0, 0.05, (60, 300)).astype(
        np.float32
    )
    np.save(b / "sims.npy", other)
    (b / "sims_meta.json").write_text((a / "sims_meta.json").read_text())
    assert (
        ensemble_eval.main([str(a / "sims.npy"), str(a / "sims.npy"), "--out", str(setup / "self")])
        == 0
    )
    np.testing.assert_array_equal(np.load(setup / "self/sims.npy"), np.load(a / "sims.npy"))
    assert json.loads((setup / "self/metrics.json").read_text()) == json.loads(
        (a / "metrics.json").read_text()
    )
    assert (
        ensemble_eval.main([str(a / "sims.npy"), str(b / "sims.npy"), "--out", str(setup / "two")])
        == 0
    )
    np.testing.assert_allclose(
        np.load(setup / "two/sims.npy"), (np.load(a / "sims.npy") + other) / 2, atol=1e-7
    )
    assert "ensemble:coco_60" in capsys.readouterr().out


def test_ensemble_refuses_mismatched_ids(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = run_eval(setup, "mm_a")
    b = setup / "mm_b"
    b.mkdir()
    np.save(b / "sims.npy", np.load(a / "sims.npy"))
    meta = json.loads((a / "sims_meta.json").read_text())
    meta["image_ids"] = meta["image_ids"][::-1]
    (b / "sims_meta.json").write_text(json.dumps(meta))
    assert ensemble_eval.main([str(a / "sims.npy"), str(b / "sims.npy")]) == 2
    assert "image_ids differ" in capsys.readouterr().err


def test_analysis_writes_numbers_and_attention_png(setup: Path) -> None:
    out = run_eval(setup, "analysis", "--analysis")
    analysis = json.loads((out / "metrics.json").read_text())["analysis"]
    assert 0 <= analysis["circular_variance_image"] <= 1
    assert {f"rsum_img_elem{k}" for k in range(4)} <= set(analysis)
    png = (out / "attention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_element_rsums_hand_constructed() -> None:
    """Image element 0 carries the match, elements 1..3 are noise: only elem0 retrieves well."""
    g = torch.Generator().manual_seed(0)
    N, D = 40, 64
    keys = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    images = F.normalize(torch.randn(N, 4, D, generator=g), dim=-1)
    images[:, 0] = keys
    captions = keys.repeat_interleave(5, 0)[:, None, :].expand(-1, 2, -1).clone()
    out = element_rsums(sim.smooth_chamfer, images, captions)
    assert out["rsum_img_elem0"] == pytest.approx(600.0)
    assert max(out[f"rsum_img_elem{k}"] for k in (1, 2, 3)) < 150


def test_protocol_reports_5k_and_1k_and_f30k() -> None:
    rng = np.random.default_rng(0)
    S = rng.standard_normal((2000, 10000)).astype(np.float32)
    out = protocol_metrics(S, "coco", [str(i) for i in range(2000)], list(range(10000)))
    assert set(out) == {"coco_2000", "coco_1k"}
    out = protocol_metrics(S[:1000, :5000], "f30k", [], [])
    assert set(out) == {"f30k_1k"}


@pytest.mark.slow
def test_eccv_coco_recalls_agree_with_ours() -> None:
    """On the real COCO 5K test ids, eccv_caption's own COCO 5K R@1 must equal ours."""
    from eccv_caption import Metrics

    m = Metrics()
    image_ids = sorted(m.coco_gts["i2t"])
    caption_ids = [c for i in image_ids for c in m.coco_gts["i2t"][i][:5]]
    rng = np.random.default_rng(0)
    S = rng.standard_normal((5000, 25000)).astype(np.float32)
    S[np.arange(25000) // 5, np.arange(25000)] += 3.0
    ours = recall_at_k(S)
    extended = eccv_metrics(S, image_ids, caption_ids)
    assert extended is not None and set(extended) >= {
        "eccv_map_at_r_i2t",
        "cxc_r1_t2i",
        "eccv_r1_i2t",
    }
    i2t = {image_ids[i]: [caption_ids[j] for j in np.argsort(-S[i])[:10]] for i in range(5000)}
    t2i = {caption_ids[c]: [image_ids[j] for j in np.argsort(-S[:, c])[:10]] for c in range(25000)}
    theirs = m.compute_all_metrics(
        i2t, t2i, target_metrics=("coco_5k_recalls",), Ks=(1, 5, 10), verbose=False
    )
    for k in (1, 5, 10):
        assert 100 * theirs[f"coco_5k_r{k}"]["i2t"] == pytest.approx(ours[f"i2t_r{k}"], abs=1e-6)
        assert 100 * theirs[f"coco_5k_r{k}"]["t2i"] == pytest.approx(ours[f"t2i_r{k}"], abs=1e-6)


def test_attention_figure_for_a_grid_model() -> None:
    from conftest import tiny_config

    from setdiv.data.reader import Batch
    from setdiv.eval.set_analysis import attention_figure

    model = build_model(tiny_config("model.image.name=resnet152").model).eval()
    batch = Batch(
        torch.randn(2, 3, 64, 64),
        None,
        torch.zeros(10, 3, dtype=torch.long),
        torch.ones(10, 3, dtype=torch.bool),
        ["a", "b"],
        list(range(10)),
    )
    fig = attention_figure(model, batch, torch.device("cpu"), n=2)
    T, K = 4, 4  # default num_iters and num_embeds
    assert len(fig.axes) == 2 * T * (K + 1)  # per image and iteration: the picture + K slots


# --- what evaluation checks before and while it works (issue 10) -------------------------------


def copy_test_shards(setup: Path, dest: Path) -> str:
    import shutil

    shutil.copytree(setup / "test", dest)
    return f"{dest}/test-*.tar"


def eval_main(setup: Path, data: str, *extra: str, checkpoint: Path | None = None) -> int:
    target = str(checkpoint or setup / "export")
    return cli.main(["eval", target, "--data", data, "--protocol", "coco", *extra])


def test_eval_writes_next_to_a_weights_file(setup: Path, tmp_path: Path) -> None:
    import shutil

    export = tmp_path / "exp"
    shutil.copytree(setup / "export", export)
    data = f"{setup}/test/test-*.tar"
    assert eval_main(setup, data, checkpoint=export / "model.safetensors") == 0
    assert np.load(export / "eval/sims.npy").shape == (60, 300)


def test_eval_verifies_checksums_and_refuses_a_partial_test_set(
    setup: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from test_data import rewrite_member

    data = copy_test_shards(setup, tmp_path / "shards")
    shard = tmp_path / "shards/test-000001.tar"
    # A sample whose regions no longer parse: the file differs from what the index recorded.
    rewrite_member(shard, "test0000030.npy", b"not an npy file")
    out = tmp_path / "out"
    assert eval_main(setup, data, "--out", str(out)) == 2
    assert "checksum mismatch for shard" in capsys.readouterr().err
    assert not (out / "sims.npy").exists()
    # Checksums off: the corrupt sample is skipped, and 59 of 60 images is not a test set.
    assert eval_main(setup, data, "--out", str(out), "data.verify_checksums=false") == 2
    err = capsys.readouterr().err
    assert "59 of the 60 test images listed in the shard index could be read" in err
    assert "--allow-partial" in err and not (out / "sims.npy").exists()
    args = ("--out", str(out), "data.verify_checksums=false", "--allow-partial")
    assert eval_main(setup, data, *args) == 0
    meta = json.loads((out / "sims_meta.json").read_text())
    assert (meta["images"], meta["index_images"], meta["skipped_samples"]) == (59, 60, 1)
    assert "coco_59" in json.loads((out / "metrics.json").read_text())
    # The non-standard size is said, not silent.
    assert "reported as coco_59, not comparable with published coco_5k" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch-size", "--block-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_eval_sizes_fail_before_encoding(
    setup: Path, flag: str, value: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from setdiv import api

    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded before checking the flags")

    monkeypatch.setattr(api, "encode", no_encoding)
    assert eval_main(setup, f"{setup}/test/test-*.tar", f"{flag}={value}") == 2
    key = {"--batch-size": "data.eval_batch_size", "--block-size": "similarity.block_size"}[flag]
    assert f"bad config key '{key}': must be > 0" in capsys.readouterr().err


def test_ensemble_eval_checks_its_inputs(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = run_eval(setup, "ens_checks")
    lone = tmp_path / "lone"
    lone.mkdir()
    np.save(lone / "sims.npy", np.load(a / "sims.npy"))
    assert ensemble_eval.main([str(a / "sims.npy"), str(lone / "sims.npy")]) == 2
    assert "no sims_meta.json beside it" in capsys.readouterr().err
    (lone / "sims_meta.json").write_text((a / "sims_meta.json").read_text())
    np.save(lone / "sims.npy", np.load(a / "sims.npy")[:, :299])
    assert ensemble_eval.main([str(a / "sims.npy"), str(lone / "sims.npy")]) == 2
    assert "shape (60, 299) is not N x 5N" in capsys.readouterr().err
    # The protocol is the members' own: never silently coco for an f30k evaluation.
    np.save(lone / "sims.npy", np.load(a / "sims.npy"))
    meta = json.loads((a / "sims_meta.json").read_text())
    (lone / "sims_meta.json").write_text(json.dumps({**meta, "protocol": "f30k"}))
    assert ensemble_eval.main([str(lone / "sims.npy"), str(lone / "sims.npy")]) == 0
    assert "f30k_60" in capsys.readouterr().out
    assert ensemble_eval.main([str(lone / "sims.npy"), "--protocol", "coco"]) == 2
    assert "evaluated with f30k" in capsys.readouterr().err


def test_export_that_does_not_fit_its_config_or_is_truncated(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = f"{setup}/test/test-*.tar"
    export = tmp_path / "exp"
    shutil.copytree(setup / "export", export)
    cfg = (export / "config.yaml").read_text()
    (export / "config.yaml").write_text(cfg.replace("embed_dim: 64", "embed_dim: 32"))
    assert eval_main(setup, data, checkpoint=export) == 2
    err = capsys.readouterr().err
    assert f"setdiv eval: error: {export}/model.safetensors does not fit" in err
    assert "size mismatch" in err and "Traceback" not in err
    (export / "config.yaml").write_text(cfg)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert eval_main(setup, data, checkpoint=export) == 2
    assert f"{weights} is not a readable safetensors file" in capsys.readouterr().err


# --- dotted overrides on the command line (issue 12) --------------------------------------------


def test_eval_takes_dotted_overrides_between_its_flags(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chamfer"
    data = f"{setup}/test/test-*.tar"
    argv = ["eval", str(setup / "export"), "similarity.name=chamfer", "--data", data,
            "similarity.block_size=7", "--protocol", "coco", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads((out / "sims_meta.json").read_text())["similarity"]["name"] == "chamfer"
    # Reference: Chamfer on the whole (N,K,M,L) element tensor of a direct encoding.
    img, txt = (e.double() for e in direct_encoding(setup))
    s = torch.einsum("nkd,mld->nkml", img, txt)
    ref = 0.5 * (s.amax(dim=3).mean(dim=1) + s.amax(dim=1).mean(dim=2))
    np.testing.assert_allclose(np.load(out / "sims.npy"), ref.numpy(), atol=2e-5)
    # A name that is not registered fails before any work: one line naming the key and names.
    argv = ["eval", str(setup / "export"), "--data", data, "similarity.name=cosine",
            "--protocol", "coco", "--out", str(tmp_path / "bad")]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("setdiv eval: error:")
    assert "'similarity.name': 'cosine' is not one of" in err[0]
    assert all(f"'{name}'" in err[0] for name in sim.SIMILARITIES)
    assert not (tmp_path / "bad" / "sims.npy").exists()


def test_a_user_error_in_a_2_process_eval_is_one_line(
    setup: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The ranks raise it; it reaches the launcher with its class, as one line and exit 2."""
    from test_data import rewrite_member

    data = copy_test_shards(setup, tmp_path / "shards")
    rewrite_member(tmp_path / "shards/test-000001.tar", "test0000030.npy", b"not an npy file")
    out = tmp_path / "out"
    args = ("--out", str(out), "data.verify_checksums=false", "--nproc", "2")
    assert eval_main(setup, data, *args) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("setdiv eval: error:")]
    assert len(errors) == 1 and "59 of the 60 test images" in errors[0], err[-3000:]
    assert "Traceback" not in err  # not the launcher's, not a rank's


@pytest.mark.parametrize("counts", ["one", "variable"])
def test_evaluator_scores_any_caption_count_like_a_naive_loop(counts: str) -> None:
    """Encoded sets with one caption per image (web data) or 1-4 each go through the
    evaluator's gather-and-score: the matrix is the similarity of each pair, and the
    metrics, reported as `web_N`, equal a naive per-query computation."""
    from setdiv.eval.evaluator import Encoded, gather_and_score

    rng = np.random.default_rng(0)
    N = 30
    per = np.ones(N, int) if counts == "one" else rng.integers(1, 5, N)
    owners = np.repeat(np.arange(N), per)
    torch.manual_seed(0)
    images = F.normalize(torch.randn(N, 2, 8), dim=-1)
    captions = F.normalize(images[owners] + 0.7 * torch.randn(len(owners), 2, 8), dim=-1)
    enc = Encoded(
        images, captions, [f"i{n}" for n in range(N)], list(range(len(owners))),
        caption_counts=per.tolist(),
    )  # fmt: skip
    similarity = sim.build_similarity(config_lib.SimilarityConfig())
    result = gather_and_score(enc, similarity, 8, "web")
    assert result is not None and list(result.metrics) == [f"web_{N}"]
    got = result.metrics[f"web_{N}"]
    S = result.sims
    i2t = [
        min(sorted(range(len(owners)), key=lambda j: (-S[i, j], j)).index(c)
            for c in np.flatnonzero(owners == i))
        for i in range(N)
    ]  # fmt: skip
    t2i = [
        sorted(range(N), key=lambda j: (-S[j, c], j)).index(owners[c]) for c in range(len(owners))
    ]
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert got[f"{name}_r{k}"] == pytest.approx(100 * np.mean(np.array(ranks) < k))
    assert result.meta["caption_counts"] == per.tolist()
    # A COCO protocol asked of such data falls back to the whole-set recalls, named web_N.
    assert list(gather_and_score(enc, similarity, 8, "coco").metrics) == [f"web_{N}"]


def test_ensemble_members_are_labelled_by_their_distinct_paths(tmp_path: Path) -> None:
    """`runs/a/eval/sims.npy` and `runs/b/eval/sims.npy` (the README's layout) were both
    labelled "eval", one row for two members, and a member in a folder named `ensemble/` was
    overwritten by the mean's row."""
    from setdiv.eval.ensemble import member_names

    def names(*paths: str) -> list[str]:
        return member_names([tmp_path / p for p in paths])

    assert names("runs/a/eval/sims.npy", "runs/b/eval/sims.npy") == ["a/eval", "b/eval"]
    assert names("s0/sims.npy", "s1/sims.npy") == ["s0", "s1"]
    assert names("x/ensemble/sims.npy", "y/sims.npy") == ["x/ensemble", f"{tmp_path.name}/y"]
    assert names("s0/sims.npy", "s0/sims.npy") == ["s0#1", "s0#2"]


def test_setdiv_load_scores_the_test_split_as_setdiv_eval(setup: Path) -> None:
    """`setdiv.load(...).similarity(encode_images(...), encode_texts(...))` on the demo's
    (synthetic) test split, in other batch sizes than the evaluator's, equals `sims.npy`."""
    import setdiv

    sims = np.load(run_eval(setup, "api") / "sims.npy")
    model = setdiv.load(setup / "export")
    samples = list(synthetic_samples("test", 60, 0))
    images = model.encode_images([s.regions for s in samples], batch_size=7)
    texts = model.encode_texts([c for s in samples for c in s.captions], batch_size=64)
    assert images.shape[:2] == (60, 4) and texts.shape[:2] == (300, 4)
    np.testing.assert_allclose(model.similarity(images, texts).numpy(), sims, atol=1e-5, rtol=0)
    assert "K=4" in repr(model) and model.input_kind == "regions"
    with pytest.raises(ValueError, match="reads region features"):
        model.preprocess  # noqa: B018


def test_setdiv_load_takes_paths_pil_images_and_pixels_alike(tmp_path: Path) -> None:
    """A pixel model (timm tower): a file path, a PIL image and `preprocess`'s tensor give the
    same set; a file that is not an image is one error naming it."""
    pytest.importorskip("timm")
    from PIL import Image

    import setdiv

    Vocab.build(["a red square"]).save(tmp_path / "vocab.json")
    cfg = config_lib.load([ROOT / "configs/demo.yaml"], [
        "model.image.name=timm", "model.image.arch=vit_tiny_patch16_224",
        f"model.text.vocab_path={tmp_path / 'vocab.json'}", "model.text.vocab_size=null",
    ])  # fmt: skip
    from setdiv.model.towers import with_tower_preprocessing

    cfg = with_tower_preprocessing(cfg)
    torch.manual_seed(0)
    export_model(build_model(cfg.model, pretrained=False), cfg, tmp_path / "export")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    model = setdiv.load(tmp_path / "export")
    with Image.open(tmp_path / "a.jpg") as im:
        pil = model.encode_images([im])
        pixels = model.preprocess(im)
    assert pixels.shape == (3, 224, 224)
    by_path = model.encode_images([str(tmp_path / "a.jpg")])
    by_tensor = model.encode_images([pixels])
    assert torch.equal(pil, by_path) and torch.equal(pil, by_tensor) and pil.shape[1] == 4
    (tmp_path / "b.jpg").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="b.jpg: not a readable image"):
        model.encode_images([tmp_path / "b.jpg"])
