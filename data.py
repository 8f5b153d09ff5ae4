"""
MIMIC data: 3D pose <-> 22 joint angles, the one-file-per-clip format, training windows, augmentation.

1. Joint angles (mimic.md sec 4, the released model's convention, to the letter):
   pose3d_to_angles (IK) turns the 17 Human3.6M joints (camera frame: x right, y DOWN, z away from the camera) into
   22 angles. angles_to_pose3d (FK) is its exact inverse on everything IK can produce: IK(FK(a)) == a, and
   FK(IK(p)) has the spine, thigh and neck directions of p. What IK does not encode (twist about a bone, the
   bend plane of knees/elbows, where hips/shoulders sit, hence 1 DoF of each upper arm: the shoulder reference
   direction shoulder - thorax) comes from a `template` pose if given (then FK(IK(p), template=p) == p), else from a
   canonical body facing the camera.
2. Clips: ONE safetensors file per clip: arrays + all JPEG frames concatenated in a uint8 tensor with int64 offsets,
   string metadata in the safetensors header, so a training window reads only the bytes of its 4 frames.
   An index.jsonl per dataset folder lists the clips so a dataset of 10^6 clips is built without opening them.
3. WindowDataset (mimic.md sec 5): 4 past frames with the green target box, text prompt, state and 16 target steps
   as sin/cos, flip augmentation doubling the data; `collate` batches it (padding token sequences).

References: Human3.6M joint order; MIMIC model card + original `training/kinetics_dataset.py` (semantics only).

Commands (the demo dataset is built by synth.py, MoveNet-332 imported by movenet.py):
  python data.py info data/demo                                    # dataset summary (or a single .safetensors clip)
  python data.py index data/demo                                   # (re)write data/demo/index.jsonl
"""

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save as _st_save

# the model's input contract; encode/decode_angles and draw_box are also re-exported for callers of data.*
from model_io import INPUT_KEYS, collate_inputs, decode_angles, draw_box, encode_angles, frame_image, prompt_text  # noqa: F401

# ---------------------------------------------------------------------------------------------------------------
# Skeleton and angle layout

H36M_JOINT_NAMES = ("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine", "thorax",
                    "neck", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist")
H36M_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
H36M_FLIP_PERM = (0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13)  # left <-> right

# The code order of the original (the README table lists them differently). 3-DoF joints are (pitch, roll, yaw).
JOINT_NAMES = ("spine_pitch", "spine_roll", "spine_yaw",
               "l_hip_pitch", "l_hip_roll", "l_hip_yaw", "l_knee",
               "r_hip_pitch", "r_hip_roll", "r_hip_yaw", "r_knee",
               "l_shoulder_pitch", "l_shoulder_roll", "l_shoulder_yaw", "l_elbow",
               "r_shoulder_pitch", "r_shoulder_roll", "r_shoulder_yaw", "r_elbow",
               "neck_pitch", "neck_roll", "neck_yaw")
JOINT_GROUPS = {"spine": [0, 1, 2], "legs": [3, 4, 5, 6, 7, 8, 9, 10], "arms": [11, 12, 13, 14, 15, 16, 17, 18],
                "neck": [19, 20, 21]}
_ROT_IDX = (0, 3, 7, 11, 15, 19)  # first angle of spine, l_hip, r_hip, l_shoulder, r_shoulder, neck
_HINGE_IDX = (6, 10, 14, 18)      # l_knee, r_knee, l_elbow, r_elbow
# Mirroring (x -> -x) conjugates a rotation by M = diag(-1, 1, 1): Rz(y)Ry(r)Rx(p) -> Rz(-y)Ry(-r)Rx(p), so pitch
# is kept, roll and yaw change sign, and the left/right joints swap places. Hinge angles are mirror invariant.
ANGLE_FLIP_PERM = (0, 1, 2, 7, 8, 9, 10, 3, 4, 5, 6, 15, 16, 17, 18, 11, 12, 13, 14, 19, 20, 21)
ANGLE_FLIP_SIGN = tuple(-1.0 if i in (1, 2, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21) else 1.0 for i in range(22))

# Default bone lengths in metres, indexed by the child joint (length of joint j - joint parent[j]): a ~1.75 m adult
# with Human3.6M-like proportions (thigh/shin/upper arm/forearm close to the DeepMimic humanoid: .42/.41/.27/.26).
DEFAULT_BONE_LENGTHS = {"r_hip": 0.11, "r_knee": 0.43, "r_ankle": 0.42, "l_hip": 0.11, "l_knee": 0.43,
                        "l_ankle": 0.42, "spine": 0.22, "thorax": 0.24, "neck": 0.12, "head": 0.11,
                        "l_shoulder": 0.16, "l_elbow": 0.28, "l_wrist": 0.25, "r_shoulder": 0.16,
                        "r_elbow": 0.28, "r_wrist": 0.25}

_PARALLEL_EPS = 1e-8  # |a x b| below this (unit vectors): parallel -> I, anti-parallel -> -I (as the original)
_GIMBAL_EPS = 1e-6    # sqrt(R00^2 + R10^2) below this: gimbal branch of the Euler extraction (as the original)
_NEG_I_TOL = 1e-5     # FK reads an angle triple within this of (+-pi, 0, +-pi) as IK's code for "-I"
_TINY = 1e-30         # clamps under square roots so gradients stay finite at 0


# ---------------------------------------------------------------------------------------------------------------
# Small vector helpers (torch; numpy inputs are converted to float64 tensors by the public functions)


def _to_torch(x):
    """-> (tensor, back): numpy/lists become float64 tensors and `back` returns numpy of the input float dtype."""
    if isinstance(x, torch.Tensor):
        return (x if x.is_floating_point() else x.double()), (lambda y: y)
    arr = np.asarray(x)
    out_dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    return torch.from_numpy(np.array(arr, dtype=np.float64)), (lambda y: y.detach().cpu().numpy().astype(out_dtype))


def _like(x, ref):
    return torch.as_tensor(x, dtype=ref.dtype, device=ref.device)


def _dot(a, b):
    return (a * b).sum(-1)


def _norm(a):
    return torch.sqrt(_dot(a, a).clamp_min(_TINY))


def _unit(a):
    return a / _norm(a)[..., None]  # a zero vector stays zero


def _cross(a, b):
    a0, a1, a2 = a.unbind(-1)
    b0, b1, b2 = b.unbind(-1)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1)


def _skew(v):
    z = torch.zeros_like(v[..., 0])
    v0, v1, v2 = v.unbind(-1)
    return torch.stack([z, -v2, v1, v2, z, -v0, -v1, v0, z], -1).unflatten(-1, (3, 3))  # (..., 3, 3)


def _rot_between(a, b):
    """Minimal (Rodrigues) rotation taking direction a onto direction b; I if parallel, -I if anti-parallel.
    a, b: (..., 3) -> (..., 3, 3). R = I + [v]x + [v]x^2 (1 - c) / s^2 with v = a x b, c = a.b, s = |v|."""
    a, b = _unit(a), _unit(b)
    v, c = _cross(a, b), _dot(a, b)
    s2 = _dot(v, v)
    par = s2 < _PARALLEL_EPS ** 2
    # (1 - c) / s^2 == 1 / (1 + c): use the form without cancellation on each side (c > 0 / c <= 0)
    f = torch.where(c > 0, 1 / (1 + c.clamp_min(0)), (1 - c) / torch.where(par, torch.ones_like(s2), s2))
    K = _skew(v)
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    R = eye + K + (K @ K) * f[..., None, None]
    # -eye has signed zeros off the diagonal, so its Euler angles are exactly the original's (-pi, 0, -pi)
    special = torch.where((c > 0)[..., None, None], eye, -eye)
    return torch.where(par[..., None, None], special, R)


def _euler_from_matrix(R):
    """(..., 3, 3) -> (..., 3) = (pitch, roll, yaw), R = Rz(yaw) Ry(roll) Rx(pitch); the original's gimbal branch."""
    sy = torch.sqrt((R[..., 0, 0] ** 2 + R[..., 1, 0] ** 2).clamp_min(_TINY))
    sing = sy < _GIMBAL_EPS
    pitch = torch.where(sing, torch.atan2(-R[..., 1, 2], R[..., 1, 1]), torch.atan2(R[..., 2, 1], R[..., 2, 2]))
    roll = torch.atan2(-R[..., 2, 0], sy)
    yaw = torch.where(sing, torch.zeros_like(sy), torch.atan2(R[..., 1, 0], R[..., 0, 0]))
    return torch.stack([pitch, roll, yaw], -1)


def _matrix_from_euler(e):
    """(..., 3) (pitch, roll, yaw) -> Rz(yaw) Ry(roll) Rx(pitch) (..., 3, 3), the inverse of _euler_from_matrix."""
    cx, cy, cz = torch.cos(e).unbind(-1)
    sx, sy, sz = torch.sin(e).unbind(-1)
    return torch.stack([cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz,
                        cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz,
                        -sy, sx * cy, cx * cy], -1).unflatten(-1, (3, 3))


# ---------------------------------------------------------------------------------------------------------------
# IK: pose3d -> 22 angles (mimic.md sec 4)


def pose3d_to_angles(pose3d):
    """pose3d (..., 17, 3) (numpy or torch; camera frame, y down) -> angles (..., 22) in radians, same type.
    3-DoF joints: Euler angles of the minimal rotation from reference a to bone b, with up = +y (image DOWN):
    spine (up, spine - pelvis), hips (-up, knee - hip), shoulders (shoulder - thorax, elbow - shoulder),
    neck (up, head - neck). Knee/elbow: pi - angle(proximal bone, distal bone), bones along the chain
    (pi = straight). Vectorised and differentiable (torch in -> torch out)."""
    P, back = _to_torch(pose3d)
    if P.shape[-2:] != (17, 3):
        raise ValueError(f"pose3d must have shape (..., 17, 3), got {tuple(P.shape)}")
    j = P.unbind(-2)
    up = _like([0.0, 1.0, 0.0], P).expand_as(j[0])
    a = torch.stack([up, -up, -up, j[11] - j[8], j[14] - j[8], up], -2)                        # (..., 6, 3)
    b = torch.stack([j[7] - j[0], j[5] - j[4], j[2] - j[1], j[12] - j[11], j[15] - j[14], j[10] - j[9]], -2)
    eul = _euler_from_matrix(_rot_between(a, b))                                                  # (..., 6, 3)
    prox = torch.stack([j[5] - j[4], j[2] - j[1], j[12] - j[11], j[15] - j[14]], -2)              # (..., 4, 3)
    dist = torch.stack([j[6] - j[5], j[3] - j[2], j[13] - j[12], j[16] - j[15]], -2)
    # atan2(|u x v|, u.v) is the angle between u and v, accurate near 0 and pi where arccos is not
    hinge = math.pi - torch.atan2(_norm(_cross(prox, dist)), _dot(prox, dist))                   # (..., 4)
    e = eul.unbind(-2)
    k = hinge[..., None].unbind(-2)
    out = torch.cat([e[0], e[1], k[0], e[2], k[1], e[3], k[2], e[4], k[3], e[5]], -1)            # (..., 22)
    return back(out)


# ---------------------------------------------------------------------------------------------------------------
# FK: 22 angles -> pose3d, the exact inverse of the IK above


def _bone_lengths(bone_lengths, ref):
    """None | dict {child joint name: metres} (others default) | (..., 17) per child joint (entry 0 ignored) |
    (..., 16) per bone (joints 1..16) -> (..., 17) tensor."""
    if bone_lengths is None or isinstance(bone_lengths, dict):
        given = dict(bone_lengths or {})
        unknown = sorted(set(given) - set(DEFAULT_BONE_LENGTHS))
        if unknown:
            raise ValueError(f"unknown bone_lengths keys {unknown}; expected child joint names "
                             f"{sorted(DEFAULT_BONE_LENGTHS)}")
        return _like([0.0] + [float(given.get(n, DEFAULT_BONE_LENGTHS[n])) for n in H36M_JOINT_NAMES[1:]], ref)
    L = _like(np.asarray(bone_lengths, dtype=np.float64) if not isinstance(bone_lengths, torch.Tensor)
              else bone_lengths, ref)
    if L.shape[-1] == 16:
        L = torch.cat([torch.zeros_like(L[..., :1]), L], -1)
    if L.shape[-1] != 17:
        raise ValueError(f"bone_lengths must have last dim 17 (per joint) or 16 (per bone), got {tuple(L.shape)}")
    return L


def bone_lengths_of(pose3d):
    """(..., 17, 3) -> (..., 17): |joint j - joint parent[j]| (0 for the pelvis), the format FK takes."""
    P, back = _to_torch(pose3d)
    d = P[..., 1:, :] - P[..., list(H36M_PARENTS[1:]), :]
    return back(torch.cat([torch.zeros_like(P[..., :1, 0]), _norm(d)], -1))


def _first_unit(*vecs):
    """Unit vector along the first of `vecs` whose norm is > 1e-6 (callers pass projections of unit vectors, so this
    is relative); the last one must never be degenerate (pass two orthogonal fallbacks)."""
    out = _unit(vecs[-1])
    for v in reversed(vecs[:-1]):
        out = torch.where((_norm(v) > 1e-6)[..., None], _unit(v), out)
    return out


def _perp_unit(axis, *cands):
    """Unit vector along the part perpendicular to unit `axis` of the first candidate that has one (candidates are
    normalised first, so "has one" means > 1e-6 of its length)."""
    return _first_unit(*[c - _dot(c, axis)[..., None] * axis for c in map(_unit, cands)])


def _rotate_min(p, q, x):
    """Apply the minimal rotation taking unit p onto unit q to x; where p ~ -q (undefined) return x."""
    v, c = _cross(p, q), _dot(p, q)
    ok = (1 + c) > 1e-6
    d = torch.where(ok, 1 + c, torch.ones_like(c))[..., None]
    rx = x + _cross(v, x) + _cross(v, _cross(v, x)) / d
    return torch.where(ok[..., None], rx, x)


def _body_frame(u):
    """Canonical body axes for body-up u (unit, camera frame): lateral-left l and forward f, obtained by the minimal
    rotation taking an upright person facing the camera (up -y, left +x, forward -z) onto u (closed form).
    Upside down (u = +y) the rotation is undefined: use the frame turned by pi about z (left -x, forward -z)."""
    ux, uy, uz = u.unbind(-1)
    d = 1 - uy
    ok = d > 1e-6
    ds = torch.where(ok, d, torch.ones_like(d))
    l = torch.stack([1 - ux * ux / ds, ux, -ux * uz / ds], -1)
    f = torch.stack([ux * uz / ds, -uz, uz * uz / ds - 1], -1)
    l = torch.where(ok[..., None], l, _like([-1.0, 0.0, 0.0], u))
    f = torch.where(ok[..., None], f, _like([0.0, 0.0, -1.0], u))
    return l, f


def _shoulder_ref(E, hint):
    """The part of `hint` perpendicular to the rotation axis n of E (un-normalised). A minimal rotation from a only
    exists about an axis perpendicular to a, so FK must put the shoulder reference (shoulder - thorax) in that plane
    for IK to read E back. Small angles: n from the skew part (2 sin(t) n); large: (2I - E - E^T) = 2(1-cos t)(I-nn^T).
    E = I (n undefined, any reference works): the hint itself."""
    w = torch.stack([E[..., 2, 1] - E[..., 1, 2], E[..., 0, 2] - E[..., 2, 0], E[..., 1, 0] - E[..., 0, 1]], -1)
    n = _unit(w)
    small = hint - _dot(hint, n)[..., None] * n
    eye = torch.eye(3, dtype=E.dtype, device=E.device)
    big = ((2 * eye - E - E.transpose(-1, -2)) @ hint[..., None])[..., 0]
    cos_t = (E[..., 0, 0] + E[..., 1, 1] + E[..., 2, 2] - 1) / 2
    return torch.where((cos_t > 0)[..., None], small, big)


def angles_to_pose3d(angles, bone_lengths=None, template=None):
    """angles (..., 22) -> pose3d (..., 17, 3) (numpy or torch, same type; differentiable in torch), pelvis at the
    origin (or at the template's pelvis). IK(FK(a)) == a for every a IK produces.
    bone_lengths: None (DEFAULT_BONE_LENGTHS; the template's if a template is given), a dict {child joint: length},
    (..., 17) per child joint or (..., 16) per bone.
    template: optional (..., 17, 3) pose supplying every degree of freedom the angles do not encode (hip and
    shoulder placement, spine->thorax->neck directions, knee/elbow bend planes); FK(IK(p), template=p) == p.
    Without it FK builds a canonical body facing the camera: hips and shoulders along its lateral axis (shoulders
    projected onto the plane each shoulder rotation allows), thorax and neck on the spine line, knees bending
    backwards and elbows forwards. The spine, thigh and neck directions of p are always kept; an upper arm only as
    far as p's shoulder - thorax direction matches the canonical one (the angles cannot tell a person facing away
    with arms down from one facing the camera with arms raised)."""
    A, back = _to_torch(angles)
    if A.shape[-1] != 22:
        raise ValueError(f"angles must have last dim 22, got {tuple(A.shape)}")
    T = None
    if template is not None:
        T = _like(template if isinstance(template, torch.Tensor) else np.asarray(template, np.float64), A)
        if T.shape[-2:] != (17, 3):
            raise ValueError(f"template must have shape (..., 17, 3), got {tuple(T.shape)}")
    L = bone_lengths_of(T) if bone_lengths is None and T is not None else _bone_lengths(bone_lengths, A)
    batch = torch.broadcast_shapes(A.shape[:-1], L.shape[:-1], *([] if T is None else [T.shape[:-2]]))
    A, L = A.expand(*batch, 22), L.expand(*batch, 17).unbind(-1)
    T = None if T is None else T.expand(*batch, 17, 3)

    rot = A[..., [i + k for i in _ROT_IDX for k in range(3)]].unflatten(-1, (6, 3))               # (..., 6, 3)
    E = _matrix_from_euler(rot)                                                                    # (..., 6, 3, 3)
    # IK writes the anti-parallel case as -I, whose Euler angles (-pi, 0, -pi) recompose to Ry(pi), not -I
    neg_i = ((rot[..., 0].abs() - math.pi).abs() < _NEG_I_TOL) & (rot[..., 1].abs() < _NEG_I_TOL) \
        & ((rot[..., 2].abs() - math.pi).abs() < _NEG_I_TOL)
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    E = torch.where(neg_i[..., None, None], -eye, E)
    E_spine, E_lhip, E_rhip, E_lsh, E_rsh, E_neck = E.unbind(-3)
    k_l, k_r, e_l, e_r = A[..., list(_HINGE_IDX)].unbind(-1)

    up = _like([0.0, 1.0, 0.0], A)
    u = E_spine @ up          # spine direction = the IK's b for reference a = up
    head_dir = E_neck @ up
    thigh_l, thigh_r = -(E_lhip @ up), -(E_rhip @ up)  # reference a = -up
    l, f = _body_frame(u)
    if T is not None:         # the template's lateral axis (left hip - right hip), kept perpendicular to the spine
        t = T.unbind(-2)
        l = _perp_unit(u, t[4] - t[1], l, f)
        f = _cross(l, u)      # (f, l, u) is right-handed: f x l = u, l x u = f

    def hint(i, j, canonical):  # direction of template bone i -> j if a template is given, else the canonical one
        return canonical if T is None else _first_unit(_unit(T[..., j, :] - T[..., i, :]), canonical)

    pelvis = torch.zeros_like(u) if T is None else T[..., 0, :]
    spine = pelvis + L[7][..., None] * u
    thorax = spine + L[8][..., None] * hint(7, 8, u)
    neck = thorax + L[9][..., None] * hint(8, 9, u)
    head = neck + L[10][..., None] * head_dir
    r_hip = pelvis + L[1][..., None] * hint(0, 1, -l)
    l_hip = pelvis + L[4][..., None] * hint(0, 4, l)

    def leg(hip, thigh, knee_angle, i_knee, i_ankle, Lt, Ls):
        knee = hip + Lt[..., None] * thigh
        # knee flexes backwards: the body's backward direction carried along by the rotation from body-down to
        # the thigh (stays sensible when the thigh is horizontal, e.g. sitting); any unit w _|_ thigh inverts IK
        canon = _rotate_min(-u, thigh, -f)
        w = _perp_unit(thigh, canon, l, f) if T is None else \
            _perp_unit(thigh, T[..., i_ankle, :] - T[..., i_knee, :], canon, l, f)
        shin = -torch.cos(knee_angle)[..., None] * thigh + torch.sin(knee_angle)[..., None] * w
        return knee, knee + Ls[..., None] * shin

    r_knee, r_ankle = leg(r_hip, thigh_r, k_r, 2, 3, L[2], L[3])
    l_knee, l_ankle = leg(l_hip, thigh_l, k_l, 5, 6, L[5], L[6])

    def arm(Es, elbow_angle, side_hint, i_sh, i_el, i_wr, Lsh, Lua, Lfa):
        cands = [side_hint, f] if T is None else [_unit(T[..., i_sh, :] - T[..., 8, :]), side_hint, f]
        # the first hint whose projection is usable; E = I or -I accept any reference, so the raw hint ends it
        a = _first_unit(*[_shoulder_ref(Es, c) for c in cands], side_hint)
        shoulder = thorax + Lsh[..., None] * a
        b = (Es @ a[..., None])[..., 0]  # upper arm = E a: IK reads back the minimal rotation a -> b, i.e. E
        elbow = shoulder + Lua[..., None] * b
        # elbow flexes forwards: the forward direction (made _|_ a) carried along by the shoulder rotation
        canon = (Es @ _perp_unit(a, f, u)[..., None])[..., 0]
        w = _perp_unit(b, canon, l, f) if T is None else _perp_unit(b, T[..., i_wr, :] - T[..., i_el, :], canon, l, f)
        forearm = -torch.cos(elbow_angle)[..., None] * b + torch.sin(elbow_angle)[..., None] * w
        return shoulder, elbow, elbow + Lfa[..., None] * forearm

    l_sh, l_el, l_wr = arm(E_lsh, e_l, l, 11, 12, 13, L[11], L[12], L[13])
    r_sh, r_el, r_wr = arm(E_rsh, e_r, -l, 14, 15, 16, L[14], L[15], L[16])
    out = torch.stack([pelvis, r_hip, r_knee, r_ankle, l_hip, l_knee, l_ankle, spine, thorax, neck, head,
                       l_sh, l_el, l_wr, r_sh, r_el, r_wr], -2)                                     # (..., 17, 3)
    return back(out)


# ---------------------------------------------------------------------------------------------------------------
# Encoding and mirroring


def wrap_angle(a):
    """Wrap radians to [-pi, pi) (numpy or torch); use it on angle differences."""
    return (a + math.pi) % (2 * math.pi) - math.pi


def flip_pose3d(p):
    """Mirror a pose (..., 17, 3): x -> -x and left/right joints swapped (numpy or torch)."""
    q = p[..., list(H36M_FLIP_PERM), :]
    sign = [-1.0, 1.0, 1.0]
    return q * (_like(sign, q) if isinstance(q, torch.Tensor) else np.asarray(sign, dtype=q.dtype))


def flip_angles(a):
    """The angles of the mirrored pose: flip_angles(IK(p)) == IK(flip_pose3d(p)) (mod 2 pi)."""
    q = a[..., list(ANGLE_FLIP_PERM)]
    return q * (_like(ANGLE_FLIP_SIGN, q) if isinstance(q, torch.Tensor) else np.asarray(ANGLE_FLIP_SIGN, q.dtype))


_LR = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def flip_text(text):
    """Swap the whole words left <-> right, keeping case ("Left" -> "Right", "LEFT" -> "RIGHT", "left-hand" ok)."""
    def swap(m):
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        if w.isupper():
            return new.upper()
        return new.capitalize() if w[0].isupper() else new
    return _LR.sub(swap, text)


# ---------------------------------------------------------------------------------------------------------------
# Clip format: one safetensors file per clip


FORMAT = "mimic-clip-v1"
INDEX_FILE = "index.jsonl"
# pipeline.py's verdicts, stored in a clip's extra as "True"/"False" and listed in its index entry
QUALITY_FLAGS = ("prog_good", "vlm_good", "strict")
_ARRAYS = {"boxes": (np.float32, (4,)), "pose3d": (np.float32, (17, 3)), "angles": (np.float32, (22,)),
           "src_frame_index": (np.int64, ()), "src_time": (np.float64, ())}
CLIP_ID_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
# Arrays that must be finite everywhere: one NaN angle turns every later training step into NaN. Boxes may be NaN
# (= unknown, drawn as nothing) but never infinite.
_FINITE = ("pose3d", "angles", "src_time")


def nonfinite_rows(name, arr):
    """Row indices of `arr` (one of _ARRAYS) that break its finiteness rule (see _FINITE), as a list."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        return []
    bad = ~np.isfinite(arr) if name in _FINITE else np.isinf(arr) if name == "boxes" else np.zeros(arr.shape, bool)
    return np.flatnonzero(bad.reshape(len(arr), -1).any(1)).tolist() if arr.ndim else []


def _rows_text(rows, first=0):
    shown = ", ".join(str(first + r) for r in rows[:8])
    return f"{len(rows)} frame{'s' if len(rows) > 1 else ''} ({shown}{', ...' if len(rows) > 8 else ''})"


def split_of(clip_id):
    """mimic.md sec 5: val when int(md5(clip_id)[:8], 16) / 0xFFFFFFFF < 0.02, else train."""
    h = int(hashlib.md5(clip_id.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < 0.02 else "train"


@dataclass
class Clip:
    clip_id: str                 # unique, filesystem-safe
    frames_jpeg: list            # T full frames at 10 Hz, JPEG bytes, RGB
    boxes: np.ndarray            # (T, 4) float32 x1, y1, x2, y2 in pixels of the frame (NaN: no box)
    pose3d: np.ndarray           # (T, 17, 3) float32, camera frame (x right, y down, z forward)
    angles: np.ndarray           # (T, 22) float32 radians = pose3d_to_angles(pose3d)
    src_frame_index: np.ndarray  # (T,) int64 index of the source video (or mocap) frame of each sample
    src_time: np.ndarray         # (T,) float64 seconds in the source
    src_fps: float               # fps of the source video (or mocap)
    width: int                   # frame width in pixels
    height: int
    action_class: str            # e.g. "jumping jacks"
    description: str             # imperative instruction
    video_id: str = ""           # source video id (several clips may share one)
    split: str = ""              # "" -> split_of(clip_id)
    extra: dict = field(default_factory=dict)  # free str -> str metadata


def clip_path(root, clip_id):
    """root/clips/<md5[:2]>/<clip_id>.safetensors: 256 sub-folders keep directories small at 10^6 clips."""
    return Path(root) / "clips" / hashlib.md5(clip_id.encode("utf-8")).hexdigest()[:2] / f"{clip_id}.safetensors"


def atomic_write_bytes(path, payload):
    """Write to a temp file in the same folder, fsync, then os.replace: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so a dataset written by one
        # user on a cluster stays readable by the others
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_clip(root, clip):
    """Validate and write one clip atomically; returns its path (see clip_path)."""
    if not isinstance(clip.clip_id, str) or not CLIP_ID_RE.match(clip.clip_id):
        raise ValueError(f"clip_id must match {CLIP_ID_RE.pattern} (filesystem-safe), got {clip.clip_id!r}")
    T = len(clip.frames_jpeg)
    if T < 1:
        raise ValueError(f"clip {clip.clip_id}: no frames")
    arrays = {}
    for name, (dtype, tail) in _ARRAYS.items():
        arr = np.asarray(getattr(clip, name))
        if arr.shape != (T, *tail):
            raise ValueError(f"clip {clip.clip_id}: {name} has shape {arr.shape}, expected {(T, *tail)} "
                             f"(T = {T} frames)")
        arrays[name] = np.ascontiguousarray(arr, dtype=dtype)
        if bad := nonfinite_rows(name, arrays[name]):
            what = "infinite values" if name == "boxes" else "non-finite values"
            raise ValueError(f"clip {clip.clip_id}: {name} has {what} at {_rows_text(bad)}; not written")
    for i, fr in enumerate(clip.frames_jpeg):
        if not isinstance(fr, (bytes, bytearray)) or fr[:2] != b"\xff\xd8":
            raise ValueError(f"clip {clip.clip_id}: frame {i} is not JPEG bytes")
    split = clip.split or split_of(clip.clip_id)
    if split not in ("train", "val"):
        raise ValueError(f"clip {clip.clip_id}: split must be 'train', 'val' or '', got {clip.split!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in clip.extra.items()):
        raise ValueError(f"clip {clip.clip_id}: extra must map str -> str")
    if int(clip.width) <= 0 or int(clip.height) <= 0:
        raise ValueError(f"clip {clip.clip_id}: bad frame size {clip.width}x{clip.height}")
    lengths = np.array([len(fr) for fr in clip.frames_jpeg], dtype=np.int64)
    arrays["jpeg_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (T + 1,)
    arrays["jpeg"] = np.frombuffer(b"".join(clip.frames_jpeg), dtype=np.uint8)
    meta = {"format": FORMAT, "clip_id": clip.clip_id, "action_class": str(clip.action_class),
            "description": str(clip.description), "video_id": str(clip.video_id), "split": split,
            "src_fps": repr(float(clip.src_fps)), "width": str(int(clip.width)), "height": str(int(clip.height)),
            "num_frames": str(T), "extra": json.dumps(clip.extra, sort_keys=True)}
    path = clip_path(root, clip.clip_id)
    atomic_write_bytes(path, _st_save(arrays, metadata=meta))
    return path


def _read_header(path):
    """The safetensors JSON header (8-byte little-endian length + JSON) without mapping the file."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    missing = sorted((set(_ARRAYS) | {"jpeg", "jpeg_offsets"}) - set(header))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    return meta, header


class _Reader:
    """An open clip file (one safe_open); use through ClipFile.open(). Reads only the slices asked for, and refuses
    non-finite values (a file written by something other than write_clip), naming the clip, array and frames."""

    def __init__(self, handle, path):
        self.h, self.path = handle, path
        self._offsets = None

    def read(self, name, start=None, stop=None):
        arr = self.h.get_slice(name)[start:stop]
        if bad := nonfinite_rows(name, arr):
            first = range(self.h.get_slice(name).get_shape()[0])[start:stop].start if len(arr) else 0
            raise ValueError(f"clip {self.path.stem} ({self.path}): {name} has "
                             f"{'infinite' if name == 'boxes' else 'non-finite'} values at {_rows_text(bad, first)}")
        return arr

    def frame_bytes(self, indices):
        if self._offsets is None:
            self._offsets = self.h.get_tensor("jpeg_offsets")
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self._offsets) - 1]
        if bad:
            raise IndexError(f"frame indices {bad} out of range 0..{len(self._offsets) - 2}")
        sl = self.h.get_slice("jpeg")
        return [sl[int(self._offsets[i]):int(self._offsets[i + 1])].tobytes() for i in indices]


class ClipFile:
    """Lazy reader of one clip file. Holds no open file between calls (safe across DataLoader worker forks).
    .meta (typed metadata), .num_frames, .read(name, start, stop), .frames(indices) -> PIL images, .to_clip()."""

    def __init__(self, path):
        self.path = Path(path)
        raw, header = _read_header(self.path)
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        self.num_frames = self.shapes["jpeg_offsets"][0] - 1
        self.meta = {"clip_id": raw["clip_id"], "action_class": raw["action_class"],
                     "description": raw["description"], "video_id": raw.get("video_id", ""), "split": raw["split"],
                     "src_fps": float(raw["src_fps"]), "width": int(raw["width"]), "height": int(raw["height"]),
                     "extra": json.loads(raw.get("extra", "{}"))}

    def open(self):
        """Context manager -> reader with .read(name, start, stop) and .frame_bytes(indices): one open per item."""
        return _ReaderContext(self.path)

    # whole arrays, read on access (nothing cached: a window should use read(name, start, stop))
    boxes = property(lambda self: self.read("boxes"))
    pose3d = property(lambda self: self.read("pose3d"))
    angles = property(lambda self: self.read("angles"))
    src_frame_index = property(lambda self: self.read("src_frame_index"))
    src_time = property(lambda self: self.read("src_time"))

    def read(self, name, start=None, stop=None):
        """Rows start:stop of one array (boxes, pose3d, angles, src_frame_index, src_time)."""
        with self.open() as r:
            return r.read(name, start, stop)

    def frame_bytes(self, indices):
        with self.open() as r:
            return r.frame_bytes(indices)

    def frames(self, indices):
        """JPEG-decoded RGB PIL images of the given frame indices (reads only those frames' bytes)."""
        return [Image.open(io.BytesIO(b)).convert("RGB") for b in self.frame_bytes(indices)]

    def to_clip(self):
        with self.open() as r:
            arrays = {name: r.read(name) for name in _ARRAYS}
            frames = r.frame_bytes(range(self.num_frames))
        m = self.meta
        return Clip(clip_id=m["clip_id"], frames_jpeg=frames, src_fps=m["src_fps"], width=m["width"],
                    height=m["height"], action_class=m["action_class"], description=m["description"],
                    video_id=m["video_id"], split=m["split"], extra=m["extra"], **arrays)


class _ReaderContext:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.cm = safe_open(str(self.path), framework="numpy")
        return _Reader(self.cm.__enter__(), self.path)

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def read_clip(path):
    """The whole clip in memory (a Clip)."""
    return ClipFile(path).to_clip()


def write_index(root):
    """Scan root for clip files (headers only) and write root/index.jsonl atomically; returns the entries."""
    root = Path(root)
    entries = []
    for p in sorted(root.rglob("*.safetensors")):
        meta, header = _read_header(p)
        entry = {"clip_id": meta["clip_id"], "path": p.relative_to(root).as_posix(),
                 "num_frames": header["jpeg_offsets"]["shape"][0] - 1, "action_class": meta["action_class"],
                 "split": meta["split"], "video_id": meta.get("video_id", "")}
        extra = json.loads(meta.get("extra") or "{}")
        if any(k in extra for k in QUALITY_FLAGS):  # pipeline clips: which of the original's datasets they are in
            entry["quality"] = [k for k in QUALITY_FLAGS if extra.get(k) == "True"]
        entries.append(entry)
    payload = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode("utf-8")
    atomic_write_bytes(root / INDEX_FILE, payload)
    return entries


def list_clips(root, split=None, require=None):
    """Index entries (dicts: clip_id, path relative to root, num_frames, action_class, split, video_id, and for
    pipeline clips quality) of the dataset in root, from root/index.jsonl (written by write_index when missing; after
    adding clips to an indexed folder, run write_index / `python data.py index ROOT` again).
    split: None | "train" | "val". require: None | one of QUALITY_FLAGS: only the clips that passed it (the
    original's datasets: "strict" = checks AND judge, "vlm_good" = judge only; "prog_good" = checks only)."""
    root = Path(root)
    if not (root / INDEX_FILE).is_file():
        if not root.is_dir():
            raise FileNotFoundError(f"no dataset folder {root}")
        entries = write_index(root)
    else:
        with open(root / INDEX_FILE, encoding="utf-8") as fh:
            entries = [json.loads(line) for line in fh if line.strip()]
    if require is not None:
        if require not in QUALITY_FLAGS:
            raise ValueError(f"require must be one of {QUALITY_FLAGS}, got {require!r}")
        if not any("quality" in e for e in entries):
            raise ValueError(f"{root}: no clip carries pipeline quality flags (require={require!r} needs clips "
                             "written by pipeline.py; rebuild an older index with `python data.py index ROOT`)")
        entries = [e for e in entries if require in e.get("quality", ())]
    return [e for e in entries if split is None or e["split"] == split]


# ---------------------------------------------------------------------------------------------------------------
# Training windows (mimic.md sec 5)


def window_starts(T, stride=16, horizon=16, context=4):
    """Window starts s: the model sees frames s-context..s-1 and predicts frames s..s+horizon-1."""
    return range(context, T - horizon + 1, stride)


class WindowDataset(torch.utils.data.Dataset):
    """Training windows of all clips of a split. Index i < N: window i; N <= i < 2N (flip=True): its mirror image.
    Item: images (4 PIL frames s-4..s-1, green box, image_size^2), text, state (44,), actions (16, 44), clip_id,
    start, flipped; with `encode` (images, text) -> dict of tensors, its fields replace the images."""

    def __init__(self, root, split="train", stride=16, flip=True, encode=None, image_size=224, horizon=16,
                 context=4, require=None):
        self.root, self.flip, self.encode, self.image_size = Path(root), flip, encode, image_size
        self.horizon, self.context = horizon, context
        entries = list_clips(self.root, split, require)
        self.paths = [e["path"] for e in entries]
        T = np.array([e["num_frames"] for e in entries], dtype=np.int64)
        # vectorised window_starts for every clip (10^6 clips -> no Python loop): count, then offsets within a clip
        counts = np.maximum(0, -(-(T - horizon + 1 - context) // stride))
        self.win_clip = np.repeat(np.arange(len(entries), dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        self.win_start = context + stride * (np.arange(counts.sum(), dtype=np.int64) - np.repeat(first, counts))

    def __len__(self):
        return len(self.win_clip) * (2 if self.flip else 1)

    def __getitem__(self, i):
        n = len(self.win_clip)
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)})")
        i %= len(self)
        flipped = i >= n
        j = i - n if flipped else i
        s, H, C = int(self.win_start[j]), self.horizon, self.context
        cf = ClipFile(self.root / self.paths[self.win_clip[j]])  # opened here, in the worker: nothing crosses a fork
        with cf.open() as r:
            boxes = r.read("boxes", s - C, s)
            if flipped:  # mirror the 3D pose BEFORE IK, as the original
                angles = pose3d_to_angles(flip_pose3d(r.read("pose3d", s, s + H).astype(np.float64)))
            else:
                angles = r.read("angles", s, s + H)
            jpegs = r.frame_bytes(range(s - C, s))
        # the model's own input rules (model.frame_image): box drawn, mirrored with the frame when flipped, resized
        images = [frame_image(Image.open(io.BytesIO(b)), box, self.image_size, mirror=flipped)
                  for b, box in zip(jpegs, boxes)]
        m = cf.meta
        text = prompt_text(m["action_class"], m["description"])
        if flipped:
            text = flip_text(text)
        actions = torch.from_numpy(encode_angles(np.asarray(angles, dtype=np.float64))).float()  # (H, 44)
        item = {"text": text, "state": actions[0].clone(), "actions": actions, "clip_id": m["clip_id"], "start": s,
                "flipped": flipped}
        if self.encode is None:
            item["images"] = images
        else:
            item.update(self.encode(images, text))
        return item


def collate(items, pad_token_id=0):
    """Batch WindowDataset items: the model's input fields (model.INPUT_KEYS, from an InputEncoder) through
    model.collate_inputs; state (B, 44), actions (B, 16, 44), start (B,), flipped (B,) stacked; clip_id, text and
    images as lists."""
    out = {}
    if INPUT_KEYS[0] in items[0]:
        out.update(collate_inputs([{k: it[k] for k in INPUT_KEYS} for it in items], pad_token_id))
    for k in items[0]:
        if k in INPUT_KEYS:
            continue
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (bool, int)) and k in ("start", "flipped"):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _info(path):
    path = Path(path)
    if path.is_file():
        cf = ClipFile(path)
        T, m = cf.num_frames, cf.meta
        size = path.stat().st_size
        t = cf.read("src_time")
        dur = T / 10.0  # clips are sampled at 10 Hz
        print(f"clip {m['clip_id']}: {T} frames ({dur:.1f} s at 10 Hz, source times {t.min():.2f}..{t.max():.2f} s "
              f"@ {m['src_fps']:g} fps), {m['width']}x{m['height']}, split {m['split']}")
        print(f"  class: {m['action_class']}\n  description: {m['description']}\n  video: {m['video_id']}")
        print(f"  file: {size} bytes ({size / dur:.0f} B per clip-second), windows (stride 16): "
              f"{len(window_starts(T))}, extra: {m['extra']}")
        return
    entries = list_clips(path)
    for split in ("train", "val"):
        es = [e for e in entries if e["split"] == split]
        frames = sum(e["num_frames"] for e in es)
        wins = sum(len(window_starts(e["num_frames"])) for e in es)
        print(f"{split}: {len(es)} clips, {frames} frames ({frames / 36000:.2f} h at 10 Hz), {wins} windows "
              f"(stride 16; x2 with flip)")
    classes = {}
    for e in entries:
        classes[e["action_class"]] = classes.get(e["action_class"], 0) + 1
    top = sorted(classes.items(), key=lambda kv: -kv[1])[:10]
    print(f"{len(classes)} action classes; top: " + ", ".join(f"{k} ({v})" for k, v in top))


def main(argv=None):
    ap = argparse.ArgumentParser(description="MIMIC clip datasets: inspect, index")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="summary of a dataset folder or of one .safetensors clip")
    i.add_argument("path")
    x = sub.add_parser("index", help="(re)write PATH/index.jsonl from the clip files' headers")
    x.add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        _info(args.path)
    else:
        print(f"indexed {len(write_index(args.path))} clips in {Path(args.path) / INDEX_FILE}")


if __name__ == "__main__":
    sys.exit(main())
