"""
A learned 2D -> 3D lifter: a small temporal MLP from a window of Human3.6M 2D keypoints to the
centre frame's 16 bone directions in the camera frame (x right, y down, z forward), trained on
motion capture seen through random cameras, then refined by fit3d.py's kinematic fit (which keeps
the learned depths and fixes the rest).

Why a learned part at all: a monocular view fixes each bone's in-image direction but not its lean
towards or away from the camera. fit3d.py's hand-written priors (bone lengths, a rigid-ish torso,
knee and elbow sides, gravity) cannot say how far a near-vertical spine, thigh or neck leans in
depth, and the 22-angle convention measures exactly that lean (its 3-DoF angles are singular at an
upright pose, so the sign of a few degrees of lean flips pitch and yaw by 180 deg). Motion capture
says which leans are likely given the 2D motion of the whole body over +-0.4 s; the model is small
enough to train on a laptop CPU.

Model: per frame 17 x (x, y, visible) normalised by the person's 2D size plus where the person is
in the view (centre / focal, size / focal, which tells a camera's perspective); 9 frames in; an MLP
with residual blocks (Martinez et al. 2017, "A simple yet effective baseline for 3d human pose
estimation"); unit bone directions out. Training data: mocap.py's loaders and synth.py's random
cameras, 2D noise 0-4 px and 0-20% dropped joints (random positions, score 0), mirrored copies
(x -> -x, left <-> right). At inference the view and its mirror image are both lifted and averaged.
Tried without gain: a longer window, more clips and steps, a wider MLP, an ensemble, clips played at
other speeds, bone-length jitter, anchoring only the depth in the refine. What limits it is the
number of motions it learns from.

Scores need held-out motions: `python lifter.py cv` trains one model per fold without that fold's
motions and scores only their clips, on fit3d.py's benchmark (fit3d.mocap_cases); `cv --unseen DIR`
trains on all the shipped mocap and scores the mocap files of DIR the same way. The shipped mocap is
17 clips; for real videos train on more (`--mocap-dir` with DeepMimic .txt / AMP .npz / BVH files of
the common rigs, see mocap.load_bvh).

Commands:
  python lifter.py train --out runs/lifter.safetensors   # all shipped mocap, ~1 min on 2 CPU cores
  python lifter.py train --mocap-dir cmu_bvh/ [--joint-map map.json --up z --unit cm --allow-pickle]
  python lifter.py cv                       # leave-motions-out: lifter / lifter + fit / fit alone
  python lifter.py cv --unseen DIR          # the same on DIR's mocap, never trained on
  python pipeline.py --videos DIR --out DIR --lifter runs/lifter.safetensors
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import fit3d
import kinematics

# per frame: (x, y, visible) of 17 joints + (centre x, centre y, size) / focal
FEATURES = 17 * 3 + 3


@dataclass
class LifterConfig:
    window: int = 9               # frames in (centre +- 4 at 10 Hz)
    hidden: int = 512             # MLP width
    blocks: int = 2               # residual blocks
    dropout: float = 0.1
    # training
    clips: int = 1000             # random 40-frame clips of the training motions, own cameras
    frames: int = 40
    steps: int = 1500
    batch: int = 512
    lr: float = 1e-3              # 5% warm-up, cosine down
    weight_decay: float = 1e-4
    noise_px: float = 4.0         # 2D noise sigma from U(0, noise_px) per clip (320 x 240 views)
    drop: float = 0.2             # dropped-joint rate drawn from U(0, drop) per clip
    length_jitter: float = 0.0    # bone lengths scaled by U(1 - j, 1 + j) per clip (no gain: off)
    seed: int = 0


def frame_features(kp2d, scores, width, height, focal, min_conf=0.05):
    """(T, 17, 2) H36M pixels, (T, 17) scores -> (T, FEATURES) float32. Joints are relative to the
    pelvis (else the mean confident joint) in units of the clip's median 2D size, so the scale of
    the video does not matter; missing joints are zeros with visible = 0."""
    kp, conf = fit3d.clean_keypoints(kp2d, scores, min_conf)
    kp, valid = kp.numpy(), (conf > 0).numpy()
    lo = np.where(valid[..., None], kp, np.inf).min(1)
    hi = np.where(valid[..., None], kp, -np.inf).max(1)
    ok = valid.sum(1) >= 2
    size = (float(np.median(np.linalg.norm(hi - lo, axis=-1)[ok])) if ok.any()
            else 0.25 * max(width, height))
    size = max(size, 1.0)
    mean = (kp * valid[..., None]).sum(1) / np.maximum(valid.sum(1, keepdims=True), 1)
    centre = np.where(valid[:, :1], kp[:, 0], mean)  # (T, 2)
    x = (kp - centre[:, None]) / size * valid[..., None]  # (T, 17, 2)
    view = np.concatenate([(centre - [width / 2.0, height / 2.0]) / focal,
                           np.full((len(kp), 1), size / focal)], 1)
    return np.concatenate([x.reshape(len(kp), -1), valid, view], 1).astype(np.float32)


def frame_windows(feat, window):
    """(T, F) -> (T, window * F): each frame with its neighbours, edges repeated."""
    T = len(feat)
    idx = np.clip(np.arange(T)[:, None] + np.arange(window) - window // 2, 0, T - 1)  # (T, window)
    return feat[idx].reshape(T, -1)


def bone_directions(pose3d):
    """(..., 17, 3) -> (..., 16, 3) unit vectors parent -> child."""
    b = pose3d[..., 1:, :] - pose3d[..., list(kinematics.H36M_PARENTS[1:]), :]
    return b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-9)


class LifterNet(nn.Module):
    """(B, window * FEATURES) -> (B, 16, 3) unit bone directions of the window's centre frame."""

    def __init__(self, cfg):
        super().__init__()
        self.inp = nn.Linear(cfg.window * FEATURES, cfg.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                          nn.Dropout(cfg.dropout),
                          nn.Linear(cfg.hidden, cfg.hidden)) for _ in range(cfg.blocks))
        self.out = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, 16 * 3))

    def forward(self, x):
        h = self.inp(x)  # (B, hidden)
        for block in self.blocks:
            h = h + block(h)
        d = self.out(h).view(*x.shape[:-1], 16, 3)
        return d / d.norm(dim=-1, keepdim=True).clamp(min=1e-6)


# --------------------------------------------------------------------------------------------------
# training data: motion capture through random cameras


def mocap_clips(motions, n_clips, seed, frames=40, noise_px=4.0, drop=0.2, length_jitter=0.0):
    """Yields (kp2d (T, 17, 2), scores (T, 17), pose3d (T, 17, 3) camera frame, focal, width,
    height) for n_clips random windows of the given mocap.Motion objects: fit3d.view_mocap with a
    noise level and drop rate drawn per clip."""
    rng = np.random.default_rng(seed)
    for _ in range(n_clips):
        m = motions[int(rng.integers(len(motions)))]
        kp, sc, pc, cam = fit3d.view_mocap(rng, m, frames, noise_px, drop, randomize=True,
                                           length_jitter=length_jitter)
        yield kp, sc, pc, cam.focal, cam.width, cam.height


def mirror_keypoints(kp2d, scores, width):
    """The mirror image of a view: x -> width - x and left/right joints swapped
    (kinematics.flip_pose3d for 2D)."""
    flip = list(kinematics.H36M_FLIP_PERM)
    kp = np.array(kp2d, np.float64)[:, flip]
    kp[..., 0] = width - kp[..., 0]
    return kp, np.asarray(scores)[:, flip]


def training_set(clips, window):
    """Clips (as mocap_clips yields) plus their mirror images -> X (N, window * FEATURES), Y (N, 16,
    3) tensors."""
    X, Y = [], []
    for kp, sc, pc, f, W, H in clips:
        for k, s, p in ((kp, sc, pc), (*mirror_keypoints(kp, sc, W), kinematics.flip_pose3d(pc))):
            X.append(frame_windows(frame_features(k, s, W, H, f), window))
            Y.append(bone_directions(p).astype(np.float32))
    return torch.from_numpy(np.concatenate(X)), torch.from_numpy(np.concatenate(Y))


def train_lifter(motions, cfg=None, progress=True):
    """Train a LifterNet on random camera views of `motions` (mocap.Motion objects) -> the model
    in eval mode."""
    cfg = cfg or LifterConfig()
    X, Y = training_set(mocap_clips(motions, cfg.clips, cfg.seed, cfg.frames, cfg.noise_px,
                                    cfg.drop, cfg.length_jitter), cfg.window)
    torch.manual_seed(cfg.seed)
    net = LifterNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # 5% linear warm-up, cosine down to 0
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    from tqdm import tqdm
    bar = tqdm(range(cfg.steps), desc="lifter", disable=not progress)
    for step in bar:
        i = torch.randint(0, len(X), (cfg.batch,), generator=gen)
        loss = (net(X[i]) - Y[i]).pow(2).sum(-1).mean()  # = 2 - 2 cos per bone
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def save_lifter(net, cfg, path):
    """safetensors with the LifterConfig as JSON metadata; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"lifter_config": json.dumps(asdict(cfg))})
    tmp.replace(path)


def load_lifter(path):
    """-> (LifterNet in eval mode, LifterConfig). Missing or unexpected tensors are named
    in the error."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "lifter_config" not in meta:
        raise ValueError(f"{path}: not a lifter file (no lifter_config metadata; write it with "
                         "save_lifter)")
    fields = json.loads(meta["lifter_config"])
    unknown = sorted(set(fields) - set(LifterConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}: lifter_config has fields this lifter.py does not know: "
                         f"{unknown}")
    cfg = LifterConfig(**fields)
    net = LifterNet(cfg)
    state = load_file(str(path))
    want = net.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = [k for k in want if k in state and state[k].shape != want[k].shape]
    if missing or extra or bad:
        raise ValueError(f"{path}: missing {missing}, unexpected {extra}, mis-shaped {bad}")
    net.load_state_dict(state)
    return net.eval(), cfg


# the refinement: the fit's defaults plus w_init, which keeps the learned directions (their depths)
# while lengths, root and the 2D are fitted. Much smaller, the depths drift back to the hand-written
# priors' choice; larger gains nothing.
REFINE = fit3d.FitConfig(w_init=0.1)


class LearnedLifter:
    """The pipeline's lifter interface, `lifter(kp2d, scores, width, height) -> pose3d (T, 17, 3)`
    camera frame, metres: LifterNet's bone directions on fit3d's root guess and reference bone
    lengths, then fit3d.fit_clip with init= and a FitConfig whose w_init keeps the learned
    directions while the fit sets bone lengths and the root and matches the 2D (refine=None: no fit,
    the reference bone lengths)."""

    def __init__(self, net, cfg, focal=None, refine=REFINE, source="in memory"):
        self.net, self.cfg, self.focal, self.refine, self.source = net, cfg, focal, refine, source

    @classmethod
    def from_file(cls, path, focal=None, refine=REFINE):
        net, cfg = load_lifter(path)
        return cls(net, cfg, focal, refine, str(path))

    def __repr__(self):  # recorded in the pipeline's status records
        steps = None if self.refine is None else self.refine.steps
        return f"LearnedLifter({self.source}, refine_steps={steps}, focal={self.focal})"

    def directions(self, kp2d, scores, width, height):
        """(T, 16, 3) unit bone directions: the mean of the net on the view and on its mirror image
        (mirrored back), which removes a left/right bias of the net at no training cost."""
        f = self.focal or fit3d.FitConfig.focal_scale * max(width, height)
        views = ((kp2d, scores), mirror_keypoints(kp2d, scores, width))
        x = np.stack([frame_windows(frame_features(k, s, width, height, f), self.cfg.window)
                      for k, s in views])  # (2, T, window * F)
        with torch.no_grad():
            d = self.net(torch.from_numpy(x)).double().numpy()  # (2, T, 16, 3)
        bone_flip = [j - 1 for j in kinematics.H36M_FLIP_PERM[1:]]  # bone b ends at joint b + 1
        back = d[1][:, bone_flip] * np.array([-1.0, 1.0, 1.0])
        mean = d[0] + back
        return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-9)

    def initial_pose(self, kp2d, scores, width, height):
        f = self.focal or fit3d.FitConfig.focal_scale * max(width, height)
        d = self.directions(kp2d, scores, width, height)
        lengths = torch.tensor(fit3d.REF_LENGTHS, dtype=torch.float64)[fit3d.LENGTH_OF_BONE]
        root = torch.from_numpy(fit3d.root_guess(kp2d, scores, width, height, f))
        return fit3d.bone_chain(torch.from_numpy(d), lengths, root).numpy()

    def __call__(self, kp2d, scores, width, height):
        return self.lift(kp2d, scores, width, height)[0]

    def lift(self, kp2d, scores, width, height):
        """-> (pose3d, info): info as fit3d.fit_clip's, with loss_init (the fit's objective at the
        net's pose) and kept ("refined", or "init" when the refine found nothing lower: the net's
        pose is returned)."""
        pose = self.initial_pose(kp2d, scores, width, height)
        f = self.focal or fit3d.FitConfig.focal_scale * max(width, height)
        if self.refine is None:
            return pose, {"focal": f, "kept": "init"}
        f = self.focal or self.refine.focal_scale * max(width, height)
        return fit3d.fit_clip(kp2d, scores, width, height, f, self.refine, return_info=True,
                              init=pose)


# --------------------------------------------------------------------------------------------------
# leave-motions-out evaluation on fit3d's benchmark


def load_motions(mocap_dir=None, skip_refused=False, log=print, **kwargs):
    """-> [(key, mocap.Motion)]: mocap.MOTIONS (the shipped mocap), or every mocap file under
    mocap_dir (DeepMimic .txt, AMP .npz / .npy, BVH of the common rigs; kwargs: mocap.load_dir's
    joint_map, up, unit, allow_pickle). Each file loaded, refused (with why) or ignored is logged; a
    refused file is an error unless skip_refused."""
    import mocap
    if mocap_dir is None:
        return [(key, mocap.load_motion(file)) for key, file, _, _ in mocap.MOTIONS]
    loaded, refused, ignored = mocap.load_dir(mocap_dir, **kwargs)
    for line in mocap.load_report(loaded, refused, ignored):
        log(line)
    if refused and not skip_refused:
        raise ValueError(f"{len(refused)} of {len(loaded) + len(refused)} mocap files under "
                         f"{mocap_dir} refused (see above): fix or remove them, or pass "
                         "--skip-refused to train on the others")
    if not loaded:
        raise FileNotFoundError(f"{mocap_dir}: no mocap file loaded (DeepMimic .txt, "
                                "AMP .npz / .npy, BVH)")
    folder = Path(mocap_dir).is_dir()
    return [(p.relative_to(mocap_dir).with_suffix("").as_posix() if folder else p.stem, m)
            for p, m in loaded]


def _score(lift, fit_cfg, case, pairs, rows):
    """One clip three ways: the lifter alone, lifter + fit, the fit alone; rows get each one's
    bone direction error, the fit alone's residual (what FIT_COLLAPSE checks) and which pose
    the refine kept."""
    name, kp, sc, gt, focal, W, H = case
    lift.focal = focal
    fit, fit_info = fit3d.fit_clip(kp, sc, W, H, focal, fit_cfg, return_info=True)
    refined, info = lift.lift(kp, sc, W, H)
    poses = {"lifter": lift.initial_pose(kp, sc, W, H), "lifter+fit": refined, "fit": fit}
    for method, pose in poses.items():
        pairs[method].append((pose, gt))
    errors = {m: fit3d.pose_errors([(p, gt)])["bone_dir_err_deg"] for m, p in poses.items()}
    rows.append({"motion": name, **errors,
                 "fit_residual": fit3d.objective(fit, kp, sc, W, H, focal, fit_cfg)["residual"],
                 "kept": info.get("kept")})


def _report(pairs, rows, return_poses):
    scores = {method: fit3d.pose_errors(p) for method, p in pairs.items()}
    if not return_poses:
        return scores, rows
    return scores, rows, [(r["motion"], {m: pairs[m][i][0] for m in pairs}, pairs["fit"][i][1])
                          for i, r in enumerate(rows)]


def cross_validate(folds=4, cfg=None, fit_cfg=None, refine=REFINE, n_clips=17, seed=0, frames=40,
                   noise_px=2.0, drop=0.1, progress=True, return_poses=False):
    """fit3d's benchmark (mocap_cases) scored three ways, each clip by a lifter trained WITHOUT its
    motion (motion i of mocap.MOTIONS is in fold i % folds): the lifter alone, the lifter refined by
    the fit, and the fit alone. -> ({method: fit3d.pose_errors dict}, per-clip rows (see _score)),
    and with return_poses also the poses [(motion, {method: pose}, truth)]."""
    import mocap
    cfg, fit_cfg = cfg or LifterConfig(), fit_cfg or fit3d.FitConfig()
    keys = [m[0] for m in mocap.MOTIONS]
    cases = list(fit3d.mocap_cases(n_clips, seed, frames, noise_px, drop))
    motions = load_motions()
    pairs, rows = {"lifter": [], "lifter+fit": [], "fit": []}, []
    for k in range(folds):
        held = [c for c in cases if keys.index(c[0]) % folds == k]
        if not held:
            continue
        net = train_lifter([m for i, (_, m) in enumerate(motions) if i % folds != k], cfg, progress)
        lift = LearnedLifter(net, cfg, refine=refine)
        for case in held:
            _score(lift, fit_cfg, case, pairs, rows)
    return _report(pairs, rows, return_poses)


def unseen_validate(unseen_dir, cfg=None, fit_cfg=None, refine=REFINE, clips_per_motion=6, seed=0,
                    frames=40,
                    noise_px=2.0, drop=0.1, progress=True, return_poses=False, skip_refused=False,
                    **load_kwargs):
    """Motions the lifter never saw: one lifter trained on ALL the shipped mocap, each mocap file of
    unseen_dir (load_motions; load_kwargs: joint_map, up, unit, allow_pickle) seen in
    clips_per_motion random windows through fit3d.view_mocap's cameras, noise and dropped joints
    (the benchmark's protocol), scored three ways. -> as cross_validate."""
    cfg, fit_cfg = cfg or LifterConfig(), fit_cfg or fit3d.FitConfig()
    unseen = load_motions(unseen_dir, skip_refused, **load_kwargs)
    lift = LearnedLifter(train_lifter([m for _, m in load_motions()], cfg, progress), cfg,
                         refine=refine)
    rng = np.random.default_rng(seed)
    pairs, rows = {"lifter": [], "lifter+fit": [], "fit": []}, []
    for name, m in unseen:
        for _ in range(clips_per_motion):
            kp, sc, gt, cam = fit3d.view_mocap(rng, m, frames, noise_px, drop)
            _score(lift, fit_cfg, (name, kp, sc, gt, cam.focal, cam.width, cam.height), pairs, rows)
    return _report(pairs, rows, return_poses)


def print_results(res, rows, collapse_limit):
    """The scores, how FIT_COLLAPSE (residual > collapse_limit) sorts the fit alone's clips, what
    the refine kept, and the bone direction errors per motion."""
    for name, r in res.items():
        print(f"{name:11s}", "  ".join(f"{k[:-4]} {v:5.1f}" for k, v in r.items()))
    bad = np.array([r["fit"] > 40 for r in rows], bool)
    flag = np.array([r["fit_residual"] > collapse_limit for r in rows], bool)
    print(f"FIT_COLLAPSE (fit alone, residual > {collapse_limit}): flags {(flag & bad).sum()} of "
          f"the {bad.sum()} clips whose bone direction error is > 40 deg, {(flag & ~bad).sum()} of "
          f"the other {(~bad).sum()}")
    kept = sum(r["kept"] == "init" for r in rows)
    worse = sum(r["lifter+fit"] > r["lifter"] for r in rows)
    print(f"the refine kept the lifter's own pose on {kept} of {len(rows)} clips; "
          f"lifter+fit is worse than the lifter alone on {worse}")
    for motion in dict.fromkeys(r["motion"] for r in rows):
        mine = [r for r in rows if r["motion"] == motion]
        print(f"  {motion[:20]:20s} bone direction error (deg):", "  ".join(
            f"{m} {np.mean([r[m] for r in mine]):5.1f}" for m in ("fit", "lifter", "lifter+fit")),
            f" ({len(mine)} clips, worst fit {max(r['fit'] for r in mine):.1f})")


def plot_poses(path, cases, frames=(0, 13, 26, 39), size=150):
    """cases [(name, {method: pose (T, 17, 3)}, truth (T, 17, 3))] -> PNG: a row per clip, for
    each frame the camera's view and a view from its side; truth green, the fit alone blue, the
    lifter + fit red."""
    from PIL import Image, ImageDraw

    import eval as ev
    import sample
    colors = {"fit": (40, 90, 200), "lifter+fit": sample.PRED_COLOR}
    views = [(0.0, 0.0), (90.0, 0.0)]
    head, label_w = 34, 110
    img = Image.new("RGB", (label_w + size * len(frames) * len(views), head + size * len(cases)),
                    "white")
    draw = ImageDraw.Draw(img)
    font = ev.load_font(12)
    draw.text((6, 4), "green: truth   blue: fit3d alone   red: lifter + fit   (held-out motions; "
              "per frame: the camera's view | from its side)", fill=(20, 20, 20), font=font)
    for r, (name, poses, gt) in enumerate(cases):
        draw.text((6, head + r * size + size // 2), name[:16], fill=(20, 20, 20), font=font,
                  anchor="lm")
        for c, t in enumerate([t for t in frames if t < len(gt)]):
            for v, view in enumerate(views):
                x, y = label_w + (c * len(views) + v) * size, head + r * size
                # root-centred
                rel = [p[t:t + 1] - p[t:t + 1, :1] for p in (gt, *[poses[m] for m in colors])]
                panel = sample.SkeletonPanel(rel, view, size)
                draw.rectangle([x, y, x + size - 1, y + size - 1], outline=(215, 215, 215))
                panel.draw(draw, (x, y), rel[0][0], sample.GT_COLOR)
                for k, m in enumerate(colors):
                    panel.draw(draw, (x, y), rel[1 + k][0], colors[m], width=2)
                if r == 0:
                    draw.text((x + 4, head - 14), f"t={t / 10:.1f} s" + (" side" if v else ""),
                              fill=(20, 20, 20), font=font)
    return ev.save_png(img, path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description="Train or cross-validate the learned 2D -> 3D lifter on motion capture.")
    ap.add_argument("command", choices=["train", "cv"])
    ap.add_argument("--out", default="runs/lifter.safetensors",
                    help="train: where to write the model")
    ap.add_argument("--mocap-dir", default=None,
                    help="train: a folder of DeepMimic .txt / AMP .npz / BVH files "
                    "(searched recursively) instead of the shipped mocap")
    ap.add_argument("--skip-refused", action="store_true",
                    help="train: on the files that load, listing the others")
    ap.add_argument("--folds", type=int, default=4,
                    help="cv: motion i is held out in fold i %% folds")
    ap.add_argument("--clips", type=int, default=LifterConfig.clips)
    ap.add_argument("--steps", type=int, default=LifterConfig.steps)
    ap.add_argument("--hidden", type=int, default=LifterConfig.hidden)
    ap.add_argument("--window", type=int, default=LifterConfig.window)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="out/lifter_cv.png",
                    help="cv: a picture of held-out clips' poses")
    ap.add_argument("--plot-motions", default="walk,backflip,punch",
                    help="cv: which clips the picture shows")
    ap.add_argument("--unseen", default=None,
                    help="cv: a folder of mocap files (.txt / .npz / .bvh) never trained on: train "
                    "on all the shipped mocap and score these instead of leaving motions out")
    ap.add_argument("--unseen-clips", type=int, default=6,
                    help="cv --unseen: random windows per file")
    ap.add_argument("--no-progress", action="store_true")
    import mocap
    mocap.add_source_args(ap)  # --joint-map, --up, --unit, --allow-pickle (for --mocap-dir)
    args = ap.parse_args()
    lcfg = LifterConfig(clips=args.clips, steps=args.steps, hidden=args.hidden, window=args.window,
                        seed=args.seed)
    t0 = time.time()
    if args.command == "train":
        try:
            named = load_motions(args.mocap_dir, args.skip_refused, **mocap.source_kwargs(args))
        except (OSError, ValueError) as e:
            ap.exit(2, f"lifter.py train: {e}\n")
        net = train_lifter([m for _, m in named], lcfg, not args.no_progress)
        save_lifter(net, lcfg, args.out)
        print(f"lifter trained on {len(named)} motions in {time.time() - t0:.0f} s -> {args.out}")
    else:
        if args.unseen:
            res, rows, cases = unseen_validate(args.unseen, lcfg, clips_per_motion=args.unseen_clips,
                                               progress=not args.no_progress, return_poses=True,
                                               skip_refused=args.skip_refused,
                                               **mocap.source_kwargs(args))
        else:
            res, rows, cases = cross_validate(args.folds, lcfg, progress=not args.no_progress,
                                              return_poses=True)
        print_results(res, rows, fit3d.COLLAPSE_RESIDUAL)
        show = [c for c in cases if c[0] in args.plot_motions.split(",")] or cases[:3]
        print("poses:", plot_poses(args.plot, show))
        print(f"{time.time() - t0:.0f} s")
