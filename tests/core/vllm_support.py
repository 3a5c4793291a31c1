"""Helpers to build vLLM rotary modules outside an engine (tests only)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def vllm_context():
    """vLLM's CustomOps need a current config even when used standalone."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def vllm_rope(head_size: int, max_position: int, is_neox: bool, params: dict | None, dtype: torch.dtype):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with vllm_context():
        return get_rope(head_size, max_position, is_neox, params, dtype)


def vllm_apply(rotary_emb, pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """vLLM's own PyTorch-native rotation of keys k: [N, H, D] at pos ([N] or [3, N])."""
    with vllm_context():
        _, out = rotary_emb.forward_native(pos, k.clone(), k.clone())
    return out.view(k.shape)
