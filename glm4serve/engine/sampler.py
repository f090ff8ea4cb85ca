"""One token per sequence from one step's logits, each row with its own sampling parameters.

Per step, in this order:
  1. `apply_processors`: repetition penalty, presence/frequency penalties, logit_bias, min_tokens
     suppression of stop ids, then temperature. The result is *the* distribution of the row:
     sampled rows draw from it (after truncation), greedy rows take its argmax, and logprobs
     are its log-softmax.
  2. Rows with a grammar (structured output, see guided.py): -inf on the tokens it forbids.
  3. `apply_truncation` (sampled rows only): top-k, then top-p, then min-p.
  4. Greedy rows: argmax. Sampled rows: an exponential race drawn from the row's own generator.

A batch whose rows are all greedy with nothing to process and no grammar costs one argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .guided import mask_logits
from .types import SamplingParams, TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # from make_generator; None = the global RNG
    stop_token_ids: frozenset[int]  # effective stop ids: suppressed while len(output) < params.min_tokens
    guide: Any = None  # a guided.Guide when the request is constrained


@dataclass
class Sampled:
    token_id: int
    logprob: TokenLogprob | None  # when params.logprobs is not None


def make_generator(seed: int | None, index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The RNG stream of choice `index` of a request with `seed`; None when unseeded.

    The choice index is mixed in with a large odd multiplier so that the n choices of one request
    draw different samples, and (seed, index) pairs of different requests do not collide the way
    `seed + index` would.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % 2**64)
    return generator


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _suppresses_stops(row: SampleRow) -> bool:
    # A grammar decides alone when its reply may end: it allows stop ids only once complete, and
    # suppressing them then would leave no token at all. So min_tokens does not apply to it.
    return bool(row.stop_token_ids) and len(row.output_token_ids) < row.params.min_tokens and row.guide is None


def _needs_processing(row: SampleRow) -> bool:
    p = row.params
    return (
        _has_penalties(p)
        or bool(p.logit_bias)
        or _suppresses_stops(row)
        or (not p.greedy and p.temperature != 1.0)
    )


def _select(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` of `t`, without a copy when that is all of them in order."""
    return t if idx == list(range(t.shape[0])) else t[idx]


def _token_counts(ids: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] float32 occurrence counts of `ids`; ids outside the logits' width are ignored."""
    counts = torch.bincount(torch.tensor(ids, dtype=torch.long, device=device), minlength=vocab_size)
    return counts[:vocab_size].float()


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place. Repetition penalty (HF/vLLM): over prompt + output tokens, positive logits are
    divided by it and negative ones multiplied. Presence/frequency (OpenAI): over output tokens,
    logit -= presence * [count > 0] + frequency * count."""
    idx = [i for i, r in enumerate(rows) if _has_penalties(r.params)]
    if not idx:
        return
    vocab_size, device = logits.shape[1], logits.device
    counts = torch.stack([_token_counts(rows[i].output_token_ids, vocab_size, device) for i in idx])  # [R, V]
    seen = counts > 0  # [R, V]: in the prompt or the output, for the repetition penalty
    for j, i in enumerate(idx):
        if rows[i].params.repetition_penalty != 1.0 and rows[i].prompt_token_ids:
            seen[j] |= _token_counts(rows[i].prompt_token_ids, vocab_size, device) > 0

    def column(values: list[float]) -> torch.Tensor:  # [R, 1]
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

    rep = column([rows[i].params.repetition_penalty for i in idx])
    presence = column([rows[i].params.presence_penalty for i in idx])
    frequency = column([rows[i].params.frequency_penalty for i in idx])
    sub = logits[idx]  # [R, V], a copy
    # rep == 1 rows: both branches are the identity, so no per-row masking is needed
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= presence * (counts > 0).float() + frequency * counts
    logits[idx] = sub


def apply_processors(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The logits each row's distribution is made of: penalties, logit_bias, min_tokens, temperature.

    Order: penalties first, on the model's own logits (the repetition penalty's sign test must
    see the model's logit, not a biased one); then logit_bias, the user's explicit override; then
    -inf on the stop ids while fewer than min_tokens were generated, which nothing can undo; then
    temperature (sampled rows only: a greedy row's temperature is 0 and its scale is left at 1).

    Logprobs are the log-softmax of this result. That is our choice, as our issue asks: logprobs
    of what the row samples from, penalties, bias and temperature included, but before the
    top-k/top-p/min-p truncation (which would make every cut-off alternative -inf). A grammar's
    mask is a truncation too: logprobs are taken before it, so they say how likely the model
    found each token, allowed or not. vLLM's default instead reports the raw model
    distribution; for rows with default parameters and no grammar both agree.

    Never modifies `logits`; returns it unchanged when no row has anything to do, else a new
    float32 tensor [len(rows), V].
    """
    if not any(_needs_processing(r) for r in rows):
        return logits
    out = logits.to(torch.float32, copy=True)
    vocab_size, device = out.shape[1], out.device
    _apply_penalties(out, rows)
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            bias = [(int(t), float(b)) for t, b in row.params.logit_bias.items() if 0 <= int(t) < vocab_size]
            if bias:
                ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
                out[i, ids] += torch.tensor([b for _, b in bias], dtype=torch.float32, device=device)
        if _suppresses_stops(row):
            stops = [t for t in row.stop_token_ids if 0 <= t < vocab_size]
            out[i, stops] = -math.inf
    temperatures = [1.0 if r.params.greedy else r.params.temperature for r in rows]
    if any(t != 1.0 for t in temperatures):
        out /= torch.tensor(temperatures, dtype=torch.float32, device=device)[:, None]
    return out


def apply_truncation(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p over what top-k kept (renormalized), then min-p: cut tokens become -inf.

    top-k keeps exactly k tokens (ties at the border go by sort order); top-p keeps the smallest
    set of best tokens whose mass reaches p (the best token always stays); min-p keeps tokens with
    prob >= min_p * (best prob). Returns a new tensor, or `logits` when no row truncates.
    """
    vocab_size = logits.shape[1]
    device = logits.device
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]  # inf: never cut (no float-error tail loss)
    if any(k < vocab_size for k in top_k) or any(p != math.inf for p in top_p):
        if all(k < vocab_size for k in top_k):
            # every row cuts to its k best: sorting only the widest k is far cheaper than all of V
            sorted_logits, order = logits.topk(max(top_k), dim=-1)  # [B, K] each, best first
        else:
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, K = V] each
        rank = torch.arange(sorted_logits.shape[1], device=device)[None, :]  # [1, K]
        k = torch.tensor(top_k, device=device)[:, None]  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(rank >= k, -math.inf)
        if any(p != math.inf for p in top_p):
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # [B, K]: mass of the strictly better tokens
            cut = mass_before >= torch.tensor(top_p, dtype=torch.float32, device=device)[:, None]
            cut[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(cut, -math.inf)
        # tokens outside the sorted part (the topk path) are cut; with a full sort it covers all V
        logits = torch.full_like(logits, -math.inf).scatter_(1, order, sorted_logits)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        # prob_i >= min_p * prob_max  <=>  logit_i >= logit_max + log(min_p); log(0) = -inf keeps all
        log_min_p = torch.tensor(min_p, dtype=torch.float32, device=device).log()[:, None]  # [B, 1]
        threshold = logits.max(dim=-1, keepdim=True).values + log_min_p
        logits = logits.masked_fill(logits < threshold, -math.inf)
    return logits


def sample_from(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[B] token ids, row b drawn from probs[b] ([B, V], rows summing to 1).

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i. The noise
    of a seeded row comes from its own generator, V draws per step, so its samples do not depend
    on which other rows share the batch. Unseeded rows share one draw from the global RNG.
    """
    noise = torch.empty_like(probs)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for j, generator in enumerate(generators):
        if generator is not None:
            draw = torch.empty(probs.shape[1], device=generator.device).exponential_(generator=generator)
            noise[j] = draw.to(probs.device)
    # a zero draw would make 0/0 = nan for cut tokens, and argmax picks nan
    return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
        """logits [len(rows), V] -> one Sampled per row."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sample rows")
        constrained = [i for i, r in enumerate(rows) if r.guide is not None]
        if not constrained and all(r.params.greedy and r.params.logprobs is None and not _needs_processing(r)
                              for r in rows):
            return [Sampled(t, None) for t in logits.argmax(dim=-1).tolist()]

        processed = apply_processors(logits, rows)  # [B, V]
        # Constrained rows choose from a masked copy of their own rows only: `processed` stays
        # as it is (the caller's logits, the logprobs), and the other rows are never copied.
        position = {i: j for j, i in enumerate(constrained)}  # row -> its row of `masked`
        masked = None
        if constrained:
            masked = processed[constrained]  # [G, V], a copy
            mask_logits(masked, [rows[i].guide for i in constrained])
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy:
            token_ids[greedy] = _select(processed, greedy).argmax(dim=-1)
            held = [i for i in greedy if i in position]
            if held:  # their unmasked argmax is overwritten: cheaper than copying the other rows
                token_ids[held] = _select(masked, [position[i] for i in held]).argmax(dim=-1)
        if sampled:
            choose_from = _select(processed, sampled)
            held = [k for k, i in enumerate(sampled) if i in position]
            if held:
                if choose_from is processed:
                    choose_from = processed.clone()
                choose_from[held] = _select(masked, [position[sampled[k]] for k in held])
            truncated = apply_truncation(choose_from, [rows[i].params for i in sampled])
            token_ids[sampled] = sample_from(truncated.softmax(dim=-1), [rows[i].generator for i in sampled])

        ids = token_ids.tolist()
        logprobs = self._logprobs(processed, token_ids, ids, rows)
        return [Sampled(t, logprobs.get(i)) for i, t in enumerate(ids)]

    @staticmethod
    def _logprobs(
        processed: torch.Tensor, token_ids: torch.Tensor, ids: list[int], rows: list[SampleRow]
    ) -> dict[int, TokenLogprob]:
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return {}
        logprobs = _select(processed, want).float().log_softmax(dim=-1)  # [W, V]
        chosen = logprobs.gather(1, _select(token_ids, want)[:, None]).squeeze(1).tolist()  # [W]
        ks = [min(max(rows[i].params.logprobs, 0), MAX_TOP_LOGPROBS, logprobs.shape[1]) for i in want]
        top_values, top_ids = [], []
        if max(ks) > 0:
            values, indices = logprobs.topk(max(ks), dim=-1)  # [W, k], best first
            top_values, top_ids = values.tolist(), indices.tolist()
        result = {}
        for j, i in enumerate(want):
            top = list(zip(top_ids[j][: ks[j]], top_values[j][: ks[j]])) if ks[j] else []
            result[i] = TokenLogprob(token_id=ids[i], logprob=chosen[j], top=top)
        return result
