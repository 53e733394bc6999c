"""Soak a running server with a random mix of requests, then check it still serves and
holds no leaked KV slot.

The mix, seeded: native ``/generate`` (streamed or not; n > 1, stop strings, regex,
top-k/top-p, logprobs, prompt lists, shared long prefixes for radix hits), OpenAI chat
completions (streamed or not, n, JSON schema, logprobs), streams the client drops after a
few events, requests cancelled by ``/abort_request``, and bad input (a negative
temperature, a token id outside the vocabulary) that must be answered 400. Meanwhile it
asks for ``/get_server_info`` and ``/flush_cache`` (400: requests are running).

A failure is: any 5xx, a timeout or broken connection, a good request answered other than
200 or a bad one answered other than 400; and at the end, once idle, KV slots held outside
the radix cache, slots still held after ``/flush_cache``, or ``/health_generate`` not 200.
Prints a JSON summary; exits 1 on any failure.

    python -m sglang_chelsea.launch_server --kv-compression chelsea --max-total-tokens 6000 &
    python benchmark/soak_server.py --base-url http://127.0.0.1:30000 --num-requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from typing import Any, Optional

import aiohttp

#: Share of each kind of job in the mix (the rest are native /generate requests).
CHAT_SHARE, ABORT_SHARE, BAD_SHARE, DISCONNECT_SHARE = 0.2, 0.1, 0.06, 0.12


class Soak:
    """One soak run: the job mix, the tallies and the failures."""

    def __init__(self, base_url: str, seed: int, timeout_s: float) -> None:
        self.url = base_url.rstrip("/")
        self.rng = random.Random(seed)
        # The side traffic draws from its own generator, so the request mix does not depend
        # on how the side traffic interleaves with the requests.
        self.admin_rng = random.Random(seed + 1)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.prefixes = [self._words(self.rng.randint(50, 400)) for _ in range(4)]
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def _words(self, n: int) -> str:
        return " ".join(f"w{self.rng.randint(0, 500)}" for _ in range(n))

    def _fail(self, what: str, body: Any = None) -> None:
        self.failures.append(what + ("" if body is None else f": {json.dumps(body)[:200]}"))

    # ------------------------------------------------------------------ request bodies
    def generate_body(self, i: int) -> dict[str, Any]:
        rng = self.rng
        text = f"{rng.choice(self.prefixes)} q{i} {self._words(rng.randint(0, 60))}"
        params: dict[str, Any] = {"max_new_tokens": rng.choice([0, 1, 5, 20, 60]),
                                  "temperature": rng.choice([0, 0.7, 1.0])}
        if rng.random() < 0.2:
            params["stop"] = [rng.choice(["a", "x1", "\n"])]
        if rng.random() < 0.15:
            params["n"] = rng.choice([2, 3])
        if rng.random() < 0.1:
            params["regex"] = "(yes|no)[0-9]{1,3}"
        if rng.random() < 0.1:
            params.update(top_k=rng.choice([1, 5]), top_p=0.9)
        body: dict[str, Any] = {"text": text, "sampling_params": params,
                                "stream": rng.random() < 0.4}
        if rng.random() < 0.15:
            body.update(return_logprob=True, top_logprobs_num=rng.choice([0, 2]),
                        logprob_start_len=rng.choice([-1, 0, 3]))
        if rng.random() < 0.05:
            body["text"] = [text, rng.choice(self.prefixes)]
        return body

    def chat_body(self, i: int) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {
            "model": "default", "max_tokens": rng.choice([1, 8, 30]),
            "messages": [{"role": "system", "content": rng.choice(self.prefixes)},
                         {"role": "user", "content": f"q{i}"}],
            "stream": rng.random() < 0.5, "n": rng.choice([1, 1, 2]),
            "temperature": rng.choice([0, 1])}
        if rng.random() < 0.2:
            schema = {"type": "object", "properties": {"a": {"type": "integer"}},
                      "required": ["a"]}
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "a", "schema": schema}}
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=2)
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return body

    def bad_body(self) -> dict[str, Any]:
        if self.rng.random() < 0.5:
            return {"text": "hello", "sampling_params": {"temperature": -1}}
        return {"input_ids": [1, 2, 10 ** 9], "sampling_params": {"max_new_tokens": 2}}

    # ------------------------------------------------------------------ jobs
    async def post(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any],
                   expect: int, drop_after: Optional[int] = None) -> None:
        """POST ``body``; read the whole answer, or drop the stream after ``drop_after``
        lines; record the status and any failure."""
        try:
            async with session.post(self.url + path, json=body, timeout=self.timeout) as r:
                self.counts[f"{path} {r.status}"] += 1
                if r.status != expect:
                    self._fail(f"{path} answered {r.status}, expected {expect}", body)
                if drop_after is None:
                    await r.read()
                    return
                lines = 0
                async for _ in r.content:
                    lines += 1
                    if lines > drop_after:
                        self.counts["dropped streams"] += 1
                        return
        except asyncio.TimeoutError:
            self._fail(f"{path} timed out", body)
        except aiohttp.ClientError as exc:
            self._fail(f"{path} {type(exc).__name__}: {exc}", body)

    async def aborted(self, session: aiohttp.ClientSession, i: int) -> None:
        rid = f"soak-abort-{i}"
        body = {"text": self.rng.choice(self.prefixes), "rid": rid,
                "sampling_params": {"max_new_tokens": 200}, "stream": self.rng.random() < 0.5}
        delay = self.rng.random() * 1.5

        async def abort() -> None:
            await asyncio.sleep(delay)
            async with session.post(self.url + "/abort_request", json={"rid": rid}) as r:
                self.counts[f"/abort_request {r.status}"] += 1

        task = asyncio.create_task(abort())
        await self.post(session, "/generate", body, expect=200)
        await task

    async def job(self, session: aiohttp.ClientSession, i: int) -> None:
        x = self.rng.random()
        if x < CHAT_SHARE:
            await self.post(session, "/v1/chat/completions", self.chat_body(i), expect=200)
        elif x < CHAT_SHARE + ABORT_SHARE:
            await self.aborted(session, i)
        elif x < CHAT_SHARE + ABORT_SHARE + BAD_SHARE:
            await self.post(session, "/generate", self.bad_body(), expect=400)
        else:
            body = self.generate_body(i)
            drop = body["stream"] and x > 1 - DISCONNECT_SHARE
            await self.post(session, "/generate", body, expect=200,
                            drop_after=2 if drop else None)

    async def admin(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Server info and cache flushes while requests run, until ``stop`` is set."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.admin_rng.random() * 2)
                return
            except asyncio.TimeoutError:
                pass
            async with session.post(self.url + "/flush_cache") as r:
                self.counts[f"/flush_cache {r.status}"] += 1
            async with session.get(self.url + "/get_server_info") as r:
                if r.status != 200:
                    self._fail(f"/get_server_info answered {r.status}")

    # ------------------------------------------------------------------ the end state
    async def kv_cache(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/get_server_info") as r:
            return (await r.json())["kv_cache"]

    @staticmethod
    def outside_radix(kv: dict[str, Any]) -> int:
        """KV slots held by something other than the radix cache."""
        return kv["used_slots"] - kv.get("radix_cache_slots", 0)

    async def check_idle(self, session: aiohttp.ClientSession, wait_s: float
                         ) -> dict[str, Any]:
        """Wait until every held slot belongs to the radix cache, flush, and check."""
        deadline = time.monotonic() + wait_s
        kv = await self.kv_cache(session)
        while self.outside_radix(kv) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            kv = await self.kv_cache(session)
        if self.outside_radix(kv):
            self._fail(f"idle, yet {self.outside_radix(kv)} of the {kv['used_slots']} slots "
                       "held are outside the radix cache")
        async with session.post(self.url + "/flush_cache") as r:
            if r.status != 200:
                self._fail(f"/flush_cache answered {r.status} on an idle server")
        flushed = await self.kv_cache(session)
        if flushed["free_slots"] != flushed["total_slots"]:
            self._fail(f"after /flush_cache {flushed['total_slots'] - flushed['free_slots']} "
                       "slots are still held")
        async with session.get(self.url + "/health_generate") as r:
            if r.status != 200:
                self._fail(f"/health_generate answered {r.status}")
        return {"idle_kv_cache": kv, "flushed_kv_cache": flushed}

    async def run(self, num_requests: int, concurrency: int) -> dict[str, Any]:
        start = time.monotonic()
        limit = asyncio.Semaphore(concurrency)

        # The side traffic stops once the last `concurrency` requests start: while it runs
        # the server always has requests, so its flushes answer 400 and none empties the
        # cache that the end state reports.
        stop = asyncio.Event()

        async def limited(session: aiohttp.ClientSession, i: int) -> None:
            async with limit:
                if i >= num_requests - concurrency:
                    stop.set()
                await self.job(session, i)

        async with aiohttp.ClientSession() as session:
            admin = asyncio.create_task(self.admin(session, stop))
            await asyncio.gather(*[limited(session, i) for i in range(num_requests)])
            await admin
            end = await self.check_idle(session, wait_s=60)
        return {"requests": num_requests, "seconds": round(time.monotonic() - start, 1),
                "counts": dict(sorted(self.counts.items())), **end,
                "failures": self.failures}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one request may take")
    args = parser.parse_args(argv)
    soak = Soak(args.base_url, args.seed, args.timeout)
    result = asyncio.run(soak.run(args.num_requests, args.concurrency))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
