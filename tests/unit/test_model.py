"""The network, its presets and the layer table."""

import json
import subprocess
import sys

import pytest
import torch
import torchvision

from model.config import PRESETS, get_preset
from model.network import AlexNet
from model.summary import layer_table
from model.torchvision_import import convert_state_dict, imagenet_class_names, import_torchvision_weights
from model.checkpoint import load_checkpoint


def rows_by_name(preset: str) -> dict:
    return {row.name: row for row in layer_table(AlexNet(get_preset(preset).config))}


def test_alexnet_layer_sizes_match_lecture_figure():
    rows = rows_by_name("alexnet")
    expected = {
        "input": 150_528,  # 224 x 224 x 3
        "conv1": 290_400,  # 55 x 55 x 96: the figure's 253,440 is an erratum
        "conv2": 186_624,  # 27 x 27 x 256
        "conv3": 64_896,  # 13 x 13 x 384
        "conv4": 64_896,
        "conv5": 43_264,  # 13 x 13 x 256
        "fc6": 4096,
        "fc7": 4096,
        "fc8": 1000,
    }
    assert {name: rows[name].output_values for name in expected} == expected
    assert rows["conv1"].output_shape == (96, 55, 55)
    assert rows["pool5"].output_shape == (256, 6, 6)


def test_lecture_figure_253440_cannot_be_a_55x55_layer():
    # 253,440 / (55 * 55) is not a whole number of channels.
    assert 253_440 % (55 * 55) != 0
    assert rows_by_name("alexnet")["conv1"].output_values == 55 * 55 * 96


def test_receptive_field_and_jump_follow_the_sliding_window_arithmetic():
    rows = rows_by_name("alexnet")
    assert (rows["conv1"].receptive_field, rows["conv1"].jump) == (11, 4)
    assert (rows["pool1"].receptive_field, rows["pool1"].jump) == (11 + 2 * 4, 8)
    assert (rows["conv2"].receptive_field, rows["conv2"].jump) == (19 + 4 * 8, 8)
    assert rows["fc6"].receptive_field == 224


def test_layer_table_counts_parameters_and_mult_adds():
    rows = rows_by_name("torchvision")
    total = sum(r.params for r in rows.values())
    assert total == sum(p.numel() for p in torchvision.models.alexnet().parameters()) == 61_100_840
    conv1 = rows["conv1"]
    assert conv1.params == 64 * 3 * 11 * 11 + 64
    assert conv1.mult_adds == 64 * 55 * 55 * 3 * 11 * 11


def test_layers_are_addressable_by_paper_names():
    model = AlexNet(get_preset("alexnet").config)
    assert list(model.named_layers) == [
        "conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8",
    ]
    assert model.embedding_layer == "fc7" and model.logits_layer == "fc8"
    assert "conv1.weight" in model.state_dict()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_forward(preset):
    config = get_preset(preset).config
    model = AlexNet(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, config.input_size, config.input_size))
    assert out.shape == (2, config.num_classes)


@torch.no_grad()
def test_extract_returns_pre_and_post_relu_activations():
    torch.manual_seed(0)
    model = AlexNet(get_preset("small").config).eval()
    x = torch.randn(1, 3, 64, 64)
    pre = model.extract(x, {"conv3": "pre_relu"})["conv3"]
    post = model.extract(x, {"conv3": "post_relu"})["conv3"]
    assert (pre < 0).any()
    torch.testing.assert_close(post, torch.relu(pre))
    logits = model.extract(x, {"fc8": "post_relu"})["fc8"]
    torch.testing.assert_close(logits, model(x))


def test_extract_rejects_unknown_layer():
    model = AlexNet(get_preset("small").config)
    with pytest.raises(KeyError, match="conv1"):
        model.extract(torch.zeros(1, 3, 64, 64), {"conv9": "post_relu"})


@torch.no_grad()
def test_torchvision_weights_give_identical_logits():
    torch.manual_seed(0)
    reference = torchvision.models.alexnet().eval()
    ours = AlexNet(get_preset("torchvision").config).eval()
    ours.load_state_dict(convert_state_dict(reference.state_dict()))
    x = torch.randn(4, 3, 224, 224)
    assert (ours(x) - reference(x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_import_torchvision_pth_writes_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.alexnet().eval()
    pth = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), pth)
    import_torchvision_weights(pth, tmp_path / "ckpt")
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.manifest.class_names == imagenet_class_names()
    assert len(checkpoint.manifest.class_names) == 1000
    x = torch.randn(2, 3, 224, 224)
    assert (checkpoint.model(x) - reference(x)).abs().max().item() <= 1e-5


def test_import_refuses_pickled_objects(tmp_path):
    pth = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "note": object()}, pth)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        import_torchvision_weights(pth, tmp_path / "out")


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_summary_command_prints_the_alexnet_table():
    result = run_module("model", "summary", "--preset", "alexnet")
    assert result.returncode == 0, result.stderr
    for figure in ("150,528", "290,400", "186,624", "64,896", "43,264", "4,096", "1,000"):
        assert figure in result.stdout
    assert "96x55x55" in result.stdout


def test_summary_command_json():
    result = run_module("model", "summary", "--preset", "small", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[1]["name"] == "conv1" and rows[1]["output_shape"] == [32, 32, 32]
