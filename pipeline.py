"""
MIMIC data pipeline: human videos -> training clips (data.py format), sharded and resumable.

Stages, per video (reference: ../shared/reference/pipeline.md sections 1-2 for the original, 3-5 for this design):
  1. decode once, streaming (PyAV), sampled at 10 Hz by timestamps (variable frame rate safe); every sample keeps its
     source frame index and time; display rotation applied; unusable files are skipped with a reason;
  2. hard cuts: 256-bin luminance histogram correlation < 0.4 between consecutive samples -> segments; a segment
     shorter than 20 samples is dropped;
  3. target person (the v2 "retrack" design): detections on every sample of the segment, a candidate pool from the
     anchor frame (the one of 5 evenly spaced frames with most people); a picker (a VLM oracle on numbered boxes, or
     the heuristic size x centrality x run length) chooses; up to 3 candidates are tried;
  4. sticky IoU tracker both ways from the anchor (IoU >= 0.5, area ratio <= 2.5, <= 3 consecutive misses, runs of
     >= 20 samples), gaps inside the run interpolated;
  5. 2D pose through a PoseEstimator (COCO-17 -> Human3.6M-17 conversion when it outputs COCO);
  6. 3D + 22 angles through a Lifter; the default is fit3d.FitLifter (gradient descent on a kinematic body, no weights);
  7. deterministic checks (original thresholds, our definitions where the original's are unpublished);
  8. VLM judge {tracking_consistent, motion_matches} on skeleton-overlay frames and an imperative caption, through
     vlm.py's VLMClient (OpenAI-compatible HTTP with urllib, or our qwen3vl.py on a local checkpoint); failures are
     recorded;
  9. one JSONL status record per video; clips written atomically by data.write_clip; --shard K/N by a stable hash of
     the video id; --resume; an attrition summary.
`strict` = checks AND judge, `vlm_good` = judge only (the original's two datasets); --keep picks what is written.

Perception is pluggable: Detector / PoseEstimator below define the call signatures; the GroundTruth* stand-ins read
`<video>.gt.npz` sidecars (written by `--render-demo` from demo.py's mocap renders) so the whole pipeline runs on CPU.

Outputs: OUT/clips/.. (data.py clip files), OUT/index.jsonl, OUT/status/shard-K-of-N.jsonl (one record per video:
every stage's outcome and reason; see process_video), and an attrition table printed at the end.

Commands:
  python pipeline.py --render-demo /tmp/vids --num-videos 4       # rendered mocap videos + ground-truth sidecars
  python pipeline.py --manifest /tmp/vids/manifest.jsonl --out /tmp/clips   # stand-in perception, no VLM
  python pipeline.py --videos DIR --out OUT --shard 3/16 --resume --vlm-url http://host:8000/v1 --vlm-model NAME
  python train.py --data /tmp/clips                                # train on the result
Many machines: run shards K = 0..N-1 under any scheduler into one shared OUT (Slurm array, indexed job, a loop);
one VLM server serves every shard; `python data.py index OUT` once all have finished.
"""

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
# stage 8 and the oracle picker's prompt + parsing live in vlm.py; names, not `import vlm`, because `vlm` is the
# client argument of process_segment / process_video / run
from vlm import PICK_PROMPT, LocalQwen3VL, VLMClient, caption_clip, draw_numbered_boxes, judge_clip, parse_pick

PIPELINE_VERSION = "1"
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


@dataclass
class PipelineConfig:
    fps: float = 10.0              # sampling rate of clips (mimic.md sec 5)
    max_short_side: int = 480      # decoded frames are downscaled so min(w, h) <= this ("480p", paper)
    max_seconds: float = 120.0     # decode at most this much of a video: samples stay in memory (~1.2 MB each at 480p)
    cut_threshold: float = 0.4     # histogram correlation below this = hard cut (upstream)
    min_frames: int = 20           # segments / runs / clips shorter than this are dropped (upstream)
    pool_frames: int = 5           # frames at linspace(0, T-1, 5) that pick the anchor (upstream retrack)
    max_candidates: int = 6        # candidates on the anchor frame (upstream)
    det_conf: float = 0.3          # detections below this score are ignored (upstream retrack)
    iou_track: float = 0.5         # sticky tracker: accept best IoU >= this ...
    size_ratio_max: float = 2.5    # ... and area ratio max(a/b, b/a) <= this
    max_misses: int = 3            # stop after more than this many consecutive misses
    max_attempts: int = 3          # candidates tried in picker order
    # deterministic checks (2.2 thresholds; definitions in run_checks)
    max_box_jump_ratio: float = 0.05
    max_size_spike_ratio: float = 0.03
    max_pose_jump_ratio: float = 0.05
    max_low_conf_ratio: float = 0.4
    max_iou_break_ratio: float = 0.1
    min_coverage_ratio: float = 0.4
    min_peak_speed: float = 0.3    # body heights / s of the fastest root-relative joint (ours; upstream 3.0 "m/s")
    min_box_area: float = 0.08     # median box area as a fraction of the frame
    low_conf: float = 0.3          # per-joint / per-frame confidence threshold
    judge_frames: int = 6          # overlay frames sent to the judge (upstream)
    caption_frames: int = 8        # frames sent to the captioner
    vlm_max_side: int = 640        # images to the VLM: max side, JPEG q75 (upstream)


def config_hash(cfg):
    return hashlib.md5(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# 1. Decoding


class VideoError(Exception):
    """A video that cannot be used; .reason is the status code recorded for it (e.g. EMPTY_FILE, OPEN_FAILED)."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    frames: list                   # T RGB uint8 arrays (H, W, 3), upright (rotation applied), downscaled
    src_frame_index: np.ndarray    # (T,) int64 presentation-order index of the source frame of each sample
    src_time: np.ndarray           # (T,) float64 seconds since the first frame
    src_fps: float                 # the stream's average frame rate (0.0 if unknown)
    width: int                     # of `frames`
    height: int
    rotation: int = 0              # degrees counter-clockwise applied to the stored pixels
    warnings: list = field(default_factory=list)


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding needs PyAV: pip install av (the 'pipeline' extra)") from e
    return av


def _frames(av, container, stream, problems):
    """Decoded frames in presentation order. A packet that fails to decode is skipped and a demuxing failure
    (truncated file) ends the stream after flushing the decoder; both are appended to `problems`, never raised."""
    flushed = False
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
                flushed = packet.size == 0  # the final empty packet flushes the decoder
            except av.error.FFmpegError as e:
                problems.append(type(e).__name__)
    except av.error.FFmpegError as e:
        problems.append(f"demux:{type(e).__name__}")
    if not flushed:  # frames still inside a (frame-threaded) decoder after an error
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            pass


def decode_video(path, fps=10.0, max_short_side=480, max_seconds=120.0):
    """Decode `path` once, front to back, keeping for each time k/fps the source frame nearest in time (ties: the
    earlier), so variable frame rates and gaps are handled (a gap repeats the frame shown). Raises VideoError."""
    av = _import_av()
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise VideoError("EMPTY_FILE")
    except OSError as e:
        raise VideoError("UNREADABLE", str(e)) from None
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as e:  # PyAV raises many FFmpegError subclasses (InvalidData, EOF, ...) for unreadable input
        raise VideoError("OPEN_FAILED", f"{type(e).__name__}: {e}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoError("NO_VIDEO_STREAM", f"streams: {kinds}")
        stream = container.streams.video[0]
        # no frame threading: a frame-threaded decoder loses its buffered frames when a packet is corrupt
        w, h = stream.codec_context.width, stream.codec_context.height
        if not w or not h or w * h > 8192 * 8192:
            raise VideoError("BAD_DIMENSIONS", f"{w}x{h}")
        rate = stream.average_rate or stream.guessed_rate
        src_fps = float(rate) if rate else 0.0
        scale = min(1.0, max_short_side / min(w, h))
        ow, oh = max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)
        out, idx, times, warnings = [], [], [], []
        converted = {}  # source index -> array; a frame picked for several samples (a VFR gap) is converted once

        def emit(item):
            i, t, frame = item
            if i not in converted:
                converted.clear()
                arr = frame.to_ndarray(format="rgb24", width=ow, height=oh)
                rot = int(round((frame.rotation or 0) / 90.0)) % 4  # degrees counter-clockwise, ffmpeg convention
                converted[i] = np.ascontiguousarray(np.rot90(arr, rot)) if rot else arr
            out.append(converted[i])
            idx.append(i)
            times.append(t)

        k, prev, t0, n_bad, n_back, problems = 0, None, None, 0, 0, []
        try:
            for i, frame in enumerate(_frames(av, container, stream, problems)):
                if frame.is_corrupt:
                    n_bad += 1
                    continue
                t = frame.time if frame.time is not None else (i / src_fps if src_fps else None)
                if t is None:
                    raise VideoError("NO_TIMESTAMPS")
                t0 = t if t0 is None else t0
                t -= t0
                if prev is not None and t <= prev[1]:  # non-increasing timestamps: broken muxing, drop the frame
                    n_back += 1
                    continue
                if t > max_seconds:
                    warnings.append(f"TRUNCATED_AT:{max_seconds:g}s")
                    break
                cur = (i, t, frame)
                while k / fps <= t + 1e-9:  # sample time k/fps reached: the nearer of prev and cur
                    target = k / fps
                    emit(prev if prev is not None and target - prev[1] <= t - target else cur)
                    k += 1
                prev = cur
        except VideoError:
            raise
        except Exception as e:  # a decode error mid-stream (truncated file, corrupt packets): keep what decoded
            if not out:
                raise VideoError("DECODE_ERROR", f"{type(e).__name__}: {e}") from None
            warnings.append(f"DECODE_ERROR_PARTIAL:{type(e).__name__}")
        if problems:
            if not out:
                raise VideoError("DECODE_ERROR", ";".join(sorted(set(problems)))[:200])
            warnings.append(f"BAD_PACKETS:{len(problems)}")
        if n_bad:
            warnings.append(f"CORRUPT_FRAMES:{n_bad}")
        if n_back:
            warnings.append(f"NON_INCREASING_PTS:{n_back}")
        if not out:
            raise VideoError("NO_FRAMES")
    H, W = out[0].shape[:2]
    rotation = 90 * int(round((prev[2].rotation or 0) / 90.0)) % 360
    return Decoded(out, np.asarray(idx, np.int64), np.asarray(times, np.float64), src_fps, W, H, rotation, warnings)


# ---------------------------------------------------------------------------------------------------------------
# 2. Hard cuts and segments


def gray_histograms(frames):
    """(T,) RGB frames -> (T, 256) L2-normalised luminance histograms (BT.601 weights on RGB; the original fed RGB
    to a BGR conversion, swapping the red and blue weights)."""
    out = np.empty((len(frames), 256), np.float64)
    for t, f in enumerate(frames):
        y = (f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114).astype(np.uint8)
        out[t] = np.bincount(y.ravel(), minlength=256)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def hist_correlation(h1, h2):
    """Pearson correlation over bins (OpenCV HISTCMP_CORREL); two flat histograms count as equal (1) or not (0)."""
    a, b = h1 - h1.mean(-1, keepdims=True), h2 - h2.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    same = np.all(np.isclose(h1, h2), -1)
    return np.where(den > 1e-12, (a * b).sum(-1) / np.maximum(den, 1e-12), same.astype(np.float64))


def detect_cuts(hists, threshold=0.4):
    """Indices i (first sample of a new shot) where corr(hist[i-1], hist[i]) < threshold."""
    if len(hists) < 2:
        return []
    corr = hist_correlation(hists[:-1], hists[1:])
    return [int(i) + 1 for i in np.nonzero(corr < threshold)[0]]


def split_segments(T, cuts, min_len=20):
    """Cut-free [start, end) ranges of 0..T-1; returns (kept, dropped), dropped as (start, end, reason)."""
    bounds = [0] + sorted(c for c in cuts if 0 < c < T) + [T]
    kept, dropped = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        (kept.append((s, e)) if e - s >= min_len else dropped.append((s, e, f"SHORT_SEGMENT:{e - s}")))
    return kept, dropped


# ---------------------------------------------------------------------------------------------------------------
# 3-5. Perception interfaces, stand-ins, keypoint conversion


class Detector:
    """Person detector. Call: `detector(images, keys) -> list of (N_i, 5) float arrays [x1, y1, x2, y2, score]` in
    pixels of each image, people only. images: list of RGB uint8 (H, W, 3); keys: list of (video_id, source frame
    index), which models ignore (stand-ins and caches use them). Batched over frames; implementations subclass this
    or just provide __call__."""

    def __call__(self, images, keys):
        raise NotImplementedError


class PoseEstimator:
    """Top-down 2D pose. Call: `pose(images, boxes, keys) -> (keypoints (N, 17, 2) pixels, scores (N, 17))` for one
    box (N, 4) xyxy per image. `keypoint_format` says the 17-joint order of the output: "coco" (converted by
    coco_to_h36m) or "h36m"."""

    keypoint_format = "coco"

    def __call__(self, images, boxes, keys):
        raise NotImplementedError


def load_ground_truth(video_path):
    """The `<video>.gt.npz` sidecar of a rendered video: boxes (F, P, 4) per source frame and person (NaN: absent),
    kp2d (F, 17, 2) Human3.6M pixels of person 0, or None when there is none."""
    p = Path(str(video_path) + ".gt.npz")
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {"boxes": z["boxes"].astype(np.float64), "kp2d": z["kp2d"].astype(np.float64)}


class GroundTruthDetector(Detector):
    """Stand-in detector: the sidecar boxes of each source frame (score 0.9), nothing for videos without one."""

    def __init__(self, sidecars):
        self.sidecars = sidecars  # video_id -> load_ground_truth(...) dict or None

    def __call__(self, images, keys):
        out = []
        for vid, i in keys:
            gt = self.sidecars.get(vid)
            if gt is None or i >= len(gt["boxes"]):
                out.append(np.zeros((0, 5)))
                continue
            b = gt["boxes"][i]
            b = b[np.isfinite(b).all(1)]
            out.append(np.concatenate([b, np.full((len(b), 1), 0.9)], 1))
        return out


class GroundTruthPose(PoseEstimator):
    """Stand-in 2D pose: the sidecar's projected Human3.6M joints (score 0.95) when the box overlaps person 0."""

    keypoint_format = "h36m"

    def __init__(self, sidecars):
        self.sidecars = sidecars

    def __call__(self, images, boxes, keys):
        kp, sc = np.zeros((len(keys), 17, 2)), np.zeros((len(keys), 17))
        for n, (vid, i) in enumerate(keys):
            gt = self.sidecars.get(vid)
            if gt is not None and i < len(gt["kp2d"]) and box_iou(boxes[n:n + 1], gt["boxes"][i, :1])[0, 0] > 0.3:
                kp[n], sc[n] = gt["kp2d"][i], 0.95
        return kp, sc


def coco_to_h36m(kp, sc):
    """COCO-17 (N, 17, 2) + scores (N, 17) -> Human3.6M-17, the original's synthesis of pelvis, spine, thorax, head
    (pipeline.md 1.5)."""
    kp, sc = np.asarray(kp, np.float64), np.asarray(sc, np.float64)
    out, s = np.zeros_like(kp), np.zeros_like(sc)
    for h, c in {9: 0, 11: 5, 14: 6, 12: 7, 15: 8, 13: 9, 16: 10, 4: 11, 1: 12, 5: 13, 2: 14, 6: 15, 3: 16}.items():
        out[:, h], s[:, h] = kp[:, c], sc[:, c]
    sh, hip, nose = kp[:, 5:7].mean(1), kp[:, 11:13].mean(1), kp[:, 0]
    out[:, 10, 0] = kp[:, 1:5, 0].mean(1)
    out[:, 10, 1] = kp[:, 1, 1] + kp[:, 2, 1] - nose[:, 1]
    out[:, 8] = sh + (nose - sh) / 3
    out[:, 8, 1] -= (kp[:, 1:3, 1].mean(1) - nose[:, 1]) * 2 / 3
    out[:, 0] = hip
    out[:, 7] = (sh + hip) / 2
    out[:, 7, 0] += 2 * (out[:, 7, 0] - (out[:, 0, 0] + out[:, 8, 0]) / 2)
    out[:, 9] -= (out[:, 9] - sh) / 4
    s[:, 0], s[:, 8] = sc[:, 11:13].mean(1), sc[:, 5:7].mean(1)
    s[:, 7], s[:, 10] = (s[:, 0] + s[:, 8]) / 2, sc[:, 1:5].mean(1)
    return out, s


# ---------------------------------------------------------------------------------------------------------------
# 3-4. Boxes, sticky IoU tracker, candidates, picker


def box_area(b):
    b = np.asarray(b, np.float64)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a, b):
    """(N, 4), (M, 4) xyxy -> (N, M) IoU (0 where a box is empty or NaN)."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    return np.nan_to_num(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))


def sticky_track(dets, anchor, box, iou_thr=0.5, size_ratio_max=2.5, max_misses=3):
    """Follow `box` from frame `anchor` both ways: at each frame take the detection of highest IoU with the last
    accepted box, accepted iff IoU >= iou_thr and area ratio <= size_ratio_max, else a miss; more than max_misses
    consecutive misses end that direction. Returns (boxes (T, 4) NaN where not accepted, (start, end) inclusive)."""
    T = len(dets)
    boxes = np.full((T, 4), np.nan)
    boxes[anchor] = box
    ends = []
    for step in (1, -1):
        last, t, misses, end = np.asarray(box, np.float64), anchor + step, 0, anchor
        while 0 <= t < T and misses <= max_misses:
            d = dets[t]
            if len(d):
                iou = box_iou(last[None], d[:, :4])[0]
                j = int(np.argmax(iou))
                a0, a1 = box_area(last), box_area(d[j, :4])
                ratio = max(a0 / a1, a1 / a0) if min(a0, a1) > 0 else np.inf
                if iou[j] >= iou_thr and ratio <= size_ratio_max:
                    boxes[t], last, misses, end = d[j, :4], d[j, :4], 0, t
                    t += step
                    continue
            misses += 1
            t += step
        ends.append(end)
    start, stop = ends[1], ends[0]
    boxes[:start], boxes[stop + 1:] = np.nan, np.nan  # misses beyond the run ends are not part of it
    return boxes, (start, stop)


def fill_gaps(boxes):
    """Linear interpolation per coordinate over NaN rows (edges copy the nearest valid box)."""
    boxes = np.array(boxes, np.float64)
    ok = np.isfinite(boxes).all(1)
    if ok.any() and not ok.all():
        t = np.arange(len(boxes))
        for c in range(4):
            boxes[:, c] = np.interp(t, t[ok], boxes[ok, c])
    return boxes


def anchor_frame(dets, pool_frames=5):
    """Of the frames at linspace(0, T-1, pool_frames), the one with most detections (ties: nearest the middle)."""
    T = len(dets)
    pool = np.unique(np.linspace(0, T - 1, pool_frames).round().astype(int))
    counts = np.array([len(dets[i]) for i in pool])
    best = pool[counts == counts.max()]
    return int(best[np.argmin(np.abs(best - (T - 1) / 2))]), int(counts.max())


def heuristic_scores(cands, runs, width, height, T):
    """The oracle-free picker: sqrt(area fraction) x centrality x run fraction, in normalised coordinates (the v1
    target score mixed pixels and fractions). centrality = 1 - distance of the box centre from the frame centre / half
    the frame diagonal."""
    c = np.asarray(cands, np.float64)
    size = np.sqrt(box_area(c[:, :4]) / (width * height))
    centre = np.stack([(c[:, 0] + c[:, 2]) / 2 / width - 0.5, (c[:, 1] + c[:, 3]) / 2 / height - 0.5], 1)
    central = 1 - np.clip(np.linalg.norm(centre, axis=1) / math.sqrt(0.5), 0, 1)
    run = np.array([(e - s + 1) / T for s, e in runs])
    return size * central * run


# ---------------------------------------------------------------------------------------------------------------
# 7. Deterministic checks (pipeline.md 2.2 thresholds; the per-frame definitions are ours, section 5)


def _robust_threshold(x, floor):
    med = np.median(x)
    return max(med + 6 * 1.4826 * np.median(np.abs(x - med)), floor)


def run_checks(boxes, kp_scores, pose3d, width, height, cfg, n_cuts=0, core_ok=None, raw_valid=None):
    """Every check of a clip: {name: {"value", "limit", "ok"}}, and the list of failing issue codes.
    boxes (T, 4) tracked (gaps filled); kp_scores (T, 17); pose3d (T, 17, 3) metres; core_ok (T,) bool: >= 3 of
    the 5 core joints (nose, shoulders, hips in the estimator's own layout) confident; raw_valid (T,) bool: the box
    came from a detection (not interpolated). Definitions:
      HARD_CUTS       a cut inside the clip                     (upstream: has_hard_cuts)
      TOO_SHORT       T < min_frames
      BBOX_JUMPS      centre moves > 0.5 x mean box diagonal     ratio of transitions > 0.05
      SIZE_SPIKES     area ratio > 2 between consecutive boxes  ratio > 0.03
      IOU_BREAKS      IoU < 0.1 and area ratio > 2 between consecutive detected boxes   ratio > 0.1 (upstream)
      POSE_JUMPS      max root-relative joint displacement / body height above max(median + 6 MAD, 0.5)
                      ratio of transitions > 0.05
      LOW_CONFIDENCE  frames whose mean joint score < 0.3       ratio > 0.4
      LOW_COVERAGE    frames with >= 3 of 5 core joints > 0.3 (COCO indices before conversion, fixing upstream)
                      ratio < 0.4
      LOW_MOTION      peak (3-frame median) root-relative joint speed < 0.3 body heights / s
      SMALL_BBOX      median box area < 8% of the frame"""
    T = len(boxes)
    b = np.asarray(boxes, np.float64)
    area = np.maximum(box_area(b), 1e-9)
    out = {}

    def put(name, value, limit, ok):
        out[name] = {"value": round(float(value), 5), "limit": float(limit), "ok": bool(ok)}

    put("HARD_CUTS", n_cuts, 0, n_cuts == 0)
    put("TOO_SHORT", T, cfg.min_frames, T >= cfg.min_frames)
    n = max(T - 1, 1)
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
    diag = np.hypot(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    jump = np.linalg.norm(np.diff(centre, axis=0), axis=1) > 0.5 * (diag[1:] + diag[:-1]) / 2
    put("BBOX_JUMPS", jump.sum() / n, cfg.max_box_jump_ratio, jump.sum() / n <= cfg.max_box_jump_ratio)
    ratio = np.maximum(area[1:] / area[:-1], area[:-1] / area[1:])
    spike = (ratio > 2).sum() / n
    put("SIZE_SPIKES", spike, cfg.max_size_spike_ratio, spike <= cfg.max_size_spike_ratio)
    rv = np.ones(T, bool) if raw_valid is None else np.asarray(raw_valid, bool)
    pair = rv[1:] & rv[:-1]
    iou = np.array([box_iou(b[t:t + 1], b[t + 1:t + 2])[0, 0] for t in range(T - 1)])
    brk = ((iou < 0.1) & (ratio > 2) & pair).sum() / max(pair.sum(), 1)
    put("IOU_BREAKS", brk, cfg.max_iou_break_ratio, brk <= cfg.max_iou_break_ratio)
    rel = np.asarray(pose3d, np.float64) - np.asarray(pose3d, np.float64)[:, :1]
    bl = data.bone_lengths_of(rel)  # (T, 17)
    height_m = float(np.median(bl[:, [7, 8, 9, 10, 2, 3]].sum(1))) or 1.0  # pelvis->head + thigh + shin
    disp = np.linalg.norm(np.diff(rel, axis=0), axis=2).max(1) / height_m if T > 1 else np.zeros(1)
    pj = (disp > _robust_threshold(disp, 0.5)).sum() / n
    put("POSE_JUMPS", pj, cfg.max_pose_jump_ratio, pj <= cfg.max_pose_jump_ratio)
    low = (np.asarray(kp_scores).mean(1) < cfg.low_conf).mean()
    put("LOW_CONFIDENCE", low, cfg.max_low_conf_ratio, low <= cfg.max_low_conf_ratio)
    cov = 1.0 if core_ok is None else float(np.mean(core_ok))
    put("LOW_COVERAGE", cov, cfg.min_coverage_ratio, cov >= cfg.min_coverage_ratio)
    speed = disp * cfg.fps
    if len(speed) >= 3:
        speed = np.median(np.stack([speed[:-2], speed[1:-1], speed[2:]]), 0)
    put("LOW_MOTION", speed.max(), cfg.min_peak_speed, speed.max() >= cfg.min_peak_speed)
    med_area = float(np.median(area)) / (width * height)
    put("SMALL_BBOX", med_area, cfg.min_box_area, med_area >= cfg.min_box_area)
    return out, [k for k, v in out.items() if not v["ok"]]


def core_coverage(scores, keypoint_format, thr=0.3):
    """(T,) bool: >= 3 of nose, shoulders, hips confident, indexed in the estimator's own layout."""
    core = [0, 5, 6, 11, 12] if keypoint_format == "coco" else [9, 11, 14, 1, 4]
    return (np.asarray(scores)[:, core] > thr).sum(1) >= 3


# ---------------------------------------------------------------------------------------------------------------
# Per video: decode -> segments -> target -> track -> 2D -> 3D -> checks -> judge/caption -> clips


def safe_id(text):
    """A filesystem-safe id (data.py clip id rules): path separators become '__', other odd characters '_'."""
    s = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(text).replace("/", "__").replace("\\", "__"))
    return ("v" + s if not re.match(r"[A-Za-z0-9_\-]", s) else s)[:200]


def _clean_dets(d, conf):
    d = np.asarray(d, np.float64).reshape(-1, 5)
    ok = np.isfinite(d).all(1) & (d[:, 4] >= conf) & (d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])
    return d[ok][np.argsort(-d[ok, 4], kind="stable")]


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def process_segment(dec, s, e, job, cfg, detector, pose_estimator, lifter, vlm):
    """One cut-free segment [s, e) of a decoded video -> (segment record, clip arrays or None)."""
    vid, frames = job["video_id"], dec.frames[s:e]
    T, W, H = e - s, dec.width, dec.height
    keys = [(vid, int(i)) for i in dec.src_frame_index[s:e]]
    rec = {"start": s, "end": e}
    dets = [_clean_dets(d, cfg.det_conf) for d in detector(frames, keys)]
    if len(dets) != T:
        raise ValueError(f"detector returned {len(dets)} results for {T} frames")
    if not any(len(d) for d in dets):
        return {**rec, "status": "NO_DETECTIONS"}, None
    anchor, count = anchor_frame(dets, cfg.pool_frames)
    if count == 0:  # the pool frames are empty: fall back to the frame with most people
        anchor = int(np.argmax([len(d) for d in dets]))
    cands = dets[anchor][:cfg.max_candidates]
    runs = [sticky_track(dets, anchor, c[:4], cfg.iou_track, cfg.size_ratio_max, cfg.max_misses) for c in cands]
    heur = heuristic_scores(cands, [r[1] for r in runs], W, H, T)
    order = [int(i) for i in np.argsort(-heur, kind="stable")]
    rec.update(anchor=s + anchor, candidates=len(cands), heuristic=[round(float(h), 4) for h in heur],
               picker="heuristic")
    if vlm is not None and len(cands) > 1:
        prompt = PICK_PROMPT.format(n=len(cands), action=job.get("action_class") or "unknown",
                                    text=(job.get("description") or "")[:250])
        reply = vlm.chat([draw_numbered_boxes(frames[anchor], cands)], prompt, max_tokens=1024, temperature=0.0)
        pick = parse_pick(reply["text"], len(cands)) if reply["text"] is not None else None
        rec["oracle"] = {"chosen": pick, "error": reply["error"], "raw": (reply["text"] or "")[:500]}
        if pick is not None:
            order = [pick] + [i for i in order if i != pick]
            rec["picker"] = "oracle"
    chosen = None
    for attempt, ci in enumerate(order[:cfg.max_attempts]):
        a, b = runs[ci][1]
        if b - a + 1 >= cfg.min_frames:
            chosen = ci
            rec.update(chosen=ci, attempt=attempt, run=[s + a, s + b + 1])
            break
    if chosen is None:
        longest = max(runs[ci][1][1] - runs[ci][1][0] + 1 for ci in order[:cfg.max_attempts])
        return {**rec, "status": f"SHORT_RUN:{longest}"}, None
    a, b = runs[chosen][1]
    raw = runs[chosen][0][a:b + 1]
    raw_valid = np.isfinite(raw).all(1)
    boxes = fill_gaps(raw)
    cf, ck = frames[a:b + 1], keys[a:b + 1]
    kp, sc = pose_estimator(cf, boxes, ck)
    kp, sc = np.asarray(kp, np.float64), np.asarray(sc, np.float64)
    if kp.shape != (len(cf), 17, 2) or sc.shape != (len(cf), 17):
        raise ValueError(f"pose estimator returned {kp.shape} / {sc.shape} for {len(cf)} boxes")
    fmt = getattr(pose_estimator, "keypoint_format", "coco")
    core_ok = core_coverage(sc, fmt, cfg.low_conf)
    kp_h, sc_h = coco_to_h36m(kp, sc) if fmt == "coco" else (kp, sc)
    try:
        pose3d = np.asarray(lifter(kp_h, sc_h, W, H), np.float64)
        if pose3d.shape != (len(cf), 17, 3) or not np.isfinite(pose3d).all():
            raise ValueError(f"lifter output shape {pose3d.shape} or non-finite values")
    except Exception as ex:
        return {**rec, "status": f"LIFT_FAIL:{type(ex).__name__}", "detail": str(ex)[:200]}, None
    n_cuts = len(detect_cuts(gray_histograms(cf), cfg.cut_threshold))
    checks, issues = run_checks(boxes, sc_h, pose3d, W, H, cfg, n_cuts, core_ok, raw_valid)
    rec.update(status="TRACKED", checks=checks, issues=issues, prog_good=not issues)
    clip = {"i0": s + a, "i1": s + b + 1, "boxes": boxes, "kp2d": kp_h, "scores": sc_h, "pose3d": pose3d}
    if vlm is not None:  # caption first: without a given instruction the judge checks the motion against it
        rec["caption"] = caption_clip(vlm, cf, boxes, job.get("action_class", ""), cfg)
        text = job.get("description") or rec["caption"]["text"] or ""
        rec["judge"] = judge_clip(vlm, cf, kp_h, sc_h, job.get("action_class", ""), text, cfg)
    judge = rec.get("judge") or {}
    rec["vlm_good"] = bool(judge.get("tracking_consistent") and judge.get("motion_matches"))
    rec["strict"] = rec["prog_good"] and rec["vlm_good"]
    return rec, clip


def _keep(rec, keep):
    return {"all": True, "checks": rec["prog_good"], "vlm_good": rec["vlm_good"], "strict": rec["strict"]}[keep]


def process_video(job, cfg, detector, pose_estimator, lifter, vlm=None, clips_root=None, keep="checks"):
    """job: {"video": path, "video_id": str, "action_class": str, "description": str (optional)} -> the video's
    status record (JSON-able); kept clips are written under clips_root with data.write_clip."""
    t0 = time.time()
    vid = job["video_id"]
    record = {"video_id": vid, "video": str(job["video"]), "action_class": job.get("action_class", ""),
              "version": PIPELINE_VERSION, "config": config_hash(cfg), "segments": [], "clips": []}
    try:
        dec = decode_video(job["video"], cfg.fps, cfg.max_short_side, cfg.max_seconds)
    except VideoError as e:
        return {**record, "status": "SKIPPED", "reason": e.reason, "detail": e.detail[:300],
                "seconds": round(time.time() - t0, 3)}
    record["decode"] = {"samples": len(dec.frames), "src_fps": round(dec.src_fps, 4), "width": dec.width,
                        "height": dec.height, "rotation": dec.rotation, "warnings": dec.warnings}
    cuts = detect_cuts(gray_histograms(dec.frames), cfg.cut_threshold)
    kept, dropped = split_segments(len(dec.frames), cuts, cfg.min_frames)
    record["cuts"] = cuts
    record["segments"] = [{"start": s, "end": e, "status": r} for s, e, r in dropped]
    for s, e in kept:
        seg, clip = process_segment(dec, s, e, job, cfg, detector, pose_estimator, lifter, vlm)
        record["segments"].append(seg)
        if clip is None:
            continue
        clip_id = f"{safe_id(vid)}-{clip['i0']:05d}"
        seg["clip_id"] = clip_id
        seg["written"] = bool(clips_root is not None and _keep(seg, keep))
        if seg["written"]:
            i0, i1 = clip["i0"], clip["i1"]
            caption = (seg.get("caption") or {}).get("text")
            desc = caption or job.get("description") or f"Perform {job.get('action_class') or 'the motion'}."
            extra = {"pipeline_version": PIPELINE_VERSION, "pose_fps": repr(cfg.fps), "source": Path(job["video"]).name,
                     "prog_good": str(seg["prog_good"]), "vlm_good": str(seg["vlm_good"]),
                     "strict": str(seg["strict"]), "issues": json.dumps(seg["issues"]),
                     "description_source": "vlm" if caption else ("manifest" if job.get("description") else "template"),
                     "kp2d_h36m": json.dumps(np.round(clip["kp2d"], 1).tolist()),
                     "kp2d_score": json.dumps(np.round(clip["scores"], 3).tolist())}
            pose3d = clip["pose3d"].astype(np.float32)
            c = data.Clip(clip_id=clip_id, frames_jpeg=[_jpeg(f) for f in dec.frames[i0:i1]],
                          boxes=clip["boxes"].astype(np.float32), pose3d=pose3d,
                          angles=np.asarray(data.pose3d_to_angles(pose3d), np.float32),
                          src_frame_index=dec.src_frame_index[i0:i1], src_time=dec.src_time[i0:i1],
                          src_fps=float(dec.src_fps), width=dec.width, height=dec.height,
                          action_class=job.get("action_class", ""), description=desc, video_id=vid, extra=extra)
            data.write_clip(clips_root, c)
        record["clips"].append(clip_id)
    n_written = sum(1 for g in record["segments"] if g.get("written"))
    status, reason = ("OK", "") if n_written else ("NO_CLIPS", ";".join(_segment_reasons(record)) or "NO_SEGMENTS")
    return {**record, "status": status, "reason": reason, "written": n_written, "seconds": round(time.time() - t0, 3)}


def _segment_reasons(record):
    """Attrition codes of a record's segments: their failure status, else the failing checks / judge outcome."""
    out = []
    for g in record.get("segments", []):
        st = g.get("status", "")
        if st != "TRACKED":
            out.append(st.split(":")[0])
            continue
        out += g.get("issues", [])
        j = g.get("judge")
        if j is not None:
            if not j.get("judged"):
                out.append("JUDGE_UNPARSED" if j.get("error") is None else "JUDGE_ERROR")
            else:
                out += [] if j["tracking_consistent"] else ["JUDGE_TRACKING"]
                out += [] if j["motion_matches"] else ["JUDGE_MOTION"]
        if g.get("written"):
            out.append("WRITTEN")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 9. Many videos: manifest, shards, resume, status records, attrition


def list_videos(videos_dir=None, manifest=None):
    """Jobs sorted by video id. From a folder: every file with a video extension below it; the video id is its
    relative path without extension (made safe), its action class the name of its folder (Kinetics layout
    <class>/<id>.mp4; "" at the top level). From a manifest (JSONL): {"video": path relative to the manifest,
    "video_id"?, "action_class"?, "description"?} per line."""
    jobs = []
    if manifest:
        base = Path(manifest).parent
        with open(manifest, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    path = base / row["video"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{manifest}:{n}: bad manifest line ({e}); need {{\"video\": path, ...}}") \
                        from None
                vid = row.get("video_id") or Path(row["video"]).with_suffix("").as_posix()
                jobs.append({"video": str(path), "video_id": safe_id(vid),
                             "action_class": str(row.get("action_class", "")),
                             "description": str(row.get("description", ""))})
    if videos_dir:
        root = Path(videos_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--videos {root}: not a folder")
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
                rel = p.relative_to(root)
                jobs.append({"video": str(p), "video_id": safe_id(rel.with_suffix("").as_posix()),
                             "action_class": rel.parent.name if len(rel.parts) > 1 else "", "description": ""})
    ids = [j["video_id"] for j in jobs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate video ids: {dup[:5]}")
    return sorted(jobs, key=lambda j: j["video_id"])


def shard_of(video_id, num_shards):
    """Stable shard of a video: md5 of its id, so shards do not depend on listing order or on other videos."""
    return int(hashlib.md5(video_id.encode("utf-8")).hexdigest()[:8], 16) % num_shards


def parse_shard(text):
    """'K/N' (0 <= K < N) -> (K, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def read_records(path):
    """The complete records of a status file (a torn last line from a killed run is ignored)."""
    out = []
    if Path(path).is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return out


def _open_status(path, resume):
    """Open the shard's status file for appending; a torn last line is cut off first; without resume, truncate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume and path.is_file():
        raw = path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        if cut != len(raw):
            with open(path, "r+b") as fh:
                fh.truncate(cut)
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def _remove_stale_tmp(clips_root, shard, num_shards):
    """Temp files of clips of this shard left by a killed run (data.write_clip: .<clip_id>.safetensors.*.tmp)."""
    n = 0
    for p in Path(clips_root).glob("clips/*/.*.tmp"):
        clip_id = p.name[1:].split(".safetensors.")[0]
        vid = clip_id.rsplit("-", 1)[0]
        if shard_of(vid, num_shards) == shard:
            p.unlink(missing_ok=True)
            n += 1
    return n


def summarize(records):
    """Attrition table: videos by status/reason, then segment/clip outcomes by code (text)."""
    from collections import Counter
    videos = Counter(f"{r['status']}" + (f" {r['reason']}" if r["status"] in ("SKIPPED", "ERROR") else "")
                     for r in records)
    segs = Counter(code for r in records for code in _segment_reasons(r))
    lines = [f"videos: {len(records)}"] + [f"  {n:7d}  {k}" for k, n in videos.most_common()]
    lines += ["segments / clips:"] + [f"  {n:7d}  {k}" for k, n in segs.most_common()]
    return "\n".join(lines)


def run(jobs, out, cfg, detector, pose_estimator, lifter, vlm=None, shard=(0, 1), resume=False, keep="checks",
        progress=True):
    """Process this shard's jobs into out/ (clips via data.write_clip, status/shard-K-of-N.jsonl); returns the
    shard's records (old ones too when resuming)."""
    from tqdm import tqdm
    out = Path(out)
    k, n = shard
    mine = [j for j in jobs if shard_of(j["video_id"], n) == k]
    status = out / "status" / f"shard-{k:05d}-of-{n:05d}.jsonl"
    done = {r["video_id"]: r for r in read_records(status)} if resume else {}
    _remove_stale_tmp(out, k, n)
    with _open_status(status, resume) as fh:
        for job in tqdm(mine, desc=f"shard {k}/{n}", disable=not progress, unit="video"):
            if job["video_id"] in done:
                continue
            try:
                rec = process_video(job, cfg, detector, pose_estimator, lifter, vlm, out, keep)
            except Exception as e:  # a bug or a perception failure on one video must not stop the shard
                rec = {"video_id": job["video_id"], "video": str(job["video"]), "status": "ERROR",
                       "reason": f"EXC:{type(e).__name__}", "detail": str(e)[:300], "segments": [], "clips": []}
            done[job["video_id"]] = rec
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a record on disk means the video is finished (its clips were written first)
    if any(r.get("written") for r in done.values()):
        data.write_index(out)
    return list(done.values())


# ---------------------------------------------------------------------------------------------------------------
# Rendered demo videos with ground-truth sidecars (the stand-in perception's input), and the CLI


def write_video(path, frames, fps=30.0, codec="libx264", times=None, rotation=0):
    """Encode RGB frames (list of (H, W, 3) uint8, even sizes) with PyAV; `times` (seconds, increasing) gives a
    variable frame rate; `rotation` stores a display rotation (degrees counter-clockwise)."""
    av = _import_av()
    from fractions import Fraction
    tb = Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = tb
        if rotation:
            s.set_display_rotation(rotation)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts, vf.time_base = int(round((times[i] if times is not None else i / fps) * 1000)), tb
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def render_demo_videos(out_dir, num_videos=4, seed=0, repeat=3):
    """demo.py mocap renders as mp4 videos (each 10 Hz frame shown `repeat` times at 10 * repeat fps) plus
    `<video>.gt.npz` sidecars: boxes (F, 2, 4) of the target and of a static distractor figure, kp2d (F, 17, 2)
    projected Human3.6M joints; a manifest.jsonl with the clips' action classes and instructions. Video 1 is two
    clips spliced (a hard cut). Returns the video paths."""
    import demo
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, rows = [], []
    for v in range(num_videos):
        parts = [demo.make_clip(2 * v, seed)] + ([demo.make_clip(2 * v + 1, seed)] if v == 1 else [])
        frames, boxes, kps = [], [], []
        for clip in parts:
            cam = json.loads(clip.extra["camera"])
            p = clip.pose3d.astype(np.float64)
            kp = cam["focal_px"] * p[..., :2] / p[..., 2:3] + np.array([clip.width / 2, clip.height / 2])
            # a static grey figure in a corner as a second, smaller person for the picker
            w, h = clip.width, clip.height
            dx = 0.04 * w if rng.random() < 0.5 else 0.86 * w
            dbox = np.array([dx, 0.55 * h, dx + 0.1 * w, 0.55 * h + 0.3 * h])
            for t, jpg in enumerate(clip.frames_jpeg):
                im = Image.open(io.BytesIO(jpg)).convert("RGB")
                d = ImageDraw.Draw(im)
                d.ellipse([dbox[0] + 0.3 * (dbox[2] - dbox[0]), dbox[1], dbox[2] - 0.3 * (dbox[2] - dbox[0]),
                           dbox[1] + 0.25 * (dbox[3] - dbox[1])], fill=(120, 120, 120))
                d.rectangle([dbox[0], dbox[1] + 0.25 * (dbox[3] - dbox[1]), dbox[2], dbox[3]], fill=(110, 110, 110))
                frames += [np.asarray(im)] * repeat
                boxes += [np.stack([clip.boxes[t], dbox])] * repeat
                kps += [kp[t]] * repeat
        name = f"{parts[0].action_class}/{parts[0].clip_id}.mp4"  # Kinetics layout: <class>/<id>.mp4
        (out / name).parent.mkdir(exist_ok=True)
        write_video(out / name, frames, fps=10.0 * repeat)
        sidecar = out / f"{name}.gt.npz"
        with open(sidecar.with_suffix(".tmp"), "wb") as fh:
            np.savez(fh, boxes=np.asarray(boxes, np.float32), kp2d=np.asarray(kps, np.float32))
        os.replace(sidecar.with_suffix(".tmp"), sidecar)
        paths.append(out / name)
        rows.append({"video": name, "action_class": parts[0].action_class, "description": parts[0].description})
    tmp = out / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "manifest.jsonl")
    return paths


class _SidecarCache(dict):
    """video_id -> ground-truth sidecar, loaded on first use (the stand-in perception's data)."""

    def __init__(self, jobs):
        super().__init__()
        self.paths = {j["video_id"]: j["video"] for j in jobs}

    def get(self, vid, default=None):
        if vid not in self:
            if len(self) > 8:
                self.clear()
            self[vid] = load_ground_truth(self.paths[vid]) if vid in self.paths else None
        return dict.get(self, vid, default)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", default="", help="folder of videos (<class>/<id>.mp4 or flat)")
    ap.add_argument("--manifest", default="", help="JSONL manifest instead of / in addition to --videos")
    ap.add_argument("--out", default="", help="output dataset folder (clips + status/)")
    ap.add_argument("--shard", default="0/1", help="K/N: process the videos with md5(video_id) %% N == K")
    ap.add_argument("--resume", action="store_true", help="skip videos that already have a status record")
    ap.add_argument("--keep", default="", choices=["", "all", "checks", "vlm_good", "strict"],
                    help="which clips to write (default: strict with a VLM, checks without)")
    ap.add_argument("--detector", default="", help="YOLOS checkpoint folder (e.g. hustvl/yolos-base, downloaded once)")
    ap.add_argument("--pose", default="", help="ViTPose checkpoint folder (e.g. usyd-community/vitpose-plus-base)")
    ap.add_argument("--device", default="auto", help="device of the perception models (auto: cuda if available)")
    ap.add_argument("--perception", default="groundtruth", choices=["groundtruth"],
                    help="groundtruth: <video>.gt.npz sidecars (rendered demo videos); models come later")
    ap.add_argument("--vlm-url", default="", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    ap.add_argument("--vlm-model", default="", help="model name sent to the server")
    ap.add_argument("--vlm-api-key", default=os.environ.get("VLM_API_KEY", ""))
    ap.add_argument("--vlm-local", default="", help="local Qwen3-VL checkpoint folder (our qwen3vl.py)")
    ap.add_argument("--vlm-device", default="cpu")
    ap.add_argument("--vlm-timeout", type=float, default=120.0)
    ap.add_argument("--vlm-retries", type=int, default=3)
    ap.add_argument("--fit-steps", type=int, default=300, help="gradient steps of the 2D->3D fit per clip")
    ap.add_argument("--fit-flip-steps", type=int, default=0, help="steps of the fit's depth-flip search (0: off)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--render-demo", default="", help="write rendered demo videos + sidecars to this folder and exit")
    ap.add_argument("--num-videos", type=int, default=4)
    args = ap.parse_args(argv)
    if args.render_demo:
        for p in render_demo_videos(args.render_demo, args.num_videos):
            print(p)
        return 0
    if not args.out or not (args.videos or args.manifest):
        ap.error("--out and --videos (or --manifest) are required")
    import fit3d
    cfg = PipelineConfig()
    try:
        jobs = list_videos(args.videos or None, args.manifest or None)
        shard = parse_shard(args.shard)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    sidecars = _SidecarCache(jobs)
    vlm = None
    if args.vlm_local:
        vlm = VLMClient(local=LocalQwen3VL(args.vlm_local, args.vlm_device), retries=args.vlm_retries)
    elif args.vlm_url:
        vlm = VLMClient(args.vlm_url, args.vlm_model, args.vlm_api_key, args.vlm_timeout, args.vlm_retries)
    keep = args.keep or ("strict" if vlm is not None else "checks")
    lifter = fit3d.FitLifter(fit3d.FitConfig(steps=args.fit_steps, flip_steps=args.fit_flip_steps))
    detector, pose = GroundTruthDetector(sidecars), GroundTruthPose(sidecars)
    if args.detector or args.pose:  # the real models (vit.py); both are needed together
        if not (args.detector and args.pose):
            ap.error("--detector and --pose go together")
        import torch
        import vit
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        detector = vit.YolosDetector(args.detector, device=device, dtype=dtype, threshold=cfg.det_conf,
                                     batch_size=16, workers=min(8, os.cpu_count() or 1))
        pose = vit.ViTPoseEstimator(args.pose, device=device, dtype=dtype, dataset_index=0)
    records = run(jobs, args.out, cfg, detector, pose, lifter, vlm, shard, args.resume, keep, not args.no_progress)
    print(summarize(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
