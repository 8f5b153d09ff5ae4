"""The VLA (model.py): config handling, end-to-end forward/backward, batch invariance, the
released checkpoint layout (peft names) loading exactly, conversion round trip, and the model
card's parameter counts."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
from model import PRESETS, VLAConfig, VLAModel

# Every field of the released config.yaml model_config, with the released values.
RELEASED_MODEL_CONFIG = {
    "qwen_model_name": "Qwen/Qwen3-VL-4B-Instruct", "qwen_hidden_size": 2560, "use_intermediate_hidden": True,
    "hidden_layer_fraction": 0.5, "hidden_layer_index": 18, "use_early_exit": True, "use_deepstack_features": True,
    "use_flash_attention": True, "projection_dim": 1024, "action_dim": 44, "diffusion_hidden_dim": 1536,
    "num_diffusion_layers": 24, "num_diffusion_heads": 24, "num_future_tokens": 4, "action_horizon": 16,
    "num_frames": 4, "use_lora": True, "lora_rank": 128, "lora_alpha": 128, "lora_dropout": 0.05,
    "freeze_vision_encoder": True, "freeze_qwen_layers": True, "use_thinking_mode": False, "diffusion_steps": 1,
    "init_from_current_pose": False, "diffusion_dropout": 0.1, "image_size": 224, "use_dynamic_resolution": False,
    "action_chunking": True,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def tiny_config(**kw):
    cfg = dict(PRESETS["tiny"])
    cfg.update(kw)
    return VLAConfig(**cfg)


def tiny_lora_config(**kw):
    # the released structure at toy size: LoRA on the LLM, frozen vision and base weights
    return tiny_config(use_lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0, freeze_vision_encoder=True,
                       freeze_qwen_layers=True, **kw)


def frames(seed, n=4, size=224):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# --------------------------------------------------------------------------------------------------


def test_config_accepts_every_released_field_and_rejects_unknown():
    cfg = VLAConfig(**RELEASED_MODEL_CONFIG)
    # int(36 * 0.5): layers 0..17, tap 17, as the original computes it
    assert cfg.kept_layers(36) == 18
    with pytest.raises(TypeError, match="not_a_field"):
        VLAConfig(**{**RELEASED_MODEL_CONFIG, "not_a_field": 1})
    with pytest.raises(ValueError, match="init_from_current_pose"):
        VLAConfig(**{**RELEASED_MODEL_CONFIG, "init_from_current_pose": True})


def test_describe_reproduces_the_model_card():
    counts = M.main(["describe", "--preset", "mimic-4b"])
    assert round(counts["llm (truncated)"] / 1e9, 1) == 2.2
    assert round(counts["vision"] / 1e6) == 415 or abs(counts["vision"] / 1e6 - 415) < 5
    assert round(counts["dit head"] / 1e9, 2) == 1.28
    assert counts["lora"] == 7_340_032 * 18  # 132.1M: 7,340,032 per 4B layer x 18
    assert round(counts["total"] / 1e9, 1) == 4.0


def test_tiny_forward_backward_and_predict_shapes():
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config(image_size=224))  # the released frame size
    imgs = [frames(0), frames(1)]
    texts = ["Task: walk. Instruction: Walk forward.", "Task: jump. Instruction: Jump up twice."]
    state = torch.randn(2, 44)
    actions = torch.randn(2, 16, 44)
    out = m(images=imgs, instructions=texts, actions=actions, robot_state=state)
    out["loss"].backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("action_head.") for n in trainable)
    assert all(p.grad is not None for n, p in m.named_parameters() if ".lora_A" in n)
    inputs = m.encode(imgs, texts)
    # 224x224 frames stay 224x224: 49 tokens each, as the released model saw them
    assert (inputs["input_ids"] == m.qwen_config.image_token_id).sum(1).tolist() == [4 * 49, 4 * 49]
    m.eval()
    acts = m(images=imgs, instructions=texts, robot_state=state, compute_loss=False)["actions"]
    assert acts.shape == (2, 16, 44)
    boxes = np.tile([10.0, 20.0, 150.0, 200.0], (4, 1))
    pred = m.predict(frames(2), boxes, "walk", "Walk.", np.zeros(22, np.float32))
    assert pred.shape == (16, 22) and np.all(np.abs(pred) <= np.pi + 1e-6)
    # the old call without boxes and task is an error that says what is missing, never
    # a silently different input
    with pytest.raises((TypeError, ValueError), match="boxes|missing"):
        m.predict(frames(2), "Task: walk. Instruction: Walk.", np.zeros(22, np.float32))
    with pytest.raises(ValueError, match="boxes are required"):
        m.predict(frames(2), None, "walk", "Walk.", np.zeros(22, np.float32))


def test_given_noise_and_timesteps_reproduce_exactly():
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config()).eval()
    imgs, texts = [frames(3)], ["Task: run. Instruction: Run."]
    state, actions = torch.randn(1, 44), torch.randn(1, 16, 44)
    t, noise = torch.rand(1), torch.randn(1, 16, 44)
    a = m(images=imgs, instructions=texts, actions=actions, robot_state=state, timesteps=t, noise=noise)["loss"]
    b = m(images=imgs, instructions=texts, actions=actions, robot_state=state, timesteps=t, noise=noise)["loss"]
    assert torch.equal(a, b)
    p1 = m(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    p2 = m(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    assert torch.equal(p1, p2)


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    # 64x64 frames (4 tokens each) keep 150 steps cheap on CPU
    m = VLAModel(tiny_config(image_size=64))
    imgs = [frames(i, size=64) for i in range(4)]
    texts = [f"Task: class {i}. Instruction: move {'fast' * i}." for i in range(4)]
    inputs = m.encode(imgs, texts)
    state = torch.randn(4, 44)
    actions = torch.randn(4, 16, 44)
    t = torch.rand(4)
    noise = torch.randn(4, 16, 44)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(150):
        loss = m(inputs=inputs, actions=actions, robot_state=state, timesteps=t, noise=noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_batch_invariance():
    """A sample alone vs inside a batch with a longer (padded) neighbour: same actions within 1e-5."""
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config()).eval()
    perturb_lora(m)
    imgs = [frames(5), frames(6)]
    texts = ["Task: a. Instruction: b.", "Task: a much longer class name. Instruction: " + "do it again " * 8]
    state = torch.randn(2, 44)
    noise = torch.randn(2, 16, 44)
    both = m(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    alone = m(images=imgs[:1], instructions=texts[:1], robot_state=state[:1], compute_loss=False,
              noise=noise[:1])["actions"]
    assert torch.allclose(both[:1], alone, atol=1e-5), (both[:1] - alone).abs().max()


def released_state_dict(model: VLAModel) -> dict:
    """Our weights renamed to the released checkpoint's layout: peft wrapper prefix, base_layer /
    lora_X.default names, plus the lm_head and final norm the early-exit model does not use."""
    sd = {}
    lora_fqns = {n.rsplit(".", 1)[0] for n in model.state_dict() if n.endswith(".lora_A")}
    for k, v in model.state_dict().items():
        if not k.startswith("qwen_model."):
            sd[k] = v.clone()
            continue
        rest = k[len("qwen_model."):]
        mod, _, leaf = rest.rpartition(".")
        if "qwen_model." + mod in lora_fqns:
            leaf = {"weight": "base_layer.weight", "bias": "base_layer.bias", "lora_A": "lora_A.default.weight",
                    "lora_B": "lora_B.default.weight"}[leaf]
        sd[f"qwen_model.base_model.model.{mod}.{leaf}"] = v.clone()
    D, V = model.qwen_config.text.hidden_size, model.qwen_config.text.vocab_size
    sd["qwen_model.base_model.model.model.language_model.norm.weight"] = torch.ones(D)
    sd["qwen_model.base_model.model.lm_head.weight"] = torch.randn(V, D)
    return {"module." + k: v for k, v in sd.items()}


def test_released_layout_loads_exactly(tmp_path):
    torch.manual_seed(0)
    src = VLAModel(tiny_lora_config()).eval()
    perturb_lora(src)
    released = released_state_dict(src)
    assert any(".lora_B.default.weight" in k for k in released)
    assert any(".base_layer.weight" in k for k in released)
    # the model card's snippet: strip module., load_state_dict(strict=False) ->
    # nothing unplaced, no warning
    torch.manual_seed(1)
    dst = VLAModel(tiny_lora_config()).eval()
    state_dict = {k.removeprefix("module."): v for k, v in released.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dst.load_state_dict(state_dict, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    imgs, texts = [frames(7)], ["Task: kick. Instruction: Kick."]
    state, noise = torch.randn(1, 44), torch.randn(1, 16, 44)
    a = src(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    b = dst(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    assert torch.equal(a, b)


def test_released_layout_reports_extra_and_missing_keys_by_name():
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config())
    sd = {k.removeprefix("module."): v for k, v in released_state_dict(m).items()}
    gone = "qwen_model.base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.default.weight"
    del sd[gone]
    sd["action_head.not_a_real_weight"] = torch.zeros(3)
    with pytest.raises(KeyError) as e:
        m.load_state_dict(sd)  # strict by default: our loader raises
    msg = str(e.value)
    assert "action_head.not_a_real_weight" in msg and "language_model.layers.0.mlp.up_proj.lora_A" in msg
    with pytest.warns(UserWarning, match="not_a_real_weight"):  # the card's strict=False call warns loudly
        m.load_state_dict(sd, strict=False)
    bad = dict(sd)
    bad.pop("action_head.not_a_real_weight")
    bad["action_head.future_tokens"] = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="future_tokens"):
        m.load_state_dict(bad, strict=False)


def test_save_pretrained_trainable_only(tmp_path):
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config())
    perturb_lora(m)
    m.save_pretrained(tmp_path / "full")
    m.save_pretrained(tmp_path / "small", trainable_only=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "small" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(m.trainable_state_dict())
    base = VLAModel.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        for n, p in base.named_parameters():
            if ".lora_B" in n:
                p.zero_()
    back = VLAModel.from_pretrained(tmp_path / "small", base=base)
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
