"""
Motion capture in: the loaders of three formats (DeepMimic humanoid3d JSON, IsaacGymEnvs AMP arrays, BVH), quaternions,
forward kinematics onto the 17 Human3.6M joints, and resampling at any times (slerp, looping cycles without a seam).

A Motion holds local joint rotations on a fixed skeleton in a Y-up world (metres); sample_motion turns it into world
points at the requested times: the 17 Human3.6M joints, then both toes and a face point (those three only for
rendering). MOTIONS lists the MIT/BSD mocap shipped in assets/mocap/ (see assets/mocap/ATTRIBUTION.md) with the
action class and instructions of each; load_motion reads one of them. synth.py renders them into the demo dataset,
fit3d.py and lifter.py view them through random cameras.

References: DeepMimic (Peng et al. 2018, github.com/xbpeng/DeepMimic, data/motions + data/characters/humanoid3d.txt);
AMP (Peng et al. 2021) motions as shipped by NVIDIA-Omniverse/IsaacGymEnvs (assets/amp/motions, poselib
SkeletonMotion); BVH format (Biovision) with CMU Graphics Lab units; Human3.6M 17-joint order (mimic.md sec 4).

Command:
  python mocap.py --convert-amp SRC.npy DST.npz --allow-pickle   # one-off conversion of an AMP .npy (unpickles SRC!)
"""

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "mocap"
NUM_SITES = 20  # 17 Human3.6M joints, then 17 R toe, 18 L toe, 19 a face point (rendering only, not stored)

# -----------------------------------------------------------------------------
# quaternions, (w, x, y, z) order, vectorised over leading dimensions


def quat_mul(a, b):
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz,
                     aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw], -1)


def quat_conj(q):
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def quat_axis_angle(axis, angle):
    """Rotation by `angle` (radians, any shape) about a fixed unit `axis` (3,) -> (*angle.shape, 4)."""
    half = 0.5 * np.asarray(angle, dtype=np.float64)[..., None]
    return np.concatenate([np.cos(half), np.sin(half) * np.asarray(axis, dtype=np.float64)], -1)


def quat_to_mat(q):
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
                     np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
                     np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], -2)


def quat_slerp(q0, q1, w):
    """Shortest-path spherical interpolation; w broadcasts against q0[..., 0]."""
    w = np.asarray(w, dtype=np.float64)[..., None]
    d = np.sum(q0 * q1, -1, keepdims=True)
    q1 = np.where(d < 0, -q1, q1)  # q and -q are the same rotation: take the short way round
    d = np.abs(d).clip(0.0, 1.0)
    theta = np.arccos(d)
    s = np.sin(theta)
    small = s < 1e-6  # nearly equal: fall back to lerp, which is exact in the limit
    s = np.where(small, 1.0, s)
    a = np.where(small, 1.0 - w, np.sin((1.0 - w) * theta) / s)
    b = np.where(small, w, np.sin(w * theta) / s)
    q = a * q0 + b * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


# -----------------------------------------------------------------------------
# a motion = local joint rotations over time on a fixed skeleton, in a Y-up world (metres)


@dataclass
class Motion:
    name: str
    times: np.ndarray  # (N,) seconds of each source frame, increasing
    root_pos: np.ndarray  # (N, 3) world position of joint 0, Y up
    rot: np.ndarray  # (N, J, 4) joint 0: world rotation; others: rotation local to the parent joint
    parents: list  # (J,) parent index, -1 for the root; parents come before children
    offsets: np.ndarray  # (J, 3) joint origin in its parent's frame (metres)
    site_joint: np.ndarray  # (NUM_SITES,) joint each output point hangs from
    site_offset: np.ndarray  # (NUM_SITES, 3) the point in that joint's frame
    forward: np.ndarray  # (3,) the body's facing direction in the root frame (heading of loop cycles)
    loop: bool  # play as a cycle: the last frame is the first frame of the next cycle
    src_fps: float  # nominal frame rate of the source file
    src_index: np.ndarray = None  # (N,) index of each frame in the source file (None: 0..N-1)
    src_t0: float = 0.0  # source-file time of frame 0 (AMP loops are cut out of a longer recording)


def forward_kinematics(m, root_pos, rot):
    """(T, 3) root positions + (T, J, 4) rotations -> (T, NUM_SITES, 3) world points."""
    mats = quat_to_mat(rot)  # (T, J, 3, 3)
    world_r = [None] * len(m.parents)
    world_p = [None] * len(m.parents)
    for j, p in enumerate(m.parents):
        if p < 0:
            world_r[j], world_p[j] = mats[:, j], root_pos
        else:
            world_r[j] = world_r[p] @ mats[:, j]
            world_p[j] = world_p[p] + world_r[p] @ m.offsets[j]
    world_r, world_p = np.stack(world_r, 1), np.stack(world_p, 1)  # (T, J, 3, 3), (T, J, 3)
    r = world_r[:, m.site_joint]  # (T, S, 3, 3)
    return world_p[:, m.site_joint] + np.einsum("tsij,sj->tsi", r, m.site_offset)


def _heading(m, q):
    """Yaw about +Y of the body's facing direction (the angle psi of a rotation Ry(psi) taking +X onto it)."""
    f = quat_to_mat(q) @ m.forward
    return math.atan2(-f[2], f[0])


def _yaw_quat(psi):
    return quat_axis_angle([0.0, 1.0, 0.0], psi)


def sample_motion(m, t):
    """World points (T, NUM_SITES, 3) at times t (seconds, (T,)), plus the source frame index and time of each.

    Non-looping motions hold their first/last frame outside [0, duration]. A looping motion of period P plays cycle
    n = t // P displaced by D^n, D the horizontal rigid motion (yaw + translation) taking the root's heading and
    ground position at the first frame onto those at the last frame (how DeepMimic chains its 'wrap' cycles). The
    recorded cycles do not close exactly (up to ~90 deg at a shoulder of the roll clip), so the mismatch between the
    last frame and the displaced first frame is spread linearly over the cycle: a continuous loop without a seam.
    """
    t = np.asarray(t, dtype=np.float64)
    period = m.times[-1]
    n = np.floor(t / period).astype(np.int64) if m.loop else np.zeros(len(t), np.int64)
    tau = t - n * period if m.loop else np.clip(t, 0.0, period)
    k = np.clip(np.searchsorted(m.times, tau, side="right") - 1, 0, len(m.times) - 2)
    w = np.clip((tau - m.times[k]) / np.maximum(m.times[k + 1] - m.times[k], 1e-9), 0.0, 1.0)
    rot = quat_slerp(m.rot[k], m.rot[k + 1], w[:, None])  # (T, J, 4)
    pos = m.root_pos[k] + w[:, None] * (m.root_pos[k + 1] - m.root_pos[k])
    if m.loop:
        dpsi = _heading(m, m.rot[-1, 0]) - _heading(m, m.rot[0, 0])
        ry = quat_to_mat(_yaw_quat(dpsi))
        flat = np.array([1.0, 0.0, 1.0])
        shift = m.root_pos[-1] * flat - ry @ (m.root_pos[0] * flat)  # D(x) = ry @ x + shift
        # seam closure: the rotation/offset taking the last frame onto the displaced first frame, scaled by tau / P
        target = np.concatenate([quat_mul(_yaw_quat(dpsi), m.rot[0, 0])[None], m.rot[0, 1:]], 0)  # (J, 4)
        corr = quat_mul(target, quat_conj(m.rot[-1]))
        s = tau / period
        ident = np.broadcast_to(np.array([1.0, 0.0, 0.0, 0.0]), corr.shape)
        rot = quat_mul(quat_slerp(ident[None], corr[None], s[:, None]), rot)
        pos = pos + s[:, None] * (ry @ m.root_pos[0] + shift - m.root_pos[-1])
        # chain the cycles: D^n applied to the root (positions and world rotation)
        for c in np.unique(n):
            sel = n == c
            rc, tc = np.eye(3), np.zeros(3)
            for _ in range(int(c)):
                rc, tc = ry @ rc, ry @ tc + shift
            pos[sel] = pos[sel] @ rc.T + tc
            rot[sel, 0] = quat_mul(_yaw_quat(c * dpsi), rot[sel, 0])
    points = forward_kinematics(m, pos, rot)
    near = np.where(w < 0.5, k, k + 1)
    src_index = near if m.src_index is None else m.src_index[near]
    src_time = tau + m.src_t0
    return points, src_index, src_time


# -----------------------------------------------------------------------------
# loaders. Every skeleton maps onto the same NUM_SITES points (Human3.6M order, then toes and face):
# (joint name, offset in that joint's frame). Spine = the skeleton's mid-torso joint (it sits about midway between
# pelvis and thorax in all three); nose/head points sit on the neck's up axis, so the neck angle follows the head.

_DM_SITES = [("root", 0, 0, 0), ("right_hip", 0, 0, 0), ("right_knee", 0, 0, 0), ("right_ankle", 0, 0, 0),
             ("left_hip", 0, 0, 0), ("left_knee", 0, 0, 0), ("left_ankle", 0, 0, 0), ("chest", 0, 0, 0),
             ("neck", 0, 0, 0), ("neck", 0, 0.12, 0), ("neck", 0, 0.28, 0),
             ("left_shoulder", 0, 0, 0), ("left_elbow", 0, 0, 0), ("left_wrist", 0, 0, 0),
             ("right_shoulder", 0, 0, 0), ("right_elbow", 0, 0, 0), ("right_wrist", 0, 0, 0),
             ("right_ankle", 0.13, -0.045, 0), ("left_ankle", 0.13, -0.045, 0), ("neck", 0.09, 0.17, 0)]
# AMP is the same body with Z up and +Y left: DeepMimic (x, y, z) is AMP (x, -z, y); its bodies are renamed
_AMP_NAMES = {"root": "pelvis", "chest": "torso", "neck": "head", "right_hip": "right_thigh",
              "right_knee": "right_shin", "right_ankle": "right_foot", "left_hip": "left_thigh",
              "left_knee": "left_shin", "left_ankle": "left_foot", "right_shoulder": "right_upper_arm",
              "right_elbow": "right_lower_arm", "right_wrist": "right_hand", "left_shoulder": "left_upper_arm",
              "left_elbow": "left_lower_arm", "left_wrist": "left_hand"}
# CMU skeleton (file units, x0.056444 = metres; Y up, +Z forward, +X left). Thorax = the mid-shoulder point in the
# upper chest's frame; head = the top end site; Chest2 is the upper spine joint, ~0.23 m above the hips.
_CMU_SITES = [("Hips", 0, 0, 0), ("RightHip", 0, 0, 0), ("RightKnee", 0, 0, 0), ("RightAnkle", 0, 0, 0),
              ("LeftHip", 0, 0, 0), ("LeftKnee", 0, 0, 0), ("LeftAnkle", 0, 0, 0), ("Chest", 0, 0, 0),
              ("Chest2", 0.05, 0.83, -0.32), ("Head", 0, 0, 0), ("Head", 0.039, 1.69, -0.14),
              ("LeftShoulder", 0, 0, 0), ("LeftElbow", 0, 0, 0), ("LeftWrist", 0, 0, 0),
              ("RightShoulder", 0, 0, 0), ("RightElbow", 0, 0, 0), ("RightWrist", 0, 0, 0),
              ("RightToe", 0, 0, 1.11), ("LeftToe", 0, 0, 1.10), ("Head", 0, 0.8, 1.6)]
CMU_SCALE = 0.056444  # (1 / 0.45) * 2.54 / 100: CMU mocap units to metres


def _sites(names, spec, scale=1.0, axes=lambda v: v):
    idx = np.array([names.index(s[0]) for s in spec])
    off = np.array([axes(np.array(s[1:], dtype=np.float64)) for s in spec]) * scale
    return idx, off


def load_deepmimic(path, character=None):
    """DeepMimic humanoid3d motion JSON -> Motion. Frame = [dt, root pos (3), root quat, chest, neck, r hip,
    r knee (1), r ankle, r shoulder, r elbow (1), l hip, l knee (1), l ankle, l shoulder, l elbow (1)];
    quaternions (w, x, y, z); revolute joints turn about their local z axis; offsets from the character file."""
    path = Path(path)
    char = json.loads(Path(character or path.parent / "deepmimic_humanoid3d_character.json").read_text())
    joints = char["Skeleton"]["Joints"]
    names = [j["Name"] for j in joints]
    parents = [int(j["Parent"]) for j in joints]
    offsets = np.array([[j["AttachX"], j["AttachY"], j["AttachZ"]] for j in joints], dtype=np.float64)
    clip = json.loads(path.read_text())
    frames = np.asarray(clip["Frames"], dtype=np.float64)
    n = len(frames)
    rot = np.zeros((n, len(joints), 4))
    rot[..., 0] = 1.0  # fixed joints (wrists) stay at identity
    col = 4  # after dt and root position
    for j, jt in enumerate(joints):  # the frame lists joints in the skeleton's ID order
        kind = "root" if j == 0 else jt["Type"]
        if kind in ("root", "spherical"):
            rot[:, j] = frames[:, col:col + 4]
            col += 4
        elif kind == "revolute":
            rot[:, j] = quat_axis_angle([0.0, 0.0, 1.0], frames[:, col])
            col += 1
        elif kind != "fixed":
            raise ValueError(f"{path}: unknown joint type {kind!r} for {jt['Name']}")
    if col != frames.shape[1]:
        raise ValueError(f"{path}: frames have {frames.shape[1]} numbers, the skeleton needs {col}")
    rot /= np.linalg.norm(rot, axis=-1, keepdims=True)
    dt = frames[:, 0]
    times = np.concatenate([[0.0], np.cumsum(dt[:-1])])  # dt of a frame = time to the next one; the last is 0
    idx, off = _sites(names, _DM_SITES)
    return Motion(path.stem, times, frames[:, 1:4].copy(), rot, parents, offsets, idx, off,
                  np.array([1.0, 0.0, 0.0]), clip.get("Loop", "none") == "wrap",
                  float(round(1.0 / np.median(dt[:-1]))))


def convert_amp_npy(src, dst):
    """One-off: an IsaacGymEnvs AMP motion .npy (a pickled poselib SkeletonMotion dict) -> a plain .npz of arrays.
    This UNPICKLES `src` (arbitrary code execution for an untrusted file): only run it on files you trust. The
    converted .npz loads with allow_pickle=False, so nothing is unpickled at run time."""
    d = np.load(src, allow_pickle=True).item()
    st = d["skeleton_tree"]
    arrays = dict(rotation_xyzw=np.asarray(d["rotation"]["arr"], np.float32),
                  root_translation=np.asarray(d["root_translation"]["arr"], np.float32),
                  node_names=np.array(st["node_names"]),
                  parent_indices=np.asarray(st["parent_indices"]["arr"], np.int64),
                  local_translation=np.asarray(st["local_translation"]["arr"], np.float32),
                  fps=np.array(float(d["fps"])), is_local=np.array(bool(d["is_local"])))
    if not arrays["is_local"]:
        raise ValueError(f"{src}: expected local joint rotations (is_local=True)")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data.atomic_write_bytes(dst, buf.getvalue())


def find_loop(rot, times, min_dur, max_err_deg=12.0):
    """(start, end) frames of the longest span lasting >= min_dur seconds whose end pose matches its start pose
    (every non-root joint within max_err_deg); ties -> smallest mismatch. For recordings not cut as cycles."""
    q = rot[:, 1:]  # (N, J-1, 4) local rotations; the root is handled by the cycle transform
    dots = np.abs(np.einsum("ajk,bjk->abj", q, q)).clip(0.0, 1.0)
    err = np.degrees(2.0 * np.arccos(dots)).max(-1)  # (N, N) worst joint mismatch
    a, b = np.nonzero((err <= max_err_deg) & (times[None] - times[:, None] >= min_dur))
    if len(a) == 0:
        raise ValueError(f"no loop of >= {min_dur} s within {max_err_deg} deg")
    best = min(zip(a - b, err[a, b], a, b))  # longest (most negative a - b), then best matching
    return int(best[2]), int(best[3])


def load_amp(path, loop=True):
    """IsaacGymEnvs AMP motion (the converted .npz) -> Motion. Quaternions are (x, y, z, w), local to the parent,
    Z up: the root is turned into our Y-up world (Rx(-90 deg): z -> y, y -> -z). With loop=True the longest
    near-cyclic span (>= 0.75 s) is cut out and played as a loop; the recordings are not cut as cycles. The files
    hold 30 Hz captures at 60 fps, each pose twice: repeats are dropped so that interpolation moves smoothly."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    rot = a["rotation_xyzw"].astype(np.float64)[..., [3, 0, 1, 2]]  # (N, 15, 4) -> (w, x, y, z)
    rot /= np.linalg.norm(rot, axis=-1, keepdims=True)
    names = [str(s) for s in a["node_names"]]
    fps = float(a["fps"])
    zup_to_yup = quat_axis_angle([1.0, 0.0, 0.0], -math.pi / 2)
    rot[:, 0] = quat_mul(zup_to_yup, rot[:, 0])
    root_pos = a["root_translation"].astype(np.float64) @ quat_to_mat(zup_to_yup).T
    moved = (np.abs(np.diff(rot, axis=0)).max((1, 2)) > 1e-7) | (np.abs(np.diff(root_pos, axis=0)).max(1) > 1e-7)
    src = np.nonzero(np.concatenate([[True], moved]))[0]  # file frames that are not a repeat of the previous one
    rot, root_pos, times = rot[src], root_pos[src], src / fps
    start, end = find_loop(rot, times, 0.75) if loop else (0, len(rot) - 1)
    dm_to_amp = lambda v: np.array([v[0], -v[2], v[1]])
    idx, off = _sites(names, [(_AMP_NAMES[s[0]],) + tuple(s[1:]) for s in _DM_SITES], axes=dm_to_amp)
    span = slice(start, end + 1)
    return Motion(path.stem, times[span] - times[start], root_pos[span], rot[span],
                  a["parent_indices"].tolist(), a["local_translation"].astype(np.float64), idx, off,
                  np.array([1.0, 0.0, 0.0]), loop, fps, src[span], float(times[start]))


def load_bvh(path, scale=CMU_SCALE, sites=_CMU_SITES, forward=(0.0, 0.0, 1.0), loop=False):
    """BVH -> Motion. Euler angles in degrees applied in each joint's channel order (R = R_c1 R_c2 R_c3);
    position channels on the root only; offsets and root positions scaled to metres."""
    path = Path(path)
    tokens = path.read_text().split()
    names, parents, offsets, channels, stack = [], [], [], [], []
    i, end_site = 0, False
    while tokens[i] != "MOTION":
        tok = tokens[i]
        if tok in ("ROOT", "JOINT"):
            names.append(tokens[i + 1])
            parents.append(stack[-1] if stack else -1)
            i += 2
        elif tok == "End":  # "End Site": a leaf with an offset and no channels, not a joint
            end_site = True
            i += 2
        elif tok == "{":
            stack.append(-2 if end_site else len(names) - 1)
            end_site = False
            i += 1
        elif tok == "}":
            stack.pop()
            i += 1
        elif tok == "OFFSET":
            if stack[-1] != -2:
                offsets.append([float(v) for v in tokens[i + 1:i + 4]])
            i += 4
        elif tok == "CHANNELS":
            c = int(tokens[i + 1])
            channels.append(tokens[i + 2:i + 2 + c])
            i += 2 + c
        elif tok == "HIERARCHY":
            i += 1
        else:
            raise ValueError(f"{path}: unexpected token {tok!r} in HIERARCHY")
    n_frames = int(tokens[i + 2])
    frame_time = float(tokens[i + 5])  # MOTION Frames: N Frame Time: dt
    values = np.array(tokens[i + 6:], dtype=np.float64)
    n_ch = sum(len(c) for c in channels)
    if len(channels) != len(names) or values.size != n_frames * n_ch:
        raise ValueError(f"{path}: {values.size} motion values, expected {n_frames} frames x {n_ch} channels")
    values = values.reshape(n_frames, n_ch)
    rot = np.zeros((n_frames, len(names), 4))
    root_pos = np.zeros((n_frames, 3))
    col = 0
    for j, chans in enumerate(channels):
        q = np.broadcast_to(np.array([1.0, 0.0, 0.0, 0.0]), (n_frames, 4))
        for c in chans:
            axis = "XYZ".index(c[0])
            if c.endswith("position"):
                if j != 0:
                    raise ValueError(f"{path}: position channel on non-root joint {names[j]}")
                root_pos[:, axis] = values[:, col]
            else:  # intrinsic order as listed: R = R_c1 @ R_c2 @ R_c3
                q = quat_mul(q, quat_axis_angle(np.eye(3)[axis], np.radians(values[:, col])))
            col += 1
        rot[:, j] = q
    offsets = np.array(offsets) * scale
    root_pos = root_pos * scale + offsets[0]
    idx, off = _sites(names, sites, scale)
    return Motion(path.stem, np.arange(n_frames) * frame_time, root_pos, rot, parents, offsets, idx, off,
                  np.asarray(forward, dtype=np.float64), loop, float(round(1.0 / frame_time)))


# -----------------------------------------------------------------------------
# the motions of the demo: (key, file, action class, phrasings of the instruction). Texts never say left/right:
# the mocap does not document which side kicks or punches, and flip augmentation swaps those words anyway.

MOTIONS = [
    ("walk", "deepmimic_humanoid3d_walk.txt", "walk",
     ["Walk forward at a steady pace.", "Walk forward.", "Take a relaxed walk forward.", "Walk straight ahead."]),
    ("run", "deepmimic_humanoid3d_run.txt", "run",
     ["Run forward.", "Run forward at a fast pace.", "Sprint ahead.", "Break into a run."]),
    ("jog", "deepmimic_humanoid3d_jog.txt", "jog",
     ["Jog forward.", "Jog at an easy pace.", "Go for a light jog."]),
    ("zombie_walk", "deepmimic_humanoid3d_zombie_walk.txt", "zombie walk",
     ["Walk like a zombie.", "Shuffle forward like a zombie.", "Do a zombie walk."]),
    ("stealthy_walk", "deepmimic_humanoid3d_stealthy_walk.txt", "sneak",
     ["Sneak forward in a crouch.", "Walk stealthily, crouched low.", "Creep forward quietly."]),
    ("jump", "deepmimic_humanoid3d_jump.txt", "jump",
     ["Jump forward with both feet.", "Do a standing long jump.", "Jump forward."]),
    ("backflip", "deepmimic_humanoid3d_backflip.txt", "backflip",
     ["Do a backflip.", "Perform a back flip.", "Flip backwards."]),
    ("sideflip", "deepmimic_humanoid3d_sideflip.txt", "sideflip",
     ["Do a side flip.", "Perform a sideflip.", "Flip sideways."]),
    ("kick", "deepmimic_humanoid3d_kick.txt", "kick",
     ["Do a front kick.", "Kick forward.", "Throw a kick."]),
    ("spinkick", "deepmimic_humanoid3d_spinkick.txt", "spin kick",
     ["Do a spinning kick.", "Spin and kick.", "Perform a spin kick."]),
    ("punch", "deepmimic_humanoid3d_punch.txt", "punch",
     ["Throw punches.", "Punch forward.", "Throw a few punches."]),
    ("roll", "deepmimic_humanoid3d_roll.txt", "forward roll",
     ["Do a forward roll.", "Roll forward on the ground.", "Tuck and roll forward."]),
    ("crawl", "deepmimic_humanoid3d_crawl.txt", "crawl",
     ["Crawl forward on your hands and knees.", "Crawl forward.", "Crawl ahead on all fours."]),
    ("getup", "deepmimic_humanoid3d_getup_faceup.txt", "get up",
     ["Get up from lying on your back.", "Stand up from the floor.", "Get up off the ground."]),
    ("amp_walk", "isaac_amp_humanoid_walk.npz", "walk",
     ["Walk forward.", "Walk at a normal pace.", "Stroll forward."]),
    ("amp_run", "isaac_amp_humanoid_run.npz", "run",
     ["Run forward.", "Jog quickly forward.", "Run ahead."]),
    ("jumping_jacks", "ad_jumping_jacks.bvh", "jumping jacks",
     ["Do jumping jacks.", "Do jumping jacks with your arms overhead.", "Perform jumping jacks."]),
]

_MOTION_CACHE = {}


def load_motion(file):
    """Load (once per process) a shipped mocap file by name, with the loader its extension implies."""
    if file not in _MOTION_CACHE:
        path = ASSET_DIR / file
        if not path.exists():
            raise FileNotFoundError(f"{path}: shipped mocap missing (see assets/mocap/ATTRIBUTION.md)")
        loader = {".txt": load_deepmimic, ".npz": load_amp, ".bvh": load_bvh}[path.suffix]
        _MOTION_CACHE[file] = loader(path)
    return _MOTION_CACHE[file]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Motion capture tools (see module docstring).")
    ap.add_argument("--convert-amp", nargs=2, metavar=("SRC_NPY", "DST_NPZ"), required=True,
                    help="convert an AMP motion .npy")
    ap.add_argument("--allow-pickle", action="store_true", help="required by --convert-amp: it unpickles SRC_NPY")
    args = ap.parse_args()
    if not args.allow_pickle:
        sys.exit("--convert-amp unpickles its input (it can run code): pass --allow-pickle for a file you trust")
    convert_amp_npy(*args.convert_amp)
