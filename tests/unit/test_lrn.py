"""Local response normalization: torch's function, computed as a GEMM, safe in bf16."""

from __future__ import annotations

import pytest
import torch

from model.lrn import LocalResponseNorm, band_matrix

PAPER = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
# conv1 and conv2 of the paper's network at 224x224 (channels x side), and a batch of 2
PAPER_SHAPES = [(2, 96, 55, 55), (2, 256, 27, 27)]


@pytest.mark.parametrize("shape", PAPER_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_equals_torch_lrn_in_fp32(shape, scale):
    torch.manual_seed(0)
    x = torch.randn(shape) * scale
    torch.testing.assert_close(LocalResponseNorm(**PAPER)(x), torch.nn.LocalResponseNorm(**PAPER)(x),
                               atol=1e-5, rtol=1e-5)


def test_channels_last_input_gives_the_same_values_and_keeps_its_layout():
    x = torch.randn(2, 96, 13, 13)
    lrn = LocalResponseNorm(**PAPER)
    out = lrn(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, lrn(x))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_the_window_is_five_neighbouring_channels():
    band = band_matrix(8, 5, torch.float32)
    assert band[:, 3].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]  # channel 3 sums channels 1..5
    assert band[:, 0].nonzero().flatten().tolist() == [0, 1, 2]  # clipped at the edge, as with zero padding
    assert band[:, 7].nonzero().flatten().tolist() == [5, 6, 7]


def test_gradients_match_torch_lrn():
    torch.manual_seed(1)
    x = (torch.randn(2, 32, 6, 6) * 20).requires_grad_()
    y = torch.randn(2, 32, 6, 6)
    (ours,) = torch.autograd.grad((LocalResponseNorm(**PAPER)(x) * y).sum(), x)
    (theirs,) = torch.autograd.grad((torch.nn.LocalResponseNorm(**PAPER)(x) * y).sum(), x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def _bf16_denominator_lrn(x: torch.Tensor) -> torch.Tensor:
    """What an all-bf16 LRN would do: the denominator k + alpha/n * sum rounded to bf16 (2^-6 steps near 2)."""
    window = torch.nn.functional.avg_pool3d((x.float() ** 2).unsqueeze(1), (5, 1, 1), stride=1,
                                            padding=(2, 0, 0)).squeeze(1)
    denominator = (window * 1e-4 + 2.0).to(torch.bfloat16)
    return x / denominator.pow(0.75)


@pytest.mark.parametrize("sigma", [3.0, 10.0, 30.0, 100.0])  # from barely normalized to strongly (scale 0.36-0.59)
def test_bf16_lrn_matches_fp32_lrn_on_realistic_activations(sigma):
    """Post-ReLU maps of growing size in bf16: only the output's own rounding may differ (at most
    2^-8 relative, no bias). A bf16 denominator would fail this: it rounds the normalization itself."""
    torch.manual_seed(2)
    x = (torch.randn(2, 96, 27, 27) * sigma).relu().to(torch.bfloat16)
    exact = torch.nn.LocalResponseNorm(**PAPER)(x.float())
    firing = x.float() > 0

    def errors(out: torch.Tensor) -> tuple[float, float]:
        relative = ((out.float() - exact) / exact)[firing]
        return relative.abs().max().item(), relative.mean().abs().item()

    worst, bias = errors(LocalResponseNorm(**PAPER)(x))
    assert worst <= 0.006 and bias <= 1e-4, (worst, bias)
    naive_worst, naive_bias = errors(_bf16_denominator_lrn(x))
    assert naive_worst > 0.006 or naive_bias > 1e-4  # the criterion has teeth


@pytest.mark.slow
def test_compiled_lrn_equals_eager():
    """The service compiles LRN on CPUs (one fused pass); it must compute the same values."""
    x = (torch.randn(3, 96, 27, 27) * 30).relu().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    eager, compiled = LocalResponseNorm(**PAPER), LocalResponseNorm(**PAPER)
    compiled.compile()
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x).float(), eager(x).float(), atol=0, rtol=2 ** -7)
    assert compiled._compiled is not None, "compilation failed and fell back to eager"
