"""The offline Engine: SGLang's ``Engine(**server_args).generate(...)`` in one process."""

from __future__ import annotations

import logging
from typing import Any, Union

from sglang_chelsea.managers.generate_request import GenerateReqInput, validate_request_budget
from sglang_chelsea.managers.req_state import ReqState
from sglang_chelsea.managers.scheduler import Scheduler
from sglang_chelsea.server_args import ServerArgs

PromptInput = Union[str, list[str], None]
IdsInput = Union[list[int], list[list[int]], None]


class Engine:
    """Offline generation without HTTP. ``Engine(model_path=..., max_total_tokens=...)`` takes
    the ServerArgs fields as keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        self.server_args = ServerArgs.from_kwargs(**kwargs)
        if self.server_args.tp_size > 1 or self.server_args.dp_size > 1:
            raise ValueError("the offline Engine runs in one process: tp_size and dp_size > 1 "
                             "need the server (python -m sglang_chelsea.launch_server)")
        logging.basicConfig(level=getattr(logging, self.server_args.log_level.upper(), logging.INFO),
                            format="[%(asctime)s] %(message)s")
        self.scheduler = Scheduler(self.server_args)
        self.tokenizer = self.scheduler.tokenizer

    # ------------------------------------------------------------------ generate
    def generate(self, prompt: PromptInput = None,
                 sampling_params: dict | list[dict] | None = None,
                 input_ids: IdsInput = None, return_logprob: bool | list[bool] = False,
                 logprob_start_len: int | list[int] | None = None,
                 top_logprobs_num: int | list[int] | None = None,
                 return_text_in_logprobs: bool = False,
                 rid: str | list[str] | None = None) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a list of prompts (returns a list).

        Raises ValueError for bad input; nothing is queued then.
        """
        obj = GenerateReqInput(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs)
        obj.check()
        reqs, states = [], []
        encoded: dict[str, list[int]] = {}
        for item in obj.to_items():
            tokenized = item.tokenize(self.tokenizer, encoded)
            self.scheduler.validate(tokenized)
            reqs.append(tokenized)
            states.append(ReqState(item.rid, item.sampling_params, item.return_logprob,
                                   tokenized.top_logprobs_num, item.return_text_in_logprobs))
        validate_request_budget(reqs, self.scheduler.context_len)
        by_rid = {s.rid: s for s in states}
        for tokenized in reqs:
            self.scheduler.add_request(tokenized)
        self._run_until_done(by_rid)
        results = [s.to_response(self.tokenizer) for s in states]
        return results[0] if obj.returns_single else results

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

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
