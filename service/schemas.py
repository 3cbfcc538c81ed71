"""Typed response bodies; BentoML turns them (and the API signatures) into the OpenAPI spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Stage = Literal["pre_relu", "post_relu"]
FeatureFormat = Literal["png", "array", "stats"]


class ErrorBody(BaseModel):
    error: str = Field(description="stable reason code, e.g. not_an_image, unknown_layer, overloaded")
    detail: str = Field(description="what was wrong, for people")


class LabelScore(BaseModel):
    label: str
    index: int
    probability: float


class ImagePrediction(BaseModel):
    top_k: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str = Field(description="model tag that answered")
    predictions: list[ImagePrediction] = Field(description="one entry per input image, in order")


class EmbedResponse(BaseModel):
    model: str
    layer: str = Field(description="the penultimate layer the vectors come from (fc7 for AlexNet)")
    dim: int
    normalized: bool
    embeddings: list[list[float]]


class ArrayPayload(BaseModel):
    dtype: Literal["float16"] = "float16"
    byte_order: Literal["little"] = "little"
    shape: list[int]
    data: str = Field(description="base64 of the raw float16 values in C order")


class ChannelStats(BaseModel):
    channel: int
    mean: float
    max: float
    zero_fraction: float


class LayerFeatureMaps(BaseModel):
    layer: str
    type: str
    shape: list[int] = Field(description="full output shape of the layer: (C, H, W) or (D,)")
    kernel: int | None
    stride: int | None
    padding: int | None
    receptive_field: int = Field(description="input pixels one output value sees (per side)")
    jump: int = Field(description="input pixels between neighbouring outputs (effective stride)")
    channels: list[int] = Field(description="channels returned, in the order shown")
    png: str | None = Field(None, description="base64 PNG grid, one tile per channel, each normalized")
    array: ArrayPayload | None = None
    stats: list[ChannelStats] | None = None


class FeatureMapsResponse(BaseModel):
    model: str
    stage: Stage
    format: FeatureFormat
    input_size: int
    layers: list[LayerFeatureMaps]


class GradCamResponse(BaseModel):
    model: str
    layer: str = Field(description="the conv layer whose maps are weighted (default: the last one)")
    class_index: int
    label: str
    probability: float
    input_size: int
    layer_map: ArrayPayload = Field(description="the class-activation map at the layer's resolution, in [0, 1]")
    receptive_field: int = Field(description="input pixels one cell of layer_map sees (per side)")
    jump: int = Field(description="input pixels between neighbouring cells of layer_map")
    heatmap_png: str = Field(description="base64 RGBA PNG at input_size x input_size to lay over the "
                                         "resized, center-cropped input: transparent where cold, red where hot")
