"""``medseg plan DATASET_DIR [--data-card NAME_OR_PATH] [--output plan.json]``: fingerprint a dataset
(checking every case) and write the nnU-Net-style plan that ``medseg train`` uses."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="fingerprint a dataset and write a training plan",
        description="Check every case of an MSD/nnU-Net dataset and derive spacing, "
        "patch size, batch size, normalisation and cross-validation folds.",
    )
    parser.add_argument("dataset_dir", help="folder with imagesTr/, labelsTr/ and dataset.json")
    parser.add_argument("--data-card", default=None, help="data card name or path (labels, modality)")
    parser.add_argument("--output", default="plan.json", help="plan file to write (default: plan.json)")
    parser.add_argument(
        "--divisor",
        type=int,
        nargs="+",
        default=[8],
        help="patch sizes are multiples of this (one value or one per axis; default 8)",
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold split (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.data.plan import make_plan

    label_ids = modality = None
    if args.data_card:
        from medseg.training.cards import load_training_data_card

        card = load_training_data_card(args.data_card)
        label_ids, modality = [label.id for label in card.labels], card.modality
    divisor = args.divisor * 3 if len(args.divisor) == 1 else args.divisor
    plan = make_plan(
        args.dataset_dir, label_ids=label_ids, modality=modality, divisor=divisor, num_folds=args.folds, seed=args.seed
    )
    plan.save(args.output)
    print(
        json.dumps(
            {
                "output": args.output,
                "cases": len(plan.fingerprint.cases),
                "spacing_mm": plan.spacing,
                "patch_size": plan.patch_size,
                "batch_size": plan.batch_size,
                "normalization": plan.normalization.model_dump(),
                "folds": len(plan.folds),
            },
            indent=2,
        )
    )
    return 0
