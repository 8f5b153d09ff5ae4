"""Tests for dit.py: the head against explicit maths, samplers, masking (tiny fp32 configs, CPU)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import ActionHead, AdaLN, Attention, DiTConfig, SinusoidalEmbedding, integrate, masked_mean, sample_timesteps

TINY = dict(hidden_dim=32, num_layers=2, num_heads=4, action_dim=6, action_horizon=5, num_future_tokens=3,
            qwen_hidden_size=12, projection_dim=20, dropout=0.1)


def tiny_head(seed=0, randomise=True, **kw):
    torch.manual_seed(seed)
    head = ActionHead(DiTConfig(**{**TINY, **kw}))
    if randomise:  # non-zero AdaLN etc. so every parameter shapes the output
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return head.eval()


def inputs(B=3, S=7, seed=1, cfg=DiTConfig(**TINY)):
    g = torch.Generator().manual_seed(seed)
    Q, A, H = cfg.qwen_hidden_size, cfg.action_dim, cfg.action_horizon
    vl = torch.randn(B, S, Q, generator=g)
    deep = torch.randn(B, S, 2 * Q, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, S - 2:] = False  # sample 0 is right-padded
    state = torch.randn(B, A, generator=g)
    x_t = torch.randn(B, H, A, generator=g)
    t = torch.rand(B, generator=g)
    return vl, deep, mask, state, x_t, t


# --- explicit-ops reference of the whole head -----------------------------------------------------

def ref_time(t, D):
    half = D // 2
    rows = []
    for tv in t.tolist():
        f = [math.exp(-i * math.log(10000.0) / (half - 1)) for i in range(half)]
        rows.append([math.sin(tv * fi) for fi in f] + [math.cos(tv * fi) for fi in f])
    return torch.tensor(rows, dtype=torch.float64)


def ref_ln(x, w=None, b=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if w is None else y * w + b


def silu(x):
    return x * torch.sigmoid(x)


def ref_attn(x, src, p, pre, nh, keymask=None):
    W, b, Wo, bo = (p[pre + n] for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"))
    B, T, D = x.shape
    S, hs = src.shape[1], D // nh
    q = (x @ W[:D].T + b[:D]).view(B, T, nh, hs).transpose(1, 2)
    k = (src @ W[D:2 * D].T + b[D:2 * D]).view(B, S, nh, hs).transpose(1, 2)
    v = (src @ W[2 * D:].T + b[2 * D:]).view(B, S, nh, hs).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(hs)
    if keymask is not None:
        s = s.masked_fill(~keymask[:, None, None, :], float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, D)
    return o @ Wo.T + bo


def ref_adaln(x, c, p, pre):
    D = x.shape[-1]
    mod = silu(c) @ p[pre + "cond_proj.1.weight"].T + p[pre + "cond_proj.1.bias"]
    scale, shift = mod[:, :D], mod[:, D:]
    return ref_ln(x) * (1 + scale[:, None]) + shift[:, None]


def ref_head(head, vl, deep, mask, state, x_t, t):
    cfg = head.cfg
    p = {k: v.double() for k, v in head.state_dict().items()}
    vl, deep, state, x_t = vl.double(), deep.double(), state.double(), x_t.double()
    lin = lambda x, n: x @ p[n + ".weight"].T + p[n + ".bias"]  # noqa: E731
    c = lin(silu(lin(ref_time(t, cfg.hidden_dim), "time_embed.1")), "time_embed.3")
    h = silu(ref_ln(lin(vl, "qwen_projection.0"), p["qwen_projection.1.weight"], p["qwen_projection.1.bias"]))
    ctx = lin(h, "qwen_projection.3")
    m = mask.double()[..., None]
    pooled = (deep * m).sum(1) / m.sum(1)
    ctx = ctx + lin(pooled, "deepstack_projection")[:, None]
    st = lin(silu(ref_ln(lin(state, "state_encoder.0"), p["state_encoder.1.weight"], p["state_encoder.1.bias"])),
             "state_encoder.3")
    act = silu(ref_ln(lin(x_t, "action_encoder.0"), p["action_encoder.1.weight"], p["action_encoder.1.bias"]))
    act = act + p["action_pos_embed"] + c[:, None]
    x = torch.cat([st[:, None], p["future_tokens"].expand(len(vl), -1, -1), act], 1)
    for i in range(cfg.num_layers):
        b = f"dit_blocks.{i}."
        h = ref_adaln(x, c, p, b + "norm1.")
        x = x + ref_attn(h, h, p, b + "self_attn.", cfg.num_heads)
        x = x + ref_attn(ref_adaln(x, c, p, b + "norm2."), ctx, p, b + "cross_attn.", cfg.num_heads, mask)
        h = lin(ref_adaln(x, c, p, b + "norm3."), b + "ffn.0")
        x = x + lin(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), b + "ffn.3")
    x = ref_adaln(x, c, p, "final_norm.")[:, -cfg.action_horizon:]
    return lin(silu(lin(x, "action_decoder.0")), "action_decoder.2")


# --- tests ----------------------------------------------------------------------------------------

def test_time_embedding_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(SinusoidalEmbedding(16)(t).double(), ref_time(t, 16), rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_matches_torch_mha(use_mask):
    torch.manual_seed(0)
    D, nh = 32, 4
    ours = Attention(D, nh, dropout=0.1)
    nn.init.normal_(ours.in_proj_weight, std=0.3)
    nn.init.normal_(ours.in_proj_bias, std=0.3)
    mha = nn.MultiheadAttention(D, nh, dropout=0.1, batch_first=True)
    mha.load_state_dict(ours.state_dict(), strict=True)  # identical layout and key names
    ours.eval(), mha.eval()
    x, src = torch.randn(3, 5, D), torch.randn(3, 9, D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, :3] = False
    # self-attention
    torch.testing.assert_close(ours(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    # cross-attention with precomputed k/v and the key-padding mask (MHA's mask is True = ignore)
    got = ours(x, kv=ours.project_kv(src), mask=mask[:, None, None, :] if use_mask else None)
    want = mha(x, src, src, key_padding_mask=~mask if use_mask else None, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # in train mode dropout acts on the attention weights: outputs become random, as MHA's do
    ours.train()
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(2)
    assert (a - ours(x)).abs().max() > 1e-3


def test_head_matches_explicit_reference():
    head = tiny_head()
    vl, deep, mask, state, x_t, t = inputs()
    got = head(vl, deep, mask, state, x_t, t)
    assert got.shape == (3, 5, 6)
    want = ref_head(head, vl, deep, mask, state, x_t, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_adaln_zero_init_is_plain_layernorm():
    head = tiny_head(randomise=False)
    norms = [m for m in head.modules() if isinstance(m, AdaLN)]
    assert len(norms) == 3 * 2 + 1
    x, c = torch.randn(2, 4, 32), 10 * torch.randn(2, 32)
    for n in norms:
        assert torch.count_nonzero(n.cond_proj[1].weight) == 0 and torch.count_nonzero(n.cond_proj[1].bias) == 0
        # modulation is the identity whatever the time embedding: x * (1 + 0) + 0
        torch.testing.assert_close(n(x, c), F.layer_norm(x, (32,)), rtol=0, atol=0)
    # so at init each block is the plain pre-LN residual block: check block 0 with its
    # norms swapped for LayerNorm
    blk = head.dit_blocks[0]
    kv = blk.cross_attn.project_kv(torch.randn(2, 3, 32))
    ln = lambda z: F.layer_norm(z, (32,))  # noqa: E731
    y = x + blk.self_attn(ln(x))
    y = y + blk.cross_attn(ln(y), kv=kv)
    y = y + blk.ffn(ln(y))
    torch.testing.assert_close(blk(x, c, kv, None), y, rtol=0, atol=0)
    # and the init is finite and non-degenerate elsewhere
    vl, deep, mask, state, x_t, t = inputs()
    v = head(vl, deep, mask, state, x_t, t)
    assert torch.isfinite(v).all() and v.std() > 1e-3


@pytest.mark.parametrize("garbage", ["randn", "nan"])
def test_batch_invariance(garbage):
    head = tiny_head()
    vl, deep, mask, state, x_t, t = inputs(B=1, S=4, seed=3)
    alone = head(vl, deep, torch.ones(1, 4, dtype=torch.bool), state, x_t, t)
    # inside a batch of 3 with S = 9, its 4 real tokens LEFT-padded by garbage,
    # next to unrelated samples
    vb, db, mb, sb, xb, tb = inputs(B=3, S=9, seed=4)
    fill = float("nan") if garbage == "nan" else 100.0
    vb[1], db[1] = fill * torch.randn(9, 12), fill * torch.randn(9, 24)
    vb[1, 5:], db[1, 5:] = vl[0], deep[0]
    mb[1] = torch.tensor([False] * 5 + [True] * 4)
    sb[1], xb[1], tb[1] = state[0], x_t[0], t[0]
    batched = head(vb, db, mb, sb, xb, tb)
    torch.testing.assert_close(batched[1:2], alone, rtol=0, atol=1e-5)
    assert torch.isfinite(batched).all()


def test_masked_mean_and_bad_inputs():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), 9.0]]])
    torch.testing.assert_close(masked_mean(x, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))
    head = tiny_head()
    vl, deep, mask, state, x_t, t = inputs()
    with pytest.raises(ValueError, match="no real token"):
        head(vl, deep, torch.zeros_like(mask), state, x_t, t)
    with pytest.raises(ValueError, match="vl_mask must be bool"):
        head(vl, deep, mask.float(), state, x_t, t)
    with pytest.raises(ValueError, match="deep must have shape"):
        head(vl, deep[..., :12], mask, state, x_t, t)
    with pytest.raises(ValueError, match="x_t"):
        head(vl, deep, mask, state, x_t[:, :4], t)


def test_no_deep_features_variant():
    head = tiny_head(deep_features=False)
    assert not any(k.startswith("deepstack_projection") for k in head.state_dict())
    vl, deep, mask, state, x_t, t = inputs()
    assert head(vl, None, mask, state, x_t, t).shape == (3, 5, 6)
    with pytest.raises(ValueError, match="deep_features is False"):
        head(vl, deep, mask, state, x_t, t)


@pytest.mark.parametrize("method,steps", [("euler", 4), ("rk4", 3)])
def test_cached_context_sampler_equals_recompute(method, steps):
    head = tiny_head()
    vl, deep, mask, state, x_t, _ = inputs()
    x0 = torch.randn_like(x_t)
    got = head.sample(vl, deep, mask, state, steps=steps, method=method, noise=x0)
    # the same solver but the context recomputed from the raw VL tokens at every velocity call
    want = integrate(lambda x, t: head(vl, deep, mask, state, x, torch.full((3,), t)), x0, steps, method)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - x0).abs().max() > 1e-2


def test_euler_one_step_and_generator():
    head = tiny_head()
    vl, deep, mask, state, x_t, _ = inputs()
    x0 = torch.randn_like(x_t)
    got = head.sample(vl, deep, mask, state, steps=1, noise=x0)
    torch.testing.assert_close(got, x0 + head(vl, deep, mask, state, x0, torch.zeros(3)), rtol=0, atol=1e-6)
    # one RK4 step by hand, each stage a fresh forward
    v = lambda x, t: head(vl, deep, mask, state, x, torch.full((3,), t))  # noqa: E731
    k1 = v(x0, 0.0)
    k2 = v(x0 + 0.5 * k1, 0.5)
    k3 = v(x0 + 0.5 * k2, 0.5)
    k4 = v(x0 + k3, 1.0)
    got = head.sample(vl, deep, mask, state, steps=1, method="rk4", noise=x0)
    torch.testing.assert_close(got, x0 + (k1 + 2 * k2 + 2 * k3 + k4) / 6, rtol=0, atol=1e-6)
    a = head.sample(vl, deep, mask, state, steps=2, generator=torch.Generator().manual_seed(7))
    b = head.sample(vl, deep, mask, state, steps=2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="method"):
        head.sample(vl, deep, mask, state, steps=2, method="heun")


def test_rk4_analytic():
    # dx/dt = -x + t, x(0) = x0 is solved by x(t) = t - 1 + (x0 + 1) e^-t: x(1) = (x0 + 1) / e
    x0 = torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64)
    exact = (x0 + 1) * math.exp(-1.0)
    errs = []
    for n in (2, 4, 8):
        errs.append((integrate(lambda x, t: -x + t, x0, n, "rk4") - exact).abs().max().item())
    assert errs[-1] < 1e-5
    # 4th order: halving dt divides the error by ~16
    assert errs[0] / errs[1] > 12 and errs[1] / errs[2] > 12
    # the same system with Euler is only first order
    e_euler = [(integrate(lambda x, t: -x + t, x0, n, "euler") - exact).abs().max().item() for n in (64, 128)]
    assert 1.8 < e_euler[0] / e_euler[1] < 2.2


def test_loss_equals_manual():
    torch.manual_seed(0)
    head = tiny_head()
    vl, deep, mask, state, x1, _ = inputs()
    eps, t = torch.randn_like(x1), torch.tensor([0.0, 0.3, 1.0])
    got = head.loss(vl, deep, mask, state, x1, timesteps=t, noise=eps)
    x_t = t[:, None, None] * x1 + (1 - t[:, None, None]) * eps
    v = head(vl, deep, mask, state, x_t, t)
    want = ((v - (x1 - eps)) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # drawn t/noise: reproducible from the generator
    l1 = head.loss(vl, deep, mask, state, x1, generator=torch.Generator().manual_seed(3), schedule="beta")
    l2 = head.loss(vl, deep, mask, state, x1, generator=torch.Generator().manual_seed(3), schedule="beta")
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


def test_timestep_schedules():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, "uniform", g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    b = sample_timesteps(20000, "beta", g)
    # s ~ Beta(1.5, 1): E[s] = 0.6, so E[t] = 0.999 * 0.4; mass leans toward t = 0 (the noise side)
    assert 0 <= b.min() and b.max() <= 0.999 and abs(b.mean().item() - 0.3996) < 0.01
    assert (b < 0.5).float().mean() > 0.6
    with pytest.raises(ValueError, match="schedule"):
        sample_timesteps(3, "logit")


def test_tiny_head_overfits_fixed_batch():
    head = tiny_head(randomise=False, dropout=0.0).train()
    vl, deep, mask, state, x1, _ = inputs(B=4, seed=5)
    g = torch.Generator().manual_seed(0)
    eps, t = torch.randn(x1.shape, generator=g), torch.rand(4, generator=g)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = head.loss(vl, deep, mask, state, x1, timesteps=t, noise=eps)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_full_size_parameter_count_on_meta():
    with torch.device("meta"):
        head = ActionHead(DiTConfig())
    n = sum(p.numel() for p in head.parameters())
    assert n == 1_277_601_324  # the model card: "1.28B DiT"
    sd = head.state_dict()
    assert tuple(sd["dit_blocks.23.cross_attn.in_proj_weight"].shape) == (3 * 1536, 1536)
    assert tuple(sd["dit_blocks.0.norm1.cond_proj.1.weight"].shape) == (2 * 1536, 1536)
    assert tuple(sd["qwen_projection.0.weight"].shape) == (1024, 2560)
    assert tuple(sd["deepstack_projection.weight"].shape) == (1536, 5120)
    assert tuple(sd["action_pos_embed"].shape) == (1, 16, 1536) and tuple(sd["future_tokens"].shape) == (1, 4, 1536)
    assert tuple(sd["action_decoder.2.weight"].shape) == (44, 1536)


def test_meta_build_then_init_and_config_from_vla():
    mc = dict(diffusion_hidden_dim=32, num_diffusion_layers=2, num_diffusion_heads=4, action_dim=6, action_horizon=5,
              num_future_tokens=3, qwen_hidden_size=12, projection_dim=20, use_deepstack_features=True)
    cfg = DiTConfig.from_vla(mc)
    assert cfg == DiTConfig(**TINY)
    with torch.device("meta"):
        head = ActionHead(cfg)
    head.to_empty(device="cpu")
    head.init_weights()
    assert all(torch.isfinite(p).all() for p in head.parameters())
    assert torch.count_nonzero(head.final_norm.cond_proj[1].weight) == 0
    ref = tiny_head(randomise=False)
    head.load_state_dict(ref.state_dict(), strict=True)
    vl, deep, mask, state, x_t, t = inputs()
    torch.testing.assert_close(head.eval()(vl, deep, mask, state, x_t, t), ref(vl, deep, mask, state, x_t, t))
