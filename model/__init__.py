"""The CNN itself: config, network, layer table, checkpoints and preprocessing.

Knows nothing of HTTP or training loops; `training/` and `service/` both build
on it.
"""

from model.checkpoint import Checkpoint, CheckpointError, Manifest, load_checkpoint, save_checkpoint
from model.config import PRESETS, ConvStage, ModelConfig, Preprocessing, get_preset
from model.network import AlexNet, build_model
from model.preprocess import DecodeLimits, ImageRejected, Normalizer, decode_image, load_image, resize_and_crop

__all__ = [
    "AlexNet", "Checkpoint", "CheckpointError", "ConvStage", "DecodeLimits", "ImageRejected", "Manifest",
    "ModelConfig", "Normalizer", "PRESETS", "Preprocessing", "build_model", "decode_image", "get_preset",
    "load_checkpoint", "load_image", "resize_and_crop", "save_checkpoint",
]
