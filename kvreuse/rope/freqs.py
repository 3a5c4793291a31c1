"""Inverse frequencies of the rotary schemes kvreuse relocates exactly.

Each function reproduces, in fp32 and in the same order of operations, what vLLM's rotary
modules compute, so that a table built from a HF config equals the serving engine's table
bit for bit (tests check this against `get_rope`).  Angles are `fl32(t * inv_freq)` with
`t = fl32(position * position_scale)`; vLLM builds its cos/sin cache the same way.
"""

from __future__ import annotations

import math

import torch


def default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """`1 / base^(2i/d)` for i in [0, d/2): the plain RoPE frequencies.  # [rotary_dim // 2] fp32"""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
    return 1.0 / (base ** exponent)


def llama3_inv_freq(base: float, rotary_dim: int, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama 3.1 frequency-dependent interpolation (long wavelengths divided by `factor`)."""
    inv_freq = default_inv_freq(base, rotary_dim)
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wave_len = 2 * math.pi / inv_freq
    if low_freq_factor != high_freq_factor:
        smooth = (original_max_position / wave_len - low_freq_factor) / (high_freq_factor - low_freq_factor)
    else:
        smooth = 0
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wave_len < high_freq_wavelen, inv_freq,
                       torch.where(wave_len > low_freq_wavelen, inv_freq / factor, blended))


def _yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                           original_max_position: int, truncate: bool) -> tuple[float, float]:
    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(base: float, rotary_dim: int, factor: float, original_max_position: int,
                  beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True) -> torch.Tensor:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, linear ramp between."""
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = _yarn_correction_range(beta_fast, beta_slow, rotary_dim, base, original_max_position, truncate)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float) - low) / (high - low), 0, 1)
    mask = 1 - ramp
    return interpolation * (1 - mask) + extrapolation * mask


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction `0.1 * mscale * ln(scale) + 1`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
