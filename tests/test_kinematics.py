# Tests of kinematics.py: IK against a plain per-joint reference, FK as its exact inverse,
# mirroring, on random poses and on real motion (the DeepMimic motion capture shipped in
# assets/mocap).
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kinematics
import model_io

MOCAP = Path(__file__).resolve().parents[1] / "assets" / "mocap"
ik, fk = kinematics.pose3d_to_angles, kinematics.angles_to_pose3d  # the two directions under test


# --------------------------------------------------------------------------------------------------
# An independent, deliberately plain IK (one joint of one frame at a time) straight from the
# convention (docs/conventions.md: minimal rotation from a reference direction onto the bone, read
# as Euler angles)


def ref_rotation(a, b):
    a = np.asarray(a, float) / np.linalg.norm(a)
    b = np.asarray(b, float) / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    s = float(np.linalg.norm(v))
    if s < 1e-8:
        return np.eye(3) if c > 0 else -np.eye(3)
    K = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + K + K @ K * ((1 - c) / s ** 2)


def ref_euler(R):
    sy = math.sqrt(R[0, 0] ** 2 + R[1, 0] ** 2)
    if sy < 1e-6:
        return [math.atan2(-R[1, 2], R[1, 1]), math.atan2(-R[2, 0], sy), 0.0]
    return [math.atan2(R[2, 1], R[2, 2]), math.atan2(-R[2, 0], sy), math.atan2(R[1, 0], R[0, 0])]


def ref_bend(prox, dist):
    c = np.dot(prox, dist) / (np.linalg.norm(prox) * np.linalg.norm(dist))
    return math.pi - math.acos(max(-1.0, min(1.0, c)))


def ref_ik(p):
    up = np.array([0.0, 1.0, 0.0])
    out = []
    out += ref_euler(ref_rotation(up, p[7] - p[0]))
    out += ref_euler(ref_rotation(-up, p[5] - p[4]))
    out += [ref_bend(p[5] - p[4], p[6] - p[5])]
    out += ref_euler(ref_rotation(-up, p[2] - p[1]))
    out += [ref_bend(p[2] - p[1], p[3] - p[2])]
    out += ref_euler(ref_rotation(p[11] - p[8], p[12] - p[11]))
    out += [ref_bend(p[12] - p[11], p[13] - p[12])]
    out += ref_euler(ref_rotation(p[14] - p[8], p[15] - p[14]))
    out += [ref_bend(p[15] - p[14], p[16] - p[15])]
    out += ref_euler(ref_rotation(up, p[10] - p[9]))
    return np.array(out)


def angle_err(a, b):
    return np.abs(kinematics.wrap_angle(np.asarray(a, float) - np.asarray(b, float)))


def unit_dirs(p, pairs):
    v = np.stack([p[..., j, :] - p[..., i, :] for i, j in pairs], -2)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


ENCODED_BONES = [(0, 7), (4, 5), (1, 2), (9, 10)]   # spine, thighs, neck: directions FK must keep
UPPER_ARMS = [(11, 12), (14, 15)]


def random_poses(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 17, 3))


# --------------------------------------------------------------------------------------------------
# DeepMimic mocap -> 17 joints in the camera frame (a simple FK of our own; humanoid3d
# offsets, metres)


def quat_to_mat(q):  # (..., 4) w, x, y, z -> (..., 3, 3)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
                     -1).reshape(
        *q.shape[:-1], 3, 3)


def rot_z(t):
    c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*t.shape, 3, 3)


def mocap_poses():
    """All DeepMimic clips -> (N, 17, 3) in camera frames (x right, y down, z forward) seen from 4
    azimuths, and the (N,) azimuth index (0: the person faces the camera)."""
    files = sorted(MOCAP.glob("deepmimic_humanoid3d_*.txt"))
    assert len(files) >= 14, f"assets/mocap ships 14 DeepMimic humanoid3d motions, not {len(files)}"
    poses, views = [], []
    for f in files:
        fr = np.array(json.loads(f.read_text())["Frames"], dtype=np.float64)
        root, q = fr[:, 1:4], fr[:, 4:]
        Rr, Rc, Rn = quat_to_mat(q[:, 0:4]), quat_to_mat(q[:, 4:8]), quat_to_mat(q[:, 8:12])
        Rrh, krh, Rrs, krel = quat_to_mat(q[:, 12:16]), q[:, 16], quat_to_mat(q[:, 21:25]), q[:, 25]
        Rlh, klh, Rls, klel = quat_to_mat(q[:, 26:30]), q[:, 30], quat_to_mat(q[:, 35:39]), q[:, 39]

        def at(R, v):
            return (R @ np.asarray(v, float)[:, None])[..., 0]

        Wc = Rr @ Rc
        chest = root + at(Rr, [0, 0.236151, 0])
        neckj = chest + at(Wc, [0, 0.223894, 0])
        Wn = Wc @ Rn
        J = {0: root, 7: chest, 8: chest + at(Wc, [0, 0.2, 0]), 9: neckj + at(Wn, [0.08, 0.1, 0]),
             10: neckj + at(Wn, [0, 0.25, 0])}
        for side, (ih, iknee, ia, Rh, kn), (ish, iel, iwr, Rs, ke) in [
                (1, (1, 2, 3, Rrh, krh), (14, 15, 16, Rrs, krel)),
                (-1, (4, 5, 6, Rlh, klh), (11, 12, 13, Rls, klel))]:
            J[ih] = root + at(Rr, [0, 0, 0.084887 * side])
            Wh = Rr @ Rh
            J[iknee] = J[ih] + at(Wh, [0, -0.421546, 0])
            J[ia] = J[iknee] + at(Wh @ rot_z(kn), [0, -0.40987, 0])
            J[ish] = chest + at(Wc, [-0.02405, 0.2435, 0.18311 * side])
            Ws = Wc @ Rs
            J[iel] = J[ish] + at(Ws, [0, -0.274788, 0])
            J[iwr] = J[iel] + at(Ws @ rot_z(ke), [0, -0.258947, 0])
        world = np.stack([J[i] for i in range(17)], 1)
        world = world - world[:, :1]
        for k, az in enumerate((0.0, 0.7, 2.0, 3.6)):  # camera azimuths; world Y up, person faces +X, +Z = its right
            c, s = math.cos(az), math.sin(az)
            Ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
            C = np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], float) @ Ry  # rows: camera x, y (down), z axes
            poses.append(world @ C.T)
            views.append(np.full(len(world), k))
    return np.concatenate(poses), np.concatenate(views)


# --------------------------------------------------------------------------------------------------
# IK


def test_ik_matches_reference_random():
    p = random_poses(300)
    got = ik(p)
    want = np.stack([ref_ik(x) for x in p])
    assert got.shape == (300, 22) and got.dtype == np.float64
    assert angle_err(got, want).max() < 1e-9


def test_ik_special_cases():
    p = fk(np.full(22, 0.5))
    up = p.copy()
    up[7] = up[0] + [0, -0.3, 0]              # spine exactly anti-parallel to up (+y): -I -> (-pi, 0, -pi)
    up[10] = up[9] + [0, 0.2, 0]              # head exactly along up: identity -> (0, 0, 0)
    up[11], up[12] = up[8] + [0.2, 0, 0], up[8] + [0.2, 0, 0.3]  # shoulder a = +x, b = +z: gimbal branch
    a = ik(up)
    assert np.allclose(a[0:3], [-math.pi, 0, -math.pi]) and np.allclose(a[19:22], 0)
    assert np.allclose(a[11:14], ref_ik(up)[11:14]) and a[13] == 0.0  # gimbal: yaw = 0
    assert angle_err(a, ref_ik(up)).max() < 1e-12
    assert angle_err(ik(fk(a)), a).max() < 1e-9
    straight = p.copy()
    straight[3] = straight[2] + (straight[2] - straight[1])  # straight leg: knee = pi (the original's convention)
    assert abs(ik(straight)[10] - math.pi) < 1e-7


def test_ik_matches_reference_mocap():
    p, view = mocap_poses()
    got = ik(p)
    want = np.stack([ref_ik(x) for x in p[::7]])
    assert angle_err(got[::7], want).max() < 1e-7
    # round trips on real motion
    assert angle_err(ik(fk(got)), got).max() < 1e-6
    q = fk(got)
    cos = (unit_dirs(p, ENCODED_BONES) * unit_dirs(q, ENCODED_BONES)).sum(-1)
    assert cos.min() > 1 - 1e-6
    assert np.abs(fk(got, template=p) - p).max() < 1e-9
    # upper arms: exact with the template. Without it FK cannot know the shoulder reference (1 DoF
    # lost per arm; the 22 angles of "facing away, arms down" equal those of "facing the camera,
    # arms raised"), and the canonical body faces the camera: close for a person facing the camera,
    # far off for one facing away
    qt = fk(got, template=p)
    assert ((unit_dirs(p, UPPER_ARMS) * unit_dirs(qt, UPPER_ARMS)).sum(-1)).min() > 1 - 1e-6
    err = np.degrees(np.arccos(np.clip((unit_dirs(p, UPPER_ARMS) * unit_dirs(q, UPPER_ARMS)).sum(-1), -1, 1)))
    med = [float(np.median(err[view == k])) for k in range(4)]
    print(f"upper-arm direction error without template, median deg per camera azimuth 0/40/115/206: {med}")
    assert med[0] < 25 and med[3] > 90


# --------------------------------------------------------------------------------------------------
# FK and round trips


def test_round_trip_random_poses():
    p = random_poses(1000, seed=1)
    a = ik(p)
    q = fk(a)
    assert q.shape == (1000, 17, 3)
    assert angle_err(ik(q), a).max() < 1e-4
    assert ((unit_dirs(p, ENCODED_BONES) * unit_dirs(q, ENCODED_BONES)).sum(-1)).min() > 1 - 1e-6
    # bone lengths honoured; template supplies everything the angles do not encode
    L = kinematics.bone_lengths_of(p)
    assert np.allclose(kinematics.bone_lengths_of(fk(a, bone_lengths=L))[:, 1:], L[:, 1:])
    assert np.allclose(kinematics.bone_lengths_of(fk(a, bone_lengths=L[:, 1:]))[:, 1:], L[:, 1:])
    q2 = fk(a, bone_lengths={"l_knee": 0.5})
    assert np.allclose(kinematics.bone_lengths_of(q2)[:, 5],
                       0.5) and np.allclose(kinematics.bone_lengths_of(q2)[:, 2], 0.43)
    with pytest.raises(ValueError, match="knee"):
        fk(a, bone_lengths={"knee": 0.5})
    with pytest.raises(ValueError, match="last dim 22"):
        fk(a[:, :21])
    with pytest.raises(ValueError, match="17, 3"):
        ik(p[:, :16])
    qt = fk(a, template=p)
    assert np.abs(qt - p).max() < 1e-8
    assert ((unit_dirs(p, UPPER_ARMS) * unit_dirs(qt, UPPER_ARMS)).sum(-1)).min() > 1 - 1e-6


def test_round_trip_from_angles_and_canonical_pose():
    # IK(FK(a)) == a on the IK manifold: a = IK(p) for p = FK(random angles) with
    # random bone lengths
    rng = np.random.default_rng(2)
    a0 = rng.uniform(-math.pi, math.pi, size=(500, 22))
    a = ik(fk(a0, bone_lengths=rng.uniform(0.05, 0.5, size=(500, 17))))
    assert angle_err(ik(fk(a)), a).max() < 1e-4
    # an upright person facing the camera with hanging arms, bent knees/elbows: FK(IK(p)) == p
    # (canonical body)
    L = np.array([0] + [kinematics.DEFAULT_BONE_LENGTHS[n] for n in kinematics.H36M_JOINT_NAMES[1:]])
    p = np.zeros((17, 3))
    p[7], p[8], p[9] = [0, -L[7], 0], [0, -L[7] - L[8], 0], [0, -L[7] - L[8] - L[9], 0]
    p[10] = p[9] + [0, -L[10], 0]
    for hip, knee, ank, s in [(1, 2, 3, -1), (4, 5, 6, 1)]:
        p[hip] = [s * L[hip], 0, 0]
        p[knee] = p[hip] + [0, L[knee], 0]
        p[ank] = p[knee] + L[ank] * np.array([0, math.cos(0.4), math.sin(0.4)])  # shin goes back (+z)
    for sh, el, wr, s in [(11, 12, 13, 1), (14, 15, 16, -1)]:
        p[sh] = p[8] + [s * L[sh], 0, 0]
        p[el] = p[sh] + [0, L[el], 0]
        p[wr] = p[el] + L[wr] * np.array([0, math.cos(1.0), -math.sin(1.0)])  # forearm forward (-z)
    a = ik(p)
    assert np.allclose(a[:3], [-math.pi, 0, -math.pi])  # the exactly vertical spine is IK's -I case
    assert np.abs(fk(a) - p).max() < 1e-9
    # why FK(IK(p)) cannot keep every upper arm: turned to face away (pi about y), the same person
    # has exactly the angles of the person facing the camera with both arms raised (upper arms and
    # forearms reversed)
    away = p * [-1, 1, -1]
    raised = p.copy()
    for sh, el, wr in [(11, 12, 13), (14, 15, 16)]:
        raised[el] = p[sh] - (p[el] - p[sh])
        raised[wr] = raised[el] - (p[wr] - p[el])
    assert angle_err(ik(away), ik(raised)).max() < 1e-9


def test_torch_matches_numpy_and_gradients_flow():
    p = random_poses(64, seed=3)
    a_np = ik(p)
    a_t = ik(torch.from_numpy(p))
    assert isinstance(a_t, torch.Tensor) and a_t.dtype == torch.float64
    assert np.abs(a_t.numpy() - a_np).max() < 1e-12
    q_t = fk(a_t)
    assert np.abs(q_t.numpy() - fk(a_np)).max() < 1e-12
    # float32 in -> float32 out (numpy and torch)
    assert ik(p.astype(np.float32)).dtype == np.float32
    assert fk(a_t.float()).dtype == torch.float32
    # gradients through FK (the pipeline fits angles by gradient descent) and IK
    x = a_t[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fk(v), (x,), eps=1e-6, atol=1e-5)
    y = torch.from_numpy(p[:2]).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: model_io.encode_angles(ik(v)), (y,), eps=1e-6,
                                    atol=1e-5)
    # a few steps of gradient descent through FK reduce a pose-fitting loss
    target = torch.from_numpy(fk(a_np[:8])).float()
    v = (torch.from_numpy(a_np[:8]).float() + 0.3).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.02)
    losses = []
    for _ in range(30):
        loss = (fk(v) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(v.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------------------
# Mirroring, encoding, text


def test_flip():
    p = random_poses(200, seed=4)
    a = ik(p)
    assert np.array_equal(kinematics.flip_pose3d(kinematics.flip_pose3d(p)), p)
    assert np.array_equal(kinematics.flip_angles(kinematics.flip_angles(a)), a)
    assert angle_err(kinematics.flip_angles(a), ik(kinematics.flip_pose3d(p))).max() < 1e-9
    # FK is mirror-equivariant too, and torch agrees
    assert np.abs(fk(kinematics.flip_angles(a)) - kinematics.flip_pose3d(fk(a))).max() < 1e-9
    assert np.array_equal(kinematics.flip_angles(torch.from_numpy(a)).numpy(),
                          kinematics.flip_angles(a))
    assert np.array_equal(kinematics.flip_pose3d(torch.from_numpy(p)).numpy(),
                          kinematics.flip_pose3d(p))
    assert [kinematics.H36M_JOINT_NAMES[i] for i in kinematics.H36M_FLIP_PERM][1:4] == ["l_hip", "l_knee", "l_ankle"]
    assert [kinematics.JOINT_NAMES[i] for i in kinematics.ANGLE_FLIP_PERM][3] == "r_hip_pitch"
