"""Tensor parallelism's cut of GLM-4 (Megatron's): which part of each weight one of `world` processes holds.

- attention: the fused qkv is column-parallel by heads: rank r holds query heads
  [r * Hq/N, (r + 1) * Hq/N) and the KV heads they read. With more ranks than KV groups (glm-4-9b has 2)
  a KV head is held by every rank whose query heads read it (replicated). The output projection o is
  row-parallel: each rank's product is a partial sum, all-reduced (tp.py).
- MLP: gate and up column-parallel (the same rows of each half of the fused gate_up), down row-parallel,
  all-reduced.
- output layer: vocabulary-parallel, each rank's logits gathered.
- embedding and norms: whole on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    def check(self, cfg: ModelConfig) -> None:
        """ValueError when the model cannot be cut into `world` parts."""
        n, hkv = self.world, cfg.num_kv_heads
        problems = [f"{what} {size}" for what, size in (("attention heads", cfg.num_heads),
                                                         ("MLP width", cfg.intermediate_size),
                                                         ("vocabulary", cfg.vocab_size)) if size % n]
        if hkv % n and n % hkv:
            problems.append(f"KV heads {hkv} (nor is {n} a multiple of them)")
        if problems:
            raise ValueError(f"tensor parallel size {n} does not divide the model's {', '.join(problems)}")

    def heads(self, cfg: ModelConfig) -> int:
        return cfg.num_heads // self.world

    def kv_heads(self, cfg: ModelConfig) -> int:
        return max(1, cfg.num_kv_heads // self.world)

    def first_kv_head(self, cfg: ModelConfig) -> int:
        if self.world <= cfg.num_kv_heads:
            return self.rank * self.kv_heads(cfg)
        return self.rank // (self.world // cfg.num_kv_heads)  # replicated: ranks world/Hkv at a time share one

    def cut(self, name: str, cfg: ModelConfig) -> tuple[int, list[tuple[int, int]]] | None:
        """How our parameter `name` is cut: (dim, the ranges of the full tensor along dim that this rank
        holds, in the order it holds them); None when every rank holds all of it."""
        if self.world == 1:
            return None
        leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
        d, r = cfg.head_dim, self.rank
        if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
            hq, hkv, kv0 = self.heads(cfg), self.kv_heads(cfg), self.first_kv_head(cfg)
            k0, v0 = cfg.q_size + kv0 * d, cfg.q_size + cfg.kv_size + kv0 * d
            return 0, [(r * hq * d, (r + 1) * hq * d), (k0, k0 + hkv * d), (v0, v0 + hkv * d)]
        if leaf == "attn.o.weight":
            hq = self.heads(cfg)
            return 1, [(r * hq * d, (r + 1) * hq * d)]
        width, part = cfg.intermediate_size, cfg.intermediate_size // self.world
        if leaf == "mlp.gate_up.weight":  # rows [gate | up]: the same part of each
            return 0, [(r * part, (r + 1) * part), (width + r * part, width + (r + 1) * part)]
        if leaf == "mlp.down.weight":
            return 1, [(r * part, (r + 1) * part)]
        if leaf == "lm_head.weight":
            vocab = cfg.vocab_size // self.world
            return 0, [(r * vocab, (r + 1) * vocab)]
        return None

    def local_shape(self, name: str, full: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
        cut = self.cut(name, cfg)
        if cut is None:
            return full
        dim, ranges = cut
        return tuple(sum(e - s for s, e in ranges) if i == dim else n for i, n in enumerate(full))
