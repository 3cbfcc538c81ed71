"""/feature_maps: which layers and channels, the activations from the backend, and the
response -- PNG grids, exact float16 arrays or per-channel statistics."""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import torch

from model.network import AlexNet
from model.summary import LayerInfo
from model.visualize import encode_png, feature_map_grid
from service.core.refusals import Refusal
from service.core.schemas import ArrayPayload, ChannelStats, LayerFeatureMaps


@dataclass(frozen=True)
class FeatureMapsRequest:
    layers: list[str] | None  # names from GET /model; None: every conv layer
    channels: list[int] | None  # explicit channel indices ...
    top_channels: int | None  # ... or the N channels with the highest mean activation (None, None: all)
    stage: str  # pre_relu | post_relu (model.network.STAGES)
    format: str  # png | array | stats

    def resolved(self, network: AlexNet) -> FeatureMapsRequest:
        """Defaults filled in and checked against the model's structure: once, before any decoding."""
        if self.channels is not None and self.top_channels is not None:
            raise Refusal(400, "ambiguous_channels", "give `channels` or `top_channels`, not both")
        names = list(dict.fromkeys(self.layers)) if self.layers else network.conv_layers
        network.check_layers(names)
        return dataclasses.replace(self, layers=names)


async def feature_maps(pipeline, image: np.ndarray, request: FeatureMapsRequest) -> tuple[list[LayerFeatureMaps], int,
                                                                                        Any]:
    """The layer bodies of a /feature_maps answer for one decoded image (`request` resolved), their
    payload bytes, and the model version that computed them (its layer table describes them).
    `pipeline`: the worker's (service.runtime.pipeline: its backend and limits)."""
    names, fmt = request.layers, request.format
    found, version = await pipeline.backend.activations(image, names, request.stage)
    activations = {name: torch.from_numpy(found[name]) for name in names}
    chosen = {n: choose_channels(version.layers[n], activations[n], request) for n in names}
    size = estimated_bytes(activations, chosen, fmt)
    max_bytes = pipeline.config.max_feature_map_bytes
    if size > max_bytes:
        raise Refusal(422, "response_too_large",
                      f"about {size:,} bytes of {fmt}; the cap is {max_bytes:,}: "
                      "ask for fewer layers, `channels` or `top_channels`")
    bodies = await anyio.to_thread.run_sync(
        lambda: [layer_payload(version.layers[n], activations[n], chosen[n], fmt) for n in names]
    )
    return bodies, sum(len(b.png or "") + len(b.array.data if b.array else "") for b in bodies), version


def choose_channels(info: LayerInfo, activation: torch.Tensor, request: FeatureMapsRequest) -> list[int]:
    count = activation.shape[0]
    if request.channels is not None:
        info.check_channels(request.channels)
        return list(dict.fromkeys(request.channels))  # keep order, drop repeats
    if request.top_channels is not None:
        # The channels this image excites most: where the layer "sees" something.
        means = activation.reshape(count, -1).mean(dim=1)
        return means.topk(min(request.top_channels, count)).indices.tolist()
    return list(range(count))


def layer_payload(info: LayerInfo, activation: torch.Tensor, chosen: list[int], fmt: str) -> LayerFeatureMaps:
    selected = activation[chosen]
    body = LayerFeatureMaps(
        layer=info.name, type=info.type, shape=list(activation.shape), kernel=info.kernel, stride=info.stride,
        padding=info.padding, receptive_field=info.receptive_field, jump=info.jump, channels=chosen,
    )
    if fmt == "png":
        maps = selected if selected.ndim == 3 else selected.view(1, 1, -1)  # a vector shows as one strip
        body.png = base64.b64encode(encode_png(feature_map_grid(maps))).decode()
    elif fmt == "array":
        body.array = float16_payload(selected)
    else:
        flat = selected.reshape(len(chosen), -1)
        body.stats = [
            ChannelStats(channel=c, mean=float(row.mean()), max=float(row.max()),
                         zero_fraction=float((row == 0).float().mean()))
            for c, row in zip(chosen, flat)
        ]
    return body


def float16_payload(values: torch.Tensor) -> ArrayPayload:
    """Exact values for programs: float16, little-endian, C order, base64."""
    raw = values.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()
    return ArrayPayload(shape=list(values.shape), data=base64.b64encode(raw).decode())


def estimated_bytes(activations: dict[str, torch.Tensor], chosen: dict[str, list[int]], fmt: str) -> int:
    """An upper estimate of the payload before building it, so a request that
    would blow the response cap is refused without the work."""
    total = 0
    for name, activation in activations.items():
        per_channel = activation[0].numel() if activation.ndim == 3 else 1
        n = len(chosen[name])
        if fmt == "array":
            total += n * per_channel * 2 * 4 // 3 + 64
        elif fmt == "png":
            total += n * max(per_channel, 32 * 32) * 3 * 4 // 3 // 2 + 256  # PNG compresses grayscale well
        else:
            total += n * 80
    return total
