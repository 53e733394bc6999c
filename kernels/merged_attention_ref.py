"""Reference attention over merged (centroid) KV slots with a log(size) logit bias.

A slot that stands for ``s`` tokens with identical keys receives, after the softmax,
exactly the total weight those ``s`` tokens would have had: ``exp(q.k + log s) = s *
exp(q.k)``. With the centroid value (their mean), the output equals full attention
over the original tokens. Slots of size 0 are padding and are masked out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_with_size_bias"]


def attention_with_size_bias(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sizes: Tensor,
    causal_offset: int | None = None,
) -> Tensor:
    """Softmax attention with ``log(size)`` added to every key slot's logit (GQA).

    Args:
        q: ``[Hq, T, D]`` queries; ``Hq`` is a multiple of ``Hkv``, query head ``i`` reads
            KV head ``i // (Hq // Hkv)``.
        k: ``[Hkv, S, D]`` keys (post-RoPE; positions play no part here).
        v: ``[Hkv, S, Dv]`` values.
        sizes: ``[Hkv, S]`` how many tokens each slot stands for; 0 masks the slot.
        causal_offset: if given, query ``t`` sees only slots ``s <= causal_offset + t``
            (the query block sits at slot index ``causal_offset`` of the key sequence).

    Returns:
        ``[Hq, T, Dv]`` in the dtype of ``q``; computed in float32. A query that sees
        no slot at all gets zeros.
    """
    hq, t, d = q.shape
    hkv, s, _ = k.shape
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=0)
    vf = v.float().repeat_interleave(group, dim=0)
    bias = torch.log(sizes.float()).repeat_interleave(group, dim=0)  # log 0 = -inf
    logits = torch.matmul(q.float(), kf.transpose(-1, -2)) / math.sqrt(d) + bias[:, None, :]
    if causal_offset is not None:
        visible = torch.arange(s, device=q.device)[None, :] <= (
            causal_offset + torch.arange(t, device=q.device)[:, None]
        )
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return torch.matmul(probs, vf).to(q.dtype)
