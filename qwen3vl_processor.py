"""The Qwen3-VL processor in plain Python: chat template, image / video preprocessing, tokenization.

  text  -> apply_chat_template: the Qwen3-VL-Instruct template as Python, no default system prompt
  image -> RGB -> smart_resize (sides multiples of 32) -> PIL bicubic -> rescale, normalise
           -> 2 equal frames -> patches in merge-window order: pixel_values (patches, 3*2*16*16)
           float32, image_grid_thw (n, 3)
  video -> frames sampled at `fps` -> one smart_resize per clip -> uint8 antialiased bicubic
           -> normalise -> even frame count -> patches, video_grid_thw, one "<t seconds>" per
           temporal patch
Each <|image_pad|> / <|video_pad|> is then expanded to its number of merged tokens and the text
is tokenized with the checkpoint's tokenizer.json. The outputs are those of transformers'
Qwen3VLProcessor with its PIL image processor, with no transformers, jinja2 or torchvision at run
time.

    proc = Qwen3VLProcessor.from_pretrained("/models/Qwen3-VL-4B-Instruct")
    content = [{"type": "image"}, {"type": "text", "text": "Hi"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    batch = proc(text=[text], images=[pil_image], padding_side="left")  # input_ids, pixel_values, ...
"""

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer


@dataclass
class Qwen3VLPreprocessConfig:
    """Settings of one vision preprocessor (one instance for images, one for videos)."""

    patch_size: int = 16  # ViT patch side in pixels
    temporal_patch_size: int = 2  # frames per Conv3d patch; a still image is repeated to fill it
    merge_size: int = 2  # 2x2 patches -> 1 LLM token: sides are multiples of 16 * 2 = 32
    min_pixels: int = 65536  # size["shortest_edge"], despite the name a bound on h*w (t*h*w)
    max_pixels: int = 16777216  # size["longest_edge"]
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL code; 3 = BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    # video only
    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False  # qwen-vl-utils' per-frame cap; off in transformers
    max_video_tokens: int = 768  # per-frame token ceiling used by cap_pixels_per_frame

    @classmethod
    def from_hf(cls, d, kind):
        """Build from a preprocessor_config.json dict. Missing keys take the defaults of the
        transformers class that would read the file: `Qwen2VLImageProcessor` (kind="image") or
        `Qwen3VLVideoProcessor` (kind="video")."""
        if kind == "image":  # Qwen2-VL's defaults (patch 14, CLIP stats): Qwen3-VL files set them
            base = dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                        image_mean=(0.48145466, 0.4578275, 0.40821073),
                        image_std=(0.26862954, 0.26130258, 0.27577711))
        elif kind == "video":
            base = dict(patch_size=16, min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768,
                        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        else:
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
        size = d.get("size") or {}
        base["min_pixels"] = size.get("shortest_edge", base["min_pixels"])
        base["max_pixels"] = size.get("longest_edge", base["max_pixels"])
        if kind == "image":  # the image class lets legacy top-level min/max_pixels override size
            base["min_pixels"] = d.get("min_pixels") or base["min_pixels"]
            base["max_pixels"] = d.get("max_pixels") or base["max_pixels"]
        for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample", "do_resize",
                  "do_rescale", "do_normalize", "do_convert_rgb", "fps", "min_frames", "max_frames",
                  "do_sample_frames", "cap_pixels_per_frame", "max_video_tokens"):
            if d.get(k) is not None:
                base[k] = d[k]
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                v = d[k]
                base[k] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        return cls(**base)


# -----------------------------------------------------------------------------
# target sizes


def smart_resize(height, width, factor=32, min_pixels=65536, max_pixels=16777216):
    """Image target (h, w): multiples of `factor`, h*w within [min_pixels, max_pixels],
    aspect ratio kept. Python's round() rounds half to even: 400/32 = 12.5 -> 12 -> 384
    (a C/Rust port rounding up gets 416)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames, height, width, temporal_factor=2, factor=32, min_pixels=128 * 32 * 32,
                       max_pixels=768 * 32 * 32):
    """Video target (h, w): like smart_resize but the pixel budget counts t_bar*h*w over the whole
    clip, and sides shorter than `factor` are first scaled up (int-truncated) instead of failing."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# -----------------------------------------------------------------------------
# pixels


def to_rgb_pil(image):
    """PIL image / uint8 array [H, W], [H, W, 1|3|4] -> PIL RGB image, transparency composited
    onto white. Mirrors transformers' convert_to_rgb: PIL inputs use PIL's own alpha_composite
    (which also handles palette transparency), arrays a float64 blend rounded half to even
    (identical results for all 256x256 value/alpha pairs)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    a = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W, C), got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be channels-last (H, W) or (H, W, 1|3|4), got shape {tuple(a.shape)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))  # (H, W, 3) uint8 -> mode RGB


def _pixel_lut(cfg, fused):
    """(3, 256) float32 table: uint8 value -> normalized value, per channel. A table lookup is exact
    because the input has only 256 values, and it replays the reference's dtype steps:
      fused=False (PIL image processor): x = float32(float64(u) * rescale); (x - mean) / std in float32.
      fused=True (torchvision video processor): (float32(u) - mean/rescale) / (std/rescale) in float32."""
    u = np.arange(256)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
    std = torch.tensor(cfg.image_std, dtype=torch.float32)
    if fused:
        x = torch.from_numpy(u.astype(np.float32))[None].repeat(3, 1)  # (3, 256)
        if cfg.do_normalize:
            if cfg.do_rescale:  # float32 tensor * python float stays float32, as the reference
                mean, std = mean * (1.0 / cfg.rescale_factor), std * (1.0 / cfg.rescale_factor)
            x = (x - mean[:, None]) / std[:, None]
        elif cfg.do_rescale:
            x = x * cfg.rescale_factor
        return x.numpy()
    x = (u.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else u).astype(np.float32)
    x = np.repeat(x[None], 3, axis=0)  # (3, 256)
    if cfg.do_normalize:
        x = (x - mean.numpy()[:, None]) / std.numpy()[:, None]
    return x


def _pixel_lut_apply(lut, a):
    """uint8 (..., 3) -> float32 (..., 3) through the per-channel table (np.take: no fancy index)."""
    if (lut == lut[0]).all():  # the usual case (mean = std = 0.5 for every channel): one table
        return np.take(lut[0], a)
    return np.stack([np.take(lut[c], a[..., c]) for c in range(3)], axis=-1)


def _vision_patchify(frames, cfg):
    """frames (T, H, W, C) float32, T a multiple of temporal_patch_size -> (T/tp * H/p * W/p,
    C*tp*p*p). Rows in merge-window order (merged row, merged col, row in window, col in window) so
    each 2x2 merge group is 4 consecutive rows; features channel-major, then frame, then pixel row,
    pixel col (= the Conv3d weight layout)."""
    t, h, w, c = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)  # (gt, tp, bh, mh, ph, bw, mw, pw, C)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, bh, bw, mh, mw, C, tp, ph, pw)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def _preprocess_one_image(image, cfg, lut):
    if not cfg.do_convert_rgb:  # the reference would keep 1 or 4 channels and fail later
        shape = np.asarray(image).shape if not isinstance(image, Image.Image) else None
        if (image.mode != "RGB") if shape is None else (len(shape) != 3 or shape[-1] != 3):
            raise ValueError("do_convert_rgb=False needs 3-channel RGB images")
    img = to_rgb_pil(image)  # also turns arrays into PIL images, which the resize needs
    factor = cfg.patch_size * cfg.merge_size
    if cfg.do_resize:
        h, w = smart_resize(img.height, img.width, factor, cfg.min_pixels, cfg.max_pixels)
        img = img.resize((w, h), resample=cfg.resample)
    elif img.height % factor or img.width % factor:
        raise ValueError(f"with do_resize=False image sides must be multiples of {factor}, "
                         f"got {img.height}x{img.width}")
    a = np.asarray(img)  # (H, W, 3) uint8
    x = _pixel_lut_apply(lut, a)  # (H, W, 3) float32
    x = np.broadcast_to(x[None], (cfg.temporal_patch_size,) + x.shape)  # still image -> tp identical frames
    return _vision_patchify(x, cfg)


def preprocess_images(images, cfg=None):
    """images: list of PIL images or uint8 (H, W, C) arrays -> (pixel_values float32 [sum patches,
    C*tp*p*p], image_grid_thw int64 [n, 3]); grids count patches, not merged tokens."""
    cfg = cfg or Qwen3VLPreprocessConfig()
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_images got an empty list")
    lut = _pixel_lut(cfg, fused=False)
    rows, grids = [], []
    for image in images:
        r, g = _preprocess_one_image(image, cfg, lut)
        rows.append(r)
        grids.append(g)
    return torch.from_numpy(np.concatenate(rows, 0)), torch.tensor(grids, dtype=torch.int64)


def pixel_lut(cfg) -> torch.Tensor:
    """(256, 3) float32: uint8 -> normalised value per channel, as the image processor computes it."""
    return torch.from_numpy(np.ascontiguousarray(_pixel_lut(cfg, fused=False).T))


def pixel_values_from_frames(frames: torch.Tensor, cfg=None, lut: torch.Tensor = None):
    """frames (N, H, W, 3) uint8, on any device, each already at a size the processor keeps (sides
    multiples of patch_size * merge_size, min_pixels <= H*W <= max_pixels) -> (pixel_values
    (N*gh*gw, C*tp*p*p) float32 on that device, image_grid_thw (N, 3) int64 on the CPU), equal to
    preprocess_images on the same frames. Lets uint8 frames cross to the GPU (8x fewer bytes than
    the float patches, 16x with the temporal copy) and be patched there. `lut`: pixel_lut(cfg)
    already on the device (else built and copied per call)."""
    cfg = cfg or Qwen3VLPreprocessConfig()
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    n, h, w, c = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if h % (p * m) or w % (p * m) or not cfg.min_pixels <= h * w <= cfg.max_pixels:
        raise ValueError(f"frames of {h}x{w} would be resized by the processor (sides must be multiples of {p * m}, "
                         f"area in [{cfg.min_pixels}, {cfg.max_pixels}])")
    lut = (pixel_lut(cfg) if lut is None else lut).to(frames.device, non_blocking=True)
    x = lut[frames.long(), torch.arange(3, device=frames.device)]  # (N, H, W, 3) float32, per-channel lookup
    gh, gw = h // p, w // p
    # a still image: tp copies in time; then (N, bh, bw, mh, mw, C, tp, ph, pw), _vision_patchify's
    x = x.view(n, 1, gh // m, m, p, gw // m, m, p, c).expand(n, tp, gh // m, m, p, gw // m, m, p, c)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.int64)
    return x.reshape(n * gh * gw, c * tp * p * p), grid


def sample_video_frame_indices(total_num_frames, video_fps, cfg):
    """Indices of the frames kept: int(duration * cfg.fps) of them, clamped to [min_frames,
    max_frames] and to the clip length, spread uniformly (np.round: half to even)."""
    n = int(total_num_frames / video_fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total_num_frames)
    return np.linspace(0, total_num_frames - 1, n).round().astype(int)


def video_timestamps(frames_indices, video_fps, temporal_patch_size=2):
    """Seconds per temporal patch: indices padded to a multiple of tp with the last one, /fps, then
    the mean of the first and last frame of each patch."""
    idx = [int(i) for i in frames_indices]
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    ts = [i / video_fps for i in idx]
    return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2 for i in range(0, len(ts), temporal_patch_size)]


def _video_frames_uint8(frames):
    """A list of PIL frames / uint8 arrays, or a uint8 (T, H, W, 3) array -> np.uint8 (T, H, W, 3)."""
    if isinstance(frames, (list, tuple)):
        if len(frames) == 0:
            raise ValueError("video has no frames")
        return np.stack([np.asarray(to_rgb_pil(f)) for f in frames])
    a = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"video arrays must be uint8 (T, H, W, 3), got {a.dtype} {tuple(a.shape)}")
    return a


def preprocess_video(frames, fps=None, frames_indices=None, cfg=None, do_sample_frames=None):
    """One video -> (pixel_values_videos float32 [gt*gh*gw, C*tp*p*p], grid (gt, gh, gw), timestamps
    per temporal patch, the source-frame indices used). frames: the decoded clip (uint8 (T, H, W,
    3) or list of frames); fps: its frame rate (None -> 24, as transformers); frames_indices: source
    indices of `frames` when they are already sampled (then no sampling is done)."""
    cfg = cfg or Qwen3VLPreprocessConfig.from_hf({}, "video")
    video = _video_frames_uint8(frames)
    fps = 24 if fps is None else fps
    sample = cfg.do_sample_frames if do_sample_frames is None else do_sample_frames
    if frames_indices is not None:
        if len(frames_indices) != len(video):
            raise ValueError(f"frames_indices has {len(frames_indices)} entries for {len(video)} frames")
        indices = np.asarray(frames_indices, dtype=int)
    elif sample:
        indices = sample_video_frame_indices(len(video), fps, cfg)
        video = video[indices]
    else:
        indices = np.arange(len(video))
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    factor = cfg.patch_size * cfg.merge_size
    t, _, h, w = x.shape
    if cfg.do_resize:
        max_pixels = cfg.max_pixels
        if cfg.cap_pixels_per_frame:  # budget per frame, as qwen-vl-utils does
            per_frame = max(min(cfg.max_video_tokens * factor * factor, cfg.max_pixels // t),
                            int(cfg.min_pixels * 1.05))
            max_pixels = per_frame * t
        nh, nw = smart_resize_video(t, h, w, cfg.temporal_patch_size, factor, cfg.min_pixels, max_pixels)
        # torchvision returns the input untouched when the size does not change
        if (nh, nw) != (h, w):
            if cfg.resample != 3:
                raise ValueError(f"video resizing supports resample=3 (bicubic) only, got {cfg.resample}")
            # torchvision's CPU resize of uint8 frames is exactly this call: uint8 out, clamped and
            # rounded after each pass (a float32 resize + round differs by up to ~20 levels)
            x = F.interpolate(x.contiguous(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    elif h % factor or w % factor:
        raise ValueError(f"with do_resize=False video sides must be multiples of {factor}, got {h}x{w}")
    a = x.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8
    v = _pixel_lut_apply(_pixel_lut(cfg, fused=True), a)  # (T, H, W, 3) float32
    if pad := -len(v) % cfg.temporal_patch_size:  # odd frame count: repeat the last frame
        v = np.concatenate([v, np.repeat(v[-1:], pad, axis=0)], 0)
    rows, grid = _vision_patchify(v, cfg)
    return torch.from_numpy(rows), grid, video_timestamps(indices, fps, cfg.temporal_patch_size), indices


# -----------------------------------------------------------------------------
# chat template (Qwen3-VL-Instruct, without tools)


def _chat_render_content(content, counts, add_vision_id, role):
    """User / tool content: a string, or {"type": "image"|"video"|"text", ...} items in a row."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{role} content must be a string or a list of items, got {type(content).__name__}")
    out = []
    for item in content:
        if not isinstance(item, dict):
            raise ValueError(f"{role} content items must be dicts, got {type(item).__name__}")
        # the template's tests, in its order: an item with an "image" key is an image
        if item.get("type") == "image" or "image" in item or "image_url" in item:
            counts[0] += 1
            out.append((f"Picture {counts[0]}: " if add_vision_id else "")
                       + "<|vision_start|><|image_pad|><|vision_end|>")
        elif item.get("type") == "video" or "video" in item:
            counts[1] += 1
            out.append((f"Video {counts[1]}: " if add_vision_id else "")
                       + "<|vision_start|><|video_pad|><|vision_end|>")
        elif "text" in item:
            out.append(item["text"])
        else:  # the template silently drops such an item; it is almost surely a caller bug
            raise ValueError(f"{role} content item has no image/video/text: {sorted(item)}")
    return "".join(out)


def _chat_text_only(content, role):
    """System / assistant content: the text of the items that have one (the template's rule)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{role} content must be a string or a list of items, got {type(content).__name__}")
    return "".join(item["text"] for item in content if isinstance(item, dict) and "text" in item)


def apply_chat_template(messages, add_generation_prompt=True, add_vision_id=False):
    """messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str | list of items}]
    -> prompt string. Byte-identical to the Qwen3-VL-Instruct jinja template
    (trim_blocks + lstrip_blocks) for these roles; no system prompt is injected. Where the template
    silently drops input (a system turn that is not first, unknown roles, assistant tool_calls that
    this port does not render) we raise instead."""
    if not messages:
        raise ValueError("messages is empty")
    out = []
    if messages[0]["role"] == "system":
        out.append("<|im_start|>system\n" + _chat_text_only(messages[0]["content"], "system") + "<|im_end|>\n")
    counts = [0, 0]  # images, videos seen so far (for add_vision_id)
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "system":
            if i != 0:
                raise ValueError(f"a system message is only rendered as the first message, found one at index {i}")
        elif role == "user":
            out.append("<|im_start|>user\n" + _chat_render_content(msg["content"], counts, add_vision_id, role)
                       + "<|im_end|>\n")
        elif role == "assistant":
            if msg.get("tool_calls"):
                raise ValueError("assistant tool_calls are not supported by this chat-template port")
            out.append("<|im_start|>assistant\n" + _chat_text_only(msg["content"], role) + "<|im_end|>\n")
        elif role == "tool":  # consecutive tool results share one user turn
            if i == 0 or messages[i - 1].get("role") != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + _chat_render_content(msg["content"], counts, add_vision_id, role)
                       + "\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                out.append("<|im_end|>\n")
        else:
            raise ValueError(f"unknown role {role!r} at index {i}; expected system, user, assistant or tool")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# -----------------------------------------------------------------------------
# processor


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(tok):
    return tok["content"] if isinstance(tok, dict) else tok


class Qwen3VLProcessor:
    """Prompt text + images/videos -> model inputs, as transformers' Qwen3VLProcessor."""

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    vision_start_token = "<|vision_start|>"
    vision_end_token = "<|vision_end|>"

    def __init__(self, tokenizer, image_config=None, video_config=None, pad_token="<|endoftext|>",
                 padding_side="right"):
        self.tokenizer = tokenizer
        self.image_config = image_config or Qwen3VLPreprocessConfig()
        self.video_config = video_config or Qwen3VLPreprocessConfig.from_hf({}, "video")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        # ids looked up by string, so any Qwen-family tokenizer works (151655... in the real vocab)
        ids = {}
        for name, tok in [("image", self.image_token), ("video", self.video_token), ("pad", pad_token),
                          ("vision_start", self.vision_start_token), ("vision_end", self.vision_end_token)]:
            ids[name] = tokenizer.token_to_id(tok)
            if ids[name] is None:
                raise ValueError(f"tokenizer has no token {tok!r} (needed as the {name} token)")
        self.image_token_id, self.video_token_id, self.pad_token_id = ids["image"], ids["video"], ids["pad"]
        self.vision_start_token_id, self.vision_end_token_id = ids["vision_start"], ids["vision_end"]

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Read tokenizer.json, tokenizer_config.json (pad token, padding side),
        preprocessor_config.json and, if present, video_preprocessor_config.json (else the video
        side reads preprocessor_config.json, as transformers does). A v5 processor_config.json with
        nested "image_processor" / "video_processor" wins."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"missing {tok_file}")
        tokenizer = Tokenizer.from_file(tok_file)
        tokenizer.no_padding()  # padding / truncation are done here, never inside tokenizers
        tokenizer.no_truncation()
        tcfg_file = os.path.join(path, "tokenizer_config.json")
        tcfg = _read_json(tcfg_file) if os.path.isfile(tcfg_file) else {}
        nested = {}
        if os.path.isfile(os.path.join(path, "processor_config.json")):
            nested = _read_json(os.path.join(path, "processor_config.json"))
        img_file = os.path.join(path, "preprocessor_config.json")
        vid_file = os.path.join(path, "video_preprocessor_config.json")
        img = nested.get("image_processor") or (_read_json(img_file) if os.path.isfile(img_file) else None)
        if img is None:
            raise FileNotFoundError(f"missing {img_file}")
        vid = nested.get("video_processor") or (_read_json(vid_file) if os.path.isfile(vid_file) else img)
        pad = tcfg.get("pad_token")
        kwargs.setdefault("pad_token", _token_content(pad) if pad is not None else "<|endoftext|>")
        kwargs.setdefault("padding_side", tcfg.get("padding_side", "right"))
        return cls(tokenizer, Qwen3VLPreprocessConfig.from_hf(img, "image"),
                   Qwen3VLPreprocessConfig.from_hf(vid, "video"), **kwargs)

    def apply_chat_template(self, messages, add_generation_prompt=True, add_vision_id=False):
        return apply_chat_template(messages, add_generation_prompt, add_vision_id)

    def _video_placeholder(self, grid, timestamps):
        # per temporal patch: "<t seconds>" as text, then its merged tokens between start/end
        n = grid[1] * grid[2] // self.video_config.merge_size ** 2
        block = self.vision_start_token + self.video_token * n + self.vision_end_token
        return "".join(f"<{t:.1f} seconds>" + block for t in timestamps[: grid[0]])

    def __call__(self, text, images=None, videos=None, video_metadata=None, padding=True, padding_side=None,
                 return_tensors="pt"):
        """text: str or list of str (one per sample) containing the template's placeholders.
        images: flat list over the whole batch, in order of appearance (nested per-sample
        lists are flattened). videos: list of clips (uint8 (T, H, W, 3) or lists of frames);
        video_metadata: optional list of dicts {"fps": ..., "frames_indices": ...} per clip
        (frames_indices given = frames already sampled). Returns input_ids, attention_mask,
        mm_token_type_ids (1 image pad, 2 video pad) and the vision tensors."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        if padding not in (True, False, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True/'longest' (pad to the longest) or False, got {padding!r}")
        padding = padding in (True, "longest")
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        if images is not None:
            images = [im for x in images for im in (x if isinstance(x, (list, tuple)) else [x])]
        # one placeholder per image / video over the batch, checked before any pixel work
        for tok, media, name in [(self.image_token, images, "images"), (self.video_token, videos, "videos")]:
            n_text = sum(t.count(tok) for t in texts)
            if n_text != (0 if media is None else len(media)):
                raise ValueError(f"the text has {n_text} {tok} placeholders but "
                                 f"{0 if media is None else len(media)} {name} were given")
        out = {}
        replacements = {self.image_token: [], self.video_token: []}
        if images is not None:
            pv, grid = preprocess_images(images, self.image_config)
            out["pixel_values"], out["image_grid_thw"] = pv, grid
            m2 = self.image_config.merge_size ** 2
            replacements[self.image_token] = [self.image_token * int(g.prod() // m2) for g in grid]
        if videos is not None:
            if video_metadata is not None and len(video_metadata) != len(videos):
                raise ValueError(f"got {len(videos)} videos but {len(video_metadata)} video_metadata entries")
            rows, grids = [], []
            for i, clip in enumerate(videos):
                meta = video_metadata[i] if video_metadata is not None else {}
                pv, grid, ts, _ = preprocess_video(clip, meta.get("fps"), meta.get("frames_indices"), self.video_config)
                rows.append(pv)
                grids.append(grid)
                replacements[self.video_token].append(self._video_placeholder(grid, ts))
            out["pixel_values_videos"] = torch.cat(rows, 0)
            out["video_grid_thw"] = torch.tensor(grids, dtype=torch.int64)
        texts = self._expand(texts, replacements)

        # one encode() per text, not encode_batch: that one starts a Rayon thread pool, which then
        # makes tokenizers warn and disable itself in forked DataLoader workers
        seqs = [self.tokenizer.encode(t, add_special_tokens=True).ids for t in texts]
        # every placeholder must become exactly one id (transformers' _check_special_mm_tokens)
        for tok, tid in [(self.image_token, self.image_token_id), (self.video_token, self.video_token_id)]:
            n_text, n_ids = sum(t.count(tok) for t in texts), sum(s.count(tid) for s in seqs)
            if n_text != n_ids:
                raise ValueError(f"the text has {n_text} {tok} but the tokenized ids have {n_ids}")
        lengths = [len(s) for s in seqs]
        if not padding and len(set(lengths)) > 1:
            raise ValueError(f"sequences have different lengths {lengths}; pass padding=True to batch them")
        L = max(lengths)
        ids = np.full((len(seqs), L), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(seqs), L), dtype=np.int64)
        for i, s in enumerate(seqs):
            sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
            ids[i, sl] = s
            mask[i, sl] = 1
        mm = (ids == self.image_token_id).astype(np.int64) + 2 * (ids == self.video_token_id).astype(np.int64)
        out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm, **out}
        if return_tensors == "pt":
            return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}
        return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def token_ids(self, text: str, image_grid_thw) -> list:
        """The input_ids __call__ gives for one `text` whose images have these grids, without
        touching pixels (the VLA patches its uint8 frames on the device: pixel_values_from_frames)."""
        grids = [tuple(g) for g in torch.as_tensor(image_grid_thw).tolist()]
        if text.count(self.image_token) != len(grids):
            raise ValueError(f"the text has {text.count(self.image_token)} {self.image_token} placeholders but "
                             f"{len(grids)} image grids were given")
        m2 = self.image_config.merge_size ** 2
        expanded = self._expand([text], {self.image_token: [self.image_token * (t * h * w // m2) for t, h, w in grids],
                                         self.video_token: []})[0]
        return self.tokenizer.encode(expanded, add_special_tokens=True).ids

    def _expand(self, texts, replacements):
        """Replace the i-th placeholder of each kind (counted across the batch) by its expansion.
        A video's start/pad/end triple is replaced whole (its expansion brings per-frame start/end
        markers); a bare <|video_pad|> (as some servers write it) is replaced alone."""
        iters = {k: iter(v) for k, v in replacements.items()}  # counts were checked in __call__
        triple = self.vision_start_token + self.video_token + self.vision_end_token
        pattern = "|".join(map(re.escape, (triple, self.image_token, self.video_token)))

        def sub(m):
            return next(iters[self.video_token if self.video_token in m.group(0) else self.image_token])

        return [re.sub(pattern, sub, t) for t in texts]

    def decode(self, ids, skip_special_tokens=False):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens=False):
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.tokenizer.decode(list(s), skip_special_tokens=skip_special_tokens) for s in sequences]


# The files of a checkpoint folder that the processor reads (copied along by conversions)
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json", "chat_template.jinja")

# Qwen's special tokens, in the order byte_level_tokenizer gives them ids 256, 257, ...
BYTE_TOKENIZER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|vision_start|>",
                           "<|vision_end|>", "<|box_start|>", "<|image_pad|>", "<|video_pad|>")


def _byte_to_unicode():
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE (printable bytes map
    to themselves, the others to code points from 256 on)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_level_tokenizer():
    """A real, dependency-free tokenizer for tiny models and CPU demos: one token per UTF-8 byte
    (ids 0..255, no merges) plus Qwen's special tokens (ids 256..264). Same pre-tokenizer/decoder
    family as Qwen's own tokenizer."""
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_TOKENIZER_SPECIALS))
    return tok
