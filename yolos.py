"""
YOLOS person detector (Fang et al. 2021) in plain PyTorch, loaded through vit.py from a Hugging Face
folder (hustvl/yolos-tiny | yolos-small | yolos-small-300 | yolos-base, Apache-2.0). Why it redoes
transformers' PIL processor step by step (Pillow resize to multiples of 16, normalisation, zero
padding the model sees, softmax + no-object, no NMS): the pipeline's boxes must be the reference's.
The trunk may run in bf16; the heads and the box decoding stay float32.

  det = YolosDetector("ckpt/yolos-small", device="cuda", dtype=torch.bfloat16)
  boxes = det(frames)  # pipeline.Detector: per frame (N, 5) [x1, y1, x2, y2, score], people only
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from vit import (
    ACTIVATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRUNK_RENAMES,
    Block,
    is_int,
    load_config,
    load_weights,
    normalize,
    pick_fields,
    pixel_settings,
    setting,
    size_hw,
)

YOLOS_MLP_RENAMES = ((".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."))


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
        kw = pick_fields(cls, cfg)
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
        kw.update(pixel_settings(pre, "Yolos", {
            "size", "max_size", "do_resize", "resample", "do_pad", "pad_size", "default_to_square",
            "pad_and_return_pixel_mask", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std"}))
        kw["size"] = _yolos_size(pre)
        kw["do_resize"] = setting(pre, "do_resize", True, "flag")
        kw["resample"] = setting(pre, "resample", 2, "resample")
        legacy = setting(pre, "pad_and_return_pixel_mask", True, "flag")  # do_pad's old name
        kw["do_pad"] = setting(pre, "do_pad", legacy, "flag")
        if pre.get("pad_size") is not None:  # null: none, as in the reference
            kw["pad_size"] = size_hw(pre, "pad_size", None)
        return cls(**kw)


YOLOS_SIZES = ({"shortest_edge", "longest_edge"}, {"max_height", "max_width"}, {"height", "width"})


def _yolos_size(pre):
    """The reference's size dict (one of YOLOS_SIZES, see yolos_target_shape); a legacy int size is
    the shortest edge and max_size (default 1333) the longest. A max_size the reference would
    ignore (with a dict size, or alone) must agree with longest_edge."""
    size = pre.get("size", {"shortest_edge": 800, "longest_edge": 1333})
    max_size = pre.get("max_size")
    if max_size is not None and not is_int(max_size):
        raise ValueError(f"preprocessor_config.json: max_size={max_size!r} is not an int")
    d = {"shortest_edge": size, "longest_edge": max_size or 1333} if is_int(size) else size
    d = {"height": d[0], "width": d[1]} if isinstance(d, list) and len(d) == 2 else d
    if not (isinstance(d, dict) and set(d) in YOLOS_SIZES and all(
            is_int(v) and v > 0 for v in d.values())):
        raise ValueError(f"preprocessor_config.json: size={size!r} is not one the YOLOS processor "
                         "resizes by ({shortest_edge, longest_edge}, {max_height, max_width} or "
                         "{height, width})")
    if max_size is not None and max_size != d.get("longest_edge"):
        raise ValueError(f"preprocessor_config.json: max_size={max_size} disagrees with "
                         f"size={size!r}")
    return dict(d)


class YolosViT(nn.Module):
    """ViT over [cls, patches, detection tokens] with bicubically interpolated
    (mid-)position embeddings."""

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
        """pos (L, 1, 1 + grid + det, D) -> the same with the patch part bicubically
        resized to gh x gw."""
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
            # bicubic in float32 whatever the model dtype (bf16 interpolation is not
            # supported everywhere)
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
    """The reference's output (H, W): shortest edge -> `shortest` unless the longest would pass
    `longest`, both rounded down to a multiple of `mod` (get_size_with_aspect_ratio_yolos)."""
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
    """-> per image (scores (N,), labels (N,), boxes (N, 4) xyxy in original pixels) with score
    > threshold, as post_process_object_detection; `label` keeps one class only (the reference
    does no NMS)."""
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
    """pipeline.Detector: `det(images, keys=None) -> list of (N_i, 5) float64 [x1, y1, x2, y2,
    score]`, people only. threshold: the reference's score threshold (its default is 0.5; 0.3
    matches the pipeline's det_conf). dtype: the ViT trunk's; the heads and the box decoding run in
    float32 regardless."""

    def __init__(self, path, device="cpu", dtype=torch.float32, threshold=0.3, batch_size=8,
                 person_label=None, workers=1):
        self.model = Yolos.from_pretrained(path, device, dtype, person_label)
        self.device, self.threshold, self.batch_size = device, threshold, batch_size
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None  # parallel Pillow resizes

    @torch.no_grad()
    def detect(self, images, people_only=True):
        """-> list of (scores, labels, boxes) tensors per image; people_only=False keeps every class
        (the reference's output)."""
        c, out = self.model.c, [None] * len(images)
        label = c.person_label if people_only else None
        groups = {}  # without padding (do_pad false) only images of one resized shape share a batch
        for n, im in enumerate(images):
            key = None if c.do_pad else yolos_target_shape(*im.shape[:2], c)
            groups.setdefault(key, []).append(n)
        for idx in groups.values():
            for i in range(0, len(idx), self.batch_size):
                sel = idx[i:i + self.batch_size]
                pixels, sizes = yolos_preprocess([images[n] for n in sel], c, self.device,
                                                 self.pool)
                logits, boxes = self.model(pixels)
                res = yolos_postprocess(logits, boxes, sizes, self.threshold, label)
                for n, r in zip(sel, res):
                    out[n] = r
        return out

    def __call__(self, images, keys=None):
        return [torch.cat([b, s[:, None]], 1).double().numpy() for s, _, b in self.detect(images)]
