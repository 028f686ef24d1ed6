"""``medseg train CONFIG.yaml [--fold K] [--output DIR] [--resume] [key=value ...]``.

Under ``torchrun --nproc-per-node N -m medseg train ...`` it trains with DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fold", type=int, default=None, help="cross-validation fold (default: data.fold)")
    parser.add_argument("--output", default=None, help="run folder (default: runs/<name>/fold_<K>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a segmentation network from a YAML config",
        description="Train a network on a dataset (MSD/nnU-Net layout), validate with "
        "sliding-window inference and export a model package.",
    )
    parser.add_argument("config", help="experiment YAML (see configs/)")
    _options(parser)
    parser.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="key=value",
        help="override config keys, e.g. training.epochs=3 optimizer.lr=0.01 (options may follow)",
    )
    parser.set_defaults(func=run)


def _merge_trailing(args: argparse.Namespace) -> argparse.Namespace:
    """Options may come after CONFIG and among the overrides (argparse sub-commands cannot intermix
    positionals and options themselves): parse the remainder with the same options."""
    trailing = argparse.ArgumentParser(prog="medseg train", add_help=False)
    _options(trailing)
    trailing.add_argument("overrides", nargs="*")
    extra = trailing.parse_intermixed_args(args.rest)
    for key in ("fold", "output"):
        if getattr(extra, key) is not None:
            setattr(args, key, getattr(extra, key))
    args.resume = args.resume or extra.resume
    args.no_progress = args.no_progress or extra.no_progress
    args.overrides = extra.overrides
    return args


def run(args: argparse.Namespace) -> int:
    from medseg.training import load_config, trainer_for

    args = _merge_trailing(args)
    config = load_config(args.config, args.overrides)
    trainer = trainer_for(config)(
        config, output_dir=args.output, fold=args.fold, resume=args.resume, show_progress=not args.no_progress
    )
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if trainer.is_main:
        print(
            json.dumps(
                {
                    "output": str(result.output_dir),
                    "epochs": result.epochs,
                    "best_epoch": result.best_epoch,
                    "validation": result.best_metrics,
                    "train_seconds": round(result.train_seconds, 1),
                    "package": str(result.package) if result.package else None,
                },
                indent=2,
            )
        )
    return 0
