"""Tests for lora.py; peft's LoraModel is the numerical reference (tests only)."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    reset_lora_parameters,
    save_adapter,
    set_lora_disabled,
    unmerge_lora,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    """Attention- and MLP-shaped toy block: the same leaf names as a Qwen decoder layer."""

    def __init__(self, d=16, nh=2):
        super().__init__()
        self.nh = nh
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.nh, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.o_proj(a)
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Tiny(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 5)  # not a target: must stay a plain, frozen Linear

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_pair(rank=4, alpha=8, dropout=0.0, seed=0):
    """(ours, peft) with identical base and LoRA weights; B random so the LoRA path is exercised."""
    torch.manual_seed(seed)
    base = Tiny()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                                   target_modules=TARGETS))
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS, rank=rank, alpha=alpha, dropout=dropout)
    for fqn, m in lora_modules(ours).items():
        pm = ref.base_model.model.get_submodule(fqn)
        with torch.no_grad():
            pm.lora_B["default"].weight.normal_(0, 0.3)
            m.lora_A.copy_(pm.lora_A["default"].weight)
            m.lora_B.copy_(pm.lora_B["default"].weight)
    return ours, ref


def test_keys_and_frozen():
    torch.manual_seed(0)
    m = Tiny()
    base_keys = set(m.state_dict())
    replaced = apply_lora(m, TARGETS, rank=4, alpha=8)
    assert len(replaced) == 14 and "head" not in replaced and "layers.0.q_proj" in replaced
    keys = set(m.state_dict())
    # base keys unchanged (q_proj.weight, not q_proj.base_layer.weight); the only
    # additions are lora_A/lora_B
    assert base_keys <= keys
    assert keys - base_keys == {f"{f}.lora_{ab}" for f in replaced for ab in "AB"}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == keys - base_keys
    assert isinstance(m.head, nn.Linear) and not isinstance(m.head, LoRALinear)
    assert tuple(m.layers[0].gate_proj.lora_A.shape) == (4, 16) and tuple(m.layers[0].gate_proj.lora_B.shape) == (32, 4)


def test_init_equals_base_and_peft_init():
    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS, rank=4, alpha=8, dropout=0.1)
    ours.eval()
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)
    a = ours.layers[0].q_proj.lora_A
    assert torch.count_nonzero(ours.layers[0].q_proj.lora_B) == 0
    # kaiming_uniform(a=sqrt(5)) on (rank, in): bound = 1/sqrt(in)
    assert a.abs().max() <= 1 / 16 ** 0.5 and a.std() > 0.05


def test_callable_target_and_errors():
    m = Tiny()
    got = apply_lora(m, lambda fqn, mod: fqn.startswith("layers.1.") and fqn.endswith("proj"), rank=2, alpha=2)
    assert got == [f"layers.1.{n}" for n in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]]
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, ["q_proj"], rank=2, alpha=2)
    with pytest.raises(TypeError, match="layers.0"):
        apply_lora(Tiny(), lambda fqn, mod: fqn == "layers.0", rank=2, alpha=2)
    with pytest.raises(ValueError, match="no module matched"):
        apply_lora(Tiny(), ["nope_proj"], rank=2, alpha=2)


def test_forward_and_grad_parity_with_peft():
    ours, ref = make_pair()
    x = torch.randn(3, 7, 16)
    y, yr = ours(x), ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    n = 0
    for fqn, m in lora_modules(ours).items():
        pm = ref.base_model.model.get_submodule(fqn)
        torch.testing.assert_close(m.lora_A.grad, pm.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.lora_B.grad, pm.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
        assert m.weight.grad is None and pm.base_layer.weight.grad is None  # base frozen in both
        n += 1
    assert n == 14
    # LoRA actually changes the output (B random): otherwise this parity would be vacuous
    set_lora_disabled(ours, True)
    assert (ours(x) - y).abs().max() > 1e-2
    set_lora_disabled(ours, False)
    torch.testing.assert_close(ours(x), y, rtol=0, atol=0)


def test_dropout_parity_with_peft_same_seed():
    # dropout sits on the LoRA input only; with the same RNG stream peft and ours
    # draw the same masks in order
    ours, ref = make_pair(dropout=0.3)
    ours.train(), ref.train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(123)
    y = ours(x)
    torch.manual_seed(123)
    yr = ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    ours.eval()
    assert (ours(x) - y).abs().max() > 1e-3  # dropout really was active in train mode


def test_bf16_base_fp32_adapter_matches_peft():
    # peft's autocast_adapter_dtype keeps adapters of a bf16 base in fp32; ours does
    # the same, so outputs agree
    torch.manual_seed(0)
    base = Tiny().to(torch.bfloat16)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS, rank=4, alpha=8)
    for fqn, m in lora_modules(ours).items():
        pm = ref.base_model.model.get_submodule(fqn)
        assert m.lora_A.dtype == pm.lora_A["default"].weight.dtype == torch.float32
        assert m.weight.dtype == torch.bfloat16
        with torch.no_grad():
            pm.lora_B["default"].weight.normal_(0, 0.3)
            m.lora_A.copy_(pm.lora_A["default"].weight)
            m.lora_B.copy_(pm.lora_B["default"].weight)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_merge_unmerge_idempotent():
    ours, _ = make_pair()
    ours.eval()
    x = torch.randn(2, 5, 16)
    y = ours(x)
    w0 = ours.layers[0].q_proj.weight.detach().clone()
    merge_lora(ours)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    w1 = ours.layers[0].q_proj.weight.detach().clone()
    assert (w1 - w0).abs().max() > 1e-3
    merge_lora(ours)  # second merge must not add the delta again
    torch.testing.assert_close(ours.layers[0].q_proj.weight, w1, rtol=0, atol=0)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_lora_disabled(ours, True)
        ours(x)
    set_lora_disabled(ours, False)
    unmerge_lora(ours)
    unmerge_lora(ours)
    torch.testing.assert_close(ours.layers[0].q_proj.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        m = Tiny()
        replaced = apply_lora(m, TARGETS, rank=4, alpha=4)
    assert all(p.is_meta for p in m.parameters())
    assert len(replaced) == 14
    m.to_empty(device="cpu")
    reset_lora_parameters(m)
    for mod in lora_modules(m).values():
        assert torch.count_nonzero(mod.lora_B) == 0 and torch.isfinite(mod.lora_A).all() and mod.lora_A.std() > 0
    # the base keys load with assign=True as for the un-adapted model
    sd = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, strict=True, assign=True)
    torch.testing.assert_close(m.layers[1].down_proj.weight, sd["layers.1.down_proj.weight"])


def test_save_load_adapter_roundtrip(tmp_path):
    ours, _ = make_pair()
    ours.eval()
    x = torch.randn(2, 4, 16)
    y = ours(x)
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    save_adapter(ours, tmp_path / "ad", cfg)
    assert set(load_file(str(tmp_path / "ad" / "adapter.safetensors"))) == set(lora_state_dict(ours))
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["rank"] == 4
    assert not list((tmp_path / "ad").glob("*.tmp"))
    torch.manual_seed(5)
    fresh = copy.deepcopy(ours)
    reset_lora_parameters(fresh)
    assert (fresh(x) - y).abs().max() > 1e-3
    got = load_adapter(fresh, tmp_path / "ad")
    assert got == cfg
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_load_adapter_errors(tmp_path):
    ours, _ = make_pair()
    save_adapter(ours, tmp_path / "ad", LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=TARGETS))
    f = tmp_path / "ad" / "adapter.safetensors"
    sd = load_file(str(f))
    bad = dict(sd)
    bad["layers.0.q_proj.lora_C"] = bad.pop("layers.0.k_proj.lora_A")
    save_file(bad, str(f))
    with pytest.raises(ValueError) as e:
        load_adapter(ours, tmp_path / "ad")
    assert "layers.0.k_proj.lora_A" in str(e.value) and "layers.0.q_proj.lora_C" in str(e.value)
    bad = dict(sd)
    bad["layers.1.up_proj.lora_B"] = torch.zeros(31, 4)
    save_file(bad, str(f))
    with pytest.raises(ValueError, match=r"shape mismatch for layers.1.up_proj.lora_B"):
        load_adapter(ours, tmp_path / "ad")
    save_file(sd, str(f))
    other = copy.deepcopy(ours)
    for m in lora_modules(other).values():
        m.alpha, m.scale = 16, 4.0
    with pytest.raises(ValueError, match="rank/alpha"):
        load_adapter(other, tmp_path / "ad")
    load_adapter(ours, tmp_path / "ad")  # the intact file still loads
    with pytest.raises(ValueError, match="rank/alpha"):
        save_adapter(ours, tmp_path / "x", LoRAConfig(rank=8, alpha=8))


def test_load_peft_save_pretrained_folder(tmp_path):
    _, ref = make_pair(rank=4, alpha=8)
    ref.save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(0)
    ours = Tiny()  # same seed as make_pair -> same base weights
    apply_lora(ours, TARGETS, rank=4, alpha=8)
    ref.eval(), ours.eval()
    x = torch.randn(2, 6, 16)
    assert (ours(x) - ref(x)).abs().max() > 1e-3
    cfg = load_peft_adapter(ours, tmp_path / "peft")
    assert cfg["r"] == 4
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_load_peft_errors(tmp_path):
    _, ref = make_pair(rank=4, alpha=8)
    ref.save_pretrained(str(tmp_path / "peft"))
    # rank mismatch
    m = Tiny()
    apply_lora(m, TARGETS, rank=2, alpha=8)
    with pytest.raises(ValueError, match="rank/alpha"):
        load_peft_adapter(m, tmp_path / "peft")
    # our model has LoRA on fewer modules than the adapter: the extra adapter
    # keys are listed as unplaced
    m = Tiny()
    apply_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8)
    with pytest.raises(ValueError) as e:
        load_peft_adapter(m, tmp_path / "peft")
    assert "unplaced" in str(e.value) and "layers.0.gate_proj.lora_A" in str(e.value)
    # more LoRA modules in our model than in the adapter: missing, by name
    m = Tiny()
    apply_lora(m, TARGETS + ["head"], rank=4, alpha=8)
    with pytest.raises(ValueError) as e:
        load_peft_adapter(m, tmp_path / "peft")
    assert "missing" in str(e.value) and "head.lora_B" in str(e.value)
    # unsupported config features are refused by name
    m = Tiny()
    apply_lora(m, TARGETS, rank=4, alpha=8)
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_rslora"):
        load_peft_adapter(m, tmp_path / "peft")
    # a key outside target_modules
    cfg["use_rslora"] = False
    cfg["target_modules"] = ["q_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layers.0.k_proj"):
        load_peft_adapter(m, tmp_path / "peft")


def test_load_peft_with_rename(tmp_path):
    _, ref = make_pair(rank=4, alpha=8)
    ref.save_pretrained(str(tmp_path / "peft"))

    class Wrapped(nn.Module):  # our tree nests the same model one level deeper
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = Tiny()

    w = Wrapped()
    apply_lora(w, TARGETS, rank=4, alpha=8)
    load_peft_adapter(w, tmp_path / "peft", rename=lambda f: "backbone." + f)
    ref.eval()
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(w.backbone(x), ref(x), rtol=1e-5, atol=1e-6)
