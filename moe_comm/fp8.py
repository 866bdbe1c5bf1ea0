"""Per-token FP8 (e4m3) casting with one float32 scale per 128 channels, as DeepSeek-V3 and DeepEP use.

``scale = amax(|x| over the 128 channels) / 448``; ``x_fp8 = (x / scale).to(float8_e4m3fn)``. A block of
zeros gets scale 1e-4 / 448 so the division stays finite (its values stay zero).
"""

from __future__ import annotations

import torch

__all__ = ["FP8_BLOCK", "FP8_MAX", "FP8_DTYPE", "per_token_cast_to_fp8", "per_token_cast_back", "num_scale_blocks"]

FP8_BLOCK = 128
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def num_scale_blocks(hidden: int) -> int:
    """Scales per token for ``hidden`` channels: ``ceil(hidden / 128)``."""
    return (hidden + FP8_BLOCK - 1) // FP8_BLOCK


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast ``x [..., H]`` to ``(float8_e4m3fn [..., H], float32 scales [..., ceil(H/128)])``."""
    hidden = x.shape[-1]
    blocks = num_scale_blocks(hidden)
    pad = blocks * FP8_BLOCK - hidden
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xb = xf.view(*x.shape[:-1], blocks, FP8_BLOCK)
    amax = xb.abs().amax(dim=-1).clamp_min(1e-4)
    # A tensor divisor: on CUDA, dividing by a Python scalar multiplies by its reciprocal, which is one ulp off
    # the IEEE quotient for about half the values (the kernels and the CPU divide).
    scales = amax / torch.full_like(amax, FP8_MAX)
    x_fp8 = (xb / scales.unsqueeze(-1)).to(FP8_DTYPE).view(*x.shape[:-1], blocks * FP8_BLOCK)
    if pad:
        x_fp8 = x_fp8[..., :hidden].contiguous()
    return x_fp8, scales.contiguous()


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`per_token_cast_to_fp8`: ``x_fp8 [..., H]`` times its block scales, as ``dtype``."""
    hidden = x_fp8.shape[-1]
    expanded = scales.repeat_interleave(FP8_BLOCK, dim=-1)[..., :hidden]
    return (x_fp8.float() * expanded).to(dtype)
