"""``medseg train CONFIG.yaml [--fold K|all] [--output DIR] [--resume] [--cross-validate] [key=value ...]``.

``--fold all`` trains every fold of the plan (``data.num_folds``) in turn, each in
``ROOT/fold_<K>`` (``ROOT``: ``--output``, else ``runs/<name>``): a fold whose run is finished
(:func:`medseg.training.trainer.run_finished`) is skipped with a note on stderr, one with
``checkpoints/last.pt`` is resumed, the others start fresh. ``--cross-validate`` (after training,
or alone once every fold is trained) predicts each fold's validation cases with its package and
writes ``ROOT/cross_validation.json`` and the ensemble package ``ROOT/ensemble``
(:mod:`medseg.training.cross_validation`). One JSON summary per trained fold on stdout, then
the cross-validation table.

Under ``torchrun --nproc-per-node N -m medseg train ...`` it trains with DDP (gloo on CPU, NCCL on GPU);
cross-validation runs on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fold number nor 'all'") from None


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fold",
        type=_fold,
        default=None,
        help="cross-validation fold K, or 'all' for every fold in turn (skipping finished ones, "
        "resuming interrupted ones) (default: data.fold)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="run folder (default: runs/<name>/fold_<K>); with --fold all or --cross-validate the "
        "folder of the folds' run folders fold_<K> (default: runs/<name>)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument(
        "--cross-validate",
        action="store_true",
        help="after training (or alone, once every fold is trained): predict each fold's validation "
        "cases with its package, write cross_validation.json and the ensemble package ensemble/",
    )


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
    args.cross_validate = args.cross_validate or extra.cross_validate
    args.overrides = extra.overrides
    return args


def _train(config, trainer_class, args, output, fold, resume: bool) -> None:
    trainer = trainer_class(config, output_dir=output, fold=fold, resume=resume, show_progress=not args.no_progress)
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
            ),
            flush=True,
        )


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.training import load_config, run_finished, trainer_for
    from medseg.training.cross_validation import cross_validate, format_table, run_root, write_ensemble

    args = _merge_trailing(args)
    config = load_config(args.config, args.overrides)
    trainer_class = trainer_for(config)
    root = run_root(config, args.output)
    if args.cross_validate and config.task != "segmentation":
        raise ConfigError(f"--cross-validate: only for segmentation configs, not task {config.task!r}")
    if args.fold == "all":
        for k in range(config.data.num_folds):
            output = root / f"fold_{k}"
            if run_finished(config, output):
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"fold {k}: already trained ({output}), skipped", file=sys.stderr, flush=True)
                continue
            resume = (Path(output) / "checkpoints" / "last.pt").is_file()
            _train(config, trainer_class, args, output, k, resume)
    elif args.fold is not None or not args.cross_validate:
        if args.cross_validate and args.output:
            raise ConfigError(
                "--cross-validate with --output needs --fold all (or no --fold): --output is then "
                "the folder of the folds' run folders"
            )
        _train(config, trainer_class, args, args.output, args.fold, args.resume)
    if args.cross_validate and int(os.environ.get("RANK", "0")) == 0:
        report = cross_validate(config, root, progress=not args.no_progress)
        package = write_ensemble(root, report)
        print(format_table(report))
        print(f"cross-validation: {root / 'cross_validation.json'}; ensemble package: {package.path}")
    return 0
