"""An Open Inference Protocol inference request (service.oip.app) against the model: which input, which
outputs with which parameters -- all checked against the served version before any work -- and the
output tensors built from the backend's answers."""

from __future__ import annotations

import time

import numpy as np

from model.network import STAGES
from service.core.refusals import Refusal
from service.oip import codec
from service.runtime.pipeline import Pipeline

ENDPOINT = "v2_infer"  # the endpoint label of the metrics
PREDICTED = ("probabilities", "top_k_labels", "top_k_scores", "top_k_indices", "embedding")
DEFAULT_OUTPUTS = PREDICTED  # when a request names none (every output but the feature maps)
DEFAULT_TOP_K = 5
INPUTS = {"images": "BYTES", "pixels": "UINT8"}


def _param(output: codec.RequestedOutput | None, request: codec.InferRequest, key: str, default):
    """A parameter of the output, else of the request, else the default."""
    if output is not None and key in output.parameters:
        return output.parameters[key]
    return request.parameters.get(key, default)


def _int_param(value, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Refusal(400, "invalid_parameter", f"parameter {key!r} must be an integer in {low}..{high}")
    return value


def _channels(value, layer: str) -> list[int] | None:
    """A layer's `channels` parameter: a list of indices, or a string "0,3,7" (protocol parameters are
    scalars, so tritonclient users send `<layer>.channels` as a string at the request level)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            value = None
    if not isinstance(value, list) or not value or not all(isinstance(c, int) and not isinstance(c, bool)
                                                           for c in value):
        raise Refusal(400, "invalid_parameter", f"channels of {layer!r} must be a list of channel indices "
                                                "or a string like \"0,3,7\"")
    return list(dict.fromkeys(value))


class Plan:
    """The outputs a request asked for, every parameter checked against the model before any work."""

    def __init__(self, request: codec.InferRequest, version, max_bytes: int, images: int):
        asked = request.outputs or [codec.RequestedOutput(name) for name in DEFAULT_OUTPUTS]
        binary_default = request.parameters.get("binary_data_output", False) is True
        layers = version.network.named_layers
        self.outputs = []  # (requested, binary, extra: dict)
        self.stage = _param(None, request, "stage", "post_relu")
        self.layers: dict[str, list[int] | None] = {}
        feature_bytes = 0
        for out in asked:
            binary = out.parameters.get("binary_data", binary_default) is True
            extra = {}
            if out.name in PREDICTED:
                if out.name.startswith("top_k"):
                    extra["k"] = _int_param(_param(out, request, "top_k", DEFAULT_TOP_K), "top_k", 1, 1000)
                if out.name == "embedding":
                    extra["normalize"] = _param(out, request, "normalize", True) is not False
                if "classification" in out.parameters:
                    if out.name != "probabilities":
                        raise Refusal(400, "invalid_parameter", "`classification` applies to `probabilities` only")
                    extra["classification"] = _int_param(out.parameters["classification"], "classification", 1, 1000)
            elif out.name in layers:
                stage = _param(out, request, "stage", self.stage)
                if stage != self.stage or stage not in STAGES:
                    raise Refusal(400, "invalid_parameter", f"stage must be one of {list(STAGES)}, the same for "
                                                            "every layer of a request")
                channels = _channels(out.parameters.get("channels", request.parameters.get(f"{out.name}.channels")),
                                     out.name)
                info = version.layers[out.name]
                if channels is not None:
                    info.check_channels(channels)  # model/'s typed refusal: 422
                per_channel = int(np.prod(info.output_shape[1:], dtype=np.int64))
                feature_bytes += images * len(channels or range(info.channels)) * per_channel * 4
                self.layers[out.name] = channels
            else:
                raise Refusal(400, "unknown_output", f"no output {out.name!r}; outputs: {list(PREDICTED)} and the "
                                                     f"layers {list(layers)}")
            self.outputs.append((out, binary, extra))
        if feature_bytes > max_bytes:
            raise Refusal(422, "response_too_large", f"the feature maps asked for are {feature_bytes:,} bytes; the "
                                                     f"cap is {max_bytes:,}: ask for fewer layers, channels or images")
        self.predicts = any(out.name in PREDICTED for out, _, _ in self.outputs)

    @property
    def forward_passes(self) -> int:
        """Per image, what admission charges: one batched pass for the predictions, one for the maps."""
        return int(self.predicts) + int(bool(self.layers))


def images_input(request: codec.InferRequest, limit: int, size: int) -> tuple[codec.InputTensor, int]:
    """The request's one input tensor and its image count (at most `limit`), checked."""
    if len(request.inputs) != 1:
        raise Refusal(400, "one_input", f"send exactly one input, `images` (BYTES) or `pixels` (UINT8); got "
                                        f"{[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    expected = INPUTS.get(tensor.name)
    if expected is None:
        raise Refusal(400, "unknown_input", f"no input {tensor.name!r}; inputs: images (BYTES [N]), "
                                            f"pixels (UINT8 [N, {size}, {size}, 3])")
    if tensor.datatype != expected:
        raise Refusal(400, "datatype_mismatch", f"input {tensor.name!r} is {expected}, not {tensor.datatype}")
    if tensor.name == "pixels" and (len(tensor.shape) != 4 or tensor.shape[1:] != [size, size, 3]):
        raise Refusal(400, "shape_mismatch", f"input 'pixels' is UINT8 [N, {size}, {size}, 3] (RGB, channels-last, "
                                             "resized and center-cropped: model.client_preprocess); "
                                             f"got {tensor.shape}")
    if tensor.name == "images" and (len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ([], [1])):
        raise Refusal(400, "shape_mismatch", f"input 'images' is BYTES [N] (or [N, 1]); got {tensor.shape}")
    count = tensor.shape[0]
    if count == 0:
        raise Refusal(400, "no_image", "the input holds no image (N = 0)")
    if count > limit:
        raise Refusal(413, "too_many_images", f"{count} images in one request; the limit is {limit}")
    return tensor, count


async def feature_maps(pipeline, pixels: np.ndarray, plan: Plan) -> dict[str, np.ndarray]:
    """Each layer's maps for the batch, [N, C, H, W] (or [N, D]), the asked channels only."""
    names = list(plan.layers)
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    start = time.perf_counter()
    for image in pixels:
        activations, _ = await pipeline.backend.activations(np.ascontiguousarray(image), names, plan.stage)
        for name in names:
            channels = plan.layers[name]
            found[name].append(activations[name] if channels is None else activations[name][channels])
    pipeline.metrics.forward_seconds.labels(ENDPOINT, pipeline.metrics.device).observe(time.perf_counter() - start)
    return {name: np.stack(values) for name, values in found.items()}


def output(out: codec.RequestedOutput, binary: bool, extra: dict, predicted, maps: dict) -> codec.OutputTensor:
    if out.name in maps:
        values = maps[out.name]
        return codec.OutputTensor(out.name, "FP32", values, list(values.shape), binary)
    probabilities = predicted.probabilities
    names = predicted.version.manifest.class_names
    count = len(probabilities)
    if out.name == "embedding":
        values = predicted.embeddings
        if extra["normalize"]:
            values = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
        return codec.OutputTensor(out.name, "FP32", values, list(values.shape), binary)
    k = min(extra.get("k") or extra.get("classification") or 1, probabilities.shape[1])
    order, scores = Pipeline.ranked(probabilities, k)
    if out.name == "probabilities":
        if "classification" not in extra:
            return codec.OutputTensor(out.name, "FP32", probabilities, list(probabilities.shape), binary)
        rows = [[f"{p:f}:{i}:{names[i]}" for i, p in zip(row.tolist(), values.tolist())]
                for row, values in zip(order, scores)]
        return codec.OutputTensor(out.name, "BYTES", rows, [count, k], binary)
    if out.name == "top_k_labels":
        return codec.OutputTensor(out.name, "BYTES", [[names[i] for i in row] for row in order.tolist()],
                                  [count, k], binary)
    if out.name == "top_k_scores":
        return codec.OutputTensor(out.name, "FP32", scores, [count, k], binary)
    return codec.OutputTensor(out.name, "INT64", order, [count, k], binary)
