"""The BentoML service: HTTP concerns only; tensor work lives in model/."""

import os

# Before torch (and its OpenMP runtime) loads in a worker: OpenMP threads that finish a parallel region
# sleep instead of spinning for the next one. Several processes share the cores here (API workers each
# running forwards, decoding threads); a spinning thread burns CPU another process needs, and shows
# up as server CPU per image with no image to show for it (issue 19, BENCHMARKS.md). Set it to ACTIVE
# to measure the difference.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
