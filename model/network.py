"""The AlexNet-style network, built from a `ModelConfig`.

The network is one flat `nn.Sequential` under the paper's names, so the
state dict reads `conv1.weight`, `fc6.bias`, ... and a layer is addressed by
the same name in the feature-map API, the layer table and the checkpoint.

Order inside a conv stage i (the paper puts LRN after the ReLU, BatchNorm
goes before it):
    conv_i -> [bn_i] -> relu_i -> [lrn_i] -> [pool_i]
then   flatten -> (drop_k -> fc_k -> relu_k) for each hidden FC -> fc_last.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from model.config import ConvStage, ModelConfig
from model.errors import ClassOutOfRange, UnknownLayer
from model.lrn import LocalResponseNorm

Stage = str  # "pre_relu" | "post_relu"
STAGES = ("pre_relu", "post_relu")


@dataclass(frozen=True)
class NamedLayer:
    """A layer users can address: where its pre- and post-ReLU values live."""

    name: str
    kind: str  # "conv" | "pool" | "fc"
    pre_relu_module: str  # module whose output feeds the ReLU
    post_relu_module: str  # module whose output is the ReLU's (same as pre for pool/logits)


def make_conv(in_channels: int, stage: ConvStage) -> nn.Conv2d:
    """`out_channels` kernels of size kernel x kernel x in_channels, slid with `stride` over
    the input zero-padded by `padding` on every side."""
    return nn.Conv2d(in_channels, stage.out_channels, stage.kernel, stage.stride, stage.padding)


def make_pool(stage: ConvStage) -> nn.MaxPool2d:
    """Max over each pool_kernel x pool_kernel window: keeps the strongest response, so a
    feature moved by a pixel or two still gives the same output (small translation invariance)."""
    return nn.MaxPool2d(stage.pool_kernel, stage.pool_stride)


def _conv_stage_modules(config: ModelConfig) -> tuple[list[tuple[str, nn.Module]], list[NamedLayer]]:
    modules: list[tuple[str, nn.Module]] = []
    layers: list[NamedLayer] = []
    in_channels = config.in_channels
    for index, stage in enumerate(config.conv_stages, start=1):
        conv = f"conv{index}"
        modules.append((conv, make_conv(in_channels, stage)))
        pre = conv
        if stage.norm == "batchnorm":
            modules.append((f"bn{index}", nn.BatchNorm2d(stage.out_channels)))
            pre = f"bn{index}"
        # Not in-place: the pre-ReLU tensor must survive for feature-map extraction.
        modules.append((f"relu{index}", nn.ReLU()))
        layers.append(NamedLayer(conv, "conv", pre, f"relu{index}"))
        if stage.norm == "lrn":
            # The paper's constants: k=2, n=5, alpha=1e-4, beta=0.75.
            modules.append((f"lrn{index}", LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)))
        if stage.has_pool:
            pool = f"pool{index}"
            modules.append((pool, make_pool(stage)))
            layers.append(NamedLayer(pool, "pool", pool, pool))
        in_channels = stage.out_channels
    return modules, layers


def conv_output_side(config: ModelConfig) -> int:
    """Side length of the last conv stage's output, from the sliding-window formula."""
    side = config.input_size
    for stage in config.conv_stages:
        side = (side + 2 * stage.padding - stage.kernel) // stage.stride + 1
        if side <= 0:
            raise ValueError(f"input {config.input_size} is too small for {config.name}: a map shrinks to {side}")
        if stage.has_pool:
            side = (side - stage.pool_kernel) // stage.pool_stride + 1
    return side


class AlexNet(nn.Sequential):
    """A flat Sequential: state-dict keys are the paper's layer names (conv1.weight, ...)."""

    def __init__(self, config: ModelConfig):
        modules, named = _conv_stage_modules(config)
        side = conv_output_side(config)
        features = config.conv_stages[-1].out_channels * side * side

        modules.append(("flatten", nn.Flatten(1)))
        first_fc = 6  # the paper numbers layers 1-5 conv, 6-8 fully connected
        for offset, width in enumerate(config.fc_widths):
            fc = f"fc{first_fc + offset}"
            modules.append((f"drop{first_fc + offset}", nn.Dropout(config.dropout)))
            modules.append((fc, nn.Linear(features, width)))
            modules.append((f"relu{first_fc + offset}", nn.ReLU()))
            named.append(NamedLayer(fc, "fc", fc, f"relu{first_fc + offset}"))
            features = width
        logits = f"fc{first_fc + len(config.fc_widths)}"
        modules.append((logits, nn.Linear(features, config.num_classes)))
        named.append(NamedLayer(logits, "fc", logits, logits))

        super().__init__(OrderedDict(modules))
        self.config = config
        self.named_layers: dict[str, NamedLayer] = {layer.name: layer for layer in named}

    @property
    def logits_layer(self) -> str:
        return list(self.named_layers)[-1]

    @property
    def embedding_layer(self) -> str:
        """The penultimate layer (fc7 for AlexNet): the image's feature vector."""
        return list(self.named_layers)[-2]

    @property
    def conv_layers(self) -> list[str]:
        return [name for name, layer in self.named_layers.items() if layer.kind == "conv"]

    def check_layers(self, names: list[str]) -> None:
        """Raise UnknownLayer unless every name is an addressable layer (conv1, pool1, ..., fc8)."""
        unknown = [name for name in names if name not in self.named_layers]
        if unknown:
            raise UnknownLayer(f"unknown layer(s) {unknown[:10]}; valid: {list(self.named_layers)}")

    def check_conv_layer(self, name: str) -> None:
        if name not in self.conv_layers:
            raise UnknownLayer(f"this needs a conv layer; {name!r} is not one of {self.conv_layers}")

    def check_class(self, index: int | None) -> None:
        if index is not None and not 0 <= index < self.config.num_classes:
            raise ClassOutOfRange(f"class_index must be in 0..{self.config.num_classes - 1}")

    def extract(self, x: torch.Tensor, requests: dict[str, Stage]) -> dict[str, torch.Tensor]:
        """Run the network up to the deepest requested layer and return the
        requested activations, keyed by layer name.

        requests maps a layer name to "pre_relu" or "post_relu". Work stops at
        the deepest module needed, so asking for conv1 costs one conv.
        """
        self.check_layers(list(requests))
        wanted: dict[str, str] = {}
        for name, stage in requests.items():
            layer = self.named_layers[name]
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; valid: {list(STAGES)}")
            module_name = layer.pre_relu_module if stage == "pre_relu" else layer.post_relu_module
            wanted[module_name] = name
        found: dict[str, torch.Tensor] = {}
        # Without autograd, a ReLU may overwrite its input (no new tensor, no page faults: 16 ms of
        # a 64-image AlexNet batch here) -- unless that input is a pre-ReLU map being returned.
        in_place = not torch.is_grad_enabled()
        captured = False
        for module_name, module in self.named_children():
            if in_place and not captured and isinstance(module, nn.ReLU):
                x = torch.relu_(x)
            else:
                x = module(x)
            captured = module_name in wanted
            if captured:
                found[wanted[module_name]] = x
                if len(found) == len(wanted):
                    break
        return found


def with_mirror_images(x: torch.Tensor) -> torch.Tensor:
    """The (N, C, H, W) batch followed by its N horizontal mirror images: the two views of a test-time
    flip (ModelConfig.test_time_flip). The memory format (channels-last) is kept."""
    return torch.cat([x, x.flip(-1)])


def mean_over_mirrors(outputs: torch.Tensor) -> torch.Tensor:
    """The (2N, ...) outputs of `with_mirror_images(x)` -> (N, ...): each image's mean with its mirror's."""
    half = len(outputs) // 2
    return (outputs[:half] + outputs[half:]) / 2


def build_model(config: ModelConfig) -> AlexNet:
    return AlexNet(config)
