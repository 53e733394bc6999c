"""Chelsea's Chunked Soft Matching: the torch reference.

Per chunk of ``C`` tokens and per KV head, similar post-RoPE keys are merged into
size-weighted centroids, round after round, until the chunk keeps ``target`` slots or
no pair is similar enough. See ``docs/chelsea-matching.md`` for the full rules; in short,
one round is:

1. *Eligible* tokens = current survivors that are not protected. Ranked by position
   among the eligible, even ranks form set A and odd ranks set B (alternating partition).
2. Similarity = cosine of the current centroid keys (post-RoPE), A rows x B columns.
   Each A token takes its most similar B token (ties: lowest position wins).
3. Candidates = A tokens whose best similarity is ``>= min_similarity``. The
   ``r = min(quota(count), count - target)`` candidates with the highest similarity are
   merged (ties: lowest position wins), where ``quota(count) =
   max(1, floor(round_fraction * count))`` and ``count`` is the chunk's survivor count.
   Several A tokens may join one B token ("soft" matching).
4. The B token becomes the size-weighted mean of itself and the A tokens that joined
   it (K and V); sizes add up. Survivors keep their positions, so output order is the
   original positional order.

The computation is batched over chunks and heads; only the rounds are a Python loop.
Everything is computed in float32 and returned in the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "MergeResult", "chunked_soft_matching", "round_quota_table"]

#: Keys are divided by ``max(||k||, NORM_EPS)`` before the cosine similarity.
NORM_EPS = 1e-12


@dataclass
class MergeResult:
    """Output of one Chunked Soft Matching call over ``N`` chunks and ``H`` heads.

    Attributes:
        keys: ``[N, H, M, D]`` centroid keys in positional order, input dtype; ``M`` is the
            largest kept count over all (chunk, head); padding slots are zero.
        values: ``[N, H, M, Dv]`` centroid values, laid out like ``keys``.
        sizes: ``[N, H, M]`` float32, how many original tokens (in units of the input
            sizes) each slot stands for; 0 for padding slots.
        num_kept: ``[N, H]`` int64, how many slots each (chunk, head) kept.
        assignment: ``[N, H, C]`` int64, the output slot of every input token.
    """

    keys: Tensor
    values: Tensor
    sizes: Tensor
    num_kept: Tensor
    assignment: Tensor


def round_quota_table(chunk_size: int, round_fraction: float) -> list[int]:
    """Per-round merge quota ``max(1, floor(round_fraction * count))`` for count 0..C.

    Computed once in Python (double precision) so that the torch reference and the
    Triton kernel use exactly the same integers.
    """
    if not round_fraction > 0:
        raise ValueError(f"round_fraction must be > 0, got {round_fraction}")
    return [max(1, math.floor(round_fraction * c)) for c in range(chunk_size + 1)]


def check_merge_args(
    keys: Tensor,
    values: Tensor,
    sizes: Tensor | None,
    target: int | Tensor,
    protected: Tensor | None,
) -> None:
    """Validate the shapes shared by the reference and the Triton wrapper."""
    if keys.dim() != 4 or values.dim() != 4:
        raise ValueError("keys and values must be [N, H, C, D]")
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    n, h, c, _ = keys.shape
    if sizes is not None and tuple(sizes.shape) != (n, h, c):
        raise ValueError(f"sizes must be [N, H, C] = {(n, h, c)}, got {tuple(sizes.shape)}")
    if protected is not None and tuple(protected.shape) != (n, c):
        raise ValueError(f"protected must be [N, C] = {(n, c)}, got {tuple(protected.shape)}")
    if isinstance(target, Tensor):
        if tuple(target.shape) != (n,):
            raise ValueError(f"target must be an int or [N] = ({n},), got {tuple(target.shape)}")
        if n and int(target.min()) < 1:
            raise ValueError(f"every target must be >= 1, got min {int(target.min())}")
    elif target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    if sizes is not None and not bool((sizes > 0).all()):
        raise ValueError("sizes must be > 0 (a padding slot of size 0 cannot be merged)")


def chunked_soft_matching(
    keys: Tensor,
    values: Tensor,
    sizes: Tensor | None = None,
    *,
    target: int | Tensor,
    round_fraction: float,
    min_similarity: float,
    protected: Tensor | None = None,
    max_rounds: int | None = None,
) -> MergeResult:
    """Merge similar tokens of every chunk and head into size-weighted centroids.

    Args:
        keys: ``[N, H, C, D]`` post-RoPE keys (N chunks, H KV heads, C tokens per chunk).
        values: ``[N, H, C, Dv]`` values.
        sizes: ``[N, H, C]`` positive weights of the input tokens (default all 1), e.g.
            when re-merging slots that are already centroids.
        target: stop merging a (chunk, head) once it keeps at most this many slots; an
            int for every chunk, or an ``[N]`` integer tensor, one target per chunk.
        round_fraction: per round at most ``max(1, floor(round_fraction * count))`` A
            tokens merge, ``count`` being the survivors of that chunk and head.
        min_similarity: pairs with cosine similarity below this never merge.
        protected: ``[N, C]`` bool, tokens that never merge (neither as A nor as B),
            shared by all heads.
        max_rounds: optional cap on the number of rounds (default: until no change).

    Returns:
        A :class:`MergeResult`; slots are in positional order of their B token.
    """
    check_merge_args(keys, values, sizes, target, protected)
    n, h, c, d = keys.shape
    dev = keys.device
    quota_table = torch.tensor(round_quota_table(c, round_fraction), device=dev)
    if isinstance(target, Tensor):
        target = target.to(device=dev, dtype=torch.int64).view(n, 1)

    size = (
        torch.ones(n, h, c, device=dev, dtype=torch.float32)
        if sizes is None
        else sizes.to(torch.float32).clone(memory_format=torch.contiguous_format)
    )
    # Weighted sums, one row per (chunk, head, token): [ksum | vsum | size], updated in place
    # by one index_add_ per round. The centroid is ksum / size, and its direction (all that
    # cosine needs) is the direction of ksum.
    dv = values.shape[-1]
    sums = torch.empty(n, h, c, d + dv + 1, device=dev, dtype=torch.float32)
    sums[..., -1] = size
    if sizes is None:
        sums[..., :d] = keys
        sums[..., d:-1] = values
    else:
        torch.mul(keys, size[..., None], out=sums[..., :d])
        torch.mul(values, size[..., None], out=sums[..., d:-1])
    alive = torch.ones(n, h, c, device=dev, dtype=torch.bool)
    prot = (
        torch.zeros(n, 1, c, device=dev, dtype=torch.bool)
        if protected is None
        else protected.to(torch.bool)[:, None, :]
    )
    pos = torch.arange(c, device=dev)
    root = pos.expand(n, h, c).clone()  # current surviving slot of each input token
    flat_pos = root.view(-1).clone()  # the position of each (chunk, head, token) row
    inf = float("inf")

    # Row offsets turn [N, H, W] positions into row numbers of the [N*H*C, D] views
    # (index_select / index_add_ on rows are much faster than gather / scatter on CPU).
    row_base = (torch.arange(n * h, device=dev) * c).view(n, h, 1)
    rows = sums.view(-1, d + dv + 1)

    # Unit directions of the centroid keys, refreshed only for the rows a round changed.
    unit_rows = _normalized(rows[:, :d])
    # Scratch buffers reused by every round: on the CPU a fresh large tensor each round
    # costs more in page faults than the gather or product that fills it.
    work = _Workspace(dev)

    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        count = alive.sum(dim=-1)
        quota = torch.minimum(quota_table[count], (count - target).clamp_min(0))
        if not bool(quota.any()):  # every chunk and head is at its target
            break
        eligible = alive & ~prot
        # The eligible positions in order; even ranks form A, odd ranks B.
        rank = torch.cumsum(eligible, dim=-1,
                            out=work.take("rank", n * h * c, torch.int64).view(n, h, c)).sub_(1)
        e_idx, e_valid = _positions_of(eligible, rank, flat_pos)
        if e_idx.shape[-1] < 2:
            break
        a_idx, a_valid = e_idx[..., 0::2], e_valid[..., 0::2]
        b_idx, b_valid = e_idx[..., 1::2], e_valid[..., 1::2]

        flat_e = (e_idx + row_base).view(-1)
        ke = torch.index_select(unit_rows, 0, flat_e,
                                out=work.take("ke", flat_e.numel() * d, unit_rows.dtype).view(-1, d)
                                ).view(n, h, -1, d)
        ka, kb = ke[..., 0::2, :], ke[..., 1::2, :]
        # -inf on the padding columns, added by the batched product itself.
        b_pad = torch.zeros(b_valid.shape, dtype=ka.dtype, device=dev).masked_fill_(~b_valid, -inf)
        na, nb = ka.shape[-2], kb.shape[-2]
        sim = torch.baddbmm(b_pad[..., None, :].view(-1, 1, nb), ka.reshape(-1, na, d),
                            kb.reshape(-1, nb, d).transpose(-1, -2),
                            out=work.take("sim", n * h * na * nb, ka.dtype).view(-1, na, nb)
                            ).view(n, h, na, nb)
        best, best_j = sim.max(dim=-1)  # first maximum = lowest B position
        partner = b_idx.gather(2, best_j)

        candidate = a_valid & (best > -inf) & (best >= min_similarity)
        score = torch.where(candidate, best, -inf)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, _arange_like(order))
        sel_a = candidate & (rank < quota[..., None])  # ties: lowest A position first
        if not bool(sel_a.any()):
            break

        # Every selected A slot moves its weighted sums into its B partner (the A rows are
        # dead from here on and never read again, so they are not cleared).
        sel = sel_a.view(-1).nonzero().squeeze(1)
        src = (a_idx + row_base).view(-1).index_select(0, sel)
        dst_pos = partner.view(-1).index_select(0, sel)
        dst = (partner + row_base).view(-1).index_select(0, sel)
        moved = work.take("moved", src.numel() * rows.shape[1], rows.dtype).view(-1, rows.shape[1])
        rows.index_add_(0, dst, torch.index_select(rows, 0, src, out=moved))
        # A B row joined by several A rows appears several times; each copy writes the same.
        joined = torch.index_select(rows, 0, dst, out=moved)
        unit_rows.index_copy_(0, dst, _normalized(joined[:, :d]))

        alive.view(-1).index_fill_(0, src, False)
        target_of = work.take("target_of", n * h * c, torch.int64).view(n, h, c)
        target_of.copy_(pos.expand(n, h, c))
        target_of.view(-1).index_copy_(0, src, dst_pos)
        # Two root buffers in turn: gather's output must not alias its index.
        root = torch.gather(target_of, 2, root,
                            out=work.take(f"root{rounds % 2}", n * h * c, torch.int64).view(n, h, c))
        rounds += 1

    return _compact(keys.dtype, values.dtype, sums, d, alive, root)


def _positions_of(mask: Tensor, rank: Tensor, flat_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Positions where ``mask`` is set, in increasing order, padded to the batch maximum.

    ``rank`` holds each set position's index among the set ones of its row, ``flat_pos``
    the position of every element of the flattened mask. Returns
    ``(idx, valid)`` of shape ``[N, H, W]`` with ``W = max(mask.sum(-1))``; padding entries
    (``valid`` False) hold position 0.
    """
    n, h, c = mask.shape
    counts = mask.sum(dim=-1)
    width = int(counts.max())
    set_rows = mask.view(-1).nonzero().squeeze(1)  # flat (n, h, position) indices
    dest = (rank + (torch.arange(n * h, device=mask.device) * width).view(n, h, 1)).view(-1)
    idx = torch.zeros(n * h * width, dtype=torch.int64, device=mask.device)
    idx.index_copy_(0, dest.index_select(0, set_rows), flat_pos.index_select(0, set_rows))
    valid = torch.arange(width, device=mask.device) < counts[..., None]
    return idx.view(n, h, width), valid


class _Workspace:
    """Named flat scratch buffers, grown on demand and handed out as prefixes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """The first ``numel`` elements of the ``dtype`` buffer called ``name``, grown when
        too small."""
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:numel]


def _normalized(x: Tensor) -> Tensor:
    """``x / max(||x||, NORM_EPS)`` along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _arange_like(idx: Tensor) -> Tensor:
    """``0..W-1`` broadcast to the shape of ``idx`` (``[..., W]``)."""
    return torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)


def _compact(
    k_dtype: torch.dtype,
    v_dtype: torch.dtype,
    sums: Tensor,
    d: int,
    alive: Tensor,
    root: Tensor,
) -> MergeResult:
    """Gather the surviving slots (``sums`` = ``[N, H, C, D + Dv + 1]`` weighted key sums,
    value sums and sizes), in positional order, into a padded MergeResult."""
    n, h = sums.shape[:2]
    num_kept = alive.sum(dim=-1)
    m = int(num_kept.max())
    slot = torch.cumsum(alive, dim=-1) - 1
    src = alive.view(-1).nonzero().squeeze(1)  # surviving rows, in (n, h, position) order
    dst = (slot + (torch.arange(n * h, device=sums.device) * m).view(n, h, 1)).view(-1)[src]
    kept_rows = sums.view(-1, sums.shape[-1]).index_select(0, src)
    out_size = kept_rows[:, -1].contiguous()

    def compact_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
        out = x.new_zeros(n * h * m, x.shape[-1]).index_copy_(0, dst, x / out_size[:, None])
        return out.view(n, h, m, -1).to(dtype)

    return MergeResult(
        keys=compact_rows(kept_rows[:, :d], k_dtype),
        values=compact_rows(kept_rows[:, d:-1], v_dtype),
        sizes=out_size.new_zeros(n * h * m).index_copy_(0, dst, out_size).view(n, h, m),
        num_kept=num_kept,
        assignment=slot.gather(2, root),
    )
