"""The channel atlas: built by its command on generated data, checked against a recomputation,
covered by the manifest's hashes, and served at GET /atlas."""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import pytest
import torch
from PIL import Image

from model.atlas import INDEX_FILE, MAX_TILE, TOP
from model.checkpoint import CheckpointError, load_checkpoint
from model.preprocess import Normalizer
from model.summary import layer_table
from testkit.models import ATLAS_PER_CLASS
from training.shapes import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def index(tiny_run) -> dict:
    return json.loads((tiny_run / INDEX_FILE).read_text())


def test_patches_are_the_receptive_fields_of_the_units_that_fired(tiny_run, index):
    table = {row.name: row for row in layer_table(load_checkpoint(tiny_run).model)}
    assert list(index["layers"]) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for name, entry in index["layers"].items():
        rf = table[name].receptive_field
        assert entry["receptive_field"] == rf and entry["tile"] == min(rf, MAX_TILE)
        sprite = Image.open(tiny_run / entry["sprite"])
        channels = table[name].output_shape[0]
        assert sprite.size == (TOP * entry["tile"], channels * entry["tile"])  # a row of 9 tiles per channel
        for channel in entry["channels"][:4]:
            assert len(channel["patches"]) == TOP
            for patch in channel["patches"]:
                top, left, bottom, right = patch["box"]
                assert bottom - top == right - left == rf
                assert (top, left) == (table[name].rf_offset + patch["row"] * table[name].jump,
                                        table[name].rf_offset + patch["col"] * table[name].jump)


@torch.inference_mode()
def test_top_patch_is_the_channels_highest_activation_in_the_dataset(tiny_run, index):
    """Recomputed here over every image and position: each channel's first patch is its maximum."""
    checkpoint = load_checkpoint(tiny_run)
    images, _ = generate("test", ATLAS_PER_CLASS, 64, seed=0)
    found = checkpoint.model.extract(Normalizer(checkpoint.manifest.preprocessing)(images),
                                     {name: "post_relu" for name in index["layers"]})
    for name, entry in index["layers"].items():
        maps = found[name]  # (N, C, H, W)
        for channel in (0, 5, maps.shape[1] - 1):
            best = entry["channels"][channel]["patches"][0]
            values = maps[:, channel]
            assert best["activation"] == pytest.approx(float(values.max()), rel=1e-4, abs=1e-5)
            image = int(best["source"].rsplit("/", 1)[1])
            assert float(values[image, best["row"], best["col"]]) == pytest.approx(float(values.max()), rel=1e-4)
            activations = [p["activation"] for p in entry["channels"][channel]["patches"]]
            assert activations == sorted(activations, reverse=True)
        means = maps.mean(dim=(0, 2, 3))
        assert entry["channels"][1]["mean_activation"] == pytest.approx(float(means[1]), rel=1e-3, abs=1e-6)


def test_the_atlas_is_covered_by_the_manifests_hashes(tiny_run, tmp_path):
    manifest = load_checkpoint(tiny_run).manifest
    assert INDEX_FILE in manifest.files and "atlas/conv5.png" in manifest.files
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    sprite = copy / "atlas" / "conv3.png"
    blob = bytearray(sprite.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    sprite.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="conv3.png"):
        load_checkpoint(copy)


def test_register_carries_the_atlas_into_the_model_store(registered_model, cli_env, tiny_run):
    from pathlib import Path

    home = Path(cli_env["BENTOML_HOME"])
    (stored,) = home.glob(f"models/cnn-classifier/{registered_model.split(':')[1]}")
    assert (stored / INDEX_FILE).read_bytes() == (tiny_run / INDEX_FILE).read_bytes()
    load_checkpoint(stored)  # every attached file intact there too


def test_atlas_of_a_channel_is_served_with_its_patches(server, index):
    response = httpx.get(f"{server.url}/atlas", params={"layer": "conv2", "channel": 7}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["layer"] == "conv2" and body["channel"] == 7 and body["receptive_field"] == 15
    assert body["patches"] == index["layers"]["conv2"]["channels"][7]["patches"]
    grid = Image.open(io.BytesIO(base64.b64decode(body["grid_png"])))
    assert grid.format == "PNG" and grid.width >= 3 * 48  # 3 x 3 tiles, each enlarged to >= 48 px


def test_atlas_of_a_layer_summarizes_every_channel(server):
    body = httpx.get(f"{server.url}/atlas", params={"layer": "conv5"}, timeout=30).json()
    assert [c["channel"] for c in body["channels"]] == list(range(64))
    assert all(c["top_activation"] >= c["mean_activation"] >= 0 for c in body["channels"])


@pytest.mark.parametrize("params, status, reason", [
    ({"layer": "fc6"}, 422, "unknown_layer"),
    ({"layer": "conv9", "channel": 0}, 422, "unknown_layer"),
    ({"layer": "conv1", "channel": 32}, 422, "channel_out_of_range"),
    ({"layer": "conv1", "channel": "x"}, 400, "invalid_channel"),
])
def test_atlas_refusals(server, params, status, reason):
    response = httpx.get(f"{server.url}/atlas", params=params, timeout=30)
    assert response.status_code == status and response.json()["error"] == reason


def test_a_model_without_an_atlas_answers_404_with_the_reason(cli_env, tiny_run, tmp_path):
    from model.checkpoint import read_manifest, write_manifest
    from testkit.server import start_server

    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    shutil.rmtree(bare / "atlas")
    manifest = read_manifest(bare)
    manifest.files = {}
    write_manifest(bare, manifest)
    server = start_server(cli_env, tmp_path, CHECKPOINT_DIR=str(bare), API_WORKERS="1")
    try:
        response = httpx.get(f"{server.url}/atlas", params={"layer": "conv1", "channel": 0}, timeout=30)
        assert response.status_code == 404
        assert response.json()["error"] == "no_atlas" and "python -m training atlas" in response.json()["detail"]
    finally:
        server.stop()
