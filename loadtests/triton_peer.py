"""Triton Inference Server as the benchmark's peer: the same OIP UINT8 requests as loadtests.oip_bench
sends this service, against Triton (loadtests/triton_peer_server.py) serving
  - the null model (model "triton-null"): uniform probabilities, no forward pass;
  - the `torchvision` preset's network (model "triton-torchvision"): the very checkpoint the service
    serves in the same run, exported to ONNX by this project's environment and run by ONNX Runtime's
    CPU provider in fp32 (it has no bf16 convolution) inside pytriton's inference callable;
with the server's CPU per image measured the same way over its process tree (the pytriton process,
tritonserver and its Python backend stub).

Triton comes from PyPI's nvidia-pytriton, in an environment of its own (`make bench-peers`):
Python 3.12 with libpython3.12.so (with 3.11 its Python backend stub fails), numpy<2, onnxruntime.
The export runs in this project's environment (torch) with the `onnx` package from a directory of
its own on PYTHONPATH (`make bench-peers` installs it there; the project does not depend on it):

    PYTHONPATH=.venv/peers/onnx-export python -m loadtests.triton_peer export

Where an environment, the export or the server cannot start, that peer is skipped with the reason,
never the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from testkit.server import ROOT, free_port

PYTHON = ROOT / ".venv" / "peers" / "triton" / "bin" / "python"
ONNX_PACKAGES = ROOT / ".venv" / "peers" / "onnx-export"  # `onnx` for torch.onnx.export, outside the project
SERVER = Path(__file__).with_name("triton_peer_server.py")
NULL_SIZE, NULL_CLASSES = 64, 12  # the `small` preset's input and the shapes classes (the null model ignores pixels)
TOP_K = 5
THREADS = os.cpu_count() or 1  # ONNX Runtime's intra-op threads: the cores, as torch has in the service
MAX_BATCH = 32  # Triton's dynamic batcher for the network: the service's MAX_BATCH_SIZE (images)


class PeerNetwork(nn.Module):
    """What the peer computes, as one graph: the service's OIP `pixels` input (uint8 [N, S, S, 3], RGB,
    channels-last) -> (x - 255 mean) / (255 std) per channel (model.preprocess.Normalizer) -> the
    network as trained, fp32 -> softmax -> the top-k scores and class indices."""

    def __init__(self, net: nn.Module, prep, k: int = TOP_K):
        super().__init__()
        self.net = net
        self.k = k
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (pixels.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        return self.net(x).softmax(dim=1).topk(self.k, dim=1)


def onnx_paths(reports: Path, preset: str = "torchvision") -> tuple[Path, Path]:
    """The exported graph and its description (classes, input size, the checkpoint's weights sha256)."""
    return reports / "peers" / f"{preset}.onnx", reports / "peers" / f"{preset}.json"


def export_onnx(checkpoint: Path, out: Path, meta: Path) -> None:
    """PeerNetwork of `checkpoint` -> ONNX (opset 17, any batch size), in this project's environment."""
    import warnings

    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    prep = loaded.manifest.preprocessing
    module = PeerNetwork(loaded.model.float().eval(), prep).eval()
    example = torch.zeros(1, prep.input_size, prep.input_size, 3, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (the new one needs onnxscript)
        torch.onnx.export(module, (example,), str(partial), dynamo=False, opset_version=17,
                          input_names=["pixels"], output_names=["top_k_scores", "top_k_indices"],
                          dynamic_axes={"pixels": {0: "batch"}, "top_k_scores": {0: "batch"},
                                        "top_k_indices": {0: "batch"}})
    os.replace(partial, out)
    meta.write_text(json.dumps({"preset": loaded.manifest.preset, "classes": list(loaded.manifest.class_names),
                                "input_size": prep.input_size, "resize_size": prep.resize_size,
                                "weights_sha256": loaded.manifest.weights_sha256, "top_k": TOP_K,
                                "dtype": "float32"}, indent=1))


def up_to_date(checkpoint: Path, out: Path, meta: Path) -> bool:
    """Whether `out` is the export of these very weights."""
    from model.checkpoint import read_manifest

    return out.exists() and meta.exists() and \
        json.loads(meta.read_text()).get("weights_sha256") == read_manifest(checkpoint).weights_sha256


def ensure_onnx(checkpoint: Path, reports: Path) -> tuple[Path, dict] | str:
    """The exported graph of `checkpoint` (exported now, in a child process of this environment with
    `onnx` on its path, unless already there for the same weights), or why there is none."""
    from model.checkpoint import read_manifest

    out, meta = onnx_paths(reports, read_manifest(checkpoint).preset)
    if not up_to_date(checkpoint, out, meta):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ONNX_PACKAGES),
                                                                          os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, "-m", "loadtests.triton_peer", "export", "--checkpoint",
                               str(checkpoint), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            return f"the ONNX export failed (`make bench-peers` installs `onnx` in {ONNX_PACKAGES}): " \
                   f"{done.stderr.strip()[-800:]}"
    return out, json.loads(meta.read_text())


def _body(pixels) -> tuple[bytes, dict[str, str]]:
    """The service's OIP UINT8 request, without its `top_k` parameter (Triton's outputs are the top 5)."""
    header = json.dumps({
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes}}],
        "outputs": [{"name": "top_k_labels", "parameters": {"binary_data": True}},
                    {"name": "top_k_scores", "parameters": {"binary_data": True}}]}).encode()
    return header + pixels.tobytes(), {"Content-Type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(header))}


def run(args, request_bodies, measure) -> dict:
    """The peers' rows (models "triton-null", "triton-torchvision"; path "oip_uint8") for the models in
    args.models that have a peer, and {"skipped": {model: reason}} for those that could not run."""
    from testkit.models import untrained_checkpoint

    result: dict = {"rows": [], "skipped": {}}
    for model in args.models:
        if model == "null":
            told = _serve(args, "triton-null", [str(NULL_SIZE), str(NULL_CLASSES)], NULL_SIZE, NULL_SIZE,
                          request_bodies, measure, result["rows"])
        elif model == "torchvision":
            if not PYTHON.exists():
                told = _no_environment()
            else:
                exported = ensure_onnx(untrained_checkpoint("torchvision", args.reports / "models" / "torchvision"),
                                       args.reports)
                if isinstance(exported, str):
                    told = exported
                else:
                    path, meta = exported
                    told = _serve(args, "triton-torchvision",
                                  [str(meta["input_size"]), str(len(meta["classes"])), "--onnx", str(path),
                                   "--threads", str(THREADS), "--max-batch", str(MAX_BATCH)],
                                  meta["input_size"], meta["resize_size"], request_bodies, measure, result["rows"])
        else:
            told = "no Triton peer for this model (the null model and the torchvision preset have one)"
        if told:
            print(f"triton peer {model} skipped: {told}", flush=True)
            result["skipped"][model] = told
    return result


def _no_environment() -> str:
    return ("no Triton environment: `make bench-peers` builds it (Python 3.12 with libpython3.12.so, "
            "nvidia-pytriton, numpy<2, onnxruntime)")


def _serve(args, name: str, server_args: list[str], size: int, resize: int, request_bodies, measure,
           rows: list) -> str | None:
    """Start the peer, measure it into `rows`; None, or why it could not run."""
    import httpx
    import numpy as np

    if not PYTHON.exists():
        return _no_environment()
    ports = [free_port() for _ in range(3)]
    log_path = args.reports / f"oip_bench_{name}.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([str(PYTHON), str(SERVER), *map(str, ports), *server_args],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}"
    precision = "fp32 (onnxruntime)" if "--onnx" in server_args else "-"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/v2/models/cnn-classifier/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            told = log_path.read_text(errors="replace")[-1500:]
            return f"Triton did not start (exit {process.poll()}): {told}"
        infer = f"{url}/v2/models/cnn-classifier/infer"
        print(f"{name}: Triton Inference Server (pytriton), {precision}", flush=True)
        for per_request in args.per_request:
            # the same pixels as the service gets (the photos, cropped by the client), the same request shape
            ours = request_bodies("oip_uint8", per_request, size, resize)
            bodies = [_body(np.frombuffer(body[int(headers["Inference-Header-Content-Length"]):], dtype=np.uint8)
                            .reshape(per_request, size, size, 3)) for body, headers in ours]
            measure(infer, process.pid, bodies, 2, per_request, 1.0)  # warm up
            for clients in args.clients:
                row = measure(infer, process.pid, bodies, clients, per_request, args.seconds)
                row.update(model=name, path="oip_uint8", per_request=per_request, precision=precision)
                rows.append(row)
                print(f"  {name} oip_uint8 {per_request} img/req {clients:3d} clients: "
                      f"{row['images_per_s']:7.1f} img/s, p50 {row['p50_ms']:6.1f} ms, "
                      f"server {row['cpu_ms_per_image']:.3f} core-ms/img, errors {row['errors']}", flush=True)
        return None
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="export the Triton peer's network to ONNX")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--checkpoint", type=Path, help="default: the benchmark's untrained torchvision checkpoint")
    parser.add_argument("--out", type=Path, help="default: reports/peers/<preset>.onnx")
    args = parser.parse_args()
    from model.checkpoint import read_manifest
    from testkit.models import untrained_checkpoint

    checkpoint = args.checkpoint or untrained_checkpoint("torchvision", ROOT / "reports" / "models" / "torchvision")
    out = args.out or onnx_paths(ROOT / "reports", read_manifest(checkpoint).preset)[0]
    if up_to_date(checkpoint, out, out.with_suffix(".json")):
        print(f"{out}: up to date (the export of {checkpoint})")
        return
    export_onnx(checkpoint, out, out.with_suffix(".json"))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
