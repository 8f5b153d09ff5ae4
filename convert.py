"""
Convert the released MIMIC checkpoint (a pickled `checkpoint.pth` + its `config.yaml`) into a
folder that `VLAModel.from_pretrained` loads strictly: model.safetensors + config.json (+ the
Qwen3-VL processor files).

    python convert.py checkpoint.pth config.yaml mimic-4b/ --qwen /models/Qwen3-VL-4B-Instruct
    python -c "from model import VLAModel; m = VLAModel.from_pretrained('mimic-4b')"

The pickle is opened with torch.load(weights_only=True); full unpickling (which runs code from the
file) happens only with --allow-pickle. Every key is placed explicitly (model.map_released_keys)
or named in the error.
"""

import argparse
from pathlib import Path

import torch

from model import VLAConfig, VLAModel


def load_mimic_checkpoint(path, allow_pickle: bool = False) -> dict:
    """Read the released `checkpoint.pth` -> its `model_state_dict` with `module.` stripped.
    A fully unpickled file runs arbitrary code, so this uses torch.load(weights_only=True) unless
    the caller passes allow_pickle=True (the CLI's --allow-pickle) for a file they trust."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except Exception as e:  # weights_only refuses arbitrary objects (e.g. a pickled config class)
        if allow_pickle:
            raise
        raise RuntimeError(f"{path}: safe loading (weights_only=True) refused this pickle ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}). If you trust the file, pass allow_pickle=True / "
                           f"--allow-pickle to unpickle it fully.") from e
    sd = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict with 'model_state_dict', got {type(ckpt).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def read_model_config_yaml(path) -> dict:
    """The `model_config` mapping of the released config.yaml. A small reader for the YAML subset
    those files use (nested mappings by indentation, scalars, inline [a, b] and block `- a` lists,
    # comments), so no PyYAML."""
    root = {}
    stack = [(-1, root)]  # (indent, mapping) of the mappings enclosing the current line
    last = None  # (mapping, key) of the last key read: a block list belongs to it
    for raw in Path(path).read_text().splitlines():
        line = "" if raw.lstrip().startswith("#") else raw.split(" #")[0].rstrip()
        if not line.strip():
            continue
        indent, text = len(line) - len(line.lstrip()), line.strip()
        if text.startswith("- "):
            if last is None:
                raise ValueError(f"{path}: list item without a key: {raw!r}")
            owner, key = last
            if not isinstance(owner[key], list):
                owner[key] = []
            owner[key].append(yaml_scalar(text[2:].strip()))
            continue
        while stack[-1][0] >= indent:  # leave the mappings this line is not inside
            stack.pop()
        parent = stack[-1][1]
        key, _, val = (x.strip() for x in text.partition(":"))
        parent[key] = yaml_scalar(val) if val else {}
        if not val:
            stack.append((indent, parent[key]))
        last = (parent, key)
    cfg = root.get("model_config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: no model_config mapping found")
    return cfg


def yaml_scalar(v: str):
    """One YAML scalar or inline list: quoted strings, booleans, null, ints,
    floats, else the bare string."""
    if v.startswith("[") and v.endswith("]"):
        return [yaml_scalar(x.strip()) for x in v[1:-1].split(",") if x.strip()]
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "none", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def convert(checkpoint, config_yaml, out, qwen=None, merge_lora=False, allow_pickle=False) -> Path:
    """checkpoint.pth + config.yaml -> OUT/{model.safetensors, config.json, processor files}."""
    cfg = read_model_config_yaml(config_yaml)
    if qwen:
        cfg["qwen_model_name"] = qwen
    config = VLAConfig(**cfg)
    sd = load_mimic_checkpoint(checkpoint, allow_pickle=allow_pickle)
    with torch.device("meta"):
        model = VLAModel(config, load_backbone=False)
    model.load_state_dict(sd, strict=True, assign=True)  # raises naming every unplaced / missing key
    model.reinit_buffers()
    out = model.save_pretrained(out, merge_lora_weights=merge_lora)
    print(f"wrote {out}/model.safetensors and config.json ({sum(v.numel() for v in sd.values()):,} elements)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the released checkpoint.pth")
    ap.add_argument("config_yaml", help="the released config.yaml (its model_config)")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--qwen", default=None, help="local Qwen3-VL folder (config, tokenizer); default: the yaml's name")
    ap.add_argument("--merge-lora", action="store_true", help="fold the LoRA updates into the base weights")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="fully unpickle the checkpoint (runs code from the file: only for files you trust)")
    args = ap.parse_args(argv)
    return convert(args.checkpoint, args.config_yaml, args.out, args.qwen, args.merge_lora, args.allow_pickle)


if __name__ == "__main__":
    main()
