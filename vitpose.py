"""
ViTPose / ViTPose+ top-down 2D pose estimator (Xu et al. 2022) in plain PyTorch, loaded through
vit.py from a Hugging Face folder (usyd-community/vitpose-base-simple | vitpose-plus-{small,base,
large,huge}, Apache-2.0). Why the decoding is rebuilt exactly (box -> 1.25x crop by the unbiased
warp, argmax + DARK sub-pixel step, UDP map back; scipy's steps bit for bit, on any device): the
keypoints match transformers' to float32 rounding. The backbone may run in bf16, the rest float32.

  pose = ViTPoseEstimator("ckpt/vitpose-plus-base", device="cuda", dtype=torch.bfloat16)
  kp, sc = pose(frames, boxes_xyxy)  # pipeline.PoseEstimator: COCO-17 (N, 17, 2) pixels, (N, 17)
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
        kw = pick_fields(cls, bb or {})
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
        kw.update(pixel_settings(pre, "VitPose", {
            "size", "default_to_square", "do_affine_transform", "normalize_factor", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std", "do_resize", "resample",
            "do_pad", "pad_size"}))
        if not setting(pre, "do_affine_transform", True, "flag"):
            raise ValueError("preprocessor_config.json: do_affine_transform=False feeds whole "
                             "frames to the model; this estimator crops each person's box")
        H, W = kw["image_size"]  # no size given: the one size the model takes
        square = setting(pre, "default_to_square", True, "flag")  # how an int size is read
        if size_hw(pre, "size", {"height": H, "width": W}, square) != (H, W):
            raise ValueError(f"preprocessor_config.json: size={pre['size']!r} differs from the "
                             f"backbone's image_size {(H, W)}")
        # the reference's post_process_pose_estimation maps keypoints back with 200 whatever this
        # is; we decode with the scale each crop was taken with
        kw["normalize_factor"] = setting(pre, "normalize_factor", 200.0, "number")
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
        if not all(is_int(i) for i in idx or []):
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
    """ViTPose backbone: padded patch conv, learned positions (no cls token; its position is
    added to all)."""

    def __init__(self, c: ViTPoseConfig):
        super().__init__()
        self.c = c
        gh, gw = c.image_size[0] // c.patch_size[0], c.image_size[1] // c.patch_size[1]
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size,
                                     padding=2)
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
        """pixels (B, 3, 256, 192) normalised crops; dataset_index: int or (B,) (ViTPose+ expert; 0
        = COCO) -> heatmaps (B, K, 64, 48), float32 whatever the backbone's dtype."""
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
        log-derivatives), as in yolos.Yolos."""
        c = load_config(ViTPoseConfig, folder)
        with torch.device("meta"):
            model = cls(c)
        load_weights(model, folder, TRUNK_RENAMES, device)  # float32
        model.backbone.to(dtype)
        return model


def box_to_center_scale(xywh, c: ViTPoseConfig):
    """(N, 4) float64 COCO boxes -> centre (N, 2), scale (N, 2) float32: the box widened or
    heightened to the crop aspect, in units of normalize_factor px, times padding_factor
    (box_to_center_and_scale)."""
    x, y, w, h = np.asarray(xywh, np.float64).T
    aspect = c.image_size[1] / c.image_size[0]
    center = np.stack([x + w * 0.5, y + h * 0.5], 1).astype(np.float32)
    w2 = np.where(w < aspect * h, h * aspect, w)  # widen a tall box ...
    h2 = np.where(w > aspect * h, w * 1.0 / aspect, h)  # ... or heighten a wide one
    scale = np.stack([w2 / c.normalize_factor, h2 / c.normalize_factor], 1).astype(np.float32)
    return center, scale * np.float32(c.padding_factor)


def crop_to_frame(center, scale, c: ViTPoseConfig):
    """The inverse (crop pixel -> frame pixel) of the unbiased warp (get_warp_matrix, rotation 0),
    built with the reference's float32/float64 steps: per box (ax, bx, ay, by) float64, frame x = ax
    * u + bx, y = ay * v + by."""
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
    """Bilinear crops as scipy.ndimage.affine_transform(order=1, mode='constant') computes them: a
    sample outside [0, W-1] x [0, H-1] is 0, inside it interpolates the 4 neighbours in float64 and
    rounds half up to uint8. frames (N, H, W, 3) uint8 tensor; inv: crop_to_frame output ->
    (N, h, w, 3) uint8."""
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
    """scipy.ndimage.gaussian_filter(sigma, radius, mode='reflect') over the last two axes of
    float32 heatmaps (a tensor, on any device): rows then columns, each pass accumulated in float64
    in scipy's symmetric order (centre, then the pairs from the outermost in) and stored as float32,
    so the result is bit-identical."""
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
    """float32 heatmaps (N, K, h, w) -> keypoints (N, K, 2) float32 frame pixels, scores (N, K):
    argmax, DARK Newton step on the log of the blurred heatmap, then the UDP map back
    (keypoints_from_heatmaps)."""
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
    # (summed in float64: exact, where the reference's in-place float32 sum loses integers past
    # 2**24 (> ~300 crops))
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
    """pipeline.PoseEstimator: `pose(images, boxes, keys=None) -> keypoints (N, 17, 2), scores
    (N, 17)` float64, COCO-17 order, frame pixels; one xyxy box per image. Boxes that are not finite
    or have no area give zeros. dataset_index: the ViTPose+ expert (0 = COCO); ignored by
    single-expert models. dtype: the backbone's; the head and the keypoint decoding run in float32
    regardless. No flip test (the reference does none by default)."""

    keypoint_format = "coco"

    def __init__(self, path, device="cpu", dtype=torch.float32, dataset_index=0, batch_size=32):
        self.model = ViTPose.from_pretrained(path, device, dtype)
        self.device, self.dataset_index, self.batch_size = device, dataset_index, batch_size

    def preprocess(self, frames, xywh):
        """Same-size frames (N, H, W, 3) uint8 + COCO boxes (N, 4) -> crops (N, 3, h, w) float32,
        centre, scale."""
        c = self.model.c
        center, scale = box_to_center_scale(xywh, c)
        u8 = warp_crops(torch.as_tensor(frames).to(self.device), crop_to_frame(center, scale, c),
                        c.image_size)
        return normalize(u8, c, self.device), center, scale

    @torch.no_grad()
    def estimate(self, images, xywh):
        """images: list of (H, W, 3) uint8; xywh (N, 4) boxes -> keypoints (N, K, 2) float32,
        scores (N, K)."""
        K = self.model.c.num_keypoints
        kp, sc = np.zeros((len(images), K, 2), np.float32), np.zeros((len(images), K), np.float32)
        groups = {}  # frames of one shape are warped together
        for n, im in enumerate(images):
            groups.setdefault(im.shape, []).append(n)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                sel = idx[s:s + self.batch_size]
                pixels, center, scale = self.preprocess(np.stack([images[n] for n in sel]),
                                                        xywh[sel])
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
