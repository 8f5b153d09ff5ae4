"""The released checkpoint's conversion (convert.py): the config.yaml reader, pickle opt-in, and
the round trip checkpoint.pth + config.yaml -> safetensors folder -> the same outputs."""

import json
from dataclasses import asdict

import pytest
import torch
from test_model import frames, perturb_lora, released_state_dict, tiny_lora_config

import convert
from model import VLAModel


def write_released_files(tmp_path, model):
    cfg = json.loads(json.dumps(asdict(model.config)))
    ckpt = {"model_state_dict": released_state_dict(model), "step": 3, "optimizer_state_dict": {}}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    lines = ["model_config:"]
    for k, v in cfg.items():
        if k == "qwen_config":
            continue
        if isinstance(v, list):
            lines.append(f"  {k}:")
            lines += [f"    - {x}" for x in v]
        elif isinstance(v, str):
            lines.append(f'  {k}: "{v}"')
        else:
            lines.append(f"  {k}: {str(v).lower() if isinstance(v, bool) else v}")
    lines += ["training_config:", "  learning_rate: 1.0e-5", "  batch_size: 8  # per gpu"]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\n")
    return cfg


def test_yaml_reader_reads_model_config(tmp_path):
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config())
    cfg = write_released_files(tmp_path, m)
    got = convert.read_model_config_yaml(tmp_path / "config.yaml")
    assert got == {k: v for k, v in cfg.items() if k != "qwen_config"}


class _Opaque:  # an arbitrary class: safe (weights_only) unpickling must refuse it
    pass


def test_pickle_needs_explicit_opt_in(tmp_path):
    torch.save({"model_state_dict": {"a": torch.zeros(1)}, "cfg": _Opaque()}, tmp_path / "ckpt.pth")
    with pytest.raises(RuntimeError, match="allow_pickle"):
        convert.load_mimic_checkpoint(tmp_path / "ckpt.pth")
    assert set(convert.load_mimic_checkpoint(tmp_path / "ckpt.pth", allow_pickle=True)) == {"a"}


@pytest.mark.parametrize("merge", [False, True])
def test_convert_round_trip(tmp_path, merge):
    torch.manual_seed(0)
    src = VLAModel(tiny_lora_config()).eval()
    perturb_lora(src)
    # qwen_model_name "tiny": the toy backbone config needs no folder
    write_released_files(tmp_path, src)
    out = tmp_path / "out"
    argv = [str(tmp_path / "checkpoint.pth"), str(tmp_path / "config.yaml"), str(out)]
    convert.main(argv + (["--merge-lora"] if merge else []))
    dst = VLAModel.from_pretrained(out).eval()
    imgs, texts = [frames(8)], ["Task: roll. Instruction: Roll forward."]
    state, noise = torch.randn(1, 44), torch.randn(1, 16, 44)
    a = src(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    b = dst(images=imgs, instructions=texts, robot_state=state, compute_loss=False, noise=noise)["actions"]
    assert torch.allclose(a, b, atol=1e-5) if merge else torch.equal(a, b)
    assert dst.config.use_lora is (not merge)
