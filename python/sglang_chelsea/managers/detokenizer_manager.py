"""The detokenizer subprocess: token ids from the scheduler -> cumulative text for the tokenizer.

Text is decoded incrementally (SGLang's surrogate/read offsets): only the last couple of
tokens are re-decoded per step, and text that ends in an incomplete UTF-8 character
(U+FFFD) is held back until the character completes. While a request streams, the visible
text never shows a stop string, nor a trailing part of the text that could begin one, so
every streamed text is a prefix of the final text. The final text is decoded in full
exactly as the offline path does (``decode_output``).
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq

from sglang_chelsea.managers.io_struct import BatchStrOutput, BatchTokenIDOutput
from sglang_chelsea.managers.output_format import decode_output
from sglang_chelsea.model_loader import load_tokenizer
from sglang_chelsea.port_args import PortArgs
from sglang_chelsea.sampling.sampling_params import SamplingParams
from sglang_chelsea.server_args import ServerArgs
from sglang_chelsea.utils.log_config import configure_logger
from sglang_chelsea.utils.subprocess_signals import install_subprocess_signal_handlers

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
IDLE_POLL_MS = 1000


def hide_stop_strings(text: str, stop_strs: list[str]) -> str:
    """Cut ``text`` before any stop string, and drop a tail that could start one."""
    for stop in stop_strs:
        pos = text.find(stop)
        if pos != -1:
            text = text[:pos]
    cut = 0
    for stop in stop_strs:
        for k in range(min(len(stop) - 1, len(text)), cut, -1):
            if text.endswith(stop[:k]):
                cut = k
                break
    return text[:len(text) - cut]


@dataclass
class DecodeStatus:
    """Incremental decoding state of one request."""

    sampling_params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    decoded_text: str = ""  # text of output_ids[:read_offset]
    surr_offset: int = 0  # start of the context window re-decoded with new tokens
    read_offset: int = 0  # tokens whose text is in decoded_text
    sent_text: str = ""  # the last visible text (never shrinks)

    def _decode(self, tokenizer: Any, ids: list[int]) -> str:
        sp = self.sampling_params
        return tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens,
                                spaces_between_special_tokens=sp.spaces_between_special_tokens)

    def append(self, tokenizer: Any, new_ids: list[int]) -> str:
        """Add newly generated ids; return the cumulative text that may be shown now."""
        self.output_ids.extend(new_ids)
        if len(self.output_ids) > self.read_offset:
            surr = self._decode(tokenizer, self.output_ids[self.surr_offset:self.read_offset])
            new = self._decode(tokenizer, self.output_ids[self.surr_offset:])
            if len(new) > len(surr) and not new.endswith(REPLACEMENT_CHAR):
                self.decoded_text += new[len(surr):]
                self.surr_offset = self.read_offset
                self.read_offset = len(self.output_ids)
        visible = hide_stop_strings(self.decoded_text, self.sampling_params.stop_strs)
        if len(visible) >= len(self.sent_text):
            self.sent_text = visible
        return self.sent_text

    def finish(self, tokenizer: Any, new_ids: list[int], finished_reason: dict[str, Any]) -> str:
        """The final text (full decode, stop string trimmed), as the offline path returns it."""
        self.output_ids.extend(new_ids)
        return decode_output(tokenizer, self.output_ids, finished_reason, self.sampling_params)


class DetokenizerManager:
    """Turns BatchTokenIDOutput into BatchStrOutput, keeping a DecodeStatus per request."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decode_status: dict[str, DecodeStatus] = {}

    def handle_batch_token_id_out(self, batch: BatchTokenIDOutput) -> BatchStrOutput:
        texts = []
        params = batch.sampling_params or [None] * len(batch.outputs)
        for out, sp in zip(batch.outputs, params):
            status = self.decode_status.get(out.rid)
            if status is None:
                status = DecodeStatus(sp if sp is not None else SamplingParams())
                self.decode_status[out.rid] = status
            if out.finished_reason is not None:
                texts.append(status.finish(self.tokenizer, out.new_output_ids,
                                           out.finished_reason))
                del self.decode_status[out.rid]
            else:
                texts.append(status.append(self.tokenizer, out.new_output_ids))
        return BatchStrOutput(outputs=batch.outputs, texts=texts)


def run_detokenizer_process(server_args: ServerArgs, port_args: PortArgs,
                            ready_writer: Connection) -> None:
    """Subprocess entry point: load the tokenizer, report readiness, translate until orphaned."""
    install_subprocess_signal_handlers()
    configure_logger(server_args.log_level, " Detokenizer")
    parent_pid = os.getppid()
    try:
        manager = DetokenizerManager(load_tokenizer(server_args.model_path,
                                                    server_args.tokenizer_path))
        context = zmq.Context(1)
        recv_from_scheduler = context.socket(zmq.PULL)
        recv_from_scheduler.bind(port_args.detokenizer_ipc_name)
        send_to_tokenizer = context.socket(zmq.PUSH)
        send_to_tokenizer.connect(port_args.tokenizer_ipc_name)
    except Exception:
        logger.error("detokenizer failed to start:\n%s", traceback.format_exc())
        ready_writer.send({"status": "error", "error": traceback.format_exc()})
        raise SystemExit(1)
    ready_writer.send({"status": "ready"})
    ready_writer.close()
    try:
        while True:
            if not recv_from_scheduler.poll(IDLE_POLL_MS):
                if os.getppid() != parent_pid:
                    return
                continue
            msg = recv_from_scheduler.recv_pyobj()
            if isinstance(msg, BatchTokenIDOutput):
                send_to_tokenizer.send_pyobj(manager.handle_batch_token_id_out(msg))
            else:
                logger.error("detokenizer: unknown message %r", type(msg).__name__)
    except Exception:
        logger.error("detokenizer crashed:\n%s", traceback.format_exc())
        raise SystemExit(1)
