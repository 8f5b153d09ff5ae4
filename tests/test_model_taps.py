"""Which backbone layers the VLA reads and which released keys it takes (model.py): the 4B's kept
layers, the deep features equal to the named layers' outputs of an independent full-depth backbone,
released keys at and above the early-exit cut, what trains and in which dtype. A randomly
initialised head cannot tell a wrong layer or a swapped concatenation from the right one, so these
are checked on the features themselves."""

import warnings
from dataclasses import replace

import pytest
import torch
from test_model import frames, perturb_lora, released_state_dict, tiny_config, tiny_lora_config

import qwen3vl
import qwen3vl_processor
from model import PRESETS, TINY_QWEN, VLAConfig, VLAModel, backbone_config


def test_4b_preset_keeps_layers_0_to_17():
    config = VLAConfig(**PRESETS["mimic-4b"])
    qcfg, _ = backbone_config(config)
    assert qcfg.text.num_hidden_layers == 36 and config.kept_layers(36) == 18  # int(36 * 0.5)


def test_deep_features_are_the_named_layers_of_the_full_backbone():
    """At the 4B's depth (36 layers, toy width): vl = layer 17's output and deep = concat(layer 8,
    layer 17), in that order, equal to the hidden states of a full-depth backbone holding the same
    weights (hidden_states[i + 1] is layer i's output); the mask is the attention mask."""
    qcfg = {**TINY_QWEN, "text_config": {**TINY_QWEN["text_config"], "num_hidden_layers": 36}}
    torch.manual_seed(0)
    m = VLAModel(tiny_config(image_size=64, qwen_config=qcfg)).eval()
    assert m.config.hidden_layer_fraction == VLAConfig(**PRESETS["mimic-4b"]).hidden_layer_fraction
    assert len(m.qwen_model.model.language_model.layers) == 18
    assert (m.kept, m.tap, m.deep_tap) == (18, 17, 8)
    texts = ["Task: walk. Instruction: Walk.",
             "Task: a longer class. Instruction: Jump twice, then walk away."]
    inputs = m.encode([frames(0, size=64), frames(1, size=64)], texts)
    assert not inputs["attention_mask"].all()  # the short prompt is padded
    full = qwen3vl.Qwen3VL(qwen3vl.Qwen3VLConfig.from_hf(qcfg)).eval()  # 36 layers + final norm
    res = full.load_state_dict(m.qwen_model.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert all(".layers." in k or k.endswith(".norm.weight") for k in res.missing_keys)
    with torch.no_grad():
        vl, deep, mask = m.features(inputs)
        # the full model through its own paths: pixel values, its own M-RoPE
        # index and placeholder search
        pv, grid = qwen3vl_processor.pixel_values_from_frames(inputs["frames"].flatten(0, 1), m.processor.image_config)
        hs = full(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pv,
                  image_grid_thw=grid, output_hidden_states=True).hidden_states
    assert len(hs) == 37
    torch.testing.assert_close(vl, hs[18], rtol=0, atol=1e-6)
    torch.testing.assert_close(deep, torch.cat([hs[9], hs[18]], dim=-1), rtol=0, atol=1e-6)
    assert not torch.allclose(hs[9], hs[10], atol=1e-3)  # neighbouring layers differ: teeth
    assert torch.equal(mask, inputs["attention_mask"].bool())


def _rename_layer(sd, src, dst):
    tag = f".language_model.layers.{src}."
    return {k.replace(tag, f".language_model.layers.{dst}."): v.clone()
            for k, v in sd.items() if tag in k}


def test_released_keys_at_and_above_the_cut_are_ignored_and_below_it_reported():
    """The released checkpoint holds all 36 decoder layers; the early-exit model builds layers
    0..kept-1. Keys of layers kept, kept + 1, ... (two-digit ones too) are ignored by design,
    silently even when strict; an unknown key inside a kept layer is still reported by name."""
    torch.manual_seed(0)
    src = VLAModel(tiny_lora_config()).eval()
    perturb_lora(src)
    kept = len(src.qwen_model.model.language_model.layers)
    assert kept == 2  # int(4 * 0.5)
    released = {k.removeprefix("module."): v for k, v in released_state_dict(src).items()}
    for layer in (kept, kept + 1, 10, 35):  # the cut itself, above it, two-digit indices
        released.update(_rename_layer(released, 0, layer))
    torch.manual_seed(1)
    dst = VLAModel(tiny_lora_config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dst.load_state_dict(released, strict=True)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    below = "qwen_model.base_model.model.model.language_model.layers.1.mlp.not_a_weight"
    with pytest.raises(KeyError, match="layers.1.mlp.not_a_weight"):
        dst.load_state_dict({**released, below: torch.zeros(2)}, strict=True)


def test_trainable_tensors_stay_fp32_under_a_bf16_backbone():
    """bf16 frozen backbone (the GPU recipe), fp32 master weights for what trains (LoRA adapters,
    the head); the loss comes out fp32 and reaches the adapters."""
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config(image_size=64), backbone_dtype=torch.bfloat16)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in m.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("action_head.") for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values()), \
        sorted(n for n, p in trainable.items() if p.dtype != torch.float32)[:5]
    assert all(p.dtype == torch.bfloat16 for n, p in frozen.items() if n.startswith("qwen_model."))
    out = m(images=[frames(0, size=64)], instructions=["Task: walk. Instruction: Walk."],
            actions=torch.randn(1, 16, 44), robot_state=torch.randn(1, 44))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(trainable[n].grad is not None for n in trainable if ".lora_A" in n)


@pytest.mark.parametrize("freeze_vision,freeze_llm",
                         [(True, True), (False, True), (True, False), (False, False)])
def test_freeze_flags_decide_what_trains(freeze_vision, freeze_llm):
    torch.manual_seed(0)
    m = VLAModel(replace(tiny_lora_config(), freeze_vision_encoder=freeze_vision,
                         freeze_qwen_layers=freeze_llm))
    named = dict(m.named_parameters())
    trains = {n for n, p in named.items() if p.requires_grad}
    assert all(n in trains for n in named if ".lora_" in n or n.startswith("action_head."))
    llm = {n for n in named if n.startswith("qwen_model.model.language_model.") and ".lora_" not in n}
    assert (llm <= trains, llm & trains == set()) == (not freeze_llm, freeze_llm)
    # the vision tower trains unless frozen, except the DeepStack levels that are added after the
    # tap layer (they cannot reach the features): with tap 1, level 0 trains and level 1 never
    vision = {n for n in named if n.startswith("qwen_model.model.visual.")
              and ".deepstack_merger_list." not in n}
    assert (vision <= trains, vision & trains == set()) == (not freeze_vision, freeze_vision)
    levels = {n.split(".")[4] for n in trains if ".deepstack_merger_list." in n}
    assert levels == (set() if freeze_vision else {"0"})
