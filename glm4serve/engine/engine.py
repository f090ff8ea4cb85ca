"""The synchronous engine: one `step()` = schedule, one forward, sample, detokenize, stop checks.

Not thread-safe: exactly one thread drives it (AsyncEngine's loop thread in the server, the
test itself in tests). A failure is contained to the smallest unit it can be pinned on: an
exception while handling one request's row fails that request only; an exception from the
forward fails every request of that batch; either way their KV blocks are freed and the engine
keeps serving.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Container

import torch

from ..model.batch import ScheduledBatch, SeqChunk
from ..model.lora import LoRASet
from ..model.runner import ModelRunner
from .block_pool import BlockPool
from .config import SchedulerConfig
from .detokenizer import IncrementalDetokenizer
from .guided import GuidedDecodingError, Grammars
from .processors import NoTokenLeft, SampleRow, TokenCounts, has_penalties
from .sampler import Sampled, Sampler, make_generator, prompt_token_logprobs
from .scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import Sequence
from .types import (ERROR, LENGTH, STEP_TOKEN_BUCKETS, STOP, ConstraintError, EngineError, EngineStats, Output,
                    SamplingParams)

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, sched_cfg: SchedulerConfig, pool: BlockPool,
                 model_stop_ids, *, sampler: Sampler | None = None, vocab_size: int | None = None,
                 loras: LoRASet | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(sched_cfg, pool)
        self.pool = pool
        self.sampler = sampler or Sampler()
        self.model_stop_ids = frozenset(model_stop_ids)
        self.vocab_size = vocab_size  # when given, prompts with ids outside it are refused at add
        self.grammars = Grammars(tokenizer)  # structured output; xgrammar loads on first use
        self._next_seq_id = 0
        self._errors: list[tuple[str, EngineError]] = []
        self.spec_draft_tokens = 0  # speculative decoding: tokens drafted, and of those, kept
        self.spec_accepted_tokens = 0
        self.step_token_counts = [0] * (len(STEP_TOKEN_BUCKETS) + 1)  # steps run, by tokens (EngineStats)
        self.step_tokens = 0
        # LoRA adapters: the runner's (make_runner attached them). lora_keys maps each served name to its
        # key there; it is replaced, never changed in place, as the API's thread reads it (check_request).
        self.loras = loras
        self.lora_keys: dict[str, str] = {key: key for key in loras.adapters} if loras else {}
        self._lora_keys_used = set(self.lora_keys)  # a key is never given to a second load
        self._lora_retired: set[str] = set()  # keys unloaded or replaced, dropped once no sequence runs them

    @property
    def max_model_len(self) -> int:
        return self.scheduler.cfg.max_model_len

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def has_request(self, request_id: str) -> bool:
        return request_id in self.scheduler

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError when the request can never be served as asked. It reads only the engine's fixed
        limits and lora_keys (replaced whole, never changed in place), so any thread may call it (the API
        does, before it starts a stream)."""
        cfg = self.scheduler.cfg
        check_request_limits(prompt_ids, params, self.vocab_size, cfg, self.lora_keys)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError (nothing queued) when it cannot be served as asked."""
        self.check_request(prompt_ids, params)
        stop_ids = self._stop_ids(params)
        if params.guided is not None:
            self.grammars.compile(params.guided)  # GuidedSpecError (a ValueError) when it cannot
        seqs, now = [], time.monotonic()
        lora = None if params.lora is None else self.lora_keys[params.lora]
        for index in range(params.n):
            seq = Sequence(self._next_seq_id + index, request_id, index, list(prompt_ids), params, arrival_time=now,
                           lora=lora)
            seq.generator = make_generator(params.seed, index)
            seq.stop_token_ids = stop_ids
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]  # the first prompt token has nothing before it
            if params.guided is not None:  # each choice walks its own path through the grammar
                seq.guide = self.grammars.guide(params.guided, stop_ids)
            if has_penalties(params):
                seq.token_counts = TokenCounts()
            seqs.append(seq)
        self.scheduler.add(seqs)  # validates length and request id uniqueness
        self._next_seq_id += params.n

    def abort(self, request_id: str, index: int | None = None) -> list[Output]:
        """Finish every choice of the request now, or only choice `index` (blocks freed); their last
        Outputs. [] if unknown or finished."""
        seqs = self.scheduler.abort(request_id, index=index)
        if self._lora_retired:
            self._retire_lora()
        return [self._output(s, [], s.detokenizer.flush(), None) for s in sorted(seqs, key=lambda s: s.index)]

    def load_lora(self, name: str, path: str, replace: bool = False) -> None:
        """Between steps: serve the LoRA adapter in `path` as `name` from now on. ValueError (LoRAError for
        the adapter's own faults) when it cannot be, or when `name` is served already and not `replace`d;
        requests running with the adapter it replaces finish with that one."""
        if self.loras is None:
            raise ValueError("this engine serves no LoRA adapters: start it with --allow-runtime-lora-updating")
        if name in self.lora_keys and not replace:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        key, n = name, 1
        while key in self._lora_keys_used:
            key, n = f"{name}#{n}", n + 1
        self.loras.load(key, name, path)
        self._lora_keys_used.add(key)
        old = self.lora_keys.get(name)
        self.lora_keys = {**self.lora_keys, name: key}
        if old is not None:
            self._retire_lora(old)
        log.info("LoRA adapter %r loaded from %s%s", name, path, " in place of the one before" if old else "")

    def unload_lora(self, name: str) -> None:
        """Between steps: serve `name` no more (KeyError when it is not served); requests running with it
        finish with it."""
        keys = dict(self.lora_keys)
        key = keys.pop(name)
        self.lora_keys = keys
        self._retire_lora(key)
        log.info("LoRA adapter %r unloaded", name)

    def _retire_lora(self, key: str | None = None) -> None:
        """Free the weights of retired adapters that no unfinished sequence runs with."""
        if key is not None:
            self._lora_retired.add(key)
        in_use = {s.lora for s in self.scheduler.unfinished()}
        for k in self._lora_retired - in_use:
            self.loras.remove(k)
            self._lora_retired.discard(k)

    def close(self) -> None:
        """Release the runner (a tensor-parallel one's worker processes). The engine serves no more."""
        self.runner.close()

    def pop_errors(self) -> list[tuple[str, EngineError]]:
        """Requests failed since the last call: (request_id, error). Their Outputs stop without a finish."""
        errors, self._errors = self._errors, []
        return errors

    def stats(self) -> EngineStats:
        running = len({s.request_id for s in self.scheduler.running})
        return EngineStats(
            num_running=running,
            num_waiting=self.scheduler.num_requests - running,
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_used=self.pool.num_used,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
            step_token_counts=tuple(self.step_token_counts),
            step_tokens=self.step_tokens,
        )

    def step(self) -> list[Output]:
        outputs = self._step()
        if self._lora_retired:
            self._retire_lora()
        return outputs

    def _step(self) -> list[Output]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        self.step_token_counts[bisect.bisect_left(STEP_TOKEN_BUCKETS, out.num_tokens)] += 1
        self.step_tokens += out.num_tokens
        try:
            logits = self.runner.execute(model_batch(out))
            if logits.shape[0] != out.num_logit_rows:
                raise RuntimeError(f"the runner returned {logits.shape[0]} logit rows for {out.num_logit_rows}")
        except Exception as e:
            log.exception("forward failed; failing the %d sequences of this batch", len(out.scheduled))
            for request_id in dict.fromkeys(q.request_id for s in out.scheduled for q in [s.seq, *s.sample_for]):
                self._fail(request_id, e)
            return []
        # each sequence's rows end where the next one's start; its last row is the one it samples from
        ends = list(itertools.accumulate(s.num_logit_rows for s in out.scheduled))
        for s, end in zip(out.scheduled, ends):
            if s.prompt_logits:
                self._record_prompt_logprobs(s, logits[end - s.num_tokens : end])
        self.scheduler.on_step_done(out)  # before any finish: n > 1 forks take their blocks here

        # one sampling row per sequence (the one after its last real token): siblings of a fresh fork
        # read the same logits row
        targets = [q for s in out.scheduled for q in s.sample_for]
        row_of = [end - 1 - len(s.draft) for s, end in zip(out.scheduled, ends) for _ in s.sample_for]
        sampled = self._sample(logits if row_of == list(range(logits.shape[0])) else logits[row_of], targets)

        failed_before = {rid for rid, _ in self._errors}
        outputs: dict[int, Output] = {}  # seq_id -> its Output of this step, in sampling order
        for seq, smp in zip(targets, sampled):
            self._take_token(seq, smp, outputs)
        drafted = [(s, end - len(s.draft)) for s, end in zip(out.scheduled, ends) if s.draft]
        if drafted:
            self._verify_drafts(drafted, logits, outputs)
        failed = {rid for rid, _ in self._errors} - failed_before
        return [o for o in outputs.values() if o.request_id not in failed]

    # --- internals ----------------------------------------------------------------------------

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        # as in vLLM: explicit stop_token_ids add to the model's own; ignore_eos drops only the latter
        own = frozenset() if params.ignore_eos else self.model_stop_ids
        return own | frozenset(params.stop_token_ids or ())

    def _record_prompt_logprobs(self, s: ScheduledSeq, logits: torch.Tensor) -> None:
        """Row j of the chunk's logits predicts the token at s.start + j + 1: record those that are prompt
        tokens not recorded yet (a chunk recomputed after a preemption has some already)."""
        seq = s.seq
        have = seq.prompt_logprobs
        lo, hi = max(len(have), s.start + 1), min(s.start + s.num_tokens + 1, seq.num_prompt_tokens)
        if lo >= hi:
            return
        try:
            if lo != len(have):
                raise RuntimeError(f"prompt logprobs of {seq} skip from position {len(have)} to {lo}")
            rows = logits[lo - 1 - s.start : hi - 1 - s.start]
            have.extend(prompt_token_logprobs(rows, seq.prompt_token_ids[lo:hi], seq.params.prompt_logprobs))
        except Exception as e:
            log.exception("request %s failed while taking its prompt logprobs", seq.request_id)
            self._fail(seq.request_id, e)

    def _sample(self, logits: torch.Tensor, targets: list[Sequence]) -> list[Sampled | None]:
        """One Sampled per target; None where that row's request failed."""
        rows = [SampleRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, s.stop_token_ids, s.guide,
                          s.token_counts) for s in targets]
        logits = logits.float()
        # the batch may fail after drawing: each row re-draws from where it stood, so a seeded
        # choice's samples do not depend on another request's failure
        states = [None if r.generator is None else r.generator.get_state() for r in rows]
        try:
            return self.sampler(logits, rows)
        except (NoTokenLeft, GuidedDecodingError) as e:  # a request's own rules: no server fault, no traceback
            log.info("batched sampling: %s; sampling row by row to find the request", e)
        except Exception:
            log.exception("batched sampling failed; sampling row by row to find the culprit")
        for row, state in zip(rows, states):
            if state is not None:
                row.generator.set_state(state)
        result: list[Sampled | None] = []
        for i, (seq, row) in enumerate(zip(targets, rows)):
            if seq.is_finished:  # its request failed on an earlier row
                result.append(None)
                continue
            try:
                result.append(self.sampler(logits[i : i + 1], [row])[0])
            except Exception as e:
                self._fail(seq.request_id, e)
                result.append(None)
        return result

    def _verify_drafts(self, drafted: list[tuple[ScheduledSeq, int]], logits: torch.Tensor,
                       outputs: dict[int, Output]) -> None:
        """Keep each draft's tokens while they equal what the sampler draws at their positions.

        `drafted`: (scheduled, row of the logits after draft[0]). Position by position, each sequence whose
        last sampled token equals its next drafted one samples again from the row after that token, with
        every processor, constraint and stop seeing the tokens kept so far, as in plain decoding.
        """
        kept = {id(s): 0 for s, _ in drafted}
        live = list(drafted)
        while live:
            live = [(s, row) for s, row in live if not s.seq.is_finished and kept[id(s)] < len(s.draft)
                    and s.seq.output_token_ids[-1] == s.draft[kept[id(s)]]]
            if not live:
                break
            for s, _ in live:
                kept[id(s)] += 1
                self.scheduler.keep_draft_token(s)
            sampled = self._sample(logits[[row + kept[id(s)] - 1 for s, row in live]], [s.seq for s, _ in live])
            for (s, _), smp in zip(live, sampled):
                self._take_token(s.seq, smp, outputs)
        for s, _ in drafted:
            self.spec_draft_tokens += len(s.draft)
            self.spec_accepted_tokens += kept[id(s)]
            self.scheduler.accept_draft(s, kept[id(s)])

    def _take_token(self, seq: Sequence, smp: Sampled | None, outputs: dict[int, Output]) -> None:
        """Append a sampled token to `seq`, joining its Output of this step (a failure fails its request)."""
        if smp is None or seq.is_finished:
            return
        try:
            out = self._append(seq, smp)
        except GuidedDecodingError as e:  # the request's own constraint: no server fault, no traceback
            log.warning("request %s failed: %s", seq.request_id, e)
            self._fail(seq.request_id, e)
            return
        except Exception as e:
            log.exception("request %s failed while handling its new token", seq.request_id)
            self._fail(seq.request_id, e)
            return
        first = outputs.setdefault(seq.seq_id, out)
        if first is not out:  # a kept draft: one Output per step, with every token the step gave it
            first.token_ids += out.token_ids
            first.text += out.text
            if out.logprobs is not None:
                first.logprobs = (first.logprobs or []) + out.logprobs
            for name in ("finish_reason", "stop_reason", "num_output_tokens"):
                setattr(first, name, getattr(out, name))

    def _append(self, seq: Sequence, smp: Sampled) -> Output:
        token = smp.token_id
        seq.output_token_ids.append(token)
        params = seq.params
        finish = stop_reason = None
        # A grammar ends with a stop token it allowed (raises, failing the request, on a token it
        # forbade). Its ids stop even with ignore_eos or before min_tokens: the grammar has no
        # continuation.
        grammar_done = seq.guide is not None and seq.guide.advance(token)
        # stop ids count only once min_tokens are out (the sampler suppresses them until then)
        if grammar_done or (token in seq.stop_token_ids and seq.num_output_tokens > params.min_tokens):
            # a stop token is reported in token_ids; in the text only when asked for (as vLLM), and then
            # as the detokenizer writes it (nothing for a special token under skip_special_tokens)
            text = seq.detokenizer.add(token, check_stops=False)[0] if params.include_stop_str_in_output else ""
            text += seq.detokenizer.flush()
            finish, stop_reason = STOP, token
        else:
            # stop strings too wait for min_tokens (as vLLM): text before then is only text
            text, stop_string = seq.detokenizer.add(token, check_stops=seq.num_output_tokens > params.min_tokens)
            if stop_string is not None:
                finish, stop_reason = STOP, stop_string
        if finish is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            text += seq.detokenizer.flush()
            finish = LENGTH
        if finish is not None:
            self.scheduler.finish(seq, finish, stop_reason)
        logprobs = [smp.logprob] if params.logprobs is not None and smp.logprob is not None else None
        output = self._output(seq, [token], text, logprobs)
        if seq.num_output_tokens == 1:
            output.prompt_logprobs = seq.prompt_logprobs
        return output

    def _output(self, seq: Sequence, token_ids: list[int], text: str, logprobs) -> Output:
        return Output(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_cache_write_tokens=seq.num_cache_write_tokens,
            queue_time=None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time,
        )

    def _fail(self, request_id: str, error: Exception) -> None:
        if self.scheduler.abort(request_id, reason=ERROR):
            if isinstance(error, (GuidedDecodingError, NoTokenLeft)):  # the request's own rules, not the server
                self._errors.append((request_id, ConstraintError(f"request {request_id} failed: {error}")))
            else:
                self._errors.append((request_id, EngineError(f"request {request_id} failed: {error!r}")))


def check_request_limits(prompt_ids: list[int], params: SamplingParams, vocab_size: int | None,
                         cfg: SchedulerConfig, loras: Container[str]) -> None:
    """ValueError when an engine with these limits and LoRA adapters (by name) would refuse the request."""
    max_model_len = cfg.max_model_len
    if params.lora is not None and params.lora not in loras:
        raise ValueError(f"no LoRA adapter {params.lora!r} on this server")
    if params.priority and cfg.policy != "priority":
        raise ValueError("a request priority needs the priority scheduling policy: start the server with "
                         "--scheduling-policy priority")
    if params.n < 1:
        raise ValueError(f"n must be at least 1, got {params.n}")
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if params.allowed_token_ids is not None and (not params.allowed_token_ids or vocab_size is not None and any(
            not 0 <= t < vocab_size for t in params.allowed_token_ids)):
        raise ValueError(f"allowed_token_ids must be one or more ids in [0, {vocab_size})")
    if params.prompt_logprobs is not None and params.prompt_logprobs < 0:
        raise ValueError(f"prompt_logprobs must be at least 0, got {params.prompt_logprobs}")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt_ids):
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    if not prompt_ids:
        raise ValueError("empty prompt")
    if len(prompt_ids) > max_model_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens is longer than max_model_len {max_model_len}")


def model_batch(out: SchedulerOutput) -> ScheduledBatch:
    """The scheduler's decisions as the model runner's plain data."""
    chunks = [SeqChunk(s.token_ids, s.start, s.seq.block_table, bool(s.sample_for), s.seq.seq_id, s.all_logits,
                       s.seq.lora) for s in out.scheduled]
    return ScheduledBatch(chunks, out.block_copies)
