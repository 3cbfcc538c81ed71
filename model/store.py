"""The BentoML model store: where registered checkpoints live for the service.

A registered model is the checkpoint directory copied into the store under
one name (`cnn-classifier`), tagged by version; the service loads
`cnn-classifier:latest` unless told otherwise. The files are the same
safetensors + manifest pair, so loading verifies the same sha256.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, load_checkpoint

MODEL_NAME = "cnn-classifier"
DEFAULT_TAG = f"{MODEL_NAME}:latest"


def register(checkpoint_dir: str | Path, name: str = MODEL_NAME) -> str:
    """Verify a checkpoint and copy it into the model store; returns the new tag."""
    import bentoml  # heavy import, needed only here

    checkpoint = load_checkpoint(checkpoint_dir)  # refuse to register a broken checkpoint
    manifest = checkpoint.manifest
    metrics = manifest.training.get("metrics", {})
    with bentoml.models.create(
        name,
        labels={
            "preset": manifest.preset,
            "dataset": str(manifest.training.get("dataset", "unknown")),
            "framework": "pytorch",
        },
        metadata={
            "preset": manifest.preset,
            "dataset": str(manifest.training.get("dataset", "unknown")),
            "test_top1": float(metrics.get("test_top1", float("nan"))),
            "num_classes": len(manifest.class_names),
            "classes": ",".join(manifest.class_names[:50]) + ("..." if len(manifest.class_names) > 50 else ""),
            "weights_sha256": manifest.weights_sha256,
            "input_size": manifest.preprocessing.input_size,
        },
    ) as bento_model:
        for name_ in (WEIGHTS_FILE, MANIFEST_FILE, *manifest.files):  # the atlas too, when there is one
            (Path(bento_model.path) / name_).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(checkpoint_dir) / name_, Path(bento_model.path) / name_)
    return str(bento_model.tag)


def resolve(tag: str = DEFAULT_TAG) -> tuple[Path, str]:
    """The directory of a model in the store and its full tag (name:version); raises bentoml's
    NotFound if absent."""
    import bentoml

    stored = bentoml.models.get(tag)
    return Path(stored.path), str(stored.tag)


def has_model(tag: str = DEFAULT_TAG) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    return True
