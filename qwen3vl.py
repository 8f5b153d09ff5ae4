"""
Qwen3-VL (dense 2B / 4B / 8B / 32B) in plain PyTorch: vision tower with DeepStack + Qwen3 decoder
with interleaved M-RoPE, numerically equal to transformers' `Qwen3VLForConditionalGeneration`
and loading the official safetensors as they are. The module tree mirrors the checkpoint keys
(`model.visual.*`, `model.language_model.*`, `lm_head` when untied); early exit (`num_layers=k`)
builds and loads only decoder layers 0..k-1, with no final norm and no lm_head. The processor
(chat template, image / video preprocessing, tokenizer) is qwen3vl_processor.py.

    model = Qwen3VL.from_pretrained(path, num_layers=None, dtype=torch.bfloat16, device="cpu")
    out = model(input_ids, attention_mask, pixel_values, image_grid_thw, hidden_layers=(8, 17))
    new_tokens = model.generate(**batch, max_new_tokens=32)       # (B, T), KV cache

    python qwen3vl.py describe --preset 4B --num-layers 18   # parameter breakdown (meta device)
    python qwen3vl.py chat --model DIR --image a.jpg --prompt "What is this?"
"""

import argparse
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import qwen3vl_processor

# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1024  # V
    intermediate_size: int = 4096  # ViT MLP width
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2  # a still image is duplicated to 2 frames by the processor
    spatial_merge_size: int = 2  # 2x2 patches -> 1 LLM token
    out_hidden_size: int = 2560  # = text hidden size
    num_position_embeddings: int = 2304  # learned 48x48 absolute position table
    # ViT blocks whose outputs feed the DeepStack mergers
    deepstack_visual_indexes: tuple = (5, 11, 17)
    # vision 2D RoPE base (not in old config.json files; transformers hard-codes it)
    rope_theta: float = 10000.0

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2560  # D
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # GQA
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple = (24, 20, 20)  # frequency slots for (T, H, W); sums to head_dim // 2
    max_position_embeddings: int = 262144


@dataclass
class Qwen3VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656  # <|video_pad|>
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # 2B/4B: lm_head shares embed_tokens.weight; 8B/32B: separate lm_head
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, d):
        """Map a checkpoint's config.json dict field by field. Accepts both the transformers 4.57
        form (`rope_theta` + `rope_scaling` in text_config) and the 5.x form (`rope_parameters`)."""
        t, v = d["text_config"], d["vision_config"]
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported text rope_type {rope.get('rope_type')!r}; Qwen3-VL uses 'default'")
        for cfg, act in ((t, "silu"), (v, "gelu_pytorch_tanh")):
            if cfg.get("hidden_act", act) != act:
                raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}, expected {act!r}")
        vrope = v.get("rope_parameters") or {}
        text = TextConfig(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            # transformers' default (Qwen3VLTextConfig.default_theta) when neither form has one
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 500000.0))),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            max_position_embeddings=t.get("max_position_embeddings", 262144),
        )
        vision = VisionConfig(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"],
            in_channels=v.get("in_channels", 3),
            patch_size=v.get("patch_size", 16),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            out_hidden_size=v["out_hidden_size"],
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise ValueError(f"mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}")
        ids = {k: d.get(k, getattr(cls, k)) for k in
               ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        return cls(text=text, vision=vision, tie_word_embeddings=bool(tie), **ids)


    def to_hf(self):
        """The inverse of from_hf (transformers 5.x form, rope_parameters): from_hf(to_hf(c)) == c."""
        t, v = self.text, self.vision
        return {
            "model_type": "qwen3_vl", "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "text_config": {
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
                "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu",
            },
            "vision_config": {
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                "out_hidden_size": v.out_hidden_size, "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "hidden_act": "gelu_pytorch_tanh",
                "rope_parameters": {"rope_theta": v.rope_theta},
            },
        }

def _preset(d, inter, layers, heads, vdepth, vdim, vinter, taps, tie):
    return Qwen3VLConfig(
        text=TextConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads),
        vision=VisionConfig(depth=vdepth, hidden_size=vdim, intermediate_size=vinter, out_hidden_size=d,
                            deepstack_visual_indexes=taps),
        tie_word_embeddings=tie)


# The shipped configs (their config.json values). Exact-name lookup only.
PRESETS = {
    "2B": _preset(2048, 6144, 28, 16, 24, 1024, 4096, (5, 11, 17), True),
    "4B": _preset(2560, 9728, 36, 32, 24, 1024, 4096, (5, 11, 17), True),
    "8B": _preset(4096, 12288, 36, 32, 27, 1152, 4304, (8, 16, 24), False),
    # untied (as the 8B; not checked against a 32B file)
    "32B": _preset(5120, 25600, 64, 64, 27, 1152, 4304, (8, 16, 24), False),
}

# --------------------------------------------------------------------------------------------------
# Shared pieces


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin with HF's split-halves layout
    (dim j pairs with j + d/2, so checkpoint q/k weights need no permutation). cos/sin are two equal
    halves, so this is computed per half without materialising rotate_half(x); every element goes
    through the same roundings as transformers (a + (-b) == a - b exactly)."""
    x1, x2 = x.chunk(2, dim=-1)
    half = x1.shape[-1]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def mrope_slot_rows(mrope_section, half):
    """Which position row (0=T, 1=H, 2=W) drives each of the `half` frequency slots:
    interleaved "THWTHW...TTTT". Slot j takes H if j % 3 == 1 and j < 3*sec[1], W if
    j % 3 == 2 and j < 3*sec[2], else T. Slots past `half` do not exist: when 3*sec[i] > half
    the interleave stops at the end, as transformers' slice [offset:3*sec[i]:3] does
    (e.g. head_dim 16, sections (2, 3, 3): H gets 3 slots, W only 2, T the other 3)."""
    rows = [0] * half
    for row, offset in ((1, 1), (2, 2)):
        for j in range(offset, min(3 * mrope_section[row], half), 3):
            rows[j] = row
    return rows


def merge_order_rc(h, w, m, device=None):
    """(row, col) of every patch of an h x w grid in the processor's merge-window order: merged row,
    merged col, then the m x m window row-major. Returns two (h*w,) long tensors."""
    r = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
    c = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
    # (h/m, m, w/m, m) -> (h/m, w/m, m, m): the 4 patches of a window become consecutive
    return r.permute(0, 2, 1, 3).reshape(-1), c.permute(0, 2, 1, 3).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Vision tower


class VisionPatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # kept as a Conv3d so the checkpoint weight [V, 3, 2, 16, 16] loads unchanged ...
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x):  # (N, 1536) -> (N, V)
        # ... but kernel == stride == input size: one matmul over the flattened (C, T, P, P) patch
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, seg_lens):
        N, V = x.shape
        qkv = self.qkv(x).view(N, 3, self.num_heads, -1)  # (N, 3, nh, hd)
        # 2D RoPE in fp32, cast back (transformers apply_rotary_pos_emb_vision); q and k
        # share cos/sin, so one apply_rope over both halves the elementwise kernel launches
        # (same values as rotating each alone)
        c, s = cos[:, None, None], sin[:, None, None]  # (N, 1, 1, hd)
        q, k = apply_rope(qkv[:, :2].float(), c, s).to(x.dtype).unbind(1)  # each (N, nh, hd)
        v = qkv[:, 2]
        # attention never crosses an image / temporal patch (segment); bidirectional inside one
        if len(set(seg_lens)) == 1:
            # equal segments (MIMIC: 4 frames of 224x224): one batched SDPA over
            # (num_segments, nh, L, hd)
            L = seg_lens[0]
            q, k, v = (t.view(N // L, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, V)  # (S, L, nh, hd) -> (N, V)
        else:
            outs = []
            for qs, ks, vs in zip(*(t.split(seg_lens) for t in (q, k, v))):
                qs, ks, vs = (t.transpose(0, 1)[None] for t in (qs, ks, vs))  # (1, nh, L, hd)
                outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))  # (L, nh, hd)
            o = torch.cat(outs).reshape(N, V)
        return self.proj(o)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))  # tanh-GELU in the ViT blocks


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, seg_lens):
        x = x + self.attn(self.norm1(x), cos, sin, seg_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 merge: concat the 4 consecutive patches of a window, then fc1 -> erf-GELU -> fc2.
    The main merger normalises each patch (width V) before the concat; the DeepStack mergers
    normalise after it (width 4V)."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.dim if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.dim, self.dim, bias=True)
        self.linear_fc2 = nn.Linear(self.dim, cfg.out_hidden_size, bias=True)

    def forward(self, x):  # (N, V) -> (N/4, O)
        x = self.norm(x.view(-1, self.dim)) if self.postshuffle_norm else self.norm(x).view(-1, self.dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact erf GELU in the mergers


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.side = int(math.isqrt(cfg.num_position_embeddings))  # 48
        self.patch_embed = VisionPatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None):
        r = self.cfg.head_dim // 2  # half the head rotates with the row, half with the col
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float, device=device) / r))

    def pos_embed_interpolate(self, grids, device):
        """Bilinear, align-corners resampling of the 48x48 table to each h x w grid, in merge-window
        order. Mirrors transformers' get_vision_interpolation_indices_and_weights: fp32 weights
        times the table (so the products and the 4-tap sum are fp32 even for a bf16 table), cast
        to the activation dtype by the caller."""
        G, m, out, done = self.side, self.cfg.spatial_merge_size, [], {}
        for t, h, w in grids:
            if (h, w) in done:  # e.g. MIMIC's 4 equal frames: resample once per distinct size
                out.append(done[h, w].repeat(t, 1))
                continue
            taps_w = []
            for idx, n in zip(merge_order_rc(h, w, m, device), (h, w)):
                src = idx.float() * (G - 1) / max(n - 1, 1)  # closed form of linspace(0, G-1, n)[idx]
                floor = src.floor()
                offs = torch.arange(2, device=device)
                taps = (floor.long()[:, None] + offs).clamp(0, G - 1)  # (h*w, 2)
                wts = (1 - (src[:, None] - floor[:, None] - offs).abs()).clamp(min=0)  # hat kernel
                taps_w.append((taps, wts))
            (ty, wy), (tx, wx) = taps_w
            index = (ty[:, :, None] * G + tx[:, None, :]).reshape(-1, 4)  # (h*w, 4) taps: y0x0 y0x1 y1x0 y1x1
            weight = (wy[:, :, None] * wx[:, None, :]).reshape(-1, 4)
            pe = done[h, w] = (self.pos_embed.weight[index] * weight[:, :, None]).sum(1)  # (h*w, V)
            out.append(pe.repeat(t, 1))  # no temporal embedding: every frame gets the same table
        return torch.cat(out)

    def rotary(self, grids, device):
        """cos, sin (N, head_dim) fp32 for the 2D RoPE: concat(row * inv_freq, col * inv_freq) x 2."""
        rc = [torch.stack(merge_order_rc(h, w, self.cfg.spatial_merge_size, device), -1).repeat(t, 1)
              for t, h, w in grids]
        freqs = torch.cat(rc)[..., None].float() * self.inv_freq.float()  # (N, 2, r/2)
        emb = freqs.flatten(1)  # (N, r): row freqs then col freqs
        emb = torch.cat((emb, emb), dim=-1)  # (N, head_dim)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, C*T*P*P) in processor order; grid_thw (K, 3) in patches
        (a tensor, or a list of (t, h, w): torch.compile can trace a list, not a tensor's tolist()).
        Returns (embeds (N/4, O), [deepstack level j (N/4, O) for each tap])."""
        grids = [tuple(g) for g in (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw)]
        m = self.cfg.spatial_merge_size
        if any(h % m or w % m for _, h, w in grids):
            raise ValueError(f"grid_thw {grids}: h and w must be multiples of spatial_merge_size {m}")
        if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw {grids} implies "
                             f"{sum(t * h * w for t, h, w in grids)}")
        dev = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = x + self.pos_embed_interpolate(grids, dev).to(x.dtype)
        cos, sin = self.rotary(grids, dev)
        seg_lens = [h * w for t, h, w in grids for _ in range(t)]  # one segment per image / temporal patch
        taps = {b: j for j, b in enumerate(self.cfg.deepstack_visual_indexes)}
        deepstack = []
        for b, block in enumerate(self.blocks):
            x = block(x, cos, sin, seg_lens)
            if b in taps:
                deepstack.append(self.deepstack_merger_list[taps[b]](x))
        return self.merger(x), deepstack


# --------------------------------------------------------------------------------------------------
# Qwen3 text decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, THEN scale (the order transformers uses; matters in bf16)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every kept layer + a position counter. `rope_deltas`
    (B, 1) is the M-RoPE offset of the NEXT token relative to its cache index: decode
    position = cache index + rope_deltas."""

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0  # tokens already stored
        self.rope_deltas = None

    def update(self, layer, k, v):  # k, v (B, nkv, S, hd); returns all keys/values so far
        end = self.pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KVCache overflow: {end} tokens > max_len {self.k.shape[3]}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.hd = layer_idx, cfg.head_dim
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads  # GQA: nh // nkv queries per kv head
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)  # per-head RMSNorm before RoPE (Qwen3)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.nh, self.hd)).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_norm(self.k_proj(x).view(B, S, self.nkv, self.hd)).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)
        # text RoPE runs in the activation dtype (cos/sin were cast), unlike the fp32 vision RoPE
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=self.nh != self.nkv)
        else:
            # with a mask, SDPA's GQA path falls back to slow kernels; repeat kv heads
            # instead (as transformers)
            rep = self.nh // self.nkv
            k, v = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))  # (B, S, nh*hd)


class TextMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = TextMLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """`model.language_model`: embeddings, the kept decoder layers, the final norm (full model)."""

    def __init__(self, cfg: TextConfig, num_layers: int, with_norm: bool):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if with_norm else None
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        self.register_buffer("slot_rows", self.compute_slot_rows(), persistent=False)

    def compute_inv_freq(self, device=None):
        hd = self.cfg.head_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))

    def compute_slot_rows(self, device=None):
        return torch.tensor(mrope_slot_rows(self.cfg.mrope_section, self.cfg.head_dim // 2), device=device)

    def rope(self, position_ids, dtype):
        """position_ids (3, B, S) -> cos, sin (B, 1, S, hd) in `dtype`; angles in fp32."""
        # (B, S, hd/2): each frequency slot takes its own T, H or W position (interleaved THW)
        pos = position_ids[self.slot_rows].float().permute(1, 2, 0)
        freqs = pos * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------------------------------
# Full model


def rope_index(cfg, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
    """3D M-RoPE positions (3, B, S) and rope_deltas (B, 1) of a Qwen3VLConfig `cfg`, as
    transformers computes them. A plain function, so DataLoader workers can compute the positions
    on the CPU (no host-device sync in the step):
    - every run of consecutive image (video) pad tokens is one image (one video temporal patch)
      and takes the next row of image_grid_thw (of video_grid_thw split into t rows of (1, h, w));
    - a text run numbers on from a cursor (all three rows equal); a visual run at cursor s gets
      T = s + t_idx, H = s + r, W = s + c over its merged grid, then the cursor advances by
      max(h, w) / merge (that image's max position + 1), so the text after it continues from there;
    - only tokens with attention_mask = 1 are numbered; padded slots get 0;
    - rope_deltas_b = max position + 1 - (number of real tokens in row b)."""
    m = cfg.vision.spatial_merge_size
    B, S = input_ids.shape
    dev = input_ids.device
    iters = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter([[1, h, w] for t, h, w in video_grid_thw.tolist() for _ in range(t)]
                     if video_grid_thw is not None else [])}
    # transformers reads these types from the processor's mm_token_type_ids; we
    # derive the same from ids
    kinds = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
    position_ids = torch.zeros(3, B, S, dtype=torch.long, device=dev)
    deltas = []
    for b in range(B):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(S, dtype=torch.bool,
                                                                                     device=dev)
        kind = kinds[b][keep]
        n = kind.numel()
        cuts = (torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1).tolist()  # starts of runs of one type
        chunks, cur = [], 0
        for s, e in zip([0] + cuts, cuts + [n]):
            k = int(kind[s])
            if k == 0:
                chunks.append(torch.arange(e - s, device=dev).expand(3, -1) + cur)
                cur += e - s
                continue
            grid = next(iters[k], None)
            if grid is None:
                raise ValueError(f"row {b}: more {('image', 'video')[k - 1]} placeholder runs than grid_thw rows")
            t, gh, gw = grid[0], grid[1] // m, grid[2] // m
            if t * gh * gw != e - s:
                raise ValueError(f"row {b}: a run of {e - s} {('image', 'video')[k - 1]} tokens does not match "
                                 f"grid {grid} ({t * gh * gw} tokens)")
            tt, hh, ww = torch.meshgrid(torch.arange(t, device=dev), torch.arange(gh, device=dev),
                                        torch.arange(gw, device=dev), indexing="ij")
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)  # (3, t*gh*gw)
            cur += max(grid[1], grid[2]) // m
        pos = torch.cat(chunks, 1) if chunks else torch.zeros(3, 0, dtype=torch.long, device=dev)
        position_ids[:, b, keep] = pos
        # relative to the REAL token count (as transformers 5.x), not the padded length S
        deltas.append((pos.max() + 1 - n) if n else torch.tensor(0, device=dev))
    return position_ids, torch.stack(deltas).view(B, 1)


@dataclass
class Qwen3VLOutput:
    logits: torch.Tensor | None  # (B, S or logits_to_keep, vocab); None under early exit
    # full model: after the final norm; early exit: residual stream after layer k-1
    last_hidden_state: torch.Tensor
    # output_hidden_states=True, exactly as transformers (see Qwen3VL.forward)
    hidden_states: tuple | None
    # {layer index: that decoder layer's own output (B, S, D)} for the requested hidden_layers
    layer_outputs: dict
    # (B, 1) as transformers' get_rope_index (None for cached decode steps)
    rope_deltas: torch.Tensor | None


class Qwen3VL(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig, num_layers: int | None = None):
        super().__init__()
        L = cfg.text.num_hidden_layers
        if num_layers is not None and not 1 <= num_layers <= L:
            raise ValueError(f"num_layers must be in [1, {L}], got {num_layers}")
        self.cfg = cfg
        self.num_layers = L if num_layers is None else num_layers
        self.early_exit = self.num_layers < L  # no final norm / lm_head, logits None
        # plain container so parameter names are exactly the checkpoint keys
        # (model.visual.*, model.language_model.*)
        self.model = nn.Module()
        self.model.visual = VisionModel(cfg.vision)
        self.model.language_model = TextModel(cfg.text, self.num_layers, with_norm=not self.early_exit)
        if not self.early_exit and not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def visual(self):
        return self.model.visual

    def init_buffers(self):
        """Recompute the non-persistent rotary buffers, which a meta-device build leaves empty."""
        for mod in (self.model.visual, self.model.language_model):
            mod.inv_freq = mod.compute_inv_freq(device=next(mod.parameters()).device)
        lm = self.model.language_model
        lm.slot_rows = lm.compute_slot_rows(device=lm.inv_freq.device)

    def checkpoint_skip(self, key):
        """Checkpoint keys deliberately not loaded (early exit; a tied head stored anyway)."""
        if key.startswith("model.language_model.layers."):
            return int(key.split(".")[3]) >= self.num_layers
        if key == "model.language_model.norm.weight":
            return self.early_exit
        if key == "lm_head.weight":
            return self.early_exit or self.cfg.tie_word_embeddings
        return False

    # ----------------------------------------------------------------------------------------------
    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        """rope_index with this model's config: (position_ids (3, B, S), rope_deltas (B, 1))."""
        return rope_index(self.cfg, input_ids, image_grid_thw, video_grid_thw, attention_mask)

    # ----------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, output_hidden_states=False, hidden_layers=(),
                cache: KVCache | None = None, logits_to_keep: int = 0, position_ids=None, image_embeds=None,
                visual_rows=None):
        """input_ids (B, S); attention_mask (B, past + S), 1 = real token; pixel_values
        (N, 1536) for all images in order of appearance with image_grid_thw (K, 3); likewise
        pixel_values_videos / video_grid_thw.

        hidden_states (output_hidden_states=True), as transformers returns it:
        (embeddings after the vision scatter, output of layer 0, ..., output of layer L-2,
        final-norm(residual after layer L-1)); every layer output is recorded BEFORE the DeepStack
        add that follows layers 0..2. Under early exit at k: (embeddings, outputs of layers 0..k-1)
        without any norm, so hidden_states[k] equals transformers' hidden_states[k] for k < L.
        hidden_layers=(8, 17) -> layer_outputs {8: ..., 17: ...}: each layer's own output
        (same as hidden_states[i + 1] for i < L - 1), pre-DeepStack, without keeping the other
        layers. logits_to_keep=n > 0 computes logits for the last n positions only (generation).

        Precomputed inputs (what a DataLoader worker or a per-frame cache can provide,
        so the step has no host-device sync): position_ids (3, B, S) from rope_index;
        image_embeds = (embeds, [DeepStack levels]) as model.visual returns them for every image,
        instead of pixel_values; visual_rows (N,) long, the flat indices b * S + s of the image
        tokens. attention_mask may stay on the CPU: it is inspected there and moved here."""
        lm, cfg = self.model.language_model, self.cfg
        B, S = input_ids.shape
        past = cache.pos if cache is not None else 0
        hidden_layers = set(hidden_layers)
        if any(not 0 <= i < self.num_layers for i in hidden_layers):
            raise ValueError(f"hidden_layers {sorted(hidden_layers)} outside the {self.num_layers} built layers")
        h = lm.embed_tokens(input_ids)
        # checked where it lives (the CPU when the caller kept it there: no device sync), then moved
        padded = attention_mask is not None and not bool(attention_mask.all())
        if attention_mask is not None:
            attention_mask = attention_mask.to(h.device, non_blocking=True)

        # precomputed image rows: one scatter, no search for the placeholder tokens
        if visual_rows is not None:
            if image_embeds is None or pixel_values_videos is not None:
                raise ValueError("visual_rows needs image_embeds and no video inputs")
            emb, deepstack = image_embeds
            if visual_rows.numel() != emb.shape[0]:
                raise ValueError(f"{visual_rows.numel()} visual_rows but {emb.shape[0]} image embeddings")
            visual_rows = visual_rows.to(h.device, non_blocking=True)
            h = h.view(B * S, -1).index_copy(0, visual_rows, emb.to(h.dtype)).view(B, S, -1)
            deepstack = [level.to(h.dtype) for level in deepstack]
            pixel_values = image_embeds = None
        # --- vision: overwrite placeholder embeddings, collect DeepStack rows in sequence order
        masks, feats = [], []
        for pix, grid, tok in ((pixel_values if image_embeds is None else image_embeds, image_grid_thw,
                                cfg.image_token_id),
                               (pixel_values_videos, video_grid_thw, cfg.video_token_id)):
            if pix is None:
                continue
            emb, ds = pix if isinstance(pix, tuple) else self.model.visual(pix, grid)
            mask = input_ids == tok
            if int(mask.sum()) != emb.shape[0]:
                kind = "Image" if tok == cfg.image_token_id else "Video"
                raise ValueError(f"{kind} features and {kind.lower()} tokens do not match: "
                                 f"tokens {int(mask.sum())}, features {emb.shape[0]}")
            h[mask] = emb.to(h.dtype)  # row-major over (batch, seq), like masked_scatter
            masks.append(mask)
            feats.append(ds)
        if visual_rows is None:
            deepstack = []
        if masks:
            visual_mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
            # flat (B*S) row of every visual token, row-major like the boolean mask;
            # found once, used per level
            visual_rows = visual_mask.flatten().nonzero().squeeze(1)
            for level in zip(*feats):
                if len(masks) == 1:
                    deepstack.append(level[0].to(h.dtype))
                    continue
                joint = h.new_zeros(int(visual_mask.sum()), h.shape[-1])
                for mk, f in zip(masks, level):
                    joint[mk[visual_mask]] = f.to(h.dtype)
                deepstack.append(joint)

        # --- positions: full M-RoPE index at prefill, cache index + delta while decoding
        rope_deltas = None
        if position_ids is not None:
            if cache is not None:
                raise ValueError("position_ids are for cache-free forwards (generation computes its own)")
            position_ids = position_ids.to(h.device, non_blocking=True)
        elif past == 0:
            # recomputed at every prefill, never reused from an earlier call
            # (stale deltas: transformers #43952)
            position_ids, rope_deltas = self.get_rope_index(input_ids, image_grid_thw, video_grid_thw,
                                                            attention_mask)
            if cache is not None:
                n_real = attention_mask.sum(-1, keepdim=True) if attention_mask is not None else S
                cache.rope_deltas = rope_deltas + n_real - S  # next token: max position + 1
        else:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError("vision inputs are only supported at prefill (empty cache)")
            position_ids = (torch.arange(past, past + S, device=h.device) + cache.rope_deltas).expand(3, -1, -1)
        cos, sin = lm.rope(position_ids, h.dtype)

        # --- mask: causal + key padding only; never derived from position ids
        mask = None
        if padded or (past > 0 and S > 1):
            kv = torch.arange(past + S, device=h.device)
            mask = (kv[None, :] <= kv[past:, None])[None, None]  # (1, 1, S, past+S) causal
            if attention_mask is not None:
                # (B, 1, S, past+S) + key padding, but every query keeps its own key: a left-padding
                # row would be fully masked, which SDPA answers with NaN before torch 2.5 (and on
                # some kernels), and the next layer's keys and values would carry it into every
                # real row (0 * NaN)
                own = kv[None, :] == kv[past:, None]  # (S, past+S); for real rows already allowed
                mask = mask & (attention_mask[:, None, None, :].bool() | own)
        # SDPA's built-in causal mask (no padding, no cache)
        is_causal = mask is None and past == 0 and S > 1

        hidden_states = [h] if output_hidden_states else None
        layer_outputs = {}
        for i, layer in enumerate(lm.layers):
            h = layer(h, cos, sin, mask, is_causal, cache)
            if i in hidden_layers:
                layer_outputs[i] = h
            if hidden_states is not None:
                hidden_states.append(h)
            if i < len(deepstack):  # DeepStack level i goes in right after layer i
                if i in hidden_layers or hidden_states is not None:
                    h = h.clone()  # out of place: the recorded layer output stays pre-DeepStack
                # one in-place pass over the visual rows; each row is hit once, so
                # this is exactly h + level
                h.view(-1, h.shape[-1]).index_add_(0, visual_rows, deepstack[i])
        if cache is not None:
            cache.pos += S

        logits = None
        if not self.early_exit:
            h = lm.norm(h)
            if hidden_states is not None:
                # transformers replaces the last entry by the final-norm output
                hidden_states[-1] = h
            hk = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
            head = lm.embed_tokens.weight if cfg.tie_word_embeddings else self.lm_head.weight
            logits = F.linear(hk, head)
        return Qwen3VLOutput(logits, h, tuple(hidden_states) if hidden_states is not None else None,
                             layer_outputs, rope_deltas)

    # ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_p=1.0, eos_token_id=(), pad_token_id=0, generator=None):
        """Greedy or temperature/top-p sampling with a KV cache. Batched prompts must be LEFT-padded
        (pass the attention_mask). Returns only the new tokens (B, T), T <= max_new_tokens
        (stops once every row has emitted an eos); a finished row emits pad_token_id."""
        if self.early_exit:
            raise ValueError("generate needs the full model (num_layers=None)")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left padding: every row's last token must be real")
        eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)),
                           device=input_ids.device, dtype=torch.long)
        B, S = input_ids.shape
        tc, w = self.cfg.text, self.model.language_model.embed_tokens.weight
        # one buffer for the whole call; left padding puts every row's next token at the same cache
        # index, and the prefill stores each row's M-RoPE offset in cache.rope_deltas
        cache = KVCache(self.num_layers, B, tc.num_key_value_heads, S + max_new_tokens, tc.head_dim, w.dtype,
                        w.device)
        out = self(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                   cache=cache, logits_to_keep=1)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if do_sample:
                probs = torch.softmax(logits / temperature, dim=-1)
                # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
                if top_p < 1.0:
                    p_sorted, order = probs.sort(dim=-1, descending=True)
                    drop = p_sorted.cumsum(-1) - p_sorted >= top_p  # mass strictly before token i
                    probs = probs.scatter(-1, order, p_sorted.masked_fill(drop, 0.0))
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)  # finished rows emit pad
            tokens.append(nxt)
            finished |= torch.isin(nxt, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            # decode step: no pixels, no DeepStack; position = cache index + rope delta (in forward)
            out = self(nxt[:, None], attention_mask, cache=cache, logits_to_keep=1)
        return torch.stack(tokens, dim=1)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, num_layers=None, dtype=torch.bfloat16, device="cpu"):
        """Build on the meta device, then stream only the needed tensors from `path`'s safetensors."""
        with open(os.path.join(path, "config.json")) as f:
            cfg = Qwen3VLConfig.from_hf(json.load(f))
        with torch.device("meta"):
            model = cls(cfg, num_layers=num_layers)
        load_safetensors_into(model, path, dtype=dtype, device=device, skip=model.checkpoint_skip)
        model.init_buffers()
        return model.eval()


# --------------------------------------------------------------------------------------------------
# Loading


def safetensors_files(path_or_files):
    """The files of a folder (model.safetensors or its sharded index), one file, or a list."""
    if isinstance(path_or_files, (list, tuple)):
        return list(path_or_files)
    if os.path.isfile(path_or_files):
        return [path_or_files]
    index = os.path.join(path_or_files, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path_or_files, s) for s in shards]
    single = os.path.join(path_or_files, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path_or_files}")


def load_safetensors_into(model, path_or_files, key_map=None, dtype=None, device="cpu", skip=None):
    """Assign checkpoint tensors to `model`'s parameters and persistent buffers (which may live on
    the meta device).

    key_map: checkpoint key -> model key, a callable or a dict (keys absent from the dict keep
    their name); a None result drops the key. skip: predicate on the mapped key for tensors
    deliberately not loaded. Floating tensors are cast to `dtype` (None keeps them). All headers
    are checked first: any missing, unexpected or mis-shaped key raises one error naming every
    such key, before any tensor data is read. Tensors are then read one at a time, so peak memory
    is about the kept bytes."""
    if isinstance(key_map, dict):
        key_map = (lambda table: lambda k: table.get(k, k))(key_map)
    # keep_vars: the meta tensors themselves (shapes only); non-persistent buffers are not in it
    expected = dict(model.state_dict(keep_vars=True))
    # pass 1 reads headers only (safe_open parses the JSON header)
    plan, unexpected, misshaped = [], [], []
    for file in safetensors_files(path_or_files):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = key_map(key) if key_map is not None else key
                if name is None or (skip is not None and skip(name)):
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name].shape):
                    misshaped.append(f"{key}: checkpoint {shape} vs model {tuple(expected[name].shape)}")
                    continue
                plan.append((file, key, name))
    missing = sorted(set(expected) - {name for _, _, name in plan})
    if missing or unexpected or misshaped:
        raise ValueError("checkpoint does not match the model:\n" + "\n".join(
            [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in sorted(unexpected)] +
            [f"  mis-shaped: {k}" for k in misshaped]))
    # pass 2: one tensor at a time. safetensors maps the file, so a tensor that needs no cast stays
    # file-backed (paged in on first use, copy-on-write) and a cast one lives only as its cast
    # copy: peak RSS ~ kept bytes.
    for file, key, name in plan:
        # a file is re-opened per tensor: closing it unmaps the source pages a cast has just read,
        # so they do not pile up in RSS next to the cast copies (re-opening parses the header)
        with safe_open(file, framework="pt", device=str(device)) as f:
            t = f.get_tensor(key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
        # swap the meta tensor for the real one in place of load_state_dict(assign=True), which
        # would need every tensor of the model in memory at once
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=mod._parameters[attr].requires_grad)
        else:
            mod._buffers[attr] = t
    return model


# --------------------------------------------------------------------------------------------------
# CLI


def describe(args):
    cfg = PRESETS[args.preset]
    with torch.device("meta"):
        model = Qwen3VL(cfg, num_layers=args.num_layers)
    count = lambda mod: sum(p.numel() for p in mod.parameters()) if mod is not None else 0  # noqa: E731
    lm = model.model.language_model
    parts = {
        "vision tower (model.visual)": count(model.model.visual),
        "LLM embed_tokens": count(lm.embed_tokens),
        f"LLM decoder layers ({model.num_layers} of {cfg.text.num_hidden_layers})": count(lm.layers),
        "LLM final norm": count(lm.norm),
        "head (lm_head)": count(getattr(model, "lm_head", None)),
    }
    total = sum(parts.values())
    print(f"Qwen3-VL-{args.preset}  tie_word_embeddings={cfg.tie_word_embeddings}  early_exit={model.early_exit}")
    for name, n in parts.items():
        print(f"  {name:<40s} {n:>15,d}")
    print(f"  {'total':<40s} {total:>15,d}   ({total * 2 / 2**30:.2f} GiB in bf16)")


def chat(args):
    """One user turn (images then text) -> the model's reply, greedy or sampled."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    proc = qwen3vl_processor.Qwen3VLProcessor.from_pretrained(args.model)
    model = Qwen3VL.from_pretrained(args.model, dtype=dtype, device=args.device)
    images = [Image.open(f) for f in args.image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = proc(text=[text], images=images or None, padding_side="left")
    batch = {k: v.to(args.device) for k, v in batch.items() if k != "mm_token_type_ids"}
    stop = [i for i in (proc.tokenizer.token_to_id("<|im_end|>"), proc.tokenizer.token_to_id("<|endoftext|>"))
            if i is not None]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.inference_mode():
        new = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=max(args.temperature, 1e-5), top_p=args.top_p, eos_token_id=stop,
                             pad_token_id=proc.pad_token_id, generator=gen)
    print(proc.decode(new[0].tolist(), skip_special_tokens=True))


def main(argv=None):
    p = argparse.ArgumentParser(description="Qwen3-VL in plain PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe", help="parameter breakdown of a preset (built on the meta device)")
    d.add_argument("--preset", choices=sorted(PRESETS), default="4B")
    d.add_argument("--num-layers", type=int, default=None, help="early exit: keep decoder layers < K")
    d.set_defaults(fn=describe)
    c = sub.add_parser("chat", help="answer a prompt about images with a local checkpoint folder")
    c.add_argument("--model", required=True, help="local Qwen3-VL folder (config.json, safetensors, tokenizer.json)")
    c.add_argument("--image", nargs="*", default=[], help="image files, shown before the prompt")
    c.add_argument("--prompt", required=True)
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.set_defaults(fn=chat)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
