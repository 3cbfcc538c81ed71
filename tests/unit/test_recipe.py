"""The training recipe's augmentation and schedule, on tensors made here."""

from __future__ import annotations

import torch

from training.recipe import augment, lr_factor


def batch(n: int = 64, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 100, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_without_cutout_every_output_is_a_shifted_possibly_flipped_crop():
    images = batch()
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not (out == 128).any()  # nothing erased (the inputs are below 100; padding is 0)


def test_cutout_erases_one_gray_square_of_the_asked_side_in_each_image():
    images = batch(n=256)
    out = augment(images, torch.Generator().manual_seed(0), cutout=0.25)  # a square of up to 9x9 px (|d| <= 4)
    erased = (out == 128).all(1)  # (N, S, S): gray in every channel
    counts = erased.flatten(1).sum(1)
    assert counts.min() >= 5 * 5 and counts.max() == 9 * 9  # clipped at an edge, or whole
    for mask in erased[:16]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one solid rectangle


def test_the_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0.0, 0.1) == 0 and lr_factor(0.05, 0.1) == 0.5 and lr_factor(0.1, 0.1) == 1
    assert lr_factor(1.0, 0.1) == 0 and 0 < lr_factor(0.6, 0.1) < 1
