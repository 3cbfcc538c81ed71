"""torchvision's AlexNet weights in our format.

torchvision names its layers by position (features.0, classifier.1, ...); we
name them as the paper does. This table is the one place the two meet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models import AlexNet_Weights

from model.checkpoint import Manifest, save_checkpoint
from model.config import get_preset
from model.network import AlexNet

TORCHVISION_TO_OURS = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}


def imagenet_class_names() -> list[str]:
    # Shipped inside torchvision's code (no download): the 1000 ImageNet-1k labels.
    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def convert_state_dict(torchvision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in torchvision_state.items():
        prefix, _, param = key.rpartition(".")
        if prefix not in TORCHVISION_TO_OURS:
            raise KeyError(f"unexpected key {key!r} in a torchvision AlexNet state dict")
        converted[f"{TORCHVISION_TO_OURS[prefix]}.{param}"] = tensor
    return converted


def model_from_torchvision_state(torchvision_state: dict[str, torch.Tensor]) -> AlexNet:
    model = AlexNet(get_preset("torchvision").config)
    model.load_state_dict(convert_state_dict(torchvision_state), strict=True)
    return model.eval()


def write_checkpoint(torchvision_state: dict[str, torch.Tensor], out_dir: str | Path, source: str,
                     metrics: dict | None = None) -> Manifest:
    """A torchvision AlexNet state dict as our checkpoint, with the 1000 ImageNet class names;
    `metrics`: its accuracy where known (the model card shows it)."""
    if not isinstance(torchvision_state, dict):
        raise ValueError(f"{source}: expected a state dict, found {type(torchvision_state).__name__}")
    model = model_from_torchvision_state(torchvision_state)
    preset = get_preset("torchvision")
    training = {"dataset": "imagenet-1k", "source": source}
    if metrics:
        training["metrics"] = metrics
    return save_checkpoint(out_dir, model, imagenet_class_names(), preset.preprocessing, preset="torchvision",
                           training=training)


def import_torchvision_weights(pth_path: str | Path, out_dir: str | Path) -> Manifest:
    """Convert a torchvision AlexNet `.pth` (e.g. alexnet-owt-7be5be79.pth) to a checkpoint."""
    # weights_only=True: the file may come from anywhere; never run its pickled code.
    state = torch.load(pth_path, map_location="cpu", weights_only=True)
    return write_checkpoint(state, out_dir, source=f"torchvision weights {Path(pth_path).name}")
