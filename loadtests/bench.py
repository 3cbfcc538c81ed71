"""Throughput benchmark: the service against the raw model's ceiling, in one run.

    python -m loadtests.bench                       # presets small and alexnet
    python -m loadtests.bench --presets alexnet --seconds 20

For each preset, on this machine, in this process:
  1. the raw in-process model (Predictor.predict: normalize + forward) at
     batch 1, 8, 32, 64 -- the ceiling is the best of these;
  2. decode + resize + crop per image on real JPEG photos;
  3. the service end to end (`bentoml serve`, HTTP, multipart JPEG) at 1, 8,
     32, 64 concurrent single-image clients: throughput, p50/p95/p99, and the
     mean batch size the server formed (from its /metrics);
  4. service throughput / ceiling.
Weights are random (speed does not depend on them). Results: a table on
stdout, reports/bench.json and reports/bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from loadtests.images import photos
from loadtests.server import ROOT, ServerProcess

BATCH_SIZES = (1, 8, 32, 64)
CONCURRENCY = (1, 8, 32, 64)
# A closed-loop client resends the moment it is answered, so N clients keep N
# images queued: on a 2-core CPU, 64 AlexNet images take 1-1.5 s to drain, and
# BentoML's dispatcher sheds a request once its wait plus the predicted batch
# time passes max_latency_ms. This benchmark measures throughput, so it gives
# the queue room; shedding under overload is measured by the load tests'
# overload scenario with the default budget.
DEFAULT_SERVER_ENV = {"MAX_LATENCY_MS": "3000"}


def raw_throughput(preset: str, seconds_per_size: float = 3.0) -> dict[int, float]:
    from model.checkpoint import Checkpoint, Manifest
    from model.config import get_preset
    from model.inference import Predictor, configure_cpu_threads, pick_device
    from model.network import AlexNet

    spec = get_preset(preset)
    device = pick_device()
    if device.type == "cpu":
        configure_cpu_threads()
    manifest = Manifest(spec.config, preset, [str(i) for i in range(spec.config.num_classes)], spec.preprocessing)
    predictor = Predictor(Checkpoint(AlexNet(spec.config).eval(), manifest, Path(".")), device)
    size = spec.preprocessing.input_size
    results = {}
    for batch in BATCH_SIZES:
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        predictor.predict(images)  # warm-up
        rates = []
        deadline = time.perf_counter() + seconds_per_size
        while time.perf_counter() < deadline or len(rates) < 3:
            start = time.perf_counter()
            predictor.predict(images)
            rates.append(batch / (time.perf_counter() - start))
        results[batch] = statistics.median(rates)
    return results


def preprocess_cost(preset: str) -> dict[str, float]:
    from model.config import get_preset
    from model.preprocess import load_image

    prep = get_preset(preset).preprocessing
    out = {}
    for image in photos((640, 320), ("JPEG",)) + photos((256,), ("PNG",)):
        load_image(image.data, prep)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            load_image(image.data, prep)
            times.append(time.perf_counter() - start)
        out[image.name] = statistics.median(times) * 1000
    return out


def _metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
               or line.startswith(name + " "))


async def _closed_loop(url: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(index: int, session) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < stop:
            body, content_type = bodies[i % len(bodies)]
            i += clients
            start = time.perf_counter()
            async with session.post(f"{url}/classify", data=body, headers={"Content-Type": content_type}) as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"clients": clients, "images_per_s": len(latencies) / elapsed, "errors": errors,
            "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "requests": len(latencies)}


def _multipart(image_bytes: bytes, name: str) -> tuple[bytes, str]:
    boundary = "benchboundary7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image_bytes + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def service_throughput(preset: str, reports: Path, seconds: float, env_overrides: dict[str, str],
                       concurrency: tuple[int, ...] = CONCURRENCY) -> list[dict]:
    import httpx

    from loadtests.__main__ import untrained_checkpoint

    checkpoint = untrained_checkpoint(preset, reports / "models" / preset)
    env = {**os.environ, "CHECKPOINT_DIR": str(checkpoint), "BENTOML_DO_NOT_TRACK": "True", **env_overrides}
    server = ServerProcess(env, reports / f"bench_{preset}_server.log")
    try:
        server.wait_ready(timeout=180)
        bodies = [_multipart(p.data, p.name) for p in photos((640, 320), ("JPEG",))]
        asyncio.run(_closed_loop(server.url, bodies, 4, 2.0))  # warm the connection pool and the server
        rows = []
        for clients in concurrency:
            before = httpx.get(f"{server.url}/metrics").text
            row = asyncio.run(_closed_loop(server.url, bodies, clients, seconds))
            after = httpx.get(f"{server.url}/metrics").text
            batches = _metric_total(after, "cnn_batch_size_count") - _metric_total(before, "cnn_batch_size_count")
            images = _metric_total(after, "cnn_batch_size_sum") - _metric_total(before, "cnn_batch_size_sum")
            row["mean_batch_size"] = images / batches if batches else float("nan")
            rows.append(row)
            print(f"  {preset} service, {clients:3d} clients: {row['images_per_s']:7.1f} img/s, p50 "
                  f"{row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, mean batch {row['mean_batch_size']:.1f}, "
                  f"errors {row['errors']}", flush=True)
        return rows
    finally:
        server.stop()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, p95_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for preset, result in results["presets"].items():
        clients = [row["clients"] for row in result["service"]]
        line, = rate_ax.plot(clients, [row["images_per_s"] for row in result["service"]], marker="o",
                             label=f"{preset} service")
        rate_ax.axhline(result["ceiling_images_per_s"], color=line.get_color(), linestyle="--", alpha=0.6,
                        label=f"{preset} raw ceiling")
        p95_ax.plot(clients, [row["p95_ms"] for row in result["service"]], marker="o", label=preset)
    # Log scales: the presets' rates differ by ~100x, and each must be readable against its ceiling.
    rate_ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="images/s", title="Throughput")
    p95_ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p95 latency (ms)", title="p95 latency")
    for ax in (rate_ax, p95_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="service throughput vs the raw model ceiling")
    parser.add_argument("--presets", nargs="+", default=["small", "alexnet"])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--env", action="append", default=[],
                        help=f"server environment override KEY=VALUE (defaults: {DEFAULT_SERVER_ENV})")
    args = parser.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    overrides = {**DEFAULT_SERVER_ENV, **dict(item.split("=", 1) for item in args.env)}
    results = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch_threads": torch.get_num_threads()},
        "server_env": overrides,
        "presets": {},
    }
    for preset in args.presets:
        print(f"{preset}: raw model", flush=True)
        raw = raw_throughput(preset)
        for batch, rate in raw.items():
            print(f"  batch {batch:3d}: {rate:8.1f} img/s", flush=True)
        preprocess = preprocess_cost(preset)
        jpeg_ms = statistics.median(v for k, v in preprocess.items() if k.endswith(".jpeg"))
        print(f"  decode+preprocess: median {jpeg_ms:.2f} ms per JPEG photo", flush=True)
        service = service_throughput(preset, args.reports, args.seconds, overrides, tuple(args.clients))
        ceiling = max(raw.values())
        for row in service:
            row["ratio_to_ceiling"] = row["images_per_s"] / ceiling
        results["presets"][preset] = {
            "raw_images_per_s": raw, "ceiling_images_per_s": ceiling, "best_batch": max(raw, key=raw.get),
            "preprocess_ms": preprocess, "jpeg_preprocess_median_ms": jpeg_ms, "service": service,
            "single_client_p50_over_batch1_plus_decode": service[0]["p50_ms"] / (1000 / raw[1] + jpeg_ms),
        }
    (args.reports / "bench.json").write_text(json.dumps(results, indent=2))
    plot(results, args.reports / "bench.png")
    print("\npreset    clients  img/s   ratio  p50 ms  p95 ms  p99 ms  batch")
    for preset, result in results["presets"].items():
        for row in result["service"]:
            print(f"{preset:9s} {row['clients']:7d} {row['images_per_s']:6.1f}  {row['ratio_to_ceiling']:5.2f} "
                  f"{row['p50_ms']:7.1f} {row['p95_ms']:7.1f} {row['p99_ms']:7.1f}  {row['mean_batch_size']:5.1f}")
        print(f"{preset:9s} ceiling {result['ceiling_images_per_s']:.1f} img/s at batch {result['best_batch']}; "
              f"1-client p50 / (batch-1 forward + decode) = {result['single_client_p50_over_batch1_plus_decode']:.2f}")
    print(f"\nwrote {args.reports / 'bench.json'} and {args.reports / 'bench.png'}")


if __name__ == "__main__":
    main()
