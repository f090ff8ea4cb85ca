"""The GPU figures of a bench_gpu.py run against issue 15's targets, as a Markdown table for BENCHMARKS.md.

    python3 benchmarks/gpu_summary.py gpu_check_out/bench_gpu.json

A figure the run did not make (its part skipped, failed, or cut short by the budget) reads "not
measured" and meets nothing. The single stream's target is 75% of the roofline at the card's own
copy bandwidth, measured in the same run; the issue also names tokens a second for an H200 and an
H100, and the streams' target is the card's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOFLINE_SHARE = 0.75
# per card (by name): the single stream's tokens a second, the 64 streams' aggregate tokens a second
CARD_TARGETS = {"H200": (200, 4000), "H100": (140, 3000)}
PREFILL_RATIO = 1.3  # ours over transformers' SDPA forward, one 32K prompt
NOT_MEASURED = "not measured"


def figure(figures: dict, part: str, key: str) -> float | None:
    value = figures.get(part, {}).get(key)
    return value if isinstance(value, (int, float)) and value == value else None  # nan is no figure


def verdict(value: float | None, target: float | None, at_least: bool = True) -> str:
    if value is None:
        return NOT_MEASURED
    if target is None:
        return "no target"
    return "**met**" if (value >= target if at_least else value <= target) else "**not met**"


def card_targets(figures: dict) -> tuple[str, tuple[int, int] | None]:
    name = figures.get("env", {}).get("gpu") or figures.get("env", {}).get("device", "?")
    return name, next((t for card, t in CARD_TARGETS.items() if card in name), None)


def rows(figures: dict) -> list[tuple[str, str, str, str]]:
    """(what, ours, the target, verdict) for each of the issue's figures."""
    name, card = card_targets(figures)
    fmt = lambda v, spec, unit="": NOT_MEASURED if v is None else format(v, spec) + unit  # noqa: E731
    single = figure(figures, "single_stream", "ours_tok_s")
    roofline = figure(figures, "single_stream", "roofline_tok_s")
    share = single / roofline if single and roofline else None
    streams = next((p for p in figures if p.startswith("streams_")), "streams_64")
    aggregate = figure(figures, streams, "ours_aggregate_tok_s")
    ratio = figure(figures, "prefill", "ours_over_transformers")
    prompt, long_prompt = figures.get("prefill", {}).get("tokens"), figures.get("long_prefill", {}).get("tokens")
    cosine = figure(figures, "model", "min_cosine")
    out = [
        ("logits vs transformers (min cosine)", fmt(cosine, ".4f"), "> 0.98", verdict(cosine, 0.98)),
        ("single stream, share of the roofline",
         f"{fmt(single, '.1f')} tok/s of {fmt(roofline, '.1f')}: {fmt(share and 100 * share, '.1f', '%')}",
         f">= {100 * ROOFLINE_SHARE:.0f}%", verdict(share, ROOFLINE_SHARE)),
        (f"single stream on this card ({name})", fmt(single, ".1f", " tok/s"), str(card[0]) if card else "none named",
         verdict(single, card[0] if card else None)),
        ("single stream vs transformers", fmt(figure(figures, "single_stream", "ratio"), ".2f", "x"), "", ""),
        (f"{streams.split('_')[1]} streams, aggregate", fmt(aggregate, ".0f", " tok/s"),
         str(card[1]) if card else "none named", verdict(aggregate, card[1] if card else None)),
        (f"prefill of one {prompt or '?'}-token prompt, ours over transformers", fmt(ratio, ".3f", "x"),
         f"<= {PREFILL_RATIO}", verdict(ratio, PREFILL_RATIO, at_least=False)),
        (f"prefill of {long_prompt or '?'} tokens", fmt(figure(figures, "long_prefill", "seconds"), ".2f", " s"),
         "", ""),
    ]
    million = figures.get("million_context", {})
    held = bool(million.get("holds_1m") and million.get("ok")) if "ok" in million else None
    out.append((f"1M context: KV for {million.get('max_model_len', '?')} tokens, logits at position ~1M",
                NOT_MEASURED if held is None else f"holds 1M: {million.get('holds_1m')}, min cosine "
                f"{fmt(figure(figures, 'million_context', 'min_cosine'), '.4f')}",
                "holds, > 0.98", NOT_MEASURED if held is None else ("**met**" if held else "**not met**")))
    gemv = figures.get("gemv", {})
    check = gemv.get("batch1_check") or {}
    out.append(("batch-1 step: folded, checked against the model as written",
                f"folded {gemv.get('folded')}, cosine {fmt(check.get('cosine'), '.5f')}, "
                f"over cuBLAS's {fmt(gemv.get('over_cublas'), '.3f', 'x')}, "
                f"replays {gemv.get('batch1_step_ms') or '-'}",
                "check ok", verdict(float(bool(check.get("ok"))) if check else None, 1.0)))
    return out


def table(figures: dict) -> str:
    bandwidth = figure(figures, "copy_bandwidth", "gb_s")
    lines = [f"Card: {card_targets(figures)[0]}; copy bandwidth {bandwidth:,.0f} GB/s" if bandwidth else
             f"Card: {card_targets(figures)[0]}; copy bandwidth {NOT_MEASURED}", "",
             "| | ours | target | |", "|---|---|---|---|"]
    lines += [f"| {what} | {ours} | {target} | {v} |" for what, ours, target, v in rows(figures)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("figures", type=Path, help="bench_gpu.py's --out file")
    args = ap.parse_args(argv)
    print(table(json.loads(args.figures.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
