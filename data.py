"""
MIMIC's data: the one-file-per-clip format and the training windows with their flip augmentation.

Clips: ONE safetensors file per clip holding its arrays and all its JPEG frames (concatenated,
with byte offsets), string metadata in the header, so a training window reads only the bytes of
its 4 frames; an index.jsonl per dataset folder lists the clips, so a dataset of 10^6 clips opens
without touching every file. WindowDataset yields the windows of docs/conventions.md (4 past
frames with the target box, prompt, state, 16 target steps as sin/cos), built through model_io,
the model's own input code. The angles themselves: kinematics.py.

    python data.py info data/demo      # dataset summary (or one .safetensors clip)
    python data.py index data/demo     # (re)write data/demo/index.jsonl
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save as _st_save

from kinematics import flip_pose3d, pose3d_to_angles
from model_io import INPUT_KEYS, collate_inputs, encode_angles, frame_image, prompt_text

# --------------------------------------------------------------------------------------------------
# Text mirroring (the flip augmentation)


_LR = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def flip_text(text):
    """Swap the whole words left <-> right, keeping case ("Left" -> "Right", "left-hand" too)."""
    def swap(m):
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        if w.isupper():
            return new.upper()
        return new.capitalize() if w[0].isupper() else new
    return _LR.sub(swap, text)


# --------------------------------------------------------------------------------------------------
# Clip format: one safetensors file per clip


FORMAT = "mimic-clip-v1"
INDEX_FILE = "index.jsonl"
# pipeline.py's verdicts, stored in a clip's extra as "True"/"False" and listed in its index entry
QUALITY_FLAGS = ("prog_good", "vlm_good", "strict")
_ARRAYS = {"boxes": (np.float32, (4,)), "pose3d": (np.float32, (17, 3)), "angles": (np.float32, (22,)),
           "src_frame_index": (np.int64, ()), "src_time": (np.float64, ())}
CLIP_ID_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
# Arrays that must be finite everywhere: one NaN angle turns every later training step into NaN.
# Boxes may be NaN (= unknown, drawn as nothing) but never infinite.
_FINITE = ("pose3d", "angles", "src_time")


def nonfinite_rows(name, arr):
    """Row indices of `arr` (one of _ARRAYS) that break its finiteness rule (_FINITE), a list."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        return []
    bad = ~np.isfinite(arr) if name in _FINITE else np.isinf(arr) if name == "boxes" else np.zeros(arr.shape, bool)
    return np.flatnonzero(bad.reshape(len(arr), -1).any(1)).tolist() if arr.ndim else []


def _rows_text(rows, first=0):
    shown = ", ".join(str(first + r) for r in rows[:8])
    return f"{len(rows)} frame{'s' if len(rows) > 1 else ''} ({shown}{', ...' if len(rows) > 8 else ''})"


def split_of(clip_id):
    """The split rule: val when int(md5(clip_id)[:8], 16) / 0xFFFFFFFF < 0.02, else train."""
    h = int(hashlib.md5(clip_id.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < 0.02 else "train"


@dataclass
class Clip:
    clip_id: str                 # unique, filesystem-safe
    frames_jpeg: list            # T full frames at 10 Hz, JPEG bytes, RGB
    boxes: np.ndarray            # (T, 4) float32 x1, y1, x2, y2 in frame pixels (NaN: no box)
    pose3d: np.ndarray           # (T, 17, 3) float32, camera frame (x right, y down, z forward)
    angles: np.ndarray           # (T, 22) float32 radians = pose3d_to_angles(pose3d)
    src_frame_index: np.ndarray  # (T,) int64 source video (or mocap) frame of each sample
    src_time: np.ndarray         # (T,) float64 seconds in the source
    src_fps: float               # fps of the source video (or mocap)
    width: int                   # frame width in pixels
    height: int
    action_class: str            # e.g. "jumping jacks"
    description: str             # imperative instruction
    video_id: str = ""           # source video id (several clips may share one)
    split: str = ""              # "" -> split_of(clip_id)
    extra: dict = field(default_factory=dict)  # free str -> str metadata


def clip_path(root, clip_id):
    """root/clips/<md5[:2]>/<clip_id>.safetensors: 256 sub-folders keep folders small at 10^6."""
    return Path(root) / "clips" / hashlib.md5(clip_id.encode("utf-8")).hexdigest()[:2] / f"{clip_id}.safetensors"


def atomic_write_bytes(path, payload):
    """Write a temp file in the same folder, fsync, os.replace: readers see the old or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so a dataset
        # written by one user on a cluster stays readable by the others
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_clip(root, clip):
    """Validate and write one clip atomically; returns its path (see clip_path)."""
    if not isinstance(clip.clip_id, str) or not CLIP_ID_RE.match(clip.clip_id):
        raise ValueError(f"clip_id must match {CLIP_ID_RE.pattern} (filesystem-safe), got {clip.clip_id!r}")
    T = len(clip.frames_jpeg)
    if T < 1:
        raise ValueError(f"clip {clip.clip_id}: no frames")
    arrays = {}
    for name, (dtype, tail) in _ARRAYS.items():
        arr = np.asarray(getattr(clip, name))
        if arr.shape != (T, *tail):
            raise ValueError(f"clip {clip.clip_id}: {name} has shape {arr.shape}, expected {(T, *tail)} "
                             f"(T = {T} frames)")
        arrays[name] = np.ascontiguousarray(arr, dtype=dtype)
        if bad := nonfinite_rows(name, arrays[name]):
            what = "infinite values" if name == "boxes" else "non-finite values"
            raise ValueError(f"clip {clip.clip_id}: {name} has {what} at {_rows_text(bad)}; not written")
    for i, fr in enumerate(clip.frames_jpeg):
        if not isinstance(fr, (bytes, bytearray)) or fr[:2] != b"\xff\xd8":
            raise ValueError(f"clip {clip.clip_id}: frame {i} is not JPEG bytes")
    split = clip.split or split_of(clip.clip_id)
    if split not in ("train", "val"):
        raise ValueError(f"clip {clip.clip_id}: split must be 'train', 'val' or '', got {clip.split!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in clip.extra.items()):
        raise ValueError(f"clip {clip.clip_id}: extra must map str -> str")
    if int(clip.width) <= 0 or int(clip.height) <= 0:
        raise ValueError(f"clip {clip.clip_id}: bad frame size {clip.width}x{clip.height}")
    lengths = np.array([len(fr) for fr in clip.frames_jpeg], dtype=np.int64)
    arrays["jpeg_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (T + 1,)
    arrays["jpeg"] = np.frombuffer(b"".join(clip.frames_jpeg), dtype=np.uint8)
    meta = {"format": FORMAT, "clip_id": clip.clip_id, "action_class": str(clip.action_class),
            "description": str(clip.description), "video_id": str(clip.video_id), "split": split,
            "src_fps": repr(float(clip.src_fps)), "width": str(int(clip.width)), "height": str(int(clip.height)),
            "num_frames": str(T), "extra": json.dumps(clip.extra, sort_keys=True)}
    path = clip_path(root, clip.clip_id)
    atomic_write_bytes(path, _st_save(arrays, metadata=meta))
    return path


def _read_header(path):
    """The safetensors JSON header (8-byte little-endian length + JSON) without mapping the file."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    missing = sorted((set(_ARRAYS) | {"jpeg", "jpeg_offsets"}) - set(header))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    return meta, header


class _Reader:
    """An open clip file (one safe_open); use through ClipFile.open(). Reads only the slices asked
    for, and refuses non-finite values (a file written by something other than write_clip), naming
    the clip, array and frames."""

    def __init__(self, handle, path):
        self.h, self.path = handle, path
        self._offsets = None

    def read(self, name, start=None, stop=None):
        arr = self.h.get_slice(name)[start:stop]
        if bad := nonfinite_rows(name, arr):
            first = range(self.h.get_slice(name).get_shape()[0])[start:stop].start if len(arr) else 0
            raise ValueError(f"clip {self.path.stem} ({self.path}): {name} has "
                             f"{'infinite' if name == 'boxes' else 'non-finite'} values at {_rows_text(bad, first)}")
        return arr

    def frame_bytes(self, indices):
        if self._offsets is None:
            self._offsets = self.h.get_tensor("jpeg_offsets")
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self._offsets) - 1]
        if bad:
            raise IndexError(f"frame indices {bad} out of range 0..{len(self._offsets) - 2}")
        sl = self.h.get_slice("jpeg")
        return [sl[int(self._offsets[i]):int(self._offsets[i + 1])].tobytes() for i in indices]


class ClipFile:
    """Lazy reader of one clip file, holding no open file between calls (safe across DataLoader
    worker forks): .meta, .num_frames, .read(name, start, stop), .frames(indices), .to_clip()."""

    def __init__(self, path):
        self.path = Path(path)
        raw, header = _read_header(self.path)
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        self.num_frames = self.shapes["jpeg_offsets"][0] - 1
        self.meta = {"clip_id": raw["clip_id"], "action_class": raw["action_class"],
                     "description": raw["description"], "video_id": raw.get("video_id", ""), "split": raw["split"],
                     "src_fps": float(raw["src_fps"]), "width": int(raw["width"]), "height": int(raw["height"]),
                     "extra": json.loads(raw.get("extra", "{}"))}

    def open(self):
        """Context manager -> a reader with .read(name, start, stop), .frame_bytes(indices)."""
        return _ReaderContext(self.path)

    # whole arrays, read on access (nothing cached: a window should use read(name, start, stop))
    boxes = property(lambda self: self.read("boxes"))
    pose3d = property(lambda self: self.read("pose3d"))
    angles = property(lambda self: self.read("angles"))
    src_frame_index = property(lambda self: self.read("src_frame_index"))
    src_time = property(lambda self: self.read("src_time"))

    def read(self, name, start=None, stop=None):
        """Rows start:stop of one array (boxes, pose3d, angles, src_frame_index, src_time)."""
        with self.open() as r:
            return r.read(name, start, stop)

    def frame_bytes(self, indices):
        with self.open() as r:
            return r.frame_bytes(indices)

    def frames(self, indices):
        """JPEG-decoded RGB PIL images of the given frame indices (reads only those frames' bytes)."""
        return [Image.open(io.BytesIO(b)).convert("RGB") for b in self.frame_bytes(indices)]

    def to_clip(self):
        with self.open() as r:
            arrays = {name: r.read(name) for name in _ARRAYS}
            frames = r.frame_bytes(range(self.num_frames))
        m = self.meta
        return Clip(clip_id=m["clip_id"], frames_jpeg=frames, src_fps=m["src_fps"], width=m["width"],
                    height=m["height"], action_class=m["action_class"], description=m["description"],
                    video_id=m["video_id"], split=m["split"], extra=m["extra"], **arrays)


class _ReaderContext:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.cm = safe_open(str(self.path), framework="numpy")
        return _Reader(self.cm.__enter__(), self.path)

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def read_clip(path):
    """The whole clip in memory (a Clip)."""
    return ClipFile(path).to_clip()


def write_index(root):
    """Scan root's clip files (headers only), write root/index.jsonl atomically, return it."""
    root = Path(root)
    entries = []
    for p in sorted(root.rglob("*.safetensors")):
        meta, header = _read_header(p)
        entry = {"clip_id": meta["clip_id"], "path": p.relative_to(root).as_posix(),
                 "num_frames": header["jpeg_offsets"]["shape"][0] - 1, "action_class": meta["action_class"],
                 "split": meta["split"], "video_id": meta.get("video_id", "")}
        extra = json.loads(meta.get("extra") or "{}")
        if any(k in extra for k in QUALITY_FLAGS):  # pipeline clips: the datasets they are in
            entry["quality"] = [k for k in QUALITY_FLAGS if extra.get(k) == "True"]
        entries.append(entry)
    payload = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode("utf-8")
    atomic_write_bytes(root / INDEX_FILE, payload)
    return entries


def list_clips(root, split=None, require=None):
    """Index entries (dicts: clip_id, path relative to root, num_frames, action_class, split,
    video_id, and for pipeline clips quality) of the dataset in root, from root/index.jsonl
    (written by write_index when missing; after adding clips to an indexed folder, run
    write_index / `python data.py index ROOT` again). split: None | "train" | "val". require:
    None | one of QUALITY_FLAGS: only the clips that passed it (the original's datasets:
    "strict" = checks AND judge, "vlm_good" = judge only; "prog_good" = checks only)."""
    root = Path(root)
    if not (root / INDEX_FILE).is_file():
        if not root.is_dir():
            raise FileNotFoundError(f"no dataset folder {root}")
        entries = write_index(root)
    else:
        with open(root / INDEX_FILE, encoding="utf-8") as fh:
            entries = [json.loads(line) for line in fh if line.strip()]
    if require is not None:
        if require not in QUALITY_FLAGS:
            raise ValueError(f"require must be one of {QUALITY_FLAGS}, got {require!r}")
        if not any("quality" in e for e in entries):
            raise ValueError(f"{root}: no clip carries pipeline quality flags (require={require!r} needs clips "
                             "written by pipeline.py; rebuild an older index with `python data.py index ROOT`)")
        entries = [e for e in entries if require in e.get("quality", ())]
    return [e for e in entries if split is None or e["split"] == split]


# --------------------------------------------------------------------------------------------------
# Training windows (docs/conventions.md)


def window_starts(T, stride=16, horizon=16, context=4):
    """Window starts s: the model sees frames s-context..s-1 and predicts frames s..s+horizon-1."""
    return range(context, T - horizon + 1, stride)


class WindowDataset(torch.utils.data.Dataset):
    """Training windows of all clips of a split. Index i < N: window i; N <= i < 2N (flip=True): its
    mirror image. Item: images (4 PIL frames s-4..s-1, green box, image_size^2), text, state (44,),
    actions (16, 44), clip_id, start, flipped; with `encode` (images, text) -> dict of tensors, its
    fields replace the images."""

    def __init__(self, root, split="train", stride=16, flip=True, encode=None, image_size=224, horizon=16,
                 context=4, require=None):
        self.root, self.flip, self.encode, self.image_size = Path(root), flip, encode, image_size
        self.horizon, self.context = horizon, context
        entries = list_clips(self.root, split, require)
        self.paths = [e["path"] for e in entries]
        T = np.array([e["num_frames"] for e in entries], dtype=np.int64)
        # window_starts of every clip, vectorised (no Python loop over 10^6 clips)
        counts = np.maximum(0, -(-(T - horizon + 1 - context) // stride))
        self.win_clip = np.repeat(np.arange(len(entries), dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        self.win_start = context + stride * (np.arange(counts.sum(), dtype=np.int64) - np.repeat(first, counts))

    def __len__(self):
        return len(self.win_clip) * (2 if self.flip else 1)

    def __getitem__(self, i):
        n = len(self.win_clip)
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)})")
        i %= len(self)
        flipped = i >= n
        j = i - n if flipped else i
        s, H, C = int(self.win_start[j]), self.horizon, self.context
        cf = ClipFile(self.root / self.paths[self.win_clip[j]])  # in the worker: nothing crosses a fork
        with cf.open() as r:
            boxes = r.read("boxes", s - C, s)
            if flipped:  # mirror the 3D pose BEFORE IK, as the original
                angles = pose3d_to_angles(flip_pose3d(r.read("pose3d", s, s + H).astype(np.float64)))
            else:
                angles = r.read("angles", s, s + H)
            jpegs = r.frame_bytes(range(s - C, s))
        # the model's own input rule: box drawn, mirrored with the frame when flipped, resized
        images = [frame_image(Image.open(io.BytesIO(b)), box, self.image_size, mirror=flipped)
                  for b, box in zip(jpegs, boxes)]
        m = cf.meta
        text = prompt_text(m["action_class"], m["description"])
        if flipped:
            text = flip_text(text)
        actions = torch.from_numpy(encode_angles(np.asarray(angles, dtype=np.float64))).float()  # (H, 44)
        item = {"text": text, "state": actions[0].clone(), "actions": actions, "clip_id": m["clip_id"], "start": s,
                "flipped": flipped}
        if self.encode is None:
            item["images"] = images
        else:
            item.update(self.encode(images, text))
        return item


def collate(items, pad_token_id=0):
    """Batch WindowDataset items: the model's input fields (model_io.INPUT_KEYS) through
    collate_inputs; state (B, 44), actions (B, 16, 44), start (B,), flipped (B,) stacked;
    clip_id, text and images as lists."""
    out = {}
    if INPUT_KEYS[0] in items[0]:
        out.update(collate_inputs([{k: it[k] for k in INPUT_KEYS} for it in items], pad_token_id))
    for k in items[0]:
        if k in INPUT_KEYS:
            continue
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (bool, int)) and k in ("start", "flipped"):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


# --------------------------------------------------------------------------------------------------
# CLI


def _info(path):
    path = Path(path)
    if path.is_file():
        cf = ClipFile(path)
        T, m = cf.num_frames, cf.meta
        size = path.stat().st_size
        t = cf.read("src_time")
        dur = T / 10.0  # clips are sampled at 10 Hz
        print(f"clip {m['clip_id']}: {T} frames ({dur:.1f} s at 10 Hz, source times {t.min():.2f}..{t.max():.2f} s "
              f"@ {m['src_fps']:g} fps), {m['width']}x{m['height']}, split {m['split']}")
        print(f"  class: {m['action_class']}\n  description: {m['description']}\n  video: {m['video_id']}")
        print(f"  file: {size} bytes ({size / dur:.0f} B per clip-second), windows (stride 16): "
              f"{len(window_starts(T))}, extra: {m['extra']}")
        return
    entries = list_clips(path)
    for split in ("train", "val"):
        es = [e for e in entries if e["split"] == split]
        frames = sum(e["num_frames"] for e in es)
        wins = sum(len(window_starts(e["num_frames"])) for e in es)
        print(f"{split}: {len(es)} clips, {frames} frames ({frames / 36000:.2f} h at 10 Hz), {wins} windows "
              f"(stride 16; x2 with flip)")
    classes = {}
    for e in entries:
        classes[e["action_class"]] = classes.get(e["action_class"], 0) + 1
    top = sorted(classes.items(), key=lambda kv: -kv[1])[:10]
    print(f"{len(classes)} action classes; top: " + ", ".join(f"{k} ({v})" for k, v in top))


def main(argv=None):
    ap = argparse.ArgumentParser(description="MIMIC clip datasets: inspect, index")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="summary of a dataset folder or of one .safetensors clip")
    i.add_argument("path")
    x = sub.add_parser("index", help="(re)write PATH/index.jsonl from the clip files' headers")
    x.add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        _info(args.path)
    else:
        print(f"indexed {len(write_index(args.path))} clips in {Path(args.path) / INDEX_FILE}")


if __name__ == "__main__":
    sys.exit(main())
