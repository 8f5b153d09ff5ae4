"""
Fast inference for a robot's control loop, on top of model.VLAModel: a per-frame vision cache (at
10 Hz the 4-frame window slides by one frame, so 3 of its 4 frames were encoded one call earlier),
LoRA merged into the base weights once, an inference dtype, and torch.compile of the step with
static shapes (the text padded to token buckets, so a new instruction does not recompile; CUDA
graphs with mode="reduce-overhead").

    model = inference.optimize(VLAModel.from_pretrained(ckpt), dtype=torch.bfloat16, compile=True)
    cache = inference.VisionCache()
    angles = model.predict(frames, boxes, task, instruction, state, cache=cache)  # (16, 22) rad

The optimized model answers through the same predict() / model(inputs=...) calls; it must not
train or be saved.
"""

import collections
import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from dit import Attention
from lora import lora_modules

# --------------------------------------------------------------------------------------------------
# Per-frame vision cache


class VisionCache:
    """Per-frame vision-tower outputs (merged tokens and every DeepStack level), keyed by the
    frame's pixels after the box is drawn (a hash of the uint8 frame), least recently used first
    out. Each frame is encoded on its own in the vision tower, so cached and fresh outputs are the
    same numbers."""

    def __init__(self, max_frames: int = 64):
        self.max_frames = max_frames
        self.entries = collections.OrderedDict()  # key -> (tokens (T, Q), [level (T, Q)])
        self.hits = self.misses = 0

    def clear(self):
        self.entries.clear()

    def encode(self, frames: torch.Tensor, encode_fn):
        """frames (N, S, S, 3) uint8 on the CPU -> (tokens (N*T, Q), [levels (N*T, Q)]) as
        encode_fn(frames) returns them, running encode_fn only on the frames not seen before."""
        if frames.device.type != "cpu":
            raise ValueError("VisionCache keys frames by their pixels: pass them on the CPU")
        if len(frames) > self.max_frames:
            raise ValueError(f"{len(frames)} frames in one call exceed the cache's max_frames={self.max_frames}")
        keys = [hashlib.blake2b(f.numpy().tobytes(), digest_size=16).digest() + bytes(str(tuple(f.shape)), "ascii")
                for f in frames]
        new = list(dict.fromkeys(k for k in keys if k not in self.entries))  # each new frame once, in order
        self.hits += len(keys) - len(new)
        self.misses += len(new)
        if new:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            tokens, levels = encode_fn(frames[[first[k] for k in new]])
            per = tokens.shape[0] // len(new)
            for j, k in enumerate(new):
                self.entries[k] = (tokens[j * per:(j + 1) * per], [lv[j * per:(j + 1) * per] for lv in levels])
        for k in keys:
            self.entries.move_to_end(k)
        while len(self.entries) > self.max_frames:
            self.entries.popitem(last=False)
        got = [self.entries[k] for k in keys]
        return (torch.cat([g[0] for g in got]),
                [torch.cat([g[1][j] for g in got]) for j in range(len(got[0][1]))])


def pad_inputs(inputs: dict, multiple: int, pad_token_id: int = 0) -> dict:
    """A collate_inputs batch right-padded to the next multiple of `multiple` tokens (static shapes
    for a compiled step: a new instruction of similar length reuses it). Padded slots get mask 0
    and position 0 as collate's own padding does; their token id is irrelevant (masked);
    visual_rows are re-indexed for the longer rows."""
    ids = inputs["input_ids"]
    B, L = ids.shape
    Lb = -(-L // multiple) * multiple
    if Lb == L:
        return inputs
    pad = torch.nn.functional.pad
    rows = inputs["visual_rows"]
    return {**inputs, "input_ids": pad(ids, (0, Lb - L), value=pad_token_id),
            "attention_mask": pad(inputs["attention_mask"], (0, Lb - L)),
            "position_ids": pad(inputs["position_ids"], (0, Lb - L)), "visual_rows": rows // L * Lb + rows % L}


# --------------------------------------------------------------------------------------------------
# optimize(): merged LoRA, dtype, compile


def optimize(model, dtype=None, merge_lora: bool = True, compile=False, bucket: int = None):
    """Make a VLAModel faster for inference, in place (and in eval mode); returns it. predict(),
    model(inputs=...) and everything built on them take the optimized path with no other change.

    merge_lora: fold every LoRA update into its base weight once (exact up to fp32 rounding): no
        adapter matmuls or casts per layer. Such a model must never train again: .train() and
        save_pretrained() raise.
    dtype: e.g. torch.bfloat16 (GPU, or a CPU with bf16 support). The backbone's weights are cast
        to it, and so are the head's matrices, while its norms, the embeddings added to its residual
        stream and the flow state stay fp32; every call runs under autocast(dtype). That is the
        training precision rule (fp32 head under bf16 autocast) with the casts made once instead of
        per call: the same numbers. None keeps the weights and VLAModel.autocast()'s rule.
    compile: True, or a torch.compile mode ("reduce-overhead": CUDA graphs). Compiles, with static
        shapes and no graph break, the vision tower for one frame and the step from token ids and
        image embeddings to actions (decoder layers 0..tap, then the head's sampler), with no
        host-device sync inside. Each new shape compiles on its first call (seconds to minutes); a
        failure raises, never falls back.
    bucket: right-pad the text to a multiple of this many tokens (default: 32 when compiling, else
        none), so a new instruction of similar length reuses the compiled step. Padding changes no
        real token's output (causal attention never looks ahead; the head masks it) beyond
        rounding."""
    if model._inference is not None:
        raise RuntimeError("inference.optimize was already applied to this model")
    mode = (compile if isinstance(compile, str) else "default") if compile else None
    bucket = bucket if bucket is not None else 32 if mode is not None else 1
    if bucket < 1:
        raise ValueError(f"bucket must be a positive number of tokens, got {bucket}")
    if mode is not None and not hasattr(torch, "compile"):
        raise RuntimeError(f"compile={compile!r} needs torch.compile (torch >= 2.0), not torch {torch.__version__}")
    model.eval()
    merged = bool(merge_lora and lora_modules(model.qwen_model))
    for m in lora_modules(model.qwen_model).values() if merged else ():
        m.merge()
    if dtype is not None:
        cast_for_inference(model, dtype)
    step, vision = (lambda *a: inference_step(model, *a)), model.vision_on_device
    if mode is not None:
        step = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
        vision = torch.compile(vision, fullgraph=True, dynamic=False, mode=mode)
    model._inference = Optimized(dtype, merged, mode, bucket, step, vision)
    return model


def cast_for_inference(model, dtype):
    """Backbone weights -> dtype (LoRA adapters stay fp32, as peft keeps them); the head's linear
    and attention matrices -> dtype, everything else fp32 (what bf16 autocast computes with)."""
    for name, p in model.qwen_model.named_parameters():
        if p.is_floating_point() and not name.endswith((".lora_A", ".lora_B")):
            p.data = p.data.to(dtype)
    for m in model.action_head.modules():
        params = ((m.weight, m.bias) if isinstance(m, nn.Linear) else
                  (m.in_proj_weight, m.in_proj_bias) if isinstance(m, Attention) else ())
        for p in params:
            p.data = p.data.to(dtype)


def inference_step(model, input_ids, position_ids, visual_rows, emb, levels, mask, state, noise, steps: int):
    """Token ids + image embeddings -> actions (B, H, A), on the device with no host sync: what
    compile traces. The attention mask is not passed to the backbone: padding is on the right,
    and causal attention never lets a real token see it (same numbers as the masked path);
    the head masks padding itself."""
    out = model.qwen_model(input_ids=input_ids, position_ids=position_ids, image_embeds=(emb, levels),
                           visual_rows=visual_rows, hidden_layers=(model.deep_tap, model.tap))
    vl = out.layer_outputs[model.tap]
    deep = torch.cat([out.layer_outputs[model.deep_tap], vl], dim=-1) if model.config.use_deepstack_features else None
    hd = model.action_head.future_tokens.dtype
    return model.action_head.sample(vl.to(hd), deep.to(hd) if deep is not None else None, mask, state, steps=steps,
                                    noise=noise, method=model.config.sampler, check_mask=False)


@dataclass
class Optimized:
    """What optimize() applied, and the forward VLAModel.forward hands inference calls to."""

    dtype: torch.dtype  # weights cast to it and autocast to it; None: unchanged
    merged: bool  # LoRA folded into the base weights
    mode: str  # torch.compile mode, or None (not compiled)
    bucket: int  # text padded to a multiple of this many tokens (1: no padding)
    step: object  # inference_step, compiled or not
    vision: object  # VLAModel.vision_on_device, compiled or not

    @torch.inference_mode()
    def actions(self, model, inputs, robot_state, noise, steps, cache):
        """(B, H, A) actions. Every tensor handed to a compiled function is a fresh inference-mode
        copy on the device, whoever made the input: a tensor made outside inference mode would not
        match the compiled graph's guards and would compile it again."""
        dev = model.action_head.future_tokens.device
        hd = model.action_head.future_tokens.dtype
        if not bool(inputs["attention_mask"].any(1).all()):  # on the host: no device sync
            raise ValueError("attention_mask: a sample has no real token")
        inputs = pad_inputs(inputs, self.bucket)
        frames = inputs["frames"]
        flat = frames.reshape(-1, *frames.shape[2:])
        shape = (frames.shape[0], model.config.action_horizon, model.config.action_dim)
        noise = torch.randn(shape, device=dev, dtype=hd) if noise is None else noise.to(dev, hd, copy=True)
        with model.autocast():
            vision = lambda f: self.encode_frames(model, f)  # noqa: E731
            emb, levels = cache.encode(flat, vision) if cache is not None else vision(flat)
            args = [inputs[k].to(dev, non_blocking=True, copy=True) for k in ("input_ids", "position_ids",
                                                                               "visual_rows")]
            args += [emb, levels, inputs["attention_mask"].to(dev, non_blocking=True, copy=True).bool(),
                     robot_state.to(dev, hd, copy=True), noise, steps or model.config.diffusion_steps]
            return self.call(self.step, dev, *args)

    def encode_frames(self, model, frames):
        """frames (N, S, S, 3) uint8 on the host -> (tokens, [levels]); compiled: a frame per call."""
        dev = model.action_head.future_tokens.device
        if self.mode is None:
            return model.vision_on_device(frames.to(dev, non_blocking=True), model.pixel_lut(dev))
        outs = [self.call(self.vision, dev, f[None].to(dev, non_blocking=True, copy=True), model.pixel_lut(dev))
                for f in frames]
        return torch.cat([o[0] for o in outs]), [torch.cat(lv) for lv in zip(*(o[1] for o in outs))]

    def call(self, fn, dev, *args):
        """fn(*args), uncompiled as is; compiled: a failure names torch.compile, and outputs are
        copied out (a CUDA graph's outputs are overwritten by its next replay)."""
        if self.mode is None:
            return fn(*args)
        if dev.type == "cuda":  # the previous call's outputs were copied: reuse them
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = fn(*args)
        except Exception as e:
            raise RuntimeError(f"torch.compile (mode {self.mode!r}) failed on this platform: {e}; "
                               f"inference.optimize(model, compile=False) runs the same step uncompiled") from e
        return (out[0].clone(), [lv.clone() for lv in out[1]]) if isinstance(out, tuple) else out.clone()
