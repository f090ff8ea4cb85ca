"""One token per sequence from one step's logits, each row with its own sampling parameters.

Per step, in this order:
  1. `apply_processors` (processors.py): repetition penalty, presence/frequency penalties, logit_bias, min_tokens
     suppression of stop ids, then temperature. The result is *the* distribution of the row:
     sampled rows draw from it (after truncation), greedy rows take its argmax.
  2. Rows with a grammar (structured output, see guided.py): -inf on the tokens it forbids.
  3. `truncate` (sampled rows only): top-k, then top-p, then min-p, among each row's best tokens.
  4. Greedy rows: argmax. Sampled rows: an inverse-transform draw from the row's own generator.

A batch whose rows are all greedy with nothing to process and no grammar costs one argmax.

Logprobs are the log-softmax of the model's own logits, vLLM's default `raw_logprobs`: whatever the
row's temperature, penalties, bias or truncation, and before a grammar's mask (vLLM's come after it):
they say how likely the model found each token, allowed or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .guided import mask_logits
from .processors import NoTokenLeft, SampleRow, apply_processors, needs_processing, select_rows
from .types import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob


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
    groups = [Candidates(unranked, select_rows(logits, unranked), None)] if unranked else []
    if ranked:
        ks, ps = [top_k[i] for i in ranked], [top_p[i] for i in ranked]
        sub = select_rows(logits, ranked)  # [R, V]
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
            groups.append(Candidates([ranked[j] for j in kept], select_rows(best, kept), select_rows(order, kept),
                                     unsure))
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
            norm[whole] = select_rows(logits, whole).logsumexp(dim=-1)
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
        if not constrained and all(r.params.greedy and r.params.logprobs is None and not needs_processing(r)
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
            token_ids[greedy] = select_rows(processed, greedy).argmax(dim=-1)
            held = [i for i in greedy if i in position]
            if held:  # their unmasked argmax is overwritten: cheaper than copying the other rows
                token_ids[held] = select_rows(masked, [position[i] for i in held]).argmax(dim=-1)
        unsure = None  # the candidates' group whose rows may need a whole sort
        if sampled:
            choose_from = select_rows(processed, sampled)
            held = [k for k, i in enumerate(sampled) if i in position]
            if held:
                if choose_from is processed:
                    choose_from = processed.clone()
                choose_from[held] = select_rows(masked, [position[sampled[k]] for k in held])
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
                redo = truncate(select_rows(choose_from, flat), [params[r] for r in flat], choose_from.shape[1])
                _draw(redo, u[flat], [sampled[r] for r in flat], token_ids)
                ids = token_ids.tolist()
        logprobs = self._logprobs(logits, token_ids, ids, rows)
        return [Sampled(t, logprobs.get(i)) for i, t in enumerate(ids)]

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, ids: list[int], rows: list[SampleRow]
    ) -> dict[int, TokenLogprob]:
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return {}
        logprobs = select_rows(logits, want).float().log_softmax(dim=-1)  # [W, V]
        chosen = logprobs.gather(1, select_rows(token_ids, want)[:, None]).squeeze(1).tolist()  # [W]
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
