"""Triton Inference Server as the benchmark's peer: the same OIP UINT8 requests as loadtests.oip_bench
sends this service, against Triton serving the null model (loadtests/triton_peer_server.py), with
the server's CPU per image measured the same way over its process tree (the pytriton process,
tritonserver and its Python backend stub).

Triton comes from PyPI's nvidia-pytriton, in an environment of its own (`make bench-peers`):
Python 3.12 with libpython3.12.so (with 3.11 its Python backend stub fails), numpy<2. Where that
environment or the server cannot start, the peer is skipped with the reason, never the benchmark.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from testkit.server import ROOT, free_port

PYTHON = ROOT / ".venv" / "peers" / "triton" / "bin" / "python"
SERVER = Path(__file__).with_name("triton_peer_server.py")
SIZE, CLASSES = 64, 12  # the `small` preset's input and the shapes classes (the null model ignores pixels)


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
    """The peer's rows (model "triton-null", path "oip_uint8"), or {"skipped": reason}."""
    import httpx
    import numpy as np

    if not PYTHON.exists():
        return _skip("no Triton environment: `make bench-peers` builds it (Python 3.12 with libpython3.12.so, "
                     "nvidia-pytriton, numpy<2)")
    ports = [free_port() for _ in range(3)]
    log_path = args.reports / "oip_bench_triton.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([str(PYTHON), str(SERVER), *map(str, ports), str(SIZE), str(CLASSES)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}"
    rows = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/v2/models/cnn-classifier/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            told = log_path.read_text(errors="replace")[-1500:]
            return _skip(f"Triton did not start (exit {process.poll()}): {told}")
        infer = f"{url}/v2/models/cnn-classifier/infer"
        print("triton-null: Triton Inference Server (pytriton), the null model", flush=True)
        for per_request in args.per_request:
            # the same pixels as the service gets (the photos, cropped by the client), the same request shape
            ours = request_bodies("oip_uint8", per_request, SIZE, SIZE)
            bodies = [_body(np.frombuffer(body[int(headers["Inference-Header-Content-Length"]):], dtype=np.uint8)
                            .reshape(per_request, SIZE, SIZE, 3)) for body, headers in ours]
            measure(infer, process.pid, bodies, 2, per_request, 1.0)  # warm up
            for clients in args.clients:
                row = measure(infer, process.pid, bodies, clients, per_request, args.seconds)
                row.update(model="triton-null", path="oip_uint8", per_request=per_request)
                rows.append(row)
                print(f"  triton-null oip_uint8 {per_request} img/req {clients:3d} clients: "
                      f"{row['images_per_s']:7.1f} img/s, p50 {row['p50_ms']:6.1f} ms, "
                      f"server {row['cpu_ms_per_image']:.3f} core-ms/img, errors {row['errors']}", flush=True)
        return {"rows": rows}
    finally:
        _stop(process)
        log.close()


def _skip(reason: str) -> dict:
    print(f"triton peer skipped: {reason}", flush=True)
    return {"skipped": reason, "rows": []}


def _stop(process: subprocess.Popen) -> None:
    import os
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
