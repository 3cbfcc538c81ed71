"""Local response normalization (AlexNet, Krizhevsky et al. 2012, section 3.3), computed cheaply.

Each activation is divided by a measure of how strongly its neighbours *across
channels* fire at the same position (a form of lateral inhibition):

    b[c] = a[c] / (k + alpha/n * sum_{c' = c-n//2 .. c+(n-1)//2} a[c']^2) ^ beta

with the paper's n = 5 channels, k = 2, alpha = 1e-4, beta = 0.75. This is the
function of `torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)` (which, like
Caffe, divides alpha by n), to 1e-5 in fp32.

How it is computed here, and why:
  - The window sum over channels is a 1-D convolution of a^2 with a kernel of
    n ones along the channel axis. With activations laid out channels-last,
    each position's channels are a contiguous row, so the convolution is one
    matrix product: (positions x C) @ (C x C band matrix of ones within n//2
    of the diagonal). A GEMM is the operation CPUs and GPUs run fastest (bf16
    tiles on AMX, tensor cores), where torch's module takes a padded 3-D
    average pool: 30 times slower on a CPU, and not implemented in bf16 there.
  - Numbers in bf16: k + alpha/n * sum sits within a hair of k = 2 for most
    activations, and bf16 values near 2 are 2^-6 apart, so a bf16 denominator
    would round the normalization away into a constant scale. The window sum
    itself may be bf16 (a sum of squares: its relative error of 2^-9 moves the
    denominator by a millionth), but k + alpha/n * sum, its power and the
    product with `a` are computed in fp32; only the result is rounded back.
  - On a CPU the service compiles `_normalize` once (torch.compile): the
    square, the product and the elementwise tail become one pass over memory
    instead of six (0.30 ms per AlexNet image for both LRN layers at batch 32
    in bf16, against 0.86 ms eager; BENCHMARKS.md). Training and the GPU run
    it eagerly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def band_matrix(channels: int, size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, C) with ones where channel c' is in the window of channel c: c - size//2 <= c' <= c + (size-1)//2.

    Column c sums the window of output channel c, so (positions x C) @ band = window sums."""
    index = torch.arange(channels, device=device)
    offset = index[:, None] - index[None, :]  # row c' minus column c
    return ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).to(dtype)


def _normalize(x2d: torch.Tensor, band: torch.Tensor, alpha_over_n: float, beta: float, k: float) -> torch.Tensor:
    """LRN of activations as rows of channels: (positions, C) -> same shape and dtype."""
    window_sums = torch.mm(x2d * x2d, band)  # the 1-D convolution over channels, as one GEMM
    denominator = window_sums.float() * alpha_over_n + k  # fp32: see the module docstring
    if beta == 0.75:  # the paper's: d^-0.75 = rsqrt(d) * sqrt(rsqrt(d)), two cheap ops instead of exp(log)
        scale = torch.rsqrt(denominator)
        scale = scale * torch.sqrt(scale)
    else:
        scale = denominator.pow(-beta)
    return (x2d.float() * scale).to(x2d.dtype)


class LocalResponseNorm(nn.Module):
    """Drop-in for torch.nn.LocalResponseNorm on (N, C, H, W) maps; no weights, so checkpoints are unchanged."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self._bands: dict[tuple, torch.Tensor] = {}
        self._compiled = None

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

    def compile(self, enabled: bool = True) -> None:
        """Fuse the computation with torch.compile (CPU inference); the first call compiles it."""
        self._compiled = torch.compile(_normalize, dynamic=True) if enabled else None

    def _band(self, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (channels, dtype, device)
        if key not in self._bands:
            self._bands[key] = band_matrix(channels, self.size, dtype, device)
        return self._bands[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # free for channels-last input; one copy otherwise
        args = (rows, self._band(c, x.dtype, x.device), self.alpha / self.size, self.beta, self.k)
        out = None
        if self._compiled is not None and not (torch.is_grad_enabled() and x.requires_grad):  # inference only
            try:
                out = self._compiled(*args)
            except Exception as err:  # no C++ compiler, an unsupported platform: the eager path is exact too
                warnings.warn(f"compiled LRN unavailable, running it eagerly: {type(err).__name__}: {err}")
                self._compiled = None
        if out is None:
            out = _normalize(*args)
        return out.view(n, h, w, c).permute(0, 3, 1, 2)  # back to (N, C, H, W), channels-last in memory
