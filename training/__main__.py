"""Train, evaluate and register models.

    python -m training --data shapes --preset small --out runs/small [--register]
    python -m training evaluate runs/small --data shapes [--report reports/small]
    python -m training register runs/small
    python -m training atlas runs/small --data shapes        # what each conv channel responds to
    python -m training imagenet [--atlas MY_PHOTOS]          # torchvision's ImageNet AlexNet, registered
    torchrun --nproc-per-node 2 -m training --data shapes --out runs/ddp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.config import PRESETS
from training.recipe import RunConfig

DEFAULTS = RunConfig()


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train an AlexNet-style CNN. Subcommands: `evaluate CHECKPOINT_DIR`, `register CHECKPOINT_DIR`, "
                    "`serve-version TAG --url URL`, `rollout TAG --shadow 10%% --canary 5%%,50%% --url URL`, "
                    "`atlas CHECKPOINT_DIR`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=DEFAULTS.data, help="'shapes' (generated) or an ImageFolder directory")
    parser.add_argument("--preset", default=DEFAULTS.preset, choices=sorted(PRESETS))
    parser.add_argument("--out", default=DEFAULTS.out, help="checkpoint directory to write")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="train for this many seconds, LR schedule fitted to it (replaces --epochs)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    parser.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
    parser.add_argument("--cutout", type=float, default=DEFAULTS.cutout,
                        help="side of a square erased from each training image, as a fraction of it (0: none)")
    parser.add_argument("--ema", type=float, default=DEFAULTS.ema,
                        help="evaluate and save a moving average of the weights with this decay (0: the last step's)")
    parser.add_argument("--mixup", type=float, default=DEFAULTS.mixup,
                        help="blend each training image with another, weight ~ Beta(alpha, alpha) (0: none)")
    parser.add_argument("--warmup", type=float, default=DEFAULTS.warmup, help="fraction of the run")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--shapes-per-class", type=int, default=DEFAULTS.shapes_per_class,
                        help="training images per class for --data shapes (test: a quarter)")
    parser.add_argument("--no-amp", action="store_true", help="train in fp32 even where the device computes bf16 natively")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--register", action="store_true", help="put the best checkpoint in the BentoML model store")
    return parser


def run_train(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    from training.data import DataError
    from training.trainer import OutputDirError, train

    config = RunConfig(
        data=args.data, preset=args.preset, out=args.out, epochs=args.epochs, time_budget=args.time_budget,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, cutout=args.cutout, ema=args.ema, mixup=args.mixup,
        warmup=args.warmup, seed=args.seed,
        shapes_per_class=args.shapes_per_class, amp=not args.no_amp,
    )
    try:
        manifest = train(config, resume=args.resume)
    except (DataError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifest is not None and args.register:
        from model.store import register

        print(f"registered {register(args.out)}")
    return 0


def run_evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training evaluate", description="evaluate a checkpoint")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", default="shapes", help="'shapes' or an ImageFolder directory")
    parser.add_argument("--seed", type=int, default=0, help="for shapes: the seed the model was trained with")
    parser.add_argument("--shapes-per-class", type=int, default=DEFAULTS.shapes_per_class)
    parser.add_argument("--report", type=Path, help="write PNG plots to this directory")
    args = parser.parse_args(argv)

    import torch

    from model.checkpoint import CheckpointError, load_checkpoint
    from model.preprocess import Normalizer
    from training.data import DataError, load_dataset
    from training.evaluate import evaluate, format_agreement, precision_agreement

    try:
        checkpoint = load_checkpoint(args.checkpoint)
        prep = checkpoint.manifest.preprocessing
        dataset = load_dataset(args.data, prep, args.seed, args.shapes_per_class)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    classes = checkpoint.manifest.class_names
    if dataset.class_names != classes:
        print(f"error: the data's classes {dataset.class_names} differ from the model's {classes}", file=sys.stderr)
        return 2
    result = evaluate(checkpoint.model, dataset.test, Normalizer(prep), len(classes), torch.device("cpu"))
    print(f"{args.checkpoint} on {dataset.name} test ({len(dataset.test.labels)} images)")
    print(f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  loss {result.loss:.4f}")
    print("serving precisions against fp32:",
          *format_agreement(precision_agreement(checkpoint, dataset.test, torch.device("cpu"))), sep="\n")
    width = max(len(c) for c in classes)
    for name, accuracy, count in zip(classes, result.per_class_accuracy, result.confusion.sum(dim=1).tolist()):
        print(f"  {name.ljust(width)}  {accuracy:.4f}  ({count} images)")
    if args.report:
        from training.report import write_report

        for path in write_report(args.report, checkpoint, result, dataset.test.images[0]):
            print(f"wrote {path}")
    return 0


def run_register(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training register",
                                     description="put a checkpoint into the BentoML model store")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", default=None, help="model name in the store (default cnn-classifier)")
    args = parser.parse_args(argv)
    from model.checkpoint import CheckpointError
    from model.store import MODEL_NAME, register

    try:
        print(f"registered {register(args.checkpoint, args.name or MODEL_NAME)}")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_atlas(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training atlas",
        description="build the channel atlas of a checkpoint: each conv channel's top-9 dataset patches",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", default="shapes", help="'shapes' (its test split) or an ImageFolder directory")
    parser.add_argument("--shapes-per-class", type=int, default=100, help="for --data shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    args = parser.parse_args(argv)
    from model.checkpoint import CheckpointError
    from training.atlas import build_atlas
    from training.data import DataError

    try:
        build_atlas(args.checkpoint, args.data, args.shapes_per_class, args.seed, args.limit)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from training.imagenet import main as run_imagenet
    from training.rollout import main as run_rollout
    from training.serve_version import main as run_serve_version

    commands = {"evaluate": run_evaluate, "register": run_register, "atlas": run_atlas,
                "serve-version": run_serve_version, "imagenet": run_imagenet, "rollout": run_rollout}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return run_train(argv)


if __name__ == "__main__":
    sys.exit(main())
