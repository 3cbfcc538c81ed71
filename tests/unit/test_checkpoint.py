"""Checkpoint round trip, and every way a checkpoint can be broken."""

import json

import pytest
import torch

from model.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from model.config import get_preset
from model.network import AlexNet

CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    preset = get_preset("small")
    model = AlexNet(preset.config).eval()
    save_checkpoint(tmp_path, model, CLASSES, preset.preprocessing, "small", {"dataset": "unit", "metrics": {"test_top1": 0.5}})
    return tmp_path, model


@torch.no_grad()
def test_round_trip_gives_identical_outputs(saved):
    path, model = saved
    checkpoint = load_checkpoint(path)
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(checkpoint.model(x), model(x), rtol=0, atol=0)
    # Built on the meta device and given the file's tensors: every one real, as a fresh network's.
    loaded = checkpoint.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert (loaded[name].device, loaded[name].dtype) == (tensor.device, tensor.dtype), name
    assert all(p.requires_grad for p in checkpoint.model.parameters())
    manifest = checkpoint.manifest
    assert manifest.class_names == CLASSES
    assert manifest.preset == "small"
    assert manifest.preprocessing == get_preset("small").preprocessing
    assert manifest.training["metrics"]["test_top1"] == 0.5


def test_manifest_is_readable_json_with_hash_and_preprocessing(saved):
    path, _ = saved
    data = json.loads((path / MANIFEST_FILE).read_text())
    assert data["format_version"] == 1
    assert len(data["weights_sha256"]) == 64
    assert data["preprocessing"]["input_size"] == 64
    assert data["model_config"]["conv_stages"][0]["kernel"] == 5


def test_save_leaves_no_temporary_files(saved):
    path, _ = saved
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]


def test_tampered_weights_are_detected(saved):
    path, _ = saved
    blob = bytearray((path / WEIGHTS_FILE).read_bytes())
    blob[-10] ^= 0xFF  # flip bits inside a tensor
    (path / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}.*sha256"):
        load_checkpoint(path)


def test_truncated_weights_are_detected(saved):
    path, _ = saved
    blob = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_checkpoint(path)


def test_missing_weights_file_is_named(saved):
    path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: missing"):
        load_checkpoint(path)


def test_missing_manifest_is_named(saved):
    path, _ = saved
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE}: missing"):
        load_checkpoint(path)


def test_corrupt_manifest_json_is_named(saved):
    path, _ = saved
    (path / MANIFEST_FILE).write_text('{"format_version": 1, "pres')
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE}: not valid JSON"):
        load_checkpoint(path)


def test_manifest_config_that_does_not_fit_the_weights(saved):
    path, _ = saved
    data = json.loads((path / MANIFEST_FILE).read_text())
    data["model_config"]["conv_stages"][0]["out_channels"] = 48
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_class_count_must_match_model(saved):
    path, _ = saved
    data = json.loads((path / MANIFEST_FILE).read_text())
    data["class_names"] = data["class_names"][:3]
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="3 class names"):
        load_checkpoint(path)


def test_weights_swapped_from_another_checkpoint(saved, tmp_path_factory):
    path, _ = saved
    other = tmp_path_factory.mktemp("other")
    preset = get_preset("small")
    torch.manual_seed(99)
    save_checkpoint(other, AlexNet(preset.config), CLASSES, preset.preprocessing, "small")
    (path / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path)
