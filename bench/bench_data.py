"""
Data-path numbers for data.py: bytes per clip-second of the clip format and training windows per
second of one DataLoader worker (JPEG decode + box + resize + sin/cos; flipped windows also run IK),
on the embedded demo renders.

  python bench/bench_data.py [--num-clips 12] [--size 224] [--quality 90]
"""

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import synth  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--num-clips", type=int, default=12, help="demo clips to build and measure")
    ap.add_argument("--size", type=int, default=224,
                    help="re-encode frames to size x size for the bytes figure")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded frames")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo_dir, small_dir = Path(tmp) / "demo", Path(tmp) / "small"
        synth.build_demo(demo_dir, num_clips=args.num_clips)
        entries = data.list_clips(demo_dir)
        # bytes per clip-second: the same clips with frames re-encoded at size x size, quality
        # q (10 Hz samples)
        total_bytes = total_sec = 0.0
        for e in entries:
            clip = data.read_clip(demo_dir / e["path"])
            frames = []
            for b in clip.frames_jpeg:
                buf = io.BytesIO()
                size = (args.size, args.size)
                im = Image.open(io.BytesIO(b)).convert("RGB").resize(size, Image.BILINEAR)
                im.save(buf, format="JPEG", quality=args.quality)
                frames.append(buf.getvalue())
            clip.frames_jpeg, clip.width, clip.height = frames, args.size, args.size
            total_bytes += data.write_clip(small_dir, clip).stat().st_size
            total_sec += len(frames) / 10.0
        print(f"{len(entries)} clips, {total_sec:.1f} s: {total_bytes / total_sec:.0f} bytes per clip-second "
              f"({args.size}x{args.size} JPEG q={args.quality}); "
              f"{total_bytes / total_sec * 3600 / 2**20:.1f} MiB per hour of clips")
        for name, root in [("demo frames (320x240 q85)", demo_dir),
                           (f"{args.size}x{args.size} q{args.quality}",
                                                                      small_dir)]:
            for flip in (False, True):
                ds = data.WindowDataset(root, split=None, flip=True)
                n = len(ds) // 2
                idx = [i + (n if flip else 0) for i in range(n)]
                ds[idx[0]]  # warm-up (imports, caches)
                t0 = time.perf_counter()
                reps = max(1, 200 // max(n, 1))
                for _ in range(reps):
                    for i in idx:
                        ds[i]
                dt = time.perf_counter() - t0
                print(f"one worker, {name}, {'flipped' if flip else 'plain'} windows: "
                      f"{reps * n / dt:.0f} samples/s")


if __name__ == "__main__":
    main()
