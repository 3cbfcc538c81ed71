"""Typed response bodies; BentoML turns them (and the API signatures) into the OpenAPI spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from model.attribution import METHODS
from model.network import STAGES

# The allowed values come from model/, which owns them; only the response formats are the service's.
Stage = Literal[STAGES]
ExplainMethod = Literal[METHODS]
FeatureFormat = Literal["png", "array", "stats"]


class LabelScore(BaseModel):
    label: str
    index: int
    probability: float


class ImagePrediction(BaseModel):
    top_k: list[LabelScore]
    low_confidence: bool = Field(False, description=(
        "the top probability is below LOW_CONFIDENCE_BELOW (0.5 by default): the model is unsure, often "
        "because the image is unlike its training data (GET /model's `card` says what it knows)"))


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
    png: str | None = Field(None, description="format png: base64 PNG grid, one tile per channel, each normalized")
    array: ArrayPayload | None = Field(None, description="format array: the chosen channels' exact values")
    # A list, never null: BentoML's clients decode a list-typed field as a list (null broke them).
    stats: list[ChannelStats] = Field(default_factory=list, description="format stats: one entry per channel")


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


class ExplainResponse(BaseModel):
    model: str
    method: ExplainMethod
    class_index: int = Field(description="the class explained (default: the top-1 class)")
    label: str
    probability: float
    input_size: int
    signed: bool = Field(description="true (occlusion, integrated gradients): positive values are evidence for the "
                                     "class, negative against; false: a magnitude >= 0")
    attribution: ArrayPayload = Field(description="the map at input_size x input_size, over the resized, "
                                                  "center-cropped input")
    overlay_png: str = Field(description="base64 RGBA PNG at input_size to lay over the input: transparent where "
                                         "nothing speaks for the class, red where most does")
    layer: str | None = Field(None, description="gradcam: the conv layer whose maps were weighted")
    window: int | None = Field(None, description="occlusion: side of the gray square, in input pixels")
    stride: int | None = Field(None, description="occlusion: its step")
    steps: int | None = Field(None, description="integrated_gradients: points on the path from a gray image")
    forward_passes: int = Field(description="about how many forward passes it took")
