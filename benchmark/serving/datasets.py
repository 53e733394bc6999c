"""Synthetic serving workloads: ``random`` and ``generated-shared-prefix``.

Both draw token ids uniformly from the tokenizer's ordinary vocabulary (special and added
tokens excluded) and, unless ``tokenize_prompt``, send the decoded text, as SGLang's
``random-ids`` and ``generated-shared-prefix`` datasets do. SGLang's ``random`` samples
ShareGPT text, which needs a download; here ``random`` and ``random-ids`` are the same
offline workload.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional, Union

Prompt = Union[str, list[int]]


@dataclass
class DatasetRow:
    """One request of a workload."""

    prompt: Prompt
    prompt_len: int  # tokens, as the client's tokenizer counts them
    output_len: int
    group: Optional[int] = None  # shared-prefix group; None when nothing is shared


def random_lens(rng: random.Random, full_len: int, range_ratio: float, num: int) -> list[int]:
    """Lengths uniform in ``[max(1, int(full_len * range_ratio)), full_len]`` (SGLang's rule:
    range ratio 1.0 gives exactly ``full_len``)."""
    if full_len <= 0:
        return [0] * num
    low = max(1, int(full_len * range_ratio))
    return [rng.randint(low, full_len) for _ in range(num)]


def ordinary_token_ids(tokenizer: Any) -> list[int]:
    """Sorted vocabulary ids that are neither special nor added tokens."""
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    excluded |= set(tokenizer.get_added_vocab().values())
    return sorted(i for i in tokenizer.get_vocab().values() if i not in excluded)


def make_prompt(tokenizer: Any, ids: list[int], tokenize_prompt: bool) -> tuple[Prompt, int]:
    """The prompt to send (ids, or their decoded text) and its length in tokens."""
    if tokenize_prompt:
        return ids, len(ids)
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def sample_random_requests(tokenizer: Any, num_prompts: int, input_len: int, output_len: int,
                           range_ratio: float, seed: int, tokenize_prompt: bool = False
                           ) -> list[DatasetRow]:
    """Independent prompts of random tokens (no prefix shared between requests)."""
    rng = random.Random(seed)
    pool = ordinary_token_ids(tokenizer)
    in_lens = random_lens(rng, input_len, range_ratio, num_prompts)
    out_lens = random_lens(rng, output_len, range_ratio, num_prompts)
    rows = []
    for n_in, n_out in zip(in_lens, out_lens):
        prompt, n = make_prompt(tokenizer, rng.choices(pool, k=n_in), tokenize_prompt)
        rows.append(DatasetRow(prompt, n, n_out))
    return rows


def sample_generated_shared_prefix_requests(
        tokenizer: Any, num_groups: int, prompts_per_group: int, system_prompt_len: int,
        question_len: int, output_len: int, seed: int, range_ratio: float = 1.0,
        tokenize_prompt: bool = False, ordered: bool = False) -> list[DatasetRow]:
    """``num_groups`` long system prompts, each followed by ``prompts_per_group`` different
    questions (text form: ``system + "\\n\\n" + question``, as SGLang builds it). Requests
    are shuffled across groups unless ``ordered``."""
    rng = random.Random(seed)
    pool = ordinary_token_ids(tokenizer)
    sys_lens = random_lens(rng, system_prompt_len, range_ratio, num_groups)
    total = num_groups * prompts_per_group
    q_lens = random_lens(rng, question_len, range_ratio, total)
    out_lens = random_lens(rng, output_len, range_ratio, total)
    systems = [rng.choices(pool, k=n) for n in sys_lens]
    rows = []
    for i in range(total):
        g = i // prompts_per_group
        question = rng.choices(pool, k=q_lens[i])
        if tokenize_prompt:
            prompt, n = make_prompt(tokenizer, systems[g] + question, True)
        else:
            text = f"{tokenizer.decode(systems[g])}\n\n{tokenizer.decode(question)}"
            prompt, n = text, len(tokenizer.encode(text, add_special_tokens=False))
        rows.append(DatasetRow(prompt, n, out_lens[i], group=g))
    if not ordered:
        rng.shuffle(rows)
    return rows
