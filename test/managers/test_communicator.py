"""The TokenizerManager's control calls (flush_cache, get_internal_state): a reply that
arrives after its call timed out must not answer the next call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sglang_chelsea.managers.io_struct import GetInternalStateReq, GetInternalStateReqOutput
from sglang_chelsea.managers.tokenizer_manager import _Communicator


class FakeSocket:
    """Records what is sent; the test plays the scheduler."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_pyobj(self, obj: Any) -> None:
        self.sent.append(obj)


def test_late_reply_of_a_timed_out_call_is_dropped() -> None:
    async def run() -> None:
        socket = FakeSocket()
        comm = _Communicator(socket)  # type: ignore[arg-type]
        with pytest.raises(asyncio.TimeoutError):
            await comm(GetInternalStateReq(), timeout=0.01)  # the scheduler is slow
        second = asyncio.create_task(comm(GetInternalStateReq(), timeout=5))
        await asyncio.sleep(0)  # the second request is sent
        first_id, second_id = (req.call_id for req in socket.sent)
        assert first_id != second_id
        comm.handle_recv(GetInternalStateReqOutput({"answer": "stale"}, call_id=first_id))
        await asyncio.sleep(0)
        assert not second.done()
        comm.handle_recv(GetInternalStateReqOutput({"answer": "fresh"}, call_id=second_id))
        assert (await second).state == {"answer": "fresh"}

    asyncio.run(run())
