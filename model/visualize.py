"""Pictures of what the network learned: kernel grids and feature-map grids.

Plain tensor code (no plotting library), shared by the training reports and
the service's /kernels and /feature_maps endpoints.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image


def _grid(tiles: torch.Tensor, columns: int | None = None, gap: int = 1) -> torch.Tensor:
    """(N, C, h, w) floats in [0, 1] -> one (C, H, W) image, tiles in rows, `gap` px apart."""
    n, channels, h, w = tiles.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(channels, rows * (h + gap) + gap, columns * (w + gap) + gap)
    for index in range(n):
        r, c = divmod(index, columns)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        grid[:, top : top + h, left : left + w] = tiles[index]
    return grid


def _scale_each(tiles: torch.Tensor) -> torch.Tensor:
    """Stretch each tile to [0, 1] on its own, so weak channels stay visible."""
    flat = tiles.reshape(len(tiles), -1)
    low = flat.min(dim=1).values.view(-1, *([1] * (tiles.ndim - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (tiles.ndim - 1)))
    return (tiles - low) / (high - low).clamp(min=1e-8)


def _upscale(image: torch.Tensor, min_side: int) -> torch.Tensor:
    """Nearest-neighbour enlarge so tiny kernels (3x3, 5x5) are visible pixels, not a blur."""
    factor = max(1, math.ceil(min_side / max(1, min(image.shape[-2:]))))
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def kernel_grid(weight: torch.Tensor, min_tile: int = 24) -> torch.Tensor:
    """Conv weights (out, in, k, k) -> uint8 (H, W, 3) image.

    With 3 input channels (conv1) each kernel is shown in colour, the way the
    AlexNet paper shows its 96 first-layer filters; deeper layers have too many
    input channels for colour, so each kernel shows its mean over them.
    """
    weight = weight.detach().float().cpu()
    tiles = weight if weight.shape[1] == 3 else weight.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    tiles = _upscale(_scale_each(tiles), min_tile)
    return _to_uint8_hwc(_grid(tiles))


def feature_map_grid(maps: torch.Tensor, min_tile: int = 32) -> torch.Tensor:
    """Activations (C, H, W) of one image -> uint8 (H', W', 3) grayscale grid, one tile per channel."""
    maps = maps.detach().float().cpu()
    tiles = _upscale(_scale_each(maps.unsqueeze(1)), min_tile).expand(-1, 3, -1, -1)
    return _to_uint8_hwc(_grid(tiles))


def heatmap_rgba(heatmap: torch.Tensor) -> torch.Tensor:
    """A (H, W) map in [0, 1] -> uint8 (H, W, 4) to lay over an image: cold
    places transparent, warm ones from faint yellow to strong red (alpha grows
    with the square, so only the hot spots cover the image)."""
    t = heatmap.detach().float().cpu().clamp(0, 1)
    rgba = torch.stack([torch.ones_like(t), 1 - t, torch.zeros_like(t), 0.8 * t * t], dim=-1)
    return (rgba * 255).round().to(torch.uint8)


def _to_uint8_hwc(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def encode_png(image_hwc) -> bytes:
    """uint8 (H, W, 3 or 4) pixels, a tensor or an array, as PNG bytes."""
    pixels = image_hwc.numpy() if isinstance(image_hwc, torch.Tensor) else image_hwc
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
