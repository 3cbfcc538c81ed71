"""Inference-time rewrites that compute the trained network's function faster.

Each rewrite is exact in real numbers (only rounding differs), so feature
maps, probabilities and embeddings keep their meaning:

  - BatchNorm after a conv is, at inference, a fixed affine map per channel:
    gamma * (y - mean) / sqrt(var + eps) + beta. It folds into the conv's
    kernels and bias, and the BN layer becomes an identity.
  - Input normalization, (pixel - mean) / std per colour channel, is linear
    too, so it folds into conv1's kernels: the network then takes raw pixel
    values (0..255), which a uint8 batch becomes with one cheap conversion
    instead of a subtract, a multiply and a copy per value (3.5 ms of every
    32-image AlexNet batch here). One catch is zero padding: conv1 pads the
    *normalized* image with zeros, which are `mean` in raw pixels, not 0. The
    difference touches only outputs whose window overlaps the padding -- the
    outer ring of conv1's map -- and does not depend on the image, so it is
    precomputed once and added to that ring.
  - LRN runs as a compiled GEMM on CPUs (model.lrn).
  - On a CPU in fp32, the fully connected layers' weights are packed once for
    the GEMM at the full batch's size (`PackedLinear`).
  - Weights are cast to the serving precision and laid out channels-last.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.config import Preprocessing
from model.lrn import LocalResponseNorm
from model.network import AlexNet


class RawPixelConv(nn.Module):
    """conv1 with the input normalization folded in: takes pixel values 0..255, gives what
    conv1 gives on the normalized image (zero padding included)."""

    def __init__(self, conv: nn.Conv2d, prep: Preprocessing):
        super().__init__()
        mean = torch.tensor(prep.mean, dtype=torch.float64) * 255.0
        inv_std = 1.0 / (torch.tensor(prep.std, dtype=torch.float64) * 255.0)
        weight = conv.weight.detach().double()
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        folded = weight * inv_std.view(1, -1, 1, 1)  # w * (x - m) / s = (w / s) * x - (w / s) * m
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        with torch.no_grad():
            self.conv.weight.copy_(folded)
            self.conv.bias.copy_(bias - (folded * mean.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
        # Raw zero padding contributes (w / s) * 0 where the normalized image's contributes
        # (w / s) * m: add back (w / s) * m summed over the padded taps, per output position.
        pad = conv.padding[0]
        rows, cols = prep.input_size, prep.input_size
        ring = torch.zeros(1, conv.in_channels, rows + 2 * pad, cols + 2 * pad, dtype=torch.float64)
        ring[:] = mean.view(1, -1, 1, 1)
        ring[:, :, pad:pad + rows, pad:pad + cols] = 0  # mean on the padding, 0 inside the image
        correction = nn.functional.conv2d(ring, folded, stride=conv.stride)[0]  # (O, Ho, Wo), zero off the ring
        # Output rows (and columns) whose window hangs over the padding: the first few and last few.
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        height, width = correction.shape[1:]
        overlapping = [i for i in range(height) if i * stride - pad < 0 or i * stride - pad + kernel > rows]
        top = sum(1 for i in overlapping if i < height // 2)
        bottom = height - (len(overlapping) - top)
        left, right = top, bottom  # a square input and kernel: the columns mirror the rows
        # (rows, cols) of the ring: full top and bottom rows, then the left and right columns between
        self.ring = [(slice(0, top), slice(0, width)), (slice(bottom, height), slice(0, width)),
                     (slice(top, bottom), slice(0, left)), (slice(top, bottom), slice(right, width))]
        # Kept as (H, W, C): added through an (N, H, W, C) view of the channels-last output, each
        # ring slice is then a run of whole rows of channels (10x faster than strided NCHW slices).
        self.register_buffer("correction", correction.permute(1, 2, 0).float().contiguous())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.conv(pixels)
        nhwc = out.permute(0, 2, 3, 1)  # a view; contiguous when `out` is channels-last
        for rows, cols in self.ring:  # four in-place adds; the interior is untouched
            if rows.start < rows.stop and cols.start < cols.stop:
                nhwc[:, rows, cols] += self.correction[rows, cols].to(out.dtype)
        return out


class PackedLinear(nn.Module):
    """A fully connected layer (fp32, CPU) whose weight matrix is packed once for MKL's GEMM.

    A GEMM rearranges its weight matrix into the blocked layout its kernel
    reads on every call: for AlexNet's head (fc6-fc8, 58 M weights, 234 MB in
    fp32) that is the whole matrix read and written again per batch, a large
    share of the head's time. Packed once, the 2-core development VM ran the
    head at 1.16 core-ms per image at batch 32 instead of 1.59, and at batch 8
    3.1 instead of 5.7 (BENCHMARKS.md). MKL's packed GEMM serves the row count
    it was packed for, so the weights are packed for a few (`rows`: the
    batcher's full batch, and half of it, what each of two API workers fills
    when they share the clients); a batch is padded with zero rows up to the
    smallest of them that holds it, when it is at least a quarter of that --
    at small batches the head's cost is reading its weights, not the
    arithmetic, so 32 packed rows cost less than 8 unpacked -- and runs
    unpacked otherwise. The rows computed are the same numbers either way."""

    def __init__(self, linear: nn.Linear, rows: tuple[int, ...]):
        super().__init__()
        # No copy where the layer's tensors are fp32, on the CPU and contiguous already: they are shared.
        self.weight = nn.Parameter(linear.weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().to("cpu", torch.float32).contiguous(), requires_grad=False)
        self.packed = {n: torch.ops.mkl._mkl_reorder_linear_weight(self.weight, n) for n in sorted(set(rows)) if n > 0}

    @staticmethod
    def available() -> bool:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        for rows, packed in self.packed.items():  # smallest first
            if n <= rows:
                if n < rows // 4:
                    break
                padded = x if n == rows else torch.cat([x, x.new_zeros(rows - n, x.shape[1])])
                return torch.ops.mkl._mkl_linear(padded, packed, self.weight, self.bias, rows)[:n]
        return nn.functional.linear(x, self.weight, self.bias)


def fold_batchnorm(net: AlexNet) -> None:
    """conv_i -> bn_i becomes one conv (bn_i an identity), in place."""
    modules = dict(net.named_children())
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d):
            conv_name = "conv" + name.removeprefix("bn")
            setattr(net, conv_name, fuse_conv_bn_eval(modules[conv_name], module))
            setattr(net, name, nn.Identity())


def inference_model(net: AlexNet, prep: Preprocessing, dtype: torch.dtype, device: torch.device,
                    compile_lrn: bool = True, full_batch: int | None = None) -> AlexNet:
    """A copy of `net` for serving: takes raw pixels (0..255) in `dtype`, channels-last, on `device`.
    `compile_lrn`: compile the LRN layers on a CPU (worth it for a server, not for one evaluation).
    `full_batch`: the batch size that runs most under load; on a CPU in fp32 the fully connected
    layers are packed for it (PackedLinear)."""
    fast = copy.deepcopy(net).eval().float().cpu()
    fold_batchnorm(fast)
    fast.conv1 = RawPixelConv(fast.conv1, prep)
    for module in fast.modules():
        if isinstance(module, LocalResponseNorm):
            module.compile(compile_lrn and device.type == "cpu")
    fast = fast.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if full_batch and device.type == "cpu" and dtype == torch.float32 and PackedLinear.available():
        for name, module in list(fast.named_children()):
            if isinstance(module, nn.Linear):
                # `net`'s own layer, not the copy: where it is fp32 on the CPU already, its weights are
                # shared with `net` (the Predictor's reference network) rather than held twice.
                setattr(fast, name, PackedLinear(getattr(net, name), (full_batch, full_batch // 2)))
    return fast
