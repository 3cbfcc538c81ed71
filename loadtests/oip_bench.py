"""`make bench-oip`: what each way of sending images costs the server, per image.

    python -m loadtests.oip_bench                                   # every model, path, client count, batch
    python -m loadtests.oip_bench --models null --clients 8 --per-request 8 --seconds 4

For each model (the `small` and `torchvision` presets with random weights, and the null model,
NULL_MODEL=1, whose forward costs nothing: the frontend alone), one `bentoml serve` in the single
layout, and against it, closed-loop clients (each resends the moment it is answered) sending
1 or 8 images per request by three paths:
  multipart  POST /classify, JPEG photos as multipart files (top-5 as JSON);
  oip_bytes  POST /v2/models/<name>/infer, the same JPEGs as a BYTES tensor, binary tensor data;
  oip_uint8  the same, the photos already resized and cropped by the client
             (model.client_preprocess) as a UINT8 [N, S, S, 3] tensor: nothing to decode.
Both OIP paths ask for top_k_labels and top_k_scores (k = 5) as binary data, the answer
/classify gives. Reported: images/s, p50/p99 per request, and the server's CPU time per image
over its whole process tree (psutil), the figure that does not depend on the load generator
sharing the machine. A table on stdout and reports/oip_bench.json.

`--precisions fp32 auto` serves each real model once per PRECISION (the null model, which computes
nothing, once); every row says which precision the server computed in (GET /model).

`--peer triton` runs the same OIP UINT8 requests against Triton Inference Server itself
(loadtests.triton_peer), for the null model and the torchvision preset (the same checkpoint, in
fp32 through ONNX Runtime), when it can start here:

    python -m loadtests.oip_bench --models null torchvision --paths oip_uint8 --precisions fp32 auto --peer triton
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import struct
from pathlib import Path

from loadtests.bench import SETTLE_S, closed_loop, cpu_seconds
from testkit.images import photos
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, ServerProcess

PATHS = ("multipart", "oip_bytes", "oip_uint8")
MODELS = {"small": ("small", {}), "torchvision": ("torchvision", {}), "null": ("small", {"NULL_MODEL": "1"})}
SERVER_ENV = {"MAX_LATENCY_MS": "3000", "LAYOUT": "single"}  # throughput, not shedding (as loadtests.bench)


def oip_body(tensor_name: str, datatype: str, shape: list[int], data: bytes) -> tuple[bytes, dict[str, str]]:
    """An OIP inference request with one binary input, asking for the top-5 labels and scores as binary."""
    header = json.dumps({
        "inputs": [{"name": tensor_name, "datatype": datatype, "shape": shape,
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "top_k_labels", "parameters": {"binary_data": True}},
                    {"name": "top_k_scores", "parameters": {"binary_data": True}}],
        "parameters": {"top_k": 5}}).encode()
    return header + data, {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(header))}


def request_bodies(path: str, per_request: int, input_size: int, resize_size: int) -> list[tuple[bytes, dict]]:
    """Bodies for `path`, each with `per_request` photos (cycling through the sample photos)."""
    from urllib3 import encode_multipart_formdata

    from model.client_preprocess import client_pixels

    pictures = photos((640, 320), ("JPEG",))
    bodies = []
    for start in range(len(pictures)):
        chosen = [pictures[(start + i) % len(pictures)] for i in range(per_request)]
        if path == "multipart":
            body, content_type = encode_multipart_formdata([("images", (p.name, p.data, p.content_type))
                                                            for p in chosen])
            bodies.append((body, {"Content-Type": content_type}))
        elif path == "oip_bytes":
            data = b"".join(struct.pack("<I", len(p.data)) + p.data for p in chosen)
            bodies.append(oip_body("images", "BYTES", [per_request], data))
        else:
            pixels = client_pixels([p.data for p in chosen], resize_size, input_size)
            bodies.append(oip_body("pixels", "UINT8", list(pixels.shape), pixels.tobytes()))
    return bodies


def measure(url: str, root_pid: int, bodies, clients: int, per_request: int, seconds: float,
            settle: float = SETTLE_S) -> dict:
    """One closed-loop load, counted after `settle` seconds of it (loadtests.bench.closed_loop)."""
    before: dict = {}
    row = asyncio.run(closed_loop(url, bodies, clients, seconds, settle=settle,
                                  on_start=lambda: before.update(cpu_seconds(root_pid))))
    after = cpu_seconds(root_pid)
    images = max(1, row["requests"] * per_request)
    row["images_per_s"] = row["requests_per_s"] * per_request
    row["cpu_ms_per_image"] = 1000 * sum(after[k] - before[k] for k in after) / images
    return row


def run_model(model: str, args, precision: str | None = None, api_workers: int = 0) -> list[dict]:
    preset, env = MODELS[model]
    checkpoint = untrained_checkpoint(preset, args.reports / "models" / preset)
    server_env = {**os.environ, "CHECKPOINT_DIR": str(checkpoint), "BENTOML_DO_NOT_TRACK": "True", **SERVER_ENV,
                  "MAX_LATENCY_MS": str(args.max_latency_ms), **env, **({"PRECISION": precision} if precision else {}),
                  **({"API_WORKERS": str(api_workers)} if api_workers else {})}
    server = ServerProcess(server_env, args.reports / f"oip_bench_{model}{'_' + precision if precision else ''}"
                                                      f"{f'_w{api_workers}' if api_workers else ''}_server.log")
    rows = []
    try:
        server.wait_ready(timeout=300)
        import httpx

        name = "cnn-classifier"  # a checkpoint directory serves under the store's name (service.oip.app)
        prep = httpx.get(f"{server.url}/v2/models/{name}", timeout=30).json()["parameters"]
        described = httpx.get(f"{server.url}/model", timeout=30).json()
        computed = described.get("precision", {})
        # what the model computes in, and what asked for it ("bf16 (auto)", "fp32 (fp32)"); none for the null model
        served = "-" if env.get("NULL_MODEL") else f"{computed.get('name')} ({computed.get('requested')})"
        workers = described["layout"]["api_workers"]
        for path in args.paths:
            url = f"{server.url}/classify" if path == "multipart" else f"{server.url}/v2/models/{name}/infer"
            for per_request in args.per_request:
                bodies = request_bodies(path, per_request, prep["input_size"], prep["resize_size"])
                asyncio.run(closed_loop(url, bodies, 2, 1.0))  # warm the path
                for clients in args.clients:
                    row = measure(url, server.process.pid, bodies, clients, per_request, args.seconds)
                    row.update(model=model, path=path, per_request=per_request, precision=served,
                               workers=workers)
                    rows.append(row)
                    print(f"  {model:11s} {served:11s} {workers} workers {path:9s} {per_request} img/req "
                          f"{clients:3d} clients: "
                          f"{row['images_per_s']:7.1f} img/s, p50 {row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms,"
                          f" server {row['cpu_ms_per_image']:.3f} core-ms/img, errors {row['errors']}", flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = [("model              precision          workers path       img/req clients    img/s   p50 ms   p99 ms  "
              "core-ms/img  errors")]
    for r in rows:
        lines.append(f"{r['model']:18s} {r.get('precision', '-'):18s} {str(r.get('workers', '-')):7s} {r['path']:10s} "
                     f"{r['per_request']:7d} {r['clients']:7d} "
                     f"{r['images_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['cpu_ms_per_image']:12.3f} "
                     f"{r['errors']:7d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="server CPU per image: multipart JPEG, OIP BYTES, OIP UINT8")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=4.0, help="per cell")
    parser.add_argument("--precisions", nargs="+", choices=["auto", "fp32", "bf16"],
                        help="serve each real model once per PRECISION (default: the environment's, else auto)")
    parser.add_argument("--max-latency-ms", type=int, default=int(SERVER_ENV["MAX_LATENCY_MS"]),
                        help="the service's latency budget: high enough that it admits every request (a slow "
                             "model at 32 clients x 8 images queues for seconds; Triton queues without limit)")
    parser.add_argument("--api-workers", type=int, nargs="+", default=[0],
                        help="serve each real model once per API worker count (0: the layout's default, one per core)")
    parser.add_argument("--peer", choices=["triton"], help="also run OIP UINT8 against Triton itself")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
               "server_env": {**SERVER_ENV, "MAX_LATENCY_MS": str(args.max_latency_ms)}, "rows": []}
    for model in args.models:
        for precision in (args.precisions or [None])[:1 if MODELS[model][1].get("NULL_MODEL") else None]:
            print(f"{model}: this service{f', PRECISION={precision}' if precision else ''}", flush=True)
            for api_workers in args.api_workers[:1 if MODELS[model][1].get("NULL_MODEL") else None]:
                results["rows"] += run_model(model, args, precision, api_workers)
    if args.peer == "triton":
        from loadtests import triton_peer

        results["triton"] = triton_peer.run(args, request_bodies, measure)
    (args.reports / "oip_bench.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results["rows"] + results.get("triton", {}).get("rows", [])))
    print(f"\nwrote {args.reports / 'oip_bench.json'}")


if __name__ == "__main__":
    main()
