"""Triton Inference Server itself, serving the null model over the Open Inference Protocol: the
benchmark's peer (loadtests.triton_peer starts it).

Runs in its own environment (`make bench-peers`: Python 3.12 with libpython3.12.so, numpy<2,
nvidia-pytriton, which ships the tritonserver binary), so it imports nothing of this repository.
The model answers as the service's null model does (NULL_MODEL=1: uniform probabilities, no
forward pass): `pixels` UINT8 [N, S, S, 3] in, top_k_labels BYTES and top_k_scores FP32 [N, 5]
out, with Triton's dynamic batcher in front of it.

    python triton_peer_server.py <http port> <grpc port> <metrics port> <input size> <classes>
"""

from __future__ import annotations

import os
import sys
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

TOP_K = 5


def main(http_port: int, grpc_port: int, metrics_port: int, size: int, classes: int) -> None:
    # Triton's Python backend stub links libpython3.12.so: where this Python keeps it (pyenv's, say)
    # is not on the loader's path unless we say so.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    labels = np.array([f"class_{i}".encode() for i in range(TOP_K)], dtype=np.object_)
    scores = np.full(TOP_K, 1.0 / classes, dtype=np.float32)

    @batch
    def null_model(pixels: np.ndarray):
        n = len(pixels)
        return {"top_k_labels": np.tile(labels, (n, 1)), "top_k_scores": np.tile(scores, (n, 1))}

    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, metrics_port=metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="cnn-classifier",
            infer_func=null_model,
            inputs=[Tensor(name="pixels", dtype=np.uint8, shape=(size, size, 3))],
            outputs=[Tensor(name="top_k_labels", dtype=bytes, shape=(TOP_K,)),
                     Tensor(name="top_k_scores", dtype=np.float32, shape=(TOP_K,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
            strict=True,
        )
        print("triton peer ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:6]))
