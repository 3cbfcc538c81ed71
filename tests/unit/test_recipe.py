"""The training recipe's augmentation and schedule, on tensors made here."""

from __future__ import annotations

import torch
from torch import nn

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


def test_the_weights_moving_average_follows_them_with_a_decay_that_rises_to_its_setting():
    from training.recipe import weight_average

    assert weight_average(nn.Linear(2, 1), 0.0) is None
    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    average = weight_average(net, 0.999)
    average.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net.weight.fill_(1.0)
    average.update_parameters(net)  # second: decay (1 + 1) / (10 + 1), not yet 0.999
    assert torch.allclose(average.module.weight, torch.full((1, 2), 1 - 2 / 11))
    for _ in range(5000):
        average.update_parameters(net)
    assert torch.allclose(average.module.weight, torch.ones(1, 2), atol=1e-2)


def test_under_a_time_budget_evaluations_take_at_most_a_tenth_of_it():
    from types import SimpleNamespace

    from training.trainer import evaluation_due

    def run(budget, eval_seconds, last, epoch):
        return SimpleNamespace(config=SimpleNamespace(time_budget=budget), eval_seconds=eval_seconds,
                               last_evaluated=last, progress=SimpleNamespace(epoch=epoch))

    epoch = {"epoch_seconds": 3.6}
    assert evaluation_due(run(None, 0.8, 1, 2), epoch)  # no budget: every epoch
    assert evaluation_due(run(240, None, 0, 1), epoch)  # the first: to know what one costs
    # 0.8 s against 3.6 s of training: every third epoch (0.8 / 3 epochs = 7% of the time)
    assert [evaluation_due(run(240, 0.8, 1, e), epoch) for e in (2, 3, 4)] == [False, False, True]


def test_mixup_blends_each_image_and_its_label_with_another_of_the_batch():
    from training.recipe import mixed, mixed_loss

    inputs = torch.arange(4, dtype=torch.float32).view(4, 1).expand(4, 3).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    blended, others, lam = mixed(inputs, labels, 0.2, torch.Generator().manual_seed(0))
    assert 0.0 <= lam <= 1.0 and sorted(others.tolist()) == [0, 1, 2, 3]
    partner = others  # the inputs are their own labels here: each row is lam * own + (1 - lam) * partner's
    assert torch.allclose(blended[:, 0], lam * labels.float() + (1 - lam) * partner.float())
    criterion = nn.CrossEntropyLoss()
    logits = torch.randn(4, 4)
    assert torch.isclose(mixed_loss(criterion, logits, labels, others, lam),
                         lam * criterion(logits, labels) + (1 - lam) * criterion(logits, others))
