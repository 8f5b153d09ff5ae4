"""
The 22 joint angles of MIMIC and the 17 Human3.6M joints they come from, both ways: pose3d_to_angles
(IK) and angles_to_pose3d (FK, its exact inverse on everything IK can produce: IK(FK(a)) == a), plus
mirroring. Poses are in the camera frame of their video (x right, y DOWN, z away from the camera):
the convention the released model's angles are defined in (docs/conventions.md). numpy or torch in,
the same out; the torch path is differentiable.

What IK does not encode (twist about a bone, the bend plane of knees and elbows, where hips and
shoulders sit, hence one DoF of each upper arm) comes from a `template` pose if given (then
FK(IK(p), template=p) == p), else from a canonical body facing the camera.
"""

import math

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# Skeleton and angle layout

H36M_JOINT_NAMES = ("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine",
                    "thorax", "neck", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder",
                    "r_elbow", "r_wrist")
H36M_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
H36M_FLIP_PERM = (0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13)  # left <-> right

# The code order of the original (the README table lists them differently). 3-DoF joints are
# (pitch, roll, yaw).
JOINT_NAMES = ("spine_pitch", "spine_roll", "spine_yaw",
               "l_hip_pitch", "l_hip_roll", "l_hip_yaw", "l_knee",
               "r_hip_pitch", "r_hip_roll", "r_hip_yaw", "r_knee",
               "l_shoulder_pitch", "l_shoulder_roll", "l_shoulder_yaw", "l_elbow",
               "r_shoulder_pitch", "r_shoulder_roll", "r_shoulder_yaw", "r_elbow",
               "neck_pitch", "neck_roll", "neck_yaw")
JOINT_GROUPS = {"spine": [0, 1, 2], "legs": [3, 4, 5, 6, 7, 8, 9, 10],
                "arms": [11, 12, 13, 14, 15, 16, 17, 18], "neck": [19, 20, 21]}
_ROT_IDX = (0, 3, 7, 11, 15, 19)  # first angle of spine, l_hip, r_hip, l_shoulder, r_shoulder, neck
_HINGE_IDX = (6, 10, 14, 18)      # l_knee, r_knee, l_elbow, r_elbow
# Mirroring (x -> -x) conjugates a rotation by M = diag(-1, 1, 1): Rz(y)Ry(r)Rx(p) ->
# Rz(-y)Ry(-r)Rx(p), so pitch is kept, roll and yaw change sign, and the left/right joints swap
# places. Hinge angles are mirror invariant.
ANGLE_FLIP_PERM = (0, 1, 2, 7, 8, 9, 10, 3, 4, 5, 6, 15, 16, 17, 18, 11, 12, 13, 14, 19, 20, 21)
ANGLE_FLIP_SIGN = tuple(-1.0 if i in (1, 2, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21) else 1.0
                        for i in range(22))

# Default bone lengths in metres, indexed by the child joint (length of joint j - joint parent[j]):
# a ~1.75 m adult with Human3.6M-like proportions (thigh/shin/upper arm/forearm close to the
# DeepMimic humanoid: .42/.41/.27/.26).
DEFAULT_BONE_LENGTHS = {"r_hip": 0.11, "r_knee": 0.43, "r_ankle": 0.42, "l_hip": 0.11,
                        "l_knee": 0.43, "l_ankle": 0.42, "spine": 0.22, "thorax": 0.24,
                        "neck": 0.12, "head": 0.11, "l_shoulder": 0.16, "l_elbow": 0.28,
                        "l_wrist": 0.25, "r_shoulder": 0.16, "r_elbow": 0.28, "r_wrist": 0.25}

# the original's thresholds: |a x b| of unit vectors below _PARALLEL_EPS is parallel -> I or
# anti-parallel -> -I; sqrt(R00^2 + R10^2) below _GIMBAL_EPS takes the Euler gimbal branch
_PARALLEL_EPS = 1e-8
_GIMBAL_EPS = 1e-6
_NEG_I_TOL = 1e-5     # FK reads an angle triple within this of (+-pi, 0, +-pi) as IK's "-I"
_TINY = 1e-30         # clamps under square roots so gradients stay finite at 0


# --------------------------------------------------------------------------------------------------
# Small vector helpers (torch; the public functions convert numpy inputs to float64 tensors)


def _to_torch(x):
    """-> (tensor, back): numpy/lists become float64 tensors and `back` returns numpy of the
    input float dtype."""
    if isinstance(x, torch.Tensor):
        return (x if x.is_floating_point() else x.double()), (lambda y: y)
    arr = np.asarray(x)
    out_dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64

    def back(y):
        return y.detach().cpu().numpy().astype(out_dtype)

    return torch.from_numpy(np.array(arr, dtype=np.float64)), back


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
    """Minimal (Rodrigues) rotation taking direction a onto direction b; I if parallel, -I if
    anti-parallel. a, b: (..., 3) -> (..., 3, 3).
    R = I + [v]x + [v]x^2 (1 - c) / s^2 with v = a x b, c = a.b, s = |v|."""
    a, b = _unit(a), _unit(b)
    v, c = _cross(a, b), _dot(a, b)
    s2 = _dot(v, v)
    par = s2 < _PARALLEL_EPS ** 2
    # (1 - c) / s^2 == 1 / (1 + c): use the form without cancellation on each side (c > 0 / c <= 0)
    f = torch.where(c > 0, 1 / (1 + c.clamp_min(0)),
                    (1 - c) / torch.where(par, torch.ones_like(s2), s2))
    K = _skew(v)
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    R = eye + K + (K @ K) * f[..., None, None]
    # -eye has signed zeros off the diagonal, so its Euler angles are exactly the
    # original's (-pi, 0, -pi)
    special = torch.where((c > 0)[..., None, None], eye, -eye)
    return torch.where(par[..., None, None], special, R)


def _euler_from_matrix(R):
    """(..., 3, 3) -> (..., 3) = (pitch, roll, yaw), R = Rz(yaw) Ry(roll) Rx(pitch); the original's
    gimbal branch."""
    sy = torch.sqrt((R[..., 0, 0] ** 2 + R[..., 1, 0] ** 2).clamp_min(_TINY))
    sing = sy < _GIMBAL_EPS
    pitch = torch.where(sing, torch.atan2(-R[..., 1, 2], R[..., 1, 1]),
                        torch.atan2(R[..., 2, 1], R[..., 2, 2]))
    roll = torch.atan2(-R[..., 2, 0], sy)
    yaw = torch.where(sing, torch.zeros_like(sy), torch.atan2(R[..., 1, 0], R[..., 0, 0]))
    return torch.stack([pitch, roll, yaw], -1)


def _matrix_from_euler(e):
    """(..., 3) (pitch, roll, yaw) -> Rz(yaw) Ry(roll) Rx(pitch) (..., 3, 3), the inverse of
    _euler_from_matrix."""
    cx, cy, cz = torch.cos(e).unbind(-1)
    sx, sy, sz = torch.sin(e).unbind(-1)
    return torch.stack([cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz,
                        cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz,
                        -sy, sx * cy, cx * cy], -1).unflatten(-1, (3, 3))


# --------------------------------------------------------------------------------------------------
# IK: pose3d -> 22 angles (docs/conventions.md)


def pose3d_to_angles(pose3d):
    """pose3d (..., 17, 3) (numpy or torch; camera frame, y down) -> angles (..., 22) in radians,
    same type. 3-DoF joints: Euler angles of the minimal rotation from reference a to bone b, with
    up = +y (image DOWN): spine (up, spine - pelvis), hips (-up, knee - hip), shoulders (shoulder
    - thorax, elbow - shoulder), neck (up, head - neck). Knee/elbow: pi - angle(proximal bone,
    distal bone), bones along the chain (pi = straight). Vectorised and differentiable (torch in
    -> torch out)."""
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


# --------------------------------------------------------------------------------------------------
# FK: 22 angles -> pose3d, the exact inverse of the IK above


def _bone_lengths(bone_lengths, ref):
    """None | dict {child joint name: metres} (others default) | (..., 17) per child joint (entry 0
    ignored) | (..., 16) per bone (joints 1..16) -> (..., 17) tensor."""
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
    """(..., 17, 3) -> (..., 17): |joint j - joint parent[j]| (0 for the pelvis), as FK takes."""
    P, back = _to_torch(pose3d)
    d = P[..., 1:, :] - P[..., list(H36M_PARENTS[1:]), :]
    return back(torch.cat([torch.zeros_like(P[..., :1, 0]), _norm(d)], -1))


def _first_unit(*vecs):
    """Unit vector along the first of `vecs` whose norm is > 1e-6 (callers pass projections of
    unit vectors, so this is relative); the last one must never be degenerate (pass two
    orthogonal fallbacks)."""
    out = _unit(vecs[-1])
    for v in reversed(vecs[:-1]):
        out = torch.where((_norm(v) > 1e-6)[..., None], _unit(v), out)
    return out


def _perp_unit(axis, *cands):
    """Unit vector along the part perpendicular to unit `axis` of the first candidate that has one
    (candidates are normalised first, so "has one" means > 1e-6 of its length)."""
    return _first_unit(*[c - _dot(c, axis)[..., None] * axis for c in map(_unit, cands)])


def _rotate_min(p, q, x):
    """Apply the minimal rotation taking unit p onto unit q to x; where p ~ -q (undefined): x."""
    v, c = _cross(p, q), _dot(p, q)
    ok = (1 + c) > 1e-6
    d = torch.where(ok, 1 + c, torch.ones_like(c))[..., None]
    rx = x + _cross(v, x) + _cross(v, _cross(v, x)) / d
    return torch.where(ok[..., None], rx, x)


def _body_frame(u):
    """Canonical body axes for body-up u (unit, camera frame): lateral-left l and forward f,
    obtained by the minimal rotation taking an upright person facing the camera (up -y, left +x,
    forward -z) onto u (closed form). Upside down (u = +y) the rotation is undefined: use the frame
    turned by pi about z (left -x, forward -z)."""
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
    """The part of `hint` perpendicular to the rotation axis n of E (un-normalised). A minimal
    rotation from a only exists about an axis perpendicular to a, so FK must put the shoulder
    reference (shoulder - thorax) in that plane for IK to read E back. Small angles: n from the skew
    part (2 sin(t) n); large: (2I - E - E^T) = 2(1-cos t)(I-nn^T). E = I (n undefined, any reference
    works): the hint itself."""
    w = torch.stack([E[..., 2, 1] - E[..., 1, 2], E[..., 0, 2] - E[..., 2, 0], E[..., 1, 0] - E[..., 0, 1]], -1)
    n = _unit(w)
    small = hint - _dot(hint, n)[..., None] * n
    eye = torch.eye(3, dtype=E.dtype, device=E.device)
    big = ((2 * eye - E - E.transpose(-1, -2)) @ hint[..., None])[..., 0]
    cos_t = (E[..., 0, 0] + E[..., 1, 1] + E[..., 2, 2] - 1) / 2
    return torch.where((cos_t > 0)[..., None], small, big)


def angles_to_pose3d(angles, bone_lengths=None, template=None):
    """angles (..., 22) -> pose3d (..., 17, 3) (numpy or torch, same type; differentiable in torch),
    pelvis at the origin (or at the template's pelvis). IK(FK(a)) == a for every a IK produces.
    bone_lengths: None (DEFAULT_BONE_LENGTHS; the template's if a template is given), a dict {child
    joint: length}, (..., 17) per child joint or (..., 16) per bone. template: optional (..., 17, 3)
    pose supplying every degree of freedom the angles do not encode (hip and shoulder placement,
    spine->thorax->neck directions, knee/elbow bend planes); FK(IK(p), template=p) == p. Without it
    FK builds a canonical body facing the camera: hips and shoulders along its lateral axis
    (shoulders projected onto the plane each shoulder rotation allows), thorax and neck on the spine
    line, knees bending backwards and elbows forwards. The spine, thigh and neck directions of p are
    always kept; an upper arm only as far as p's shoulder - thorax direction matches the canonical
    one (the angles cannot tell a person facing away with arms down from one facing the camera with
    arms raised)."""
    A, back = _to_torch(angles)
    if A.shape[-1] != 22:
        raise ValueError(f"angles must have last dim 22, got {tuple(A.shape)}")
    T = None
    if template is not None:
        T = _like(template if isinstance(template, torch.Tensor) else np.asarray(template, np.float64), A)
        if T.shape[-2:] != (17, 3):
            raise ValueError(f"template must have shape (..., 17, 3), got {tuple(T.shape)}")
    L = bone_lengths_of(T) if bone_lengths is None and T is not None else _bone_lengths(bone_lengths, A)
    batch = torch.broadcast_shapes(A.shape[:-1], L.shape[:-1],
                                   *([] if T is None else [T.shape[:-2]]))
    A, L = A.expand(*batch, 22), L.expand(*batch, 17).unbind(-1)
    T = None if T is None else T.expand(*batch, 17, 3)

    rot = A[..., [i + k for i in _ROT_IDX for k in range(3)]].unflatten(-1, (6, 3))               # (..., 6, 3)
    E = _matrix_from_euler(rot)                                                                    # (..., 6, 3, 3)
    # IK writes the anti-parallel case as -I, whose Euler angles (-pi, 0, -pi) recompose
    # to Ry(pi), not -I
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
    if T is not None:         # the template's lateral axis (left hip - right hip), _|_ the spine
        t = T.unbind(-2)
        l = _perp_unit(u, t[4] - t[1], l, f)
        f = _cross(l, u)      # (f, l, u) is right-handed: f x l = u, l x u = f

    def hint(i, j, canonical):  # direction of the template's bone i -> j, else the canonical one
        return canonical if T is None else _first_unit(_unit(T[..., j, :] - T[..., i, :]),
                                                       canonical)

    pelvis = torch.zeros_like(u) if T is None else T[..., 0, :]
    spine = pelvis + L[7][..., None] * u
    thorax = spine + L[8][..., None] * hint(7, 8, u)
    neck = thorax + L[9][..., None] * hint(8, 9, u)
    head = neck + L[10][..., None] * head_dir
    r_hip = pelvis + L[1][..., None] * hint(0, 1, -l)
    l_hip = pelvis + L[4][..., None] * hint(0, 4, l)

    def leg(hip, thigh, knee_angle, i_knee, i_ankle, Lt, Ls):
        knee = hip + Lt[..., None] * thigh
        # knee flexes backwards: the body's backward direction carried along by the rotation from
        # body-down to the thigh (stays sensible when the thigh is horizontal, e.g. sitting); any
        # unit w _|_ thigh inverts IK
        canon = _rotate_min(-u, thigh, -f)
        w = _perp_unit(thigh, canon, l, f) if T is None else \
            _perp_unit(thigh, T[..., i_ankle, :] - T[..., i_knee, :], canon, l, f)
        shin = -torch.cos(knee_angle)[..., None] * thigh + torch.sin(knee_angle)[..., None] * w
        return knee, knee + Ls[..., None] * shin

    r_knee, r_ankle = leg(r_hip, thigh_r, k_r, 2, 3, L[2], L[3])
    l_knee, l_ankle = leg(l_hip, thigh_l, k_l, 5, 6, L[5], L[6])

    def arm(Es, elbow_angle, side_hint, i_sh, i_el, i_wr, Lsh, Lua, Lfa):
        cands = [side_hint, f] if T is None else [_unit(T[..., i_sh, :] - T[..., 8, :]), side_hint,
                                                  f]
        # the first hint whose projection is usable; E = I or -I accept any reference, so the
        # raw hint ends it
        a = _first_unit(*[_shoulder_ref(Es, c) for c in cands], side_hint)
        shoulder = thorax + Lsh[..., None] * a
        b = (Es @ a[..., None])[..., 0]  # upper arm = E a: IK reads the rotation a -> b back: E
        elbow = shoulder + Lua[..., None] * b
        # elbow flexes forwards: the forward direction (made _|_ a) turned by the shoulder rotation
        canon = (Es @ _perp_unit(a, f, u)[..., None])[..., 0]
        w = _perp_unit(b, canon, l, f) if T is None else _perp_unit(b, T[..., i_wr, :] - T[..., i_el, :], canon, l, f)
        forearm = -torch.cos(elbow_angle)[..., None] * b + torch.sin(elbow_angle)[..., None] * w
        return shoulder, elbow, elbow + Lfa[..., None] * forearm

    l_sh, l_el, l_wr = arm(E_lsh, e_l, l, 11, 12, 13, L[11], L[12], L[13])
    r_sh, r_el, r_wr = arm(E_rsh, e_r, -l, 14, 15, 16, L[14], L[15], L[16])
    out = torch.stack([pelvis, r_hip, r_knee, r_ankle, l_hip, l_knee, l_ankle, spine, thorax, neck, head,
                       l_sh, l_el, l_wr, r_sh, r_el, r_wr], -2)                                     # (..., 17, 3)
    return back(out)


# --------------------------------------------------------------------------------------------------
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
    if isinstance(q, torch.Tensor):
        return q * _like(ANGLE_FLIP_SIGN, q)
    return q * np.asarray(ANGLE_FLIP_SIGN, q.dtype)
