"""
How much of a motion the sticky tracker keeps: the original rule (IoU >= 0.5 with the last box)
against ours (also IoU >= 0.2 for the only detection overlapping the last box,
pipeline.PipelineConfig.track_sole_iou), on perfect body boxes of the shipped mocap seen by
synth.py's random tracking-shot cameras at 10 Hz, the anchor in the middle of each window. Prints,
per motion, the mean fraction of the window inside the tracked run.

  python bench/track.py                   # 6 cameras x 40 samples per motion
  python bench/track.py --cameras 20 --frames 60
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mocap  # noqa: E402
import pipeline  # noqa: E402
import synth  # noqa: E402
import track  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = pipeline.PipelineConfig()
    rng = np.random.default_rng(args.seed)
    T = args.frames
    rules = {"upstream": 0.0, "ours": cfg.track_sole_iou}
    kept = {name: [] for name in rules}
    print(f"{'motion':14s} " + " ".join(f"{n:>9s}" for n in rules))
    for key, file, _, _ in mocap.MOTIONS:
        m = mocap.load_motion(file)
        cov = {name: [] for name in rules}
        for _ in range(args.cameras):
            t = rng.uniform(0, max(m.times[-1] - T / 10, 0)) + np.arange(T) / 10
            pts, _, _ = mocap.sample_motion(m, t)
            pts[..., 1] -= pts[..., 1].min() - 0.03
            cam = synth.random_camera(rng, pts)
            boxes = synth.body_box(cam, synth.world_to_camera(cam, pts))
            dets = [np.concatenate([b, [0.9]])[None] for b in boxes]  # (1, 5): one person, score 0.9
            for name, sole in rules.items():
                _, (s, e) = track.sticky_track(dets, T // 2, boxes[T // 2], cfg.iou_track,
                                               cfg.size_ratio_max, cfg.max_misses, sole)
                cov[name].append((e - s + 1) / T)
        for name in rules:
            kept[name].append(np.mean(cov[name]))
        print(f"{key:14s} " + " ".join(f"{np.mean(cov[n]):9.2f}" for n in rules))
    print(f"{'mean':14s} " + " ".join(f"{np.mean(kept[n]):9.2f}" for n in rules))


if __name__ == "__main__":
    main()
