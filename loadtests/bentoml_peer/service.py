"""torchvision's AlexNet served the way BentoML's documentation serves a model: the benchmark's peer.

    bentoml serve loadtests.bentoml_peer.service:PeerService --port 3001   # from the repository root

Written as BentoML 1.4's docs write a service (`@bentoml.service`, a batchable `@bentoml.api` taking a
list -- "Adaptive batching" -- and `PIL.Image.Image` inputs -- "Define input and output types"), with
torchvision's own preprocessing per image. Nothing here is tuned: it is the baseline a BentoML user
gets by following the docs, so `make bench` can say what this project's service adds.

Requests: multipart with one `images` field per image (the same body as the service's /classify). A
request carrying N images is N items of the adaptive batch; batches hold at most 32 images and wait
at most PEER_MAX_LATENCY_MS (3000, like the service's MAX_LATENCY_MS in the benchmark), and BentoML
answers 503 when it cannot meet that. The answer: per image, the top-5 ImageNet classes.

PEER_DTYPE: fp32 | bf16 | fp16 | auto (the default: bf16 where the CPU computes it natively -- AVX-512 BF16
or AMX in /proc/cpuinfo -- as the service's PRECISION=auto picks; the benchmark sets it to the
precision the service reports). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import torch
from PIL import Image
from torchvision import models, transforms

MAX_LATENCY_MS = int(os.environ.get("PEER_MAX_LATENCY_MS", "3000"))


def _dtype() -> torch.dtype:
    requested = os.environ.get("PEER_DTYPE", "auto")
    if requested == "auto":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        requested = "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


@bentoml.service(traffic={"timeout": 60}, http={"host": "127.0.0.1"})
class PeerService:
    def __init__(self) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = _dtype()
        self.model = models.alexnet(weights=None).eval().to(self.device, self.dtype)
        self.categories = models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
        self.preprocess = transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])
        print(f"PeerService: torchvision AlexNet on {self.device} in {self.dtype}", flush=True)

    @bentoml.api(route="/classify", batchable=True, max_batch_size=32, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Image.Image]) -> list[list[dict]]:
        batch = torch.stack([self.preprocess(image.convert("RGB")) for image in images])
        with torch.inference_mode():
            logits = self.model(batch.to(self.device, self.dtype))
            top = logits.float().softmax(dim=1).topk(5, dim=1)
        return [[{"label": self.categories[i], "index": i, "probability": p}
                 for i, p in zip(indices.tolist(), probabilities.tolist())]
                for indices, probabilities in zip(top.indices, top.values)]
