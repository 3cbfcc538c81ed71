"""On a CUDA machine: the model in every precision, feature maps, Grad-CAM, GPU decoding, the GPU
memory gauges and a served request. Skipped, with the reason, where there is no GPU (`make gpu-check`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
CUDA = torch.device("cuda")


def _checkpoint(preset: str):
    from model.checkpoint import Checkpoint, Manifest
    from model.config import get_preset
    from model.network import AlexNet

    torch.manual_seed(0)
    spec = get_preset(preset)
    manifest = Manifest(spec.config, preset, [str(i) for i in range(spec.config.num_classes)], spec.preprocessing)
    return Checkpoint(AlexNet(spec.config).eval(), manifest, Path("."))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("preset", ["small", "alexnet"])
def test_model_on_the_gpu_in_each_precision(preset, precision):
    from model.attribution import AttributionRequest
    from model.inference import Predictor

    size = 64 if preset == "small" else 224
    images = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    reference = Predictor(_checkpoint(preset), torch.device("cpu"), "fp32").predict(images)
    predictor = Predictor(_checkpoint(preset), CUDA, precision)
    out = predictor.predict(images)
    assert out.probabilities.dtype == torch.float32 and out.probabilities.device.type == "cpu"
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(out.probabilities, reference.probabilities, atol=tolerance, rtol=0)
    maps = predictor.activations(images[0], ["conv1", "conv5"], "pre_relu")
    assert maps["conv1"].dtype == torch.float32 and maps["conv5"].dim() == 3
    cam = predictor.explain(images[0], AttributionRequest("gradcam", layer="conv5"))
    assert torch.isfinite(cam.layer_map).all() and 0 <= cam.probability <= 1


def test_jpegs_decode_on_the_gpu_to_the_cpu_pixels():
    import anyio
    from PIL import Image

    from model.config import get_preset
    from model.preprocess import DecodeLimits, load_pixels
    from service.runtime.decoding import Decoder
    from testkit.images import photos

    class Timer:
        def observe(self, seconds):
            pass

    prep = get_preset("torchvision").preprocessing
    jpegs = [p.data for p in photos((640, 320), ("JPEG",))]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, format="PNG")  # a PNG among them: the CPU path
    payloads = jpegs + [buffer.getvalue()]
    decoded = anyio.run(Decoder(prep, DecodeLimits(), CUDA).decode, payloads, Timer())
    for data, pixels in zip(payloads, decoded):
        expected = load_pixels(data, prep).astype(np.int16)
        difference = np.abs(pixels.astype(np.int16) - expected)
        assert difference.mean() < 3, difference.mean()  # JPEG decoders round differently (IDCT, upsampling)


@pytest.fixture(scope="module")
def gpu_server(cli_env, registered_model, tmp_path_factory):
    from testkit.server import start_server

    server = start_server(cli_env, tmp_path_factory.mktemp("gpu"), DEVICE="cuda")
    yield server
    server.stop()


def test_served_on_the_gpu_end_to_end_with_memory_gauges(gpu_server):
    import httpx

    from testkit.images import shape_png
    from testkit.metrics import metric_samples, metric_sum

    files = [("images", (f"{i}.png", shape_png(i), "image/png")) for i in range(4)]
    response = httpx.post(f"{gpu_server.url}/classify", files=files, timeout=60)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 4
    described = httpx.get(f"{gpu_server.url}/model", timeout=60).json()
    assert described["device"].startswith("cuda") and described["layout"]["split"] is True
    samples = metric_samples(gpu_server.url)
    assert metric_sum(samples, "cnn_gpu_memory_allocated_bytes") > 0
    assert metric_sum(samples, "cnn_gpu_memory_total_bytes") > metric_sum(samples, "cnn_gpu_memory_reserved_bytes") > 0
