"""Sampler: greedy, filters, seeded reproducibility, distribution, penalties, logprobs."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from sglang_chelsea.sampling import filters
from sglang_chelsea.sampling.penalties import (
    apply_min_new_tokens_mask,
    apply_penalties,
    min_new_tokens_banned_ids,
    token_counts,
)
from sglang_chelsea.sampling.sampler import (
    Sampler,
    SamplingBatchInfo,
    compute_top_logprobs,
    logprobs_of,
    make_generator,
)
from sglang_chelsea.sampling.sampling_params import SamplingParams

V = 32


def _info(
    params: list[SamplingParams], gens: Optional[list[Optional[torch.Generator]]] = None
) -> SamplingBatchInfo:
    return SamplingBatchInfo.from_params(params, gens, V)


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_leaves_logits_untouched() -> None:
    logits = _logits(6)
    before = logits.clone()
    out = Sampler(random_seed=0)(logits, _info([SamplingParams(temperature=0.0)] * 6))
    assert torch.equal(out.next_token_ids, logits.argmax(dim=-1))
    assert torch.equal(logits, before)


def test_top_k_1_and_tiny_top_p_equal_greedy_in_a_mixed_batch() -> None:
    logits = _logits(3)
    params = [SamplingParams(top_k=1, temperature=1.5), SamplingParams(top_p=1e-6),
              SamplingParams(temperature=1.0)]
    for step in range(10):
        out = Sampler(random_seed=step)(logits, _info(params))
        assert out.next_token_ids[:2].tolist() == logits[:2].argmax(dim=-1).tolist()


def test_top_k_and_min_p_restrict_the_support() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(400, 4).contiguous()
    sampler = Sampler(random_seed=1)
    info = SamplingBatchInfo.from_params([SamplingParams(min_p=0.5)] * 400, None, 4)
    seen = set(sampler(logits, info).next_token_ids.tolist())
    assert seen == {0, 1}  # min_p threshold 0.25 keeps 0.5 and 0.3
    info = SamplingBatchInfo.from_params([SamplingParams(top_k=3)] * 400, None, 4)
    assert set(sampler(logits, info).next_token_ids.tolist()) == {0, 1, 2}
    info = SamplingBatchInfo.from_params([SamplingParams(top_p=0.7)] * 400, None, 4)
    assert set(sampler(logits, info).next_token_ids.tolist()) == {0, 1}


def test_candidate_shortcut_matches_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = torch.softmax(_logits(6), dim=-1)
    top_ks = torch.tensor([V, 10, 3, V, 2, V])
    top_ps = torch.tensor([0.3, 1.0, 0.9, 0.999, 1.0, 1.0])
    min_ps = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.0])
    shortcut = filters.filter_probs(probs, top_ks, top_ps, min_ps)
    monkeypatch.setattr(filters, "TOP_CANDIDATES", 4)  # rows 1 and 3 need the full sort
    assert torch.equal(filters.filter_probs(probs, top_ks, top_ps, min_ps), shortcut)
    assert torch.equal(shortcut[5], probs[5])  # filters off: untouched
    assert int((shortcut[2] > 0).sum()) <= 3 and int((shortcut[0] > 0).sum()) >= 1


def _run_seeded(position: int, others: list[SamplingParams], steps: int = 15) -> list[int]:
    """The tokens of a seeded request placed at ``position`` among ``others``."""
    target = SamplingParams(temperature=1.3, top_p=0.97, seed=1234)
    params = others[:position] + [target] + others[position:]
    gens = [make_generator(p.seed) if p.seed is not None else None for p in params]
    info = _info(params, gens)
    sampler = Sampler(random_seed=position)
    tokens = []
    for step in range(steps):
        logits = _logits(len(params), seed=100 + step + 7 * position)
        logits[position] = _logits(1, seed=step)[0]
        tokens.append(int(sampler(logits, info).next_token_ids[position]))
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    alone = _run_seeded(0, [])
    mixed = [SamplingParams(top_p=0.8), SamplingParams(top_k=4, seed=9),
             SamplingParams(temperature=0.0), SamplingParams(min_p=0.2)]
    assert _run_seeded(2, mixed) == alone
    assert _run_seeded(4, mixed) == alone
    assert _run_seeded(1, mixed[:2]) == alone
    assert len(set(alone)) > 3  # it really samples


def test_distribution_follows_softmax() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    n = 4000
    for temperature in (1.0, 2.0):
        params = [SamplingParams(temperature=temperature)] * n
        info = SamplingBatchInfo.from_params(params, None, 4)
        logits = probs.log().float().expand(n, 4).contiguous()
        counts = torch.bincount(Sampler(random_seed=7)(logits, info).next_token_ids, minlength=4)
        expected = torch.softmax(probs.log() / temperature, dim=0) * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.27, (temperature, counts.tolist())  # df=3, p=0.001


def test_penalties_on_a_hand_made_example() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = token_counts([[0, 0, 1]], 4)
    assert counts.tolist() == [[2.0, 1.0, 0.0, 0.0]]
    one = torch.ones(1)
    out = apply_penalties(logits.clone(), counts, 0.5 * one, 0.25 * one, one)
    assert out.tolist() == [[0.75, -1.75, 0.5, 1.0]]
    out = apply_penalties(logits.clone(), counts, 0 * one, 0 * one, 2 * one)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    # Through the sampler: greedy argmax moves from token 0 to token 3.
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    info = SamplingBatchInfo.from_params([params], None, 4)
    assert Sampler()(logits, info, output_ids=[[0, 0, 1]]).next_token_ids.tolist() == [3]


def test_min_new_tokens_mask() -> None:
    params = SamplingParams(min_new_tokens=2, stop_token_ids=[7])
    assert min_new_tokens_banned_ids(params, 1, [2]) == [2, 7]
    assert min_new_tokens_banned_ids(params, 2, [2]) == []
    logits = torch.zeros(2, 4)
    apply_min_new_tokens_mask(logits, [1], [[0, 3]])
    assert logits[1].tolist() == [-math.inf, 0.0, 0.0, -math.inf] and logits[0].sum() == 0
    logits = _logits(2)
    info = _info([SamplingParams(temperature=0.0)] * 2)
    best = int(logits[0].argmax())
    out = Sampler()(logits, info, banned_ids=[[best], []])
    assert int(out.next_token_ids[0]) == int(logits[0].topk(2).indices[1])
    assert int(out.next_token_ids[1]) == int(logits[1].argmax())


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = _logits(4)
    params = [SamplingParams(temperature=0.7, repetition_penalty=1.5), SamplingParams(top_k=3),
              SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)]
    out = Sampler(random_seed=3)(logits, _info(params), output_ids=[[1, 2], [], [], [5]],
                                 top_logprobs_nums=[2, 0, 1, 0])
    expected = torch.log_softmax(logits, dim=-1).gather(1, out.next_token_ids[:, None])[:, 0]
    assert out.logprobs is not None and torch.allclose(out.logprobs, expected)
    assert out.top_logprobs is not None and [len(t) for t in out.top_logprobs] == [2, 0, 1, 0]
    top_id = int(logits[2].argmax())
    assert out.top_logprobs[2][0][1] == top_id
    assert math.isclose(out.top_logprobs[2][0][0], float(expected[2]), rel_tol=1e-6)
    # SGLang's default reporting: after temperature.
    sampler = Sampler(random_seed=3, return_original_logprob=False)
    out = sampler(logits, _info([SamplingParams(temperature=0.5)] * 4))
    scaled = torch.log_softmax(logits / 0.5, dim=-1)
    assert out.logprobs is not None
    assert torch.allclose(out.logprobs, scaled.gather(1, out.next_token_ids[:, None])[:, 0])


def test_compute_top_logprobs_and_logprobs_of() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0]]), dim=-1)
    top = compute_top_logprobs(logprobs, [2, 1])
    assert [[i for _, i in row] for row in top] == [[1, 2], [0]]
    assert compute_top_logprobs(logprobs, 0) == [[], []]
    assert len(compute_top_logprobs(logprobs, 10)[0]) == 3
    logits = _logits(5)
    ids = torch.tensor([0, 3, 7, 31, 2])
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(5), ids]
    assert torch.allclose(logprobs_of(logits, ids), expected, atol=1e-6)


# ---------------------------------------------------------------------- grammar masks
def test_allowed_mask_constrains_greedy_and_sampled_rows() -> None:
    logits = _logits(4, seed=5)
    allowed = torch.zeros(4, V, dtype=torch.bool)
    allowed[:, [3, 7, 11]] = True
    allowed[3] = True  # an unconstrained row in the same batch
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=2.0, top_k=2), SamplingParams(temperature=0)]
    sampler = Sampler(random_seed=0)
    seen: set[int] = set()
    for _ in range(60):
        out = sampler(logits, _info(params), allowed=allowed)
        ids = out.next_token_ids.tolist()
        assert ids[0] == max([3, 7, 11], key=lambda t: logits[0, t].item())
        assert ids[1] in (3, 7, 11) and ids[2] in (3, 7, 11)
        assert ids[3] == logits[3].argmax().item()
        seen.add(ids[1])
    assert len(seen) >= 2  # still sampled, not collapsed to one token


def test_complete_grammar_ends_with_the_mass_of_forbidden_tokens() -> None:
    eos = 0
    logits = torch.full((2, V), -5.0)
    logits[:, 1] = 2.0  # a token the grammar forbids, the model's favourite
    logits[:, 2] = 1.0  # an allowed continuation
    logits[:, eos] = 0.0
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[:, [eos, 2]] = True
    greedy = _info([SamplingParams(temperature=0)] * 2)
    ends = torch.tensor([eos, -1])
    out = Sampler()(logits, greedy, allowed=allowed, end_token_ids=ends)
    # Row 0 may end: EOS carries exp(0) + exp(2) + ... > exp(1). Row 1 may not merge.
    assert out.next_token_ids.tolist() == [eos, 2]
    assert logits[0, eos].item() == 0.0  # the caller's logits are left as they were


def test_grammar_mask_overrides_a_ban_that_would_leave_no_token() -> None:
    logits = _logits(1, seed=9)
    allowed = torch.zeros(1, V, dtype=torch.bool)
    allowed[0, 4] = True  # the grammar allows only token 4 (say EOS) ...
    out = Sampler()(logits, _info([SamplingParams(temperature=1.0)]), banned_ids=[[4]],
                    allowed=allowed)  # ... which min_new_tokens bans
    assert out.next_token_ids.tolist() == [4]


def test_logit_bias_moves_greedy_and_sampled_choices_per_row() -> None:
    logits = _logits(3, seed=4)
    top = logits.argmax(dim=-1)
    target = (top + 1) % V
    params = [
        SamplingParams.from_dict({"temperature": 0, "logit_bias": {str(int(target[0])): 100}}),
        SamplingParams.from_dict({"temperature": 0}),  # no bias: its argmax stays
        # Sampled, with the row's argmax banned by -100 and another token pushed up.
        SamplingParams.from_dict({"temperature": 1.0, "logit_bias": {
            str(int(top[2])): -100, str(int(target[2])): 50}}),
    ]
    before = logits.clone()
    out = Sampler(random_seed=0)(logits, _info(params))
    assert out.next_token_ids.tolist() == [int(target[0]), int(top[1]), int(target[2])]
    assert torch.equal(logits, before)
    # Reported logprobs are those of the raw logits (SGLang's original logprobs).
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.next_token_ids[:, None]).squeeze(1))
