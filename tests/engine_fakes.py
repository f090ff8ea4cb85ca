"""Model-free stand-ins for the engine tests: a runner over a fake paged cache, a tiny tokenizer.

FakeRunner stands in for the model runner (model/runner.py): it takes the same ScheduledBatch and
returns logits. It keeps token ids (not K/V) in a flat slot array laid out like the real KV
cache, executes the block copies, writes every scheduled token into its slot, then reads each
sampling chunk's whole context back *through its block table*. The next token is a function of
that context, so a paging, fork or copy-on-write bug changes the generated text; `drive` also
checks every read-back context against the sequence's own tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from glm4serve.engine.config import EngineArgs, SchedulerConfig
from glm4serve.engine.engine import model_batch
from glm4serve.engine.scheduler import Scheduler, SchedulerOutput
from glm4serve.engine.sequence import Sequence
from glm4serve.model.batch import ScheduledBatch

VOCAB = 64
FIRST_PLAIN = 10  # ids below are "special" in FakeTokenizer; the default model never emits them
NUM_MODEL_IDS = 50  # the default model emits ids 10..59; 60..63 are left for tests to script


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context (position-weighted)."""
    h = sum((i + 1) * t for i, t in enumerate(context)) + 7 * len(context)
    return FIRST_PLAIN + h % NUM_MODEL_IDS


def continuation(prompt: list[int], k: int, model: Callable[[list[int]], int] = next_token) -> list[int]:
    ctx = list(prompt)
    for _ in range(k):
        ctx.append(model(ctx))
    return ctx[len(prompt) :]


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, model: Callable[[list[int]], int] = next_token,
                 peak: float = 40.0, delay: float = 0.0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.slots: list[int | None] = [None] * (num_blocks * block_size)
        self.model = model
        self.peak = peak  # logit of the model's token over 0 for the rest: 40 = certain, 1 = a coin toss
        self.delay = delay  # seconds per forward, to keep requests in flight in async tests
        self.steps: list[ScheduledBatch] = []
        self.fail_next = False  # raise from the next execute(), as a broken forward would

    def slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def context(self, table: list[int], end: int) -> list[int | None]:
        """Tokens 0..end of a sequence, read back through its block table."""
        return [self.slots[self.slot(table, p)] for p in range(end)]

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        self.steps.append(batch)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected forward failure")
        bs = self.block_size
        for src, dst in batch.block_copies:
            self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]
        for c in batch.chunks:  # all writes of the step land before any read, as in a forward
            assert len(c.block_table) * bs >= c.start + len(c.token_ids), f"sequence {c.seq_id} lacks blocks"
            for i, t in enumerate(c.token_ids):
                self.slots[self.slot(c.block_table, c.start + i)] = t
        rows = []
        for c in batch.chunks:  # a chunk's rows: after each of its last num_logit_rows tokens
            end = c.start + len(c.token_ids)
            for e in range(end - c.num_logit_rows + 1, end + 1):
                seen = self.context(c.block_table, e)
                assert None not in seen, f"sequence {c.seq_id} reads slots never written: {seen}"
                rows.append(self.model(seen))
        logits = torch.zeros(len(rows), VOCAB)
        for r, t in enumerate(rows):
            logits[r, t] = self.peak
        return logits

    def close(self) -> None:
        pass

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """execute() the scheduler's output as the engine hands it over, then check that what each
        sampling sequence read back through its block table is its own context."""
        logits = self.execute(model_batch(out))
        for s in out.scheduled:
            end = s.start + s.num_tokens - len(s.draft)
            if s.sample_for:
                assert self.context(s.seq.block_table, end) == s.seq.token_ids_between(0, end), f"cache of {s.seq}"
        return logits


def drive(sched: Scheduler, runner: FakeRunner, max_tokens: dict[int, int], max_steps: int = 10_000,
          on_step: Callable[[int, SchedulerOutput], None] | None = None) -> int:
    """A minimal engine loop over the scheduler alone: greedy argmax, finish at max_tokens[seq_id]."""
    steps = 0
    while sched.has_work:
        assert steps < max_steps, "no progress"
        out = sched.schedule()
        logits = runner.run(out)
        sched.on_step_done(out)
        if on_step:
            on_step(steps, out)
        rows = [s for s in out.scheduled if s.sample_for]
        for s, row in zip(rows, logits):
            for seq in s.sample_for:
                seq.output_token_ids.append(int(row.argmax()))
                if seq.num_output_tokens >= max_tokens[seq.seq_id]:
                    sched.finish(seq, "length")
        steps += 1
    return steps


class FakeTokenizer:
    """Ids < FIRST_PLAIN are special ('<i>'); a plain id t is the byte of letter 'a' + t % 26."""

    stop_token_ids = (1, 2, 3)

    def __init__(self, fail_on: int | None = None):
        self.fail_on = fail_on  # token_bytes() raises on this id: a request that fails mid-decode

    def is_special(self, token_id: int) -> bool:
        return token_id < FIRST_PLAIN

    def token_bytes(self, token_id: int) -> bytes:
        if token_id == self.fail_on:
            raise RuntimeError(f"injected detokenizer failure on token {token_id}")
        if token_id < FIRST_PLAIN:
            return f"<{token_id}>".encode()
        return bytes([ord("a") + token_id % 26])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.token_bytes(i) for i in ids if not (skip_special_tokens and self.is_special(i))).decode()


def text_of(ids: list[int]) -> str:
    return FakeTokenizer().decode(ids)


def make_seq(seq_id: int, prompt: list[int], request_id: str | None = None, index: int = 0, **params) -> Sequence:
    from glm4serve.engine.types import SamplingParams

    return Sequence(seq_id, request_id or f"r{seq_id}", index, list(prompt), SamplingParams(**params))


class RecordingRunner:
    """Wraps a real model runner: counts block copies and keeps the smallest gap between the best
    two logits of any row, to tell a real mismatch from a near tie."""

    def __init__(self, runner):
        self.runner = runner
        self.num_blocks, self.block_size = runner.num_blocks, runner.block_size
        self.min_gap = float("inf")
        self.copies = 0

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        self.copies += len(batch.block_copies)
        logits = self.runner.execute(batch)
        if logits.shape[0]:
            top2 = logits.topk(2, dim=-1).values
            self.min_gap = min(self.min_gap, float((top2[:, 0] - top2[:, 1]).min()))
        return logits

    def close(self) -> None:
        self.runner.close()


def sched_config(max_model_len: int = 8192, **engine_args) -> SchedulerConfig:
    """The scheduler's limits as the engine derives them from EngineArgs (its defaults but those given)."""
    return EngineArgs(**engine_args).scheduler_config(max_model_len, "cpu")
