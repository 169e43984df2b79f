"""The `setdiv` command line: thin subcommands over library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, get_args

from setdiv import config as config_lib
from setdiv import errors
from setdiv.errors import report

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build_parser", "group_summary", "main", "model_summary", "parse_args"]

COCO_BUTD_VOCAB_SIZE = 11354
"""Words in the official coco_butd_vocab.pkl (11353) plus <mask>: `info --random-init` default."""


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_summary(model: nn.Module, depth: int = 2) -> str:
    """A table of parameter counts (total, trainable) per module down to `depth` levels."""
    rows: list[tuple[str, str, int, int]] = []

    def visit(module: nn.Module, name: str, level: int) -> None:
        total, trainable = _count(module)
        rows.append(("  " * level + (name or "model"), type(module).__name__, total, trainable))
        if level < depth:
            for child_name, child in module.named_children():
                if _count(child)[0]:
                    visit(child, child_name, level + 1)

    visit(model, "", 0)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'module':<{width}}{'type':<22}{'params':>14}{'trainable':>14}"]
    lines += [f"{n:<{width}}{t:<22}{tot:>14,}{tr:>14,}" for n, t, tot, tr in rows]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from setdiv.export import architecture_only
    from setdiv.model import build_model

    cfg = config_lib.load([args.config], args.overrides)
    if args.random_init:  # no weights, GloVe, vocabulary or BERT file: builds anywhere
        cfg = architecture_only(cfg, vocab_size=args.vocab_size)
    model = build_model(cfg.model)
    m, s = cfg.model, cfg.similarity
    print(f"config: {args.config}")
    print(
        f"image: {m.image.name} | text: {m.text.name} | set modules: {m.image_set.name}/"
        f"{m.text_set.name} K={m.image_set.num_embeds} L={m.text_set.num_embeds} "
        f"T={m.image_set.num_iters} | D={m.embed_dim} | similarity: {s.name}"
    )
    print(model_summary(model, depth=args.depth))
    print()
    print(group_summary(model, cfg.optim))
    return 0


def group_summary(model: nn.Module, cfg: config_lib.OptimConfig) -> str:
    """The optimizer's parameter groups: multiplier, base LR, parameter counts, and which are
    frozen for the first `freeze_epochs`."""
    from setdiv.train.optim import param_groups

    lines = [f"{'param group':<18}{'lr_mult':>9}{'lr':>12}{'params':>14}{'trainable':>14}  frozen"]
    for g in param_groups(model, cfg):  # type: ignore[arg-type]
        total = sum(p.numel() for p in g["params"])
        trainable = sum(p.numel() for p in g["params"] if p.requires_grad)
        frozen = (
            f"first {cfg.freeze_epochs} epoch(s)"
            if cfg.freeze_epochs and g["name"] in cfg.freeze_groups
            else "-"
        )
        lines.append(
            f"{g['name']:<18}{g['lr_mult']:>9g}{g['lr']:>12.3g}{total:>14,}{trainable:>14,}"
            f"  {frozen}"
        )
    return "\n".join(lines)


def cmd_shards(args: argparse.Namespace) -> int:
    from setdiv.data import make_shards

    make_shards.run(args)
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from setdiv.data.vocab import build_from_shards

    vocab = build_from_shards(args.shards, args.min_count, args.tokenizer, args.caption_key)
    vocab.save(args.out)
    print(f"vocabulary: {len(vocab)} entries ({args.tokenizer} tokenizer) -> {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from setdiv.eval import run

    return run.run(args)


def _info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("config", help="YAML config (a delta over the defaults)")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.embed_dim=256")
    info.add_argument("--depth", type=int, default=2, help="module levels to list")
    info.add_argument(
        "--random-init",
        action="store_true",
        help="ignore weights/GloVe/vocab/BERT files (random init) to inspect a full-size model",
    )
    info.add_argument(
        "--vocab-size",
        type=int,
        default=COCO_BUTD_VOCAB_SIZE,
        help="bi-GRU vocabulary size used with --random-init",
    )
    info.set_defaults(func=cmd_info)


def _shards_arguments(shards: argparse.ArgumentParser) -> None:
    from setdiv.data import make_shards

    make_shards.add_arguments(shards)
    shards.set_defaults(func=cmd_shards)


def _vocab_arguments(vc: argparse.ArgumentParser) -> None:
    vc.add_argument("--shards", required=True, help="training shards, e.g. 'train-*.tar'")
    vc.add_argument("--out", required=True, help="vocabulary JSON to write")
    vc.add_argument("--min-count", type=int, default=1, help="drop words seen fewer times")
    vc.add_argument(
        "--tokenizer",
        choices=get_args(config_lib.TokenizerName),
        default="nltk",
        help="caption tokenisation; must match model.text.tokenizer when training",
    )
    vc.add_argument(
        "--caption-key",
        default=None,
        help="img2dataset shards: the .json field holding the caption (default: the .txt)",
    )
    vc.set_defaults(func=cmd_vocab)


def _eval_arguments(ev: argparse.ArgumentParser) -> None:
    from setdiv.eval import run as eval_run

    eval_run.add_arguments(ev)
    ev.set_defaults(func=cmd_eval)


def _train_arguments(tr: argparse.ArgumentParser) -> None:
    from setdiv.train import launch

    launch.add_train_arguments(tr)
    tr.set_defaults(func=launch.run_train)


def _export_arguments(ex: argparse.ArgumentParser) -> None:
    from setdiv import export_run

    export_run.add_arguments(ex)
    ex.set_defaults(func=export_run.run)


def _extract_arguments(xt: argparse.ArgumentParser) -> None:
    from setdiv import extract

    extract.add_arguments(xt)
    xt.set_defaults(func=extract.run)


def _demo_arguments(dm: argparse.ArgumentParser) -> None:
    from setdiv import demo

    demo.add_arguments(dm)
    dm.set_defaults(func=demo.run)


def _index_arguments(ix: argparse.ArgumentParser) -> None:
    from setdiv.index import build as index_build
    from setdiv.index import query as index_query

    ix_sub = ix.add_subparsers(dest="index_command", required=True)
    ixb = ix_sub.add_parser("build", help="encode a gallery and add it to an index")
    index_build.add_build_arguments(ixb)
    ixb.set_defaults(func=index_build.run_build)
    ixe = ix_sub.add_parser("eval", help="two-stage search against exact search on queries")
    index_query.add_eval_arguments(ixe)
    ixe.set_defaults(func=index_query.run_eval)


def _search_arguments(se: argparse.ArgumentParser) -> None:
    from setdiv.index import query as index_query

    index_query.add_search_arguments(se)
    se.set_defaults(func=index_query.run_search)


def _serve_arguments(sv: argparse.ArgumentParser) -> None:
    from setdiv.index import serve as index_serve

    index_serve.add_arguments(sv)
    sv.set_defaults(func=index_serve.run)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "info": ("build the model of a config and print its structure", _info_arguments),
    "shards": ("convert a dataset into WebDataset shards", _shards_arguments),
    "vocab": ("build the bi-GRU vocabulary of training shards' captions", _vocab_arguments),
    "eval": ("evaluate an exported model on test shards", _eval_arguments),
    "train": ("train through DeepSpeed", _train_arguments),
    "export": ("consolidated fp32 safetensors from a run's checkpoint", _export_arguments),
    "extract": ("cache a frozen image tower's token features of shards", _extract_arguments),
    "demo": ("generate synthetic data, train K=4 and K=1, evaluate both", _demo_arguments),
    "index": ("search indexes over embedding sets: build, eval", _index_arguments),
    "search": ("query an index (two-stage: ANN + exact set rerank)", _search_arguments),
    "serve": ("an HTTP API (and a query page) over an index", _serve_arguments),
}
"""Subcommand -> (its help line, what adds its arguments). The arguments of a subcommand are
added only when it is the one asked for: each imports its module (torch, for most), and
`setdiv --help` imports none of them."""


def build_parser(only: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `setdiv` parser: one subcommand per library entry point, with the arguments of
    those in `only` (default: all of them)."""
    parser = errors.ArgumentParser(prog="setdiv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_line, add_arguments) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line)
        if only is None or name in only:
            add_arguments(command)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The top-level parser picks the subcommand; a subcommand that takes dotted `overrides`
    parses the rest intermixed (`train CONFIG --run-dir D key=value` and `train CONFIG key=value
    --run-dir D` are the same), which argparse cannot do through subparsers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[:1])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices.get(argv[0]) if argv else None
    if command is not None and any(a.dest == "overrides" for a in command._actions):
        args = command.parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a user error is one line on stderr and its exit code (2, or the
    error's own), any other error propagates with its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # (--help: 0; a bad flag: argparse's one line, 2)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 -- `report` re-raises all but user errors
        return report(f"setdiv {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
