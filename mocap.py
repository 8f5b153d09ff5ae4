"""
Motion capture in: loaders of three formats (DeepMimic humanoid3d JSON, IsaacGymEnvs AMP arrays, BVH
of any common rig through bvh.py), quaternions, forward kinematics onto the 17 Human3.6M joints, and
resampling at any times (slerp, looping cycles without a seam).

A Motion holds local joint rotations on a fixed skeleton in a Y-up world (metres); sample_motion
turns it into world points at the requested times: the 17 Human3.6M joints (the pelvis always the
hips' midpoint, as in Human3.6M), then both toes and a face point (those three only for rendering).
MOTIONS lists the MIT/BSD mocap shipped in assets/mocap/ (see assets/mocap/ATTRIBUTION.md) with the
action class and instructions of each; load_motion reads one of them. load_dir reads a folder of the
user's mocap, saying for each file how it was read or why it was refused. synth.py renders motions
into the demo dataset, fit3d.py and lifter.py view them through random cameras.

References: DeepMimic (Peng et al. 2018, github.com/xbpeng/DeepMimic, data/motions +
data/characters/humanoid3d.txt); AMP (Peng et al. 2021) motions as shipped by
NVIDIA-Omniverse/IsaacGymEnvs (assets/amp/motions, poselib SkeletonMotion); BVH format (Biovision);
Human3.6M 17-joint order (kinematics.H36M_JOINT_NAMES).

Commands:
  python mocap.py --inspect DIR_OR_FILES [--joint-map map.json] [--up z] [--unit cm] [--allow-pickle]
  python mocap.py --convert-amp SRC.npy DST.npz --allow-pickle   # one-off conversion of an AMP .npy (unpickles SRC!)
"""

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import bvh
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
    """Rotation by `angle` (radians, any shape) about a fixed unit `axis` (3,) ->
    (*angle.shape, 4)."""
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
    site_joint: np.ndarray  # (NUM_SITES - 1,) joint each output point but the pelvis hangs from
    site_offset: np.ndarray  # (NUM_SITES - 1, 3) the point in that joint's frame
    forward: np.ndarray  # (3,) the body's facing direction in the root frame (heading of loop cycles)
    loop: bool  # play as a cycle: the last frame is the first frame of the next cycle
    src_fps: float  # nominal frame rate of the source file
    src_index: np.ndarray = None  # (N,) index of each frame in the source file (None: 0..N-1)
    src_t0: float = 0.0  # source-file time of frame 0 (AMP loops are cut out of a longer recording)
    info: dict = field(default_factory=dict)  # how the file was read: format, up axis, unit, joints used


def joint_transforms(parents, offsets, root_pos, rot):
    """(T, 3) root positions + (T, J, 4) rotations -> world rotations (T, J, 3, 3) and
    origins (T, J, 3)."""
    mats = quat_to_mat(rot)  # (T, J, 3, 3)
    world_r = [None] * len(parents)
    world_p = [None] * len(parents)
    for j, p in enumerate(parents):
        if p < 0:
            world_r[j], world_p[j] = mats[:, j], root_pos
        else:
            world_r[j] = world_r[p] @ mats[:, j]
            world_p[j] = world_p[p] + world_r[p] @ offsets[j]
    return np.stack(world_r, 1), np.stack(world_p, 1)


def forward_kinematics(m, root_pos, rot):
    """(T, 3) root positions + (T, J, 4) rotations -> (T, NUM_SITES, 3) world points. The pelvis is
    the midpoint of the hips, as in Human3.6M (hips and pelvis on one line) whatever the skeleton's
    root joint: a root above the hips (the CMU skeletons', ~0.1 m) would bend the two pelvis-hip
    bones into a V that no video pose has."""
    world_r, world_p = joint_transforms(m.parents, m.offsets, root_pos, rot)
    r = world_r[:, m.site_joint]  # (T, S - 1, 3, 3)
    p = world_p[:, m.site_joint] + np.einsum("tsij,sj->tsi", r, m.site_offset)
    return np.concatenate([(p[:, :1] + p[:, 3:4]) / 2, p], 1)


def _heading(m, q):
    """Yaw about +Y of the body's facing direction (the angle psi of a rotation Ry(psi)
    taking +X onto it)."""
    f = quat_to_mat(q) @ m.forward
    return math.atan2(-f[2], f[0])


def _yaw_quat(psi):
    return quat_axis_angle([0.0, 1.0, 0.0], psi)


def sample_motion(m, t):
    """World points (T, NUM_SITES, 3) at times t (seconds, (T,)), plus the source frame index
    and time of each.

    Non-looping motions hold their first/last frame outside [0, duration]. A looping motion of
    period P plays cycle n = t // P displaced by D^n, D the horizontal rigid motion
    (yaw + translation) taking the root's heading and ground position at the first frame onto
    those at the last frame (how DeepMimic chains its 'wrap' cycles). The recorded cycles do not
    close exactly (up to ~90 deg at a shoulder of the roll clip), so the mismatch between the
    last frame and the displaced first frame is spread linearly over the cycle: a continuous
    loop without a seam.
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
        # seam closure: the rotation/offset taking the last frame onto the displaced first frame,
        # scaled by tau / P
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
# loaders. Every skeleton maps onto the same NUM_SITES points (Human3.6M order, then toes and
# face). The pelvis is always the hips' midpoint (forward_kinematics); each other point is (joint
# name, offset in that joint's frame). DeepMimic / AMP: spine = the mid-torso joint (about midway
# between pelvis and thorax); nose/head points sit on the neck's up axis, so the neck angle
# follows the head.

_DM_SITES = [("right_hip", 0, 0, 0), ("right_knee", 0, 0, 0), ("right_ankle", 0, 0, 0),
             ("left_hip", 0, 0, 0), ("left_knee", 0, 0, 0), ("left_ankle", 0, 0, 0),
             ("chest", 0, 0, 0), ("neck", 0, 0, 0), ("neck", 0, 0.12, 0), ("neck", 0, 0.28, 0),
             ("left_shoulder", 0, 0, 0), ("left_elbow", 0, 0, 0), ("left_wrist", 0, 0, 0),
             ("right_shoulder", 0, 0, 0), ("right_elbow", 0, 0, 0), ("right_wrist", 0, 0, 0),
             ("right_ankle", 0.13, -0.045, 0), ("left_ankle", 0.13, -0.045, 0),
             ("neck", 0.09, 0.17, 0)]
# AMP is the same body with Z up and +Y left: DeepMimic (x, y, z) is AMP (x, -z, y); its
# bodies are renamed
_AMP_NAMES = {"root": "pelvis", "chest": "torso", "neck": "head", "right_hip": "right_thigh",
              "right_knee": "right_shin", "right_ankle": "right_foot", "left_hip": "left_thigh",
              "left_knee": "left_shin", "left_ankle": "left_foot",
              "right_shoulder": "right_upper_arm", "right_elbow": "right_lower_arm",
              "right_wrist": "right_hand", "left_shoulder": "left_upper_arm",
              "left_elbow": "left_lower_arm", "left_wrist": "left_hand"}


def _sites(names, spec, scale=1.0, axes=lambda v: v):
    idx = np.array([names.index(s[0]) for s in spec])
    off = np.array([axes(np.array(s[1:], dtype=np.float64)) for s in spec]) * scale
    return idx, off


def load_deepmimic(path, character=None):
    """DeepMimic humanoid3d motion JSON -> Motion. Frame = [dt, root pos (3), root quat, chest,
    neck, r hip, r knee (1), r ankle, r shoulder, r elbow (1), l hip, l knee (1), l ankle, l
    shoulder, l elbow (1)]; quaternions (w, x, y, z); revolute joints turn about their local z axis;
    offsets from the character file (next to the motion, else the shipped humanoid3d one)."""
    path = Path(path)
    char_file = path.parent / "deepmimic_humanoid3d_character.json"
    char = json.loads(Path(character or (char_file if char_file.is_file() else
                                         ASSET_DIR / char_file.name)).read_text())
    joints = char["Skeleton"]["Joints"]
    names = [j["Name"] for j in joints]
    parents = [int(j["Parent"]) for j in joints]
    offsets = np.array([[j["AttachX"], j["AttachY"], j["AttachZ"]] for j in joints],
                       dtype=np.float64)
    try:
        clip = json.loads(path.read_text())
        frames = np.asarray(clip["Frames"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise ValueError(f"{path}: not a DeepMimic motion ({type(e).__name__}: {e})") from None
    if frames.ndim != 2 or len(frames) < 2:
        raise ValueError(f"{path}: 'Frames' must be a list of at least 2 frames of numbers")
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
                  float(round(1.0 / np.median(dt[:-1]))), info={"format": "DeepMimic"})


def read_amp_npy(src):
    """An IsaacGymEnvs AMP motion .npy (a pickled poselib SkeletonMotion dict) -> a dict of plain
    arrays. This UNPICKLES `src` (arbitrary code execution for an untrusted file): only run it on
    files you trust."""
    try:
        d = np.load(src, allow_pickle=True).item()
        st = d["skeleton_tree"]
        arrays = dict(rotation_xyzw=np.asarray(d["rotation"]["arr"], np.float32),
                      root_translation=np.asarray(d["root_translation"]["arr"], np.float32),
                      node_names=np.array(st["node_names"]),
                      parent_indices=np.asarray(st["parent_indices"]["arr"], np.int64),
                      local_translation=np.asarray(st["local_translation"]["arr"], np.float32),
                      fps=np.array(float(d["fps"])), is_local=np.array(bool(d["is_local"])))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{src}: not a poselib SkeletonMotion ({type(e).__name__}: {e})") from None
    if not arrays["is_local"]:
        raise ValueError(f"{src}: expected local joint rotations (is_local=True)")
    return arrays


def convert_amp_npy(src, dst):
    """One-off: an AMP motion .npy (UNPICKLED, see read_amp_npy) -> a plain .npz of arrays, which
    load_amp reads with allow_pickle=False, so nothing is unpickled at run time."""
    buf = io.BytesIO()
    np.savez(buf, **read_amp_npy(src))
    data.atomic_write_bytes(dst, buf.getvalue())


def find_loop(rot, times, min_dur, max_err_deg=12.0):
    """(start, end) frames of the longest span lasting >= min_dur seconds whose end pose matches its
    start pose (every non-root joint within max_err_deg); ties -> smallest mismatch. For recordings
    not cut as cycles."""
    q = rot[:, 1:]  # (N, J-1, 4) local rotations; the root is handled by the cycle transform
    dots = np.abs(np.einsum("ajk,bjk->abj", q, q)).clip(0.0, 1.0)
    err = np.degrees(2.0 * np.arccos(dots)).max(-1)  # (N, N) worst joint mismatch
    a, b = np.nonzero((err <= max_err_deg) & (times[None] - times[:, None] >= min_dur))
    if len(a) == 0:
        raise ValueError(f"no loop of >= {min_dur} s within {max_err_deg} deg")
    best = min(zip(a - b, err[a, b], a, b))  # longest (most negative a - b), then best matching
    return int(best[2]), int(best[3])


def load_amp(path, loop=True, allow_pickle=False):
    """IsaacGymEnvs AMP motion -> Motion: the converted .npz, or the original pickled .npy with
    allow_pickle=True. Quaternions are (x, y, z, w), local to the parent, Z up: the root is turned
    into our Y-up world (Rx(-90 deg): z -> y, y -> -z). With loop=True the longest near-cyclic
    span (>= 0.75 s) is cut out and played as a loop; the recordings are not cut as cycles. The
    files hold 30 Hz captures at 60 fps, each pose twice: repeats are dropped so that
    interpolation moves smoothly."""
    path = Path(path)
    if path.suffix == ".npy":
        if not allow_pickle:
            raise ValueError(f"{path}: an AMP .npy is a pickle, and loading a pickle can run code: convert it once "
                             f"with `python mocap.py --convert-amp {path} {path.with_suffix('.npz')} --allow-pickle`"
                             " (for a file you trust), or pass --allow-pickle")
        a = read_amp_npy(path)
    else:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    need = {"rotation_xyzw", "root_translation", "node_names", "parent_indices",
            "local_translation", "fps"}
    if need - set(a):
        raise ValueError(f"{path}: not an AMP motion: no {sorted(need - set(a))}")
    names = [str(s) for s in a["node_names"]]
    if set(_AMP_NAMES.values()) - set(names):
        raise ValueError(f"{path}: not the AMP humanoid: no bodies {sorted(set(_AMP_NAMES.values()) - set(names))} "
                         f"(bodies found: {', '.join(names)})")
    rot = a["rotation_xyzw"].astype(np.float64)[..., [3, 0, 1, 2]]  # (N, J, 4) -> (w, x, y, z)
    rot /= np.linalg.norm(rot, axis=-1, keepdims=True)
    fps = float(a["fps"])
    zup_to_yup = quat_axis_angle([1.0, 0.0, 0.0], -math.pi / 2)
    rot[:, 0] = quat_mul(zup_to_yup, rot[:, 0])
    root_pos = a["root_translation"].astype(np.float64) @ quat_to_mat(zup_to_yup).T
    moved = (np.abs(np.diff(rot, axis=0)).max((1, 2)) > 1e-7) | (np.abs(np.diff(root_pos, axis=0)).max(1) > 1e-7)
    src = np.nonzero(np.concatenate([[True], moved]))[0]  # file frames that are not a repeat of the previous one
    rot, root_pos, times = rot[src], root_pos[src], src / fps
    start, end = find_loop(rot, times, 0.75) if loop else (0, len(rot) - 1)
    dm_to_amp = lambda v: np.array([v[0], -v[2], v[1]])
    idx, off = _sites(names, [(_AMP_NAMES[s[0]],) + tuple(s[1:]) for s in _DM_SITES],
                      axes=dm_to_amp)
    span = slice(start, end + 1)
    return Motion(path.stem, times[span] - times[start], root_pos[span], rot[span],
                  a["parent_indices"].tolist(), a["local_translation"].astype(np.float64), idx, off,
                  np.array([1.0, 0.0, 0.0]), loop, fps, src[span], float(times[start]),
                  info={"format": "AMP"})


# -----------------------------------------------------------------------------
# BVH: the format and its rigs' joints and unit in bvh.py; here rotations, the up axis and the
# checks over frames


def _bvh_rotations(path, names, offsets, channels, values):
    """Channels -> rotations (N, J, 4) (Euler angles in degrees, R = R_c1 R_c2 R_c3 in the listed
    order), root positions (N, 3), file units. Position channels of other joints are accepted when
    they only restate the offset (or are 0): constant bones, as some exporters write them."""
    n = len(values)
    rot, root_pos, col = np.zeros((n, len(names), 4)), np.zeros((n, 3)), 0
    for j, chans in enumerate(channels):
        q = np.broadcast_to(np.array([1.0, 0.0, 0.0, 0.0]), (n, 4))
        pos = np.zeros((n, 3))
        for c in chans:
            if c[:1].upper() not in ("X", "Y", "Z") or c[1:].lower() not in ("position", "rotation"):
                raise ValueError(f"{path}: unknown channel {c!r} of joint {names[j]}")
            axis = "XYZ".index(c[0].upper())
            if c[1:].lower() == "position":
                pos[:, axis] = values[:, col]
            else:  # intrinsic order as listed: R = R_c1 @ R_c2 @ R_c3
                q = quat_mul(q, quat_axis_angle(np.eye(3)[axis], np.radians(values[:, col])))
            col += 1
        rot[:, j] = q
        if j == 0:
            root_pos = pos
        elif not any(np.abs(pos - ref).max() <= 1e-3 * max(1.0, np.abs(offsets[j]).max()) for ref in (0, offsets[j])):
            raise ValueError(f"{path}: joint {names[j]} has moving position channels (a stretching bone): not "
                             "supported")
    return rot, root_pos


def load_bvh(path, joint_map=None, up=None, unit=None, loop=False):
    """BVH of any common rig (or any rig with a joint map {key of bvh.JOINT_MAP_KEYS: the file's
    joint}; see bvh.py for the rigs, the points and the unit) -> Motion. The up axis is the rest
    pose's when it stands upright along an axis, else the body's mean up over the frames; up='z' /
    '-y' ... forces it, unit='cm' (a bvh.UNITS name or metres per unit) the unit. A rig whose toes
    point backwards (left and right swapped) is refused."""
    path = Path(path)
    names, parents, offsets, channels, end_sites, frame_time, values = bvh.parse(path)
    rot, root_pos = _bvh_rotations(path, names, offsets, channels, values)
    rig = bvh.rig_points(path, names, parents, offsets, end_sites, joint_map, unit)
    jt, scale = rig["joints"], rig["scale"]
    # the body in file coordinates on up to 200 frames: up axis, facing, toes, face point
    pick = np.unique(np.linspace(0, len(values) - 1, min(len(values), 200)).astype(int))
    wr, wp = joint_transforms(parents, offsets, root_pos[pick] + offsets[0], rot[pick])
    idx, off = np.array([p[0] for p in rig["points"]]), np.array([p[1] for p in rig["points"]])
    p = wp[:, idx] + np.einsum("tsij,sj->tsi", wr[:, idx], off)  # (T, 18, 3) sites 1..18
    body_up = p[:, 7] - (p[:, 0] + p[:, 3]) / 2  # pelvis -> thorax
    facing = np.cross(p[:, 3] - p[:, 0], body_up)  # body left x up = forward (right-handed)
    toes = p[:, 16] - p[:, 2] + p[:, 17] - p[:, 5]
    if np.abs(toes).max() > 0 and np.mean(np.sum(toes * facing, -1) > 0) < 0.25:
        raise ValueError(f"{path}: the toes point backwards in most frames: left and right look swapped (hips "
                         f"{names[jt['l_hip']]} / {names[jt['r_hip']]}); check the joint names or the joint map")
    if up is not None:
        up_vec = bvh.axis_vector(path, up)
    elif rig["rest_up"] is not None:
        up_vec = bvh.nearest_axis(path, rig["rest_up"], "the rest pose's spine")
    else:
        up_vec = bvh.nearest_axis(path, np.mean(body_up / np.linalg.norm(body_up, axis=-1, keepdims=True), 0),
                                  "the mean spine over the frames")
    # rendering only: a face point 4.5 cm up and 9 cm ahead of the head joint, toes 13 cm ahead of
    # ankles without a foot chain, each in its joint's frame at frame 0
    u0, f0 = body_up[0] / np.linalg.norm(body_up[0]), facing[0] / np.linalg.norm(facing[0])
    site_joint, site_offset = np.append(idx, jt["head"]), np.append(off * scale, [0.045 * u0 + 0.09 * f0], 0)
    site_offset[18] = wr[0, jt["head"]].T @ site_offset[18]
    for k, ankle in ((16, idx[2]), (17, idx[5])):
        if not off[k].any() and site_joint[k] == ankle:
            site_offset[k] = wr[0, ankle].T @ (0.13 * f0 - 0.045 * u0)
    root_pos = root_pos * scale + offsets[0] * scale
    if up_vec[1] != 1.0:  # turn the file's up onto +Y (the shortest rotation; 180 deg about x for -Y)
        c = np.cross(up_vec, [0.0, 1.0, 0.0])
        q_fix = (quat_axis_angle(c / np.linalg.norm(c), math.acos(up_vec[1])) if np.linalg.norm(c) > 0.5 else
                 quat_axis_angle([1.0, 0.0, 0.0], math.pi))
        rot[:, 0] = quat_mul(q_fix, rot[:, 0])
        root_pos = root_pos @ quat_to_mat(q_fix).T
    info = {"format": "BVH", "up": ("-" if up_vec.sum() < 0 else "") + "xyz"[int(np.argmax(np.abs(up_vec)))],
            "unit": rig["unit"], "joints": {k: names[j] for k, j in jt.items()}}
    return Motion(path.stem, np.arange(len(values)) * frame_time, root_pos, rot, parents,
                  offsets * scale, site_joint, site_offset, wr[0, 0].T @ f0, loop,
                  float(round(1.0 / frame_time)), info=info)


# -----------------------------------------------------------------------------
# the motions of the demo: (key, file, action class, phrasings of the instruction). Texts never say
# left/right: the mocap does not document which side kicks or punches, and flip augmentation swaps
# those words anyway.

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
    """Load (once per process) a shipped mocap file by name, with the loader its
    extension implies."""
    if file not in _MOTION_CACHE:
        path = ASSET_DIR / file
        if not path.exists():
            raise FileNotFoundError(f"{path}: shipped mocap missing (see assets/mocap/ATTRIBUTION.md)")
        _MOTION_CACHE[file] = load_file(path)
    return _MOTION_CACHE[file]


# -----------------------------------------------------------------------------
# folders of the user's mocap: every file loaded or refused with the reason, never
# skipped in silence

MOCAP_SUFFIXES = {".txt": "DeepMimic", ".npz": "AMP", ".npy": "AMP (a pickle)", ".bvh": "BVH"}


def load_file(path, joint_map=None, up=None, unit=None, allow_pickle=False):
    """Any mocap file of MOCAP_SUFFIXES -> Motion, by its extension; the options are load_bvh's
    and load_amp's."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind == ".txt":
        return load_deepmimic(path)
    if kind in (".npz", ".npy"):
        return load_amp(path, allow_pickle=allow_pickle)
    if kind == ".bvh":
        return load_bvh(path, joint_map, up, unit)
    raise ValueError(f"{path}: not a mocap file (expected {', '.join(MOCAP_SUFFIXES)})")


def load_dir(root, **kwargs):
    """Every file under `root` (a folder, searched recursively, or one file) -> (loaded
    [(path, Motion)], refused [(path, why)], ignored [paths without a mocap extension]); kwargs go
    to load_file."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    loaded, refused, ignored = [], [], []
    for p in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        if p.suffix.lower() not in MOCAP_SUFFIXES:
            ignored.append(p)
            continue
        try:
            loaded.append((p, load_file(p, **kwargs)))
        except (ValueError, KeyError, IndexError, OSError, EOFError) as e:
            refused.append((p, str(e) if str(p) in str(e) else f"{p}: {type(e).__name__}: {e}"))
    return loaded, refused, ignored


def describe(m):
    """One line on how a Motion was read: format, frames, and for BVH the up axis, unit
    and joints used."""
    i = m.info
    line = f"{i.get('format', '?')}, {len(m.times)} frames over {m.times[-1]:.1f} s ({m.src_fps:g} fps)"
    if "unit" in i:
        line += f", up {i['up']}, unit {i['unit']}; " + " ".join(f"{k}={v}" for k, v in i["joints"].items())
    return line


def load_report(loaded, refused, ignored):
    """load_dir's result as lines to print."""
    lines = [f"loaded  {p}: {describe(m)}" for p, m in loaded] + [f"refused {why}" for _, why in refused]
    if ignored:
        lines.append(f"ignored {len(ignored)} files without a mocap extension "
                     f"({', '.join(sorted({p.suffix or p.name for p in ignored}))})")
    return lines


def add_source_args(ap):
    """The options of load_dir as command-line flags (lifter.py train, this file's --inspect)."""
    ap.add_argument("--joint-map", default=None,
                    help="JSON {key: BVH joint} for a rig the names do not reveal")
    ap.add_argument("--up", default=None, help="BVH up axis (x, y, z, -z, ...), default: detected")
    ap.add_argument("--unit", default=None,
                    help=f"BVH unit ({', '.join(bvh.UNITS)} or metres per unit), "
                    "default: detected from the leg length")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="load AMP .npy files (pickles: they can run code)")


def source_kwargs(args):
    return dict(joint_map=bvh.read_joint_map(args.joint_map) if args.joint_map else None,
                up=args.up, unit=args.unit, allow_pickle=args.allow_pickle)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Motion capture tools (see module docstring).")
    ap.add_argument("--inspect", nargs="+", metavar="PATH",
                    help="load mocap files / folders, say how each was read")
    ap.add_argument("--convert-amp", nargs=2, metavar=("SRC_NPY", "DST_NPZ"),
                    help="convert an AMP motion .npy")
    add_source_args(ap)
    args = ap.parse_args()
    try:
        if args.convert_amp:
            if not args.allow_pickle:
                sys.exit("--convert-amp unpickles its input (it can run code): pass --allow-pickle for a file you "
                         "trust")
            convert_amp_npy(*args.convert_amp)
        elif args.inspect:
            results = [load_dir(path, **source_kwargs(args)) for path in args.inspect]
            print("\n".join(line for r in results for line in load_report(*r)))
            sys.exit(1 if any(r[1] for r in results) else 0)  # something refused
        else:
            ap.error("--inspect or --convert-amp")
    except (OSError, ValueError) as e:
        sys.exit(f"mocap.py: {e}")
