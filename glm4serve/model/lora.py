"""LoRA adapters (PEFT's on-disk format) served beside the base model, several in one batch.

An adapter adds to a linear layer W the product of two thin matrices: y = W x + s B (A x), with
A [r, in], B [out, r] and s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). The base weights
are never changed: each request names its adapter (or none), and each step the runner tells the
adapters which rows of the flat batch are whose (`LoRASet.select`). `attach` wraps the layers'
linears (qkv, o, gate_up, down) in `LoRALinear`, after the runner has made them fast, so the base
product runs as before and each adapter's rows get their sums added.

Adapter tensors are named as the base checkpoint's weights (chatglm or HF naming, either one whatever
the base checkpoint's), with PEFT's `base_model.model.` before and `.lora_A.weight` / `.lora_B.weight`
for `.weight`; an HF adapter's q_proj, k_proj and v_proj land on their rows of our fused qkv. What
this does not run (DoRA, LoRA biases, extra trained modules, adapters on the embedding or output
layer, per-module alpha, and the other PEFT options of UNSUPPORTED) is refused when the adapter loads, at
the server's start or later (engine.load_lora).
"""

from __future__ import annotations

import json
import math
import reprlib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .config import ModelConfig
from .loader import CheckpointTensor, checkpoint_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_TARGETS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")  # per layer: the linears an adapter may change
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
# PEFT options that change what an adapter computes, beyond y = W x + s B A x: refused when set
UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "layer_replication": "layer_replication",
               "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "arrow_config": "Arrow routing",
               "trainable_token_indices": "trainable tokens", "target_parameters": "LoRA on parameters"}


class LoRAError(ValueError):
    """An adapter this server cannot serve: said when it loads, with the adapter's path."""


@dataclass
class Piece:
    """One adapter's part of one linear: rows [row, row + B.shape[0]) of its output get (x A^T) B^T."""

    row: int
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [rows, r], the scale folded in


@dataclass
class Adapter:
    name: str
    path: str
    pieces: dict[str, list[Piece]] = field(default_factory=dict)  # by our module name ("layers.3.attn.qkv")


def _names(cfg: ModelConfig) -> dict[str, CheckpointTensor]:
    """Weight names of both checkpoint namings: an adapter may be trained on either."""
    names = checkpoint_tensors(replace(cfg, layout="hf"))
    if cfg.variant == "glm":  # the chatglm naming exists for this variant only
        names |= checkpoint_tensors(replace(cfg, layout="chatglm"))
    return names


def _check_config(config: dict, path: Path) -> None:
    """LoRAError for what this does not run as PEFT trained it."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path}: a {config['peft_type']} adapter, not LoRA")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise LoRAError(f"{path}: {what} not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise LoRAError(f"{path}: LoRA biases not supported (bias must be \"none\")")
    if config.get("modules_to_save"):
        raise LoRAError(f"{path}: modules_to_save ({config['modules_to_save']}) not supported: only LoRA weights")
    if config.get("alpha_pattern"):
        raise LoRAError(f"{path}: alpha_pattern not supported (one lora_alpha for every module)")
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    # compared, not converted: an integer past float's range (JSON has no limit) is refused, not an OverflowError
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not abs(alpha) <= sys.float_info.max:
        raise LoRAError(f"{path}: lora_alpha must be a finite number, got {reprlib.repr(alpha)}")


def _scale(config: dict, rank: int) -> float:
    """PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (r: this module's rank, rank_pattern's)."""
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_adapter(name: str, path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device) -> Adapter:
    """A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) for a model of `cfg`."""
    path = Path(path)
    try:
        path = path.expanduser()  # RuntimeError for ~user of no such user
        config = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_file(path / WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error on a cut or foreign file
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {path / CONFIG_FILE} and {path / WEIGHTS_FILE}: {e}")
    if not isinstance(config, dict):
        raise LoRAError(f"{path / CONFIG_FILE} is not a JSON object")
    _check_config(config, path)
    names, adapter = _names(cfg), Adapter(name, str(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, dot, which = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not dot or which not in ("A.weight", "B.weight"):
            raise LoRAError(f"{path}: tensor {key} is not a LoRA A or B weight")
        pairs.setdefault(stem, {})[which[0]] = t
    for stem, ab in sorted(pairs.items()):
        spec = names.get(stem + ".weight")
        module = spec.target.removesuffix(".weight") if spec else None
        if module is None or module.split(".", 2)[-1] not in LORA_TARGETS:
            raise LoRAError(f"{path}: LoRA on {stem} not supported (only the layers' {', '.join(LORA_TARGETS)})")
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{path}: {stem} has lora_{'/'.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        rows, in_features = spec.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (rows, a.shape[0]):
            raise LoRAError(f"{path}: {stem} has A {tuple(a.shape)} and B {tuple(b.shape)}; the base weight is "
                            f"{rows} x {in_features}")
        if a.shape[0] == 0:
            raise LoRAError(f"{path}: {stem} has rank 0")
        piece = Piece(row=spec.rows[0] if spec.rows else 0, a=a.to(device=device, dtype=dtype).contiguous(),
                      b=(b.double() * _scale(config, a.shape[0])).to(device=device, dtype=dtype).contiguous())
        # A weight that is not finite (or that scaling made so) makes every reply with the adapter NaN:
        # refused at load, where the user learns why. (Other requests that reuse its KV blocks are kept
        # safe by attention.write_kv, or by paged_decode.py's kernel where it attends.)
        if not (torch.isfinite(piece.a).all() and torch.isfinite(piece.b).all()):
            raise LoRAError(f"{path}: {stem} has weights that are not finite in {dtype} (scaled by lora_alpha / r)")
        adapter.pieces.setdefault(module, []).append(piece)
    if not adapter.pieces:
        raise LoRAError(f"{path}: no LoRA weights in {WEIGHTS_FILE}")
    return adapter


def load_loras(modules: dict[str, str], model: nn.Module, runtime: bool = True) -> LoRASet:
    """The adapters of `modules` (name -> folder), in the dtype and on the device of `model`'s activations;
    `runtime`: more may be loaded (and these unloaded) while serving."""
    if model.shard.world > 1:
        raise LoRAError("LoRA adapters are not supported under tensor parallelism")
    return LoRASet([load_for(model, name, path) for name, path in modules.items()], fixed=not runtime)


def load_for(model: nn.Module, name: str, path: str | Path) -> Adapter:
    """The adapter in `path` for `model`, in the dtype and on the device of its activations."""
    weight = model.embed.weight
    return load_adapter(name, path, model.cfg, weight.dtype, weight.device)


def check_adapters(modules: dict[str, str], cfg: ModelConfig) -> None:
    """LoRAError unless every adapter of `modules` loads for a model of `cfg`."""
    for name, path in modules.items():
        load_adapter(name, path, cfg, torch.float32, "cpu")


class LoRASet:
    """The adapters a server serves, by key, and which rows of the current step use which.

    A key is the adapter's name, or `name#k` for a later load of a name (engine.py), so an adapter
    loaded at runtime in place of another of its name never runs a sequence, or meets a cached KV
    block, of the one it replaced."""

    def __init__(self, adapters: list[Adapter], fixed: bool = False):
        self.adapters = {a.name: a for a in adapters}
        self.fixed = fixed  # no adapter is loaded or unloaded while serving
        self.rows: list[tuple[Adapter, int, int]] = []  # (adapter, first row, end row) of this step
        self.slots: LoRASlots | None = None
        self._model: nn.Module | None = None

    def select(self, rows: list[tuple[str, int, int]], num_rows: int) -> None:
        """Before a forward of num_rows rows: the row ranges of the flat batch (ForwardBatch.lora_rows) and
        their adapters."""
        if self.slots is not None:
            self.slots.choose(rows, torch.empty(num_rows, len(self.slots.slot_of), dtype=self.slots.dtype,
                                                device=self.slots.device))
        self.rows = [(self.adapters[key], start, end) for key, start, end in rows]

    def attach(self, model: nn.Module, slotted: bool = False) -> None:
        """Wrap the targeted linears of `model` in place (once, after the runner has swapped its own in);
        `slotted` (a fixed set only): each holds every adapter's pairs stacked (LoRASlots), for a runner
        that captures its steps in CUDA graphs."""
        self._model = model
        if slotted:
            if not self.fixed:
                raise ValueError("adapters in slots are a fixed set: none loaded or unloaded while serving")
            self.slots = LoRASlots(list(self.adapters.values()), model)
        self._wrap(m for a in self.adapters.values() for m in a.pieces)
        if slotted:  # their pairs live in the slots now: the GPU memory of a second copy goes to the KV cache
            for adapter in self.adapters.values():
                adapter.pieces = {name: [] for name in adapter.pieces}

    def load(self, key: str, name: str, path: str | Path) -> None:
        """Between steps: serve the adapter in `path` under `key` (LoRAError when it cannot be), wrapping
        the linears it targets that no adapter did."""
        if self.fixed:
            raise LoRAError("this server's adapters are fixed at its start (--allow-runtime-lora-updating is off)")
        adapter = load_for(self._model, name, path)
        self._wrap(adapter.pieces)
        self.adapters[key] = adapter

    def remove(self, key: str) -> None:
        """Between steps, once no sequence runs with it: its tensors are freed (its wrappers stay)."""
        del self.adapters[key]
        self.rows = []  # the last step's, which may hold it; the next step selects its own

    def _wrap(self, names) -> None:
        for name in set(names):
            parent, _, leaf = name.rpartition(".")
            owner = self._model.get_submodule(parent)
            if not isinstance(getattr(owner, leaf), LoRALinear):
                stacks = self.slots.stacks[name] if self.slots is not None else None
                setattr(owner, leaf, LoRALinear(getattr(owner, leaf), name, self, stacks))


class LoRASlots:
    """A fixed set of adapters' pairs in slots, for a runner that replays CUDA graphs, whose steps cannot
    pick rows by adapter on the host: each targeted linear holds every adapter's A and B stacked by slot
    (`stacks`: [slots, R, in] and [slots, R, out], zeros where an adapter has less; R: the most pieces
    an adapter has on that linear, times the largest rank) and adds every row's product with every
    slot, weighted by the row's choice of slot (`choice` [rows, slots]: 1 at its adapter's, 0 elsewhere
    and on the base model's rows). One graph then serves whichever adapters a step's rows run with, for
    the products of the slots a row does not use (rank 16: ~3.7 MB a layer a slot at glm-4-9b's shapes,
    next to its ~400 MB of weights)."""

    def __init__(self, adapters: list[Adapter], model: nn.Module):
        self.dtype, self.device = model.embed.weight.dtype, model.embed.weight.device
        self.slot_of = {a.name: i for i, a in enumerate(adapters)}
        rank = max(p.a.shape[0] for a in adapters for ps in a.pieces.values() for p in ps)
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in sorted({m for a in adapters for m in a.pieces}):
            linear = model.get_submodule(name)
            width = rank * max(len(a.pieces.get(name, ())) for a in adapters)
            a_stack = torch.zeros(len(adapters), width, linear.in_features, dtype=self.dtype, device=self.device)
            b_stack = torch.zeros(len(adapters), width, linear.out_features, dtype=self.dtype, device=self.device)
            for slot, adapter in enumerate(adapters):
                for j, p in enumerate(adapter.pieces.get(name, ())):
                    r = p.a.shape[0]
                    a_stack[slot, j * rank : j * rank + r] = p.a  # [r, in]
                    b_stack[slot, j * rank : j * rank + r, p.row : p.row + p.b.shape[0]] = p.b.T  # [r, rows]
            self.stacks[name] = (a_stack, b_stack)
        self.choice = torch.zeros(0, len(adapters), dtype=self.dtype, device=self.device)

    def choose(self, rows: list[tuple[str, int, int]], choice: torch.Tensor) -> None:
        """The step's rows' slots written into `choice` [rows, slots], which becomes the one the linears
        read: a CUDA graph's static buffer, or a step's own tensor."""
        weights = np.zeros(tuple(choice.shape), dtype=np.float32)
        for key, start, end in rows:
            weights[start:end, self.slot_of[key]] = 1
        choice.copy_(torch.from_numpy(weights))  # one copy a step, not a kernel per row range
        self.choice = choice


class LoRALinear(nn.Module):
    """A linear layer and the adapters' products on the rows that asked for them: row ranges picked on the
    host, or with `stacks` (LoRASlots) every slot's product weighted by the rows' choice of slot."""

    def __init__(self, base: nn.Module, name: str, loras: LoRASet,
                 stacks: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.base, self.name, self.loras = base, name, loras
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slotted = stacks is not None
        if stacks is not None:
            # buffers: a compiled piece takes them as inputs, as it takes the layer's weights
            self.register_buffer("stack_a", stacks[0].flatten(0, 1), persistent=False)  # [slots * R, in]
            self.register_buffer("stack_b", stacks[1].flatten(0, 1), persistent=False)  # [slots * R, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [T, out]
        if self.slotted:
            choice = self.loras.slots.choice  # [T, slots]
            xa = (x @ self.stack_a.T).view(x.shape[0], choice.shape[1], -1) * choice[:, :, None]  # [T, slots, R]
            return y + xa.flatten(1) @ self.stack_b
        for adapter, start, end in self.loras.rows:
            rows = x[start:end]  # [n, in]
            for p in adapter.pieces.get(self.name, ()):
                # in place: a prompt's [n, r] @ [r, 2F] product is 5x slower made apart and then added
                y[start:end, p.row : p.row + p.b.shape[0]].addmm_(rows @ p.a.T, p.b.T)  # [n, piece rows]
        return y
