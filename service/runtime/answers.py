"""The answers of /classify, /embed and /feature_maps: the pipeline's stages run in order (admitted
by the endpoint's guard, decoded, predicted) and the result shaped into the endpoint's schema.
(/explain and /gradcam shape theirs in service.runtime.explain; OIP in service.oip.infer.)"""

from __future__ import annotations

import numpy as np

from service.core.schemas import (
    ClassifyResponse, EmbedResponse, FeatureMapsResponse, ImagePrediction, LabelScore,
)
from service.runtime import feature_maps as maps
from service.runtime.pipeline import Pipeline


async def classify(pipeline: Pipeline, payloads: list[bytes], top_k: int) -> ClassifyResponse:
    """The answer of the version that ran the batch: its probabilities, its class names, its tag."""
    predicted = await pipeline.predict("classify", payloads)
    order, scores = pipeline.ranked(predicted.probabilities, min(top_k, predicted.probabilities.shape[1]))
    names = predicted.version.manifest.class_names
    # The top probability as the signal of an unfamiliar input: the maximum-softmax baseline
    # (Hendrycks & Gimpel 2017); an image unlike the training data rarely gets a confident answer.
    threshold = pipeline.config.low_confidence_below
    predictions = [
        ImagePrediction(top_k=[LabelScore(label=names[i], index=i, probability=p)
                               for i, p in zip(row.tolist(), values.tolist())],
                        low_confidence=bool(values[0] < threshold))
        for row, values in zip(order, scores)
    ]
    pipeline.observe_predictions("classify", predicted)
    return ClassifyResponse(model=predicted.version.tag, predictions=predictions)


async def embed(pipeline: Pipeline, payloads: list[bytes], normalize: bool) -> EmbedResponse:
    """The penultimate layer's vectors, L2-normalized (cosine similarity is then a dot product)."""
    predicted = await pipeline.predict("embed", payloads)
    embeddings = predicted.embeddings
    if normalize:
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    pipeline.metrics.images.labels("embed").inc(len(embeddings))
    return EmbedResponse(model=predicted.version.tag, layer=predicted.version.network.embedding_layer,
                         dim=embeddings.shape[1], normalized=normalize, embeddings=embeddings.tolist())


async def feature_maps(pipeline: Pipeline, payload: bytes, request: maps.FeatureMapsRequest) -> FeatureMapsResponse:
    """One image's layers as `request` asks (resolved against the served network first)."""
    request = request.resolved(pipeline.version.network)

    async def work(pixels: np.ndarray) -> FeatureMapsResponse:
        bodies, size, version = await maps.feature_maps(pipeline, pixels, request)
        pipeline.metrics.feature_map_bytes.labels(request.format).inc(size)
        return FeatureMapsResponse(model=version.tag, stage=request.stage, format=request.format,
                                   input_size=pipeline.input_size, layers=bodies)

    return await pipeline.on_one_image("feature_maps", payload, work)
