"""
Perception for pipeline.py in plain PyTorch: a person detector (YOLOS) and a top-down 2D pose estimator (ViTPose /
ViTPose+), both plain ViTs sharing one pre-norm Block, loaded straight from the Hugging Face checkpoint folders
(config.json + model.safetensors [+ preprocessor_config.json]); no transformers at run time.

References:
  YOLOS: Fang et al. 2021, "You Only Look at One Sequence"; transformers models/yolos (modeling_yolos.py, the PIL
    image processor). Weights: hustvl/yolos-tiny | yolos-small | yolos-small-300 | yolos-base (Apache-2.0).
  ViTPose: Xu et al. 2022, "ViTPose" / "ViTPose+"; transformers models/vitpose + vitpose_backbone (modeling, the PIL
    image processor). Weights: usyd-community/vitpose-base-simple | vitpose-base | vitpose-plus-{small,base,large,huge}.
  Heatmap decoding: Zhang et al. 2020 (DARK) + Huang et al. 2020 (UDP), as in the reference post-processing.

Pre/post-processing reproduces the reference (PIL) processors: YOLOS = shortest/longest-edge resize to multiples of
16 with Pillow bilinear, ImageNet normalisation, zero padding to the batch max (the model sees the padding, as in the
reference), softmax over classes + no-object, boxes cxcywh -> xyxy in original pixels, score > threshold, no NMS (the
reference has none), then people only. ViTPose = box -> centre/scale (aspect 192/256, x1.25), the unbiased warp
sampled exactly as scipy.ndimage.affine_transform(order=1) does (out-of-image samples are 0, float64 interpolation,
uint8 round half up), argmax + DARK (Gaussian sigma 0.8 as scipy's gaussian_filter, k=11, log, Newton step), back to
frame pixels; no flip test (the reference does none by default). Crops and blurred heatmaps are bit-identical to
scipy 1.17.1 (checked on 40 random boxes of a 480x854 frame and 136 random 64x48 maps); all float32/float64 steps
follow the reference's dtypes, so decoded keypoints match it to float32 rounding. The pipeline's frames are decoded
RGB uint8; everything after the Pillow resize / the frame upload runs on the chosen device.

Those are the defaults: the folder's preprocessor_config.json is read as the reference processors
read it, each setting they apply honoured (size rule, resample filter, rescale, normalisation,
padding), anything else refused by name. `dtype` is the ViT trunks' (bf16 on a GPU); the heads and
all decoding run in float32 (see Yolos.from_pretrained).

Commands:
  python bench/perception.py                       # CPU frames/s at small sizes (random tiny weights)
  python -m pytest -q tests/test_vit.py            # parity with transformers on tiny random configs
  det = YolosDetector("ckpt/yolos-small"); pose = ViTPoseEstimator("ckpt/vitpose-plus-base")
  boxes = det(frames); kp, sc = pose(frames, person_boxes_xyxy)   # the pipeline's Detector / PoseEstimator calls
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# ---------------------------------------------------------------------------------------------------------------
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
    """fc1 -> act -> fc2. ViTPose+ (experts > 1): fc2 gives the first dim - part features, and one of the experts,
    chosen per sample by its dataset index, gives the last part features from the same hidden activations."""

    def __init__(self, dim, hidden, act, experts=1, part_features=0):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim - part_features if experts > 1 else dim)
        self.experts = nn.ModuleList(nn.Linear(hidden, part_features) for _ in range(experts)) if experts > 1 else None

    def forward(self, x, expert=None):
        """x (B, T, C); expert: the dataset index (int: the whole batch, one matmul) or (B,) long indices (a mixed
        batch: each expert present runs on all rows, kept where selected, as the reference does)."""
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


# Our parameter names -> the HF checkpoint's, by fragment replacement in this order (the only renames; the rest of
# each key is the HF name verbatim).
TRUNK_RENAMES = ((".patch_embed.", ".embeddings.patch_embeddings.projection."),
                 (".cls_token", ".embeddings.cls_token"),
                 (".detection_tokens", ".embeddings.detection_tokens"),
                 (".position_embeddings", ".embeddings.position_embeddings"),
                 (".mid_position_embeddings", ".encoder.mid_position_embeddings"),
                 (".blocks.", ".encoder.layer."),
                 (".attn.proj.", ".attention.output.dense."),
                 (".attn.", ".attention.attention."))
YOLOS_MLP_RENAMES = ((".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."))


def hf_key(name, renames):
    k = "." + name
    for ours, theirs in renames:
        k = k.replace(ours, theirs)
    return k[1:]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_weights(model, folder, renames, device="cpu", dtype=torch.float32):
    """Fill a meta-built `model` from folder/model.safetensors (or a sharded index). Missing, unexpected and
    mis-shaped keys raise, named as in the checkpoint."""
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


def _pick(cls, d):
    """The dataclass fields of cls present in the HF dict d (HF names are ours where they coincide)."""
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


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _setting(pre, key, default, kind):
    """pre[key] checked to be of `kind` (absent: the reference's default). null is refused: the
    reference processors read it as false for some keys and fail on others."""
    if key not in pre:
        return default
    v, num = pre[key], lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if kind == "flag" and isinstance(v, bool) or kind == "resample" and _is_int(v) and 0 <= v <= 5:
        return v
    if kind == "number" and num(v):
        return float(v)
    if kind == "channels" and (num(v) or isinstance(v, list) and len(v) == 3 and all(map(num, v))):
        return tuple(float(x) for x in v) if isinstance(v, list) else (float(v),) * 3
    raise ValueError(f"preprocessor_config.json: {key}={v!r} is not {_KINDS[kind]}")


def _size_hw(pre, key, default, square=True):
    """A {height, width} size as the reference reads it (an int is square when `square`, a list is
    [h, w]) -> (h, w)."""
    v = pre.get(key, default)
    d = {"height": v, "width": v} if _is_int(v) and square else v
    d = {"height": d[0], "width": d[1]} if isinstance(d, list) and len(d) == 2 else d
    if isinstance(d, dict) and set(d) == {"height", "width"} and all(
            _is_int(x) and x > 0 for x in d.values()):
        return d["height"], d["width"]
    raise ValueError(f"preprocessor_config.json: {key}={v!r} is not a {{height, width}} size")


def _pre_pixels(pre, kind, known):
    """Refuse another model's processor and unknown keys; -> the rescale / normalise settings
    (both reference processors apply them alike) as our fields."""
    for k in ("image_processor_type", "feature_extractor_type"):
        if k in pre and not str(pre[k]).startswith(kind):
            raise ValueError(f"preprocessor_config.json: {k}={pre[k]!r} is not a {kind} processor")
    unknown = [f"{k}={v!r}" for k, v in sorted(pre.items())
               if k not in known and k not in PRE_INERT and not k.startswith("_")]
    if unknown:
        raise ValueError(f"preprocessor_config.json: unsupported setting(s) {', '.join(unknown)}")
    return {"do_rescale": _setting(pre, "do_rescale", True, "flag"),
            "rescale_factor": _setting(pre, "rescale_factor", 1 / 255, "number"),
            "do_normalize": _setting(pre, "do_normalize", True, "flag"),
            "image_mean": _setting(pre, "image_mean", IMAGENET_MEAN, "channels"),
            "image_std": _setting(pre, "image_std", IMAGENET_STD, "channels")}


# ---------------------------------------------------------------------------------------------------------------
# YOLOS person detector


@dataclass
class YolosConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple = (512, 864)     # (H, W) of the position-embedding grid (x patch); inputs interpolate it
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_detection_tokens: int = 100
    use_mid_position_embeddings: bool = True  # a position embedding added after every layer but the last
    num_labels: int = 91               # COCO ids incl. unused ones; the head adds one "no object" class
    person_label: int = 1              # the class kept as "person" (id2label["person"] in COCO checkpoints)
    # pre-processing: preprocessor_config.json as the reference processor applies it (defaults:
    # its own); from_hf honours or refuses every key there
    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"shortest_edge": 800, "longest_edge": 1333})
    resample: int = 2                  # Pillow filter (2 = bilinear)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    do_pad: bool = True                # zero-pad bottom/right to the batch's largest image
    pad_size: tuple = None             # (H, W): pad every image to this size instead

    @classmethod
    def from_hf(cls, cfg, pre=None, person_label=None):
        if cfg.get("model_type") != "yolos":
            raise ValueError(f"not a YOLOS config: model_type={cfg.get('model_type')!r}")
        kw = _pick(cls, cfg)
        kw["image_size"] = tuple(cfg.get("image_size", cls.image_size))
        if isinstance(cfg.get("patch_size"), (list, tuple)):
            raise ValueError(f"YOLOS expects a square int patch_size, got {cfg['patch_size']}")
        if kw.get("num_channels", 3) != 3:
            raise ValueError(f"config.json: num_channels={kw['num_channels']}; frames are RGB")
        id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
        kw["num_labels"] = len(id2label) if id2label else cfg.get("num_labels", cls.num_labels)
        people = [i for i, v in id2label.items() if str(v).lower() == "person"]
        if person_label is None and not people:
            raise ValueError("id2label has no 'person' class; pass person_label explicitly")
        kw["person_label"] = person_label if person_label is not None else people[0]
        if kw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {kw['hidden_act']!r}")
        pre = pre or {}
        # default_to_square: inert, the reference reads an int size as the shortest edge regardless
        kw.update(_pre_pixels(pre, "Yolos", {
            "size", "max_size", "do_resize", "resample", "do_pad", "pad_size", "default_to_square",
            "pad_and_return_pixel_mask", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std"}))
        kw["size"] = _yolos_size(pre)
        kw["do_resize"] = _setting(pre, "do_resize", True, "flag")
        kw["resample"] = _setting(pre, "resample", 2, "resample")
        legacy = _setting(pre, "pad_and_return_pixel_mask", True, "flag")  # do_pad's old name
        kw["do_pad"] = _setting(pre, "do_pad", legacy, "flag")
        if pre.get("pad_size") is not None:  # null: none, as in the reference
            kw["pad_size"] = _size_hw(pre, "pad_size", None)
        return cls(**kw)


YOLOS_SIZES = ({"shortest_edge", "longest_edge"}, {"max_height", "max_width"}, {"height", "width"})


def _yolos_size(pre):
    """The reference's size dict (one of YOLOS_SIZES, see yolos_target_shape); a legacy int size is
    the shortest edge and max_size (default 1333) the longest. A max_size the reference would
    ignore (with a dict size, or alone) must agree with longest_edge."""
    size = pre.get("size", {"shortest_edge": 800, "longest_edge": 1333})
    max_size = pre.get("max_size")
    if max_size is not None and not _is_int(max_size):
        raise ValueError(f"preprocessor_config.json: max_size={max_size!r} is not an int")
    d = {"shortest_edge": size, "longest_edge": max_size or 1333} if _is_int(size) else size
    d = {"height": d[0], "width": d[1]} if isinstance(d, list) and len(d) == 2 else d
    if not (isinstance(d, dict) and set(d) in YOLOS_SIZES and all(
            _is_int(v) and v > 0 for v in d.values())):
        raise ValueError(f"preprocessor_config.json: size={size!r} is not one the YOLOS processor "
                         "resizes by ({shortest_edge, longest_edge}, {max_height, max_width} or "
                         "{height, width})")
    if max_size is not None and max_size != d.get("longest_edge"):
        raise ValueError(f"preprocessor_config.json: max_size={max_size} disagrees with "
                         f"size={size!r}")
    return dict(d)


class YolosViT(nn.Module):
    """ViT over [cls, patches, detection tokens] with bicubically interpolated (mid-)position embeddings."""

    def __init__(self, c: YolosConfig):
        super().__init__()
        self.c = c
        gh, gw = c.image_size[0] // c.patch_size, c.image_size[1] // c.patch_size
        seq = 1 + gh * gw + c.num_detection_tokens
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.detection_tokens = nn.Parameter(torch.zeros(1, c.num_detection_tokens, c.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, seq, c.hidden_size))
        if c.use_mid_position_embeddings:
            self.mid_position_embeddings = nn.Parameter(torch.zeros(c.num_hidden_layers - 1, 1, seq, c.hidden_size))
        self.blocks = nn.ModuleList(Block(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                                          c.layer_norm_eps, c.qkv_bias) for _ in range(c.num_hidden_layers))
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self._pos_cache = {}  # (H, W, device, dtype) -> interpolated (pos, mid pos): computed once per input size

    def resize_pos(self, pos, gh, gw):
        """pos (L, 1, 1 + grid + det, D) -> the same with the patch part bicubically resized to gh x gw."""
        c, nd = self.c, self.c.num_detection_tokens
        L, _, _, D = pos.shape
        h0, w0 = c.image_size[0] // c.patch_size, c.image_size[1] // c.patch_size
        patch = pos[:, 0, 1:-nd].transpose(1, 2).reshape(L, D, h0, w0)  # (L, D, h0, w0)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
        patch = patch.flatten(2).transpose(1, 2)[:, None]  # (L, 1, gh*gw, D)
        return torch.cat([pos[:, :, :1], patch, pos[:, :, -nd:]], 2)

    def positions(self, H, W, device, dtype):
        key = (H, W, device, dtype)
        if key not in self._pos_cache:
            gh, gw = H // self.c.patch_size, W // self.c.patch_size
            # bicubic in float32 whatever the model dtype (bf16 interpolation is not supported everywhere)
            pos = self.resize_pos(self.position_embeddings[None].float(), gh, gw)[0].to(dtype)  # (1, T, D)
            mid = self.resize_pos(self.mid_position_embeddings.float(), gh, gw)[:, 0].to(dtype) \
                if self.c.use_mid_position_embeddings else None  # (L-1, T, D)
            self._pos_cache[key] = (pos, mid)
        return self._pos_cache[key]

    def forward(self, pixels):
        """pixels (B, 3, H, W) normalised -> final-norm hidden states (B, 1 + patches + det, D)."""
        B, _, H, W = pixels.shape
        pos, mid = self.positions(H, W, pixels.device, pixels.dtype)
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x, self.detection_tokens.expand(B, -1, -1)], 1) + pos
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if mid is not None and i < len(self.blocks) - 1:
                x = x + mid[i]
        return self.layernorm(x)


class MLPHead(nn.Module):
    """Three linear layers with ReLU between (the DETR prediction head)."""

    def __init__(self, dim, out):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, out)])

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == len(self.layers) - 1 else F.relu(lin(x))
        return x


class Yolos(nn.Module):
    def __init__(self, c: YolosConfig):
        super().__init__()
        self.c = c
        self.vit = YolosViT(c)
        self.class_labels_classifier = MLPHead(c.hidden_size, c.num_labels + 1)
        self.bbox_predictor = MLPHead(c.hidden_size, 4)

    def forward(self, pixels):
        """pixels (B, 3, H, W) -> logits (B, Q, classes + 1), boxes (B, Q, 4) normalised (cx, cy, w,
        h); both float32 whatever the trunk's dtype (see from_pretrained)."""
        x = self.vit(pixels.to(self.vit.patch_embed.weight.dtype))  # (B, 1 + patches + Q, D)
        det = x[:, -self.c.num_detection_tokens:].float()  # (B, Q, D)
        return self.class_labels_classifier(det), self.bbox_predictor(det).sigmoid()

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, person_label=None):
        """dtype: the ViT trunk's. The heads stay float32 whatever it is: a bf16 box head rounds
        every normalised coordinate to 2^-9 (up to ~4 px per edge at 1920 px wide), an error in
        every box that moves IoUs and the box checks, while the heads cost nothing next to the
        trunk (3 small layers on 100 tokens). A bf16 trunk still perturbs the features they read
        (by how much depends on the weights); float32 removes that too."""
        c = load_config(YolosConfig, folder, person_label)
        with torch.device("meta"):
            model = cls(c)
        load_weights(model, folder, TRUNK_RENAMES + YOLOS_MLP_RENAMES, device)  # float32
        model.vit.to(dtype)
        return model


def yolos_resize_shape(h, w, shortest, longest, mod=16):
    """The reference's output (H, W): shortest edge -> `shortest` unless the longest would pass `longest`, both
    rounded down to a multiple of `mod` (get_size_with_aspect_ratio_yolos)."""
    raw = None
    if longest is not None and max(h, w) / min(h, w) * shortest > longest:
        raw = longest * min(h, w) / max(h, w)
        shortest = int(round(raw))
    base = raw if raw is not None else shortest
    if w < h:
        oh, ow = int(base * h / w), shortest
    elif (h <= w and h == shortest) or (w <= h and w == shortest):
        oh, ow = h, w
    else:
        oh, ow = shortest, int(base * w / h)
    return oh - oh % mod, ow - ow % mod


def yolos_target_shape(h, w, c: YolosConfig):
    """(H, W) the reference resizes an h x w image to: c.size {shortest_edge, longest_edge} is the
    rule above, {max_height, max_width} fits inside keeping the aspect (no rounding to 16),
    {height, width} is exact."""
    s = c.size
    if not c.do_resize:
        return h, w
    if "shortest_edge" in s:
        return yolos_resize_shape(h, w, s["shortest_edge"], s["longest_edge"])
    if "max_height" in s:
        k = min(s["max_height"] / h, s["max_width"] / w)
        return int(h * k), int(w * k)
    return s["height"], s["width"]


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


def _resize(im, oh, ow, resample):
    return np.array(Image.fromarray(np.ascontiguousarray(im)).resize((ow, oh), resample))


def yolos_preprocess(images, c: YolosConfig, device="cpu", pool=None):
    """RGB uint8 (H, W, 3) images -> pixels (B, 3, Hmax, Wmax) float32 zero-padded bottom/right (to
    c.pad_size if set), and the original (H, W) of each image. The resize is Pillow's own (the
    reference's); `pool` (a ThreadPoolExecutor) runs it on several cores, as Pillow releases the
    GIL while resampling."""
    sizes = [tuple(im.shape[:2]) for im in images]
    targets = [yolos_target_shape(h, w, c) for h, w in sizes]
    jobs = [(im, oh, ow, c.resample) for im, (oh, ow) in zip(images, targets)]
    if not c.do_resize:
        resized = list(images)
    elif pool is not None:
        resized = list(pool.map(lambda j: _resize(*j), jobs))
    else:
        resized = [_resize(*j) for j in jobs]
    if c.do_pad and c.pad_size is not None:
        Hm, Wm = c.pad_size
        big = [t for t in targets if t[0] > Hm or t[1] > Wm]
        if big:
            raise ValueError(f"pad_size {c.pad_size} is smaller than a resized image, {big[0]}")
    elif len(set(targets)) == 1:
        return normalize(np.stack(resized), c, device), sizes
    elif not c.do_pad:
        raise ValueError("images of different sizes in one batch, and no padding (do_pad false)")
    else:
        Hm, Wm = max(h for h, _ in targets), max(w for _, w in targets)
    out = torch.zeros(len(images), 3, Hm, Wm, device=device)
    for i, r in enumerate(resized):
        out[i, :, :r.shape[0], :r.shape[1]] = normalize(r[None], c, device)[0]
    return out, sizes


def yolos_postprocess(logits, boxes, sizes, threshold, label=None):
    """-> per image (scores (N,), labels (N,), boxes (N, 4) xyxy in original pixels) with score > threshold, as
    post_process_object_detection; `label` keeps one class only (the reference does no NMS)."""
    prob = logits.float().softmax(-1)
    scores, labels = prob[..., :-1].max(-1)  # best real class per query
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)  # (B, Q, 4)
    hw = torch.tensor(sizes, dtype=torch.float32, device=xyxy.device)  # (B, 2) = (H, W)
    xyxy = xyxy * torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None]
    out = []
    for s, lab, b in zip(scores, labels, xyxy):
        keep = s > threshold
        if label is not None:
            keep &= lab == label
        out.append((s[keep].cpu(), lab[keep].cpu(), b[keep].cpu()))
    return out


class YolosDetector:
    """pipeline.Detector: `det(images, keys=None) -> list of (N_i, 5) float64 [x1, y1, x2, y2, score]`, people only.
    threshold: the reference's score threshold (its default is 0.5; 0.3 matches the pipeline's
    det_conf). dtype: the ViT trunk's; the heads and the box decoding run in float32 regardless."""

    def __init__(self, path, device="cpu", dtype=torch.float32, threshold=0.3, batch_size=8, person_label=None,
                 workers=1):
        self.model = Yolos.from_pretrained(path, device, dtype, person_label)
        self.device, self.threshold, self.batch_size = device, threshold, batch_size
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None  # parallel Pillow resizes

    @torch.no_grad()
    def detect(self, images, people_only=True):
        """-> list of (scores, labels, boxes) tensors per image; people_only=False keeps every class (the
        reference's output)."""
        c, out = self.model.c, [None] * len(images)
        label = c.person_label if people_only else None
        groups = {}  # without padding (do_pad false) only images of one resized shape share a batch
        for n, im in enumerate(images):
            key = None if c.do_pad else yolos_target_shape(*im.shape[:2], c)
            groups.setdefault(key, []).append(n)
        for idx in groups.values():
            for i in range(0, len(idx), self.batch_size):
                sel = idx[i:i + self.batch_size]
                pixels, sizes = yolos_preprocess([images[n] for n in sel], c, self.device, self.pool)
                logits, boxes = self.model(pixels)
                res = yolos_postprocess(logits, boxes, sizes, self.threshold, label)
                for n, r in zip(sel, res):
                    out[n] = r
        return out

    def __call__(self, images, keys=None):
        return [torch.cat([b, s[:, None]], 1).double().numpy() for s, _, b in self.detect(images)]


# ---------------------------------------------------------------------------------------------------------------
# ViTPose / ViTPose+ top-down pose estimator


@dataclass
class ViTPoseConfig:
    image_size: tuple = (256, 192)     # (H, W) of the crops
    patch_size: tuple = (16, 16)
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: int = 4
    num_experts: int = 1               # > 1: ViTPose+ MoE MLPs, one expert per training dataset
    part_features: int = 256           # output dims of each expert (the rest come from the shared fc2)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    out_index: int = 12                # backbone stage fed to the head (0 = embeddings, k = after layer k)
    use_simple_decoder: bool = True    # ReLU + x4 bilinear + 3x3 conv; else two deconv+BN+ReLU and a 1x1 conv
    scale_factor: int = 4
    num_keypoints: int = 17
    # pre-processing: preprocessor_config.json as the reference processor applies it; from_hf
    # honours or refuses every key there (its size must be image_size: the model takes no other)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    normalize_factor: float = 200.0    # box sizes are in units of this many px (mmpose legacy)
    padding_factor: float = 1.25       # crops cover 1.25x the (aspect-corrected) box (fixed)

    @classmethod
    def from_hf(cls, cfg, pre=None):
        if cfg.get("model_type") != "vitpose":
            raise ValueError(f"not a ViTPose config: model_type={cfg.get('model_type')!r}")
        bb = cfg.get("backbone_config")
        if bb is not None and bb.get("model_type", "vitpose_backbone") != "vitpose_backbone":
            raise ValueError(f"config.json: backbone_config.model_type={bb['model_type']!r} is not "
                             "vitpose_backbone")
        kw = _pick(cls, bb or {})
        for k in ("image_size", "patch_size"):
            v = (bb or {}).get(k, getattr(cls, k))
            kw[k] = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
        if kw.get("num_channels", 3) != 3:
            raise ValueError(f"config.json: num_channels={kw['num_channels']}; frames are RGB")
        kw["out_index"] = _vitpose_out_stage(bb, kw.get("num_hidden_layers", cls.num_hidden_layers))
        kw.update({k: cfg[k] for k in ("use_simple_decoder", "scale_factor") if k in cfg})
        if cfg.get("id2label"):
            kw["num_keypoints"] = len(cfg["id2label"])
        elif "num_labels" in cfg:
            kw["num_keypoints"] = cfg["num_labels"]
        if kw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {kw['hidden_act']!r}")
        pre = pre or {}
        # do_resize, resample, do_pad, pad_size: inert, the reference processor reads them but
        # never applies them (the crop warp alone sizes its output)
        kw.update(_pre_pixels(pre, "VitPose", {
            "size", "default_to_square", "do_affine_transform", "normalize_factor", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std", "do_resize", "resample",
            "do_pad", "pad_size"}))
        if not _setting(pre, "do_affine_transform", True, "flag"):
            raise ValueError("preprocessor_config.json: do_affine_transform=False feeds whole "
                             "frames to the model; this estimator crops each person's box")
        H, W = kw["image_size"]  # no size given: the one size the model takes
        square = _setting(pre, "default_to_square", True, "flag")  # how an int size is read
        if _size_hw(pre, "size", {"height": H, "width": W}, square) != (H, W):
            raise ValueError(f"preprocessor_config.json: size={pre['size']!r} differs from the "
                             f"backbone's image_size {(H, W)}")
        # the reference's post_process_pose_estimation maps keypoints back with 200 whatever this
        # is; we decode with the scale each crop was taken with
        kw["normalize_factor"] = _setting(pre, "normalize_factor", 200.0, "number")
        return cls(**kw)


def _vitpose_out_stage(bb, n):
    """The backbone stage the reference's head reads, its last requested feature map: out_indices
    (negatives count from the end) and/or out_features ("stem" = 0, "stageK" = K); neither: the
    last stage; no backbone_config at all: the reference's default backbone requests stage 4."""
    if bb is None:
        return 4
    names = ["stem"] + [f"stage{k}" for k in range(1, n + 1)]
    idx, feats = bb.get("out_indices"), bb.get("out_features")
    try:
        if not all(_is_int(i) for i in idx or []):
            raise TypeError
        by_idx = [range(n + 1)[i] for i in idx or []]  # IndexError outside -n-1..n
        by_name = [names.index(f) for f in feats or []]  # ValueError for another name
        ok = not (idx and feats) or by_idx == by_name
    except (IndexError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"config.json: backbone_config out_indices={idx!r}, out_features={feats!r}: "
                         f"not stages of {names}, or they disagree")
    return max(by_idx or by_name or [n])


class PoseViT(nn.Module):
    """ViTPose backbone: padded patch conv, learned positions (no cls token; its position is added to all)."""

    def __init__(self, c: ViTPoseConfig):
        super().__init__()
        self.c = c
        gh, gw = c.image_size[0] // c.patch_size[0], c.image_size[1] // c.patch_size[1]
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, padding=2)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + gh * gw, c.hidden_size))
        self.blocks = nn.ModuleList(
            Block(c.hidden_size, c.num_attention_heads, int(c.hidden_size * c.mlp_ratio), c.hidden_act,
                  c.layer_norm_eps, c.qkv_bias, c.num_experts, c.part_features) for _ in range(c.num_hidden_layers))
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels, expert):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        x = x + self.position_embeddings[:, 1:] + self.position_embeddings[:, :1]
        for blk in self.blocks[:self.c.out_index]:
            x = blk(x, expert)
        return self.layernorm(x)


class SimpleHead(nn.Module):
    def __init__(self, c: ViTPoseConfig):
        super().__init__()
        self.scale = c.scale_factor
        self.conv = nn.Conv2d(c.hidden_size, c.num_keypoints, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(F.relu(x), scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.conv(x)


class ClassicHead(nn.Module):
    def __init__(self, c: ViTPoseConfig):
        super().__init__()
        self.deconv1 = nn.ConvTranspose2d(c.hidden_size, 256, 4, stride=2, padding=1, bias=False)
        self.batchnorm1 = nn.BatchNorm2d(256)
        self.deconv2 = nn.ConvTranspose2d(256, 256, 4, stride=2, padding=1, bias=False)
        self.batchnorm2 = nn.BatchNorm2d(256)
        self.conv = nn.Conv2d(256, c.num_keypoints, 1)

    def forward(self, x):
        x = F.relu(self.batchnorm1(self.deconv1(x)))
        return self.conv(F.relu(self.batchnorm2(self.deconv2(x))))


class ViTPose(nn.Module):
    def __init__(self, c: ViTPoseConfig):
        super().__init__()
        self.c = c
        self.backbone = PoseViT(c)
        self.head = SimpleHead(c) if c.use_simple_decoder else ClassicHead(c)

    def forward(self, pixels, dataset_index=0):
        """pixels (B, 3, 256, 192) normalised crops; dataset_index: int or (B,) (ViTPose+ expert; 0 = COCO) ->
        heatmaps (B, K, 64, 48), float32 whatever the backbone's dtype."""
        B, c = pixels.shape[0], self.c
        expert = dataset_index
        if torch.is_tensor(expert):  # per-sample indices; one value for all is the fast int path
            expert = expert.to(pixels.device).long().view(-1).expand(B)
            lo, hi = int(expert.min()), int(expert.max())
            expert = lo if lo == hi else expert
        else:
            lo = hi = expert = int(expert)
        if c.num_experts > 1 and not (0 <= lo and hi < c.num_experts):
            raise ValueError(f"dataset_index {dataset_index} outside [0, {c.num_experts})")
        trunk = self.backbone.patch_embed.weight.dtype
        x = self.backbone(pixels.to(trunk), expert).float()  # (B, gh*gw, D); the head in float32
        gh, gw = c.image_size[0] // c.patch_size[0], c.image_size[1] // c.patch_size[1]
        return self.head(x.transpose(1, 2).reshape(B, -1, gh, gw).contiguous())  # (B, D, gh, gw) -> heatmaps

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32):
        """dtype: the backbone's; the head stays float32 (the heatmaps' values feed DARK's
        log-derivatives), as in Yolos."""
        c = load_config(ViTPoseConfig, folder)
        with torch.device("meta"):
            model = cls(c)
        load_weights(model, folder, TRUNK_RENAMES, device)  # float32
        model.backbone.to(dtype)
        return model


def box_to_center_scale(xywh, c: ViTPoseConfig):
    """(N, 4) float64 COCO boxes -> centre (N, 2), scale (N, 2) float32: the box widened or heightened to the crop
    aspect, in units of normalize_factor px, times padding_factor (box_to_center_and_scale)."""
    x, y, w, h = np.asarray(xywh, np.float64).T
    aspect = c.image_size[1] / c.image_size[0]
    center = np.stack([x + w * 0.5, y + h * 0.5], 1).astype(np.float32)
    w2 = np.where(w < aspect * h, h * aspect, w)  # widen a tall box ...
    h2 = np.where(w > aspect * h, w * 1.0 / aspect, h)  # ... or heighten a wide one
    scale = np.stack([w2 / c.normalize_factor, h2 / c.normalize_factor], 1).astype(np.float32) * np.float32(
        c.padding_factor)
    return center, scale


def crop_to_frame(center, scale, c: ViTPoseConfig):
    """The inverse (crop pixel -> frame pixel) of the unbiased warp (get_warp_matrix, rotation 0), built with the
    reference's float32/float64 steps: per box (ax, bx, ay, by) float64, frame x = ax * u + bx, y = ay * v + by."""
    size_in, target = center * 2.0, scale * np.float32(200.0)  # float32, as the reference (its 200 is fixed)
    sx = np.float64(c.image_size[1] - 1.0) / target[:, 0].astype(np.float64)
    sy = np.float64(c.image_size[0] - 1.0) / target[:, 1].astype(np.float64)
    tx = -0.5 * size_in[:, 0] + 0.5 * target[:, 0]  # float32 sums, as in the reference
    ty = -0.5 * size_in[:, 1] + 0.5 * target[:, 1]
    M = np.zeros((len(center), 3, 3))
    M[:, 0, 0], M[:, 0, 2] = sx.astype(np.float32), (sx * tx).astype(np.float32)
    M[:, 1, 1], M[:, 1, 2] = sy.astype(np.float32), (sy * ty).astype(np.float32)
    M[:, 2, 2] = 1.0
    Mi = np.linalg.inv(M)  # float64, as scipy_warp_affine
    return Mi[:, 0, 0], Mi[:, 0, 2], Mi[:, 1, 1], Mi[:, 1, 2]


def warp_crops(frames, inv, out_hw):
    """Bilinear crops as scipy.ndimage.affine_transform(order=1, mode='constant') computes them: a sample outside
    [0, W-1] x [0, H-1] is 0, inside it interpolates the 4 neighbours in float64 and rounds half up to uint8.
    frames (N, H, W, 3) uint8 tensor; inv: crop_to_frame output -> (N, h, w, 3) uint8."""
    N, H, W, _ = frames.shape
    dev = frames.device
    ax, bx, ay, by = (torch.as_tensor(a, dtype=torch.float64, device=dev).view(-1, 1) for a in inv)
    xs = ax * torch.arange(out_hw[1], device=dev, dtype=torch.float64) + bx  # (N, w) frame x of each crop column
    ys = ay * torch.arange(out_hw[0], device=dev, dtype=torch.float64) + by  # (N, h)
    inside = ((ys >= 0) & (ys <= H - 1))[:, :, None] & ((xs >= 0) & (xs <= W - 1))[:, None, :]  # (N, h, w)
    x0, y0 = xs.floor(), ys.floor()
    tx, ty = xs - x0, ys - y0
    x0 = x0.long().clamp(0, W - 1)
    y0 = y0.long().clamp(0, H - 1)
    x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
    n = torch.arange(N, device=dev).view(N, 1, 1)

    def at(yi, xi):  # (N, h, w, 3) float64 values of frame pixels (yi, xi), each crop from its own frame
        return frames[n, yi[:, :, None], xi[:, None, :]].double()

    wy0, wy1 = (1 - ty)[:, :, None, None], ty[:, :, None, None]
    wx0, wx1 = (1 - tx)[:, None, :, None], tx[:, None, :, None]
    # scipy's order: t = sum over corners (y fastest-last) of (value * wy) * wx, starting from 0
    v = at(y0, x0) * wy0 * wx0 + at(y0, x1) * wy0 * wx1 + at(y1, x0) * wy1 * wx0 + at(y1, x1) * wy1 * wx1
    v = torch.where(inside[..., None], v, torch.zeros((), dtype=v.dtype, device=dev))
    return (v + 0.5).floor().to(torch.uint8)


def gaussian_blur(hm, sigma=0.8, radius=5):
    """scipy.ndimage.gaussian_filter(sigma, radius, mode='reflect') over the last two axes of float32 heatmaps
    (a tensor, on any device): rows then columns, each pass accumulated in float64 in scipy's symmetric order
    (centre, then the pairs from the outermost in) and stored as float32, so the result is bit-identical."""
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    k = k / k.sum()
    out = hm
    for axis in (-2, -1):
        n = out.shape[axis]
        src = np.mod(np.arange(-radius, n + radius), 2 * n)  # source row/column of the padded axis ...
        src = torch.as_tensor(np.where(src >= n, 2 * n - 1 - src, src), device=hm.device)  # ... half-sample mirrored
        padded = out.double().index_select(axis, src)  # (.., n + 2r, ..)

        def tap(j):  # the samples at offset j of every output position (a view)
            return padded.narrow(axis, radius + j, n)

        acc = tap(0) * float(k[radius])
        for j in range(-radius, 0):
            acc = acc + (tap(j) + tap(-j)) * float(k[radius + j])
        out = acc.float()
    return out


def heatmaps_to_keypoints(heatmaps, center, scale, kernel=11):
    """float32 heatmaps (N, K, h, w) -> keypoints (N, K, 2) float32 frame pixels, scores (N, K): argmax, DARK
    Newton step on the log of the blurred heatmap, then the UDP map back (keypoints_from_heatmaps)."""
    hm = torch.as_tensor(heatmaps).float()
    blurred = gaussian_blur(hm, 0.8, (kernel - 1) // 2).cpu().numpy()  # the heavy part, on the heatmaps' device
    heatmaps = hm.cpu().numpy()
    N, K, h, w = heatmaps.shape
    flat = heatmaps.reshape(N, K, -1)
    idx, scores = flat.argmax(2), flat.max(2)
    coords = np.stack([idx % w, idx // w], -1).astype(np.float32)
    coords = np.where(scores[..., None] > 0.0, coords, np.float32(-1))  # as the reference: -1 when max <= 0
    lg = np.log(np.clip(blurred, 0.001, 50))
    pad = np.pad(lg, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge").ravel()
    # linear index of each peak in the flattened padded maps (the reference indexes the same way)
    i = coords[..., 0] + 1 + (coords[..., 1] + 1) * (w + 2)
    # (summed in float64: exact, where the reference's in-place float32 sum loses integers past 2**24 (> ~300 crops))
    i = (i + (w + 2) * (h + 2) * np.arange(N * K).reshape(-1, K)).astype(int)
    v = lambda off: pad[i + off]  # noqa: E731
    c0, xp, xm, yp, ym = v(0), v(1), v(-1), v(w + 2), v(-w - 2)
    dx, dy = 0.5 * (xp - xm), 0.5 * (yp - ym)
    dxx, dyy = xp - 2 * c0 + xm, yp - 2 * c0 + ym
    dxy = 0.5 * (v(w + 3) - xp - yp + c0 + c0 - xm - ym + v(-w - 3))
    hess = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)  # (N, K, 2, 2)
    hess = np.linalg.inv(hess + np.finfo(np.float32).eps * np.eye(2))
    # the Newton step in float64, stored back to float32 (the reference's in-place update)
    coords = (coords - np.einsum("nkij,nkj->nki", hess, np.stack([dx, dy], -1))).astype(np.float32)
    s = scale * np.float32(200.0)
    sx, sy = s[:, 0] / (w - 1.0), s[:, 1] / (h - 1.0)  # float32
    kx = coords[..., 0] * sx[:, None] + center[:, :1] - s[:, :1] * 0.5
    ky = coords[..., 1] * sy[:, None] + center[:, 1:] - s[:, 1:] * 0.5
    return np.stack([kx, ky], -1), scores


class ViTPoseEstimator:
    """pipeline.PoseEstimator: `pose(images, boxes, keys=None) -> keypoints (N, 17, 2), scores (N, 17)` float64,
    COCO-17 order, frame pixels; one xyxy box per image. Boxes that are not finite or have no area give zeros.
    dataset_index: the ViTPose+ expert (0 = COCO); ignored by single-expert models. dtype: the
    backbone's; the head and the keypoint decoding run in float32 regardless."""

    keypoint_format = "coco"

    def __init__(self, path, device="cpu", dtype=torch.float32, dataset_index=0, batch_size=32):
        self.model = ViTPose.from_pretrained(path, device, dtype)
        self.device, self.dataset_index, self.batch_size = device, dataset_index, batch_size

    def preprocess(self, frames, xywh):
        """Same-size frames (N, H, W, 3) uint8 + COCO boxes (N, 4) -> crops (N, 3, h, w) float32, centre, scale."""
        c = self.model.c
        center, scale = box_to_center_scale(xywh, c)
        u8 = warp_crops(torch.as_tensor(frames).to(self.device), crop_to_frame(center, scale, c), c.image_size)
        return normalize(u8, c, self.device), center, scale

    @torch.no_grad()
    def estimate(self, images, xywh):
        """images: list of (H, W, 3) uint8; xywh (N, 4) boxes -> keypoints (N, K, 2) float32, scores (N, K)."""
        K = self.model.c.num_keypoints
        kp, sc = np.zeros((len(images), K, 2), np.float32), np.zeros((len(images), K), np.float32)
        groups = {}  # frames of one shape are warped together
        for n, im in enumerate(images):
            groups.setdefault(im.shape, []).append(n)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                sel = idx[s:s + self.batch_size]
                pixels, center, scale = self.preprocess(np.stack([images[n] for n in sel]), xywh[sel])
                hm = self.model(pixels, self.dataset_index)
                kp[sel], sc[sel] = heatmaps_to_keypoints(hm, center, scale)
        return kp, sc

    def __call__(self, images, boxes, keys=None):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(b) != len(images):
            raise ValueError(f"{len(b)} boxes for {len(images)} images")
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)
        ok = np.isfinite(xywh).all(1) & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        K = self.model.c.num_keypoints
        kp, sc = np.zeros((len(b), K, 2)), np.zeros((len(b), K))
        if ok.any():
            sel = np.flatnonzero(ok)
            k, s = self.estimate([images[i] for i in sel], xywh[sel])
            kp[sel], sc[sel] = k, s
        return kp, sc
