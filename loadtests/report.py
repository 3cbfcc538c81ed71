"""How much one instance takes within the latency budget: a capacity report (`make report`).

    python -m loadtests.report [--url URL | --preset small] [--clients 1 2 4 ... 64] [--images 1 8]
                               [--seconds 10] [--settle 3] [--budget-ms 1000] [--out reports/capacity]

Sweeps concurrency (closed-loop clients that send their next request as soon as the last returned)
and images per request against a server it starts (an untrained checkpoint of `--preset`: for
capacity, not answers) or an existing one (`--url`). Each step runs `--settle` seconds uncounted, then
`--seconds` counted: per step the throughput, p50/p90/p95/p99 of the accepted requests, the share of
503s, the server-side breakdown (service.core.timeline's stages, from /metrics deltas: seconds per
request), the achieved batch size, and -- for a server it started -- the server's CPU per image over
its process tree and its memory. Writes capacity.csv, capacity.md and two plots (throughput against
p95 with the budget and the knee marked; the breakdown per step), and names the highest throughput
whose p99 stays within the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
from pathlib import Path

from loadtests.bench import closed_loop, cpu_seconds, multipart_bodies
from service.core.timeline import STAGES
from testkit.metrics import metric_samples, metric_sum
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, ServerProcess

COLUMNS = ("clients", "images_per_request", "images_per_s", "requests_per_s", "p50_ms", "p90_ms", "p95_ms",
           "p99_ms", "share_503", "mean_batch_size", "server_cpu_ms_per_image", "server_rss_mb",
           *(f"{stage}_ms" for stage in STAGES), "within_budget")


def rss_mb(root_pid: int) -> float:
    import psutil

    root = psutil.Process(root_pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def step(url: str, pid: int | None, bodies, clients: int, images: int, seconds: float, settle: float,
         budget_ms: float) -> dict:
    """One stabilised window: the load, and the server's side of it from /metrics (and psutil)."""
    before: dict = {}

    def mark() -> None:
        before["metrics"] = metric_samples(url)
        if pid is not None:
            before["cpu"] = sum(cpu_seconds(pid).values())

    row = asyncio.run(closed_loop(f"{url}/classify", bodies, clients, seconds, images, settle, mark))
    after = metric_samples(url)

    def delta(name: str, **labels) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before["metrics"], name, **labels)

    requests = delta("cnn_request_duration_seconds_count", endpoint="classify")
    answered = sum(row["statuses"].values())
    out = {key: row[key] for key in ("clients", "images_per_request", "images_per_s", "requests_per_s", "p50_ms",
                                     "p90_ms", "p95_ms", "p99_ms")}
    out["share_503"] = row["statuses"].get("503", 0) / answered if answered else 0.0
    batches = delta("cnn_batch_size_count")
    out["mean_batch_size"] = delta("cnn_batch_size_sum") / batches if batches else float("nan")
    for stage in STAGES:  # seconds per request in each stage, every request (refused ones too)
        out[f"{stage}_ms"] = (1000 * delta("cnn_request_stage_seconds_sum", endpoint="classify", stage=stage)
                              / requests if requests else float("nan"))
    out["server_cpu_ms_per_image"] = (1000 * (sum(cpu_seconds(pid).values()) - before["cpu"]) / max(1, row["images"])
                                      if pid is not None else float("nan"))
    out["server_rss_mb"] = rss_mb(pid) if pid is not None else float("nan")
    out["within_budget"] = bool(row["requests"]) and row["p99_ms"] <= budget_ms
    return out


def best_within(rows: list[dict]) -> dict | None:
    """The step with the highest throughput whose p99 stays within the budget."""
    fitting = [row for row in rows if row["within_budget"]]
    return max(fitting, key=lambda row: row["images_per_s"]) if fitting else None


def knee(rows: list[dict]) -> dict | None:
    """Of one curve (images per request fixed), the first step past which more clients add under 10%
    throughput: where extra load buys only latency."""
    for previous, row in zip(rows, rows[1:]):
        if row["images_per_s"] < 1.10 * previous["images_per_s"]:
            return previous
    return rows[-1] if rows else None


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in COLUMNS} for row in rows)


def write_markdown(rows: list[dict], path: Path, about: str, budget_ms: float) -> None:
    best = best_within(rows)
    lines = [f"# Capacity report\n\n{about}\n",
             f"Latency budget: p99 within {budget_ms:.0f} ms. " + (
                 f"**Highest throughput within it: {best['images_per_s']:.1f} images/s** ({best['clients']} clients x "
                 f"{best['images_per_request']} images, p99 {best['p99_ms']:.0f} ms)." if best
                 else "**No step kept its p99 within the budget.**"),
             "", "| clients x images | images/s | p50 | p90 | p95 | p99 ms | 503s | batch | CPU ms/img | RSS MB | "
             + " | ".join(STAGES) + " (ms per request) |",
             "|" + " --- |" * (10 + len(STAGES))]
    for row in rows:
        lines.append(
            f"| {row['clients']} x {row['images_per_request']} | {row['images_per_s']:.1f} | {row['p50_ms']:.0f} | "
            f"{row['p90_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {100 * row['share_503']:.1f}% | "
            f"{row['mean_batch_size']:.1f} | {row['server_cpu_ms_per_image']:.2f} | {row['server_rss_mb']:.0f} | "
            + " | ".join(f"{row[f'{stage}_ms']:.1f}" for stage in STAGES) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path, budget_ms: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve_path, breakdown_path = out / "capacity_curve.png", out / "capacity_breakdown.png"
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for images in sorted({row["images_per_request"] for row in rows}):
        curve = [row for row in rows if row["images_per_request"] == images]
        axis.plot([r["images_per_s"] for r in curve], [r["p95_ms"] for r in curve], "o-",
                  label=f"{images} image(s) per request")
        for row in curve:
            axis.annotate(str(row["clients"]), (row["images_per_s"], row["p95_ms"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        bend = knee(curve)
        if bend is not None:
            axis.plot(bend["images_per_s"], bend["p95_ms"], "k*", markersize=12)
    axis.axhline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:.0f} ms")
    axis.set(xlabel="throughput (images/s)", ylabel="p95 latency (ms)", yscale="log",
             title="Throughput against p95 (labels: clients; star: the knee)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(curve_path, dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(max(7, 0.5 * len(rows)), 4.5))
    labels = [f"{r['clients']}x{r['images_per_request']}" for r in rows]
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        values = [0.0 if row[f"{stage}_ms"] != row[f"{stage}_ms"] else row[f"{stage}_ms"] for row in rows]
        axis.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set(xlabel="clients x images per request", ylabel="ms per request (server side)",
             title="Where the time goes, per step")
    axis.legend(fontsize=7, ncol=4)
    axis.tick_params(axis="x", labelrotation=45, labelsize=7)
    figure.tight_layout()
    figure.savefig(breakdown_path, dpi=110)
    plt.close(figure)
    return [curve_path, breakdown_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.report", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing server (no CPU or memory figures then)")
    parser.add_argument("--preset", default="small", help="the untrained model a started server serves")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8], help="images per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="counted per step")
    parser.add_argument("--settle", type=float, default=3.0, help="uncounted first, per step")
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="the p99 latency budget")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "capacity")
    parser.add_argument("--env", action="append", default=[], help="server environment KEY=VALUE")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.url is None:
        checkpoint = untrained_checkpoint(args.preset, args.out / "models" / args.preset)
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "CHECKPOINT_DIR": str(checkpoint),
               **dict(item.split("=", 1) for item in args.env)}
        server = ServerProcess(env, args.out / "server.log")
        server.wait_ready(timeout=300)
    url, pid = (args.url.rstrip("/"), None) if server is None else (server.url, server.process.pid)
    about = (f"Against {url} (`--url`)." if server is None else
             f"A server started with the untrained `{args.preset}` preset on {os.cpu_count()} cores.") + (
        f" Closed-loop clients, 640 px JPEG photos, {args.settle:g} s settling then {args.seconds:g} s counted "
        "per step; 503s retried at once.")
    rows = []
    try:
        for images in args.images:
            bodies = multipart_bodies(images)
            asyncio.run(closed_loop(f"{url}/classify", bodies, 2, 1.0, images))  # warm each batch shape
            for clients in args.clients:
                row = step(url, pid, bodies, clients, images, args.seconds, args.settle, args.budget_ms)
                rows.append(row)
                print(f"{clients:3d} clients x {images} img: {row['images_per_s']:7.1f} img/s, p50 {row['p50_ms']:.0f}"
                      f" p95 {row['p95_ms']:.0f} p99 {row['p99_ms']:.0f} ms, 503s {100 * row['share_503']:.1f}%, "
                      f"batch {row['mean_batch_size']:.1f}", flush=True)
    finally:
        if server is not None:
            server.stop()
    write_csv(rows, args.out / "capacity.csv")
    write_markdown(rows, args.out / "capacity.md", about, args.budget_ms)
    written = [args.out / "capacity.csv", args.out / "capacity.md", *plot(rows, args.out, args.budget_ms)]
    best = best_within(rows)
    print("highest throughput within the budget: " + (
        f"{best['images_per_s']:.1f} images/s at {best['clients']} clients x {best['images_per_request']} images"
        if best else "none"))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
