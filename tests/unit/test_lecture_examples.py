"""The lecture's worked examples, computed through the project's own conv and pool layers."""

import torch
import pytest

from model.config import ConvStage
from model.network import make_conv, make_pool

LECTURE_INPUT = torch.tensor(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 1.0, 0, 0, 0.4, 0],
        [0, 0, 0, 0.4, 0, 0],
        [0, 0, 0, 0, 0.4, 0],
        [0, 0, 0, 0.4, 0, 0],
        [0, 0, 0, 0, 0.4, 0],
    ]
)
LECTURE_KERNEL = torch.tensor([[0, 0, 0.5], [0, 0.5, 0], [0, 0, 0.5]])


def conv_with_kernel(kernel: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.nn.Conv2d:
    k = kernel.shape[-1]
    conv = make_conv(1, ConvStage(1, kernel=k, stride=stride, padding=padding))
    with torch.no_grad():
        conv.weight.copy_(kernel.view(1, 1, k, k))
        conv.bias.zero_()
    return conv


def as_batch(image: torch.Tensor) -> torch.Tensor:
    return image.view(1, 1, *image.shape)


@torch.no_grad()
def test_3x3_kernel_over_6x6_gives_lecture_4x4_feature_map():
    feature_map = conv_with_kernel(LECTURE_KERNEL)(as_batch(LECTURE_INPUT))[0, 0]
    expected = torch.tensor([[0.5, 0.2, 0, 0.2], [0, 0, 0.6, 0], [0, 0.4, 0, 0.2], [0, 0, 0.6, 0]])
    assert feature_map.shape == (4, 4)
    torch.testing.assert_close(feature_map, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_2x2_max_pooling_of_lecture_map():
    feature_map = conv_with_kernel(LECTURE_KERNEL)(as_batch(LECTURE_INPUT))
    pooled = make_pool(ConvStage(1, kernel=1, pool_kernel=2, pool_stride=2))(feature_map)[0, 0]
    torch.testing.assert_close(pooled, torch.tensor([[0.5, 0.6], [0.4, 0.6]]), atol=1e-6, rtol=0)


@torch.no_grad()
def test_stride_3_with_3x3_kernel_on_6x6_gives_2x2():
    out = conv_with_kernel(LECTURE_KERNEL, stride=3)(as_batch(LECTURE_INPUT))
    assert out.shape[-2:] == (2, 2)
    # The strided output is the stride-1 map sampled every 3 positions.
    dense = conv_with_kernel(LECTURE_KERNEL)(as_batch(LECTURE_INPUT))
    torch.testing.assert_close(out, dense[..., ::3, ::3])


@torch.no_grad()
def test_zero_padding_keeps_4x4_output():
    image = torch.arange(16, dtype=torch.float32).view(4, 4)
    out = conv_with_kernel(torch.ones(3, 3), padding=1)(as_batch(image))[0, 0]
    assert out.shape == (4, 4)
    # A corner output sees only 4 real pixels; the rest of its window is zero padding.
    assert out[0, 0].item() == pytest.approx(image[:2, :2].sum().item())


def edge_image() -> torch.Tensor:
    """8x8: dark left half, bright right half -- one vertical edge."""
    image = torch.zeros(8, 8)
    image[:, 4:] = 1.0
    return image


SOBEL_X = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
SOBEL_Y = SOBEL_X.T.contiguous()


@torch.no_grad()
def test_sobel_x_responds_to_vertical_edge_and_sobel_y_does_not():
    image = as_batch(edge_image())
    gx = conv_with_kernel(SOBEL_X)(image)[0, 0]
    gy = conv_with_kernel(SOBEL_Y)(image)[0, 0]
    # Output column j covers input columns j..j+2: the edge (between 3 and 4) is in columns 2 and 3.
    assert torch.all(gx[:, 2:4] == 4.0)
    assert torch.all(gx[:, :2] == 0) and torch.all(gx[:, 4:] == 0)
    assert torch.all(gy == 0)


@torch.no_grad()
def test_sobel_y_responds_to_horizontal_edge():
    image = as_batch(edge_image().T.contiguous())
    gy = conv_with_kernel(SOBEL_Y)(image)[0, 0]
    assert gy.abs().max() == 4.0
    assert torch.all(conv_with_kernel(SOBEL_X)(image) == 0)


@torch.no_grad()
def test_gaussian_5x5_blurs_edge_and_keeps_flat_regions():
    row = torch.tensor([1.0, 4, 6, 4, 1])
    gaussian = torch.outer(row, row) / 256
    assert gaussian.sum().item() == pytest.approx(1.0)
    image = edge_image()
    smoothed = conv_with_kernel(gaussian, padding=2)(as_batch(image))[0, 0]
    # Flat regions stay flat (weights sum to 1) ...
    assert smoothed[3, 0].item() == pytest.approx(0.0)
    assert smoothed[3, 7].item() == pytest.approx(image[3, 7].item() * gaussian[:, :3].sum().item())
    # ... and the sharp 0 -> 1 step becomes a gradual ramp.
    ramp = smoothed[3, 2:6]
    assert torch.all(ramp[1:] > ramp[:-1])
    assert 0 < ramp[0] < 0.5 < ramp[-1] < 1
