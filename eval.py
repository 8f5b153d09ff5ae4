"""Rolling evaluation of MIMIC: the model card's table (RMSE of the 22 angles vs the restart
interval S), leak-free.

For N validation windows and each S, every method restarts from the ground truth at window offsets
0, S, 2S, ...: the model gets only the 4 frames before each restart (box drawn, as in training) and
the ground-truth state; static repeats the state; linear extrapolates the last velocity. Errors
are wrapped to [-180, 180) degrees and scored on future steps t = 1..15 (docs/conventions.md). A
model call depends only on (window, offset): it is made once for all S, batched, with noise seeded
by what it predicts, so results never depend on batch size or order.

    python eval.py                                       # runs/tiny's latest checkpoint on data/demo
    python eval.py --ckpt runs/4b/ckpt-0029060 --data /data/clips --steps 1 2 3 5 8 16
    python eval.py --data /data/clips --baselines-only   # static / linear only: needs no model
Writes OUT/eval.json (every breakdown), OUT/rmse_vs_step.png and OUT/class_gaps.png
(default OUT: out/eval).
"""

import argparse
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
import kinematics
import model_io
from model import use_tf32
from model_io import collate_inputs, frame_image, prompt_text

HORIZON = 16  # predicted steps per call (1.6 s at 10 Hz)
CONTEXT = 4  # frames before "now" given to the model
METHODS = ("model", "static", "linear")

# --------------------------------------------------------------------------------------------------
# Predictions of the baselines, and the rolling schedule


def wrap_deg(x):
    """Wrap degrees to [-180, 180): an error across +-180 is the short way round."""
    return (np.asarray(x) + 180.0) % 360.0 - 180.0


def restart_offsets(steps, horizon=HORIZON):
    """Every window offset r at which some S restarts (0, S, 2S, ... < horizon): a call each."""
    return sorted({r for S in steps for r in range(0, horizon, S)})


def baseline_calls(ext, offsets, horizon=HORIZON):
    """ext (N, horizon+1, 22): ground-truth radians of frames s-1 .. s+horizon-1. For each restart
    offset r -> static, linear (N, R, horizon, 22): what each method predicts for frames s+r,
    s+r+1, ... if restarted at r."""
    gt, k = ext[:, 1:], np.arange(horizon, dtype=np.float64)[:, None]  # k steps ahead: (horizon, 1)
    static = np.stack([np.repeat(gt[:, r:r + 1], horizon, axis=1) for r in offsets], 1)  # (N, R, H, 22)
    # velocity of the previous frame, wrapped: a joint going 179 -> -179 deg moves +2 deg, not -358
    vel = np.stack([kinematics.wrap_angle(ext[:, r + 1] - ext[:, r]) for r in offsets], 1)  # (N, R, 22)
    linear = kinematics.wrap_angle(static + vel[:, :, None, :] * k)  # (N, R, H, 22)
    return static, linear


def rolled(calls, offsets, S, horizon=HORIZON):
    """calls (N, R, horizon, 22) per restart offset -> (N, horizon, 22): frames r .. r+S-1 come
    from the call at r."""
    out = np.empty_like(calls[:, 0])
    for r in range(0, horizon, S):
        n = min(S, horizon - r)
        out[:, r:r + n] = calls[:, offsets.index(r), :n]
    return out


def errors_deg(pred, gt):
    """Wrapped angle errors in degrees, same shape as pred / gt (radians)."""
    return wrap_deg(np.degrees(np.asarray(pred, np.float64) - np.asarray(gt, np.float64)))


def motion_deg(gt):
    """(N, horizon, 22) radians -> (N,) total wrapped ground-truth angular change in degrees."""
    return np.abs(np.degrees(kinematics.wrap_angle(np.diff(np.asarray(gt, np.float64), axis=1)))).sum(axis=(1, 2))


def top_quartile(values):
    """Boolean mask of the ceil(N/4) largest values (ties broken by position: deterministic)."""
    values = np.asarray(values)
    mask = np.zeros(len(values), bool)
    mask[np.argsort(-values, kind="stable")[:math.ceil(len(values) / 4)]] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Metrics


def _rmse(sq):
    return float(np.sqrt(sq.mean())) if sq.size else None


def summarize(err, S, high, classes):
    """err (N, horizon, 22) wrapped degrees of one method rolled with step S; high (N,) bool;
    classes (N,) str. Every number is an RMSE over future frames t = 1..15 and the joints named."""
    sq = err[:, 1:] ** 2  # (N, 15, 22): t = 0 is the given state, never scored
    keep = np.arange(1, err.shape[1]) % S != 0  # (15,) frames that are not restarts
    per_window = np.sqrt(sq.mean(axis=(1, 2)))  # (N,)
    p25, p50, p75 = np.percentile(per_window, [25, 50, 75]) if len(per_window) else (None,) * 3
    out = {
        "rmse": _rmse(sq),
        "rmse_no_restart": _rmse(sq[:, keep]),  # None for S = 1: every frame is a restart
        "rmse_high": _rmse(sq[high]),
        "rmse_high_no_restart": _rmse(sq[high][:, keep]),
        "per_step": [_rmse(sq[:, t]) for t in range(sq.shape[1])],  # t = 1..15
        "per_group": {g: _rmse(sq[:, :, idx]) for g, idx in kinematics.JOINT_GROUPS.items()},
        "per_joint": {name: _rmse(sq[:, :, j]) for j, name in enumerate(kinematics.JOINT_NAMES)},
        "per_window": {"median": _f(p50), "p25": _f(p25), "p75": _f(p75)},
        "per_class": {c: {"count": int((classes == c).sum()), "rmse": _rmse(sq[classes == c])}
                      for c in sorted(set(classes.tolist()))},
    }
    return out, per_window


def _f(x):
    return None if x is None else float(x)


def _gap(a, b):
    return None if a is None or b is None else a - b


def score(gt, calls, offsets, steps, classes):
    """gt (N, 16, 22) radians; calls {method: (N, R, 16, 22)}; classes (N,) -> (table, metrics,
    gaps, per-window, motion, high-motion mask)."""
    disp = motion_deg(gt)
    high = top_quartile(disp)
    table, metrics, gaps, per_window = {}, {}, {}, {}
    for S in steps:
        key = str(S)
        metrics[key], per_window[key] = {}, {}
        for m, c in calls.items():
            metrics[key][m], per_window[key][m] = summarize(errors_deg(rolled(c, offsets, S), gt), S, high, classes)
        row = {}
        for m in METHODS:
            got = metrics[key].get(m)
            row[m] = got["rmse"] if got else None
            row[f"{m}_high"] = got["rmse_high"] if got else None
        table[key] = row
        if "model" in calls:
            mm, st = metrics[key]["model"], metrics[key]["static"]
            gaps[key] = {"all": _gap(mm["rmse"], st["rmse"]),
                         "no_restart": _gap(mm["rmse_no_restart"], st["rmse_no_restart"]),
                         "high": _gap(mm["rmse_high"], st["rmse_high"]),
                         "high_no_restart": _gap(mm["rmse_high_no_restart"], st["rmse_high_no_restart"]),
                         "per_class": {c: {"count": v["count"], "gap": _gap(v["rmse"], st["per_class"][c]["rmse"])}
                                       for c, v in mm["per_class"].items()}}
    return table, metrics, gaps, per_window, disp, high


# --------------------------------------------------------------------------------------------------
# Windows and ground truth


def sample_windows(root, num_windows, seed=0, stride=1, split="val", horizon=HORIZON, context=CONTEXT):
    """Up to num_windows windows of the split, drawn without replacement with a fixed seed from
    every start s in data.window_starts(T, stride) of every clip; returned in dataset order: dicts
    path, clip_id, start, T."""
    entries = data.list_clips(root, split)
    T = np.array([e["num_frames"] for e in entries], dtype=np.int64)
    # windows per clip, counted without listing them (10^6 clips x 30 starts: a slow list)
    counts = np.maximum(0, -(-(T - horizon + 1 - context) // stride))
    ends = np.cumsum(counts)
    if not len(ends) or ends[-1] == 0:
        raise ValueError(f"no {split} windows in {root} (clips need >= {context + horizon} frames)")
    pick = np.sort(np.random.default_rng(seed).choice(ends[-1], size=min(num_windows, ends[-1]), replace=False))
    clip = np.searchsorted(ends, pick, side="right")  # window k: the clip whose range holds k
    start = context + stride * (pick - (ends[clip] - counts[clip]))
    return [{"path": str(Path(root) / entries[c]["path"]), "clip_id": entries[c]["clip_id"], "start": int(s),
             "num_frames": int(T[c])} for c, s in zip(clip, start)]


def load_ground_truth(windows, horizon=HORIZON):
    """-> ext (N, horizon+1, 22) radians of frames s-1 .. s+horizon-1, classes, prompts (N,)."""
    ext, classes, prompts = [], [], []
    for w in windows:
        cf = data.ClipFile(w["path"])
        ext.append(cf.read("angles", w["start"] - 1, w["start"] + horizon).astype(np.float64))
        classes.append(cf.meta["action_class"])
        prompts.append(clip_prompt(cf.meta))
    return np.stack(ext), np.array(classes, dtype=object), prompts


def clip_prompt(meta):
    """The training prompt of a clip (data.WindowDataset): its action class and description."""
    return prompt_text(meta["action_class"], meta["description"])


# --------------------------------------------------------------------------------------------------
# Model calls


def restart_images(path, t, image_size=224, context=CONTEXT):
    """The model's images for a restart at clip frame t: frames t-context .. t-1 ONLY (no leak),
    each with its box, as in training (model_io.frame_image)."""
    cf = data.ClipFile(path)
    jpegs = cf.frame_bytes(range(t - context, t))
    boxes = cf.read("boxes", t - context, t)
    return [frame_image(Image.open(io.BytesIO(b)), box, image_size) for b, box in zip(jpegs, boxes)]


def call_seed(seed, clip_id, start, r):
    """Seed of one model call's noise: a function of what is predicted, not of its batch."""
    return int(hashlib.md5(f"{seed}/{clip_id}/{start}/{r}".encode()).hexdigest()[:15], 16)


class RestartCalls(torch.utils.data.Dataset):
    """Item k = (window k // R, restart offset k % R): encoded images + prompt, ground-truth
    state (44,) of frame s+r, fixed noise (horizon, action_dim). Runs in DataLoader workers
    (JPEG decode, box, patching, tokens)."""

    def __init__(self, windows, offsets, states, prompts, encode, seed, image_size, horizon, action_dim):
        self.windows, self.offsets, self.states, self.prompts = windows, offsets, states, prompts
        self.encode, self.seed, self.image_size, self.shape = encode, seed, image_size, (horizon, action_dim)

    def __len__(self):
        return len(self.windows) * len(self.offsets)

    def __getitem__(self, k):
        i, j = divmod(k, len(self.offsets))
        w, r = self.windows[i], self.offsets[j]
        images = restart_images(w["path"], w["start"] + r, self.image_size)
        g = torch.Generator().manual_seed(call_seed(self.seed, w["clip_id"], w["start"], r))
        return {"inputs": self.encode(images, self.prompts[i]), "state": torch.from_numpy(self.states[i, j]).float(),
                "noise": torch.randn(self.shape, generator=g), "index": k}


def model_calls(model, windows, offsets, ext, prompts, seed=0, device=None, batch_size=16, num_workers=0,
                diffusion_steps=None, progress=True):
    """One batched model call per (window, restart offset) -> (N, R, horizon, 22) radians."""
    cfg = model.config
    if cfg.action_horizon != HORIZON or cfg.num_frames != CONTEXT:
        raise ValueError(f"the rolling evaluation is defined for horizon {HORIZON} and {CONTEXT} input frames; the "
                         f"model has action_horizon={cfg.action_horizon}, num_frames={cfg.num_frames}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    states = model_io.encode_angles(np.stack([ext[:, r + 1] for r in offsets], 1))  # (N, R, 44): GT of frame s+r
    encode = model.encoder()
    pad = encode.pad_token_id

    def collate(items):
        return {"inputs": collate_inputs([it["inputs"] for it in items], pad),
                "state": torch.stack([it["state"] for it in items]),
                "noise": torch.stack([it["noise"] for it in items]),
                "index": torch.tensor([it["index"] for it in items])}

    ds = RestartCalls(windows, offsets, states, prompts, encode, seed, cfg.image_size, cfg.action_horizon,
                      cfg.action_dim)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                     collate_fn=collate)
    out = np.zeros((len(windows) * len(offsets), cfg.action_horizon, cfg.action_dim // 2))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), model.autocast():
            for b in tqdm(dl, desc="model calls", disable=not progress, dynamic_ncols=True):
                acts = model(inputs=b["inputs"], robot_state=b["state"].to(device), compute_loss=False,
                             noise=b["noise"].to(device), steps=diffusion_steps)["actions"]  # (B, 16, 44)
                out[b["index"].numpy()] = model_io.decode_angles(acts.float().cpu().numpy())
    finally:
        model.train(was_training)
    calls = out.reshape(len(windows), len(offsets), HORIZON, -1)
    # a restart frame is known to every method (re-initialised to the ground truth): the model's
    # chunk counts from one step after it (its row 0 only echoes the given state)
    calls[:, :, 0] = np.stack([ext[:, r + 1] for r in offsets], 1)
    return calls


# --------------------------------------------------------------------------------------------------
# The evaluation


def rolling_eval(model, root, num_windows=500, steps=(1, 2, 3, 5, 8, 16), seed=0, device=None, batch_size=16,
                 num_workers=0, stride=1, split="val", diffusion_steps=None, progress=True):
    """The card's rolling evaluation on `root` (model=None: baselines only). Returns a JSON-ready
    dict: table[S][model|static|linear|*_high] (RMSE deg, t = 1..15), metrics[S][method] (every
    breakdown), gaps[S] (model - static), windows (per-window details), num_windows, model_calls,
    settings."""
    steps = sorted({int(S) for S in steps})
    if not steps or steps[0] < 1 or steps[-1] > HORIZON:
        raise ValueError(f"steps must be in 1..{HORIZON}, got {steps}")
    windows = sample_windows(root, num_windows, seed, stride, split)
    ext, classes, prompts = load_ground_truth(windows)
    offsets = restart_offsets(steps)
    static, linear = baseline_calls(ext, offsets)
    calls = {"static": static, "linear": linear}
    if model is not None:
        calls = {"model": model_calls(model, windows, offsets, ext, prompts, seed, device, batch_size, num_workers,
                                      diffusion_steps, progress), **calls}
    gt = ext[:, 1:]
    table, metrics, gaps, per_window, disp, high = score(gt, calls, offsets, steps, classes)
    for i, w in enumerate(windows):
        w.update(action_class=classes[i], motion_deg=float(disp[i]), high_motion=bool(high[i]),
                 rmse={S: {m: float(v[i]) for m, v in per_window[S].items()} for S in per_window})
        w.pop("path")
    return {"num_windows": len(windows), "steps": steps, "table": table, "metrics": metrics, "gaps": gaps,
            "model_calls": len(windows) * len(offsets) if model is not None else 0, "restart_offsets": offsets,
            "settings": {"data": str(root), "seed": seed, "stride": stride, "split": split,
                         "diffusion_steps": diffusion_steps, "scored_frames": "t = 1..15", "angle_error": "wrapped",
                         "high_motion": "top quartile (ceil(N/4)) of total wrapped GT angular change",
                         "model_inputs": "frames s+r-4 .. s+r-1 with the box, GT state of frame s+r",
                         "restart_frames": "every method is re-initialised to the ground truth there (error 0); "
                                           "*_no_restart leaves them out"},
            "windows": windows}


def format_table(res):
    """The card's table as text: S x (model / static / linear [/ model - static]), all windows |
    high-motion."""
    has_model = res["table"][str(res["steps"][0])]["model"] is not None
    cols = METHODS if has_model else METHODS[1:]
    n_high = sum(w["high_motion"] for w in res["windows"])
    fmt = lambda v: f"{v:7.2f}" if v is not None else f"{'-':>7s}"  # noqa: E731
    names = list(cols) + (["m-static"] if has_model else [])
    half = " | ".join(f"{c:>8s}" for c in names)
    lines = [f"rolling eval: {res['num_windows']} windows; RMSE deg over 22 joints, future frames t = 1..15, "
             f"wrapped errors",
             f"{'':3s}   {'all windows':^{len(half)}s} || {f'high-motion quartile ({n_high})':^{len(half)}s}",
             f"{'S':>3s} | {half} || {half}"]
    for S in res["steps"]:
        row = res["table"][str(S)]
        cells = []
        for suffix in ("", "_high"):
            vals = [row[f"{c}{suffix}"] for c in cols]
            if has_model:
                vals.append(row[f"model{suffix}"] - row[f"static{suffix}"])
            cells.append(" | ".join(f"{fmt(v):>8s}" if i < len(cols) else f"{v:+8.2f}" for i, v in enumerate(vals)))
        lines.append(f"{S:3d} | {cells[0]} || {cells[1]}")
    S = str(res["steps"][-1])
    pc = {m: res["metrics"][S][m]["per_class"] for m in cols}
    lines.append(f"per action class at S = {S} (windows: " + " / ".join(cols) + "):")
    for c in sorted(pc["static"], key=lambda c: pc[cols[0]][c]["rmse"]):
        lines.append(f"  {c[:30]:30s} {pc['static'][c]['count']:5d}: " + " / ".join(fmt(pc[m][c]["rmse"])
                                                                                  for m in cols))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots (PIL only)

COLORS = {"model": (214, 39, 40), "static": (31, 119, 180), "linear": (44, 160, 44),
          "train loss": (31, 119, 180), "val loss": (214, 39, 40)}  # train.py's loss curves
GRID, INK = (225, 225, 225), (40, 40, 40)


def load_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo, hi, n=5):
    """Round tick values covering [lo, hi] with about n intervals (steps 1, 2 or 5 x 10^k)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step + 1e-9)) + 1)]


def line_panel(draw, box, xs, series, title, xlabel="", ylabel=""):
    """Line chart in box (x0, y0, x1, y1): series {name: [y, None skipped]} coloured by COLORS."""
    x0, y0, x1, y1 = box
    f = load_font(12)
    draw.text(((x0 + x1) / 2, y0 + 2), title, fill=INK, font=load_font(13), anchor="mt")
    px0, py0, px1, py1 = x0 + 44, y0 + 22, x1 - 8, y1 - 30  # plot area inside the axes labels
    ys = [v for s in series.values() for v in s if v is not None]
    yt = nice_ticks(0.0, max(ys) if ys else 1.0)
    X = lambda x: px0 + (x - xs[0]) / max(xs[-1] - xs[0], 1e-9) * (px1 - px0)  # noqa: E731
    Y = lambda y: py1 - (y - yt[0]) / (yt[-1] - yt[0]) * (py1 - py0)  # noqa: E731
    for t in yt:
        draw.line([(px0, Y(t)), (px1, Y(t))], fill=GRID)
        draw.text((px0 - 4, Y(t)), f"{t:g}", fill=INK, font=f, anchor="rm")
    for x in xs:
        draw.text((X(x), py1 + 4), f"{x:g}", fill=INK, font=f, anchor="mt")
    draw.rectangle([px0, py0, px1, py1], outline=INK)
    draw.text(((px0 + px1) / 2, y1 - 2), xlabel, fill=INK, font=f, anchor="mb")
    draw.text((x0 + 2, py0 - 4), ylabel, fill=INK, font=f, anchor="lb")
    for name, s in series.items():
        pts = [(X(x), Y(y)) for x, y in zip(xs, s) if y is not None]
        if len(pts) > 1:
            draw.line(pts, fill=COLORS.get(name, INK), width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=COLORS.get(name, INK))


def legend(draw, x, y, names):
    f = load_font(13)
    for name in names:
        draw.line([(x, y + 7), (x + 22, y + 7)], fill=COLORS.get(name, INK), width=3)
        draw.text((x + 28, y), name, fill=INK, font=f)
        x += 40 + int(draw.textlength(name, font=f))


def save_png(img, path):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data.atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_rmse_vs_step(res, path):
    """One panel per S: RMSE (deg) at each prediction step t = 1..15 for every method evaluated."""
    steps = res["steps"]
    cols = min(3, len(steps))
    rows = math.ceil(len(steps) / cols)
    W, H, top = 330, 230, 34
    img = Image.new("RGB", (cols * W, rows * H + top), "white")
    draw = ImageDraw.Draw(img)
    methods = [m for m in METHODS if m in res["metrics"][str(steps[0])]]
    legend(draw, 10, 8, methods)
    draw.text((cols * W - 8, 8), f"{res['num_windows']} windows, RMSE deg", fill=INK, font=load_font(13), anchor="ra")
    for i, S in enumerate(steps):
        x, y = (i % cols) * W, top + (i // cols) * H
        series = {m: res["metrics"][str(S)][m]["per_step"] for m in methods}
        line_panel(draw, (x, y, x + W, y + H), list(range(1, HORIZON)), series, f"re-init every S = {S}",
                   xlabel="prediction step t (0.1 s)")
    return save_png(img, path)


def plot_class_gaps(res, path, S=None):
    """Horizontal bars: model - static RMSE (deg) per action class at step S (default: the
    largest), with counts. Red: the model is worse than standing still; blue: better."""
    S = str(S or res["steps"][-1])
    gaps = sorted(((c, v["count"], v["gap"]) for c, v in res["gaps"][S]["per_class"].items()),
                  key=lambda cv: cv[2])
    f = load_font(12)
    label_w, bar_w, row_h = 230, 360, 20
    img = Image.new("RGB", (label_w + bar_w + 70, 50 + row_h * len(gaps) + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), f"model - static RMSE (deg) per action class, S = {S} (< 0: model better)", fill=INK,
              font=load_font(13))
    lim = max([abs(g) for _, _, g in gaps if g is not None] + [1e-6])
    ticks = nice_ticks(0.0, lim, 3)
    lim = ticks[-1]
    x_of = lambda g: label_w + (g + lim) / (2 * lim) * bar_w  # noqa: E731
    y_base = 40
    for t in sorted({-v for v in ticks} | set(ticks)):
        draw.line([(x_of(t), y_base), (x_of(t), y_base + row_h * len(gaps))], fill=GRID if t else INK)
        draw.text((x_of(t), y_base + row_h * len(gaps) + 4), f"{t:g}", fill=INK, font=f, anchor="mt")
    for i, (c, n, g) in enumerate(gaps):
        y = y_base + i * row_h
        draw.text((label_w - 6, y + row_h / 2), f"{c[:26]} ({n})", fill=INK, font=f, anchor="rm")
        if g is not None:
            draw.rectangle([min(x_of(0), x_of(g)), y + 3, max(x_of(0), x_of(g)), y + row_h - 3],
                           fill=COLORS["model"] if g > 0 else COLORS["static"])
            label = f"{g:+.2f}" if abs(g) < 10 else f"{g:+.1f}"
            draw.text((x_of(g) + (4 if g >= 0 else -4), y + row_h / 2), label, fill=INK, font=f,
                      anchor="lm" if g >= 0 else "rm")
    return save_png(img, path)


# --------------------------------------------------------------------------------------------------
# CLI


def latest_checkpoint(run_dir):
    """RUN/latest.json (written by train.py) -> the checkpoint folder it names."""
    latest = Path(run_dir) / "latest.json"
    if not latest.is_file():
        raise FileNotFoundError(f"no {latest}: train first (python train.py) or pass --ckpt")
    return Path(run_dir) / json.loads(latest.read_text())["checkpoint"]


def resolve_checkpoint(path):
    """A checkpoint folder (config.json inside) or a run folder (latest.json inside)."""
    path = Path(path)
    return path if (path / "config.json").is_file() else latest_checkpoint(path)


def write_json(obj, path):
    data.atomic_write_bytes(path, json.dumps(obj, indent=1).encode("utf-8"))
    return Path(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/tiny", help="checkpoint folder, or a run folder (its latest.json)")
    ap.add_argument("--data", default="data/demo", help="clip dataset folder (data.py format)")
    ap.add_argument("--num-windows", type=int, default=500, help="validation windows drawn (all if fewer)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 8, 16], help="re-initialisation steps S")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--stride", type=int, default=1, help="spacing of the candidate window starts in a clip")
    ap.add_argument("--seed", type=int, default=0, help="window draw and model noise")
    ap.add_argument("--baselines-only", action="store_true", help="static and linear only (no model needed)")
    ap.add_argument("--diffusion-steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="out/eval", help="folder for eval.json and the plots")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda":
        use_tf32(True)  # as training: bf16 autocast, TF32 for what stays fp32

    if args.data == "data/demo" and not (Path(args.data) / data.INDEX_FILE).is_file():
        print(f"building the demo dataset in {args.data} (once)")  # as train.py does
        import synth  # the demo builder, needed only here
        synth.build_demo(args.data)
    model = None
    if not args.baselines_only:
        from model import VLAModel

        ckpt = resolve_checkpoint(args.ckpt)
        print(f"checkpoint {ckpt}")
        model = VLAModel.from_pretrained(ckpt, device=args.device)
    res = rolling_eval(model, args.data, num_windows=args.num_windows, steps=args.steps, seed=args.seed,
                       device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                       stride=args.stride, split=args.split, diffusion_steps=args.diffusion_steps)
    res["settings"]["checkpoint"] = None if model is None else str(ckpt)
    print(format_table(res))
    out = Path(args.out)
    written = [write_json(res, out / "eval.json"), plot_rmse_vs_step(res, out / "rmse_vs_step.png")]
    if res["gaps"]:
        written.append(plot_class_gaps(res, out / "class_gaps.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return res


if __name__ == "__main__":
    main()
