"""The offline Engine: SGLang's ``Engine(**server_args).generate(...)`` in one process."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Optional, Union

from sglang_chelsea.managers.io_struct import TokenizedGenerateReqInput
from sglang_chelsea.managers.req_state import ReqState
from sglang_chelsea.managers.scheduler import Scheduler
from sglang_chelsea.sampling.sampling_params import SamplingParams
from sglang_chelsea.server_args import ServerArgs

PromptInput = Union[str, list[str], None]
IdsInput = Union[list[int], list[list[int]], None]


class Engine:
    """Offline generation without HTTP. ``Engine(model_path=..., max_total_tokens=...)`` takes
    the ServerArgs fields as keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        self.server_args = ServerArgs.from_kwargs(**kwargs)
        logging.basicConfig(level=getattr(logging, self.server_args.log_level.upper(), logging.INFO),
                            format="[%(asctime)s] %(message)s")
        self.scheduler = Scheduler(self.server_args)
        self.tokenizer = self.scheduler.tokenizer

    # ------------------------------------------------------------------ generate
    def generate(self, prompt: PromptInput = None,
                 sampling_params: Union[dict, list[dict], None] = None,
                 input_ids: IdsInput = None, return_logprob: Union[bool, list[bool]] = False,
                 logprob_start_len: Union[int, list[int], None] = None,
                 top_logprobs_num: Union[int, list[int], None] = None,
                 return_text_in_logprobs: bool = False,
                 rid: Union[str, list[str], None] = None) -> Union[dict, list[dict]]:
        """Generate for one prompt (returns a dict) or a list of prompts (returns a list).

        Raises ValueError for bad input; nothing is queued then.
        """
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt or input_ids")
        single = isinstance(prompt, str) or (input_ids is not None and len(input_ids) > 0
                                             and isinstance(input_ids[0], int))
        if input_ids is not None and len(input_ids) == 0:
            single = True
        prompts = [prompt] if isinstance(prompt, str) else prompt
        ids_list = ([input_ids] if single else input_ids) if input_ids is not None else None
        n = len(prompts) if prompts is not None else len(ids_list)  # type: ignore[arg-type]

        def per(value: Any, i: int) -> Any:
            return value[i] if isinstance(value, list) else value

        reqs, states = [], []
        for i in range(n):
            sp = SamplingParams.from_dict(dict(per(sampling_params, i) or {}))
            sp.normalize(self.tokenizer)
            text = prompts[i] if prompts is not None else None
            if text is not None and not isinstance(text, str):
                raise ValueError("prompt must be a string or a list of strings")
            ids = self.tokenizer.encode(text) if text is not None else list(ids_list[i])
            lp = bool(per(return_logprob, i))
            start = per(logprob_start_len, i)
            tokenized = TokenizedGenerateReqInput(
                rid=per(rid, i) or uuid.uuid4().hex, input_text=text, input_ids=ids,
                sampling_params=sp, return_logprob=lp,
                logprob_start_len=(-1 if not lp else (0 if start is None or start < 0 else start))
                if lp else -1,
                top_logprobs_num=per(top_logprobs_num, i) or 0)
            self.scheduler.validate(tokenized)
            reqs.append(tokenized)
            states.append(ReqState(tokenized.rid, sp, lp, tokenized.top_logprobs_num,
                                   return_text_in_logprobs))
        by_rid = {s.rid: s for s in states}
        if len(by_rid) != len(states):
            raise ValueError("rid values must be unique")
        for tokenized in reqs:
            self.scheduler.add_request(tokenized)
        self._run_until_done(by_rid)
        results = [s.to_response(self.tokenizer) for s in states]
        return results[0] if single else results

    def _run_until_done(self, states: dict[str, ReqState]) -> None:
        pending = set(states)
        while pending:
            if not self.scheduler.has_work():
                raise RuntimeError(f"scheduler idle with unfinished requests {sorted(pending)}")
            for out in self.scheduler.step():
                state = states.get(out.rid)
                if state is None:
                    continue
                state.update(out)
                if state.finished:
                    pending.discard(out.rid)

    # ------------------------------------------------------------------ info and control
    def get_server_info(self) -> dict[str, Any]:
        info = self.server_args.to_dict()
        info.update(self.scheduler.get_internal_state())
        return info

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def shutdown(self) -> None:
        """Release the model and pools."""
        self.scheduler = None  # type: ignore[assignment]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
