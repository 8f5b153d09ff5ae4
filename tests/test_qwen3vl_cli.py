"""qwen3vl.py's command line on a tiny checkpoint folder written in the test: describe and chat."""

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import qwen3vl
import qwen3vl_processor
from model import QWEN3VL_PREPROCESSOR, TINY_QWEN


def test_describe_4b_prints_the_known_total(capsys):
    qwen3vl.main(["describe", "--preset", "4B"])
    out = capsys.readouterr().out
    assert "4,437,815,808" in out  # tied 4B, no lm_head


def test_chat_on_a_tiny_folder(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = qwen3vl.Qwen3VLConfig.from_hf(TINY_QWEN)
    model = qwen3vl.Qwen3VL(cfg)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    qwen3vl_processor.byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN3VL_PREPROCESSOR))
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(img)
    qwen3vl.main(["chat", "--model", str(tmp_path), "--image", str(img), "--prompt", "What is this?",
                  "--max-new-tokens", "8", "--dtype", "fp32", "--device", "cpu"])
    reply = capsys.readouterr().out
    # a random model says random bytes; the same greedy call through the API must give the same text
    proc = qwen3vl_processor.Qwen3VLProcessor.from_pretrained(tmp_path)
    loaded = qwen3vl.Qwen3VL.from_pretrained(tmp_path, dtype=torch.float32)
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    batch = proc(text=[text], images=[Image.open(img)], padding_side="left")
    batch.pop("mm_token_type_ids", None)
    new = loaded.generate(**batch, max_new_tokens=8, eos_token_id=[258, 256],
                          pad_token_id=proc.pad_token_id)
    assert reply == proc.decode(new[0].tolist(), skip_special_tokens=True) + "\n"  # print adds one newline
