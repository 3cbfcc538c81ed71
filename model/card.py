"""The model card: what a served model knows, in the words a user needs before sending it an image.

Read from the checkpoint's manifest (its dataset, classes, preset, accuracy on its test split) and
shown by GET /model and the inspector page, so that an answer such as "cross 25%" for a photo of a
cat reads for what it is: the default model knows 12 synthetic shapes, not photos.
"""

from __future__ import annotations

from typing import Any

from model.checkpoint import Manifest

# What the datasets this project makes or imports are for (any other: an ImageFolder of the user's).
PURPOSES = {
    "shapes": "the generated default: {n} synthetic shapes and textures (stripes, circles, crosses, checkers...). "
              "It demonstrates the service and what each layer computes; it does not know photos.",
    "imagenet-1k": "torchvision's AlexNet trained on ImageNet-1k: {n} classes of everyday photos "
                   "(animals, objects, scenes).",
}


def model_card(manifest: Manifest, tag: str) -> dict[str, Any]:
    """Dataset, purpose, classes, preset, accuracy on its test split (None where unknown), version."""
    training = manifest.training
    dataset = str(training.get("dataset", "unknown"))
    metrics = training.get("metrics", {})
    purpose = PURPOSES.get(dataset, "trained on {dataset}: {n} classes of its images.")
    test_split = metrics.get("test_split") or (
        f"{training['test_images']} held-out images of {dataset}" if "test_images" in training else None)
    return {
        "version": tag,
        "dataset": dataset,
        "purpose": purpose.format(n=len(manifest.class_names), dataset=dataset),
        "preset": manifest.preset,
        "num_classes": len(manifest.class_names),
        "test_top1": metrics.get("test_top1"),
        "test_top5": metrics.get("test_top5"),
        "test_split": test_split,
    }
