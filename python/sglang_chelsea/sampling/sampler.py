"""Batched next-token sampler: penalties, logit bias, temperature, top-k / top-p / min-p,
seeded draws.

Every sampled row draws one uniform number per step and picks the token by inverse CDF over
its filtered distribution in vocabulary order (see ``filters``), so a request with a ``seed``
(its own ``torch.Generator``, advanced once per step) gets the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from sglang_chelsea.sampling.filters import filter_probs, sample_inverse_cdf
from sglang_chelsea.sampling.penalties import (
    apply_min_new_tokens_mask,
    apply_penalties,
    token_counts,
)
from sglang_chelsea.sampling.sampling_params import SamplingParams

TopLogprobs = list[list[tuple[float, int]]]  # per row: (logprob, token_id), best first


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for one request's ``seed`` (any int; taken modulo 2**64)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed % (1 << 64))
    return generator


@dataclass
class SamplingBatchInfo:
    """The sampling parameters of a batch as tensors, built once per batch composition."""

    temperatures: Tensor  # [B, 1] float32; 1.0 on greedy rows
    top_ps: Tensor  # [B] float32
    top_ks: Tensor  # [B] int64; -1 replaced by vocab_size
    min_ps: Tensor  # [B] float32
    greedy: Tensor  # [B] bool
    is_all_greedy: bool
    frequency_penalties: Tensor  # [B] float32
    presence_penalties: Tensor  # [B] float32
    repetition_penalties: Tensor  # [B] float32
    need_penalties: bool
    generators: list[Optional[torch.Generator]]  # per row; None: the sampler's own
    vocab_size: int
    # logit_bias of every row as (rows, token ids, biases), added to the logits; None: none.
    logit_bias: Optional[tuple[Tensor, Tensor, Tensor]] = None

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        generators: Optional[Sequence[Optional[torch.Generator]]],
        vocab_size: int,
    ) -> SamplingBatchInfo:
        """Gather ``params`` (verified) into tensors. ``generators[i]`` is request i's own
        generator (see :func:`make_generator`) or ``None``; ``None`` for the list: all None."""
        gens: list[Optional[torch.Generator]] = (
            list(generators) if generators is not None else [None] * len(params)
        )
        if len(gens) != len(params):
            raise ValueError("generators must have one entry per request")

        def col(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32)

        greedy = [p.is_greedy() for p in params]
        top_ks = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]
        return cls(
            temperatures=col([1.0 if g else p.temperature for p, g in zip(params, greedy)])
            .unsqueeze(1),
            top_ps=col([p.top_p for p in params]),
            top_ks=torch.tensor(top_ks, dtype=torch.long),
            min_ps=col([p.min_p for p in params]),
            greedy=torch.tensor(greedy, dtype=torch.bool),
            is_all_greedy=all(greedy),
            frequency_penalties=col([p.frequency_penalty for p in params]),
            presence_penalties=col([p.presence_penalty for p in params]),
            repetition_penalties=col([p.repetition_penalty for p in params]),
            need_penalties=any(
                p.frequency_penalty != 0.0
                or p.presence_penalty != 0.0
                or p.repetition_penalty != 1.0
                for p in params
            ),
            generators=gens,
            vocab_size=vocab_size,
            logit_bias=_logit_bias_entries(params),
        )


def _logit_bias_entries(params: Sequence[SamplingParams]
                        ) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """The rows' ``logit_bias`` entries as three flat tensors (row, token id, bias)."""
    rows: list[int] = []
    ids: list[int] = []
    biases: list[float] = []
    for i, p in enumerate(params):
        for key, bias in (p.logit_bias or {}).items():
            rows.append(i)
            ids.append(int(key))
            biases.append(bias)
    if not rows:
        return None
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
            torch.tensor(biases, dtype=torch.float32))


@dataclass
class SampleOutput:
    """The result of one sampling step."""

    next_token_ids: Tensor  # [B] int64
    logprobs: Optional[Tensor]  # [B] float32 logprob of each chosen token
    top_logprobs: Optional[TopLogprobs]  # per row, when top_logprobs_nums was given


class Sampler:
    """Chooses the next token of every row of a batch of logits.

    ``return_original_logprob=True`` reports ``log_softmax`` of the raw logits (SGLang with
    ``SGLANG_RETURN_ORIGINAL_LOGPROB``); ``False`` reports it after penalties, the
    min_new_tokens mask and temperature, before top-k/top-p/min-p (SGLang's default).
    ``random_seed`` seeds the generator used by rows without their own.
    """

    def __init__(self, random_seed: Optional[int] = None, return_original_logprob: bool = True):
        self.generator = torch.Generator(device="cpu")
        if random_seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(random_seed % (1 << 64))
        self.return_original_logprob = return_original_logprob

    def __call__(
        self,
        logits: Tensor,
        info: SamplingBatchInfo,
        output_ids: Optional[Sequence[Sequence[int]]] = None,
        banned_ids: Optional[Sequence[Sequence[int]]] = None,
        return_logprob: bool = True,
        top_logprobs_nums: Optional[Sequence[int]] = None,
        allowed: Optional[Tensor] = None,
        end_token_ids: Optional[Tensor] = None,
    ) -> SampleOutput:
        """Sample one token per row of ``logits [B, V]`` (left unmodified).

        ``output_ids[i]``: the tokens request i generated so far (for penalties; None: none).
        ``banned_ids[i]``: ids row i may not produce now (see ``min_new_tokens_banned_ids``).
        ``top_logprobs_nums[i]``: how many top logprobs to return for row i.
        ``allowed``: bool ``[B, V]``, the tokens each row's grammar permits (None: all), applied
        before greedy and sampled choices alike; it overrides ``banned_ids`` where the two
        together would leave a row no token. ``end_token_ids [B]``: see
        :func:`apply_allowed_mask` (-1 on rows without one).
        """
        if logits.dim() != 2 or logits.shape[0] != info.batch_size:
            raise ValueError(f"logits must be [{info.batch_size}, V], got {tuple(logits.shape)}")
        x = logits.to(torch.float32, copy=True)
        if info.need_penalties and output_ids is not None:
            counts = token_counts(output_ids, x.shape[1])
            apply_penalties(
                x, counts, info.frequency_penalties, info.presence_penalties,
                info.repetition_penalties,
            )
        if info.logit_bias is not None:
            rows, ids, biases = info.logit_bias
            x.index_put_((rows, ids), biases, accumulate=True)
        if banned_ids is not None:
            rows = [i for i, ids in enumerate(banned_ids) if ids]
            apply_min_new_tokens_mask(x, rows, [banned_ids[i] for i in rows])
        if allowed is not None:
            x = apply_allowed_mask(x, logits, allowed, end_token_ids)

        if info.is_all_greedy:
            next_ids = x.argmax(dim=-1)
        else:
            x = x / info.temperatures
            probs = torch.softmax(x, dim=-1)
            probs = filter_probs(probs, info.top_ks, info.top_ps, info.min_ps)
            sampled = sample_inverse_cdf(probs, self._uniforms(info))
            next_ids = torch.where(info.greedy, x.argmax(dim=-1), sampled)

        top_nums = list(top_logprobs_nums or [])
        want_top = any(k > 0 for k in top_nums)
        if not (return_logprob or want_top):
            return SampleOutput(next_ids, None, None)
        source = logits.float() if self.return_original_logprob else x
        all_logprobs = torch.log_softmax(source, dim=-1)
        chosen = all_logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
        top = compute_top_logprobs(all_logprobs, top_nums) if want_top else None
        return SampleOutput(next_ids, chosen if return_logprob else None, top)

    def _uniforms(self, info: SamplingBatchInfo) -> Tensor:
        """One uniform in [0, 1) per row: from the row's own generator, else the sampler's."""
        u = torch.rand(info.batch_size, generator=self.generator, dtype=torch.float64)
        for i, generator in enumerate(info.generators):
            if generator is not None:
                u[i] = torch.rand(1, generator=generator, dtype=torch.float64)[0]
        return u


def apply_allowed_mask(x: Tensor, logits: Tensor, allowed: Tensor,
                       end_token_ids: Optional[Tensor] = None) -> Tensor:
    """``x [B, V]`` with the tokens outside ``allowed [B, V]`` set to ``-inf``.

    ``end_token_ids[i] >= 0``: row i's grammar is complete and may end with that token; it
    takes the probability of every token the grammar forbids (their logits are summed into
    its logit). A model that wants to write something the grammar does not describe (" hours"
    after the number "24") then ends the constrained output instead of being pushed to extend
    it ("240"). A row left with no finite logit (its grammar allows only banned tokens) is
    rebuilt from ``logits``.
    """
    if end_token_ids is not None:
        rows = (end_token_ids >= 0).nonzero().flatten()
        if rows.numel():
            ends = end_token_ids[rows]
            leaving = ~allowed[rows]
            leaving[torch.arange(rows.numel()), ends] = True
            merged = torch.logsumexp(x[rows].masked_fill(~leaving, float("-inf")), dim=1)
            x[rows, ends] = merged
    masked = x.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(masked).all(dim=1)
    if bool(empty.any()):
        masked[empty] = logits[empty].float().masked_fill(~allowed[empty], float("-inf"))
    return masked


def compute_top_logprobs(logprobs: Tensor, k: Union[int, Sequence[int]]) -> TopLogprobs:
    """The ``k`` (or ``k[i]`` for row i) best ``(logprob, token_id)`` of each row of
    ``logprobs [N, V]``, best first."""
    ks = [k] * logprobs.shape[0] if isinstance(k, int) else list(k)
    if len(ks) != logprobs.shape[0]:
        raise ValueError("k must be an int or have one entry per row")
    max_k = min(max(ks, default=0), logprobs.shape[1])
    if max_k <= 0:
        return [[] for _ in ks]
    values, indices = logprobs.topk(max_k, dim=-1)
    rows = zip(values.tolist(), indices.tolist(), ks)
    return [list(zip(vals[:n], ids[:n])) for vals, ids, n in rows]


def logprobs_of(logits: Tensor, token_ids: Tensor) -> Tensor:
    """``log_softmax(logits)[t, token_ids[t]]`` for ``logits [T, V]``, without a [T, V] copy
    of log-probabilities (used for input logprobs)."""
    logits = logits.float()
    picked = logits.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)
