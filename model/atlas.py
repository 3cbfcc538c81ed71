"""The channel atlas: what each conv channel responds to, across a whole dataset.

The idea of Zeiler & Fergus (2014, "Visualizing and understanding
convolutional networks", the paper that looked inside AlexNet) and of OpenAI
Microscope: run every image of a dataset through the network once and, for
every channel of every conv layer, keep the images where it fires most. A
channel's activation at one position depends only on the input pixels in that
unit's *receptive field* (model.summary: `field_of`), so each example is
cropped to exactly that field: conv1's channels show small oriented edges and
colour blobs, conv5's show large parts of objects.

Per channel: its 9 strongest images (in each image, where the channel fires
most), the activation there, the patch of the input that unit sees, and the
channel's mean activation over all images and positions. The patches go into
one PNG sprite per layer (a row of 9 tiles per channel; tiles larger than
MAX_TILE pixels are scaled down to it), described by a JSON index.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.network import AlexNet
from model.preprocess import Normalizer
from model.summary import LayerInfo, layer_table

TOP = 9
MAX_TILE = 64
FORMAT_VERSION = 1
INDEX_FILE = "atlas/atlas.json"


def sprite_file(layer: str) -> str:
    return f"atlas/{layer}.png"


@dataclass
class LayerHits:
    """Per channel of one layer: the top images and where in them, and the mean activation."""

    values: torch.Tensor  # (C, k) activation, best first
    images: torch.Tensor  # (C, k) dataset index
    rows: torch.Tensor  # (C, k)
    cols: torch.Tensor  # (C, k)
    mean: torch.Tensor  # (C,)


@torch.inference_mode()
def find_top_activations(model: AlexNet, images: torch.Tensor, normalizer: Normalizer, device: torch.device,
                         batch_size: int = 64, progress: bool = True) -> dict[str, LayerHits]:
    """One pass over uint8 images (N, 3, S, S): for each conv channel, its TOP images by the channel's
    highest post-ReLU activation in the image, with that position."""
    model = model.to(device).eval()
    convs = model.conv_layers
    best: dict[str, tuple[torch.Tensor, ...]] = {}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in tqdm(range(0, len(images), batch_size), desc="atlas", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        inputs = normalizer(batch.to(device)).contiguous(memory_format=torch.channels_last)
        found = model.extract(inputs, {name: "post_relu" for name in convs})
        for name in convs:
            act = found[name].float()  # (B, C, H, W)
            b, c, h, w = act.shape
            peak, where = act.reshape(b, c, h * w).max(dim=2)  # each image's strongest position per channel
            candidates = (peak.T, (torch.arange(b, device=device) + start)[None].expand(c, b),
                          torch.div(where, w, rounding_mode="floor").T, (where % w).T)
            if name in best:
                candidates = tuple(torch.cat([old, new], dim=1) for old, new in zip(best[name], candidates))
            keep = candidates[0].topk(min(TOP, candidates[0].shape[1]), dim=1).indices
            best[name] = tuple(values.gather(1, keep) for values in candidates)
            sums[name] = sums.get(name, 0) + act.sum(dim=(0, 2, 3)).double()
        count += len(batch)
    hits = {}
    for name in convs:
        _, _, h, w = found[name].shape
        values, index, rows, cols = (t.cpu() for t in best[name])
        hits[name] = LayerHits(values, index, rows, cols, (sums[name] / (count * h * w)).float().cpu())
    return hits


def crop_field(image_hwc: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The input pixels inside box (top, left, bottom, right); where the field reaches past the image
    (into the padding the conv saw as zeros), mid gray."""
    top, left, bottom, right = box
    height, width = image_hwc.shape[:2]
    patch = np.full((bottom - top, right - left, 3), 128, dtype=np.uint8)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
    if y1 > y0 and x1 > x0:
        patch[y0 - top:y1 - top, x0 - left:x1 - left] = image_hwc[y0:y1, x0:x1]
    return patch


def build(model: AlexNet, images: torch.Tensor, sources: list[str], normalizer: Normalizer, device: torch.device,
          dataset: str) -> dict[str, bytes]:
    """The atlas files (relative name -> bytes): the JSON index and one PNG sprite per conv layer."""
    hits = find_top_activations(model, images, normalizer, device)
    table = {row.name: row for row in layer_table(model.cpu())}
    pixels = images.permute(0, 2, 3, 1).numpy()  # HWC for cropping
    index: dict = {"format_version": FORMAT_VERSION, "dataset": dataset, "images": len(images), "top": TOP,
                   "layers": {}}
    files: dict[str, bytes] = {}
    for name, layer_hits in hits.items():
        entry, sprite = _layer(table[name], layer_hits, pixels, sources)
        index["layers"][name] = entry
        buffer = io.BytesIO()
        Image.fromarray(sprite).save(buffer, format="PNG", optimize=False)
        files[sprite_file(name)] = buffer.getvalue()
    files[INDEX_FILE] = (json.dumps(index, indent=1) + "\n").encode()
    return files


def _layer(info: LayerInfo, hits: LayerHits, pixels: np.ndarray, sources: list[str]) -> tuple[dict, np.ndarray]:
    channels, k = hits.values.shape
    tile = min(info.receptive_field, MAX_TILE)
    sprite = np.full((channels * tile, TOP * tile, 3), 255, dtype=np.uint8)
    described = []
    for c in range(channels):
        patches = []
        for j in range(k):
            row, col = int(hits.rows[c, j]), int(hits.cols[c, j])
            box = info.field_of(row, col)
            patch = crop_field(pixels[int(hits.images[c, j])], box)
            if tile != patch.shape[0]:
                patch = np.asarray(Image.fromarray(patch).resize((tile, tile), Image.Resampling.LANCZOS))
            sprite[c * tile:(c + 1) * tile, j * tile:(j + 1) * tile] = patch
            patches.append({"source": sources[int(hits.images[c, j])], "row": row, "col": col,
                            "activation": round(float(hits.values[c, j]), 5), "box": list(box)})
        described.append({"channel": c, "mean_activation": round(float(hits.mean[c]), 6), "patches": patches})
    entry = {"sprite": sprite_file(info.name), "tile": tile, "receptive_field": info.receptive_field,
             "jump": info.jump, "rf_offset": info.rf_offset, "shape": list(info.output_shape), "channels": described}
    return entry, sprite
