"""
Run MIMIC on a video, a folder of frames or a clip: the next 16 steps (1.6 s at 10 Hz) of 22 joint
angles, written as JSON + npy with the joint names, and pictures: the input frames next to the
predicted skeleton (the angles' forward kinematics, drawn from a chosen camera) and, when the
source has ground truth (our clip format), the ground-truth skeleton in another colour.

The model sees what it saw in training (docs/conventions.md): the 4 frames at 10 Hz before "now"
(--start), each with the target person's box drawn in green (--box; a clip's own boxes; else the
whole frame), resized to 224x224, the prompt "Task: {task}. Instruction: {instruction}", and the
current pose as state (a clip's ground truth; --state FILE.npy; else a standing pose). --rollout S
re-queries every S steps along the whole source as a robot would (state: the ground truth when
known, else the previous prediction) and reports per-call latency. --server URL sends the model
calls to a policy server (serve.py) instead of loading --ckpt: a clip's frames travel as their
stored JPEG (the same numbers as a local run), other frames as JPEG q95.

    python sample.py                   # runs/tiny's latest checkpoint, a validation clip of data/demo
    python sample.py --ckpt CKPT --video run.mp4 --instruction "Jog in place." --task jogging --start 2
    python sample.py --ckpt CKPT --frames DIR --fps 30 --instruction "..." --box 40 10 300 240
    python sample.py --ckpt CKPT --clip data/demo/clips/ab/ID.safetensors --rollout 8 --view 45 15
    python sample.py --server http://127.0.0.1:8000 --rollout 8     # the model behind serve.py
Videos need PyAV (pip install av). Writes OUT/prediction.{json,npy}, OUT/sample.png (strip),
OUT/sample.gif, and with --rollout OUT/rollout.{json,npy,gif} (default OUT: out/sample).
"""

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import eval as ev
import kinematics
import model_io
from inference import VisionCache
from model import VLAModel, use_tf32
from model_io import prompt_text
from policy_client import PolicyClient

FPS = 10.0  # the model's control rate
CONTEXT, HORIZON = ev.CONTEXT, ev.HORIZON
PRED_COLOR, GT_COLOR = (214, 39, 40), (30, 160, 60)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# A standing person facing the camera, arms down, in the camera frame (x right, y DOWN, z away;
# metres, Human3.6M order): the default state when the source has no ground truth and no --state.
# The spine leans 3 deg towards the camera: an exactly vertical spine is IK's singular -I case
# (angles (-180, 0, -180)), next to which any small change of the angles turns the FK body over.
STANDING_POSE3D = np.array([
    [0.0, 0.0, 0.0], [-0.11, 0.0, 0.0], [-0.11, 0.43, 0.02], [-0.11, 0.85, 0.0], [0.11, 0.0, 0.0],
    [0.11, 0.43, 0.02], [0.11, 0.85, 0.0], [0.0, -0.22, -0.012], [0.0, -0.46, -0.024], [0.0, -0.58, -0.04],
    [0.0, -0.69, 0.0], [0.16, -0.46, 0.0], [0.18, -0.18, 0.02], [0.19, 0.07, -0.03], [-0.16, -0.46, 0.0],
    [-0.18, -0.18, 0.02], [-0.19, 0.07, -0.03]])

# --------------------------------------------------------------------------------------------------
# Sources: frames at 10 Hz (+ boxes, ground-truth angles and prompt when the source has them)


class Source:
    """frames: list of PIL at 10 Hz; boxes (T, 4), angles (T, 22) ground truth, pose3d (T, 17, 3),
    task and instruction (the prompt's two parts), jpegs (the frames' JPEG bytes): or None when
    the source does not have them."""

    def __init__(self, name, frames, boxes=None, angles=None, task=None, instruction=None, pose3d=None, jpegs=None):
        self.name, self.frames, self.boxes, self.angles = name, frames, boxes, angles
        self.task, self.instruction, self.pose3d, self.jpegs = task, instruction, pose3d, jpegs


def resample_indices(times, fps=FPS):
    """Source frame timestamps (s, increasing) -> for each 10 Hz tick k / fps, the index of the last
    frame shown at that time (a camera cannot show a frame before it is captured)."""
    times = np.asarray(times, np.float64)
    ticks = np.arange(0.0, times[-1] + 1e-6, 1.0 / fps)
    return np.searchsorted(times, ticks + 1e-6, side="right") - 1


def load_video(path, fps=FPS):
    try:
        import av  # optional: only needed for video files
    except ImportError:
        raise SystemExit("reading a video needs PyAV, which is not installed: pip install av "
                         "(or pass --frames DIR with extracted frames, or --clip FILE)") from None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times = [], []
        for fr in container.decode(stream):
            if fr.pts is None:
                continue
            times.append(float(fr.pts * stream.time_base))
            frames.append(fr.to_image())
    if not frames:
        raise SystemExit(f"{path}: no decodable video frames")
    order = np.argsort(times, kind="stable")  # decode order may differ from presentation order
    frames, times = [frames[i] for i in order], np.asarray(times)[order] - min(times)
    return Source(Path(path).name, [frames[i] for i in resample_indices(times, fps)])


def load_frames_dir(path, fps=FPS):
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    idx = resample_indices(np.arange(len(files)) / fps)  # the folder's frames are at --fps
    return Source(Path(path).name, [Image.open(files[i]).convert("RGB") for i in idx])


def load_clip(path):
    cf = data.ClipFile(path)
    jpegs = cf.frame_bytes(range(cf.num_frames))
    return Source(cf.meta["clip_id"], [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs], cf.read("boxes"),
                  cf.read("angles").astype(np.float64), cf.meta["action_class"], cf.meta["description"],
                  cf.read("pose3d").astype(np.float64), jpegs)


def default_clip(root="data/demo"):
    """The first validation clip (in index order) of the demo dataset, built if missing."""
    root = Path(root)
    if not (root / data.INDEX_FILE).is_file() and str(root) == "data/demo":
        print(f"building the demo dataset in {root} (once)")
        import synth  # the demo builder, needed only here
        synth.build_demo(root)
    clips = [e for e in data.list_clips(root, "val") if e["num_frames"] >= CONTEXT + HORIZON]
    if not clips:
        raise SystemExit(f"no validation clip with >= {CONTEXT + HORIZON} frames in {root}")
    return root / clips[0]["path"]


# --------------------------------------------------------------------------------------------------
# Model calls


class Predictor:
    """One control step at a time: frames before t + state -> (16, 22) radians, timing each call.
    Frames seen in an earlier call reuse their vision-tower outputs (inference.VisionCache), as a
    robot's loop would."""

    def __init__(self, model, device, diffusion_steps=None, seed=0, cache=True):
        self.model, self.device, self.steps, self.seed = model.eval(), torch.device(device), diffusion_steps, seed
        self.cache = VisionCache() if cache else None
        self.latency_ms = []

    def __call__(self, src, t, task, instruction, state, box=None):
        cfg = self.model.config
        frames, boxes = window(src, t, box)
        g = torch.Generator().manual_seed(noise_seed(self.seed, t))  # same source + seed + t -> same prediction
        noise = torch.randn((cfg.action_horizon, cfg.action_dim), generator=g)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()  # what a robot waits for: preprocessing + model + decoding
        pred = self.model.predict(frames, boxes, task, instruction, state, steps=self.steps, noise=noise,
                                  cache=self.cache).astype(np.float64)
        sync()
        self.latency_ms.append(1000 * (time.perf_counter() - t0))
        return pred


class RemotePredictor:
    """Predictor's calls sent to a policy server (serve.py). The server draws the noise from the
    same seed, so a clip (sent as its stored JPEG bytes) gives a local Predictor's numbers.
    latency_ms: the round trip."""

    def __init__(self, url, diffusion_steps=None, seed=0):
        self.client, self.steps, self.seed = PolicyClient(url), diffusion_steps, seed
        self.latency_ms, self.server_ms = [], []

    def __call__(self, src, t, task, instruction, state, box=None):
        frames, boxes = window(src, t, box)
        if src.jpegs is not None:
            frames = src.jpegs[t - CONTEXT:t]
        out = self.client.act(frames, boxes, task, instruction, state, seed=noise_seed(self.seed, t),
                              steps=self.steps)
        self.latency_ms.append(out["round_trip_ms"])
        self.server_ms.append(out["timing"]["server_ms"])
        return out["angles"].astype(np.float64)


def window(src, t, box=None):
    """The model's view at time t: the CONTEXT frames before it (the no-leak rule) and their boxes
    (--box, else the source's, else the whole frame)."""
    if t < CONTEXT or t > len(src.frames):
        raise SystemExit(f"--start must leave {CONTEXT} frames before it: frame {t} of {len(src.frames)} at 10 Hz")
    frames = src.frames[t - CONTEXT:t]
    boxes = [box] * CONTEXT if box is not None else (
        src.boxes[t - CONTEXT:t] if src.boxes is not None else [full_box(im) for im in frames])
    return frames, np.asarray(boxes, np.float64)


def noise_seed(seed, t):
    return seed * 1_000_003 + t


def full_box(im):
    return np.array([0, 0, im.width - 1, im.height - 1], np.float32)


def latency_stats(ms):
    ms = np.asarray(ms)
    return {"calls": len(ms), "first_ms": float(ms[0]), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max()),
            "median_after_first_ms": float(np.median(ms[1:])) if len(ms) > 1 else None}


def rollout(predict, src, task, instruction, S, start, state0, box=None):
    """Re-query every S steps from `start` to the end of the source. State: the ground truth when
    the source has it, else the pose reached (the previous call's prediction for that step). ->
    (times, angles (n, 22), calls)."""
    T = len(src.frames)
    traj, times, calls, state = [], [], [], state0
    for t in range(start, T, S):
        if src.angles is not None:
            state = src.angles[t]
        pred = predict(src, t, task, instruction, state, box)
        n = min(S, T - t)
        traj.append(pred[:n])
        times.extend(range(t, t + n))
        calls.append(t)
        state = pred[n] if n < len(pred) else pred[-1]
    return np.asarray(times), np.concatenate(traj), calls


# --------------------------------------------------------------------------------------------------
# Pictures


def view_rotation(azimuth_deg, elevation_deg):
    """Rotation of a virtual camera: turn about the vertical (image y) axis by azimuth, then tilt by
    elevation. (0, 0) is the source camera itself."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    return rx @ ry


def project(poses, view):
    """(..., 17, 3) camera-frame poses -> (..., 17, 2) orthographic image coordinates (x right,
    y down) and depth."""
    p = np.asarray(poses, np.float64) @ view_rotation(*view).T
    return p[..., :2], p[..., 2]


class SkeletonPanel:
    """Draws poses into size x size panels with one scale and centre shared by every pose given at
    construction, so motion over time is visible (not re-normalised away)."""

    def __init__(self, poses, view, size=200, margin=14):
        xy, _ = project(np.concatenate([p.reshape(-1, 17, 3) for p in poses]), view)
        lo, hi = xy.reshape(-1, 2).min(0), xy.reshape(-1, 2).max(0)
        self.centre, self.scale = (lo + hi) / 2, (size - 2 * margin) / max(float((hi - lo).max()), 1e-6)
        self.view, self.size = view, size

    def draw(self, draw, origin, pose, color, width=3):
        xy, depth = project(pose, self.view)
        pts = (xy - self.centre) * self.scale + self.size / 2 + np.asarray(origin)
        # far bones first, so near ones are drawn over them
        bones = sorted(((j, p) for j, p in enumerate(kinematics.H36M_PARENTS) if p >= 0),
                       key=lambda jp: -(depth[jp[0]] + depth[jp[1]]))
        for j, p in bones:
            draw.line([tuple(pts[p]), tuple(pts[j])], fill=color, width=width)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


def fk(angles, template=None):
    """Forward kinematics of (..., 22) radians -> (..., 17, 3) (kinematics.angles_to_pose3d).
    The angles do not say where hips and shoulders sit nor how knees and elbows bend: a template
    pose supplies those (the clip's pose at "now", known when the prediction is made, so both
    skeletons get the same body), else a canonical body facing the camera."""
    t = None if template is None else np.asarray(template, np.float64) - np.asarray(template, np.float64)[..., :1, :]
    return np.asarray(kinematics.angles_to_pose3d(np.asarray(angles, np.float64), template=t))


def thumbnail(im, box, size):
    im = model_io.draw_box(im.convert("RGB").copy(), box) if box is not None else im.convert("RGB")
    w, h = im.size
    k = size / max(w, h)
    canvas = Image.new("RGB", (size, size), (250, 250, 250))
    canvas.paste(im.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR),
                 ((size - round(w * k)) // 2, (size - round(h * k)) // 2))
    return canvas


def _label(draw, xy, text):
    draw.text(xy, text, fill=(20, 20, 20), font=ev.load_font(12))


def strip_png(path, inputs, boxes, pred, gt, view, panels=(0, 3, 6, 9, 12, 15), size=200, title="", template=None):
    """One row: the 4 input frames (box drawn), then the skeleton at the chosen prediction steps
    (pred red, ground truth green)."""
    poses = [fk(pred, template)] + ([fk(gt, template)] if gt is not None else [])
    panel = SkeletonPanel(poses, view, size)
    img = Image.new("RGB", (size * (len(inputs) + len(panels)), size + 36), "white")
    draw = ImageDraw.Draw(img)
    _label(draw, (6, 4), title)
    for i, (im, b) in enumerate(zip(inputs, boxes)):
        img.paste(thumbnail(im, b, size), (i * size, 36))
        _label(draw, (i * size + 4, 22), f"input t{i - len(inputs):+d} ({(i - len(inputs)) / FPS:+.1f} s)")
    for i, k in enumerate(panels):
        x = (len(inputs) + i) * size
        draw.rectangle([x, 36, x + size - 1, 36 + size - 1], outline=(200, 200, 200))
        if gt is not None:
            panel.draw(draw, (x, 36), poses[1][k], GT_COLOR)
        panel.draw(draw, (x, 36), poses[0][k], PRED_COLOR)
        _label(draw, (x + 4, 22), f"step {k} (+{k / FPS:.1f} s)")
    legend = ("red: predicted" + ("   green: ground truth" if gt is not None else "")
              + f"   view {view[0]:g}/{view[1]:g} deg")
    _label(draw, (img.width - 8 - int(draw.textlength(legend, font=ev.load_font(12))), 4), legend)
    return ev.save_png(img, path)


def animation_gif(path, frames, boxes, pred, gt, view, size=240, labels=None, template=None):
    """GIF at 10 Hz: frame k shows the source frame of that time (box drawn) next to the skeleton
    (pred / GT). template: None, one pose, or one per frame (see fk)."""
    poses = [fk(pred, template)] + ([fk(gt, template)] if gt is not None else [])
    panel = SkeletonPanel(poses, view, size)
    out = []
    for k in range(len(pred)):
        img = Image.new("RGB", (2 * size, size + 20), "white")
        img.paste(thumbnail(frames[k], boxes[k], size), (0, 20))
        draw = ImageDraw.Draw(img)
        if gt is not None:
            panel.draw(draw, (size, 20), poses[1][k], GT_COLOR)
        panel.draw(draw, (size, 20), poses[0][k], PRED_COLOR)
        _label(draw, (4, 3), labels[k] if labels else f"+{k / FPS:.1f} s")
        out.append(img.convert("P", palette=Image.ADAPTIVE))
    buf = io.BytesIO()
    out[0].save(buf, format="GIF", save_all=True, append_images=out[1:], duration=int(1000 / FPS), loop=0)
    data.atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/tiny", help="checkpoint folder, or a run folder (its latest.json)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--video", default=None, help="a video file (needs PyAV: pip install av)")
    src.add_argument("--frames", default=None, help="a folder of image files in name order")
    src.add_argument("--clip", default=None, help="a clip file of our format (has boxes, ground truth, prompt)")
    ap.add_argument("--data", default="data/demo", help="dataset whose first val clip is used when no source given")
    ap.add_argument("--fps", type=float, default=FPS, help="frame rate of a --frames folder")
    ap.add_argument("--instruction", default=None, help="instruction text (a clip's own description by default)")
    ap.add_argument("--task", default=None, help="action class for the prompt 'Task: ... Instruction: ...'")
    ap.add_argument("--start", type=float, default=None,
                    help="'now' in seconds: the 4 frames before it are the input (default: 0.4 s, the first possible)")
    ap.add_argument("--box", type=float, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"),
                    help="target person's box in source pixels (default: the clip's boxes, else the whole frame)")
    ap.add_argument("--state", default=None,
                    help="current pose: .npy of 22 radians (default: the ground truth, else a standing pose)")
    ap.add_argument("--rollout", type=int, default=None, metavar="S", help="re-query every S steps over the source")
    ap.add_argument("--view", type=float, nargs=2, default=(0.0, 0.0), metavar=("AZIMUTH", "ELEVATION"),
                    help="degrees: the camera the skeleton is drawn from (0 0 = the source camera)")
    ap.add_argument("--diffusion-steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampler noise")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--server", default=None, metavar="URL",
                    help="a policy server (python serve.py) to run the model calls on instead of --ckpt")
    ap.add_argument("--out", default="out/sample", help="output folder")
    return ap.parse_args(argv)


def load_source(args):
    if args.video:
        return load_video(args.video)
    if args.frames:
        return load_frames_dir(args.frames, args.fps)
    return load_clip(args.clip or default_clip(args.data))


def prompt_for(args, src):
    """(task, instruction) of the prompt: the flags, else the clip's own; a video or frame folder
    needs --instruction (the task defaults to "unknown")."""
    if args.instruction is None and args.task is None:
        if src.instruction is None:
            raise SystemExit("--instruction is required for a video or a frame folder")
        return src.task, src.instruction
    return (args.task if args.task is not None else "unknown"), (args.instruction or "")


def run(model, args):
    """Everything after loading the model (tests call it with any model of VLAModel's signature)."""
    src = load_source(args)
    task, instruction = prompt_for(args, src)
    text = prompt_text(task, instruction)
    T = len(src.frames)
    t = CONTEXT if args.start is None else int(round(args.start * FPS))
    box = None if args.box is None else np.asarray(args.box, np.float32)
    if args.state is not None:
        state = np.load(args.state).astype(np.float64)
        if state.shape != (22,):
            raise SystemExit(f"--state must hold 22 angles, got shape {state.shape}")
    elif src.angles is not None and t < T:
        state = src.angles[t]
    else:
        state = np.asarray(kinematics.pose3d_to_angles(STANDING_POSE3D), np.float64)
    predict = (RemotePredictor(args.server, args.diffusion_steps, args.seed) if args.server else
               Predictor(model, args.device, args.diffusion_steps, args.seed))
    pred = predict(src, t, task, instruction, state, box)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gt = src.angles[t:t + HORIZON] if src.angles is not None and t + HORIZON <= T else None
    record = {"source": src.name, "prompt": text, "start_s": t / FPS, "start_frame": t, "fps": FPS,
              "joint_names": list(kinematics.JOINT_NAMES), "state_rad": state.tolist(), "angles_rad": pred.tolist(),
              "angles_deg": np.degrees(pred).tolist(), "latency_ms": predict.latency_ms[-1]}
    if gt is not None:
        err = ev.errors_deg(pred, gt)[1:]
        record["ground_truth_rad"] = gt.tolist()
        record["rmse_deg_t1_15"] = float(np.sqrt((err ** 2).mean()))
    ev.write_json(record, out / "prediction.json")
    np.save(out / "prediction.npy", pred.astype(np.float32))
    now_pose = src.pose3d[t] if src.pose3d is not None and t < T else None  # known at prediction time
    in_boxes = [box] * CONTEXT if box is not None else (list(src.boxes[t - CONTEXT:t]) if src.boxes is not None
                                                       else [None] * CONTEXT)
    written = [out / "prediction.json", out / "prediction.npy",
               strip_png(out / "sample.png", src.frames[t - CONTEXT:t], in_boxes, pred, gt, tuple(args.view),
                         title=f"{src.name} @ {t / FPS:.1f} s: {text}"[:110], template=now_pose)]
    # the GIF shows the source frame of each predicted step when it exists, else the last input
    show = [t + k if t + k < T else t - 1 for k in range(HORIZON)]
    gif_boxes = [box if box is not None else (src.boxes[i] if src.boxes is not None else None) for i in show]
    written.append(animation_gif(out / "sample.gif", [src.frames[i] for i in show], gif_boxes, pred, gt,
                                 tuple(args.view), template=now_pose))
    msg = f"predicted {HORIZON} steps from {t / FPS:.1f} s in {predict.latency_ms[-1]:.0f} ms"
    if gt is not None:
        msg += f"; RMSE vs ground truth (t = 1..15) {record['rmse_deg_t1_15']:.1f} deg"
    print(msg)
    if args.rollout:
        times, traj, calls = rollout(predict, src, task, instruction, args.rollout, t, state, box)
        stats = latency_stats(predict.latency_ms[1:])
        roll = {"S": args.rollout, "frames": times.tolist(), "calls_at_frame": calls, "latency": stats,
                "latency_ms": predict.latency_ms[1:], "joint_names": list(kinematics.JOINT_NAMES),
                "angles_rad": traj.tolist(), "state": "ground truth" if src.angles is not None else "own prediction"}
        if args.server:
            roll["server"], roll["server_ms"] = args.server, predict.server_ms[1:]
        gt_roll = src.angles[times] if src.angles is not None else None
        if gt_roll is not None:
            keep = (times - t) % args.rollout != 0  # restart frames are the given state
            err = ev.errors_deg(traj, gt_roll)[keep]
            roll["rmse_deg_no_restart"] = float(np.sqrt((err ** 2).mean())) if err.size else None
        ev.write_json(roll, out / "rollout.json")
        np.save(out / "rollout.npy", traj.astype(np.float32))
        r_boxes = [box if box is not None else (src.boxes[i] if src.boxes is not None else None) for i in times]
        # each step drawn on the body of its query time (the last pose known at that prediction)
        query_poses = None if src.pose3d is None else src.pose3d[[max(c for c in calls if c <= i) for i in times]]
        labels = [f"{i / FPS:.1f} s" + (" (query)" if i in calls else "") for i in times]
        written += [out / "rollout.json", out / "rollout.npy",
                    animation_gif(out / "rollout.gif", [src.frames[i] for i in times], r_boxes, traj, gt_roll,
                                  tuple(args.view), labels=labels, template=query_poses)]
        print(f"rollout: {len(calls)} calls every {args.rollout} steps ({args.rollout / FPS:.1f} s); latency median "
              f"{stats['median_ms']:.0f} ms, p90 {stats['p90_ms']:.0f} ms, max {stats['max_ms']:.0f} ms")
    print("wrote " + ", ".join(str(p) for p in written))
    return record


def main(argv=None):
    args = get_args(argv)
    if torch.device(args.device).type == "cuda":
        use_tf32(True)  # as training: bf16 autocast, TF32 for what stays fp32
    if args.video:  # fail before loading a model when the video reader is missing
        try:
            import av  # noqa: F401
        except ImportError:
            raise SystemExit("reading a video needs PyAV, which is not installed: pip install av "
                             "(or pass --frames DIR with extracted frames, or --clip FILE)") from None
    if args.server:
        print(f"policy server {args.server}")
        return run(None, args)
    ckpt = ev.resolve_checkpoint(args.ckpt)
    print(f"checkpoint {ckpt}")
    return run(VLAModel.from_pretrained(ckpt, device=args.device), args)


if __name__ == "__main__":
    main()
