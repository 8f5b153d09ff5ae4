"""
What the MIMIC model sees and what it predicts, defined once: the prompt, the boxed and resized
frames, the token ids with their M-RoPE positions (InputEncoder, collate_inputs), and the (sin, cos)
encoding of the 22 joint angles. Training (data.WindowDataset), evaluation, sampling and the policy
server all build their inputs with these, so the released model is always fed what it was trained on
(docs/conventions.md states the rules).
"""

import numpy as np
import torch
from PIL import Image, ImageDraw

import qwen3vl
import qwen3vl_processor


def encode_angles(a):
    """(..., 22) -> (..., 44) interleaved [sin a1, cos a1, sin a2, cos a2, ...] (numpy or torch)."""
    if isinstance(a, torch.Tensor):
        return torch.stack([torch.sin(a), torch.cos(a)], -1).flatten(-2)
    a = np.asarray(a)
    return np.stack([np.sin(a), np.cos(a)], -1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def decode_angles(x):
    """(..., 44) interleaved sin/cos -> (..., 22) radians in [-pi, pi] via atan2 (numpy or torch)."""
    if isinstance(x, torch.Tensor):
        return torch.atan2(x[..., 0::2], x[..., 1::2])
    x = np.asarray(x)
    return np.arctan2(x[..., 0::2], x[..., 1::2])


def prompt_text(task: str, instruction: str) -> str:
    """The text after the images: the action class, then the imperative instruction."""
    return f"Task: {task}. Instruction: {instruction}"


def draw_box(image, box, width=3, color=(0, 255, 0)):
    """Draw the target box in place, `width` px centred on the box edges as OpenCV's thick
    lines are; coordinates truncated to int and clamped to the frame (as the original).
    A NaN box draws nothing."""
    box = np.asarray(box, dtype=np.float64)
    if not np.all(np.isfinite(box)):
        return image
    w, h = image.size
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = (min(max(v, 0), w - 1) for v in (x1, x2))
    y1, y2 = (min(max(v, 0), h - 1) for v in (y1, y2))
    if x2 < x1 or y2 < y1:  # an inverted box: nothing sensible to draw
        return image
    r = width // 2
    ImageDraw.Draw(image).rectangle([x1 - r, y1 - r, x2 + r, y2 + r], outline=color, width=width)
    return image


def frame_image(frame, box, image_size: int, mirror: bool = False) -> Image.Image:
    """One input frame as the model sees it: the full source frame (PIL or uint8 (H, W, 3)) in
    RGB, the target person's box (x1, y1, x2, y2 in its pixels; NaN = unknown) drawn in green,
    3 px wide, optionally mirrored (the flip augmentation mirrors frame and box together), then
    resized to image_size^2 (aspect ratio not kept)."""
    im = frame.convert("RGB") if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, np.uint8))
    im = draw_box(im.copy() if im is frame else im, box)  # never draw on the caller's image
    if mirror:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im.resize((image_size, image_size), Image.BILINEAR)


class InputEncoder:
    """(images, text) -> one sample's model input: the frames as uint8 (F, S, S, 3), the token ids
    of the chat prompt (one user turn: the F images, then the text; generation prompt; no system
    turn), their M-RoPE positions (3, L) and the positions of the image tokens. Pixels are patched
    on the model's device (uint8 crosses the bus, and DataLoader workers' shared memory holds 16x
    less than float patches with their temporal copy); positions are computed here, on the CPU, so
    a training or control step has no host-device sync. Picklable: runs in DataLoader workers."""

    def __init__(self, processor, qwen_config, image_size):
        self.processor, self.qwen_config, self.image_size = processor, qwen_config, image_size
        self.pad_token_id = processor.pad_token_id
        ic = processor.image_config
        kept = qwen3vl_processor.smart_resize(image_size, image_size, ic.patch_size * ic.merge_size,
                                              ic.min_pixels, ic.max_pixels)
        if kept != (image_size, image_size):  # frames are patched as they are (no resize)
            raise ValueError(f"the processor would resize {image_size}x{image_size} frames to {kept}: image_size must "
                             f"be a multiple of {ic.patch_size * ic.merge_size} within its min/max_pixels")
        self.grid = (1, image_size // ic.patch_size, image_size // ic.patch_size)

    def __call__(self, images, text) -> dict:
        S = self.image_size
        images = [im if im.size == (S, S) else im.resize((S, S), Image.BILINEAR) for im in images]
        frames = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))  # (F, S, S, 3)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True)
        grids = torch.tensor([self.grid] * len(images))
        ids = torch.tensor(self.processor.token_ids(prompt, grids), dtype=torch.int64)  # (L,)
        position_ids, _ = qwen3vl.rope_index(self.qwen_config, ids[None], grids)  # (3, 1, L)
        image_positions = (ids == self.processor.image_token_id).nonzero().squeeze(1)
        return {"frames": frames, "input_ids": ids, "position_ids": position_ids[:, 0],
                "image_positions": image_positions}


INPUT_KEYS = ("frames", "input_ids", "position_ids", "image_positions")


def collate_inputs(items, pad_token_id=0) -> dict:
    """InputEncoder outputs -> a batch: frames (B, F, S, S, 3) uint8; input_ids (B, L) right-padded
    with pad_token_id; attention_mask (B, L), 0 on padding; position_ids (3, B, L), 0 on padding
    (as rope_index gives for masked slots); visual_rows (N,) the flat indices b * L + s of all
    image tokens, batch-major."""
    L = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), L), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(items), L), dtype=torch.int64)
    pos = torch.zeros((3, len(items), L), dtype=torch.int64)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n], mask[b, :n], pos[:, b, :n] = it["input_ids"], 1, it["position_ids"]
    rows = torch.cat([it["image_positions"] + b * L for b, it in enumerate(items)])
    return {"frames": torch.stack([it["frames"] for it in items]), "input_ids": ids, "attention_mask": mask,
            "position_ids": pos, "visual_rows": rows}


BATCH_KEYS = ("frames", "input_ids", "attention_mask", "position_ids", "visual_rows")  # collate_inputs' output
