"""Evaluation: top-1/top-5 accuracy, loss, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.network import AlexNet, mean_over_mirrors, with_mirror_images
from model.preprocess import Normalizer
from training.data import Split


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    confusion: torch.Tensor  # (true class, predicted class) counts

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diag().float() / totals.float()).tolist()


@torch.no_grad()
def evaluate(
    model: AlexNet,
    split: Split,
    normalizer: Normalizer,
    num_classes: int,
    device: torch.device,
    batch_size: int = 512,
) -> EvalResult:
    # Always fp32, even for a run that trains under bf16 autocast: this is the accuracy of the
    # weights as saved, which the checkpoint records and the service starts from.
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    top5_hits, loss_sum = 0, 0.0
    k = min(5, num_classes)
    for start in range(0, len(split.labels), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
        inputs = normalizer(images).contiguous(memory_format=torch.channels_last)
        if model.config.test_time_flip:  # as the service answers (model.inference.Predictor.predict)
            logits = mean_over_mirrors(model(with_mirror_images(inputs)).float())
        else:
            logits = model(inputs).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        top5_hits += (top == labels[:, None]).any(dim=1).sum().item()
        pairs = labels.cpu() * num_classes + top[:, 0].cpu()
        confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
    model.train(was_training)
    total = max(1, len(split.labels))
    return EvalResult(
        top1=confusion.diag().sum().item() / total,
        top5=top5_hits / total,
        loss=loss_sum / total,
        confusion=confusion,
    )


def precision_agreement(checkpoint, split: Split, device: torch.device, batch_size: int = 256) -> dict[str, dict]:
    """For each reduced precision: how the serving network in it agrees with the fp32 network as
    trained, on `split` (top-1 agreement, largest probability difference; model.precision)."""
    from model.optimize import inference_model
    from model.precision import agreement

    prep = checkpoint.manifest.preprocessing
    reference = checkpoint.model.to(device).eval()
    normalizer = Normalizer(prep)
    figures = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        candidate = inference_model(checkpoint.model, prep, dtype, device, compile_lrn=False)
        batches = (
            (normalizer(images).contiguous(memory_format=torch.channels_last),
             images.to(dtype).contiguous(memory_format=torch.channels_last))
            for images in (split.images[i:i + batch_size].to(device) for i in range(0, len(split.labels), batch_size))
        )
        try:
            figures[name] = agreement(reference, candidate, batches)
        except RuntimeError as err:  # a precision this torch build cannot run on this device
            print(f"skipped {name}: {err}")
    return figures


def format_agreement(figures: dict[str, dict]) -> list[str]:
    return [f"  {name}: top-1 agrees with fp32 on {f['top1_agreement']:.2%} of {f['images']} images, "
            f"largest probability difference {f['max_probability_difference']:.4f}" for name, f in figures.items()]
