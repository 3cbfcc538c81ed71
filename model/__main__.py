"""python -m model summary --preset alexnet [--json]
python -m model import-torchvision alexnet-owt-7be5be79.pth --out checkpoints/alexnet-imagenet
"""

from __future__ import annotations

import argparse
import sys

from model.config import PRESETS, get_preset
from model.network import AlexNet
from model.summary import format_table, layer_table, table_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    summary = sub.add_parser("summary", help="print the layer table of a preset or checkpoint")
    source = summary.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="alexnet")
    source.add_argument("--checkpoint", help="a checkpoint directory instead of a preset")
    summary.add_argument("--json", action="store_true", help="machine-readable output")

    imp = sub.add_parser("import-torchvision", help="convert torchvision AlexNet weights (.pth) to a checkpoint")
    imp.add_argument("pth", help="torchvision AlexNet state dict file")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")

    args = parser.parse_args(argv)
    if args.command == "summary":
        if args.checkpoint:
            from model.checkpoint import load_checkpoint

            model = load_checkpoint(args.checkpoint).model
        else:
            model = AlexNet(get_preset(args.preset).config)
        rows = layer_table(model)
        print(table_json(rows) if args.json else format_table(rows))
    elif args.command == "import-torchvision":
        from model.torchvision_import import import_torchvision_weights

        manifest = import_torchvision_weights(args.pth, args.out)
        print(f"wrote {args.out} ({len(manifest.class_names)} classes, sha256 {manifest.weights_sha256[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
