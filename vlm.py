"""The VLM stage of pipeline.py: a chat client (an OpenAI-compatible HTTP server, or our qwen3vl.py
on a local checkpoint), the three prompts (target oracle, judge, captioner), the images they are
shown, and the parsing of the replies. A failed or garbled call is a record, never an exception, so
one bad answer cannot stop a shard.

    from vlm import VLMClient, LocalQwen3VL, judge_clip, caption_clip
    client = VLMClient("http://host:8000/v1", "MODEL")        # or VLMClient(local=LocalQwen3VL("ckpt/Qwen3-VL-8B"))
    client.chat([frame], "Describe the motion.")             # -> {"text", "error", "attempts", "seconds"}
    judge_clip(client, frames, kp2d, scores, "jump", "Jump.", cfg)   # cfg: pipeline.PipelineConfig
"""

import base64
import io
import json
import re
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import model_io

# --------------------------------------------------------------------------------------------------
# Transport: one chat call = images + a prompt -> a reply record (HTTP or a local model)


def _jpeg_b64(image, max_side):
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im = im.convert("RGB")
    s = max_side / max(im.size)
    if s < 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LocalQwen3VL:
    """Backend on a local Qwen3-VL checkpoint folder through our qwen3vl.py (greedy unless
    temperature > 0)."""

    def __init__(self, path, device="cpu", dtype=None):
        import torch

        import qwen3vl
        import qwen3vl_processor
        self.torch = torch
        self.processor = qwen3vl_processor.Qwen3VLProcessor.from_pretrained(path)
        self.model = qwen3vl.Qwen3VL.from_pretrained(path, dtype=dtype or torch.bfloat16,
                                                     device=device)
        self.device = device
        eos = [self.processor.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.eos = [i for i in eos if i is not None]

    def __call__(self, images, prompt, max_tokens, temperature):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}])
        pil = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
        enc = self.processor(text, images=pil or None)
        mv = lambda k: enc[k].to(self.device) if k in enc and enc[k] is not None else None  # noqa: E731
        out = self.model.generate(mv("input_ids"), attention_mask=mv("attention_mask"),
                                  pixel_values=mv("pixel_values"),
                                  image_grid_thw=mv("image_grid_thw"), max_new_tokens=max_tokens,
                                  do_sample=temperature > 0, temperature=max(temperature, 1e-5),
                                  top_p=0.9 if temperature > 0 else 1.0, eos_token_id=self.eos,
                                  pad_token_id=self.processor.pad_token_id)
        return self.processor.decode(out[0], skip_special_tokens=True)


class VLMClient:
    """One chat call = images (RGB arrays or PIL) + a text prompt -> a reply record, never an
    exception: {"text": str | None, "error": str | None, "attempts": int, "seconds": float}.
    Backends: an OpenAI-compatible HTTP endpoint (`url` = base like http://host:8000/v1; POST
    /chat/completions with images as base64 JPEG data URLs, images first, text last; stdlib urllib)
    or `local` (a LocalQwen3VL or any callable(images, prompt, max_tokens, temperature) -> str).
    Transient failures (connection errors, timeouts, HTTP 408/429/5xx, an unparseable envelope) are
    retried `retries` times with exponential backoff."""

    def __init__(self, url="", model="", api_key="", timeout=120.0, retries=3, backoff=1.0,
                 local=None, max_side=640, sleep=time.sleep):
        if not url and local is None:
            raise ValueError("VLMClient needs an HTTP url or a local backend")
        self.url, self.model, self.api_key, self.timeout = url.rstrip("/"), model, api_key, timeout
        self.retries, self.backoff, self.local, self.max_side, self.sleep = retries, backoff, local, max_side, sleep

    def _http(self, images, prompt, max_tokens, temperature):
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + _jpeg_b64(im, self.max_side)}}
                   for im in images] + [{"type": "text", "text": prompt}]
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + "/chat/completions", data=body, headers=headers,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            reply = json.loads(resp.read().decode("utf-8"))
        text = reply["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise ValueError(f"reply content is {type(text).__name__}, not text")
        return text

    def chat(self, images, prompt, max_tokens=1024, temperature=0.0):
        t0, err = time.time(), None
        for attempt in range(1, self.retries + 2):
            try:
                if self.local is not None:
                    text = self.local(images, prompt, max_tokens, temperature)
                else:
                    text = self._http(images, prompt, max_tokens, temperature)
                return {"text": text, "error": None, "attempts": attempt,
                        "seconds": round(time.time() - t0, 3)}
            except urllib.error.HTTPError as e:
                err = f"HTTP {e.code}"
                if e.code not in (408, 429) and e.code < 500:
                    break  # a client error does not get better by retrying
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # garbage instead of a chat completion
                err = f"BAD_REPLY {type(e).__name__}: {e}"[:200]
            except Exception as e:  # a local backend failing (out of memory, ...) is recorded, never fatal
                err = f"{type(e).__name__}: {e}"[:200]
            if attempt <= self.retries:
                self.sleep(self.backoff * 2 ** (attempt - 1))
        return {"text": None, "error": err, "attempts": attempt,
                "seconds": round(time.time() - t0, 3)}


# --------------------------------------------------------------------------------------------------
# Replies: the JSON slice of a reply, and a regex repair of one boolean field


def strip_thinking(text):
    """A reply without its reasoning: everything up to the last </think> (Qwen3 Thinking chat
    templates open the <think> block in the prompt, so the reply has only the closing tag), then any
    <think>... left open."""
    text = text or ""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return re.sub(r"<think>.*", "", text, flags=re.S)


def _json_object(text):
    """The JSON object of a VLM reply: thinking stripped, the slice from the first '{' to
    the last '}'."""
    text = strip_thinking(text)
    i, j = text.find("{"), text.rfind("}")
    if i < 0 or j <= i:
        return None, text
    try:
        obj = json.loads(text[i:j + 1])
        return (obj if isinstance(obj, dict) else None), text
    except ValueError:
        return None, text


def _bool_field(obj, text, key):
    v = obj.get(key) if obj is not None else None
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        v = v.strip().lower() == "true"
    if not isinstance(v, bool):
        m = re.search(rf'"?{key}"?\s*[:=]\s*"?(true|false)', text, flags=re.I)
        v = m.group(1).lower() == "true" if m else None
    return v


# --------------------------------------------------------------------------------------------------
# Oracle: one frame with numbered candidate boxes -> {"chosen_index": k}; an index outside
# 1..n is no answer


PICK_PROMPT = (
    "One video frame with {n} numbered bounding boxes, each outlining a person. Action label: {action}. "
    "Instruction: \"{text}\".\nTASK: Pick the SINGLE numbered person who is the main subject performing this action "
    "or who is most likely to perform it in this clip. If several look similar, prefer the largest, most centered, "
    "most engaged one. You MUST return one number from 1 to {n}.\n"
    "Reply with ONLY this JSON: {{\"chosen_index\": <int 1..{n}>, \"reason\": \"<under 20 words>\"}}")

_PALETTE = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (255, 0, 255),
            (0, 220, 220)]


def draw_numbered_boxes(image, boxes):
    """The oracle's view: each candidate box outlined in a palette colour with its 1-based number on
    a filled tag."""
    im = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(14, im.height // 18))
    for n, b in enumerate(boxes):
        col = _PALETTE[n % len(_PALETTE)]
        x1, y1, x2, y2 = [float(v) for v in b[:4]]
        draw.rectangle([x1, y1, x2, y2], outline=col, width=4)
        tx, ty, bx, by = draw.textbbox((x1 + 4, y1 + 2), str(n + 1), font=font)
        draw.rectangle([tx - 3, ty - 3, bx + 3, by + 3], fill=col)
        draw.text((x1 + 4, y1 + 2), str(n + 1), fill=(0, 0, 0), font=font)
    return im


def parse_pick(text, n):
    """A picker reply -> 0-based candidate index, or None (no/garbled answer or outside 1..n).
    Accepts the JSON {"chosen_index": k, ...}, else a regex repair of `"chosen_index": k`."""
    obj, text = _json_object(text)
    k = obj.get("chosen_index") if obj is not None else None
    if obj is None:
        m = re.search(r'"?chosen_index"?\s*[:=]\s*"?(-?\d+)', text)
        k = int(m.group(1)) if m else None
    if isinstance(k, str) and k.strip().lstrip("-").isdigit():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= k <= n:
        return None
    return int(k) - 1


# --------------------------------------------------------------------------------------------------
# Judge: evenly spaced skeleton overlays (red = right, blue = left, green = spine), JPEG q75 at max
# side 640, temperature 0 -> {tracking_consistent, motion_matches}; a missing field counts as False


JUDGE_PROMPT = (
    "{n} video frames (chronological) with a colored skeleton overlay marking the tracked subject (red = right side, "
    "blue = left side, green = spine). Action label: {action}. Instruction: \"{text}\".\n"
    "Evaluate strictly. Default to FALSE when uncertain.\n"
    "(1) tracking_consistent is FALSE if ANY of: the skeleton is on a different person in any frame; there is a "
    "scene change or hard cut; the person is off-screen, barely visible or tiny for most of the clip; the skeleton "
    "floats off the person or jumps between people. TRUE only if the same clearly visible person is cleanly "
    "tracked throughout.\n"
    "(2) motion_matches is TRUE if the person is broadly performing \"{action}\" or a plausible part of the "
    "instruction; FALSE if mostly still, unrelated or unclear.\n"
    "Reply with ONLY this JSON: {{\"tracking_consistent\": true/false, \"motion_matches\": true/false, "
    "\"explanation\": \"<under 15 words>\"}}")

_SKELETON = [(0, 1, "r"), (1, 2, "r"), (2, 3, "r"), (0, 4, "l"), (4, 5, "l"), (5, 6, "l"),
             (0, 7, "c"), (7, 8, "c"), (8, 9, "c"), (9, 10, "c"), (8, 11, "l"), (11, 12, "l"),
             (12, 13, "l"), (8, 14, "r"), (14, 15, "r"), (15, 16, "r")]
_SIDE_COLOUR = {"r": (230, 30, 30), "l": (40, 90, 255), "c": (40, 200, 40)}


def draw_skeleton(image, kp2d, scores, thr=0.3):
    """The judge's view: Human3.6M bones over the frame, red = right, blue = left, green = spine."""
    im = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    wdt = max(2, im.height // 120)
    for a, b, side in _SKELETON:
        if scores[a] > thr and scores[b] > thr:
            draw.line([tuple(map(float, kp2d[a])), tuple(map(float, kp2d[b]))],
                      fill=_SIDE_COLOUR[side], width=wdt)
    return im


def parse_verdict(text):
    """Judge reply -> {"tracking_consistent", "motion_matches", "explanation", "judged"}; a
    missing or garbled field is False (strict default) and judged says whether both booleans were
    actually read."""
    obj, body = _json_object(text)
    tc, mm = _bool_field(obj, body, "tracking_consistent"), _bool_field(obj, body, "motion_matches")
    expl = obj.get("explanation", "") if obj is not None else ""
    return {"tracking_consistent": tc is True, "motion_matches": mm is True,
            "explanation": str(expl)[:200], "judged": tc is not None and mm is not None}


def judge_clip(vlm, frames, kp2d, scores, action, text, cfg):
    """The v2 judge: judge_frames evenly spaced skeleton overlays + JUDGE_PROMPT, greedy -> verdict
    record (parse_verdict fields + error, attempts, raw reply kept for audit)."""
    sel = np.linspace(0, len(frames) - 1, cfg.judge_frames).round().astype(int)
    imgs = [draw_skeleton(frames[i], kp2d[i], scores[i]) for i in sel]
    prompt = JUDGE_PROMPT.format(n=len(imgs), action=action or "unknown", text=(text or "")[:300])
    reply = vlm.chat(imgs, prompt, max_tokens=2048, temperature=0.0)
    verdict = parse_verdict(reply["text"]) if reply["text"] is not None else parse_verdict("")
    return {**verdict, "error": reply["error"], "attempts": reply["attempts"],
            "raw": (reply["text"] or "")[:2000]}


# --------------------------------------------------------------------------------------------------
# Captions: frames with the green target box -> 1-3 imperative sentences (greedy; the
# original sampled at 0.7)


CAPTION_PROMPT = (
    "These {n} frames (chronological) show a person, outlined by a green box, performing: {action}.\n"
    "Rewrite only the physical motion as a sequence of imperative commands. Do not mention the person, actor, box, "
    "body type, clothing, scene, environment, animals, spectators or camera; mention only objects the body "
    "physically interacts with. No narration: imperative verbs only, starting immediately with a command. Include "
    "fine-grained details (body position, limb use, order of steps) so the motion could be reproduced precisely. "
    "Format: 1-3 short sentences.\nExamples: \"Slide into a split, roll forward across the floor, and push up into "
    "a low crouch.\" \"Raise both arms overhead, then bend forward and touch your toes.\"")


def parse_caption(text):
    """Captioner reply -> the imperative description (thinking, 'Description:' headers, a
    stray 'assistant' line and quotes removed; at most 3 sentences), or None when nothing
    usable remains."""
    text = strip_thinking(text).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip().lower() != "assistant"]
    for i, ln in enumerate(lines):
        if ln.lower().startswith("description"):
            rest = ln.split(":", 1)[1].strip() if ":" in ln else ""
            lines = ([rest] if rest else []) + lines[i + 1:]
            break
    text = " ".join(lines).strip().strip("\"'").strip()
    sentences = re.findall(r"[^.!?]+[.!?]?", text)
    text = " ".join(s.strip() for s in sentences[:3]).strip()
    return text if len(text) >= 3 and re.search(r"[A-Za-z]", text) else None


def caption_clip(vlm, frames, boxes, action, cfg):
    """The 1.9 captioner: caption_frames evenly spaced frames with the green target box +
    CAPTION_PROMPT. Greedy (the original sampled at temperature 0.7), so a rerun gives the same
    text. -> {"text" | None, "error", "raw"}."""
    sel = np.linspace(0, len(frames) - 1, cfg.caption_frames).round().astype(int)
    imgs = [model_io.draw_box(Image.fromarray(frames[i]), boxes[i]) for i in sel]
    reply = vlm.chat(imgs, CAPTION_PROMPT.format(n=len(imgs), action=action or "a motion"),
                     max_tokens=150, temperature=0.0)
    cap = parse_caption(reply["text"]) if reply["text"] is not None else None
    return {"text": cap, "error": reply["error"] or (None if cap else "EMPTY_CAPTION"),
            "raw": (reply["text"] or "")[:1000]}
