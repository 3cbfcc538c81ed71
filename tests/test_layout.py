"""Process layouts: what runs where for a machine, and the split layout served for real."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from service.core.settings import Layout, ServiceConfig
from testkit.images import shape_png


@pytest.mark.parametrize("settings, cores, gpus, expected", [
    ({}, 2, 0, Layout(False, 2, 0, 0)),  # CPU-only: each worker does everything, one per core ...
    ({}, 32, 0, Layout(False, 4, 0, 0)),  # ... up to 4 (each holds the model)
    ({}, 16, 1, Layout(True, 15, 1, 1)),  # a GPU box: every other core serves HTTP
    ({}, 64, 4, Layout(True, 60, 4, 4)),  # one model worker per GPU
    ({"api_workers": 6}, 16, 1, Layout(True, 6, 1, 1)),
    ({"model_workers": 3}, 16, 1, Layout(True, 13, 3, 1)),  # several model workers may share a GPU
    ({"layout": "single"}, 16, 1, Layout(False, 4, 0, 1)),
    ({"layout": "split"}, 2, 0, Layout(True, 1, 1, 0)),  # a CPU box can still be split (for measuring)
    ({"layout": "single", "api_workers": 1}, 2, 0, Layout(False, 1, 0, 0)),
])
def test_layout_follows_the_machine_unless_told(settings, cores, gpus, expected):
    assert Layout.choose(ServiceConfig(**settings), cores=cores, gpus=gpus) == expected


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="LAYOUT"):
        Layout.choose(ServiceConfig(layout="sideways"), cores=2, gpus=0)


@pytest.mark.slow
def test_split_layout_serves_every_endpoint(split_server):
    url = split_server.url
    image = shape_png(4)
    files = [("images", (f"{i}.png", shape_png(i), "image/png")) for i in range(3)]
    classified = httpx.post(f"{url}/classify", files=files, timeout=60)
    assert classified.status_code == 200 and len(classified.json()["predictions"]) == 3
    embedded = httpx.post(f"{url}/embed", json={"images_base64": [base64.b64encode(image).decode()]}, timeout=60)
    assert embedded.status_code == 200 and embedded.json()["dim"] == 256
    maps = httpx.post(f"{url}/feature_maps", files=[("image", ("x.png", image, "image/png"))],
                      data={"layers": '["conv2"]', "format": "stats"}, timeout=60)
    assert maps.status_code == 200 and maps.json()["layers"][0]["shape"] == [64, 16, 16]
    cam = httpx.post(f"{url}/gradcam", files=[("image", ("x.png", image, "image/png"))], timeout=60)
    assert cam.status_code == 200 and cam.json()["layer_map"]["shape"] == [8, 8]
    assert httpx.get(f"{url}/kernels", params={"layer": "conv1"}, timeout=60).headers["content-type"] == "image/png"
    for method in ("gradcam", "occlusion"):
        explained = httpx.post(f"{url}/explain", json={"image_base64": base64.b64encode(image).decode(),
                                                       "method": method}, timeout=60)
        assert explained.status_code == 200 and explained.json()["attribution"]["shape"] == [64, 64], explained.text
    atlas = httpx.get(f"{url}/atlas", params={"layer": "conv1", "channel": 0}, timeout=60)
    assert atlas.status_code == 200 and len(atlas.json()["patches"]) == 9
    described = httpx.get(f"{url}/model", timeout=60).json()
    assert described["layout"] == {"split": True, "api_workers": 2, "model_workers": 1, "gpus": 0}
    assert described["batching"]["batcher"] == "bentoml (model service)" and described["dtype"]


@pytest.mark.slow
def test_split_layout_checks_requests_before_the_model_service(split_server):
    """Typed model errors cannot cross the process boundary; the API worker checks against the
    model's structure first, so bad layers and classes are the same 422s as in one process."""
    data = base64.b64encode(shape_png(0)).decode()
    bad_layer = httpx.post(f"{split_server.url}/feature_maps", json={"image_base64": data, "layers": ["conv9"]},
                           timeout=60)
    assert bad_layer.status_code == 422 and bad_layer.json()["error"] == "unknown_layer"
    bad_class = httpx.post(f"{split_server.url}/gradcam", json={"image_base64": data, "class_index": 99}, timeout=60)
    assert bad_class.status_code == 422 and bad_class.json()["error"] == "class_out_of_range"
    not_conv = httpx.get(f"{split_server.url}/kernels", params={"layer": "fc6"}, timeout=60)
    assert not_conv.status_code == 422 and not_conv.json()["error"] == "unknown_layer"
    big_window = httpx.post(f"{split_server.url}/explain", json={"image_base64": data, "method": "occlusion",
                                                                 "window": 65}, timeout=60)
    assert big_window.status_code == 422 and big_window.json()["error"] == "bad_attribution_parameters"


@pytest.mark.slow
def test_split_layout_answers_like_one_process(split_server, server, served_precision):
    """The same model gives the same probabilities whichever layout serves it (to the precision's
    rounding: the model worker runs its forwards on one thread, the single layout's on every core)."""
    payload = {"images_base64": [base64.b64encode(shape_png(i)).decode() for i in range(4)], "top_k": 3}
    split = httpx.post(f"{split_server.url}/classify", json=payload, timeout=60).json()["predictions"]
    single = httpx.post(f"{server.url}/classify", json=payload, timeout=60).json()["predictions"]
    for a, b in zip(split, single):
        assert [s["index"] for s in a["top_k"]] == [s["index"] for s in b["top_k"]]
        np.testing.assert_allclose([s["probability"] for s in a["top_k"]], [s["probability"] for s in b["top_k"]],
                                   atol=max(1e-4, served_precision.probability_tolerance))


@pytest.mark.slow
def test_the_model_service_is_reachable_only_through_a_private_unix_socket(split_server):
    """The pickles between API and model workers travel over a Unix socket in a directory only the
    serving user can open; no worker listens on TCP but on the public port (inherited from the
    supervisor, which alone keeps two loopback control ports of its own: circus's)."""
    import os
    import stat

    import psutil

    workers = [psutil.Process(pid) for pid in split_server.worker_pids()]
    processes = [psutil.Process(split_server.process.pid), *workers]
    listening = {c.laddr.port for p in workers for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert listening == {split_server.port}
    supervisor = [c.laddr.ip for c in processes[0].net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert set(supervisor) == {"127.0.0.1"}
    sockets = {c.laddr for p in processes for c in p.net_connections("unix") if c.laddr}
    assert sockets, "no Unix socket: the model service must listen on one"
    for path in sockets:
        mode = os.stat(os.path.dirname(path)).st_mode
        assert stat.S_IMODE(mode) & 0o077 == 0, (path, oct(mode))
