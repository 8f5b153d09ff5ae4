"""
MIMIC's action head: a DiT that turns Qwen3-VL features + the current pose into a 16-step action
chunk by flow matching. Parameter names and shapes are exactly those of the released checkpoint
with the `action_head.` prefix stripped, so `ActionHead(cfg).load_state_dict(sd, strict=True)`
takes the released weights.

    tokens = [state_encoder(state) | future_tokens (F) | action_encoder(x_t) + pos + time_emb (H)]
    per block: x += SelfAttn(AdaLN1(x, c)); x += CrossAttn(AdaLN2(x, c), VL); x += FFN(AdaLN3(x, c))
    velocity = action_decoder(final_norm(x, c)[:, -H:])         c = time_embed(t), seen by AdaLN only
    VL = qwen_projection(layer-17 tokens) + deepstack_projection(mean of concat(layer 8, layer 17))

Flow matching: x_t = t * x1 + (1 - t) * eps (t = 0 noise, t = 1 data), target x1 - eps, MSE.
Sampling integrates dx/dt = v from t = 0 to 1 (Euler, the released config uses 1 step; or RK4).
The VL keys/values of every block's cross-attention do not depend on t or x_t: `encode_context`
computes them once per sampling call and `velocity` reuses them at every solver step.

Padding is masked in the deep-feature mean and in the cross-attention, so a sample's output does
not depend on its batch. References: DiT (Peebles & Xie 2023), flow matching (Lipman et al. 2023);
the attention parameters are laid out as torch.nn.MultiheadAttention's.
"""

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    hidden_dim: int = 1536  # D, diffusion_hidden_dim
    num_layers: int = 24  # DiT blocks
    num_heads: int = 24  # attention heads; head size D / heads = 64
    action_dim: int = 44  # A: 22 joint angles as interleaved (sin, cos)
    action_horizon: int = 16  # H: predicted steps (1.6 s at 10 Hz)
    num_future_tokens: int = 4  # F: learned query tokens between the state and the action tokens
    qwen_hidden_size: int = 2560  # Q: Qwen3-VL-4B width; deep features are 2Q (layers 8 and 17)
    projection_dim: int = 1024  # P: bottleneck of qwen_projection
    dropout: float = 0.1  # attention-weight dropout and FFN dropout (train mode only)
    deep_features: bool = True  # use_deepstack_features: add deepstack_projection(deep mean)

    def __post_init__(self):
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} not divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 2 or self.hidden_dim < 4:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even and >= 4 (sin/cos time embedding)")

    @classmethod
    def from_vla(cls, mc: dict) -> "DiTConfig":
        """From the released config.yaml `model_config` (VLAConfig field names), field by field."""
        return cls(hidden_dim=mc["diffusion_hidden_dim"], num_layers=mc["num_diffusion_layers"],
                   num_heads=mc["num_diffusion_heads"], action_dim=mc["action_dim"],
                   action_horizon=mc["action_horizon"], num_future_tokens=mc["num_future_tokens"],
                   qwen_hidden_size=mc["qwen_hidden_size"], projection_dim=mc["projection_dim"],
                   dropout=mc.get("diffusion_dropout", 0.1),  # absent from older configs: the code default
                   deep_features=mc.get("use_deepstack_features", True))


# --------------------------------------------------------------------------------------------------
# Building blocks


class SinusoidalEmbedding(nn.Module):
    """t (B,) in [0, 1] -> (B, D) = concat(sin(t f), cos(t f)), f_i = exp(-i ln(10000) / (D/2 - 1)),
    i < D/2. The raw t is used (no x1000 as in image DiTs), as the released head was trained."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        # computed on the fly (fp32, tiny), not a buffer: nothing to rebuild after a meta build
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        args = t.float()[:, None] * freqs[None]  # (B, D/2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class AdaLN(nn.Module):
    """LayerNorm without affine, modulated by the time embedding: x_hat * (1 + scale) + shift.
    cond_proj = [SiLU, Linear(D, 2D)] is zero-initialised, so at init this is a plain LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) -> (B, T, D)"""
        # each (B, 1, D); the released order is scale first
        scale, shift = self.cond_proj(c).unsqueeze(1).chunk(2, dim=-1)
        h = F.layer_norm(x.float(), (self.dim,), eps=1e-5).to(x.dtype)  # statistics in fp32
        return h * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters (in_proj_weight rows = q, k, v;
    in_proj_bias; out_proj), computed with F.scaled_dot_product_attention. Self-attention when `kv`
    is None; cross-attention with precomputed keys/values from `project_kv` otherwise. Dropout on
    the attention weights in train mode, as nn.MultiheadAttention(dropout=p) does."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def project_kv(self, src: torch.Tensor) -> tuple:
        """src (B, S, D) -> keys, values (B, nh, S, hs): in_proj's k and v rows applied to src."""
        B, S, D = src.shape
        kv = F.linear(src, self.in_proj_weight[D:], self.in_proj_bias[D:])  # (B, S, 2D)
        k, v = kv.view(B, S, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, S, hs)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple = None, mask: torch.Tensor = None) -> torch.Tensor:
        """x (B, T, D); kv from project_kv or None (self-attention); mask (B, 1, 1, S), True = attend."""
        B, T, D = x.shape
        nh, hs = self.heads, D // self.heads
        if kv is None:  # self-attention: one fused matmul for q, k, v
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3D)
            q, k, v = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        else:
            q = F.linear(x, self.in_proj_weight[:D], self.in_proj_bias[:D]).view(B, T, nh, hs).transpose(1, 2)
            k, v = kv  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, nh, T, hs) -> (B, T, D)


class DiTBlock(nn.Module):
    """Pre-norm block: AdaLN -> self-attention, AdaLN -> cross-attention to the VL tokens, AdaLN ->
    GELU FFN, each added to the residual stream (no adaLN-Zero gate: the released head has none)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_dim
        self.norm1 = AdaLN(D)
        self.self_attn = Attention(D, cfg.num_heads, cfg.dropout)
        self.norm2 = AdaLN(D)
        self.cross_attn = Attention(D, cfg.num_heads, cfg.dropout)
        self.norm3 = AdaLN(D)
        # nn.GELU()'s default is the exact erf form, as released
        self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(4 * D, D),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, c, kv, mask):
        """x (B, T, D) tokens, c (B, D) time embedding, kv this block's VL keys and values, mask
        (B, 1, 1, S)."""
        x = x + self.self_attn(self.norm1(x, c))
        x = x + self.cross_attn(self.norm2(x, c), kv=kv, mask=mask)
        return x + self.ffn(self.norm3(x, c))


class VLContext(NamedTuple):
    """What the blocks need of the VL tokens; fixed across the solver steps of a sampling call."""
    kv: list  # per block: (keys, values), each (B, nh, S, hs)
    mask: torch.Tensor  # (B, 1, 1, S) bool, True = real token


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, S, C), mask (B, S) bool -> (B, C) mean over the real tokens. torch.where (not x * mask)
    so NaN/inf in padded positions cannot leak in."""
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(1) / mask.sum(1, keepdim=True).to(x.dtype)


def integrate(velocity: Callable, x0: torch.Tensor, steps: int, method: str = "euler") -> torch.Tensor:
    """Solve dx/dt = velocity(x, t) from t = 0 to 1 in `steps` equal steps; t is a Python float."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in ("euler", "rk4"):
        raise ValueError(f"method must be 'euler' or 'rk4', got {method!r}")
    dt, x = 1.0 / steps, x0
    for i in range(steps):
        t = i * dt
        if method == "euler":
            x = x + dt * velocity(x, t)
        else:  # classic 4th-order Runge-Kutta
            k1 = velocity(x, t)
            k2 = velocity(x + 0.5 * dt * k1, t + 0.5 * dt)
            k3 = velocity(x + 0.5 * dt * k2, t + 0.5 * dt)
            k4 = velocity(x + dt * k3, t + dt)
            x = x + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def sample_timesteps(n: int, schedule: str = "uniform", generator: torch.Generator = None,
                     device=None) -> torch.Tensor:
    """Training times t (n,) with t = 0 noise, t = 1 data.
    uniform: t ~ U(0, 1), the released recipe.
    beta:    s ~ Beta(1.5, 1) (density 1.5 sqrt(s), drawn exactly as U^(1/1.5)), t = 0.999 (1 - s):
             the GR00T / openpi / lerobot schedule, which leans toward the NOISE side (t near 0
             here); t never reaches 1."""
    u = torch.rand(n, generator=generator, device=device)
    if schedule == "uniform":
        return u
    if schedule == "beta":
        return 0.999 * (1.0 - u.pow(1.0 / 1.5))
    raise ValueError(f"schedule must be 'uniform' or 'beta', got {schedule!r}")


# --------------------------------------------------------------------------------------------------
# The head


class ActionHead(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, A, H, F_, Q, P = (cfg.hidden_dim, cfg.action_dim, cfg.action_horizon, cfg.num_future_tokens,
                             cfg.qwen_hidden_size, cfg.projection_dim)
        self.time_embed = nn.Sequential(SinusoidalEmbedding(D), nn.Linear(D, 2 * D), nn.SiLU(), nn.Linear(2 * D, D))
        self.qwen_projection = nn.Sequential(nn.Linear(Q, P), nn.LayerNorm(P), nn.SiLU(), nn.Linear(P, D))
        if cfg.deep_features:
            self.deepstack_projection = nn.Linear(2 * Q, D)
        self.action_encoder = nn.Sequential(nn.Linear(A, D), nn.LayerNorm(D), nn.SiLU())
        self.action_pos_embed = nn.Parameter(torch.empty(1, H, D))
        self.state_encoder = nn.Sequential(nn.Linear(A, D), nn.LayerNorm(D), nn.SiLU(), nn.Linear(D, D))
        self.future_tokens = nn.Parameter(torch.empty(1, F_, D))
        self.dit_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = AdaLN(D)
        self.action_decoder = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, A))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """From-scratch init (the released head was trained from scratch; its exact init is not
        published): Linear: xavier-uniform, bias 0 (DiT); attention in_proj: xavier-uniform, bias 0
        (as nn.MultiheadAttention); LayerNorm: 1 / 0; action_pos_embed, future_tokens and the time
        MLP: N(0, 0.02) (DiT's t_embedder); every AdaLN cond_proj Linear: ZERO (as released), so all
        norms start as plain LayerNorms. Safe after to_empty() on a meta-built head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        for i in (1, 3):
            nn.init.normal_(self.time_embed[i].weight, std=0.02)
        nn.init.normal_(self.action_pos_embed, std=0.02)
        nn.init.normal_(self.future_tokens, std=0.02)
        for m in self.modules():
            if isinstance(m, AdaLN):
                nn.init.zeros_(m.cond_proj[1].weight)
                nn.init.zeros_(m.cond_proj[1].bias)

    # --- context: once per sample / per training step ---------------------------------------------

    def encode_context(self, vl_tokens: torch.Tensor, deep: torch.Tensor, vl_mask: torch.Tensor,
                       check_mask: bool = True) -> VLContext:
        """vl_tokens (B, S, Q) backbone layer-17 output; deep (B, S, 2Q) concat(layer 8, layer 17)
        outputs, or None when cfg.deep_features is False; vl_mask (B, S) bool, True = real token
        (every sample needs one). check_mask=False skips that check (it reads the mask back
        to the host: a sync on a GPU), for callers that checked a host copy of the mask already."""
        cfg = self.cfg
        B, S, Q = vl_tokens.shape
        if Q != cfg.qwen_hidden_size:
            raise ValueError(f"vl_tokens last dim {Q} != qwen_hidden_size {cfg.qwen_hidden_size}")
        if vl_mask.dtype != torch.bool or tuple(vl_mask.shape) != (B, S):
            raise ValueError(f"vl_mask must be bool of shape {(B, S)}, got {vl_mask.dtype} {tuple(vl_mask.shape)}")
        if check_mask and not bool(vl_mask.any(1).all()):
            raise ValueError("vl_mask: a sample has no real token (all False)")
        # the head runs in its own dtype (fp32), whatever the backbone's
        dtype = self.action_pos_embed.dtype
        vl = self.qwen_projection(vl_tokens.to(dtype))  # (B, S, D)
        if cfg.deep_features:
            if deep is None or tuple(deep.shape) != (B, S, 2 * Q):
                raise ValueError(f"deep must have shape {(B, S, 2 * Q)}, got "
                                 f"{None if deep is None else tuple(deep.shape)}")
            pooled = masked_mean(deep.to(dtype), vl_mask)  # (B, 2Q), padding left out
            vl = vl + self.deepstack_projection(pooled)[:, None]  # (B, 1, D) broadcast over S
        elif deep is not None:
            raise ValueError("deep features given but cfg.deep_features is False")
        # zero the padded tokens: they are masked out of attention anyway, but NaN/inf garbage there
        # would still poison the attention output (0 * NaN), and zeros keep the context reproducible
        vl = vl.masked_fill(~vl_mask[..., None], 0.0)
        kv = [blk.cross_attn.project_kv(vl) for blk in self.dit_blocks]
        return VLContext(kv=kv, mask=vl_mask[:, None, None, :])  # (B, 1, 1, S): over heads, queries

    # --- velocity: once per solver step -----------------------------------------------------------

    def velocity(self, ctx: VLContext, state: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """state (B, A) encoded current pose, x_t (B, H, A) noisy actions, t (B,) or a float
        -> v (B, H, A)."""
        cfg = self.cfg
        B = x_t.shape[0]
        if tuple(x_t.shape[1:]) != (cfg.action_horizon, cfg.action_dim) or tuple(state.shape) != (B, cfg.action_dim):
            raise ValueError(f"expected state {(B, cfg.action_dim)} and x_t {(B, cfg.action_horizon, cfg.action_dim)}"
                             f", got {tuple(state.shape)} and {tuple(x_t.shape)}")
        dtype = self.action_pos_embed.dtype
        if isinstance(t, torch.Tensor):
            t = t.to(device=x_t.device, dtype=torch.float32).expand(B)
        else:  # a solver's float, filled on the device (as_tensor would copy it from the host)
            t = torch.full((B,), float(t), dtype=torch.float32, device=x_t.device)
        c = self.time_embed(t)  # (B, D)
        tokens = torch.cat([
            self.state_encoder(state.to(dtype))[:, None],  # (B, 1, D)
            self.future_tokens.expand(B, -1, -1),  # (B, F, D)
            self.action_encoder(x_t.to(dtype)) + self.action_pos_embed + c[:, None],  # (B, H, D)
        ], dim=1)  # (B, 1 + F + H, D)
        for blk, kv in zip(self.dit_blocks, ctx.kv):
            tokens = blk(tokens, c, kv, ctx.mask)
        tokens = self.final_norm(tokens, c)
        return self.action_decoder(tokens[:, -cfg.action_horizon:])  # (B, H, A)

    def forward(self, vl_tokens, deep, vl_mask, state, x_t, t) -> torch.Tensor:
        """One velocity evaluation from scratch (context + velocity); shapes as in those two."""
        return self.velocity(self.encode_context(vl_tokens, deep, vl_mask), state, x_t, t)

    # --- training and sampling --------------------------------------------------------------------

    def loss(self, vl_tokens, deep, vl_mask, state, actions, timesteps=None, noise=None,
             generator: torch.Generator = None, schedule: str = "uniform") -> torch.Tensor:
        """Flow-matching MSE. actions (B, H, A) = x1 (data). timesteps (B,) and noise (B, H, A) may
        be given to reproduce a value exactly; otherwise they are drawn from `generator` (t by
        sample_timesteps(schedule), noise N(0, I))."""
        if schedule not in ("uniform", "beta"):
            raise ValueError(f"schedule must be 'uniform' or 'beta', got {schedule!r}")
        B = actions.shape[0]
        x1 = actions.to(self.action_pos_embed.dtype)
        if timesteps is None:
            timesteps = sample_timesteps(B, schedule, generator, device=x1.device)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        if tuple(noise.shape) != tuple(x1.shape) or tuple(timesteps.shape) != (B,):
            raise ValueError(f"noise must be {tuple(x1.shape)} and timesteps {(B,)}, got {tuple(noise.shape)} and "
                             f"{tuple(timesteps.shape)}")
        timesteps, noise = timesteps.to(x1.device), noise.to(x1.device, x1.dtype)
        t = timesteps.to(x1.dtype)[:, None, None]  # (B, 1, 1)
        x_t = t * x1 + (1 - t) * noise  # t = 0: pure noise, t = 1: data
        v = self(vl_tokens, deep, vl_mask, state, x_t, timesteps)
        return F.mse_loss(v, x1 - noise)

    @torch.no_grad()
    def sample(self, vl_tokens, deep, vl_mask, state, steps: int = 1, method: str = "euler", noise=None,
               generator: torch.Generator = None, check_mask: bool = True) -> torch.Tensor:
        """Integrate from x0 = noise (default N(0, I) from `generator`) at t = 0 to t = 1 -> actions
        (B, H, A). The VL context is encoded once and reused by every velocity call. Call
        .eval() first (dropout)."""
        cfg = self.cfg
        ctx = self.encode_context(vl_tokens, deep, vl_mask, check_mask)
        B = vl_tokens.shape[0]
        shape = (B, cfg.action_horizon, cfg.action_dim)
        dtype = self.action_pos_embed.dtype
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=vl_tokens.device, dtype=dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return integrate(lambda x, t: self.velocity(ctx, state, x, t), noise.to(dtype), steps, method)
