"""
LoRA (low-rank adaptation) for plain nn.Linear layers, in the torchtune style: the adapted layer
keeps the base layer's `weight` / `bias` as its own direct attributes, so a base checkpoint loads
with unchanged key names.

    y = x W^T + b + scale * dropout(x) A^T B^T        A: (rank, in)  B: (out, rank)  scale = alpha / rank

MIMIC puts rank-128, alpha-128, dropout-0.05 LoRA on q/k/v/o/gate/up/down_proj of the 18 kept
Qwen3-VL decoder layers. The numerics are peft's (LoRA `Linear`): kaiming-uniform(a=sqrt(5)) A,
zero B, dropout on the LoRA input path only, the input cast to the adapter dtype.

State-dict key names (what model.py maps the released peft names onto):

    ours                       released peft checkpoint (inside the full model)   peft adapter folder
    <fqn>.weight               <fqn>.base_layer.weight                            (not saved)
    <fqn>.bias                 <fqn>.base_layer.bias                              (not saved)
    <fqn>.lora_A  (rank, in)   <fqn>.lora_A.default.weight                        base_model.model.<fqn>.lora_A.weight
    <fqn>.lora_B  (out, rank)  <fqn>.lora_B.default.weight                        base_model.model.<fqn>.lora_B.weight

Usage:
    apply_lora(model, ["q_proj", "k_proj"], rank=8, alpha=16, dropout=0.05)  # freezes the rest
    ... train ...
    save_adapter(model, "out/adapter", LoRAConfig(rank=8, alpha=16, targets=["q_proj", "k_proj"]))
    load_adapter(model, "out/adapter"); merge_lora(model)   # inference without the extra matmuls
    load_peft_adapter(model, "peft_folder")                 # a folder written by peft's save_pretrained
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter.safetensors"  # save_adapter / load_adapter file names
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft save_pretrained file names
PEFT_CONFIG = "adapter_config.json"
# peft prefixes every adapter key with this (PeftModel -> LoraModel -> model)
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = 128  # r; MIMIC's released run
    alpha: float = 128.0  # scale = alpha / rank = 1.0 in MIMIC
    dropout: float = 0.05  # on the LoRA input path only, active in train() mode
    targets: list = field(  # module names matched as peft does: fqn == t or fqn ends with "." + t
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


# --------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A Linear layer plus a low-rank update. Built from an existing nn.Linear, whose weight/bias
    Parameters are re-used (not copied): on the meta device they stay meta until the base checkpoint
    is loaded with assign=True."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # (out, in) the frozen base weight, same key as the nn.Linear it replaces
        self.weight = base.weight
        self.bias = base.bias  # (out,) or None
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # peft's autocast_adapter_dtype: adapters of a half-precision base are kept in fp32 so
        # the small update is not swamped by rounding; the input is cast to the adapter dtype and
        # the sum back to the base dtype.
        wdt = base.weight.dtype
        adt = torch.float32 if wdt in (torch.float16, torch.bfloat16) else wdt
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=adt))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=dev, dtype=adt))
        # no state-dict keys either way
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: behave exactly like the base layer (needs merged == False)
        self.merged = False  # True: scale * B @ A has been added into self.weight
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """peft's default init: A like nn.Linear's default (kaiming-uniform a=sqrt(5)), B zero ->
        starts at base. A no-op on the meta device; call again after `to_empty()` to materialise."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A (out, in), in fp32 at least: a merge/unmerge round trip is then as exact as
        the base dtype allows."""
        dt = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight. Idempotent: a second call does nothing."""
        if self.merged:
            return
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(). Idempotent. Exact in fp32 up to rounding; a bf16 base loses precision."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.disabled:
                # the base weight now holds the update: returning it would be wrong (peft unmerges)
                raise RuntimeError("LoRALinear is merged and disabled: call unmerge() before "
                                   "disabling the adapter")
            # a merged layer has no separate adapter to train and no dropout on its path
            if self.training:
                raise RuntimeError("LoRALinear is merged: call unmerge() before training "
                                   "(or .eval() for inference)")
            return out
        if self.disabled:
            return out
        if self.training or not torch.is_autocast_enabled(x.device.type):
            # dropout on the LoRA path only (the base sees the clean x)
            x = self.lora_dropout(x.to(self.lora_A.dtype))
        # else (inference under autocast): F.linear casts x to the autocast dtype anyway, so an fp32
        # copy of a bf16 x would be rounded straight back: skipping it gives the same numbers with
        # two kernels fewer per layer
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B)
        # scale 1.0 skips a multiply (x * 1.0 == x exactly)
        return (out + (delta if self.scale == 1.0 else delta * self.scale)).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}, disabled={self.disabled}")


# --------------------------------------------------------------------------------------------------
# Model-level helpers

Targets = Union[Sequence[str], Callable[[str, nn.Module], bool]]


def _matches(fqn: str, name: str) -> bool:
    # peft's rule for a list of target names: the full name or any dotted suffix of it
    return fqn == name or fqn.endswith("." + name)


def apply_lora(module: nn.Module, targets: Targets, rank: int, alpha: float, dropout: float = 0.0) -> list:
    """Replace every matching nn.Linear in `module` by a LoRALinear (via setattr on its parent),
    then freeze every parameter of `module` except the LoRA ones. `targets` is a list of names
    (matched like peft's target_modules: "q_proj" matches "layers.0.self_attn.q_proj") or a callable
    (fqn, module) -> bool. Returns the replaced fqns. Works on a meta-device model: the new LoRA
    tensors are meta too; `reset_lora_parameters(model)` after to_empty(). To train other parts as
    well (MIMIC's action head), set their requires_grad back to True afterwards."""
    if callable(targets):
        pick = targets
    else:
        names = [targets] if isinstance(targets, str) else list(targets)
        if not names:
            raise ValueError("apply_lora: empty target list")
        pick = lambda fqn, m: any(_matches(fqn, n) for n in names)  # noqa: E731
    chosen = []
    for fqn, m in module.named_modules():
        if fqn == "" or not pick(fqn, m):
            continue
        if isinstance(m, LoRALinear):
            raise ValueError(f"apply_lora: {fqn} already has LoRA")
        # a subclass could hide a different forward; refuse rather than guess
        if type(m) is not nn.Linear:
            raise TypeError(f"apply_lora: target {fqn} is a {type(m).__name__}, only nn.Linear is supported")
        chosen.append(fqn)
    if not chosen:
        raise ValueError(f"apply_lora: no module matched the targets {targets!r}")
    for fqn in chosen:  # replace after the walk: mutating while iterating named_modules is unsafe
        parent_name, _, leaf = fqn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout))
    for name, p in module.named_parameters():
        p.requires_grad_(name.endswith(".lora_A") or name.endswith(".lora_B"))
    return chosen


def lora_modules(model: nn.Module) -> dict:
    """{fqn: LoRALinear} in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRALinear layers (call apply_lora first)")
    return mods


def reset_lora_parameters(model: nn.Module):
    """(Re-)initialise every LoRA pair: A kaiming-uniform, B zero (after to_empty())."""
    for m in _require_lora(model).values():
        m.reset_lora_parameters()


def merge_lora(model: nn.Module):
    """Merge every LoRA layer into its base weight (idempotent)."""
    for m in _require_lora(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    """Undo merge_lora (idempotent)."""
    for m in _require_lora(model).values():
        m.unmerge()


def set_lora_disabled(model: nn.Module, disabled: bool = True):
    """Switch every LoRA layer to base-only (True) or back (False)."""
    for m in _require_lora(model).values():
        m.disabled = disabled


def lora_state_dict(model: nn.Module) -> dict:
    """Adapter-only state dict of detached tensors: {"<fqn>.lora_A": (rank, in), "<fqn>.lora_B":
    (out, rank)}."""
    sd = {}
    for fqn, m in _require_lora(model).items():
        sd[f"{fqn}.lora_A"] = m.lora_A.detach()
        sd[f"{fqn}.lora_B"] = m.lora_B.detach()
    return sd


def _place(model: nn.Module, tensors: dict, rank: int, alpha: float, source: str):
    """Copy {"<fqn>.lora_A"/"<fqn>.lora_B": tensor} into the model's LoRA layers after checking, by
    name, that the keys cover exactly the model's LoRA layers, that shapes fit and that rank/alpha
    agree. Nothing is copied if any check fails."""
    mods = _require_lora(model)
    errors = []
    wrong_cfg = [f for f, m in mods.items() if m.rank != rank or m.alpha != alpha]
    if wrong_cfg:
        m0 = mods[wrong_cfg[0]]
        errors.append(f"rank/alpha {rank}/{alpha} in {source} but the model has {m0.rank}/{m0.alpha} at "
                      f"{wrong_cfg[:5]}{' ...' if len(wrong_cfg) > 5 else ''}")
    expected = {f"{f}.lora_{ab}": (m, ab) for f, m in mods.items() for ab in ("A", "B")}
    missing = sorted(set(expected) - set(tensors))
    unplaced = sorted(set(tensors) - set(expected))
    if missing:
        errors.append(f"missing keys (model LoRA tensors absent from {source}): {missing}")
    if unplaced:
        errors.append(f"unplaced keys (in {source}, no such LoRA tensor in the model): {unplaced}")
    for k in sorted(set(expected) & set(tensors)):
        m, ab = expected[k]
        want = tuple((m.lora_A if ab == "A" else m.lora_B).shape)
        if tuple(tensors[k].shape) != want:
            errors.append(f"shape mismatch for {k}: {tuple(tensors[k].shape)} in {source}, model expects {want}")
    if any(m.merged for m in mods.values()):
        errors.append("the model's LoRA is merged; unmerge_lora(model) before loading new adapter weights")
    if errors:
        raise ValueError("cannot load adapter:\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for k, (m, ab) in expected.items():
            p = m.lora_A if ab == "A" else m.lora_B
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))


def _atomic_write(path: Path, write: Callable[[str], None]):
    # write next to the destination, then rename: a crash never leaves a half-written file
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def save_adapter(model: nn.Module, path, config: LoRAConfig):
    """Write the adapter to folder `path`: adapter.safetensors (lora_state_dict keys) +
    adapter_config.json (asdict(config)). The config must describe the model's LoRA layers
    (rank/alpha are checked)."""
    mods = _require_lora(model)
    bad = [f for f, m in mods.items() if m.rank != config.rank or m.alpha != config.alpha]
    if bad:
        raise ValueError(f"save_adapter: config rank/alpha {config.rank}/{config.alpha} differ from layers {bad[:5]}")
    if any(m.merged for m in mods.values()):
        raise ValueError("save_adapter: model is merged; unmerge_lora(model) first (A/B are intact, but the base "
                         "weights would no longer match an adapter-free checkpoint)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    _atomic_write(path / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(asdict(config), indent=2)
    _atomic_write(path / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))


def load_adapter(model: nn.Module, path) -> LoRAConfig:
    """Load a folder written by save_adapter into a model that already has matching LoRA layers.
    Returns the config. Raises ValueError listing missing / unplaced / mis-shaped keys or a
    rank/alpha mismatch."""
    path = Path(path)
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    unknown = sorted(set(cfg) - set(LoRAConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"load_adapter: unknown fields in {path / ADAPTER_CONFIG}: {unknown}")
    config = LoRAConfig(**cfg)
    _place(model, load_file(str(path / ADAPTER_WEIGHTS)), config.rank, config.alpha, str(path / ADAPTER_WEIGHTS))
    return config


def load_peft_adapter(model: nn.Module, folder, rename: Callable[[str], str] = None) -> dict:
    """Load a folder written by peft's `save_pretrained` (adapter_config.json and
    adapter_model.safetensors, keys `base_model.model.<fqn>.lora_{A,B}.weight`) into a model
    already prepared with apply_lora. `rename` maps a peft-side module fqn to ours when the module
    trees differ. Checks: a plain-LoRA config (no DoRA, rsLoRA, per-module rank/alpha patterns,
    bias or modules_to_save), r and lora_alpha equal to the model's, every adapter module matching
    target_modules, and the adapter modules being exactly the model's LoRA layers (missing /
    unplaced keys listed by name). lora_dropout is not checked (train-time only). Returns the peft
    config dict."""
    folder = Path(folder)
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    errors = []
    if cfg.get("peft_type", "LORA") != "LORA":
        errors.append(f"peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    # features that change the math: refused by name rather than loaded to compute differently
    for name, ok in [("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False),
                     ("bias", "none")]:
        if cfg.get(name, ok) != ok:
            errors.append(f"unsupported {name}={cfg[name]!r} (only {ok!r})")
    for name in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "target_parameters"):
        if cfg.get(name):
            errors.append(f"unsupported non-empty {name}={cfg[name]!r}")
    if errors:
        raise ValueError(f"load_peft_adapter({folder}):\n  " + "\n  ".join(errors))
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # peft: a string is a regex matched against the whole module name
        is_target = lambda f: re.fullmatch(targets, f) is not None  # noqa: E731
    elif targets:
        is_target = lambda f: any(_matches(f, t) for t in targets)  # noqa: E731
    else:
        raise ValueError(f"load_peft_adapter({folder}): adapter_config.json has no target_modules")
    raw = load_file(str(folder / PEFT_WEIGHTS))
    tensors, bad_names, off_target = {}, [], set()
    pat = re.compile(r"^" + re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight$")
    for k, v in raw.items():
        m = pat.match(k)
        if m is None:
            bad_names.append(k)
            continue
        fqn, ab = m.group(1), m.group(2)
        if not is_target(fqn):
            off_target.add(fqn)
        tensors[f"{rename(fqn) if rename else fqn}.lora_{ab}"] = v
    if bad_names or off_target:
        raise ValueError(f"load_peft_adapter({folder}): keys not of the form {PEFT_PREFIX}<fqn>.lora_A/B.weight: "
                         f"{sorted(bad_names)}; modules not in target_modules {targets!r}: {sorted(off_target)}")
    _place(model, tensors, cfg["r"], cfg["lora_alpha"], str(folder / PEFT_WEIGHTS))
    return cfg
