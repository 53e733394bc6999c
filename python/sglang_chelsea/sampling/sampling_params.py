"""SamplingParams: SGLang's per-request sampling fields, their parsing and validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

_SAMPLING_EPS = 1e-6

# SGLang names we accept under another name here.
_ALIASES = {"sampling_seed": "seed"}
# SGLang names that only tune streaming granularity: accepted and ignored.
_IGNORED = frozenset({"stream_interval"})
# SGLang names whose feature we lack: accepted only when null or empty.
_UNSUPPORTED = frozenset({"stop_regex", "structural_tag"})
# Filled by normalize(), never read from a request.
_INTERNAL = frozenset({"stop_strs"})


def _same_value(a: Any, b: Any) -> bool:
    """Equality that also holds for two NaNs (an alias repeating a NaN is no conflict)."""
    return a == b or (a != a and b != b)


def _as_int(name: str, value: Any) -> int:
    """An int, or an int-valued float (JSON has one number type); never a bool or str."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    """A float from an int or float; never a bool or str."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number, got {value!r}")


def _as_bool(name: str, value: Any) -> bool:
    """A JSON boolean only."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _as_opt_int(name: str, value: Any) -> Optional[int]:
    return None if value is None else _as_int(name, value)


def _as_opt_str(name: str, value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a string, got {value!r}")


# Deepest nesting of arrays/objects taken in a free-form field (``custom_params``): the
# request is pickled to the scheduler, and pickle overflows the stack around 500 levels.
MAX_NESTING_DEPTH = 32


def _nesting_depth(value: Any) -> int:
    """How deeply JSON arrays/objects nest in ``value`` (0 for a scalar); iterative."""
    depth, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth = max(depth, level + 1)
            stack.extend((child, level + 1) for child in item)
    return depth


def _as_opt_dict(name: str, value: Any) -> Optional[dict]:
    if value is None:
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object, got {value!r}")
    if _nesting_depth(value) > MAX_NESTING_DEPTH:
        raise ValueError(f"{name} nests arrays/objects more than {MAX_NESTING_DEPTH} deep")
    return value


def _as_json_text(name: str, value: Any) -> Optional[str]:
    """A JSON document as text: a string is kept, an object (or bool schema) is serialized."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, bool)):
        return json.dumps(value)
    raise ValueError(f"{name} must be a JSON string or object, got {value!r}")


def _as_stop(name: str, value: Any) -> Optional[Union[str, list[str]]]:
    """``None``, a string, or a list of strings."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")


def _as_id_list(name: str, value: Any) -> Optional[list[int]]:
    """``None`` or a list of ints (duplicates dropped, order kept)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    return list(dict.fromkeys(_as_int(name, v) for v in value))


def _as_logit_bias(name: str, value: Any) -> Optional[dict[str, float]]:
    """``None`` or ``{token id: bias}`` with ids as decimal strings (OpenAI's and SGLang's
    form; int keys are taken too) and finite biases; an empty object means none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object of token id -> bias, got {value!r}")
    out: dict[str, float] = {}
    for key, bias in value.items():
        try:
            token_id = key if isinstance(key, int) and not isinstance(key, bool) else int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{name} keys must be token ids, got {key!r}") from None
        bias = _as_float(f"{name}[{key!r}]", bias)
        if not math.isfinite(bias):
            raise ValueError(f"{name}[{key!r}] must be finite, got {bias!r}")
        out[str(token_id)] = out.get(str(token_id), 0.0) + bias
    return out or None


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _as_int,
    "min_new_tokens": _as_int,
    "temperature": _as_float,
    "top_p": _as_float,
    "top_k": _as_int,
    "min_p": _as_float,
    "stop": _as_stop,
    "stop_token_ids": _as_id_list,
    "ignore_eos": _as_bool,
    "skip_special_tokens": _as_bool,
    "spaces_between_special_tokens": _as_bool,
    "no_stop_trim": _as_bool,
    "frequency_penalty": _as_float,
    "presence_penalty": _as_float,
    "repetition_penalty": _as_float,
    "n": _as_int,
    "seed": _as_opt_int,
    "regex": _as_opt_str,
    "json_schema": _as_json_text,
    "ebnf": _as_opt_str,
    "custom_params": _as_opt_dict,
    "logit_bias": _as_logit_bias,
}


def _check_range(name: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass
class SamplingParams:
    """SGLang's sampling_params. ``temperature == 0`` means greedy; ``top_k == -1`` means all.

    Typical use: ``p = SamplingParams.from_dict(body["sampling_params"]); p.verify(vocab)``.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: Optional[int] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    custom_params: Optional[dict] = None
    logit_bias: Optional[dict[str, float]] = None
    stop_strs: list[str] = field(default_factory=list, repr=False)

    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature ~0, or top_k == 1)."""
        return self.temperature < _SAMPLING_EPS or self.top_k == 1

    @classmethod
    def from_dict(cls, d: Any) -> SamplingParams:
        """Build from a JSON ``sampling_params`` object using SGLang's names; normalized.

        ``null`` means the default (as in SGLang). ``sampling_seed`` is read as ``seed``;
        ``stream_interval`` is ignored; ``stop_regex`` and ``structural_tag`` are accepted
        only when empty. Any other unknown name raises ``ValueError``, as do
        values of the wrong JSON type (a bool or string where a number is expected).
        Ranges are checked later by :meth:`verify`, which needs the vocabulary size.
        """
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a JSON object, got {d!r}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if name in _IGNORED:
                continue
            if name in _UNSUPPORTED:
                if value:
                    raise ValueError(f"sampling parameter {key!r} is not supported")
                continue
            if name not in _CONVERTERS:
                raise ValueError(f"unknown sampling parameter {key!r}")
            if value is None:
                continue  # keep the default
            converted = _CONVERTERS[name](key, value)
            if name in kwargs and not _same_value(kwargs[name], converted):
                raise ValueError(f"conflicting values for sampling parameter {key!r}")
            kwargs[name] = converted
        params = cls(**kwargs)
        params.normalize()
        return params

    def normalize(self, tokenizer: Optional[object] = None) -> None:
        """Fill the derived fields: ``stop_strs`` (non-empty strings of ``stop``) and
        ``stop_token_ids`` as a de-duplicated list. Idempotent.

        ``tokenizer`` is accepted for SGLang's call signature; stop strings are matched on
        the decoded text, so nothing here needs it.
        """
        stop = _as_stop("stop", self.stop)
        stop_list = [stop] if isinstance(stop, str) else (stop or [])
        self.stop_strs = [s for s in stop_list if s]
        self.stop_token_ids = _as_id_list("stop_token_ids", self.stop_token_ids) or []

    def verify(self, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the field for any wrong type or out-of-range value.

        Also converts int-valued floats of integer fields to ``int`` (as :meth:`from_dict`).
        """
        for f in fields(self):
            if f.name in _CONVERTERS:
                setattr(self, f.name, _CONVERTERS[f.name](f.name, getattr(self, f.name)))
        t = self.temperature
        _check_range("temperature", math.isfinite(t) and t >= 0.0, "finite and >= 0", t)
        _check_range("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]", self.top_p)
        _check_range("top_k", self.top_k == -1 or self.top_k >= 1, "-1 (all) or >= 1", self.top_k)
        _check_range("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]", self.min_p)
        _check_range("max_new_tokens", self.max_new_tokens >= 0, ">= 0", self.max_new_tokens)
        _check_range(
            "min_new_tokens",
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"in [0, max_new_tokens={self.max_new_tokens}]",
            self.min_new_tokens,
        )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check_range(name, -2.0 <= value <= 2.0, "in [-2, 2]", value)
        rp = self.repetition_penalty
        _check_range("repetition_penalty", 0.0 < rp <= 2.0, "in (0, 2] (1 = none)", rp)
        _check_range("n", self.n >= 1, ">= 1", self.n)  # n > 1 is expanded by GenerateReqInput
        for token_id in self.stop_token_ids or []:
            in_vocab = 0 <= token_id < vocab_size
            _check_range("stop_token_ids", in_vocab, f"ids in [0, {vocab_size})", token_id)
        for key in self.logit_bias or {}:
            token_id = int(key)
            _check_range("logit_bias", 0 <= token_id < vocab_size,
                         f"keyed by ids in [0, {vocab_size})", token_id)
        grammars = [g for g in ("regex", "json_schema", "ebnf") if getattr(self, g) is not None]
        if len(grammars) > 1:
            raise ValueError(f"only one of regex, json_schema, ebnf may be set, got {grammars}")
