"""
2D keypoints -> 3D pose and 22 joint angles by fitting a kinematic body to a whole clip
(no learned weights).

The body is the Human3.6M 17-joint tree (kinematics.H36M_PARENTS): per frame a pelvis position and
16 bone directions, per clip 10 bone lengths shared by left and right (symmetric by construction),
seen by a pinhole camera (focal f, principal point at the image centre) in the camera frame of
docs/conventions.md (x right, y DOWN, z forward). Adam minimises, over the clip:
  - the confidence-weighted reprojection error of the 17 joints, in units of the person's 2D size;
  - temporal smoothness: the acceleration of the root-relative joints and of the root (metres);
  - priors: bone lengths near kinematics.DEFAULT_BONE_LENGTHS (which also fixes the monocular
    scale, so depth is metric); hips and shoulders opposite each other and perpendicular to the
    spine (a rigid-ish torso); knees bending backwards and elbows not bending behind the body;
    gravity: the torso near the world's up as seen by a camera without roll at a free per-clip
    elevation (prior 10 +- 15 deg looking down): the depth sign of an upright torso's lean.
Four hypotheses of the body's facing (yaws) are fitted at once as a batch and the lowest loss wins.
Optionally (flip_steps > 0) a depth-flip search (each limb, the hip/shoulder axis, the spine, the
whole body mirrored in depth, refined together as one batch; every flip that lowers the loss is
kept) tries the mirror minima of a monocular view that gradient descent cannot cross; it gains
little for 3x the time, so it is off by default. Each hypothesis returns its lowest iterate, so a
refine (init=) never ends above its start by its own objective. Angles are then
kinematics.pose3d_to_angles(pose3d), so clips satisfy angles == IK(pose3d). objective() evaluates
the same terms at any pose; its residual (a typical frame's relative 2D error) is the pipeline's
FIT_COLLAPSE check.

What the fit gets wrong is mostly which mirror-ambiguous minimum it lands in, and the depth lean of
near-vertical bones; more yaws, random limb mirrors, other starts, other weights and more priors did
not help. A learned prior knows them: lifter.py's temporal MLP, refined here with init= and w_init
(which keeps its depths). README has the benchmark (`python fit3d.py`).

Why bone directions and not the 22 angles as the free variables: the angle convention measures
spine, hips and neck against +-up, which is anti-parallel to those bones in an upright person; there
the minimal rotation is undefined and a 1 mm change of a joint flips the Euler angles by ~pi, so
gradient descent on the angles themselves would stall exactly on the most common pose.
kinematics.angles_to_pose3d (FK) turns angles back into joints; the fitted pose satisfies
FK(IK(pose), template=pose) == pose.

Lifter interface (FitLifter here, lifter.LearnedLifter, or your own): `lifter(kp2d (T, 17, 2) H36M
pixels, scores (T, 17), width, height) -> pose3d (T, 17, 3)` camera frame, metres; optionally
`lifter.lift(...) -> (pose3d, info)`, whose focal / loss / loss_init / kept the pipeline records.

Command: python fit3d.py [--seeds 4]   # mocap seen by random cameras: angle errors, FIT_COLLAPSE
"""

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import kinematics

PARENTS = kinematics.H36M_PARENTS
# bone j (child joint j = 1..16) -> one of 10 shared lengths: hip, thigh, shin, spine, thorax, neck,
# head, shoulder, upper arm, forearm (left and right share one, so the fitted body is symmetric)
LENGTH_OF_BONE = [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 8, 9]
REF_LENGTHS = [kinematics.DEFAULT_BONE_LENGTHS[n] for n in ("r_hip", "r_knee", "r_ankle", "spine",
                                                            "thorax", "neck",
                                                       "head", "l_shoulder", "l_elbow", "l_wrist")]
# bone groups tried mirrored in depth (indices into the 16 bones = joint - 1): shins,
# forearms, legs, arms, the hip/shoulder axis (facing yaw -> 180 - yaw), the spine and head
# lean, and the whole body
_FLIP_GROUPS = [[2], [5], [12], [15], [1, 2], [4, 5], [11, 12], [14, 15], [0, 3, 10, 13],
                [6, 7, 8, 9], list(range(16))]
# rest pose facing the camera (body left = +x, body up = -y, forward = -z): unit bone
# directions of joints 1..16, knees slightly bent backwards (+z) and elbows forwards (-z) so
# the bend sides start right
_REST_DIRS = [(-1, 0, 0), (0, 1, 0.1), (0, 1, 0.1), (1, 0, 0), (0, 1, 0.1), (0, 1, 0.1),
              (0, -1, 0), (0, -1, 0), (0, -1, 0), (0, -1, 0), (1, 0, 0), (0, 1, 0), (0, 1, -0.1),
              (-1, 0, 0), (0, 1, 0), (0, 1, -0.1)]


@dataclass
class FitConfig:
    steps: int = 300              # Adam steps
    lr: float = 0.03              # cosine-decayed to lr / 10
    yaws: tuple = (0.0, 90.0, 180.0, 270.0)  # facing hypotheses (degrees about the vertical)
    focal_scale: float = 1.15     # focal = focal_scale * max(width, height) if not given (~47 deg)
    w_smooth: float = 0.3         # acceleration of root-relative joints (per metre^2)
    w_root_smooth: float = 0.1    # acceleration of the root
    w_length: float = 1.0         # (log L - log L_ref)^2
    w_torso: float = 0.3          # hips/shoulders opposite and perpendicular to the spine
    w_knee: float = 10.0          # knees bend backwards (with the torso: a profile's facing)
    w_elbow: float = 3.0          # elbows do not bend the forearm behind the body
    min_conf: float = 0.05        # keypoints below this confidence are ignored
    flip_steps: int = 0           # > 0: depth-flip search of this many steps (small gain, 3x cost)
    w_up: float = 0.005           # gravity prior: (1 - cos) of the torso (pelvis -> thorax) to up g
    elevation: float = 10.0       # camera elevation prior, degrees looking down: its mean ...
    elevation_sd: float = 15.0    # ... and spread (free per clip); no roll, so g = (0, -cos, -sin)
    w_init: float = 0.0           # init=: (1 - cos) of each bone to the init's (a lifter's depths)


def bone_chain(dirs, lengths, root):
    """dirs (..., T, 16, 3) unit, lengths (..., 16), root (..., T, 3) -> joints (..., T, 17, 3)
    (parents first)."""
    bones = dirs * lengths[..., None, :, None]
    joints = [root]
    for j in range(1, 17):
        joints.append(joints[PARENTS[j]] + bones[..., j - 1, :])
    return torch.stack(joints, -2)


def _rest_directions(yaw_deg):
    d = torch.tensor(_REST_DIRS, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    # about the camera's vertical axis
    ry = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
    return d @ ry.T


def _accel(x):
    if x.shape[-3] <= 2:
        return x[..., :0, :, :]
    return x[..., 2:, :, :] - 2 * x[..., 1:-1, :, :] + x[..., :-2, :, :]


def _root_guess(kp, valid, f, centre):
    """kp (T, 17, 2) float64 tensor, valid (T, 17) bool -> (T, 3) camera-frame root: the pelvis
    (else the mean confident joint) back-projected at the depth where the reference bone lengths
    match the 2D bone lengths; frames without joints take the nearest frame's values."""
    T = kp.shape[0]
    ref = torch.tensor(REF_LENGTHS, dtype=torch.float64)[LENGTH_OF_BONE]  # (16,)
    child, parent = torch.arange(1, 17), torch.tensor(PARENTS[1:])
    bl2d = (kp[:, child] - kp[:, parent]).norm(dim=-1)  # (T, 16)
    bvalid = (valid[:, child] & valid[:, parent]).double()
    px_per_m = (bl2d * bvalid).sum(1) / (ref * bvalid).sum(1).clamp(min=1e-9)
    has = bvalid.sum(1) >= 3
    mean2d = (kp * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
    centre2d = torch.where(valid[:, 0:1], kp[:, 0], mean2d)
    has_c = valid.any(1)
    t_idx = np.arange(T)
    z0 = np.full(T, 4.0)
    if has.any():
        z0 = np.interp(t_idx, t_idx[has.numpy()], (f / px_per_m[has].clamp(min=1e-6)).numpy())
    uv0 = np.zeros((T, 2)) + centre.numpy()
    if has_c.any():
        uv0 = np.stack([np.interp(t_idx, t_idx[has_c.numpy()], centre2d[has_c, c].numpy())
                        for c in range(2)], 1)
    z0 = torch.as_tensor(np.clip(z0, 0.3, 1e3))
    return torch.cat([(torch.as_tensor(uv0) - centre) / f * z0[:, None], z0[:, None]], 1)


def clean_keypoints(kp2d, scores, min_conf=0.05):
    """-> kp (T, 17, 2) float64 tensor with NaNs zeroed, conf (T, 17) with missing, non-finite and
    low joints at 0."""
    kp = torch.as_tensor(np.asarray(kp2d, np.float64))
    conf = torch.as_tensor(np.asarray(scores, np.float64))
    if kp.ndim != 3 or kp.shape[1:] != (17, 2) or conf.shape != kp.shape[:2]:
        raise ValueError(f"kp2d must be (T, 17, 2) and scores (T, 17), got {tuple(kp.shape)} and "
                         f"{tuple(conf.shape)}")
    conf = torch.where(torch.isfinite(kp).all(-1) & (conf >= min_conf), conf,
                       torch.zeros_like(conf))
    return torch.nan_to_num(kp), conf


def root_guess(kp2d, scores, width, height, focal, min_conf=0.05):
    """(T, 17, 2) H36M pixels, (T, 17) scores -> (T, 3) camera-frame pelvis guess in metres
    (see _root_guess)."""
    kp, conf = clean_keypoints(kp2d, scores, min_conf)
    return _root_guess(kp, conf > 0, float(focal), torch.tensor([width / 2.0, height / 2.0],
                                                                dtype=torch.float64)).numpy()


class _Clip:
    """A clip's fit objective: its 2D, confidences and camera; `losses(dirs, ab, logz, loglen, el)`
    evaluates a batch of H hypotheses (bone directions (H, T, 16, 3), root x/z and y/z (H, T, 2),
    log depth (H, T), log of the 10 shared bone lengths (H, 10), camera elevation (H,)) -> total
    (H,), joints (H, T, 17, 3), {term: (H,)}."""

    def __init__(self, kp2d, scores, width, height, focal, cfg, anchor=None):
        self.cfg = cfg
        self.kp, self.conf = clean_keypoints(kp2d, scores, cfg.min_conf)
        self.T = self.kp.shape[0]
        self.f = float(focal) if focal else cfg.focal_scale * max(width, height)
        self.centre = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)
        # per-frame 2D size (diagonal of the confident joints), the unit of the reprojection error
        kp, valid = self.kp, self.conf > 0
        big = torch.where(valid[..., None], kp, torch.full_like(kp, float("inf")))
        small = torch.where(valid[..., None], kp, torch.full_like(kp, float("-inf")))
        diag = (small.amax(1) - big.amin(1)).norm(dim=-1)
        diag = torch.where(valid.sum(1) >= 2, diag, torch.full_like(diag, float("nan")))
        med = (float(np.nanmedian(diag.numpy())) if torch.isfinite(diag).any()
               else 0.25 * max(width, height))
        self.scale2d = torch.nan_to_num(diag, nan=med).clamp(min=0.2 * med, max=5 * med).clamp(min=1.0)  # (T,)
        self.w = self.conf / self.conf.sum().clamp(min=1e-9)  # reprojection weights: sum 1 per clip
        self.ref_log = torch.log(torch.tensor(REF_LENGTHS, dtype=torch.float64))
        self.el_mean, self.el_sd = math.radians(cfg.elevation), math.radians(cfg.elevation_sd)
        self.anchor = anchor  # (T, 16, 3) unit: a lifter's directions (init=), kept with w_init

    def params_of_pose(self, pose):
        """(T, 17, 3) camera-frame joints -> the parameters (H = 1) that rebuild it: its bone
        directions and root, its bone lengths averaged over frames and left/right (exact for bodies
        built by the fit or a lifter on reference lengths), the elevation prior's mean."""
        p = torch.as_tensor(np.asarray(pose, np.float64))
        if p.shape != (self.T, 17, 3):
            raise ValueError(f"pose must be (T, 17, 3) = {(self.T, 17, 3)}, got {tuple(p.shape)}")
        bones = p[:, 1:] - p[:, list(PARENTS[1:])]
        dirs = bones / bones.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        per_bone = bones.norm(dim=-1).mean(0)  # (16,)
        idx = torch.tensor(LENGTH_OF_BONE)
        loglen = torch.log(torch.zeros(10, dtype=torch.float64).index_add(0, idx, per_bone)
                           / torch.bincount(idx, minlength=10).double()).clamp(min=-5.0)
        z = p[:, 0, 2].clamp(min=0.3)
        return [dirs[None], (p[:, 0, :2] / z[:, None])[None], z.log()[None], loglen[None],
                torch.full((1,), self.el_mean, dtype=torch.float64)]

    def losses(self, dirs, ab, logz, loglen, el):
        cfg, T, kp, f, centre = self.cfg, self.T, self.kp, self.f, self.centre
        Hn = dirs.shape[0]
        u = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        z = logz.exp()
        root = torch.cat([ab * z[..., None], z[..., None]], -1)                               # (H, T, 3)
        P = bone_chain(u, loglen.exp()[..., LENGTH_OF_BONE], root)                            # (H, T, 17, 3)
        proj = f * P[..., :2] / P[..., 2:3].clamp(min=1e-3) + centre
        err = ((proj - kp).norm(dim=-1) / self.scale2d[:, None]) ** 2                          # (H, T, 17)
        reproj = (err * self.w).sum((1, 2))
        # per frame: the confidence-weighted mean squared error (objective()'s residual)
        frame_reproj = (err * self.conf).sum(-1) / self.conf.sum(-1).clamp(min=1e-9)           # (H, T)
        rel = P - P[..., :1, :]
        if T > 2:
            smooth = _accel(rel).pow(2).sum(-1).mean((1, 2))
            rsmooth = _accel(root[..., None, :]).pow(2).sum(-1).mean((1, 2))
        else:
            smooth = torch.zeros(Hn, dtype=torch.float64)
            rsmooth = torch.zeros_like(smooth)
        length = (loglen - self.ref_log).pow(2).sum(-1)
        spine = u[..., 6, :] + u[..., 7, :]  # pelvis->spine->thorax
        spine = spine / spine.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        hip_r, hip_l, sh_l, sh_r = u[..., 0, :], u[..., 3, :], u[..., 10, :], u[..., 13, :]
        torso_t = ((1 + (hip_r * hip_l).sum(-1)) ** 2 + (1 + (sh_l * sh_r).sum(-1)) ** 2
                   + (hip_l * spine).sum(-1) ** 2 + (sh_l * spine).sum(-1) ** 2 + (sh_r * spine).sum(-1) ** 2
                   + (hip_r * spine).sum(-1) ** 2)                                              # (H, T)
        # body forward: left x up (the camera frame is right-handed)
        fwd = torch.cross(hip_l - hip_r, spine, dim=-1)
        fwd = fwd / fwd.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        knee_t = elbow_t = 0
        for th, sh in ((1, 2), (4, 5)):
            thigh, shin = u[..., th, :], u[..., sh, :]
            bend = shin - (shin * thigh).sum(-1, keepdim=True) * thigh
            knee_t = knee_t + torch.relu((bend * fwd).sum(-1)).pow(2)
        for ua, fa in ((11, 12), (14, 15)):  # elbows rarely bend the forearm behind the body
            upper, fore = u[..., ua, :], u[..., fa, :]
            bend = fore - (fore * upper).sum(-1, keepdim=True) * upper
            elbow_t = elbow_t + torch.relu(-(bend * fwd).sum(-1)).pow(2)
        torso, knee, elbow = torso_t.mean(-1), knee_t.mean(-1), elbow_t.mean(-1)
        # gravity: a camera without roll at elevation el sees the world's up as g (camera frame, y
        # down). Most people are upright, so the torso leans towards g; this picks the depth sign of
        # the torso's lean, which the upright-singular spine angles are most sensitive to (a prior
        # at el = 0 gives no gain: the tilt is the cue)
        g = torch.stack([torch.zeros_like(el), -torch.cos(el), -torch.sin(el)], -1)                 # (H, 3)
        up = (1 - (spine * g[:, None]).sum(-1)).mean(-1) + ((el - self.el_mean) / self.el_sd) ** 2 / T
        # a learned lifter's directions (init=): their depths are what the fit cannot see
        to_init = ((1 - (u * self.anchor).sum(-1)).mean((-1, -2)) if self.anchor is not None and cfg.w_init
                   else torch.zeros_like(reproj))
        total = (reproj + cfg.w_init * to_init + cfg.w_smooth * smooth + cfg.w_root_smooth * rsmooth
                 + cfg.w_length * length + cfg.w_torso * torso + cfg.w_knee * knee + cfg.w_elbow * elbow
                 + cfg.w_up * up)
        return total, P, {"reproj": reproj, "smooth": smooth, "length": length, "torso": torso,
                          "knee": knee, "elbow": elbow, "up": up, "init": to_init,
                          "frame": frame_reproj}

    def optimize(self, params, steps, keep_best=True):
        """Adam on each hypothesis -> (its best iterate's params, total, joints, terms, the start's
        total). The best, not the last: a refine never ends above where it started, by its own
        objective (keep_best=False: the last, for the flip search, whose candidates are compared
        after the same restart)."""
        params = [p.detach().clone().requires_grad_(True) for p in params]
        best = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
        best_total = start = None
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            total = self.losses(*params)[0]
            with torch.no_grad():  # keep each hypothesis' lowest iterate so far (no host sync)
                if best_total is None:
                    best_total = start = total.detach().clone()
                better = (total < best_total if keep_best
                          else torch.ones_like(total, dtype=torch.bool))
                best_total = torch.where(better, total, best_total)
                for b, p in zip(best, params):
                    b.copy_(torch.where(better.view(-1, *[1] * (p.ndim - 1)), p, b))
            if step == steps:
                break
            total.sum().backward()  # hypotheses are independent: one backward for all
            opt.step()
            sched.step()
        with torch.no_grad():
            return best, *self.losses(*best), start


# objective()'s residual above which a fit counts as collapsed (the pipeline's FIT_COLLAPSE check):
# a typical frame misses the 2D by more than 5% of the body. Calibrated on this file's mocap
# benchmark (README: collapsed fits).
COLLAPSE_RESIDUAL = 0.05


def objective(pose3d, kp2d, scores, width, height, focal=None, cfg=None):
    """The fit's terms at a given (T, 17, 3) camera-frame pose (rebuilt as _Clip.params_of_pose
    says, at the elevation prior's mean) -> {"total", "reproj", "length", "torso", ..., "residual"}
    floats. residual: the square root of the median over frames (those with a confident joint) of
    the frame's confidence-weighted mean squared reprojection error in units of the person's 2D
    size: how far off a typical frame's joints are, relative to the body. A fit that collapsed into
    a wrong body cannot match the 2D (pipeline's FIT_COLLAPSE check). The priors are left out of it:
    real bodies break them (a mocap truth scores torso 0.03-0.08, length 0.24 here), and on the
    benchmark they did not tell collapsed fits from good ones. Any lifter's output can be scored,
    not only the fit's."""
    clip = _Clip(kp2d, scores, width, height, focal, cfg or FitConfig())
    with torch.no_grad():
        total, _, parts = clip.losses(*clip.params_of_pose(pose3d))
    frame = parts.pop("frame")[0][clip.conf.sum(-1) > 0]
    residual = math.sqrt(float(frame.median())) if len(frame) else 0.0
    return {"total": float(total[0]), **{k: float(v[0]) for k, v in parts.items()},
            "residual": residual}


def fit_clip(kp2d, scores, width, height, focal=None, cfg=None, return_info=False, init=None):
    """Fit one clip. kp2d (T, 17, 2) Human3.6M pixels, scores (T, 17) confidences (0 = missing) ->
    pose3d (T, 17, 3) float64 numpy in the camera frame (metres); with return_info also a dict
    (losses, chosen yaw, focal, and for init= the objective at the init and which of init / refined
    was kept). init: optional (T, 17, 3) camera-frame pose (e.g. a learned lifter's) to start from
    instead of the facing hypotheses: the fit then refines it, starting from its directions, root
    and (clip-mean, left/right-shared) bone lengths, and never returns a pose with a higher
    objective than that start."""
    cfg = cfg or FitConfig()
    anchor = None
    if init is not None:
        p0 = np.asarray(init, np.float64)
        if p0.ndim != 3 or p0.shape[1:] != (17, 3) or len(p0) != len(np.asarray(kp2d)):
            raise ValueError(f"init must be (T, 17, 3) with T = {len(np.asarray(kp2d))}, "
                             f"got {p0.shape}")
        b = torch.as_tensor(p0[:, 1:] - p0[:, list(PARENTS[1:])])
        anchor = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-9)  # (T, 16, 3) unit
    clip = _Clip(kp2d, scores, width, height, focal, cfg, anchor)
    T, f = clip.T, clip.f
    if init is None:
        H = len(cfg.yaws)
        root0 = _root_guess(clip.kp, clip.conf > 0, f, clip.centre)
        z0, ab0 = root0[:, 2], root0[:, :2] / root0[:, 2:]  # depth, and x/z and y/z of the root
        # (H, T, 16, 3)
        dirs = torch.stack([_rest_directions(y) for y in cfg.yaws])[:, None].repeat(1, T, 1, 1)
        params = [dirs, ab0[None].repeat(H, 1, 1), z0.log()[None].repeat(H, 1),
                  clip.ref_log[None].repeat(H, 1),
                  torch.full((H,), clip.el_mean, dtype=torch.float64)]
    else:
        params = clip.params_of_pose(p0)
    params, total, P, parts, start = clip.optimize(params, cfg.steps)
    best = int(torch.argmin(total))
    start = float(start[best])
    params = [p[best:best + 1] for p in params]
    yaw = float(cfg.yaws[best]) if init is None else None
    if cfg.flip_steps and init is None:
        # depth flips: a limb bent towards the camera projects like one bent away, and gradient
        # descent cannot cross between the two. Try each limb mirrored in depth about its root joint
        # (all frames), refine all candidates together, and keep every flip that lowers the loss on
        # its own; then refine the combination.
        cand = [params[0]]
        for bones in _FLIP_GROUPS:
            d = params[0].clone()
            d[..., bones, 2] *= -1
            cand.append(d)
        trial = [torch.cat(cand)] + [p.repeat(len(cand), *[1] * (p.ndim - 1)) for p in params[1:]]
        _, t_total, _, _, _ = clip.optimize(trial, cfg.flip_steps, keep_best=False)
        keep = [g for k, g in enumerate(_FLIP_GROUPS) if t_total[k + 1] < t_total[0]]
        if keep:
            d = params[0].clone()
            for bones in keep:
                d[..., bones, 2] *= -1
            params = [d] + params[1:]
        params, total, P, parts, _ = clip.optimize(params, cfg.flip_steps)
        best = 0
    pose = P[best].numpy()
    if not return_info:
        return pose
    conf, kp, centre = clip.conf, clip.kp, clip.centre
    info = {"loss": float(total[best]), "yaw": yaw, "focal": f,
            "elevation_deg": math.degrees(float(params[4][0])),
            "losses": {k: float(v[best]) for k, v in parts.items() if k != "frame"},
            "reproj_px": float(((f * P[best, ..., :2] / P[best, ..., 2:3] + centre - kp).norm(dim=-1)
                                 * (conf > 0)).sum() / (conf > 0).sum().clamp(min=1))}
    if init is not None:  # the objective at the init (the refine's start) and which one is returned
        info.update(loss_init=start, kept="init" if not float(total[best]) < start else "refined")
    return pose, info


class FitLifter:
    """The default lifter: fit_clip with a FitConfig (no weights)."""

    def __init__(self, cfg=None, focal=None):
        self.cfg, self.focal = cfg or FitConfig(), focal

    def __call__(self, kp2d, scores, width, height):
        return self.lift(kp2d, scores, width, height)[0]

    def lift(self, kp2d, scores, width, height):
        """-> (pose3d (T, 17, 3), info): the pipeline records its focal, loss and (refines) kept."""
        return fit_clip(kp2d, scores, width, height, self.focal, self.cfg, return_info=True)

    def __repr__(self):  # recorded in the pipeline's status records
        return (f"FitLifter(steps={self.cfg.steps}, flip_steps={self.cfg.flip_steps}, "
                f"focal={self.focal})")


# --------------------------------------------------------------------------------------------------
# Evaluation on motion capture: mocap.py's motions seen by synth.py's random cameras, 2D noise and
# dropped joints


def wrapped_diff(a, b):
    return (np.asarray(a) - np.asarray(b) + np.pi) % (2 * np.pi) - np.pi


def view_mocap(rng, m, frames=40, noise_px=2.0, drop=0.1, randomize=False, length_jitter=0.0):
    """One random window of a mocap.Motion seen by its own synth.random_camera at 10 Hz -> (kp2d
    noisy (T, 17, 2), scores (T, 17), pose3d (T, 17, 3) camera frame, camera). `drop` of the joints
    get score 0 and random positions, the rest Gaussian noise of noise_px pixels; randomize=True
    draws the noise sigma from U(0, noise_px) and the drop rate from U(0, drop) per clip instead
    (lifter.py's training data); length_jitter scales each (left/right shared) bone length by
    U(1 -+ jitter)."""
    import mocap
    import synth
    t = rng.uniform(0, max(m.times[-1] - frames / 10, 0.0)) + np.arange(frames) / 10.0
    pts, _, _ = mocap.sample_motion(m, t)
    pts[..., 1] -= pts[..., 1].min() - 0.03
    cam = synth.random_camera(rng, pts)
    pc = synth.world_to_camera(cam, pts)[:, :17]
    if length_jitter:  # other body proportions
        scale = rng.uniform(1 - length_jitter, 1 + length_jitter, 10)[LENGTH_OF_BONE]
        bones = (pc[:, 1:] - pc[:, list(PARENTS[1:])]) * scale[:, None]
        pc = bone_chain(torch.from_numpy(bones), torch.ones(16, dtype=torch.float64),
                         torch.from_numpy(pc[:, 0])).numpy()
    uv = synth.project(cam, pc)
    kp = uv + rng.normal(0, rng.uniform(0, noise_px) if randomize else noise_px, uv.shape)
    sc = np.full(uv.shape[:2], 0.9)
    dropped = rng.random(sc.shape) < (rng.uniform(0, drop) if randomize else drop)
    sc[dropped] = 0.0
    kp[dropped] = rng.uniform(0, cam.width, (int(dropped.sum()), 2))
    return kp, sc, pc, cam


def mocap_cases(n_clips=6, seed=0, frames=40, noise_px=2.0, drop=0.1):
    """Yields (name, kp2d noisy (T, 17, 2), scores (T, 17), gt pose3d (T, 17, 3), focal, width,
    height): view_mocap of the shipped mocap (mocap.MOTIONS, spread over the list), the benchmark of
    this file and of lifter.py."""
    import mocap
    rng = np.random.default_rng(seed)
    for i in range(n_clips):
        key, file, _, _ = mocap.MOTIONS[(i * 5) % len(mocap.MOTIONS)]  # spread over the motion list
        kp, sc, pc, cam = view_mocap(rng, mocap.load_motion(file), frames, noise_px, drop)
        yield key, kp, sc, pc, cam.focal, cam.width, cam.height


def pose_errors(pairs):
    """[(pose (T, 17, 3), ground truth (T, 17, 3)), ...] -> angle RMSE (degrees, wrapped)
    of IK(pose) vs IK(truth), overall and per joint group, and the mean bone direction
    error (degrees)."""
    diffs, dir_err = [], []
    for pose, gt in pairs:
        diffs.append(wrapped_diff(kinematics.pose3d_to_angles(pose),
                                  kinematics.pose3d_to_angles(gt)))
        b_fit = pose[:, 1:] - pose[:, list(PARENTS[1:])]
        b_gt = gt[:, 1:] - gt[:, list(PARENTS[1:])]
        norms = np.linalg.norm(b_fit, axis=-1) * np.linalg.norm(b_gt, axis=-1)
        cos = (b_fit * b_gt).sum(-1) / norms
        dir_err.append(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())
    d = np.concatenate(diffs)  # (N, 22)
    out = {"rmse_deg": float(np.degrees(np.sqrt((d ** 2).mean()))),
           "bone_dir_err_deg": float(np.mean(dir_err))}
    for g, idx in kinematics.JOINT_GROUPS.items():
        out[f"rmse_{g}_deg"] = float(np.degrees(np.sqrt((d[:, idx] ** 2).mean())))
    return out


def evaluate(n_clips=6, seed=0, frames=40, noise_px=2.0, drop=0.1, cfg=None, focal_error=1.0):
    """pose_errors of fit_clip over mocap_cases."""
    cases = mocap_cases(n_clips, seed, frames, noise_px, drop)
    return pose_errors([(fit_clip(kp, sc, W, H, focal * focal_error, cfg), gt)
                        for _, kp, sc, gt, focal, W, H in cases])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Evaluate the 2D->3D fitter on projected mocap.")
    ap.add_argument("--clips", type=int, default=17)
    ap.add_argument("--seeds", type=int, default=1,
                    help="repeat the benchmark with seeds 0..N-1 (other windows, "
                    "cameras and noise)")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--noise-px", type=float, default=2.0)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--focal-error", type=float, default=1.0,
                    help="multiply the true focal by this for the fit")
    ap.add_argument("--steps", type=int, default=FitConfig.steps)
    args = ap.parse_args()
    limit = COLLAPSE_RESIDUAL
    t0 = time.time()
    pairs, flags = [], []
    for seed in range(args.seeds):
        for _, kp, sc, gt, focal, W, H in mocap_cases(args.clips, seed, args.frames, args.noise_px,
                                                      args.drop):
            pose = fit_clip(kp, sc, W, H, focal * args.focal_error, FitConfig(steps=args.steps))
            pairs.append((pose, gt))
            residual = objective(pose, kp, sc, W, H, focal * args.focal_error)["residual"]
            flags.append((pose_errors([(pose, gt)])["bone_dir_err_deg"] > 40, residual > limit))
    print({k: round(v, 2) for k, v in pose_errors(pairs).items()}, f"{time.time() - t0:.1f} s")
    bad = sum(b for b, _ in flags)
    hit, false = sum(b and f for b, f in flags), sum(f and not b for b, f in flags)
    print(f"FIT_COLLAPSE (residual > {limit}) flags {hit} of the {bad} clips whose bone direction "
          f"error is > 40 deg, {false} of the other {len(flags) - bad}")
