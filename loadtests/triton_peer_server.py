"""Triton Inference Server itself, serving over the Open Inference Protocol: the benchmark's peer
(loadtests.triton_peer starts it).

Runs in its own environment (`make bench-peers`: Python 3.12 with libpython3.12.so, numpy<2,
nvidia-pytriton, which ships the tritonserver binary, and onnxruntime), so it imports nothing of
this repository. `pixels` UINT8 [N, S, S, 3] in, top_k_labels BYTES and top_k_scores FP32 [N, 5]
out, with Triton's dynamic batcher in front of the model (no queue delay: a batch is what waited
while the model was busy, as the service's batcher does). The model:
  - without --onnx, the null model, as the service's NULL_MODEL=1: uniform probabilities, no forward;
  - with --onnx, the network exported by `python -m loadtests.triton_peer export` (normalization,
    the network in fp32, softmax and top-k in one graph), run by ONNX Runtime's CPU provider with
    --threads intra-op threads; the class names come from the JSON file beside it.

    python triton_peer_server.py <http port> <grpc port> <metrics port> <input size> <classes>
                                 [--onnx model.onnx --threads N --max-batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

TOP_K = 5


def null_model(classes: int):
    labels = np.array([f"class_{i}".encode() for i in range(TOP_K)], dtype=np.object_)
    scores = np.full(TOP_K, 1.0 / classes, dtype=np.float32)

    @batch
    def infer(pixels: np.ndarray):
        n = len(pixels)
        return {"top_k_labels": np.tile(labels, (n, 1)), "top_k_scores": np.tile(scores, (n, 1))}

    return infer


def onnx_model(path: Path, threads: int, size: int):
    import onnxruntime as ort

    meta = json.loads(path.with_suffix(".json").read_text())
    labels = np.array([name.encode() for name in meta["classes"]], dtype=np.object_)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: the two cores are shared with the clients.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for n in (1, 8):  # warm up, as the service does before it is ready
        session.run(None, {"pixels": np.zeros((n, size, size, 3), dtype=np.uint8)})

    @batch
    def infer(pixels: np.ndarray):
        scores, indices = session.run(["top_k_scores", "top_k_indices"], {"pixels": pixels})
        return {"top_k_labels": labels[indices], "top_k_scores": scores}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("http_port", "grpc_port", "metrics_port", "size", "classes"):
        parser.add_argument(name, type=int)
    parser.add_argument("--onnx", type=Path, help="serve this network with ONNX Runtime (default: the null model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-batch", type=int, default=64, help="the dynamic batcher's largest batch (images)")
    args = parser.parse_args()
    # Triton's Python backend stub links libpython3.12.so: where this Python keeps it (pyenv's, say)
    # is not on the loader's path unless we say so.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    infer = onnx_model(args.onnx, args.threads, args.size) if args.onnx else null_model(args.classes)

    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="cnn-classifier",
            infer_func=infer,
            inputs=[Tensor(name="pixels", dtype=np.uint8, shape=(args.size, args.size, 3))],
            outputs=[Tensor(name="top_k_labels", dtype=bytes, shape=(TOP_K,)),
                     Tensor(name="top_k_scores", dtype=np.float32, shape=(TOP_K,))],
            config=ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
            strict=True,
        )
        print("triton peer ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
