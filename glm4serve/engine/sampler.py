"""One token per sequence from one step's logits, each row with its own sampling parameters.

Per step, in this order:
  1. `apply_processors`: repetition penalty, presence/frequency penalties, logit_bias, min_tokens
     suppression of stop ids, then temperature. The result is *the* distribution of the row:
     sampled rows draw from it (after truncation), greedy rows take its argmax, and logprobs
     are its log-softmax.
  2. Rows with a grammar (structured output, see guided.py): -inf on the tokens it forbids.
  3. `truncate` (sampled rows only): top-k, then top-p, then min-p, among each row's best tokens.
  4. Greedy rows: argmax. Sampled rows: an inverse-transform draw from the row's own generator.

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


class NoTokenLeft(ValueError):
    """A request's own rules (allowed_token_ids, bad_words, min_tokens, its grammar) leave its row no token to
    sample."""


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # from make_generator; None = the global RNG
    stop_token_ids: frozenset[int]  # effective stop ids: suppressed while len(output) < params.min_tokens
    guide: Any = None  # a guided.Guide when the request is constrained
    token_counts: TokenCounts | None = None  # the sequence's, kept between steps, when it has penalties


@dataclass
class Sampled:
    token_id: int
    logprob: TokenLogprob | None  # when params.logprobs is not None


def make_generator(seed: int | None, index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The RNG stream of choice `index` of a request with `seed`; None when unseeded.

    A CPU generator (mt19937) keeps only the low 32 bits of its seed, so seed and seed + 2**32 would
    draw the same samples, as would `seed + index` of one request and `seed + 1` of another. The
    pair is hashed (splitmix64) and folded to 32 bits instead: two distinct pairs share a stream
    with chance 2**-32, never by a pattern.
    """
    if seed is None:
        return None
    h = _splitmix64((_splitmix64(seed % 2**64) + index) % 2**64)
    generator = torch.Generator(device=device)
    generator.manual_seed((h ^ (h >> 32)) & 0xFFFFFFFF)
    return generator


def _splitmix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


class TokenCounts:
    """A sequence's tokens as its penalties read them, kept from step to step: each distinct output token
    and its count, and the prompt's distinct tokens. A step adds only what the output gained since the
    last (the output only grows), and the penalties touch only these tokens' logits, not all V of a row:
    the cost of a step follows what it added, not the reply's length or the vocabulary."""

    def __init__(self, device: torch.device | None = None, vocab_size: int = 0):
        self._device, self._vocab_size = device, vocab_size
        self._ids = torch.empty(0, dtype=torch.long, device=device)  # [capacity]: distinct output tokens
        self._counts = torch.empty(0, device=device)  # [capacity] float32: their counts
        self._size = 0
        self._position: dict[int, int] = {}  # token -> its place in _ids
        self._counted = 0  # output tokens counted
        self._prompt: torch.Tensor | None = None  # [P'] distinct prompt tokens

    def update(self, output: list[int], vocab_size: int, device: torch.device) -> None:
        """Count the tokens `output` (the sequence's whole output so far) gained; ids past V are ignored."""
        if (device, vocab_size) != (self._device, self._vocab_size) or len(output) < self._counted:
            self.__init__(device, vocab_size)  # counted anew: a first step, or logits of another shape
        new = [t for t in output[self._counted :] if t < vocab_size]
        if not new:
            self._counted = len(output)
            return
        fresh = [t for t in dict.fromkeys(new) if t not in self._position]
        if self._size + len(fresh) > self._ids.shape[0]:
            capacity = max(64, 2 * (self._size + len(fresh)))
            ids, counts = torch.zeros(capacity, dtype=torch.long, device=device), torch.zeros(capacity, device=device)
            ids[: self._size], counts[: self._size] = self.output_ids, self.output_counts
            self._ids, self._counts = ids, counts
        if fresh:
            self._position.update((t, self._size + j) for j, t in enumerate(fresh))
            self._ids[self._size : self._size + len(fresh)] = torch.tensor(fresh, device=device)
            self._size += len(fresh)
        places = torch.tensor([self._position[t] for t in new], device=device)
        self._counts.index_add_(0, places, torch.ones(len(new), device=device))
        self._counted = len(output)

    @property
    def output_ids(self) -> torch.Tensor:
        return self._ids[: self._size]

    @property
    def output_counts(self) -> torch.Tensor:
        return self._counts[: self._size]

    def prompt_ids(self, prompt: list[int]) -> torch.Tensor:
        """The prompt's distinct tokens below V (after an update, which sets the device and V)."""
        if self._prompt is None:
            self._prompt = torch.tensor(sorted({t for t in prompt if t < self._vocab_size}), dtype=torch.long,
                                        device=self._device)
        return self._prompt


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _suppresses_stops(row: SampleRow) -> bool:
    # A grammar decides alone when its reply may end: it allows stop ids only once complete, and
    # suppressing them then would leave no token at all. So min_tokens does not apply to it.
    return bool(row.stop_token_ids) and len(row.output_token_ids) < row.params.min_tokens and row.guide is None


def _needs_processing(row: SampleRow) -> bool:
    p = row.params
    return (
        has_penalties(p)
        or bool(p.logit_bias)
        or _suppresses_stops(row)
        or p.allowed_token_ids is not None
        or bool(p.bad_words_token_ids)
        or (not p.greedy and p.temperature != 1.0)
    )


def _select(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` of `t`, without a copy when that is all of them in order."""
    return t if idx == list(range(t.shape[0])) else t[idx]


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place. Repetition penalty (HF/vLLM): over prompt + output tokens, positive logits are
    divided by it and negative ones multiplied. Presence/frequency (OpenAI): over output tokens,
    logit -= presence * [count > 0] + frequency * count. Each is one gather and one scatter over
    the (row, token) pairs it touches, all rows at once."""
    idx = [i for i, r in enumerate(rows) if has_penalties(r.params)]
    if not idx:
        return
    device = logits.device
    kept = {i: rows[i].token_counts or TokenCounts() for i in idx}
    for i in idx:
        kept[i].update(rows[i].output_token_ids, logits.shape[1], device)

    def pairs(which: list[int], tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, tokens) of `which`'s tokens, and each pair's place in `which`."""
        cols = [tokens(i) for i in which]
        lengths = [c.shape[0] for c in cols]  # output_size given: on a GPU, no wait for the device to say it
        owner = torch.repeat_interleave(torch.tensor(lengths, device=device), output_size=sum(lengths))
        return torch.tensor(which, device=device)[owner], torch.cat(cols), owner

    def per_pair(values: list[float], owner: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[owner]

    rep = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
    if rep:  # a token in both the prompt and the output is listed twice: both write the same value
        r, c, owner = pairs(rep, lambda i: torch.cat([kept[i].prompt_ids(rows[i].prompt_token_ids),
                                                      kept[i].output_ids]))
        penalty = per_pair([rows[i].params.repetition_penalty for i in rep], owner)
        v = logits[r, c]
        logits[r, c] = torch.where(v > 0, v / penalty, v * penalty)
    counted = [i for i in idx if rows[i].params.presence_penalty != 0.0 or rows[i].params.frequency_penalty != 0.0]
    if counted:
        r, c, owner = pairs(counted, lambda i: kept[i].output_ids)
        counts = torch.cat([kept[i].output_counts for i in counted])
        presence = per_pair([rows[i].params.presence_penalty for i in counted], owner)
        frequency = per_pair([rows[i].params.frequency_penalty for i in counted], owner)
        logits[r, c] -= presence + frequency * counts


def _banned(row: SampleRow) -> list[int]:
    """The tokens bad_words rules out next: each word's last token, where the output ends with the rest."""
    out, banned = row.output_token_ids, []
    for word in row.params.bad_words_token_ids or ():
        rest = word[:-1]
        if not rest or (len(out) >= len(rest) and out[len(out) - len(rest):] == rest):
            banned.append(word[-1])
    return banned


def apply_processors(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The logits each row's distribution is made of: penalties, logit_bias, min_tokens, allowed
    tokens and bad words, temperature.

    Order: penalties first, on the model's own logits (the repetition penalty's sign test must
    see the model's logit, not a biased one); then logit_bias, the user's explicit override; then
    -inf on the stop ids while fewer than min_tokens were generated, on every token but the allowed
    ones and on what bad words rule out, which nothing can undo; then temperature (sampled rows only:
    a greedy row's temperature is 0 and its scale is left at 1).

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
        if row.params.allowed_token_ids is not None:
            keep = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(row.params.allowed_token_ids, dtype=torch.long, device=device)
            keep[ids[(ids >= 0) & (ids < vocab_size)]] = True
            out[i].masked_fill_(~keep, -math.inf)
        if row.params.bad_words_token_ids:
            out[i, [t for t in _banned(row) if 0 <= t < vocab_size]] = -math.inf
        if (row.params.allowed_token_ids is not None or row.params.bad_words_token_ids) and not bool(
                torch.isfinite(out[i]).any()):
            raise NoTokenLeft("allowed_token_ids, bad_words and min_tokens leave no token to write")
    temperatures = [1.0 if r.params.greedy else r.params.temperature for r in rows]
    if any(t != 1.0 for t in temperatures):
        out /= torch.tensor(temperatures, dtype=torch.float32, device=device)[:, None]
    return out


CANDIDATES = 1024  # top-k/top-p look among the best 1024 tokens first (a partial sort), not all V
MASS_MARGIN = 1e-3  # the candidates must hold this much more than top_p, for float error's sake


@dataclass
class Candidates:
    """Some rows' tokens after truncation: logits [G, K] (-inf where cut) of the token ids [G, K],
    best first; ids None: every token, in vocabulary order (K = V)."""

    rows: list[int]
    logits: torch.Tensor
    ids: torch.Tensor | None
    # truncate(check=False): [G] bool on the logits' device, the rows whose top-p set may reach past
    # these candidates (their cut is exact only when this is False)
    unsure: torch.Tensor | None = None


def truncate(logits: torch.Tensor, params: list[SamplingParams], candidates: int = CANDIDATES,
             check: bool = True) -> list[Candidates]:
    """top-k, then top-p over what top-k kept (renormalized), then min-p, row by row: each row's
    tokens still in the running, in groups of rows of one width.

    top-k keeps exactly k tokens (ties at the border go by sort order); top-p keeps the smallest
    set of best tokens whose mass reaches p (the best token always stays); min-p keeps tokens with
    prob >= min_p * (best prob).

    A sort of GLM-4's 151,552 logits costs ~14 ms a row on a CPU core, its 1024 best (topk) ~0.8 ms.
    So a row that truncates by rank is cut among its `candidates` best tokens (its top-k, when
    wider), which is exact when they hold the row's whole top-p set; a row whose top-p set may reach
    past them (a flat distribution) is sorted whole. Rows that do not truncate by rank keep all V.
    That check reads the device's result before going on; with check=False it is left to the caller
    (`Candidates.unsure`), who can read it with what it reads anyway.
    """
    vocab_size = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]  # inf: never cut (no float-error tail loss)
    ranked = [i for i in range(len(params)) if top_k[i] < vocab_size or top_p[i] != math.inf]
    unranked = sorted(set(range(len(params))) - set(ranked))
    groups = [Candidates(unranked, _select(logits, unranked), None)] if unranked else []
    if ranked:
        ks, ps = [top_k[i] for i in ranked], [top_p[i] for i in ranked]
        sub = _select(logits, ranked)  # [R, V]
        width = min(vocab_size, max([candidates] + [k for k in ks if k < vocab_size]))
        best, order, held = _cut_by_rank(sub, width, ks, ps)  # [R, K], [R, K], [R]
        short, unsure = [], None  # top-p over all V (no top-k): exact among the candidates only if they hold its mass
        if width < vocab_size and vocab_size in ks:
            need = torch.tensor([p + MASS_MARGIN if k == vocab_size else 0.0 for k, p in zip(ks, ps)],
                                device=held.device)
            if check:
                short = torch.nonzero(held < need).flatten().tolist()
            else:
                unsure = held < need  # [R]
        kept = sorted(set(range(len(ranked))) - set(short))
        if kept:
            groups.append(Candidates([ranked[j] for j in kept], _select(best, kept), _select(order, kept), unsure))
        if short:
            best, order, _ = _cut_by_rank(sub[short], vocab_size, [ks[j] for j in short], [ps[j] for j in short])
            groups.append(Candidates([ranked[j] for j in short], best, order))
    for g in groups:
        min_p = [params[i].min_p for i in g.rows]
        if any(m > 0.0 for m in min_p):
            # prob_i >= min_p * prob_max  <=>  logit_i >= logit_max + log(min_p); log(0) = -inf keeps all
            log_min_p = torch.tensor(min_p, dtype=torch.float32, device=logits.device).log()[:, None]  # [G, 1]
            threshold = g.logits.max(dim=-1, keepdim=True).values + log_min_p
            g.logits = g.logits.masked_fill(g.logits < threshold, -math.inf)
    return groups


def _cut_by_rank(logits: torch.Tensor, width: int, top_k: list[int], top_p: list[float]):
    """logits [R, V] -> each row's `width` best logits [R, K] (all V when width == V), best first,
    -inf outside its top-k / top-p set; their token ids [R, K]; [R] the share of the row's top-p
    mass they hold. A row's top-p mass is over what its top-k keeps, or over all V without one."""
    vocab_size, device = logits.shape[1], logits.device
    if width < vocab_size:
        best, order = logits.topk(width, dim=-1)  # [R, K] each, best first
    else:
        best, order = logits.sort(dim=-1, descending=True)  # [R, V] each
    rank = torch.arange(width, device=device)[None, :]  # [1, K]
    best = best.masked_fill(rank >= torch.tensor(top_k, device=device)[:, None], -math.inf)
    held = torch.ones(len(top_k), device=device)
    if any(p != math.inf for p in top_p):
        kept = best.logsumexp(dim=-1)  # [R]: the kept set's (all V's for a full sort without top-k)
        norm = kept
        whole = [j for j, k in enumerate(top_k) if k == vocab_size]
        if width < vocab_size and whole:  # candidates of a row without top-k: its mass is over all V
            norm = kept.clone()
            norm[whole] = _select(logits, whole).logsumexp(dim=-1)
            held = (kept - norm).exp()
        probs = (best - norm[:, None]).exp()  # [R, K]
        mass_before = probs.cumsum(dim=-1) - probs  # [R, K]: mass of the strictly better tokens
        cut = mass_before >= torch.tensor(top_p, dtype=torch.float32, device=device)[:, None]
        cut[:, 0] = False
        best = best.masked_fill(cut, -math.inf)
    return best, order, held


def apply_truncation(logits: torch.Tensor, params: list[SamplingParams], candidates: int = CANDIDATES) -> torch.Tensor:
    """truncate()'s result as logits [B, V], cut tokens at -inf: a new tensor, or `logits` when no
    row truncates."""
    groups = truncate(logits, params, candidates)
    if len(groups) == 1 and groups[0].ids is None:
        return groups[0].logits
    out = torch.full_like(logits, -math.inf)
    for g in groups:
        out[g.rows] = g.logits if g.ids is None else out[g.rows].scatter_(1, g.ids, g.logits)
    return out


SAMPLE_CHUNK = 1024  # inverse_transform finds the chunk of tokens first, then the token in it


def uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, [B] float64: a seeded row's from its own generator, one number
    per step, so its samples do not depend on which other rows share the batch; unseeded rows share
    one draw from the global RNG."""
    u = torch.empty(len(generators), dtype=torch.float64, device=device)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, device=device)
    seeded = [j for j, g in enumerate(generators) if g is not None]
    if seeded:  # each drawn where its generator lives (make_generator's: the CPU), all moved in one copy
        u[seeded] = torch.cat([torch.rand(1, dtype=torch.float64, device=generators[j].device,
                                          generator=generators[j]).cpu() for j in seeded]).to(device)
    return u


def inverse_transform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] token ids: in row b of probs [B, V] (rows summing to 1), the first token whose cumulative
    probability reaches t = (1 - u[b]) x the row's total, u [B] uniform in [0, 1). t lies in (0, total],
    so a token of probability 0 is never chosen. The search runs in two levels: the chunk of
    SAMPLE_CHUNK tokens that holds t, then the token within it (a cumulative sum over all V costs ~2 ms
    a row on a CPU core, the chunks' sums ~0.1); sums of more than a chunk are float64, as float32
    over 151,552 terms would shift the edges.
    """
    b, vocab_size = probs.shape
    device = probs.device
    chunks = -(-vocab_size // SAMPLE_CHUNK)
    padded = probs.contiguous() if vocab_size % SAMPLE_CHUNK == 0 else torch.nn.functional.pad(
        probs, (0, chunks * SAMPLE_CHUNK - vocab_size))  # [B, n * C], zeros past V
    # each chunk summed in float32 (1024 terms), the chunks added up in float64
    chunk_cdf = padded.view(b, chunks, SAMPLE_CHUNK).sum(dim=-1).double().cumsum(dim=-1)  # [B, n]
    target = (1.0 - u)[:, None] * chunk_cdf[:, -1:]  # [B, 1], in (0, total]
    chunk = torch.searchsorted(chunk_cdf, target).clamp_max_(chunks - 1)  # [B, 1]: cdf[c - 1] < t <= cdf[c]
    before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp_min(0)), 0.0)  # [B, 1]
    start = chunk * SAMPLE_CHUNK  # [B, 1]
    inner = padded.gather(1, start + torch.arange(SAMPLE_CHUNK, device=device)[None, :])  # [B, C]
    inner_cdf = inner.cumsum(dim=-1, dtype=torch.float64)  # [B, C]
    rest = torch.minimum(target - before, inner_cdf[:, -1:])  # (0, the chunk's mass]: rounding kept inside
    # the clamp keeps a NaN row (a broken forward) to some token of the row instead of an id past it
    return (start + torch.searchsorted(inner_cdf, rest)).squeeze(1).clamp_max_(vocab_size - 1)


def _draw(groups: list[Candidates], u: torch.Tensor, targets: list[int], token_ids: torch.Tensor) -> None:
    """Each group's rows draw among their own candidates (after top-k/top-p, a few of all V); group
    row r is token_ids[targets[r]], drawn with the uniform u[r]."""
    for g in groups:
        picked = inverse_transform(g.logits.softmax(dim=-1), u[g.rows])  # [G]
        if g.ids is not None:
            picked = g.ids.gather(1, picked[:, None]).squeeze(1)  # candidate index -> token id
        token_ids[[targets[r] for r in g.rows]] = picked


class Sampler:
    def __init__(self, candidates: int = CANDIDATES):
        self.candidates = candidates  # see truncate(); the vocabulary's size sorts every row whole

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
            # only rows with rules that rule tokens out can leave the grammar nothing (its own emptiness is
            # caught on the bitmask): the scan of a vocabulary per row is for those alone
            ruled = [j for j, i in enumerate(constrained)
                     if rows[i].params.allowed_token_ids is not None or rows[i].params.bad_words_token_ids]
            if ruled and not bool(torch.isfinite(masked[ruled]).any(dim=-1).all()):
                raise NoTokenLeft("no token fits both the constraint and allowed_token_ids or bad_words")
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy:
            token_ids[greedy] = _select(processed, greedy).argmax(dim=-1)
            held = [i for i in greedy if i in position]
            if held:  # their unmasked argmax is overwritten: cheaper than copying the other rows
                token_ids[held] = _select(masked, [position[i] for i in held]).argmax(dim=-1)
        unsure = None  # the candidates' group whose rows may need a whole sort
        if sampled:
            choose_from = _select(processed, sampled)
            held = [k for k, i in enumerate(sampled) if i in position]
            if held:
                if choose_from is processed:
                    choose_from = processed.clone()
                choose_from[held] = _select(masked, [position[sampled[k]] for k in held])
            params = [rows[i].params for i in sampled]
            u = uniforms([rows[i].generator for i in sampled], logits.device)
            # whether a row's top-p set reaches past its candidates is read with the token ids below, not
            # before the draw: the device runs the whole step without waiting on the host in between
            groups = truncate(choose_from, params, self.candidates, check=False)
            _draw(groups, u, sampled, token_ids)
            unsure = next((g for g in groups if g.unsure is not None), None)

        if unsure is None:
            ids = token_ids.tolist()
        else:
            ids = torch.cat((token_ids, unsure.unsure.long())).tolist()
            ids, flags = ids[: len(rows)], ids[len(rows) :]
            flat = [r for r, f in zip(unsure.rows, flags) if f]  # indices into `sampled`
            if flat:  # drawn again, sorted whole, with the same uniforms
                redo = truncate(_select(choose_from, flat), [params[r] for r in flat], choose_from.shape[1])
                _draw(redo, u[flat], [sampled[r] for r in flat], token_ids)
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


SCORE_ROWS = 256  # prompt logprobs are taken this many rows at a time: [256, 151552] fp32 is 155 MB


def prompt_token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """Each row's logprob of its token under the model's raw distribution (logits [R, V], no sampling
    parameter applied, as vLLM's prompt logprobs), with its rank and the row's k likeliest tokens. V is
    the runner's width: the tokenizer's ids, as sampling sees them (the output layer's padding rows
    past them are cut, which a trained model leaves next to no mass)."""
    return [lp for lo in range(0, len(token_ids), SCORE_ROWS)
            for lp in _token_logprobs(logits[lo : lo + SCORE_ROWS], token_ids[lo : lo + SCORE_ROWS], k)]


def _token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    logprobs = logits.float().log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])  # [R, 1]
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()  # [R]: ties share the better rank
    k = min(max(k, 0), MAX_TOP_LOGPROBS, logprobs.shape[1])
    top_values, top_ids = ([], []) if k == 0 else (t.tolist() for t in logprobs.topk(k, dim=-1))  # [R, k] each
    return [TokenLogprob(token_id=t, logprob=lp, top=list(zip(top_ids[r], top_values[r])) if k else [], rank=ranks[r])
            for r, (t, lp) in enumerate(zip(token_ids, chosen.squeeze(1).tolist()))]
