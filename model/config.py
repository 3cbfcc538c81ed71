"""Typed model configuration and the named presets.

The whole architecture is data: a `ModelConfig` lists the conv stages and the
fully connected widths, and `model.network.AlexNet` builds itself from it. A
checkpoint stores this config, so a loaded network is rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

Norm = Literal["none", "lrn", "batchnorm"]


@dataclass(frozen=True)
class ConvStage:
    """One conv layer of the feature extractor, with what follows it.

    out_channels: number of kernels (= feature maps this layer produces).
    kernel/stride/padding: the sliding window. Output side length is
        floor((in + 2*padding - kernel) / stride) + 1.
    norm: LRN as in the AlexNet paper, BatchNorm for fast modern training.
    pool_kernel/pool_stride: an optional max pool after the ReLU (0 = none).
    """

    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    norm: Norm = "none"
    pool_kernel: int = 0
    pool_stride: int = 0

    @property
    def has_pool(self) -> bool:
        return self.pool_kernel > 0


@dataclass(frozen=True)
class ModelConfig:
    """An AlexNet-style network: conv stages, then fully connected layers.

    Layer names follow the paper: conv1..convN, pool<i> after the stages that
    pool, fc6.. for the hidden FC layers, and the last FC layer (the
    classifier) is fc<6+len(fc_widths)>, i.e. fc8 for AlexNet.
    """

    name: str
    input_size: int
    num_classes: int
    conv_stages: tuple[ConvStage, ...]
    fc_widths: tuple[int, ...] = (4096, 4096)
    in_channels: int = 3
    dropout: float = 0.5
    # Test-time flip: answer with the mean of the logits of the image and of its mirror image. A
    # net trained on flipped copies is nearly, not exactly, mirror-symmetric; averaging the two
    # views cancels part of its error for twice the forward cost. Evaluation and serving both do
    # it (model.network.with_mirror_images), so the accuracy a checkpoint records is what it serves.
    test_time_flip: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        stages = tuple(ConvStage(**stage) for stage in data["conv_stages"])
        return cls(**{**data, "conv_stages": stages, "fc_widths": tuple(data.get("fc_widths", ()))})

    def with_classes(self, num_classes: int) -> "ModelConfig":
        return ModelConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "num_classes": num_classes})


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the network's input; stored in every checkpoint.

    Images are resized so the shorter side is `resize_size`, then center-cropped
    to `input_size` (the ImageNet recipe 256 -> 224), then scaled to [0, 1] and
    normalized per channel with mean/std.
    """

    input_size: int
    resize_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    preprocessing: Preprocessing
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# The paper's network (Krizhevsky et al. 2012) as one stream instead of two GPU
# halves: 96-256-384-384-256 kernels. conv1 uses padding 2 so that a 224x224
# input gives the paper's 55x55 maps: floor((224 + 4 - 11) / 4) + 1 = 55.
def _alexnet_stages(widths: tuple[int, int, int, int, int], norm: Norm) -> tuple[ConvStage, ...]:
    """AlexNet's five conv stages with these widths: 11x11 stride 4, then 5x5, then three 3x3;
    overlapping 3x3 stride-2 max pools after conv1, conv2 and conv5; `norm` after conv1 and conv2."""
    c1, c2, c3, c4, c5 = widths
    return (
        ConvStage(c1, kernel=11, stride=4, padding=2, norm=norm, pool_kernel=3, pool_stride=2),
        ConvStage(c2, kernel=5, padding=2, norm=norm, pool_kernel=3, pool_stride=2),
        ConvStage(c3, kernel=3, padding=1),
        ConvStage(c4, kernel=3, padding=1),
        ConvStage(c5, kernel=3, padding=1, pool_kernel=3, pool_stride=2),
    )


ALEXNET = ModelConfig(
    name="alexnet",
    input_size=224,
    num_classes=1000,
    conv_stages=_alexnet_stages((96, 256, 384, 384, 256), norm="lrn"),
    fc_widths=(4096, 4096),
)

# torchvision's AlexNet ("One weird trick", Krizhevsky 2014): 64-192-384-256-256
# kernels and no LRN. Same layer names, so torchvision weights map one to one.
TORCHVISION = replace(ALEXNET, name="torchvision",
                      conv_stages=_alexnet_stages((64, 192, 384, 256, 256), norm="none"))

def _small_image_stages(conv1: ConvStage, widths: tuple[int, int, int, int],
                        pool_kernel: int = 2) -> tuple[ConvStage, ...]:
    """AlexNet's shape for small images: `conv1`, then four 3x3 convs with BatchNorm and stride-2 max
    pools after conv2 and conv5 (a 3x3 kernel with padding 1 keeps the map's size; each pool halves it):
    2x2 pools side by side, or AlexNet's overlapping 3x3 ones with `pool_kernel=3`."""
    c2, c3, c4, c5 = widths
    return (
        conv1,
        ConvStage(c2, kernel=3, padding=1, norm="batchnorm", pool_kernel=pool_kernel, pool_stride=2),
        ConvStage(c3, kernel=3, padding=1, norm="batchnorm"),
        ConvStage(c4, kernel=3, padding=1, norm="batchnorm"),
        ConvStage(c5, kernel=3, padding=1, norm="batchnorm", pool_kernel=pool_kernel, pool_stride=2),
    )


# The default model: AlexNet's shape (5 convs, 3 pools, 3 FC layers) shrunk for
# 64x64 inputs so it trains in about a minute on two CPU cores. BatchNorm
# replaces LRN; conv1's stride 2 halves the map early, where it is cheapest.
SMALL = ModelConfig(
    name="small",
    input_size=64,
    num_classes=10,
    conv_stages=_small_image_stages(
        ConvStage(32, kernel=5, stride=2, padding=2, norm="batchnorm", pool_kernel=2, pool_stride=2),
        (64, 96, 96, 64),
    ),
    fc_widths=(256, 256),
    dropout=0.3,
)

# For 32x32 photos (CIFAR-10 and the like): no stride in conv1, since the image
# is already tiny. The paper's overlapping pools (3x3 windows, stride 2; they
# cut AlexNet's error by 0.3-0.4%) take 32 -> 15 -> 7 -> 3: 0.5% more test top-1
# than 2x2 pools (32 -> 4) on the 10k-image CIFAR subset in 240 s, and a
# smaller fc6 (docs/training.md). Narrow on purpose: on a 2-core CPU the
# budget buys 2.5x the epochs of a net twice as wide, and the epochs win.
CIFAR = ModelConfig(
    name="cifar",
    input_size=32,
    num_classes=10,
    conv_stages=_small_image_stages(
        ConvStage(32, kernel=3, padding=1, norm="batchnorm", pool_kernel=3, pool_stride=2),
        (64, 96, 96, 96),
        pool_kernel=3,
    ),
    fc_widths=(256, 256),
    dropout=0.1,
    test_time_flip=True,  # +0.5 point top-1 on the CIFAR-10 subset, a 32x32 forward is cheap (docs/training.md)
)

IMAGENET_PREPROCESSING = Preprocessing(input_size=224, resize_size=256)

PRESETS: dict[str, Preset] = {
    "alexnet": Preset(ALEXNET, IMAGENET_PREPROCESSING, "the paper's single-stream AlexNet, 224x224, 1000 classes"),
    "torchvision": Preset(TORCHVISION, IMAGENET_PREPROCESSING, "torchvision.models.alexnet layout (loads its weights)"),
    "small": Preset(
        SMALL,
        Preprocessing(input_size=64, resize_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        "fast 64x64 AlexNet-style net, the default model",
    ),
    "cifar": Preset(
        CIFAR,
        Preprocessing(input_size=32, resize_size=32, mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262)),
        "32x32 AlexNet-style net for CIFAR-sized photos",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
