"""torchvision's ImageNet AlexNet, ready to serve: `python -m training imagenet` (`make serve-imagenet`).

The weights come through torchvision's own weights API (AlexNet_Weights.IMAGENET1K_V1): its
download, its checksum, its cache under TORCH_HOME (`$TORCH_HOME/hub/checkpoints/`, by default
~/.cache/torch). They are converted by the importer (model.torchvision_import: torchvision's layer
names to the paper's, the 1,000 class names), optionally given a channel atlas built from the user's
own images, and registered in the model store under their own name, beside the default model.

Offline, the download fails at once with the file's name, where to put it by hand and what to run
then: everything after the download needs no network.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import AlexNet_Weights

MODEL_NAME = "alexnet-imagenet"  # its name in the model store: serve with MODEL_TAG=alexnet-imagenet:latest
WEIGHTS = AlexNet_Weights.IMAGENET1K_V1


class WeightsUnavailable(RuntimeError):
    """The weights are neither in torchvision's cache nor downloadable from here."""


def cached_weights_path() -> Path:
    """Where torchvision's weights API keeps the file (and looks for it before downloading)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(WEIGHTS.url).path).name


def fetch_state_dict() -> dict[str, torch.Tensor]:
    """The IMAGENET1K_V1 state dict: from torchvision's cache, else downloaded there (its sha256
    prefix, in the file name, is checked). Read with weights_only=True: never unpickle code."""
    try:
        return WEIGHTS.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsUnavailable(
            f"cannot download torchvision's AlexNet ImageNet weights ({WEIGHTS.url}): {reason}.\n"
            f"Offline? Download that file on a machine that can, and put it here:\n"
            f"    {cached_weights_path()}\n"
            f"(torchvision's cache: $TORCH_HOME/hub/checkpoints/, TORCH_HOME={Path(torch.hub.get_dir()).parent}); "
            f"then run again:\n    make serve-imagenet        (or: python -m training imagenet)"
        ) from err


def prepare(out: Path, atlas_images: Path | None = None, name: str = MODEL_NAME) -> str:
    """Weights -> checkpoint in `out` (+ atlas from `atlas_images`) -> the model store; the new tag."""
    from model.store import register
    from model.torchvision_import import write_checkpoint

    state = fetch_state_dict()
    accuracy = WEIGHTS.meta["_metrics"]["ImageNet-1K"]
    manifest = write_checkpoint(state, out, source=f"torchvision {WEIGHTS} ({cached_weights_path().name})",
                                metrics={"test_top1": accuracy["acc@1"] / 100, "test_top5": accuracy["acc@5"] / 100,
                                         "test_split": "ImageNet-1K validation (torchvision's published figure)"})
    print(f"converted {cached_weights_path().name}: {len(manifest.class_names)} classes -> {out}")
    if atlas_images is not None:
        from training.atlas import build_atlas

        build_atlas(out, str(atlas_images))
    else:
        print("no --atlas: the inspector will say this model has no channel atlas "
              "(give a folder of your own photos to build one)")
    tag = register(out, name)
    print(f"registered {tag}")
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training imagenet", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/alexnet-imagenet"), help="checkpoint directory")
    parser.add_argument("--atlas", type=Path, default=None,
                        help="a folder of your own images to build the channel atlas from (any layout)")
    parser.add_argument("--name", default=MODEL_NAME, help="model name in the store")
    args = parser.parse_args(argv)
    from model.checkpoint import CheckpointError
    from training.data import DataError

    try:
        prepare(args.out, args.atlas, args.name)
    except (WeightsUnavailable, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
