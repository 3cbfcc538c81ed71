"""The trainer on real photos, against its target and a plain reference, in one run (`make bench-training`).

    python -m loadtests.training_bench --data ../shared/datasets/cifar10-jpg [--time-budget 240] [--reference]

Trains the `cifar` preset on an ImageFolder of photos with the project's recipe (random crop and flip,
cutout, label smoothing 0.2, warm-up + cosine fitted to the time budget, channels-last, bf16 autocast
where the CPU computes bf16, a moving average of the weights) and prints its test top-1 against
TARGET_TOP1; with --reference, also the same network with a plain recipe (crop and flip only, no label
smoothing, fp32) in the same budget, for the ratio. Both are scored as the preset serves, with its
test-time flip (the mean of each test image's and its mirror's logits): the ratio compares training
recipes. Exits 1 when the recipe misses the target. A benchmark, not a test: its figure depends on the
machine and the hour.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_TOP1 = 0.80
# crop and flip, cutout, label smoothing 0.2, bf16 autocast, the weights' moving average (docs/training.md)
RECIPE = ["--preset", "cifar", "--cutout", "0.3", "--ema", "0.999", "--label-smoothing", "0.2"]
PLAIN = ["--preset", "cifar", "--cutout", "0", "--label-smoothing", "0", "--no-amp"]


def train(data: str, budget: float, flags: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "training", "--data", data, "--time-budget", str(budget), *flags,
                    "--out", str(out)], check=True)
    training = json.loads((out / "manifest.json").read_text())["training"]
    return {"top1": training["metrics"]["test_top1"], "epochs": training["epochs"], "seconds": training["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.training_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an ImageFolder of photos (train/ and test/, or one per class)")
    parser.add_argument("--time-budget", type=float, default=240)
    parser.add_argument("--reference", action="store_true", help="also train the plain reference")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results = {"recipe": train(args.data, args.time_budget, RECIPE, Path(scratch) / "recipe")}
        if args.reference:
            results["plain"] = train(args.data, args.time_budget, PLAIN, Path(scratch) / "plain")
    for name, result in results.items():
        print(f"{name:7s} test top-1 {result['top1']:.4f} ({result['epochs']} epochs in {result['seconds']:.0f} s)")
    if "plain" in results:
        print(f"recipe / plain: {results['recipe']['top1'] / results['plain']['top1']:.3f}")
    passed = results["recipe"]["top1"] >= TARGET_TOP1
    print(f"target {TARGET_TOP1}: {'met' if passed else 'MISSED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
