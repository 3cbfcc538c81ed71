"""The layer table: shapes, receptive fields and costs, computed from the module.

Receptive field arithmetic (per spatial axis), walking the layers in order:
    jump_out   = jump_in * stride                 (input pixels between neighbouring outputs)
    rf_out     = rf_in + (kernel - 1) * jump_in   (input pixels one output value sees)
    offset_out = offset_in - padding * jump_in    (where output 0's field starts; < 0: in the padding)
so output i of a layer sees input pixels offset + i * jump ... offset + i * jump + rf - 1.
A fully connected layer sees the whole image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.errors import ChannelOutOfRange
from model.network import AlexNet


def check_channels(layer: str, count: int, channels: list[int]) -> None:
    """Raise ChannelOutOfRange unless every index is one of the layer's `count` channels."""
    bad = [c for c in channels if not 0 <= c < count]
    if bad:
        raise ChannelOutOfRange(f"layer {layer} has channels 0..{count - 1}; out of range: {bad[:10]}")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    kernel: int | None
    stride: int | None
    padding: int | None
    output_shape: tuple[int, ...]  # (C, H, W) for maps, (N,) for vectors
    output_values: int
    receptive_field: int
    jump: int
    params: int
    mult_adds: int
    rf_offset: int = 0  # input coordinate of the first output's receptive field (top and left edge)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def channels(self) -> int:
        """Channels of a map (C of C, H, W), or entries of a vector."""
        return self.output_shape[0]

    def check_channels(self, channels: list[int]) -> None:
        """Raise ChannelOutOfRange unless every index names one of this layer's channels."""
        check_channels(self.name, self.channels, channels)

    def field_of(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) input pixels unit (row, col) sees; may reach into the padding."""
        top, left = self.rf_offset + row * self.jump, self.rf_offset + col * self.jump
        return top, left, top + self.receptive_field, left + self.receptive_field


def _window(module: nn.Module) -> tuple[int, int, int]:
    def first(v):
        return v[0] if isinstance(v, tuple) else v

    return first(module.kernel_size), first(module.stride), first(module.padding)


@torch.no_grad()
def layer_table(model: AlexNet) -> list[LayerInfo]:
    config = model.config
    shapes: dict[str, tuple[int, ...]] = {}
    # On the model's device: a model built on "meta" gives every shape without computing anything.
    device = next(model.parameters()).device
    x = torch.zeros(1, config.in_channels, config.input_size, config.input_size, device=device)
    for name, module in model.named_children():
        x = module(x)
        shapes[name] = tuple(x.shape[1:])

    input_shape = (config.in_channels, config.input_size, config.input_size)
    rows = [
        LayerInfo("input", "input", None, None, None, input_shape, _numel(input_shape), 1, 1, 0, 0)
    ]
    rf, jump, offset = 1, 1, 0
    owner: dict[str, str] = {}  # module name -> addressable layer it belongs to (bn3 -> conv3)
    current = None
    for module_name in model._modules:
        if module_name in model.named_layers:
            current = module_name
        owner[module_name] = current or module_name

    for name, layer in model.named_layers.items():
        module = model.get_submodule(name)
        out_shape = shapes[layer.post_relu_module]
        params = sum(
            p.numel()
            for module_name, sub in model.named_children()
            if owner.get(module_name) == name
            for p in sub.parameters()
        )
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            kernel, stride, padding = _window(module)
            rf = rf + (kernel - 1) * jump
            offset = offset - padding * jump
            jump = jump * stride
            if isinstance(module, nn.Conv2d):
                mult_adds = _numel(out_shape) * module.in_channels * kernel * kernel // module.groups
                kind = "conv"
            else:
                mult_adds = 0
                kind = "maxpool"
        elif isinstance(module, nn.Linear):
            kernel = stride = padding = None
            rf, jump, offset = config.input_size, config.input_size, 0
            mult_adds = module.in_features * module.out_features
            kind = "fc"
        else:  # pragma: no cover - the network only names conv, pool and fc layers
            raise TypeError(f"unexpected layer type {type(module).__name__} for {name}")
        rows.append(
            LayerInfo(name, kind, kernel, stride, padding, out_shape, _numel(out_shape), rf, jump, params, mult_adds,
                      offset)
        )
    return rows


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def format_table(rows: list[LayerInfo]) -> str:
    headers = ["layer", "type", "kernel", "stride", "pad", "output (C,H,W)", "values", "RF", "jump", "params", "mult-adds"]

    def dash(v):
        return "-" if v is None else str(v)

    lines = [
        [
            r.name,
            r.type,
            dash(r.kernel),
            dash(r.stride),
            dash(r.padding),
            "x".join(str(n) for n in r.output_shape),
            f"{r.output_values:,}",
            str(r.receptive_field),
            str(r.jump),
            f"{r.params:,}",
            f"{r.mult_adds:,}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    total_params = sum(r.params for r in rows)
    total_macs = sum(r.mult_adds for r in rows)
    out.append(f"total: {total_params:,} parameters, {total_macs:,} multiply-adds per image")
    return "\n".join(out)


def table_json(rows: list[LayerInfo]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=2)
