"""Scheduler: continuous batching with chunked prefill, radix prefix reuse and retraction.

One ``step()`` = receive nothing (requests are pushed with ``add_request``), pick the next
batch (a prefill batch first, else a decode step of the running batch, retracting
requests when the KV pool runs short), run it, process the results, return outputs.
The same object serves the offline Engine (in-process) and the server (in a subprocess).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from sglang_chelsea.constrained import GrammarBackend
from sglang_chelsea.managers.generate_request import validate_tokenized_request
from sglang_chelsea.managers.io_struct import ReqOutput, TokenizedGenerateReqInput
from sglang_chelsea.managers.schedule_batch import Req
from sglang_chelsea.managers.schedule_policy import SchedulePolicy
from sglang_chelsea.mem_cache.radix_cache import RadixCache, page_prefix_len
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang_chelsea.model_executor.model_runner import ModelRunner
from sglang_chelsea.managers.token_processor import collect_input_logprobs, sample_batch
from sglang_chelsea.sampling.sampler import Sampler, make_generator
from sglang_chelsea.server_args import ServerArgs

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the model runner, the pools and the radix cache; batches requests."""

    def __init__(self, server_args: ServerArgs, model_runner: Optional[ModelRunner] = None) -> None:
        self.server_args = server_args
        self.model_runner = model_runner or ModelRunner(server_args)
        mr = self.model_runner
        self.model_config = mr.model_config
        self.tokenizer = mr.tokenizer
        self.context_len = mr.context_len
        self.req_to_token_pool = mr.req_to_token_pool
        self.allocator = mr.token_to_kv_pool_allocator
        self.token_to_kv_pool = mr.token_to_kv_pool
        self.max_total_num_tokens = mr.max_total_num_tokens
        self.page_size = server_args.effective_page_size
        self.tree_cache = RadixCache(self.req_to_token_pool, self.allocator, self.page_size,
                                     disable=server_args.disable_radix_cache)
        self.policy = SchedulePolicy(server_args.schedule_policy, self.tree_cache)
        self.sampler = Sampler(random_seed=server_args.random_seed)  # reproducible sampling
        self.eos_token_ids = list(self.model_config.eos_token_ids)
        self.grammar_backend = GrammarBackend(self.tokenizer, self.model_config.vocab_size,
                                              self.eos_token_ids)
        self.max_running_requests = min(server_args.max_running_requests,
                                        self.req_to_token_pool.size)
        chunk = server_args.chunked_prefill_size
        self.chunked_prefill_size = None if chunk in (None, -1) else chunk
        self.max_req_input_len = min(self.context_len - 1, self.max_total_num_tokens - 1)
        self.kv_compressor = mr.kv_compressor
        # A request ends ("length") at the context length, or, when the cache holds every
        # token raw, at the pool's size: as SGLang caps max_new_tokens by the pool, a lone
        # request that outgrows it finishes instead of aborting for want of a slot.
        self.max_seq_len = (self.context_len if self.kv_compressor is not None
                            else min(self.context_len, self.max_total_num_tokens))
        self.waiting_queue: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Optional[Req] = None
        self.outputs: list[ReqOutput] = []
        self.forward_ct = 0
        self.num_generated_tokens = 0
        self.last_decode_stats_time = time.monotonic()
        self.last_gen_throughput = 0.0

    # ------------------------------------------------------------------ requests in
    def validate(self, tokenized: TokenizedGenerateReqInput) -> None:
        """Raise ValueError naming the problem with a request (before it is queued)."""
        validate_tokenized_request(tokenized, self.model_config.vocab_size,
                                   self.max_req_input_len, self.context_len)

    def add_request(self, tokenized: TokenizedGenerateReqInput) -> None:
        """Validate and queue a request (raises ValueError on bad input)."""
        self.validate(tokenized)
        grammar = self.grammar_backend.create_matcher(tokenized.sampling_params)
        req = Req(tokenized, self.eos_token_ids)
        req.grammar = grammar
        if tokenized.sampling_params.seed is not None:
            req.generator = make_generator(tokenized.sampling_params.seed)
        self.waiting_queue.append(req)

    def abort_request(self, rid: str, message: str = "aborted by request") -> None:
        for i, req in enumerate(self.waiting_queue):
            if req.rid == rid:
                del self.waiting_queue[i]
                if req.req_pool_idx is not None:  # a retracted request never holds a row
                    self.tree_cache.cache_finished_req(req)
                req.finished_reason = {"type": "abort", "message": message}
                self._emit(req)
                return
        for req in self.running + ([self.chunked_req] if self.chunked_req else []):
            if req.rid == rid:
                req.to_abort = message

    # ------------------------------------------------------------------ loop
    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.running or self.chunked_req)

    def step(self) -> list[ReqOutput]:
        """Run one batch (if any) and return the outputs produced."""
        self._finish_aborted()
        batch = self.get_next_batch_to_run()
        if batch is not None:
            mode, reqs = batch
            if mode is ForwardMode.EXTEND:
                self.run_extend(reqs)
            else:
                self.run_decode(reqs)
        out, self.outputs = self.outputs, []
        return out

    def _finish_aborted(self) -> None:
        for req in list(self.running):
            if req.to_abort is not None:
                req.check_finished(self.max_seq_len)
                self.running.remove(req)
                self._release_finished(req)
        req = self.chunked_req
        if req is not None and req.to_abort is not None:
            req.check_finished(self.max_seq_len)
            self.chunked_req = None
            self._release_finished(req)

    def get_next_batch_to_run(self) -> Optional[tuple[ForwardMode, list[Req]]]:
        prefill = self.get_new_batch_prefill()
        if prefill:
            return ForwardMode.EXTEND, prefill
        if self.running:
            decode = self.prepare_decode()
            if decode:
                return ForwardMode.DECODE, decode
        return None

    # ------------------------------------------------------------------ memory
    def _alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        slots = self.allocator.alloc(n)
        if slots is None:
            self.tree_cache.evict(n - self.allocator.available_size())
            slots = self.allocator.alloc(n)
        return slots

    def _available_slots(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size()

    # ------------------------------------------------------------------ prefill
    def get_new_batch_prefill(self) -> list[Req]:
        """Admit a prefill batch under the token budgets; chunk the last request if needed."""
        budget = self.server_args.max_prefill_tokens
        chunk_budget = self.chunked_prefill_size or budget
        budget = min(budget, chunk_budget) if self.chunked_prefill_size else budget
        batch: list[Req] = []
        # Keep room for one decode token per running request.
        reserve = len(self.running)
        if self.chunked_req is not None:
            req = self.chunked_req
            self.chunked_req = None
            if self._schedule_extend(req, budget, reserve):
                batch.append(req)
                budget -= req.extend_input_len
            else:  # cannot continue now: keep it for the next step
                self.chunked_req = req
                return []
        if not self.waiting_queue:
            return batch
        self.policy.calc_priority(self.waiting_queue)
        i = 0
        while i < len(self.waiting_queue) and budget > 0 and self.chunked_req is None:
            if len(self.running) + len(batch) >= self.max_running_requests:
                break
            req = self.waiting_queue[i]
            if self._waits_for_inflight_prefix(req, batch):
                i += 1
                continue
            if not self._admit(req):
                break
            if not self._schedule_extend(req, budget, reserve + len(batch)):
                self._unadmit(req)
                break
            self.waiting_queue.pop(i)
            self._record_admission(req)
            batch.append(req)
            budget -= req.extend_input_len
        return batch

    def _waits_for_inflight_prefix(self, req: Req, inflight: list[Req]) -> bool:
        """True when a request being prefilled in this batch shares more of ``req``'s prompt
        than the radix tree holds: ``req`` waits a step and then hits the cached prefix
        instead of prefilling the same pages twice (in-batch prefix sharing)."""
        if self.tree_cache.disable or not inflight:
            return False
        key = req.seq_ids()[: req.max_prefix_len()]
        shared = max(page_prefix_len(key, other.seq_ids(), self.page_size) for other in inflight)
        # Only then the tree (a plain match: no row, lock or hit count for a request that waits).
        return shared > 0 and shared > len(self.tree_cache.match_prefix(key).page_lens) * \
            self.page_size

    def _admit(self, req: Req) -> bool:
        """Give a waiting request a row and its cached prefix (locked)."""
        idx = self.req_to_token_pool.alloc()
        if idx is None:
            return False
        req.req_pool_idx = idx
        key = req.seq_ids()[: req.max_prefix_len()]
        match = self.tree_cache.match_prefix(key)
        logical = len(match.page_lens) * self.page_size
        row = self.req_to_token_pool.req_to_token[idx]
        row[: match.physical_len] = match.value.to(row.dtype)
        self.tree_cache.inc_lock_ref(match.last_node)
        req.last_node = match.last_node
        req.logical_len = req.tree_len = logical
        req.physical_len = req.tree_phys_len = match.physical_len
        req.page_lens = list(match.page_lens)
        req.compressed_pages = len(match.page_lens) if self.kv_compressor is not None else 0
        req.shareable_pages = len(match.page_lens)
        return True

    def _record_admission(self, req: Req) -> None:
        """Count an admitted request's cache hit (once, however often it was deferred)."""
        self.tree_cache.record_hit(len(req.origin_input_ids), req.tree_len)
        if req.cached_tokens is None:
            req.cached_tokens = req.tree_len

    def _unadmit(self, req: Req) -> None:
        self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.reset_kv_state()

    def _schedule_extend(self, req: Req, budget: int, reserve: int) -> bool:
        """Pick this step's extend length and allocate its slots."""
        remaining = req.seq_len() - req.logical_len
        n = min(remaining, budget)
        if n <= 0:
            return False
        if self._available_slots() < n + reserve:
            n = self._available_slots() - reserve
            # A chunk cut short by memory only when nothing else needs KV to decode: else
            # it would take the slots the running requests grow into (and be retracted).
            if n <= 0 or (n < remaining and (reserve > 0 or n < min(budget, 16))):
                return False
        slots = self._alloc_slots(n)
        if slots is None:
            return False
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        row[req.physical_len: req.physical_len + n] = slots.to(row.dtype)
        req.extend_input_len = n
        return True

    def run_extend(self, reqs: list[Req]) -> None:
        input_ids, positions, locs = [], [], []
        rows: list[int] = []
        plans = []  # per request: (first logits row, rows for input logprobs, sample?)
        offset = 0
        table = self.req_to_token_pool.req_to_token
        for req in reqs:
            a, n = req.logical_len, req.extend_input_len
            seq = req.seq_ids()
            input_ids.extend(seq[a:a + n])
            positions.extend(range(a, a + n))
            locs.append(table[req.req_pool_idx, req.physical_len:req.physical_len + n])
            lp_rows: list[int] = []
            if not req.input_logprobs_done:
                last_pred = len(req.origin_input_ids) - 1  # positions predicting prompt tokens
                lo = max(a, req.logprob_start_len)
                lp_rows = [offset + p - a for p in range(lo, min(a + n, last_pred))]
            sample = a + n == req.seq_len()
            start = len(rows)
            rows.extend(lp_rows)
            if sample:
                rows.append(offset + n - 1)
            plans.append((start, len(lp_rows), sample))
            offset += n
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=len(reqs),
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_cache_loc=torch.cat(locs).to(torch.int64),
            req_pool_indices=[r.req_pool_idx for r in reqs],
            seq_lens=[r.physical_len + r.extend_input_len for r in reqs],
            extend_prefix_lens=[r.physical_len for r in reqs],
            extend_seq_lens=[r.extend_input_len for r in reqs],
            req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.model_runner.attn_backend,
            # A middle chunk without logprobs needs no logits: compute one row only.
            logits_rows=torch.tensor(rows or [0], dtype=torch.int64))
        if self.kv_compressor is not None:
            fb.slot_selector = self.kv_compressor.make_selector(self, reqs, decode=False)
            fb.query_observer = self.kv_compressor.make_query_observer(self, reqs)
        logits = self.model_runner.forward(fb)
        self.forward_ct += 1
        to_sample: list[Req] = []
        sample_rows: list[int] = []
        new_tokens = sum(r.extend_input_len for r in reqs)
        for req, (start, n_lp, sample) in zip(reqs, plans):
            a, n = req.logical_len, req.extend_input_len
            if n_lp:
                collect_input_logprobs(req, logits[start:start + n_lp], a)
            req.logical_len += n
            req.physical_len += n
            req.extend_input_len = 0
            if req.logical_len >= len(req.origin_input_ids) and not req.input_logprobs_done:
                collect_input_logprobs(req, None, req.logical_len)
            self._update_pages(req)
            if sample:
                if req.sampling_params.max_new_tokens == 0 or \
                        len(req.output_ids) >= req.sampling_params.max_new_tokens:
                    req.check_finished(self.max_seq_len)
                else:
                    to_sample.append(req)
                    sample_rows.append(start + n_lp)
        self._compress_and_cache(reqs)
        if to_sample:
            sample_batch(self, to_sample, logits[torch.tensor(sample_rows, device=logits.device)])
        for req, (_, _, prefill_done) in zip(reqs, plans):
            if req.finished():
                self._release_finished(req)
            elif not prefill_done:
                self.chunked_req = req
            else:
                self.running.append(req)
                self._emit(req)
        self._log_prefill(reqs, new_tokens)

    def _update_pages(self, req: Req) -> None:
        """Account newly completed pages (raw: page_size slots each)."""
        complete = req.logical_len // self.page_size
        while len(req.page_lens) < complete:
            req.page_lens.append(self.page_size)
        self._update_shareable(req)

    def _update_shareable(self, req: Req) -> None:
        req.shareable_pages = (len(req.page_lens) if self.kv_compressor is None
                               else req.compressed_pages)

    def _compress(self, reqs: list[Req], finishing: bool = False) -> None:
        """Run the compression policy on completed pages (all of them when finishing)."""
        if self.kv_compressor is None:
            return
        self.kv_compressor.compress_reqs(self, reqs, finishing)
        for req in reqs:
            self._update_shareable(req)

    def _compress_and_cache(self, reqs: list[Req]) -> None:
        """Compress completed chunks (if a policy is on), then share completed pages."""
        self._compress(reqs)
        for req in reqs:
            # After every chunk, the last included (as SGLang does): a request arriving while
            # this one decodes hits its whole prompt, not only up to the last chunk boundary.
            if not req.finished():
                self.tree_cache.cache_unfinished_req(req)

    # ------------------------------------------------------------------ decode
    def prepare_decode(self) -> list[Req]:
        """Give every running request one slot, retracting requests if the pool is short."""
        need = len(self.running)
        while need > 0 and self._available_slots() < need:
            if not self.retract_one():
                break
            need = len(self.running)
        if not self.running:
            return []
        slots = self._alloc_slots(len(self.running))
        assert slots is not None, "decode slots must fit after retraction"
        table = self.req_to_token_pool.req_to_token
        for req, slot in zip(self.running, slots.tolist()):
            table[req.req_pool_idx, req.physical_len] = slot
        return list(self.running)

    def retract_one(self) -> bool:
        """Free KV for decoding: retract the partly prefilled (chunked) request if any, else
        move the running request with the most decoding left back to the queue."""
        if self.chunked_req is not None:
            # It has decoded nothing yet; aborting a lone running request for it would be wrong.
            victim = self.chunked_req
            self.chunked_req = None
            self._retract(victim)
            return True
        if not self.running:
            return False
        victim = max(self.running, key=lambda r: (r.sampling_params.max_new_tokens
                                                  - len(r.output_ids), -len(r.origin_input_ids)))
        if len(self.running) == 1:
            # The only request cannot even decode: the pool is smaller than one request.
            self.running.remove(victim)
            victim.to_abort = "the KV cache is too small to continue this request"
            victim.check_finished(self.max_seq_len)
            self._release_finished(victim)
            return True
        self.running.remove(victim)
        self._retract(victim)
        return True

    def _retract(self, victim: Req) -> None:
        """Release ``victim``'s KV (its completed pages stay in the radix cache) and queue
        it first; it resumes by prefilling its prompt and the tokens it has generated."""
        self._compress([victim], finishing=True)  # so its completed chunks can be shared
        self.tree_cache.cache_finished_req(victim)
        victim.reset_kv_state()
        if not victim.input_logprobs_done:  # recomputed from the start on re-admission
            victim.input_token_logprobs = []
            victim.input_top_logprobs = []
        victim.num_retractions += 1
        self.waiting_queue.insert(0, victim)
        logger.info("Retracted request %s (KV pool short); %d running", victim.rid,
                    len(self.running))

    def run_decode(self, reqs: list[Req]) -> None:
        table = self.req_to_token_pool.req_to_token
        rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
        phys = torch.tensor([r.physical_len for r in reqs], dtype=torch.int64)
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=len(reqs),
            input_ids=torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64),
            positions=torch.tensor([r.logical_len for r in reqs], dtype=torch.int64),
            out_cache_loc=table[rows, phys].to(torch.int64),
            req_pool_indices=[r.req_pool_idx for r in reqs],
            seq_lens=[r.physical_len + 1 for r in reqs],
            extend_prefix_lens=[r.physical_len for r in reqs],
            extend_seq_lens=[1] * len(reqs),
            req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.model_runner.attn_backend)
        if self.kv_compressor is not None:
            fb.slot_selector = self.kv_compressor.make_selector(self, reqs, decode=True)
        logits = self.model_runner.forward(fb)
        self.forward_ct += 1
        for req in reqs:
            req.logical_len += 1
            req.physical_len += 1
            self._update_pages(req)
        self._compress(reqs)
        sample_batch(self, reqs, logits)
        for req in reqs:
            if req.finished():
                self.running.remove(req)
                self._release_finished(req)
            elif req.stream:
                self._emit(req)
        self.num_generated_tokens += len(reqs)
        self._log_decode(reqs)

    # ------------------------------------------------------------------ outputs
    def _release_finished(self, req: Req) -> None:
        if req.req_pool_idx is not None:
            self._compress([req], finishing=True)
            self.tree_cache.cache_finished_req(req)
            req.reset_kv_state()
        self._emit(req)

    def _emit(self, req: Req) -> None:
        """Queue a ReqOutput with what is new since the last one (if anything)."""
        new_ids = req.output_ids[req.sent_output_len:]
        if not req.finished() and not (req.stream and new_ids):
            return
        out = ReqOutput(
            rid=req.rid, new_output_ids=new_ids, finished_reason=req.finished_reason,
            prompt_tokens=len(req.origin_input_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens or 0)
        if req.return_logprob:
            if not req.sent_input_logprobs and req.input_logprobs_done:
                out.input_token_logprobs = req.input_token_logprobs
                if req.top_logprobs_num:
                    out.input_top_logprobs = req.input_top_logprobs
                req.sent_input_logprobs = True
            out.output_token_logprobs = req.output_token_logprobs[req.sent_output_len:]
            if req.top_logprobs_num:
                out.output_top_logprobs = req.output_top_logprobs[req.sent_output_len:]
        req.sent_output_len = len(req.output_ids)
        self.outputs.append(out)

    # ------------------------------------------------------------------ cache control
    def flush_cache(self) -> bool:
        """Drop the radix cache; refused while requests are queued or running."""
        if self.has_work():
            return False
        self.tree_cache.reset()
        self.allocator.clear()
        self.req_to_token_pool.clear()
        if self.kv_compressor is not None:
            self.kv_compressor.reset()
        return True

    # ------------------------------------------------------------------ stats
    def kv_cache_stats(self) -> dict[str, Any]:
        free = self.allocator.available_size()
        total = self.max_total_num_tokens
        physical = total - free
        logical = self.tree_cache.logical_size() + sum(
            r.logical_len - r.tree_len for r in self._live_reqs())
        stats = {
            "total_slots": total,
            "free_slots": free,
            "used_slots": physical,
            "logical_tokens": logical,
            "physical_slots": physical,
            "compression_ratio": (logical / physical) if physical else 1.0,
            "radix_cache_slots": self.tree_cache.total_size(),
            "evictable_slots": self.tree_cache.evictable_size(),
            "cache_hit_rate": (self.tree_cache.hit_tokens / self.tree_cache.queried_tokens
                               if self.tree_cache.queried_tokens else 0.0),
        }
        if self.kv_compressor is not None:
            stats.update(self.kv_compressor.stats())
        return stats

    def _live_reqs(self) -> list[Req]:
        reqs = list(self.running)
        if self.chunked_req is not None:
            reqs.append(self.chunked_req)
        return reqs

    def get_internal_state(self) -> dict[str, Any]:
        return {
            "max_total_num_tokens": self.max_total_num_tokens,
            "max_req_input_len": self.max_req_input_len,
            "context_length": self.context_len,
            "num_running_reqs": len(self._live_reqs()),
            "num_waiting_reqs": len(self.waiting_queue),
            "kv_cache": self.kv_cache_stats(),
            "last_gen_throughput": self.last_gen_throughput,
        }

    def _log_prefill(self, reqs: list[Req], new_tokens: int) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        cached = sum(r.cached_tokens or 0 for r in reqs)
        usage = 1 - self.allocator.available_size() / self.max_total_num_tokens
        logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, "
                    "token usage: %.2f, #running-req: %d, #queue-req: %d", len(reqs), new_tokens,
                    cached, usage, len(self.running), len(self.waiting_queue))

    def _log_decode(self, reqs: list[Req]) -> None:
        if self.forward_ct % 40 != 0:
            return
        now = time.monotonic()
        self.last_gen_throughput = self.num_generated_tokens / max(now - self.last_decode_stats_time,
                                                                   1e-6)
        self.num_generated_tokens = 0
        self.last_decode_stats_time = now
        usage = 1 - self.allocator.available_size() / self.max_total_num_tokens
        logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
                    "gen throughput (token/s): %.2f, #queue-req: %d", len(reqs),
                    self.max_total_num_tokens - self.allocator.available_size(), usage,
                    self.last_gen_throughput, len(self.waiting_queue))
