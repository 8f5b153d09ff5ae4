"""
Target person and track quality for the data pipeline (pipeline.py stages 3-4 and 7): which
person to follow through a cut-free segment, and whether the track is good enough to become a
clip. Pure numpy on boxes, scores and poses; pipeline.process_segment runs the models and calls
these. The limits are fields of pipeline.PipelineConfig, passed in as `cfg` (this file does not
import pipeline).

Target (anchor_frame, heuristic_scores): the anchor is the frame with most detections among 5 evenly
spaced ones; its detections are the candidates, ordered by a VLM oracle's pick or by our heuristic,
sqrt(area fraction) x centrality x run fraction in normalised coordinates (the original's score
mixed pixels and fractions).

Sticky IoU tracker (sticky_track, fill_gaps): the original pipeline's thresholds, IoU >= 0.5, area
ratio <= 2.5, <= 3 consecutive misses, and one rule of ours: the only detection overlapping the last
box needs just IoU >= 0.2, which keeps flips and rolls whole at 10 Hz. Its price: a bystander who is
the only one overlapping a missed target takes the track over; the VLM judge's tracking_consistent
is the safeguard.

Checks (run_checks, core_coverage): the original pipeline's thresholds; where it published no
per-frame definition, ours (run_checks lists them).

No commands of its own: pipeline.py runs it, bench/pipeline.py times it, bench/track.py measures how
much of each motion the tracker keeps.
"""

import math

import numpy as np

import kinematics

# --------------------------------------------------------------------------------------------------
# 3-4. Boxes, sticky IoU tracker, candidates, picker


def box_area(b):
    """(..., 4) xyxy -> (...) area; an inverted box has area 0 (not negative)."""
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


def sticky_track(dets, anchor, box, iou_thr=0.5, size_ratio_max=2.5, max_misses=3, sole_iou=0.0):
    """Follow `box` from frame `anchor` both ways: at each frame take the detection of highest IoU
    with the last accepted box, accepted iff IoU >= iou_thr and area ratio <= size_ratio_max, else a
    miss; more than max_misses consecutive misses end that direction. sole_iou > 0 (ours): a
    detection that is the ONLY one overlapping the last box is also accepted from IoU >= sole_iou,
    because a flipping, rolling or spinning body changes its box's shape faster than IoU 0.5 allows
    at 10 Hz, while with several overlapping people the upstream 0.5 rule still decides. Returns
    (boxes (T, 4) NaN where not accepted, (start, end) inclusive)."""
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
                sole = sole_iou > 0 and iou[j] >= sole_iou and int((iou > 0).sum()) == 1
                if (iou[j] >= iou_thr or sole) and ratio <= size_ratio_max:
                    boxes[t], last, misses, end = d[j, :4], d[j, :4], 0, t
                    t += step
                    continue
            misses += 1
            t += step
        ends.append(end)
    start, stop = ends[1], ends[0]
    boxes[:start], boxes[stop + 1:] = np.nan, np.nan  # misses beyond the run ends are not in it
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
    """Of the frames at linspace(0, T-1, pool_frames), the one with most detections (ties: nearest
    the middle), and its count."""
    T = len(dets)
    pool = np.unique(np.linspace(0, T - 1, pool_frames).round().astype(int))
    counts = np.array([len(dets[i]) for i in pool])
    best = pool[counts == counts.max()]
    return int(best[np.argmin(np.abs(best - (T - 1) / 2))]), int(counts.max())


def heuristic_scores(cands, runs, width, height, T):
    """The oracle-free picker: sqrt(area fraction) x centrality x run fraction, in normalised
    coordinates (the v1 target score mixed pixels and fractions). centrality = 1 - distance of the
    box centre from the frame centre / half the frame diagonal."""
    c = np.asarray(cands, np.float64)
    size = np.sqrt(box_area(c[:, :4]) / (width * height))
    centre = np.stack([(c[:, 0] + c[:, 2]) / 2 / width - 0.5,
                       (c[:, 1] + c[:, 3]) / 2 / height - 0.5], 1)
    central = 1 - np.clip(np.linalg.norm(centre, axis=1) / math.sqrt(0.5), 0, 1)
    run = np.array([(e - s + 1) / T for s, e in runs])
    return size * central * run


# --------------------------------------------------------------------------------------------------
# 7. Deterministic checks (the original pipeline's thresholds; the per-frame definitions are ours)


def _robust_threshold(x, floor):
    """median + 6 robust sigmas (1.4826 x MAD is sigma for Gaussian data), at least `floor`: the
    limit adapts to the clip's own motion, so a fast dance is not all jumps, and a still clip is not
    flagged for noise."""
    med = np.median(x)
    return max(med + 6 * 1.4826 * np.median(np.abs(x - med)), floor)


def run_checks(boxes, kp_scores, pose3d, width, height, cfg, n_cuts=0, core_ok=None, raw_valid=None,
               fit_residual=None):
    """Every check of a clip: {name: {"value", "limit", "ok"}}, and the list of failing issue codes.
    boxes (T, 4) tracked (gaps filled); kp_scores (T, 17); pose3d (T, 17, 3) metres; core_ok (T,)
    bool: >= 3 of the 5 core joints (nose, shoulders, hips in the estimator's own layout) confident;
    raw_valid (T,) bool: the box came from a detection (not interpolated); fit_residual:
    fit3d.objective's residual of pose3d. A check fails when (default limits; * = the original's
    definition, the others are ours where it published none):
      HARD_CUTS*      a cut inside the clip
      TOO_SHORT       T < min_frames
      BBOX_JUMPS      the centre moves > 0.5 x mean box diagonal in > 5% of transitions
      SIZE_SPIKES     area ratio > 2 between consecutive boxes in > 3% of transitions
      IOU_BREAKS*     IoU < 0.1 and area ratio > 2 in > 10% of pairs of consecutive detected boxes
      POSE_JUMPS      max root-relative joint displacement / body height above
                      max(median + 6 MAD, 0.5) in > 5% of transitions
      LOW_CONFIDENCE  mean joint score < 0.3 in > 40% of frames
      LOW_COVERAGE*   >= 3 of 5 core joints > 0.3 in < 40% of frames (indexed in the estimator's own
                      layout: the original applied COCO indices to Human3.6M keypoints)
      LOW_MOTION      peak (3-frame median) root-relative joint speed < 0.3 body heights / s (the
                      original's 3.0 "m/s" was on unitless model output)
      SMALL_BBOX      median box area < 8% of the frame
      FIT_COLLAPSE    (with fit_residual) residual > 0.05: a typical frame's joints are off by > 5%
                      of the person's 2D size after the fit (fit3d.COLLAPSE_RESIDUAL)"""
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
    jumps = jump.sum() / n
    put("BBOX_JUMPS", jumps, cfg.max_box_jump_ratio, jumps <= cfg.max_box_jump_ratio)
    ratio = np.maximum(area[1:] / area[:-1], area[:-1] / area[1:])
    spike = (ratio > 2).sum() / n
    put("SIZE_SPIKES", spike, cfg.max_size_spike_ratio, spike <= cfg.max_size_spike_ratio)
    rv = np.ones(T, bool) if raw_valid is None else np.asarray(raw_valid, bool)
    pair = rv[1:] & rv[:-1]
    iou = np.array([box_iou(b[t:t + 1], b[t + 1:t + 2])[0, 0] for t in range(T - 1)])
    brk = ((iou < 0.1) & (ratio > 2) & pair).sum() / max(pair.sum(), 1)
    put("IOU_BREAKS", brk, cfg.max_iou_break_ratio, brk <= cfg.max_iou_break_ratio)
    rel = np.asarray(pose3d, np.float64) - np.asarray(pose3d, np.float64)[:, :1]
    bl = kinematics.bone_lengths_of(rel)  # (T, 17)
    # body height: pelvis -> head + thigh + shin
    height_m = float(np.median(bl[:, [7, 8, 9, 10, 2, 3]].sum(1))) or 1.0
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
    if fit_residual is not None:
        ok = fit_residual <= cfg.max_fit_residual
        put("FIT_COLLAPSE", fit_residual, cfg.max_fit_residual, ok)
    return out, [k for k, v in out.items() if not v["ok"]]


def core_coverage(scores, keypoint_format, thr=0.3):
    """(T,) bool: >= 3 of nose, shoulders, hips confident, indexed in the estimator's own layout."""
    core = [0, 5, 6, 11, 12] if keypoint_format == "coco" else [9, 11, 14, 1, 4]
    return (np.asarray(scores)[:, core] > thr).sum(1) >= 3
