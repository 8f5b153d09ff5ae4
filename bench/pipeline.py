"""
Benchmark of the CPU stages of pipeline.py (decode and cuts from video.py, tracking and checks from
track.py), perception excluded: samples (10 Hz frames) per second of decode, cut detection, target
selection + sticky tracking, the 2D->3D fit, the checks and clip writing, and each stage's share.

Inputs: rendered demo videos with ground-truth sidecars (all stages; their boxes and 2D joints stand
in for the detector and the pose model), and, for decode and cuts only, the real videos (*.mp4) of
--videos DIR, by default the folder named by the environment variable MIMIC_TEST_VIDEOS if set.

  python bench/pipeline.py                    # 4 rendered videos, default fit
  python bench/pipeline.py --videos ~/clips --num-videos 8 --fit-steps 150 --threads 1
  python bench/pipeline.py --lifter runs/lifter.safetensors   # learned lifter + refine, not the fit
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import fit3d  # noqa: E402
import kinematics
import pipeline  # noqa: E402
import synth  # noqa: E402
import track  # noqa: E402
import video  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-videos", type=int, default=4, help="rendered demo videos")
    ap.add_argument("--videos", default=os.environ.get("MIMIC_TEST_VIDEOS", ""),
                    help="a folder of real videos (*.mp4) to time decode and cuts on (default: "
                    "$MIMIC_TEST_VIDEOS; none: only the rendered videos)")
    ap.add_argument("--fit-steps", type=int, default=fit3d.FitConfig.steps)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: leave torch's default)")
    ap.add_argument("--lifter", default="",
                    help="time lifter.py's learned lifter + refine (a file from "
                    "`python lifter.py train`) instead of the fit alone")
    args = ap.parse_args()
    if args.videos and not Path(args.videos).is_dir():
        ap.error(f"--videos {args.videos}: not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = pipeline.PipelineConfig()
    fcfg = fit3d.FitConfig(steps=args.fit_steps)
    lift = lambda kp, sc, W, H: fit3d.fit_clip(kp, sc, W, H, cfg=fcfg)  # noqa: E731
    if args.lifter:
        import dataclasses

        import lifter
        refine = dataclasses.replace(lifter.REFINE, steps=args.fit_steps)
        lift = lifter.LearnedLifter.from_file(args.lifter, refine=refine)
    times = dict.fromkeys(["decode", "cuts", "tracking", "fit", "checks", "write"], 0.0)
    samples = dict.fromkeys(times, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = synth.render_demo_videos(tmp / "vids", args.num_videos)
        dt = time.perf_counter() - t0
        print(f"rendered {len(paths)} demo videos in {dt:.1f} s (not counted)")
        real = sorted(Path(args.videos).glob("*.mp4")) if args.videos else []
        print(f"real videos: {len(real)} from {args.videos}" if args.videos else "no --videos")
        for p in real:  # decode + cuts only: no boxes for these
            t = time.perf_counter()
            dec = video.decode_video(p, cfg.fps, cfg.max_short_side)
            times["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            video.detect_cuts(video.gray_histograms(dec.frames), cfg.cut_threshold)
            times["cuts"] += time.perf_counter() - t
            samples["decode"] += len(dec.frames)
            samples["cuts"] += len(dec.frames)
        for n, p in enumerate(paths):
            vid = f"v{n}"
            side = {vid: synth.load_ground_truth(p)}
            det, pose = synth.GroundTruthDetector(side), synth.GroundTruthPose(side)
            t = time.perf_counter()
            dec = video.decode_video(p, cfg.fps, cfg.max_short_side)
            times["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            cuts = video.detect_cuts(video.gray_histograms(dec.frames), cfg.cut_threshold)
            times["cuts"] += time.perf_counter() - t
            samples["decode"] += len(dec.frames)
            samples["cuts"] += len(dec.frames)
            for s, e in video.split_segments(len(dec.frames), cuts, cfg.min_frames)[0]:
                keys = [(vid, int(i)) for i in dec.src_frame_index[s:e]]
                dets = det(dec.frames[s:e], keys)  # not timed
                dets = [pipeline.clean_detections(d, cfg.det_conf) for d in dets]
                t = time.perf_counter()
                anchor, _ = track.anchor_frame(dets, cfg.pool_frames)
                cands = dets[anchor][:cfg.max_candidates]
                runs = [track.sticky_track(dets, anchor, c[:4], cfg.iou_track, cfg.size_ratio_max,
                                           cfg.max_misses, cfg.track_sole_iou) for c in cands]
                h = track.heuristic_scores(cands, [r[1] for r in runs], dec.width, dec.height,
                                           e - s)
                boxes, (a, b) = runs[int(np.argmax(h))]
                boxes = track.fill_gaps(boxes[a:b + 1])
                times["tracking"] += time.perf_counter() - t
                samples["tracking"] += e - s
                kp, sc = pose(dec.frames[s + a:s + b + 1], boxes, keys[a:b + 1])  # not timed
                t = time.perf_counter()
                p3 = lift(kp, sc, dec.width, dec.height)
                times["fit"] += time.perf_counter() - t
                t = time.perf_counter()
                track.run_checks(boxes, sc, p3, dec.width, dec.height, cfg)
                times["checks"] += time.perf_counter() - t
                t = time.perf_counter()
                clip = data.Clip(f"{vid}-{s:05d}",
                                 [pipeline.encode_jpeg(f) for f in dec.frames[s + a:s + b + 1]],
                                 boxes.astype(np.float32), p3.astype(np.float32),
                                 np.asarray(kinematics.pose3d_to_angles(p3), np.float32),
                                 dec.src_frame_index[s + a:s + b + 1],
                                 dec.src_time[s + a:s + b + 1], dec.src_fps,
                                 dec.width, dec.height, "bench", "Move.")
                data.write_clip(tmp / "out", clip)
                times["write"] += time.perf_counter() - t
                for k in ("fit", "checks", "write"):
                    samples[k] += b - a + 1
    total = sum(times.values())
    how = f"lifter {args.lifter} + refine" if args.lifter else f"{len(fcfg.yaws)} facing hypotheses"
    print(f"torch threads {torch.get_num_threads()}, fit steps {args.fit_steps}, {how}")
    print(f"{'stage':10s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} {'share':>6s}")
    for k, v in times.items():
        rate = samples[k] / max(v, 1e-9)
        print(f"{k:10s} {samples[k]:8d} {v:8.2f} {rate:10.1f} {v / total:6.1%}")
    per_sample = sum(v / max(samples[k], 1) for k, v in times.items())
    print(f"all stages: {1 / per_sample:.1f} samples/s per process (a 10 s video = 100 samples: "
          f"{100 * per_sample:.1f} s)")


if __name__ == "__main__":
    main()
