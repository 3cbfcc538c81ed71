"""GET /atlas: the served model's channel atlas (model.atlas), read from its checkpoint directory.

The files are verified against the manifest's hashes when first read, and the
decoded sprites kept in memory; a model without an atlas answers 404 with the
command that builds one.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from model import atlas as atlas_format
from model.checkpoint import Manifest, read_attached
from model.errors import UnknownLayer
from model.summary import check_channels
from model.visualize import encode_png
from service.core.refusals import Refusal

MIN_SHOWN = 48  # tiles smaller than this (conv1's 5-11 px fields) are enlarged, pixel for pixel


class Atlas:
    def __init__(self, model_path: Path, manifest: Manifest):
        self.path, self.manifest = model_path, manifest
        self._index: dict | None = None
        self._sprites: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return atlas_format.INDEX_FILE in self.manifest.files

    @property
    def index(self) -> dict:
        if not self.available:
            raise Refusal(404, "no_atlas", "this model has no channel atlas: it is built offline from a folder "
                                           "of images (`python -m training atlas RUN_DIR --data DIR`, or "
                                           "`make serve-imagenet ATLAS=DIR`) and registered with the model")
        if self._index is None:
            self._index = json.loads(read_attached(self.path, self.manifest, atlas_format.INDEX_FILE))
        return self._index

    def _layer(self, layer: str) -> dict:
        layers = self.index["layers"]
        if layer not in layers:
            raise UnknownLayer(f"the atlas covers the conv layers {list(layers)}, not {layer!r}")
        return layers[layer]

    def _sprite(self, layer: str) -> np.ndarray:
        with self._lock:
            if layer not in self._sprites:
                data = read_attached(self.path, self.manifest, self._layer(layer)["sprite"])
                self._sprites[layer] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            return self._sprites[layer]

    def summary(self, layer: str) -> dict:
        """Every channel of a layer: its mean activation and its strongest patch's activation and source."""
        entry = self._layer(layer)
        return {
            "layer": layer, "dataset": self.index["dataset"], "images": self.index["images"],
            "receptive_field": entry["receptive_field"], "jump": entry["jump"], "tile": entry["tile"],
            "channels": [{"channel": c["channel"], "mean_activation": c["mean_activation"],
                          "top_activation": c["patches"][0]["activation"] if c["patches"] else 0.0,
                          "top_source": c["patches"][0]["source"] if c["patches"] else None}
                         for c in entry["channels"]],
        }

    def channel(self, layer: str, channel: int) -> dict:
        """One channel's top patches: a PNG grid (best first, row by row) and each patch's metadata."""
        entry = self._layer(layer)
        check_channels(layer, len(entry["channels"]), [channel])
        described = entry["channels"][channel]
        tile = entry["tile"]
        row = self._sprite(layer)[channel * tile:(channel + 1) * tile]
        tiles = [row[:, k * tile:(k + 1) * tile] for k in range(len(described["patches"]))]
        return {"layer": layer, "channel": channel, "dataset": self.index["dataset"],
                "mean_activation": described["mean_activation"], "receptive_field": entry["receptive_field"],
                "tile": tile, "patches": described["patches"],
                "grid_png": base64.b64encode(encode_png(_grid(tiles))).decode()}


def _grid(tiles: list[np.ndarray], columns: int = 3, gap: int = 2) -> np.ndarray:
    """Tiles in rows of `columns`, `gap` white pixels apart, enlarged (nearest) to at least MIN_SHOWN."""
    factor = max(1, math.ceil(MIN_SHOWN / tiles[0].shape[0]))
    tiles = [t.repeat(factor, axis=0).repeat(factor, axis=1) for t in tiles]
    side = tiles[0].shape[0]
    rows = math.ceil(len(tiles) / columns)
    grid = np.full((rows * (side + gap) - gap, columns * (side + gap) - gap, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[r * (side + gap):r * (side + gap) + side, c * (side + gap):c * (side + gap) + side] = tile
    return grid
