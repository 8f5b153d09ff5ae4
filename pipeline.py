"""
MIMIC data pipeline: human videos -> training clips (data.py format), sharded and resumable.

Stages, per video (README: Data pipeline has each one's rules and numbers):
  1-2. decode once at 10 Hz by timestamps, hard cuts -> cut-free segments (video.py);
  3-4. the target person: candidates on an anchor frame, picked by a VLM oracle or a heuristic, and
       followed by a sticky IoU tracker (track.py);
  5. 2D pose through a PoseEstimator (COCO-17 -> Human3.6M-17 here; no-evidence keypoints masked);
  6. 3D + 22 angles through a Lifter (default fit3d.FitLifter: a kinematic fit, no weights);
  7. deterministic checks (track.py);
  8. a VLM judge {tracking_consistent, motion_matches} and an imperative caption (vlm.py);
  9. clips written atomically, one JSONL status record per video, --shard K/N by a stable hash of
     the video id, --resume, and an attrition table.
`strict` = checks AND judge, `vlm_good` = judge only (the original's two datasets); --keep picks
what is written. Perception is pluggable (Detector, PoseEstimator below); synth.py's stand-ins
read the ground truth that --render-demo writes next to each rendered video, so the whole pipeline
runs on a CPU.

Commands:
  python pipeline.py --render-demo /tmp/vids --num-videos 4       # rendered mocap + ground truth
  python pipeline.py --manifest /tmp/vids/manifest.jsonl --out /tmp/clips   # stand-ins, no VLM
  python pipeline.py --videos DIR --out OUT --shard 3/16 --resume --vlm-url URL --vlm-model NAME
  python train.py --data /tmp/clips                                # train on the result
Many machines: run shards K = 0..N-1 under any scheduler into one shared OUT; one VLM server
serves every shard; `python data.py index OUT` once all have finished.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import data
import fit3d  # stage 6's default lifter, and the residual that tells a collapsed fit (FIT_COLLAPSE)
import kinematics
import shards  # stage 9: the video list, stable shards, the shard's status file
import synth  # the rendered demo videos and their ground truth, the stand-in perception
import track  # stages 3-4 and 7: target person, sticky IoU tracker, deterministic checks
import video  # stages 1-2: decode, hard cuts, segments

# stage 8 and the oracle picker's prompt + parsing live in vlm.py; names, not `import vlm`, because
# `vlm` is the client argument of process_segment / process_video / run
from vlm import PICK_PROMPT, LocalQwen3VL, VLMClient, caption_clip, draw_numbered_boxes, judge_clip, parse_pick

PIPELINE_VERSION = "1"


@dataclass
class PipelineConfig:
    fps: float = 10.0              # sampling rate of clips
    max_short_side: int = 480      # decoded frames are downscaled so min(w, h) <= this ("480p")
    max_seconds: float = 120.0     # decode at most this much (samples stay in memory, ~1.2 MB each)
    cut_threshold: float = 0.4     # histogram correlation below this = hard cut (the original's)
    min_frames: int = 20           # shorter segments / runs / clips are dropped (the original's)
    pool_frames: int = 5           # frames at linspace(0, T-1, 5) that pick the anchor (original)
    max_candidates: int = 6        # candidates on the anchor frame (the original's)
    det_conf: float = 0.3          # detections below this score are ignored (the original's)
    iou_track: float = 0.5         # sticky tracker: accept best IoU >= this ...
    size_ratio_max: float = 2.5    # ... and area ratio max(a/b, b/a) <= this
    max_misses: int = 3            # stop after more than this many consecutive misses
    track_sole_iou: float = 0.2    # ours: the only detection overlapping the last box needs this
    vlm_down_videos: int = 5       # stop the shard after this many videos in a row of VLM failures
    max_attempts: int = 3          # candidates tried in picker order
    # deterministic checks (the original's thresholds; definitions in track.run_checks)
    max_box_jump_ratio: float = 0.05
    max_size_spike_ratio: float = 0.03
    max_pose_jump_ratio: float = 0.05
    max_low_conf_ratio: float = 0.4
    max_iou_break_ratio: float = 0.1
    min_coverage_ratio: float = 0.4
    min_peak_speed: float = 0.3    # body heights / s of the fastest root-relative joint (ours)
    min_box_area: float = 0.08     # median box area as a fraction of the frame
    low_conf: float = 0.3          # per-joint / per-frame confidence threshold
    max_fit_residual: float = fit3d.COLLAPSE_RESIDUAL  # FIT_COLLAPSE: fit3d.objective's residual
    # keypoints scoring <= this are masked (score 0), with the joints coco_to_h36m builds from them.
    # ViTPose's score is its heatmap's peak: <= 0 = no evidence, the location arbitrary; 0.05 =
    # where the fit already ignores one
    kp_floor: float = 0.05
    judge_frames: int = 6          # overlay frames sent to the judge (the original's)
    caption_frames: int = 8        # frames sent to the captioner
    vlm_max_side: int = 640        # images to the VLM: max side, JPEG q75 (the original's)


def config_hash(cfg):
    return hashlib.md5(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# 3-5. Perception interfaces (the stand-ins reading rendered videos' ground truth are in
# synth.py), keypoints


class Detector:
    """Person detector. Call: `detector(images, keys) -> list of (N_i, 5) float arrays [x1, y1, x2,
    y2, score]` in pixels of each image, people only. images: list of RGB uint8 (H, W, 3); keys:
    list of (video_id, source frame index), which models ignore (stand-ins and caches use them).
    Batched over frames; implementations subclass this or just provide __call__."""

    def __call__(self, images, keys):
        raise NotImplementedError


class PoseEstimator:
    """Top-down 2D pose. Call: `pose(images, boxes, keys) -> (keypoints (N, 17, 2) pixels, scores
    (N, 17))` for one box (N, 4) xyxy per image. `keypoint_format` says the 17-joint order of the
    output: "coco" (converted by coco_to_h36m) or "h36m"."""

    keypoint_format = "coco"

    def __call__(self, images, boxes, keys):
        raise NotImplementedError


def coco_to_h36m(kp, sc, floor=0.0):
    """COCO-17 (N, 17, 2) + scores (N, 17) -> Human3.6M-17, the original's synthesis of pelvis,
    spine, thorax, head. A keypoint scoring <= floor (no evidence) gets score 0, so does every joint
    built from it, and score-0 joints sit on the mean of the frame's scored ones: no arbitrary
    location moves anything."""
    kp, sc = np.asarray(kp, np.float64), np.asarray(sc, np.float64)
    sc = np.where(np.isfinite(sc) & np.isfinite(kp).all(-1) & (sc > floor), sc, 0.0)
    out, s = np.zeros_like(kp), np.zeros_like(sc)
    for h, c in {9: 0, 11: 5, 14: 6, 12: 7, 15: 8, 13: 9, 16: 10, 4: 11, 1: 12, 5: 13, 2: 14, 6: 15,
                 3: 16}.items():
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
    built_from = {0: [11, 12], 7: [0, 1, 2, 5, 6, 11, 12], 8: [0, 1, 2, 5, 6], 9: [0, 5, 6],
                  10: [0, 1, 2, 3, 4]}
    for h, src in built_from.items():
        s[:, h] *= (sc[:, src] > 0).all(1)
    ok = s > 0
    mean = np.where(ok[..., None], out, 0.0).sum(1) / np.maximum(ok.sum(1), 1)[:, None]
    return np.where(ok[..., None] | ~ok.any(1)[:, None, None], out, mean[:, None]), s


# --------------------------------------------------------------------------------------------------
# Per video: decode -> segments -> target -> track -> 2D -> 3D -> checks -> judge/caption -> clips


def clean_detections(d, conf):
    d = np.asarray(d, np.float64).reshape(-1, 5)
    ok = np.isfinite(d).all(1) & (d[:, 4] >= conf) & (d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])
    return d[ok][np.argsort(-d[ok, 4], kind="stable")]


def encode_jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def process_segment(dec, s, e, job, cfg, detector, pose_estimator, lifter, vlm):
    """One cut-free segment [s, e) of a decoded video -> (segment record, clip arrays or None)."""
    vid, frames = job["video_id"], dec.frames[s:e]
    T, W, H = e - s, dec.width, dec.height
    keys = [(vid, int(i)) for i in dec.src_frame_index[s:e]]
    rec = {"start": s, "end": e}
    dets = [clean_detections(d, cfg.det_conf) for d in detector(frames, keys)]
    if len(dets) != T:
        raise ValueError(f"detector returned {len(dets)} results for {T} frames")
    if not any(len(d) for d in dets):
        return {**rec, "status": "NO_DETECTIONS"}, None
    anchor, count = track.anchor_frame(dets, cfg.pool_frames)
    if count == 0:  # the pool frames are empty: fall back to the frame with most people
        anchor = int(np.argmax([len(d) for d in dets]))
    cands = dets[anchor][:cfg.max_candidates]
    runs = [track.sticky_track(dets, anchor, c[:4], cfg.iou_track, cfg.size_ratio_max,
                               cfg.max_misses, cfg.track_sole_iou) for c in cands]
    heur = track.heuristic_scores(cands, [r[1] for r in runs], W, H, T)
    order = [int(i) for i in np.argsort(-heur, kind="stable")]
    rec.update(anchor=s + anchor, candidates=len(cands),
               heuristic=[round(float(h), 4) for h in heur], picker="heuristic")
    if vlm is not None and len(cands) > 1:
        prompt = PICK_PROMPT.format(n=len(cands), action=job.get("action_class") or "unknown",
                                    text=(job.get("description") or "")[:250])
        reply = vlm.chat([draw_numbered_boxes(frames[anchor], cands)], prompt, max_tokens=1024,
                         temperature=0.0)
        pick = parse_pick(reply["text"], len(cands)) if reply["text"] is not None else None
        rec["oracle"] = {"chosen": pick, "error": reply["error"],
                         "raw": (reply["text"] or "")[:500]}
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
    boxes = track.fill_gaps(raw)
    cf, ck = frames[a:b + 1], keys[a:b + 1]
    kp, sc = pose_estimator(cf, boxes, ck)
    kp, sc = np.asarray(kp, np.float64), np.asarray(sc, np.float64)
    if kp.shape != (len(cf), 17, 2) or sc.shape != (len(cf), 17):
        raise ValueError(f"pose estimator returned {kp.shape} / {sc.shape} for {len(cf)} boxes")
    fmt = getattr(pose_estimator, "keypoint_format", "coco")
    core_ok = track.core_coverage(sc, fmt, cfg.low_conf)
    if fmt == "coco":
        kp_h, sc_h = coco_to_h36m(kp, sc, cfg.kp_floor)
    else:
        kp_h, sc_h = kp, np.where(sc > cfg.kp_floor, sc, 0)
    try:  # .lift also says the focal and, for a refine, whether the init or refined pose was kept
        if hasattr(lifter, "lift"):
            pose3d, info = lifter.lift(kp_h, sc_h, W, H)
        else:
            pose3d, info = lifter(kp_h, sc_h, W, H), {}
        pose3d = np.asarray(pose3d, np.float64)
        if pose3d.shape != (len(cf), 17, 3) or not np.isfinite(pose3d).all():
            raise ValueError(f"lifter output shape {pose3d.shape} or non-finite values")
    except Exception as ex:
        return {**rec, "status": f"LIFT_FAIL:{type(ex).__name__}", "detail": str(ex)[:200]}, None
    rec["lift"] = {k: info[k] for k in ("kept", "loss", "loss_init") if k in info}
    residual = fit3d.objective(pose3d, kp_h, sc_h, W, H, info.get("focal"))["residual"]
    # 0 when called from process_video (segments are cut at the same threshold), so HARD_CUTS passes
    # by construction there; recomputed on the clip's own frames so a caller passing its own (s, e)
    # is still checked
    n_cuts = len(video.detect_cuts(video.gray_histograms(cf), cfg.cut_threshold))
    checks, issues = track.run_checks(boxes, sc_h, pose3d, W, H, cfg, n_cuts, core_ok, raw_valid,
                                      residual)
    rec.update(status="TRACKED", checks=checks, issues=issues, prog_good=not issues)
    clip = {"i0": s + a, "i1": s + b + 1, "boxes": boxes, "kp2d": kp_h, "scores": sc_h,
            "pose3d": pose3d}
    if vlm is not None:  # caption first: lacking an instruction, the judge checks the motion by it
        rec["caption"] = caption_clip(vlm, cf, boxes, job.get("action_class", ""), cfg)
        text = job.get("description") or rec["caption"]["text"] or ""
        rec["judge"] = judge_clip(vlm, cf, kp_h, sc_h, job.get("action_class", ""), text, cfg)
    judge = rec.get("judge") or {}
    rec["vlm_good"] = bool(judge.get("tracking_consistent") and judge.get("motion_matches"))
    rec["strict"] = rec["prog_good"] and rec["vlm_good"]
    return rec, clip


def _keep(rec, keep):
    return {"all": True, "checks": rec["prog_good"], "vlm_good": rec["vlm_good"],
            "strict": rec["strict"]}[keep]


def _judge_codes(judge):
    """Why a verdict is not vlm_good ([] when it is): unparsed / transport error, else the
    failed questions."""
    if judge is None:
        return ["NO_JUDGE"]  # no VLM was given
    if not judge.get("judged"):
        return ["JUDGE_UNPARSED" if judge.get("error") is None else "JUDGE_ERROR"]
    return ([] if judge["tracking_consistent"] else ["JUDGE_TRACKING"]) + \
        ([] if judge["motion_matches"] else ["JUDGE_MOTION"])


def _rejection(rec, keep):
    """Why `keep` did not write a tracked segment: the codes the mode looks at (checks,
    judge or both)."""
    codes = {"all": [], "checks": rec["issues"], "vlm_good": _judge_codes(rec.get("judge")),
             "strict": rec["issues"] + _judge_codes(rec.get("judge"))}[keep]
    return ";".join(codes)


def process_video(job, cfg, detector, pose_estimator, lifter, vlm=None, clips_root=None,
                  keep="checks"):
    """job: {"video": path, "video_id": str, "action_class": str, "description": str (optional)} ->
    the video's status record (JSON-able); kept clips are written under clips_root with
    data.write_clip."""
    t0 = time.time()
    vid = job["video_id"]
    # clips: ids of the clip files written (len == written); rejected: the tracked segments' clips
    # that were not written, {"clip_id", "reason"}, the reason being the failing codes that `keep`
    # looks at (or NO_OUTPUT)
    record = {"video_id": vid, "video": str(job["video"]),
              "action_class": job.get("action_class", ""),
              "version": PIPELINE_VERSION, "config": config_hash(cfg), "lifter": repr(lifter),
              "keep": keep, "segments": [], "clips": [], "rejected": []}
    try:
        dec = video.decode_video(job["video"], cfg.fps, cfg.max_short_side, cfg.max_seconds)
    except video.VideoError as e:
        return {**record, "status": "SKIPPED", "reason": e.reason, "detail": e.detail[:300],
                "seconds": round(time.time() - t0, 3)}
    record["decode"] = {"samples": len(dec.frames), "src_fps": round(dec.src_fps, 4),
                        "width": dec.width,
                        "height": dec.height, "rotation": dec.rotation, "warnings": dec.warnings}
    cuts = video.detect_cuts(video.gray_histograms(dec.frames), cfg.cut_threshold)
    kept, dropped = video.split_segments(len(dec.frames), cuts, cfg.min_frames)
    record["cuts"] = cuts
    record["segments"] = [{"start": s, "end": e, "status": r} for s, e, r in dropped]
    for s, e in kept:
        seg, clip = process_segment(dec, s, e, job, cfg, detector, pose_estimator, lifter, vlm)
        record["segments"].append(seg)
        if clip is None:
            continue
        clip_id = f"{shards.safe_id(vid)}-{clip['i0']:05d}"
        seg["clip_id"] = clip_id
        seg["written"] = bool(clips_root is not None and _keep(seg, keep))
        if seg["written"]:
            i0, i1 = clip["i0"], clip["i1"]
            caption = (seg.get("caption") or {}).get("text")
            desc = (caption or job.get("description")
                    or f"Perform {job.get('action_class') or 'the motion'}.")
            source = "vlm" if caption else ("manifest" if job.get("description") else "template")
            extra = {"pipeline_version": PIPELINE_VERSION, "pose_fps": repr(cfg.fps),
                     "source": Path(job["video"]).name,
                     "prog_good": str(seg["prog_good"]), "vlm_good": str(seg["vlm_good"]),
                     "strict": str(seg["strict"]), "issues": json.dumps(seg["issues"]),
                     "description_source": source,
                     "kp2d_h36m": json.dumps(np.round(clip["kp2d"], 1).tolist()),
                     "kp2d_score": json.dumps(np.round(clip["scores"], 3).tolist())}
            pose3d = clip["pose3d"].astype(np.float32)
            c = data.Clip(clip_id=clip_id, frames_jpeg=[encode_jpeg(f) for f in dec.frames[i0:i1]],
                          boxes=clip["boxes"].astype(np.float32), pose3d=pose3d,
                          angles=np.asarray(kinematics.pose3d_to_angles(pose3d), np.float32),
                          src_frame_index=dec.src_frame_index[i0:i1], src_time=dec.src_time[i0:i1],
                          src_fps=float(dec.src_fps), width=dec.width, height=dec.height,
                          action_class=job.get("action_class", ""), description=desc, video_id=vid,
                          extra=extra,
                          # by video, not by clip id: a video's several clips (one per segment) must
                          # not straddle train and val (the original had one clip per video)
                          split=data.split_of(vid))
            data.write_clip(clips_root, c)
            record["clips"].append(clip_id)
        else:
            why = "NO_OUTPUT" if clips_root is None else _rejection(seg, keep)
            record["rejected"].append({"clip_id": clip_id, "reason": why})
    n_written = sum(1 for g in record["segments"] if g.get("written"))
    if n_written:
        status, reason = "OK", ""
    else:
        status, reason = "NO_CLIPS", ";".join(_segment_reasons(record)) or "NO_SEGMENTS"
    return {**record, "status": status, "reason": reason, "written": n_written,
            "vlm_errors": len(vlm_transport_errors(record)), "seconds": round(time.time() - t0, 3)}


def vlm_transport_errors(record):
    """The errors of a record's VLM calls that failed in transport (every retry timed out / was
    refused / got HTTP errors): not a verdict on the video, so --resume does the video again. An
    empty caption is a reply, not one."""
    errs = [(g.get(k) or {}).get("error") for g in record.get("segments", [])
            for k in ("oracle", "judge", "caption")]
    return [e for e in errs if e not in (None, "EMPTY_CAPTION")]


def _segment_reasons(record):
    """Attrition codes of a record's segments: their failure status, else the failing checks /
    judge outcome."""
    out = []
    for g in record.get("segments", []):
        st = g.get("status", "")
        if st != "TRACKED":
            out.append(st.split(":")[0])
            continue
        out += g.get("issues", [])
        if g.get("judge") is not None:
            out += _judge_codes(g["judge"])
        if g.get("written"):
            out.append("WRITTEN")
    return out


# --------------------------------------------------------------------------------------------------
# 9. Many videos: the shard's run (its jobs and status file: shards.py), attrition


def summarize(records):
    """Attrition table: videos by status/reason, then segment/clip outcomes by code (text)."""
    from collections import Counter
    with_reason = ("SKIPPED", "ERROR")
    videos = Counter(r["status"] + (f" {r['reason']}" if r["status"] in with_reason else "")
                     for r in records)
    segs = Counter(code for r in records for code in _segment_reasons(r))
    lines = [f"videos: {len(records)}"] + [f"  {n:7d}  {k}" for k, n in videos.most_common()]
    lines += ["segments / clips:"] + [f"  {n:7d}  {k}" for k, n in segs.most_common()]
    return "\n".join(lines)


def run(jobs, out, cfg, detector, pose_estimator, lifter, vlm=None, shard=(0, 1), resume=False,
        keep="checks", progress=True, retry_failed=False):
    """Process this shard's jobs into out/ (clips via data.write_clip, status/shard-K-of-N.jsonl);
    returns the shard's records (old ones too when resuming)."""
    from tqdm import tqdm
    out = Path(out)
    k, n = shard
    mine = [j for j in jobs if shards.shard_of(j["video_id"], n) == k]
    status = out / "status" / f"shard-{k:05d}-of-{n:05d}.jsonl"
    done = {}
    if resume:  # every status file, so a changed N still skips finished videos; this shard's wins
        mine_ids = {j["video_id"] for j in mine}
        for f in sorted(set((out / "status").glob("shard-*.jsonl")) - {status}) + [status]:
            recs = shards.read_records(f)
            done.update({r["video_id"]: r for r in recs if r["video_id"] in mine_ids})
    shards.remove_stale_tmp(out, k, n)
    vlm_down = 0  # consecutive videos whose VLM calls failed in transport
    with shards.open_status(status, resume) as fh:
        for job in tqdm(mine, desc=f"shard {k}/{n}", disable=not progress, unit="video"):
            old = done.get(job["video_id"])
            # finished, unless its VLM calls failed in transport (a server outage is not a verdict)
            # or, with retry_failed, it ended in an exception; a redone video's newer record
            # supersedes the old line
            failed = retry_failed and old is not None and old["status"] == "ERROR"
            redo = old is None or old.get("vlm_errors") or failed
            if not redo:
                continue
            try:
                rec = process_video(job, cfg, detector, pose_estimator, lifter, vlm, out, keep)
            except Exception as e:  # a bug or perception failure in one video must not stop all
                rec = {"video_id": job["video_id"], "video": str(job["video"]), "status": "ERROR",
                       "reason": f"EXC:{type(e).__name__}", "detail": str(e)[:300], "segments": [],
                       "clips": [], "rejected": []}
            done[job["video_id"]] = rec
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a record on disk: the video is finished (its clips came first)
            vlm_down = vlm_down + 1 if rec.get("vlm_errors") else 0
            if vlm is not None and cfg.vlm_down_videos and vlm_down >= cfg.vlm_down_videos:
                raise RuntimeError(f"the VLM failed on {vlm_down} videos in a row (last: "
                                   f"{vlm_transport_errors(rec)[-1][:200]}); fix the server and "
                                   "rerun with --resume, which redoes those videos")
    if any(r.get("written") for r in done.values()):
        data.write_index(out)
    return list(done.values())


# --------------------------------------------------------------------------------------------------
# The CLI; --render-demo writes synth.render_demo_videos' videos with ground-truth sidecars (the
# stand-ins' input: synth.GroundTruthDetector / GroundTruthPose)


def resolve_devices(device="auto", vlm_device=""):
    """--device, --vlm-device -> (perception, local VLM) devices: auto = cuda if there is one, else
    cpu; the VLM goes where the perception goes unless given its own."""
    import torch
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(auto if d == "auto" else d for d in (device, vlm_device or device))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", default="", help="folder of videos (<class>/<id>.mp4 or flat)")
    ap.add_argument("--manifest", default="",
                    help="JSONL manifest instead of / in addition to --videos")
    ap.add_argument("--out", default="", help="output dataset folder (clips + status/)")
    ap.add_argument("--shard", default="0/1",
                    help="K/N: process the videos with md5(video_id) %% N == K")
    ap.add_argument("--resume", action="store_true",
                    help="skip videos that already have a status record (except "
                    "those whose VLM calls failed in transport: they are done again)")
    ap.add_argument("--retry-failed", action="store_true",
                    help="with --resume: also redo videos that ended in ERROR")
    ap.add_argument("--keep", default="", choices=["", "all", "checks", "vlm_good", "strict"],
                    help="which clips to write (default: strict with a VLM, checks without)")
    ap.add_argument("--detector", default="",
                    help="YOLOS checkpoint folder (e.g. hustvl/yolos-base, downloaded once)")
    ap.add_argument("--pose", default="",
                    help="ViTPose checkpoint folder (e.g. usyd-community/vitpose-plus-base)")
    ap.add_argument("--device", default="auto",
                    help="device of the perception models and the local VLM (auto: cuda if any)")
    ap.add_argument("--perception-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the perception ViT trunks' dtype (auto: bfloat16 on cuda; heads float32)")
    ap.add_argument("--perception", default="groundtruth", choices=["groundtruth"],
                    help="groundtruth: <video>.gt.npz sidecars (rendered demo videos)")
    ap.add_argument("--vlm-url", default="",
                    help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    ap.add_argument("--vlm-model", default="", help="model name sent to the server")
    ap.add_argument("--vlm-api-key", default=os.environ.get("VLM_API_KEY", ""))
    ap.add_argument("--vlm-local", default="",
                    help="local Qwen3-VL checkpoint folder (our qwen3vl.py)")
    ap.add_argument("--vlm-device", default="", help="device of the local VLM (default: --device)")
    ap.add_argument("--vlm-timeout", type=float, default=120.0)
    ap.add_argument("--vlm-retries", type=int, default=3)
    ap.add_argument("--fit-steps", type=int, default=300,
                    help="gradient steps of the 2D->3D fit per clip")
    ap.add_argument("--fit-flip-steps", type=int, default=0,
                    help="steps of the fit's depth-flip search (0: off)")
    ap.add_argument("--lifter", default="",
                    help="a learned lifter (lifter.py train) to start the fit from; "
                    "default: the fit alone (no weights)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--render-demo", default="",
                    help="write rendered demo videos + sidecars to this folder and exit")
    ap.add_argument("--num-videos", type=int, default=4)
    args = ap.parse_args(argv)
    if args.render_demo:
        for p in synth.render_demo_videos(args.render_demo, args.num_videos):
            print(p)
        return 0
    if not args.out or not (args.videos or args.manifest):
        ap.error("--out and --videos (or --manifest) are required")
    cfg = PipelineConfig()
    try:
        jobs = shards.list_videos(args.videos or None, args.manifest or None)
        shard = shards.parse_shard(args.shard)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    sidecars = synth.SidecarCache(jobs)
    device, vlm_device = resolve_devices(args.device, args.vlm_device)
    vlm = None
    if args.vlm_local:
        vlm = VLMClient(local=LocalQwen3VL(args.vlm_local, vlm_device), retries=args.vlm_retries)
    elif args.vlm_url:
        vlm = VLMClient(args.vlm_url, args.vlm_model, args.vlm_api_key, args.vlm_timeout,
                        args.vlm_retries)
    keep = args.keep or ("strict" if vlm is not None else "checks")
    if args.lifter:  # learned bone directions, refined by the fit (see lifter.py)
        import dataclasses

        import lifter as lifter_py
        refine = dataclasses.replace(lifter_py.REFINE, steps=args.fit_steps)
        try:
            lifter = lifter_py.LearnedLifter.from_file(args.lifter, refine=refine)
        except (OSError, ValueError) as e:
            ap.error(f"--lifter: {e}")
    else:
        lifter = fit3d.FitLifter(fit3d.FitConfig(steps=args.fit_steps,
                                                 flip_steps=args.fit_flip_steps))
    detector, pose = synth.GroundTruthDetector(sidecars), synth.GroundTruthPose(sidecars)
    if not (args.detector or args.pose):  # say up front why real videos would end as NO_DETECTIONS
        bare = sum(not Path(str(j["video"]) + ".gt.npz").is_file() for j in jobs)
        if bare:
            print(f"note: {bare} of {len(jobs)} videos have no <video>.gt.npz sidecar; the "
                  "stand-in perception finds nobody in them (use --detector and --pose for real "
                  "videos)", file=sys.stderr)
    if args.detector or args.pose:  # the real models (yolos.py, vitpose.py); both or neither
        if not (args.detector and args.pose):
            ap.error("--detector and --pose go together")
        import torch

        import vitpose
        import yolos
        # bf16 trunks on a GPU (nearly all the compute; the heads and decoding stay
        # float32); float32 trunks make a GPU run's boxes match a CPU run's, bf16 ones
        # differ by their rounding
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            args.perception_dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if dtype == torch.float32:  # no TF32 either (cuDNN convolutions default to it)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        detector = yolos.YolosDetector(args.detector, device=device, dtype=dtype,
                                       threshold=cfg.det_conf, batch_size=16,
                                       workers=min(8, os.cpu_count() or 1))
        pose = vitpose.ViTPoseEstimator(args.pose, device=device, dtype=dtype, dataset_index=0)
    try:
        records = run(jobs, args.out, cfg, detector, pose, lifter, vlm, shard, args.resume, keep,
                      not args.no_progress, args.retry_failed)
    except RuntimeError as e:  # the VLM server is down: stop instead of rejecting every video
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    print(summarize(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
