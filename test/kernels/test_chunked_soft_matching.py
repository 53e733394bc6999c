"""Tests of Chelsea's Chunked Soft Matching (torch reference and Triton kernel) and of
attention over merged slots with the log(size) bias."""

from __future__ import annotations

import math

import pytest
import torch
from sglang_chelsea.kernels.chunked_soft_matching import (
    NORM_EPS,
    MergeResult,
    chunked_soft_matching,
)
from sglang_chelsea.kernels.merged_attention_ref import attention_with_size_bias
from torch import Tensor
from utils.triton_env import DEV, require_triton


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws the same random numbers whatever ran before it."""
    torch.manual_seed(0)


def _merge(keys: Tensor, values: Tensor | None = None, **kwargs: object) -> MergeResult:
    """Call the reference with defaults that merge freely (no similarity floor)."""
    args: dict = {"target": 1, "round_fraction": 0.5, "min_similarity": -1.0}
    args.update(kwargs)
    values = torch.randn_like(keys) if values is None else values
    return chunked_soft_matching(keys, values, **args)


def _check_centroids(
    keys: Tensor, values: Tensor, sizes: Tensor, out: MergeResult, tol: float = 1e-5
) -> None:
    """Every output slot is the size-weighted mean of the input tokens assigned to it."""
    keys, values = keys.float(), values.float()
    n, h, _, d = keys.shape
    m = out.keys.shape[2]
    exp_size = torch.zeros(n, h, m).scatter_add_(2, out.assignment, sizes)
    exp_k = torch.zeros(n, h, m, d).scatter_add_(
        2, out.assignment[..., None].expand(-1, -1, -1, d), keys * sizes[..., None]
    )
    exp_v = torch.zeros(n, h, m, values.shape[-1]).scatter_add_(
        2, out.assignment[..., None].expand(-1, -1, -1, values.shape[-1]), values * sizes[..., None]
    )
    used = exp_size > 0
    denom = exp_size.clamp_min(1e-30)[..., None]
    torch.testing.assert_close(out.sizes, exp_size)
    for got, total in ((out.keys, exp_k), (out.values, exp_v)):
        torch.testing.assert_close(got.float()[used], (total / denom)[used], rtol=tol, atol=tol)
    assert torch.equal(used.sum(-1), out.num_kept)
    assert torch.equal(out.sizes > 0, torch.arange(m) < out.num_kept[..., None])


def _naive_merge(
    keys: Tensor,
    values: Tensor,
    sizes: Tensor,
    target: int,
    round_fraction: float,
    min_similarity: float,
    protected: Tensor,
) -> tuple[Tensor, Tensor]:
    """The rules written out with Python lists for one (chunk, head): (assignment, sizes)."""
    slots = [
        {"pos": i, "k": keys[i] * sizes[i], "v": values[i] * sizes[i], "s": float(sizes[i])}
        for i in range(keys.shape[0])
    ]
    owner = list(range(keys.shape[0]))  # input token -> surviving position
    while True:
        eligible = [sl for sl in slots if not protected[sl["pos"]]]
        a_set, b_set = eligible[0::2], eligible[1::2]
        if not b_set:
            break
        count = len(slots)
        quota = min(max(1, math.floor(round_fraction * count)), max(count - target, 0))
        kb = torch.stack([b["k"] / b["k"].norm().clamp_min(NORM_EPS) for b in b_set])
        cands = []
        for a in a_set:
            sims = kb @ (a["k"] / a["k"].norm().clamp_min(NORM_EPS))
            j = int(torch.argmax(sims))
            if float(sims[j]) >= min_similarity:
                cands.append((-float(sims[j]), a["pos"], a, b_set[j]))
        cands.sort(key=lambda x: (x[0], x[1]))
        chosen = cands[:quota]
        if not chosen:
            break
        for _, _, a, b in chosen:
            b["k"] = b["k"] + a["k"]
            b["v"] = b["v"] + a["v"]
            b["s"] += a["s"]
            owner = [b["pos"] if o == a["pos"] else o for o in owner]
        gone = {a["pos"] for _, _, a, _ in chosen}
        slots = [sl for sl in slots if sl["pos"] not in gone]
    slot_of = {sl["pos"]: i for i, sl in enumerate(slots)}
    return torch.tensor([slot_of[o] for o in owner]), torch.tensor([sl["s"] for sl in slots])


def _planted_keys(n: int, h: int, c: int, d: int, seed: int = 0) -> Tensor:
    """Keys with contiguous runs of similar directions (like real keys along a sequence)."""
    gen = torch.Generator().manual_seed(seed)
    label = (torch.rand(n, h, c, generator=gen) < 0.25).long().cumsum(-1)  # run index
    centers = torch.randn(n, h, c + 1, d, generator=gen)
    base = centers.gather(2, label[..., None].expand(-1, -1, -1, d))
    return base + 0.3 * torch.randn(n, h, c, d, generator=gen)


def test_planted_clusters_recovered() -> None:
    n, h, c, d = 2, 3, 64, 32
    directions = torch.linalg.qr(torch.randn(d, d))[0][:4] * 5.0  # orthogonal, norm 5
    lengths = torch.tensor([10, 21, 14, 19])  # contiguous clusters along the chunk
    label = torch.repeat_interleave(torch.arange(4), lengths)
    keys = directions[label].expand(n, h, c, d) + 0.01 * torch.randn(n, h, c, d)
    out = _merge(keys, target=4, min_similarity=0.5)
    assert torch.equal(out.num_kept, torch.full((n, h), 4))
    assert torch.equal(out.assignment, label.expand(n, h, c))
    assert torch.equal(out.sizes, lengths.float().expand(n, h, 4))


def test_needle_never_merges_below_similarity_floor() -> None:
    c, d = 32, 16
    keys = torch.ones(1, 1, c, d) + 0.01 * torch.randn(1, 1, c, d)
    needle = torch.zeros(d)
    needle[0], needle[1] = 1.0, -1.0  # orthogonal to the all-ones direction
    keys[0, 0, 13] = needle
    out = _merge(keys, target=1, min_similarity=0.5)
    slot = int(out.assignment[0, 0, 13])
    assert int((out.assignment[0, 0] == slot).sum()) == 1
    assert float(out.sizes[0, 0, slot]) == 1.0
    assert torch.equal(out.keys[0, 0, slot], needle)
    assert int(out.num_kept) > 1  # the similarity floor stops short of the target


def test_sizes_and_centroids_are_size_weighted_means() -> None:
    n, h, c, d = 3, 2, 48, 16
    keys = _planted_keys(n, h, c, d)
    values = torch.randn(n, h, c, 24)
    sizes = torch.randint(1, 5, (n, h, c)).float()
    out = chunked_soft_matching(
        keys, values, sizes, target=10, round_fraction=0.25, min_similarity=0.2
    )
    torch.testing.assert_close(out.sizes.sum(-1), sizes.sum(-1))
    _check_centroids(keys, values, sizes, out)
    unit = _merge(keys, values, target=10)
    assert torch.equal(unit.sizes.sum(-1), torch.full((n, h), float(c)))
    _check_centroids(keys, values, torch.ones(n, h, c), unit)


def test_centroid_of_identical_keys_is_that_key() -> None:
    c = 40
    key = torch.randn(16)
    keys = key.expand(1, 2, c, 16).clone()
    values = torch.randn(1, 2, c, 16)
    out = _merge(keys, values, target=1, round_fraction=0.3)
    assert torch.equal(out.num_kept, torch.ones(1, 2, dtype=torch.long))
    torch.testing.assert_close(out.keys[0, :, 0], key.expand(2, 16), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.values[0, :, 0], values[0].mean(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.sizes, torch.full((1, 2, 1), float(c)))


def test_hand_example_two_rounds_uses_merged_sizes() -> None:
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]).view(1, 1, 4, 2)
    values = torch.tensor([[1.0], [3.0], [6.0], [12.0]]).view(1, 1, 4, 1)
    sizes = torch.tensor([1.0, 1.0, 1.0, 5.0]).view(1, 1, 4)
    kwargs = {"target": 1, "round_fraction": 0.5, "min_similarity": -1.0}
    # Round 1: A = {0, 2}, B = {1, 3}; quota 2 -> 0 joins 1, 2 joins 3.
    one = chunked_soft_matching(keys, values, sizes, max_rounds=1, **kwargs)
    assert one.assignment.tolist() == [[[0, 0, 1, 1]]]
    torch.testing.assert_close(one.sizes, torch.tensor([[[2.0, 6.0]]]))
    torch.testing.assert_close(one.keys, torch.tensor([[[[1.0, 0.05], [0.5 / 6, 1.0]]]]))
    torch.testing.assert_close(one.values, torch.tensor([[[[2.0], [66.0 / 6]]]]))
    # Round 2: A = {1 (size 2)}, B = {3 (size 6)}: weights are the merged sizes.
    two = chunked_soft_matching(keys, values, sizes, **kwargs)
    assert two.assignment.tolist() == [[[0, 0, 0, 0]]]
    torch.testing.assert_close(two.sizes, torch.tensor([[[8.0]]]))
    torch.testing.assert_close(two.keys, torch.tensor([[[[2.5 / 8, 6.1 / 8]]]]))
    torch.testing.assert_close(two.values, torch.tensor([[[[70.0 / 8]]]]))


def test_protected_tokens_are_untouched() -> None:
    n, h, c, d = 2, 2, 32, 8
    keys = torch.ones(n, h, c, d) + 0.01 * torch.randn(n, h, c, d)  # all mutually similar
    values = torch.randn(n, h, c, d)
    protected = torch.zeros(n, c, dtype=torch.bool)
    protected[:, :2] = True  # attention sinks
    protected[1, 17] = True
    out = _merge(keys, values, target=1, protected=protected)
    for i, j in protected.nonzero().tolist():
        for head in range(h):
            slot = int(out.assignment[i, head, j])
            assert int((out.assignment[i, head] == slot).sum()) == 1
            assert float(out.sizes[i, head, slot]) == 1.0
            assert torch.equal(out.keys[i, head, slot], keys[i, head, j])
            assert torch.equal(out.values[i, head, slot], values[i, head, j])
    # The partition skips protected tokens, so everything else ends in one slot.
    assert out.num_kept.tolist() == [[3, 3], [4, 4]]


def test_slots_keep_positional_order() -> None:
    # Token 0 (A) joins token 3 (B); token 2 (A) is too far from any B: slots = [1, 2, 3].
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.01]]).view(1, 1, 4, 2)
    out = _merge(keys, target=1, round_fraction=0.25, min_similarity=0.5)
    assert out.assignment.tolist() == [[[2, 0, 1, 2]]]
    torch.testing.assert_close(out.keys[0, 0, :2], keys[0, 0, 1:3])
    assert out.sizes.tolist() == [[[1.0, 1.0, 2.0]]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_naive_rules(seed: int) -> None:
    n, h, c, d = 2, 2, 24, 8
    keys = _planted_keys(n, h, c, d, seed=seed)
    values = torch.randn(n, h, c, d)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 4, (n, h, c), generator=gen).float()
    protected = torch.rand(n, c, generator=gen) < 0.15
    kwargs = {"target": 5, "round_fraction": 0.2, "min_similarity": 0.3}
    out = chunked_soft_matching(keys, values, sizes, protected=protected, **kwargs)
    for i in range(n):
        for j in range(h):
            assign, slot_sizes = _naive_merge(
                keys[i, j], values[i, j], sizes[i, j], protected=protected[i], **kwargs
            )
            assert torch.equal(out.assignment[i, j], assign)
            assert int(out.num_kept[i, j]) == len(slot_sizes)
            torch.testing.assert_close(out.sizes[i, j, : len(slot_sizes)], slot_sizes)
    _check_centroids(keys, values, sizes, out)


def test_heads_with_different_counts_are_padded() -> None:
    c, d = 16, 16
    keys = torch.empty(1, 2, c, d)
    keys[0, 0] = torch.randn(d)  # head 0: identical keys -> one slot
    keys[0, 1] = torch.eye(d)  # head 1: orthogonal keys -> nothing merges
    values = torch.randn(1, 2, c, d)
    out = _merge(keys, values, target=1, min_similarity=0.5)
    assert out.num_kept.tolist() == [[1, c]]
    assert out.keys.shape == (1, 2, c, d)
    assert out.sizes[0, 0].tolist() == [float(c)] + [0.0] * (c - 1)
    assert torch.equal(out.keys[0, 0, 1:], torch.zeros(c - 1, d))
    assert torch.equal(out.values[0, 0, 1:], torch.zeros(c - 1, d))
    assert torch.equal(out.keys[0, 1], keys[0, 1])
    assert torch.equal(out.assignment[0, 1], torch.arange(c))


def test_round_fraction_limits_merges_per_round() -> None:
    c = 64
    keys = torch.ones(2, 1, c, 8) + 0.01 * torch.randn(2, 1, c, 8)  # every pair similar
    counts = [c]
    while counts[-1] > 16:  # the expected count after each round of quota floor(c / 8)
        counts.append(max(16, counts[-1] - max(1, counts[-1] // 8)))
    for rounds, expected in enumerate(counts):
        out = _merge(keys, target=16, round_fraction=0.125, max_rounds=rounds)
        assert out.num_kept.tolist() == [[expected]] * 2, rounds
    assert len(counts) - 1 == 12  # 64 56 49 43 38 34 30 27 24 21 19 17 16
    # The quota is capped by |A| (half the survivors) and by the target.
    assert _merge(keys, round_fraction=0.9, max_rounds=1).num_kept.tolist() == [[32]] * 2
    assert _merge(keys, target=60, round_fraction=0.9).num_kept.tolist() == [[60]] * 2


def test_bf16_inputs_return_bf16() -> None:
    keys = _planted_keys(1, 2, 32, 16).to(torch.bfloat16)
    values = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    out = _merge(keys, values, target=8)
    assert out.keys.dtype == torch.bfloat16 and out.values.dtype == torch.bfloat16
    assert out.sizes.dtype == torch.float32
    _check_centroids(keys, values, torch.ones(1, 2, 32), out, tol=1e-2)


def test_attention_with_size_bias_equals_full_attention() -> None:
    hkv, group, c, d = 2, 3, 48, 16
    # Contiguous groups of identical keys, distinct values: merging is exact here.
    lengths = torch.tensor([5, 1, 12, 7, 3, 20])
    groups = torch.randn(hkv, len(lengths), d)
    keys = groups.repeat_interleave(lengths, dim=1)
    values = torch.randn(hkv, c, d)
    q = torch.randn(hkv * group, 4, d)
    out = chunked_soft_matching(
        keys[None], values[None], target=1, round_fraction=0.5, min_similarity=0.9999
    )
    assert out.num_kept.tolist() == [[len(lengths)] * hkv]
    merged = attention_with_size_bias(q, out.keys[0], out.values[0], out.sizes[0])
    full = attention_with_size_bias(q, keys, values, torch.ones(hkv, c))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    )
    torch.testing.assert_close(full, sdpa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-6)

    # C identical tokens in one slot of size C; a padding slot of size 0 is ignored.
    key, junk = torch.randn(1, 1, d), torch.randn(1, 1, d)
    one = attention_with_size_bias(
        q[:1],
        torch.cat([key, junk], 1),
        torch.cat([values[:1, :1], junk], 1),
        torch.tensor([[float(c), 0.0]]),
    )
    many = attention_with_size_bias(
        q[:1], key.expand(1, c, d), values[:1, :1].expand(1, c, d), torch.ones(1, c)
    )
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-6)


def test_attention_causal_offset() -> None:
    q, k, v = torch.randn(4, 3, 8), torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    out = attention_with_size_bias(q, k, v, torch.ones(2, 10), causal_offset=7)
    mask = torch.arange(10)[None, :] <= 7 + torch.arange(3)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), attn_mask=mask
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_per_chunk_targets_equal_separate_calls() -> None:
    keys = _planted_keys(3, 2, 32, 16, seed=5)
    values = torch.randn(3, 2, 32, 16)
    targets = torch.tensor([4, 9, 17])
    out = _merge(keys, values, target=targets, round_fraction=0.25, min_similarity=-1.0)
    assert out.num_kept.tolist() == [[4, 4], [9, 9], [17, 17]]
    for i, t in enumerate(targets.tolist()):
        one = _merge(keys[i : i + 1], values[i : i + 1], target=t, round_fraction=0.25)
        assert torch.equal(one.assignment, out.assignment[i : i + 1])
        m = int(one.num_kept.max())
        torch.testing.assert_close(one.keys, out.keys[i : i + 1, :, :m])
    with pytest.raises(ValueError, match="target"):
        _merge(keys, values, target=torch.tensor([4, 0, 2]))
    with pytest.raises(ValueError, match="target"):
        _merge(keys, values, target=torch.tensor([4, 4]))


@pytest.mark.parametrize(
    ("c", "target", "dtype"),
    [(64, 16, torch.float32), (128, 64, torch.float32), (48, 12, torch.bfloat16)],
)
def test_triton_kernel_matches_reference(c: int, target: int, dtype: torch.dtype) -> None:
    require_triton()
    from sglang_chelsea.kernels.chunked_soft_matching_triton import (
        chunked_soft_matching_triton,
    )

    n, h, d = 2, 2 if c == 128 else 4, 32  # at most 8 programs under the interpreter
    keys = _planted_keys(n, h, c, d, seed=c).to(dtype)
    values = torch.randn(n, h, c, 40).to(dtype)
    sizes = torch.randint(1, 4, (n, h, c)).float()
    protected = torch.zeros(n, c, dtype=torch.bool)
    protected[:, :2] = True
    protected[1, c // 2] = True
    kwargs = {"round_fraction": 0.25, "min_similarity": 0.1}
    dev = DEV
    keys, values, sizes, protected = (t.to(dev) for t in (keys, values, sizes, protected))
    per_chunk = torch.tensor([target, target + 3], device=dev)
    for args in ({"sizes": sizes, "protected": protected, "target": target},
                 {"target": target}, {"target": per_chunk}):
        ref = chunked_soft_matching(keys, values, **args, **kwargs)
        tri = chunked_soft_matching_triton(keys, values, **args, **kwargs)
        assert torch.equal(tri.assignment, ref.assignment)
        assert torch.equal(tri.num_kept, ref.num_kept)
        assert tri.keys.dtype == dtype and tri.keys.shape == ref.keys.shape
        torch.testing.assert_close(tri.sizes, ref.sizes)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(tri.keys, ref.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(tri.values, ref.values, rtol=tol, atol=tol)
