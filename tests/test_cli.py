"""`setdiv info`: model summary with parameter counts, clear errors."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from setdiv import cli
from setdiv import config as config_lib
from setdiv.errors import UserError, user_exit_code
from setdiv.export import architecture_only
from setdiv.model import build_model

ROOT = Path(__file__).parents[1]


def test_info_prints_parameter_counts_per_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(ROOT / "configs/demo.yaml")]) == 0
    out = capsys.readouterr().out
    model = build_model(config_lib.load([ROOT / "configs/demo.yaml"]).model)
    total = sum(p.numel() for p in model.parameters())
    image_set = sum(p.numel() for p in model.image_set.parameters())
    assert re.search(rf"^model\s+SetRetrievalModel\s+{total:,}\s+{total:,}$", out, re.M)
    assert re.search(rf"^\s+image_set\s+SlotSetModule\s+{image_set:,}", out, re.M)


@pytest.mark.parametrize("name", ["roi_bigru", "resnet_bigru", "resnext_bert"])
def test_paper_configs_build_offline_with_tiny_dims(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = [
        "model.embed_dim=16",
        "model.text.hidden_dim=16",
        "model.image_set.head_dim=4",
        "model.text_set.head_dim=4",
    ]
    assert (
        cli.main(
            ["info", str(ROOT / f"configs/{name}.yaml"), *tiny, "--random-init", "--depth", "1"]
        )
        == 0
    )
    assert "SetRetrievalModel" in capsys.readouterr().out


def test_info_errors_name_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(ROOT / "configs/roi_bigru.yaml")]) == 2
    assert "model.text.vocab_path" in capsys.readouterr().err
    assert cli.main(["info", str(ROOT / "configs/demo.yaml"), "model.image.nme=x"]) == 2
    assert "model.image.nme" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["train", "C.yaml", "--run-dir", "D", "a.b=1", "--resume", "latest", "c=2"],
            {"config": "C.yaml", "run_dir": "D", "resume": "latest", "overrides": ["a.b=1", "c=2"]},
        ),
        (["train", "--run-dir", "D", "C.yaml", "a=1"], {"config": "C.yaml", "overrides": ["a=1"]}),
        (["info", "C.yaml", "--depth", "1", "a=1"], {"depth": 1, "overrides": ["a=1"]}),
        (
            ["eval", "RUN", "--data", "t-*.tar", "similarity.alpha=8", "--protocol", "coco"],
            {"checkpoint": "RUN", "protocol": "coco", "overrides": ["similarity.alpha=8"]},
        ),
        (
            ["demo", "--out", "O", "a=1", "--quick", "b=2"],
            {"out": "O", "overrides": ["a=1", "b=2"]},
        ),
    ],
)
def test_dotted_overrides_anywhere_on_the_command_line(argv: list[str], expected: dict) -> None:
    args = cli.parse_args(argv)
    assert args.command == argv[0] and callable(args.func)
    assert {k: getattr(args, k) for k in expected} == expected


def test_eval_overrides_cannot_change_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "RUN", "--data", "x.tar", "--protocol", "coco", "model.embed_dim=8"]
    assert cli.main(argv) == 2
    assert "only similarity.* and data.*" in capsys.readouterr().err


def test_info_lists_param_groups_with_lr_and_freezing(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["model.embed_dim=16", "model.image_set.head_dim=4", "model.text_set.head_dim=4"]
    argv = ["info", str(ROOT / "configs/resnet_bigru.yaml"), "--random-init", *tiny]
    assert cli.main([*argv, "model.text.hidden_dim=16"]) == 0
    out = capsys.readouterr().out
    cfg = architecture_only(
        config_lib.load([ROOT / "configs/resnet_bigru.yaml"], [*tiny, "model.text.hidden_dim=16"]),
        vocab_size=11354,
    )
    model = build_model(cfg.model)
    cnn = sum(p.numel() for p in model.image_encoder.backbone.parameters())
    head = sum(p.numel() for p in model.image_encoder.head.parameters())
    assert re.search(rf"^image_backbone\s+1\s+0\.001\s+{cnn:,}\s+{cnn:,}\s+first 50 ep", out, re.M)
    assert re.search(rf"^image_head\s+0\.1\s+0\.0001\s+{head:,}\s+{head:,}\s+-$", out, re.M)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "configs/demo.yaml", "--run-dir", "R", "--nproc", "0"],
         "argument --nproc: must be >= 1, got 0"),
        (["train", "configs/demo.yaml", "--run-dir", "R", "--nproc", "two"],
         "argument --nproc: not an integer: 'two'"),
        (["train", "configs/demo.yaml", "--run-dir", "R", "--no-such-flag"],
         "unrecognized arguments: --no-such-flag"),
        (["train", "configs/demo.yaml", "--run-dir", "R", "model.image.name=vgg"],
         "'model.image.name': 'vgg' is not one of"),
        (["train", "configs/demo.yaml", "--run-dir", "R", "optim.lr=nan"],
         "'optim.lr': nan is not a finite number"),
        (["train", "configs/demo.yaml", "--run-dir", "R", "--resume", "latest", "--overwrite"],
         "--resume and --overwrite contradict"),
        (["eval", "R", "--data", "x.tar", "--protocol", "coco", "--nproc", "0"],
         "argument --nproc: must be >= 1"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_one_line(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / "R") if a == "R" else a for a in argv]
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"setdiv {argv[0]}: error:") and expected in err[0]
    assert not (tmp_path / "R" / "config.yaml").exists()


# --- a bug keeps its traceback; only user errors become one line (issue 12) ---------------------


class DivergedError(ValueError):
    exit_code = 3


@pytest.mark.parametrize(
    "error", [ValueError("a bug, not bad input"), RuntimeError("an invariant broke"), KeyError("k")]
)
def test_an_internal_error_propagates_with_its_traceback(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_vocab", broken)
    with pytest.raises(type(error)) as raised:
        cli.main(["vocab", "--shards", "x.tar", "--out", "v.json"])
    assert raised.value is error
    assert raised.traceback[-1].name == "broken"  # where it happened, not where it was caught
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UserError("bad input: fix it"), 2),
        (config_lib.ConfigError("bad config key 'a.b': fix it"), 2),
        (FileNotFoundError("nope.json: not found"), 2),
        (DivergedError("diverged at step 3"), 3),
    ],
)
def test_a_user_error_is_one_line_and_its_exit_code(
    error: Exception,
    code: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuses(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_vocab", refuses)
    assert cli.main(["vocab", "--shards", "x.tar", "--out", "v.json"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"setdiv vocab: error: {error}"]


def _user_error_on_rank_zero() -> None:
    from setdiv.distributed import on_all_ranks, process_group

    def claim(rank: int) -> None:
        if rank == 0:
            raise UserError("the run directory is taken")

    with process_group() as job:
        on_all_ranks(lambda: claim(job.rank), "claiming")


def test_a_user_error_on_rank_zero_of_a_2_process_job_keeps_its_class() -> None:
    from setdiv.distributed import spawn_local

    with pytest.raises(UserError, match="the run directory is taken") as raised:
        spawn_local(_user_error_on_rank_zero, 2)
    assert user_exit_code(raised.value) == 2


def _rank_count_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every CLI that takes a rank count: setdiv's subcommands and the cluster scripts."""
    from setdiv_cluster import ensemble, sweep

    top = cli.build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    index_subs = next(
        a for a in subs["index"]._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    return {
        "setdiv train": subs["train"],
        "setdiv eval": subs["eval"],
        "setdiv extract": subs["extract"],
        "setdiv index build": index_subs["build"],
        "cluster/sweep.py": sweep.build_parser(),
        "cluster/ensemble.py": ensemble.build_parser(),
    }


def test_one_rank_count_flag_everywhere_old_spellings_warn() -> None:
    """`--nproc N` in every CLI that starts ranks; the old spellings still set it, with a
    FutureWarning naming `--nproc`, and `--help` shows only the new one."""
    old = {
        "setdiv train": "--nproc-per-node",
        "cluster/sweep.py": "--nproc-per-trial",
        "cluster/ensemble.py": "--nproc-per-run",
    }
    for name, parser in _rank_count_parsers().items():
        flags = {s for a in parser._actions for s in a.option_strings if "nproc" in s}
        assert flags == {"--nproc", *([old[name]] if name in old else [])}, name
        nproc = next(a for a in parser._actions if "--nproc" in a.option_strings)
        assert nproc.default == 1 and nproc.dest == "nproc", name
        assert "--nproc N" in parser.format_help(), name
        assert "nproc-per" not in parser.format_help(), name
        if name in old:
            ns = argparse.Namespace()
            with pytest.warns(FutureWarning, match=f"{old[name]} is deprecated.*use --nproc"):
                parser._option_string_actions[old[name]](parser, ns, 3, old[name])
            assert ns.nproc == 3
    with pytest.warns(FutureWarning, match="--nproc-per-node is deprecated"):
        args = cli.parse_args(
            ["train", "configs/demo.yaml", "--run-dir", "R", "--nproc-per-node", "2"]
        )
    assert args.nproc == 2


def test_run_ranks_runs_in_process_for_one_and_refuses_zero() -> None:
    from setdiv.distributed import run_ranks

    seen: list[tuple] = []
    run_ranks(lambda *a: seen.append(a), 1, "x", 2)
    assert seen == [("x", 2)]
    with pytest.raises(ValueError, match="at least one rank, got 0"):
        run_ranks(lambda: None, 0)
