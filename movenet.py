"""MoveNet-332 importer: the public release's Parquet rows + your local Kinetics videos ->
our clip format.

The release stores poses at the SOURCE frame rate with the decoded-frame number of each, not at
10 Hz. Each video is decoded once, front to back (PyAV); for each 10 Hz time the nearest pose frame
and the video frame it was computed on are taken together, so image, box, pose and angles of a
sample always come from the same source frame (no interpolation). The release's pose3d is already in our
camera frame (x right, y down, z away), so it is stored as is; the angles are recomputed with
kinematics.pose3d_to_angles (the stored ones are compared as a check).

Every row ends in OUT/movenet_import.jsonl: ok | missing (no video: OUT/missing.txt, retried next
run) | skipped with a reason (OUT/skipped.txt; retried with --retry-skipped). Re-running resumes.
Needs pyarrow and PyAV.

    python movenet.py --parquet DIR --videos DIR --out DIR [--min-frames 20] [--max-short-side 480] [--retry-skipped]
"""

import argparse
import io
import json
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import data
import kinematics
import model_io

# --------------------------------------------------------------------------------------------------
# Row schema of the release: metadata columns, and zlib(level 6)-compressed little-endian arrays with F pose frames:
#   pose3d (F,17,3) f32   keypoints2d (F,17,2) f32   scores2d (F,17) f32   bboxes (F,4) f32 xyxy, NaN = no track
#   joint_angles (F,44) f32 sin/cos   frame_indices (F,) i32 source-video frame numbers   tracking_confidence f32
# `fps` is the source video's frame rate (the poses are not at 10 Hz).

# compressed array columns: (numpy dtype, per-frame shape); frame_indices / pose3d fix F
ARRAY_FIELDS = {"pose3d": ("<f4", (17, 3)), "keypoints2d": ("<f4", (17, 2)),
                "scores2d": ("<f4", (17,)),
                "bboxes": ("<f4", (4,)), "joint_angles": ("<f4", (44,)),
                "frame_indices": ("<i4", ())}
REQUIRED_COLUMNS = ("clip_id", "action_class", "fps", "video_width", "video_height", "pose3d",
                    "frame_indices")
OPTIONAL_COLUMNS = ("youtube_id", "time_start", "time_end", "split", "instruction",
                    "num_pose_frames", "has_hard_cuts", "quality", "keypoints2d", "scores2d",
                    "bboxes", "joint_angles", "tracking_confidence")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
LOG_FILE = "movenet_import.jsonl"


@dataclass
class ImportConfig:
    fps: float = 10.0            # output sample rate: the model's 10 Hz
    max_short_side: int = 480    # frames are downscaled so that min(w, h) <= this (never upscaled)
    jpeg_quality: int = 90
    min_frames: int = 20         # shorter clips are skipped (4 context + 16 targets = one training window)
    max_offset: float = 0.5      # a sample's pose frame must lie within this many output periods of its time
    fps_tolerance: float = 0.02  # relative |row fps - video fps| above which the row is not this video's
    aspect_tolerance: float = 0.02
    kp_min_score: float = 0.3    # keypoints used for a box when the bboxes column is null
    kp_box_pad: float = 0.1      # padding per side, fraction of the keypoint extent


class RowError(ValueError):
    """A malformed Parquet row; the message names the row and the field."""


@dataclass
class Row:
    clip_id: str
    action_class: str
    description: str
    split: str
    fps: float                   # the SOURCE fps stored by upstream
    width: int                   # source video size the pixel columns refer to
    height: int
    frame_indices: np.ndarray    # (F,) int64
    pose3d: np.ndarray           # (F, 17, 3) float32
    bboxes: np.ndarray = None    # (F, 4) float32 or None (column null)
    keypoints2d: np.ndarray = None
    scores2d: np.ndarray = None
    joint_angles: np.ndarray = None  # (F, 44) or None
    names: tuple = ()            # video file stems to look for, in order of preference
    extra: dict = field(default_factory=dict)


def _decompress(value, name, dtype, tail, F, where):
    """zlib bytes -> array (F, *tail), or None for a null value. Raises RowError
    naming the field."""
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise RowError(f"{where}: field {name!r} must be zlib-compressed bytes, got {type(value).__name__}")
    try:
        raw = zlib.decompress(bytes(value))
    except zlib.error as e:
        raise RowError(f"{where}: field {name!r} is not zlib data ({e})") from None
    item = np.dtype(dtype).itemsize
    if len(raw) % item:
        raise RowError(f"{where}: field {name!r} has {len(raw)} bytes, not a multiple of {item} ({dtype})")
    arr = np.frombuffer(raw, dtype=dtype)
    per = int(np.prod(tail, dtype=np.int64))
    if F is None:
        F = arr.size // per if per else 0
    if arr.size != F * per:
        raise RowError(f"{where}: field {name!r} has {arr.size} values, expected {F} frames x {tail} = {F * per}")
    return arr.reshape(F, *tail)


def decode_row(row, where="row"):
    """A Parquet row (dict of column -> value) -> Row, every array decoded and shape-checked.
    Raises RowError."""
    missing = [c for c in REQUIRED_COLUMNS if row.get(c) is None]
    if missing:
        raise RowError(f"{where}: missing or null required fields {missing}")
    cid = str(row["clip_id"])
    where = f"{where} (clip_id {cid!r})"
    if not data.CLIP_ID_RE.match(cid):
        raise RowError(f"{where}: clip_id is not filesystem-safe (must match {data.CLIP_ID_RE.pattern})")
    idx = _decompress(row["frame_indices"], "frame_indices", *ARRAY_FIELDS["frame_indices"], None,
                      where)
    F = len(idx)
    if F == 0:
        raise RowError(f"{where}: no pose frames (frame_indices is empty)")
    n = row.get("num_pose_frames")
    if n is not None and int(n) != F:
        raise RowError(f"{where}: num_pose_frames = {n} but frame_indices has {F} entries")
    if (idx < 0).any() or (np.diff(idx.astype(np.int64)) <= 0).any():
        raise RowError(f"{where}: frame_indices must be non-negative and strictly increasing")
    arrs = {k: _decompress(row.get(k), k, *ARRAY_FIELDS[k], F, where)
            for k in ("pose3d", "keypoints2d", "scores2d", "bboxes", "joint_angles")}
    if (arrs["keypoints2d"] is None) != (arrs["scores2d"] is None):
        raise RowError(f"{where}: keypoints2d and scores2d must be both present or both null")
    try:
        fps, w, h = float(row["fps"]), int(row["video_width"]), int(row["video_height"])
    except (TypeError, ValueError) as e:
        raise RowError(f"{where}: fps / video_width / video_height not numeric ({e})") from None
    if not (fps > 0 and w > 0 and h > 0):
        raise RowError(f"{where}: need fps > 0 and a positive video size, got fps={fps} size={w}x{h}")
    extra = {"source": "movenet-332", "row_fps": repr(fps), "num_pose_frames": str(F)}
    for k in ("has_hard_cuts", "quality"):
        if row.get(k) is not None:
            extra[k] = str(row[k])
    tc = row.get("tracking_confidence")
    if tc is not None:  # shape undocumented: any float32 vector; its mean is kept for filtering
        conf = _decompress(tc, "tracking_confidence", "<f4", (), None, where)
        if conf.size and np.isfinite(conf).any():
            extra["tracking_confidence_mean"] = f"{float(np.nanmean(conf)):.4f}"
    names = [cid]
    yt = row.get("youtube_id")
    if yt:
        try:
            names.append(f"{yt}_{int(row['time_start']):06d}_{int(row['time_end']):06d}")
        except (KeyError, TypeError, ValueError):
            pass
        names.append(str(yt))
    split = row.get("split") if row.get("split") in ("train", "val") else ""
    return Row(clip_id=cid, action_class=str(row["action_class"]),
               description=str(row.get("instruction") or ""),
               split=split, fps=fps, width=w, height=h, frame_indices=idx.astype(np.int64),
               names=tuple(dict.fromkeys(names)), extra=extra, **arrs)


# --------------------------------------------------------------------------------------------------
# Finding videos


def _norm_class(s):
    return re.sub(r"[\s_]+", " ", s).strip().lower()


def index_videos(root):
    """{file stem: [paths]} for every video file below root (one os.walk)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--videos {root}: not a folder")
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXTS:
                out.setdefault(stem, []).append(Path(dirpath) / f)
    return out


def find_video(row, index):
    """The row's video path or None: the first of row.names (its clip_id, the Kinetics-700 file
    name "<youtube_id>_<start6>_<end6>"; then that name rebuilt from the time columns; then the
    bare youtube_id) that is a file stem under --videos; among several files with that stem,
    the one in a folder named like the action class (case, spaces and underscores ignored),
    else the first in sorted order. So `k700-2020/train/<class>/<id>.mp4` and a flat folder of
    `<id>.mp4` both work."""
    for name in row.names:
        paths = index.get(name)
        if paths:
            same = [p for p in paths if _norm_class(p.parent.name) == _norm_class(row.action_class)]
            return (same or paths)[0]
    return None


# --------------------------------------------------------------------------------------------------
# One decode per video: every row of that video picks its 10 Hz samples from the same frame stream


class SkipVideo(Exception):
    """The video cannot be used for any of its rows; str(e) is the recorded reason."""


class RowSampler:
    """Online nearest-in-time selection of one row's pose frames at t0 + k / fps. feed() sees every
    decoded frame; samples are (k, pose row, source index, source time, jpeg) or None for a time
    with no pose frame near enough."""

    def __init__(self, row, cfg, encode):
        ok = np.isfinite(row.pose3d).all(axis=(1, 2))  # a non-finite pose cannot give angles: treated as a gap
        self.cand = {int(i): r for r, i in enumerate(row.frame_indices) if ok[r]}
        self.last = int(row.frame_indices[-1])
        self.period, self.tol = 1.0 / cfg.fps, cfg.max_offset / cfg.fps
        self.encode = encode
        self.t0, self.k, self.prev, self.samples, self.times = None, 0, None, [], []

    def _emit_until(self, limit, cur):
        # every sample time <= limit is decided: the nearer of prev and cur (ties:
        # the earlier, prev)
        while self.t0 + self.k * self.period <= limit + 1e-9:
            target = self.t0 + self.k * self.period
            best = [c for c in (self.prev, cur) if c is not None]
            c = min(best, key=lambda c: abs(c[1] - target))
            if abs(c[1] - target) <= self.tol + 1e-9:
                self.samples.append((self.k, c[3], c[0], c[1], self.encode(c[0], c[2])))
            else:
                self.samples.append(None)
            self.k += 1

    def feed(self, i, t, frame):
        if i not in self.cand:
            return
        self.times.append(t)
        cur = (i, t, frame, self.cand[i])
        if self.t0 is None:
            self.t0 = t
        self._emit_until(t, cur)
        self.prev = cur

    def finish(self):
        if self.prev is not None:  # sample times just after the last pose frame may still be near it
            self._emit_until(self.prev[1] + self.tol, None)
        self.prev = None


def _open_video(path):
    import av  # noqa: PLC0415 (optional extra)
    try:
        if Path(path).stat().st_size == 0:
            raise SkipVideo("EMPTY_FILE")
        container = av.open(str(path), metadata_errors="ignore")
    except SkipVideo:
        raise
    except Exception as e:  # PyAV raises many FFmpegError subclasses for unreadable input
        raise SkipVideo(f"OPEN_FAILED: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise SkipVideo("NO_VIDEO_STREAM")
    return container


def decode_for_rows(path, rows, cfg):
    """Decode `path` once and sample every row that matches it (_check_match). Returns (video info,
    {clip_id: RowSampler}, {clip_id: reason the row does not match}). Raises SkipVideo."""
    container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if not w or not h:
            raise SkipVideo(f"BAD_DIMENSIONS: {w}x{h}")
        rate = stream.average_rate or stream.guessed_rate
        vfps = float(rate) if rate else 0.0
        scale = min(1.0, cfg.max_short_side / min(w, h))
        ow, oh = max(2, int(round(w * scale))), max(2, int(round(h * scale)))
        cache = {}  # the last encoded frame: a frame chosen by several rows is converted once

        def encode(i, frame):
            if i not in cache:
                cache.clear()
                if frame.rotation:
                    raise SkipVideo(f"ROTATED: {frame.rotation} degrees")
                buf = io.BytesIO()
                Image.fromarray(frame.to_ndarray(format="rgb24", width=ow, height=oh)).save(
                    buf, format="JPEG", quality=cfg.jpeg_quality)
                cache[i] = buf.getvalue()
            return cache[i]

        info = {"width": ow, "height": oh, "src_w": w, "src_h": h, "fps": vfps}
        rejected = {r.clip_id: _check_match(r, info, cfg) for r in rows}
        rejected = {k: v for k, v in rejected.items() if v}
        samplers = {r.clip_id: RowSampler(r, cfg, encode) for r in rows if r.clip_id not in rejected}
        if not samplers:
            return info, samplers, rejected
        stop = max(s.last for s in samplers.values())
        i, t_first, n_corrupt, error = -1, None, 0, None
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    i += 1  # presentation-order number of the decoded frame, upstream's frame index
                    t = frame.time if frame.time is not None else (i / vfps if vfps else None)
                    if t is None:
                        raise SkipVideo("NO_TIMESTAMPS")
                    t_first = t if t_first is None else t_first
                    if frame.is_corrupt:
                        n_corrupt += 1
                        continue
                    for s in samplers.values():
                        s.feed(i, t - t_first, frame)
                if i > stop:  # every row's frames are behind us
                    break
        except SkipVideo:
            raise
        except Exception as e:  # truncated or corrupt stream: keep what decoded, note it
            error = f"{type(e).__name__}: {e}"
        if i < 0:
            raise SkipVideo(f"DECODE_ERROR: {error}" if error else "NO_FRAMES")
    for s in samplers.values():
        s.finish()
    info.update(num_decoded=i + 1, corrupt_frames=n_corrupt, error=error)
    return info, samplers, rejected


# --------------------------------------------------------------------------------------------------
# Row + samples -> Clip


def boxes_from_keypoints(kp, sc, width, height, min_score=0.3, pad=0.1):
    """(T,17,2) pixels, (T,17) scores -> (T,4) xyxy: extent of the joints with score >= min_score
    (>= 2 of them), padded by `pad` x the extent per side, clipped to the frame; NaN rows where
    fewer than 2 joints qualify."""
    ok = (sc >= min_score) & np.isfinite(kp).all(-1)                                  # (T, 17)
    big = np.where(ok[..., None], kp, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmin/nanmax of an all-NaN frame: NaN, no warning
        lo, hi = np.nanmin(big, axis=1), np.nanmax(big, axis=1)                       # (T, 2)
    size = hi - lo
    box = np.concatenate([lo - pad * size, hi + pad * size], -1)                      # (T, 4)
    box = np.clip(box, 0, [width, height, width, height])
    box[ok.sum(1) < 2] = np.nan
    return box.astype(np.float32)



def build_clip(row, sampler, info, cfg):
    """The longest gap-free run of a row's samples -> data.Clip. Raises SkipVideo
    with the reason."""
    runs, cur = [], []
    for s in sampler.samples + [None]:
        if s is not None:
            cur.append(s)
            continue
        if cur:
            runs.append(cur)
        cur = []
    if not runs:
        raise SkipVideo(f"NO_POSE_FRAMES_IN_VIDEO: {info['num_decoded']} frames decoded, pose frames "
                        f"{int(row.frame_indices[0])}..{int(row.frame_indices[-1])}")
    run = max(runs, key=len)  # max keeps the first of equal lengths
    if len(run) < cfg.min_frames:
        raise SkipVideo(f"TOO_SHORT: {len(run)} samples at {cfg.fps:g} Hz < {cfg.min_frames}")
    r = np.array([s[1] for s in run])                  # pose rows of the samples
    pose3d = np.ascontiguousarray(row.pose3d[r], np.float32)
    angles = kinematics.pose3d_to_angles(pose3d.astype(np.float64)).astype(np.float32)
    sx, sy = info["width"] / row.width, info["height"] / row.height
    scale = np.array([sx, sy, sx, sy], np.float32)
    if row.bboxes is not None:
        boxes = row.bboxes[r] * scale
    elif row.keypoints2d is not None:
        boxes = boxes_from_keypoints(row.keypoints2d[r] * scale[:2], row.scores2d[r], info["width"],
                                     info["height"], cfg.kp_min_score, cfg.kp_box_pad)
    else:
        boxes = np.full((len(r), 4), np.nan, np.float32)
    extra = dict(row.extra)
    pt = np.asarray(sampler.times)
    if len(pt) > 1 and pt[-1] > pt[0]:  # mean rate of the pose frames, from their timestamps
        extra["pose_fps"] = f"{(len(pt) - 1) / (pt[-1] - pt[0]):.4f}"
    extra["box_source"] = "bboxes" if row.bboxes is not None else ("keypoints2d" if row.keypoints2d is not None
                                                                   else "none")
    if row.joint_angles is not None:
        stored = model_io.decode_angles(row.joint_angles[r].astype(np.float64))
        err = np.abs(kinematics.wrap_angle(stored - angles.astype(np.float64)))
        extra["stored_angles_max_err"] = f"{float(np.nanmax(err)) if np.isfinite(err).any() else float('nan'):.3e}"
    notes = []
    if len(run) < sum(s is not None for s in sampler.samples):
        notes.append("GAP_TRIMMED")
    if int(row.frame_indices[-1]) >= info["num_decoded"]:
        notes.append(f"VIDEO_SHORTER_THAN_POSES:{info['num_decoded']}")
    if info["corrupt_frames"]:
        notes.append(f"CORRUPT_FRAMES:{info['corrupt_frames']}")
    if info["error"]:
        notes.append("DECODE_ERROR_PARTIAL")
    if notes:
        extra["warnings"] = ",".join(notes)
    return data.Clip(clip_id=row.clip_id, frames_jpeg=[s[4] for s in run],
                     boxes=boxes.astype(np.float32),
                     pose3d=pose3d, angles=angles,
                     src_frame_index=np.array([s[2] for s in run], np.int64),
                     src_time=np.array([s[3] for s in run], np.float64),
                     src_fps=info["fps"] or row.fps, width=info["width"], height=info["height"],
                     action_class=row.action_class, description=row.description,
                     video_id=row.clip_id, split=row.split, extra=extra)


def _check_match(row, info, cfg):
    """Reason the row cannot be this video's, or None. Rows whose fps is not the video's
    (the release's re-tracked rows store fps=20 with local frame numbers) cannot be paired
    with its frames."""
    if info["fps"] and abs(row.fps / info["fps"] - 1) > cfg.fps_tolerance:
        return (f"FPS_MISMATCH: row fps {row.fps:g} vs video {info['fps']:.3f} (frame_indices would point at "
                f"the wrong frames)")
    a_row, a_vid = row.width / row.height, info["src_w"] / info["src_h"]
    if abs(a_row / a_vid - 1) > cfg.aspect_tolerance:
        return f"ASPECT_MISMATCH: row {row.width}x{row.height} vs video {info['src_w']}x{info['src_h']}"
    return None


# --------------------------------------------------------------------------------------------------
# The import loop


def _parquet_files(path):
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"--parquet {p}: no .parquet files")
    return files


def _read_log(path):
    """{clip_id: last record}; a torn last line (interrupted append) is ignored."""
    out = {}
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    out[rec["clip_id"]] = rec
                except (ValueError, KeyError, TypeError):
                    continue
    return out


def _atomic_text(path, text):
    data.atomic_write_bytes(path, text.encode("utf-8"))


def import_movenet(parquet, videos, out, cfg=None, retry_skipped=False, batch_size=64,
                   progress=True):
    """Import every row of the Parquet file(s) under `parquet` whose video is under `videos` into
    the dataset folder `out`. Returns the summary dict (also written to out/import_summary.json)."""
    import pyarrow.parquet as pq  # noqa: PLC0415 (optional extra)
    cfg = cfg or ImportConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _parquet_files(parquet)
    vindex = index_videos(videos)
    log_path = out / LOG_FILE
    log = _read_log(log_path)
    total = 0
    for f in files:
        names = set(pq.ParquetFile(f).schema_arrow.names)
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{f}: not a MoveNet-332 shard, missing columns {missing} (has {sorted(names)})")
        total += pq.ParquetFile(f).metadata.num_rows
    counts = {"ok": 0, "missing": 0, "skipped": 0, "already_done": 0}
    bar = tqdm(total=total, desc="import-movenet", unit="row", disable=not progress)
    with open(log_path, "a", encoding="utf-8") as logf:

        def record(cid, status, reason="", video=""):
            rec = {"clip_id": cid, "status": status, "reason": reason, "video": str(video)}
            log[cid] = rec
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            counts[status] += 1

        for f in files:
            pf = pq.ParquetFile(f)
            cols = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in pf.schema_arrow.names]
            base = 0
            for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
                groups = {}  # video path -> rows (rows of one video share one decode)
                for n, raw in enumerate(batch.to_pylist()):
                    where = f"{f.name} row {base + n}"
                    try:
                        row = decode_row(raw, where)
                    except RowError as e:
                        record(str(raw.get("clip_id")), "skipped", f"BAD_ROW: {e}")
                        continue
                    prev = log.get(row.clip_id, {}).get("status")
                    if data.clip_path(out, row.clip_id).is_file() or (prev == "skipped" and not retry_skipped):
                        counts["already_done"] += 1
                        continue
                    path = find_video(row, vindex)
                    if path is None:
                        record(row.clip_id, "missing", "no video named " + " / ".join(row.names),
                               "")
                        continue
                    groups.setdefault(path, []).append(row)
                base += batch.num_rows
                bar.update(batch.num_rows - sum(len(g) for g in groups.values()))
                for path, rows in groups.items():
                    try:
                        info, samplers, rejected = decode_for_rows(path, rows, cfg)
                    except SkipVideo as e:
                        for row in rows:
                            record(row.clip_id, "skipped", str(e), path)
                        bar.update(len(rows))
                        continue
                    for row in rows:
                        try:
                            if row.clip_id in rejected:
                                raise SkipVideo(rejected[row.clip_id])
                            data.write_clip(out, build_clip(row, samplers[row.clip_id], info, cfg))
                            record(row.clip_id, "ok", "", path)
                        except SkipVideo as e:
                            record(row.clip_id, "skipped", str(e), path)
                        except ValueError as e:  # e.g. write_clip refusing infinite boxes: this row only
                            record(row.clip_id, "skipped", f"BAD_VALUES: {e}", path)
                        bar.update(1)
                        bar.set_postfix(ok=counts["ok"], missing=counts["missing"],
                                        skipped=counts["skipped"])
    bar.close()
    entries = data.write_index(out)
    final = {}
    for rec in log.values():
        final.setdefault(rec["status"], []).append(rec)
    _atomic_text(out / "missing.txt",
                 "".join(f"{r['clip_id']}\t{r['reason']}\n" for r in final.get("missing", [])))
    _atomic_text(out / "skipped.txt",
                 "".join(f"{r['clip_id']}\t{r['reason']}\n" for r in final.get("skipped", [])))
    summary = {"this_run": counts, "clips_in_dataset": len(entries),
               "missing_total": len(final.get("missing", [])),
               "skipped_total": len(final.get("skipped", [])), "rows": total}
    _atomic_text(out / "import_summary.json", json.dumps(summary, indent=1) + "\n")
    if progress:
        print(f"import-movenet: {counts['ok']} clips written, {counts['already_done']} already done, "
              f"{summary['missing_total']} videos missing ({out / 'missing.txt'}), {summary['skipped_total']} "
              f"skipped ({out / 'skipped.txt'}); {len(entries)} clips in {out}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description="MoveNet-332 Parquet + local Kinetics videos -> MIMIC clips")
    ap.add_argument("--parquet", required=True,
                    help="a .parquet file or a folder of them (searched recursively)")
    ap.add_argument("--videos", required=True,
                    help="folder of local Kinetics videos (searched recursively)")
    ap.add_argument("--out", required=True, help="output dataset folder (resumable)")
    ap.add_argument("--min-frames", type=int, default=ImportConfig.min_frames,
                    help="shortest clip kept (10 Hz)")
    ap.add_argument("--max-short-side", type=int, default=ImportConfig.max_short_side,
                    help="frame downscale")
    ap.add_argument("--retry-skipped", action="store_true",
                    help="retry rows skipped in an earlier run")
    args = ap.parse_args(argv)
    cfg = ImportConfig(min_frames=args.min_frames, max_short_side=args.max_short_side)
    import_movenet(args.parquet, args.videos, args.out, cfg, retry_skipped=args.retry_skipped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
