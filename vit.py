"""
The pieces shared by the pipeline's perception models, yolos.py (YOLOS person detector) and
vitpose.py (ViTPose / ViTPose+ pose estimator): the pre-norm ViT Block both are built from, the
strict loader of a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json)
and the reading of its preprocessor settings. Why one module: both are plain ViTs read from the
same kind of folder, so one block, one loader and one settings reader serve both; every setting the
transformers processors apply is honoured as they apply it, anything else refused by name.

  python -m pytest -q tests/test_yolos.py tests/test_vitpose.py  # parity with transformers
"""

import json
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# --------------------------------------------------------------------------------------------------
# Shared ViT pieces and the checkpoint loader


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the HF key layout)."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    """fc1 -> act -> fc2. ViTPose+ (experts > 1): fc2 gives the first dim - part features, and one
    of the experts, chosen per sample by its dataset index, gives the last part features from the
    same hidden activations."""

    def __init__(self, dim, hidden, act, experts=1, part_features=0):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim - part_features if experts > 1 else dim)
        self.experts = nn.ModuleList(nn.Linear(hidden, part_features) for _ in range(experts)) if experts > 1 else None

    def forward(self, x, expert=None):
        """x (B, T, C); expert: the dataset index (int: the whole batch, one matmul) or (B,) long
        indices (a mixed batch: each expert present runs on all rows, kept where selected, as the
        reference does)."""
        h = self.act(self.fc1(x))
        if self.experts is None:
            return self.fc2(h)
        if isinstance(expert, int):
            part = self.experts[expert](h)
        else:
            part = sum(self.experts[i](h) * (expert == i).view(-1, 1, 1) for i in torch.unique(expert).tolist())
        return torch.cat([self.fc2(h), part], -1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim, heads, hidden, act, eps, qkv_bias=True, experts=1, part_features=0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act, experts, part_features)

    def forward(self, x, expert=None):
        x = x + self.attn(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x), expert)


# Our parameter names -> the HF checkpoint's, by fragment replacement in this order (the only
# renames; the rest of each key is the HF name verbatim).
TRUNK_RENAMES = ((".patch_embed.", ".embeddings.patch_embeddings.projection."),
                 (".cls_token", ".embeddings.cls_token"),
                 (".detection_tokens", ".embeddings.detection_tokens"),
                 (".position_embeddings", ".embeddings.position_embeddings"),
                 (".mid_position_embeddings", ".encoder.mid_position_embeddings"),
                 (".blocks.", ".encoder.layer."), (".attn.proj.", ".attention.output.dense."),
                 (".attn.", ".attention.attention."))


def hf_key(name, renames):
    k = "." + name
    for ours, theirs in renames:
        k = k.replace(ours, theirs)
    return k[1:]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_weights(model, folder, renames, device="cpu", dtype=torch.float32):
    """Fill a meta-built `model` from folder/model.safetensors (or a sharded index). Missing,
    unexpected and mis-shaped keys raise, named as in the checkpoint."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    expected = model.state_dict(keep_vars=True)
    ours = {hf_key(n, renames): n for n in expected}  # checkpoint name -> ours
    sd, found = {}, set()
    for fn in files:
        with safe_open(str(folder / fn), framework="pt") as f:
            for k in f.keys():
                found.add(k)
                if k in ours:
                    t = f.get_tensor(k)
                    want = tuple(expected[ours[k]].shape)
                    if tuple(t.shape) != want:
                        raise ValueError(f"{folder}: {k} has shape {tuple(t.shape)}, the config implies {want}")
                    # integer buffers (BatchNorm's num_batches_tracked) keep their dtype
                    sd[ours[k]] = t.to(device, dtype if t.is_floating_point() else t.dtype)
    missing, unexpected = sorted(set(ours) - found), sorted(found - set(ours))
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def pick_fields(cls, d):
    """The dataclass fields of cls present in the HF dict d (HF names are ours where
    they coincide)."""
    return {f.name: d[f.name] for f in fields(cls) if f.name in d}


def load_config(config_cls, folder, *args):
    """config_cls.from_hf(config.json, preprocessor_config.json or {}, *args); a refused setting's
    error names the folder."""
    folder, p = Path(folder), Path(folder) / "preprocessor_config.json"
    pre = read_json(p) if p.is_file() else {}
    try:
        return config_cls.from_hf(read_json(folder / "config.json"), pre, *args)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None


# preprocessor_config.json keys that cannot change what the model sees: metadata, annotation
# handling (training only), hints about the caller's arrays (ours are always RGB uint8 (H, W, 3))
# and two that both reference processors read but never apply. Each config's from_hf honours
# every other key as its reference processor applies it, or refuses it; unknown keys are refused.
PRE_INERT = {"image_processor_type", "feature_extractor_type", "processor_class", "format",
             "do_convert_annotations", "do_convert_rgb", "data_format", "input_data_format",
             "device", "return_tensors", "disable_grouping", "image_seq_length",
             "do_center_crop", "crop_size"}
_KINDS = {"flag": "true or false", "number": "a number", "channels": "a number or 3 numbers",
          "resample": "a Pillow filter 0..5"}


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def setting(pre, key, default, kind):
    """pre[key] checked to be of `kind` (absent: the reference's default). null is refused: the
    reference processors read it as false for some keys and fail on others."""
    if key not in pre:
        return default
    v, num = pre[key], lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if kind == "flag" and isinstance(v, bool) or kind == "resample" and is_int(v) and 0 <= v <= 5:
        return v
    if kind == "number" and num(v):
        return float(v)
    if kind == "channels" and (num(v) or isinstance(v, list) and len(v) == 3 and all(map(num, v))):
        return tuple(float(x) for x in v) if isinstance(v, list) else (float(v),) * 3
    raise ValueError(f"preprocessor_config.json: {key}={v!r} is not {_KINDS[kind]}")


def size_hw(pre, key, default, square=True):
    """A {height, width} size as the reference reads it (an int is square when `square`, a list is
    [h, w]) -> (h, w)."""
    v = pre.get(key, default)
    d = {"height": v, "width": v} if is_int(v) and square else v
    d = {"height": d[0], "width": d[1]} if isinstance(d, list) and len(d) == 2 else d
    if isinstance(d, dict) and set(d) == {"height", "width"} and all(
            is_int(x) and x > 0 for x in d.values()):
        return d["height"], d["width"]
    raise ValueError(f"preprocessor_config.json: {key}={v!r} is not a {{height, width}} size")


def pixel_settings(pre, kind, known):
    """Refuse another model's processor and unknown keys; -> the rescale / normalise settings
    (both reference processors apply them alike) as our fields."""
    for k in ("image_processor_type", "feature_extractor_type"):
        if k in pre and not str(pre[k]).startswith(kind):
            raise ValueError(f"preprocessor_config.json: {k}={pre[k]!r} is not a {kind} processor")
    unknown = [f"{k}={v!r}" for k, v in sorted(pre.items())
               if k not in known and k not in PRE_INERT and not k.startswith("_")]
    if unknown:
        raise ValueError(f"preprocessor_config.json: unsupported setting(s) {', '.join(unknown)}")
    return {"do_rescale": setting(pre, "do_rescale", True, "flag"),
            "rescale_factor": setting(pre, "rescale_factor", 1 / 255, "number"),
            "do_normalize": setting(pre, "do_normalize", True, "flag"),
            "image_mean": setting(pre, "image_mean", IMAGENET_MEAN, "channels"),
            "image_std": setting(pre, "image_std", IMAGENET_STD, "channels")}



def normalize(u8, c, device):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) with the reference's exact arithmetic:
    x * rescale_factor in float64 stored as float32 (do_rescale), then (x - mean) / std in float32
    (do_normalize)."""
    x = torch.as_tensor(u8).to(device).permute(0, 3, 1, 2)
    x = x.double().mul(c.rescale_factor).float() if c.do_rescale else x.float()
    if not c.do_normalize:
        return x
    mean = torch.tensor(c.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(c.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (x - mean) / std


