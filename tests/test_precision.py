"""Serving precision: what `auto` picks and why, the folded serving network, and the agreement guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import precision
from model.checkpoint import Checkpoint, Manifest, load_checkpoint
from model.config import get_preset
from model.inference import Predictor
from model.network import AlexNet
from model.optimize import PackedLinear, inference_model
from model.preprocess import Normalizer

CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_the_kernel():
    assert "sse2" in precision.cpu_flags() or not Path("/proc/cpuinfo").exists()


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16"}, "bf16"),  # AVX-512 BF16 (e.g. AMD Zen 4, Intel Cooper Lake)
    ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # AMX (Intel Sapphire Rapids)
    ({"avx2", "avx512f"}, "fp32"),  # no bf16 instructions: torch would emulate it, slower than fp32
    (set(), "fp32"),
])
def test_auto_picks_bf16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    chosen = precision.resolve("auto", CPU)
    assert chosen.name == expected and chosen.requested == "auto" and chosen.reason


def test_auto_refuses_a_precision_recorded_below_the_agreement_target(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    poor = {"bf16": {"images": 1000, "top1_agreement": 0.99, "max_probability_difference": 0.2}}
    good = {"bf16": {"images": 1000, "top1_agreement": 0.999, "max_probability_difference": 0.01}}
    assert precision.resolve("auto", CPU, poor).name == "fp32"
    assert "99.00%" in precision.resolve("auto", CPU, poor).reason
    assert precision.resolve("auto", CPU, good).name == "bf16"


def test_forced_precisions_and_refusals(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert precision.resolve("fp32", CPU).dtype == torch.float32
    assert precision.resolve("BF16", CPU).dtype == torch.bfloat16
    with pytest.raises(precision.PrecisionError, match="fp16 is for GPUs"):
        precision.resolve("fp16", CPU)
    with pytest.raises(precision.PrecisionError, match="auto, fp32, bf16 or fp16"):
        precision.resolve("int4", CPU)


def _random_checkpoint(preset: str) -> Checkpoint:
    torch.manual_seed(0)
    spec = get_preset(preset)
    net = AlexNet(spec.config)
    for module in net.modules():  # BatchNorm statistics far from the identity, so folding them shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    manifest = Manifest(spec.config, preset, [str(i) for i in range(spec.config.num_classes)], spec.preprocessing)
    return Checkpoint(net.eval(), manifest, Path("."))


@pytest.mark.parametrize("preset", ["small", "cifar", "torchvision", "alexnet"])
def test_folded_serving_network_computes_the_trained_function(preset):
    """BatchNorm folded into the convs and normalization into conv1 (with its zero padding corrected
    on the border ring): in fp32 the serving network's conv1 maps and logits equal the original's."""
    checkpoint = _random_checkpoint(preset)
    prep = checkpoint.manifest.preprocessing
    fast = inference_model(checkpoint.model, prep, torch.float32, CPU, compile_lrn=False)
    pixels = torch.randint(0, 256, (2, 3, prep.input_size, prep.input_size), dtype=torch.uint8)
    requests = {"conv1": "pre_relu", checkpoint.model.logits_layer: "post_relu"}
    with torch.inference_mode():
        expected = checkpoint.model.extract(Normalizer(prep)(pixels), requests)
        got = fast.extract(pixels.float(), requests)
    for name in requests:  # relative to each map's largest value
        scale = expected[name].abs().max()
        torch.testing.assert_close(got[name] / scale, expected[name] / scale, atol=1e-5, rtol=0)
    # Without the padding correction the border ring would be off by far more (every window there
    # overlaps the padding); the interior would still match.
    uncorrected = fast.conv1.conv(pixels.float())
    scale = expected["conv1"].abs().max()
    ring_error = (uncorrected[:, :, 0, :] - expected["conv1"][:, :, 0, :]).abs().max() / scale
    interior = (uncorrected[:, :, 1:-1, 1:-1] - expected["conv1"][:, :, 1:-1, 1:-1]).abs().max() / scale
    assert ring_error > 1e-3 and interior < 1e-5


@pytest.mark.skipif(not PackedLinear.available(), reason="this torch has no MKL packed GEMM")
def test_packed_fully_connected_layers_compute_what_the_linear_layers_do():
    """fp32 on a CPU: the head's weights are packed for the full batch and half of it, shared with the
    reference network (no second copy); every batch size gives nn.Linear's numbers -- padded up to a
    packed size (a quarter of it or more), exactly a packed size, or unpacked (smaller, larger)."""
    checkpoint = _random_checkpoint("small")
    prep = checkpoint.manifest.preprocessing
    fast = inference_model(checkpoint.model, prep, torch.float32, CPU, compile_lrn=False, full_batch=8)
    fc6 = fast.fc6
    assert isinstance(fc6, PackedLinear) and sorted(fc6.packed) == [4, 8]
    assert fc6.weight.data_ptr() == checkpoint.model.fc6.weight.data_ptr()
    assert not isinstance(inference_model(checkpoint.model, prep, torch.bfloat16, CPU, compile_lrn=False,
                                          full_batch=8).fc6, PackedLinear)  # MKL packs fp32 only
    for rows in (1, 2, 3, 4, 5, 8, 9, 20):
        x = torch.randn(rows, checkpoint.model.fc6.in_features)
        with torch.inference_mode():
            torch.testing.assert_close(fc6(x), checkpoint.model.fc6(x), atol=1e-5, rtol=1e-5)
    plain = inference_model(checkpoint.model, prep, torch.float32, CPU, compile_lrn=False)
    assert isinstance(plain.fc6, torch.nn.Linear)  # no full batch given: nothing packed
    pixels = torch.randint(0, 256, (6, 3, prep.input_size, prep.input_size), dtype=torch.float32)
    logits = checkpoint.model.logits_layer
    with torch.inference_mode():
        torch.testing.assert_close(fast.extract(pixels, {logits: "post_relu"})[logits],
                                   plain.extract(pixels, {logits: "post_relu"})[logits], atol=1e-5, rtol=1e-5)


def test_predictor_returns_float32_whatever_it_computes_in():
    checkpoint = _random_checkpoint("small")
    predictor = Predictor(checkpoint, CPU, "bf16")
    assert next(predictor.model.parameters()).dtype == torch.bfloat16
    assert next(predictor.reference.parameters()).dtype == torch.float32  # gradients stay exact
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    out = predictor.predict(images)
    assert out.probabilities.dtype == out.embeddings.dtype == torch.float32
    torch.testing.assert_close(out.probabilities.sum(dim=1), torch.ones(3))
    maps = predictor.activations(images[0], ["conv1", "fc7"], "post_relu")
    assert maps["conv1"].dtype == torch.float32 and maps["fc7"].shape == (256,)


@pytest.mark.slow
def test_training_records_agreement_and_auto_follows_it(tiny_run, run_cli):
    """Training measures each reduced precision against fp32 on its test split (generated shapes)
    and keeps the figures; `auto` serves bf16 only when they reach the target (99.5% top-1).

    The tiny 4-epoch model is a weak one (~30-45% accuracy), whose near-tied classes a bf16
    rounding can flip: it agrees on about 99% and so is served in fp32 -- the guard at work. The
    probabilities themselves stay within a hundredth of fp32's."""
    manifest = load_checkpoint(tiny_run).manifest
    figures = manifest.training["precision_agreement"]
    bf16 = figures["bf16"]
    assert bf16["images"] == 12 * 24  # the tiny run's test split: a quarter of 96 per class
    assert 0.9 <= bf16["top1_agreement"] <= 1.0
    assert bf16["max_probability_difference"] < 0.05
    served = precision.resolve("auto", CPU, figures)
    native = "bf16" in precision.native_precisions(CPU)
    meets_target = bf16["top1_agreement"] >= precision.MIN_TOP1_AGREEMENT
    assert served.name == ("bf16" if native and meets_target else "fp32"), served
    result = run_cli("training", "evaluate", str(tiny_run), "--data", "shapes", "--shapes-per-class", "96")
    assert f"bf16: top-1 agrees with fp32 on {bf16['top1_agreement']:.2%} of 288 images" in result.stdout


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_test_time_flip_answers_the_mean_of_the_image_and_its_mirror(dtype):
    """The cifar preset serves with a test-time flip: its answer (probabilities and embedding) is the
    same for an image and for its mirror image, and equals the softmax of the two views' mean logits,
    which the evaluation that records the checkpoint's accuracy computes too."""
    from training.data import Split
    from training.evaluate import evaluate

    if dtype == "bf16" and "bf16" not in precision.native_precisions(CPU):
        pytest.skip("this CPU does not compute bf16 natively")
    checkpoint = _random_checkpoint("cifar")
    assert checkpoint.model.config.test_time_flip
    with torch.no_grad():  # an untrained net's logits are mostly its biases; without them they follow the image
        for name, layer in checkpoint.model.named_layers.items():
            if layer.kind == "fc":
                getattr(checkpoint.model, name).bias.zero_()
        getattr(checkpoint.model, checkpoint.model.logits_layer).weight.mul_(20)
    predictor = Predictor(checkpoint, CPU, dtype)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    images[:, :, :, :12] //= 4  # a dark left side: an image unlike its mirror
    out, mirrored = predictor.predict(images), predictor.predict(images.flip(-1))
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == "fp32" else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.probabilities, mirrored.probabilities, **tolerance)
    torch.testing.assert_close(out.embeddings, mirrored.embeddings, **tolerance)

    inputs = Normalizer(checkpoint.manifest.preprocessing)(images)
    with torch.no_grad():
        views = checkpoint.model(inputs), checkpoint.model(inputs.flip(-1))
    mean_logits = (views[0] + views[1]) / 2
    torch.testing.assert_close(out.probabilities, mean_logits.softmax(1), **tolerance)
    if dtype == "fp32":  # the two views differ by far more than the tolerance: the mean is no single view
        assert (out.probabilities - views[0].softmax(1)).abs().max() > 50 * tolerance["atol"]

    labels = mean_logits.argmax(1)
    result = evaluate(checkpoint.model, Split(images, labels), Normalizer(checkpoint.manifest.preprocessing), 10, CPU)
    assert result.top1 == 1.0  # scored on the mean of the two views, as served
    expected_loss = torch.nn.functional.cross_entropy(mean_logits, labels).item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-4)


def test_a_model_without_test_time_flip_answers_its_single_view():
    checkpoint = _random_checkpoint("small")
    assert not checkpoint.model.config.test_time_flip
    predictor = Predictor(checkpoint, CPU, "fp32")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = checkpoint.model(Normalizer(checkpoint.manifest.preprocessing)(images))
    torch.testing.assert_close(predictor.predict(images).probabilities, logits.softmax(1), atol=1e-5, rtol=1e-5)
