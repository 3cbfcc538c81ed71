"""Forward-pass speed: the limit (torchvision's own AlexNet) and this project's Predictor.

    python -m loadtests.forward                      # both, every precision this machine offers

The limit L is the fastest forward of torchvision's AlexNet on this machine in
any precision it computes natively -- weights and input in that dtype,
channels-last, the best of batch 1/8/32/64 -- not a slower model of our own.
The Predictor is measured the way the service calls it: uint8 images in,
float32 probabilities and embeddings out (conversion, forward, softmax, copy
back), as a fraction of L. Medians of per-batch rates; weights are random
(speed does not depend on them).

This VM's speed drifts by several percent within a minute, more than the gap
between a good Predictor and L. So besides "best / L" (against L measured at
the start), each Predictor is also compared *paired*: at its best batch size,
it and torchvision's AlexNet in L's precision take turns, a short round each,
and the ratio of their medians is reported ("paired"); drift then moves both
sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

BATCH_SIZES = (1, 8, 32, 64)


def median_rate(run, batch: int, seconds: float) -> float:
    """Images/s: the median over repeated calls of run() on a batch of `batch`, after two warm-up calls."""
    run()
    run()
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        run()
        rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def offered_precisions(device: torch.device) -> list[str]:
    from model.precision import native_precisions

    return ["fp32", *native_precisions(device)]


def torchvision_forward(device: torch.device, precision: str):
    """run(batch) -> a callable doing one forward of torchvision's AlexNet (weights and input in `precision`)."""
    import torchvision

    from model.precision import DTYPES

    dtype = DTYPES[precision]
    net = torchvision.models.alexnet().eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)

    def at(batch: int):
        x = torch.randn(batch, 3, 224, 224, device=device).to(dtype).contiguous(memory_format=torch.channels_last)

        @torch.inference_mode()
        def run():
            net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    return at


def torchvision_limit(device: torch.device, seconds: float = 2.0) -> dict[str, dict[int, float]]:
    """torchvision.models.alexnet in each native precision at each batch size: images/s."""
    results = {}
    for name in offered_precisions(device):
        at = torchvision_forward(device, name)
        results[name] = {batch: median_rate(at(batch), batch, seconds) for batch in BATCH_SIZES}
    return results


def paired_ratio(ours, limit, batch: int, rounds: int = 6, seconds: float = 0.5) -> float:
    """median rate of `ours` / median rate of `limit`, measured in alternating short rounds."""
    ours_rates, limit_rates = [], []
    for _ in range(rounds):
        ours_rates.append(median_rate(ours, batch, seconds))
        limit_rates.append(median_rate(limit, batch, seconds))
    return statistics.median(ours_rates) / statistics.median(limit_rates)


def predictor_run(preset: str, precision: str, device: torch.device):
    """run(batch) -> a callable doing one Predictor.predict on a uint8 batch (HWC-stacked, as the service builds them)."""
    from model.checkpoint import Checkpoint, Manifest
    from model.config import get_preset
    from model.inference import Predictor
    from model.network import AlexNet

    spec = get_preset(preset)
    manifest = Manifest(spec.config, preset, [str(i) for i in range(spec.config.num_classes)], spec.preprocessing)
    predictor = Predictor(Checkpoint(AlexNet(spec.config).eval(), manifest, Path(".")), device, precision)
    predictor.warm_up()
    size = spec.preprocessing.input_size

    def at(batch: int):
        images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        return lambda: predictor.predict(images)

    return at


def attribution_costs(presets: tuple[str, ...], device: torch.device, repeats: int = 3) -> dict[str, dict[str, dict]]:
    """Milliseconds per /explain method (its defaults) and per atlas-free Grad-CAM, on the Predictor."""
    from model.attribution import METHODS, AttributionRequest
    from model.checkpoint import Checkpoint, Manifest
    from model.config import get_preset
    from model.inference import Predictor
    from model.network import AlexNet

    out: dict[str, dict[str, dict]] = {}
    for preset in presets:
        spec = get_preset(preset)
        manifest = Manifest(spec.config, preset, [str(i) for i in range(spec.config.num_classes)], spec.preprocessing)
        predictor = Predictor(Checkpoint(AlexNet(spec.config).eval(), manifest, Path(".")), device, "fp32")
        size = spec.preprocessing.input_size
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
        for method in METHODS:
            request = AttributionRequest(method).resolved(predictor.reference)
            predictor.explain(image, request)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                predictor.explain(image, request)
                times.append(time.perf_counter() - start)
            out.setdefault(preset, {})[method] = {"ms": statistics.median(times) * 1000,
                                                 "forward_passes": request.cost(size)}
    return out


def measure(presets: tuple[str, ...] = ("torchvision", "alexnet"), seconds: float = 2.0) -> dict:
    """The limit and every preset x precision, with each one's best as a fraction of L."""
    from model.inference import configure_cpu_threads, pick_device

    device = pick_device()
    if device.type == "cpu":
        configure_cpu_threads()
    limit = torchvision_limit(device, seconds)
    best_limit = max(rate for rates in limit.values() for rate in rates.values())
    limit_precision = max(limit, key=lambda name: max(limit[name].values()))
    limit_at = torchvision_forward(device, limit_precision)
    predictors = {}
    for preset in presets:
        for precision in offered_precisions(device):
            at = predictor_run(preset, precision, device)
            rates = {batch: median_rate(at(batch), batch, seconds) for batch in BATCH_SIZES}
            best_batch = max(rates, key=rates.get)
            entry = {"rates": rates, "best": rates[best_batch], "best_batch": best_batch,
                     "over_limit": rates[best_batch] / best_limit}
            if preset != "small":  # a 64-px model has no meaningful pairing with a 224-px AlexNet
                entry["over_limit_paired"] = paired_ratio(at(best_batch), limit_at(best_batch), best_batch)
            predictors[f"{preset}/{precision}"] = entry
    explain = attribution_costs(("small", "alexnet"), device)
    return {"device": str(device), "limit": limit, "limit_best": best_limit, "predictors": predictors,
            "explain": explain}


def report(result: dict) -> str:
    lines = [f"forward passes on {result['device']}, images/s at batch " + "/".join(map(str, BATCH_SIZES))]
    for name, rates in result["limit"].items():
        lines.append(f"  torchvision alexnet {name:5s} " + "  ".join(f"{rates[b]:8.1f}" for b in BATCH_SIZES))
    lines.append(f"  limit L = {result['limit_best']:.1f} img/s")
    for name, entry in result["predictors"].items():
        lines.append(f"  Predictor {name:17s} " + "  ".join(f"{entry['rates'][b]:8.1f}" for b in BATCH_SIZES)
                     + f"   best / L = {entry['over_limit']:.2f}"
                     + (f" (paired at batch {entry['best_batch']}: {entry['over_limit_paired']:.2f})"
                        if "over_limit_paired" in entry else ""))
    for preset, methods in result.get("explain", {}).items():
        lines.append(f"  /explain on {preset} (fp32): " + ", ".join(
            f"{m} {v['ms']:.0f} ms ({v['forward_passes']} passes)" for m, v in methods.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["torchvision", "alexnet"])
    parser.add_argument("--seconds", type=float, default=2.0, help="per batch size")
    args = parser.parse_args()
    print(report(measure(tuple(args.presets), args.seconds)))


if __name__ == "__main__":
    main()


def cpu_per_image(preset: str, precision: str, batch: int, seconds: float = 2.0) -> float:
    """Core-ms of this process's CPU per image for the Predictor at `batch` (every thread counted: a
    forward that spins or oversubscribes shows here, where images/s would not)."""
    from model.inference import pick_device

    run = predictor_run(preset, precision, pick_device())(batch)
    run()
    images, cpu_start, stop = 0, time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < stop:
        run()
        images += batch
    return 1000 * (time.process_time() - cpu_start) / images
