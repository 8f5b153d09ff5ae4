# Tests of data.py: IK against a plain per-joint reference, FK as its exact inverse, mirroring, sin/cos, the clip
# format (round trip, partial reads, atomic writes, index), training windows (timing, box, flip) and collate.
# Real motion: DeepMimic mocap from ../shared/data (skipped cleanly when absent).
import hashlib
import io
import json
import math
import os
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import kinematics
import model_io
from model import TINY_QWEN
from model_io import InputEncoder

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------------------------
# An independent, deliberately plain IK (one joint of one frame at a time) straight from mimic.md sec 4


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


# ---------------------------------------------------------------------------------------------------------------
# DeepMimic mocap -> 17 joints in the camera frame (a simple FK of our own; humanoid3d offsets, metres)


def quat_to_mat(q):  # (..., 4) w, x, y, z -> (..., 3, 3)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(
        *q.shape[:-1], 3, 3)


def rot_z(t):
    c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*t.shape, 3, 3)


def mocap_poses():
    """All DeepMimic clips -> (N, 17, 3) in camera frames (x right, y down, z forward) seen from 4 azimuths, and the
    (N,) azimuth index (0: the person faces the camera)."""
    files = sorted((SHARED / "mocap").glob("deepmimic_humanoid3d_*.txt"))
    if not files:
        pytest.skip("../shared/data/mocap is absent")
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
        for side, (ih, ik, ia, Rh, kn), (ish, iel, iwr, Rs, ke) in [
                (1, (1, 2, 3, Rrh, krh), (14, 15, 16, Rrs, krel)), (-1, (4, 5, 6, Rlh, klh), (11, 12, 13, Rls, klel))]:
            J[ih] = root + at(Rr, [0, 0, 0.084887 * side])
            Wh = Rr @ Rh
            J[ik] = J[ih] + at(Wh, [0, -0.421546, 0])
            J[ia] = J[ik] + at(Wh @ rot_z(kn), [0, -0.40987, 0])
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


# ---------------------------------------------------------------------------------------------------------------
# IK


def test_ik_matches_reference_random():
    p = random_poses(300)
    got = kinematics.pose3d_to_angles(p)
    want = np.stack([ref_ik(x) for x in p])
    assert got.shape == (300, 22) and got.dtype == np.float64
    assert angle_err(got, want).max() < 1e-9


def test_ik_special_cases():
    p = kinematics.angles_to_pose3d(np.full(22, 0.5))
    up = p.copy()
    up[7] = up[0] + [0, -0.3, 0]              # spine exactly anti-parallel to up (+y): -I -> (-pi, 0, -pi)
    up[10] = up[9] + [0, 0.2, 0]              # head exactly along up: identity -> (0, 0, 0)
    up[11], up[12] = up[8] + [0.2, 0, 0], up[8] + [0.2, 0, 0.3]  # shoulder a = +x, b = +z: gimbal branch
    a = kinematics.pose3d_to_angles(up)
    assert np.allclose(a[0:3], [-math.pi, 0, -math.pi]) and np.allclose(a[19:22], 0)
    assert np.allclose(a[11:14], ref_ik(up)[11:14]) and a[13] == 0.0  # gimbal: yaw = 0
    assert angle_err(a, ref_ik(up)).max() < 1e-12
    assert angle_err(kinematics.pose3d_to_angles(kinematics.angles_to_pose3d(a)), a).max() < 1e-9
    straight = p.copy()
    straight[3] = straight[2] + (straight[2] - straight[1])  # straight leg: knee = pi (the original's convention)
    assert abs(kinematics.pose3d_to_angles(straight)[10] - math.pi) < 1e-7


def test_ik_matches_reference_mocap():
    p, view = mocap_poses()
    got = kinematics.pose3d_to_angles(p)
    want = np.stack([ref_ik(x) for x in p[::7]])
    assert angle_err(got[::7], want).max() < 1e-7
    # round trips on real motion
    assert angle_err(kinematics.pose3d_to_angles(kinematics.angles_to_pose3d(got)), got).max() < 1e-6
    q = kinematics.angles_to_pose3d(got)
    cos = (unit_dirs(p, ENCODED_BONES) * unit_dirs(q, ENCODED_BONES)).sum(-1)
    assert cos.min() > 1 - 1e-6
    assert np.abs(kinematics.angles_to_pose3d(got, template=p) - p).max() < 1e-9
    # upper arms: exact with the template. Without it FK cannot know the shoulder reference (1 DoF lost per arm;
    # the 22 angles of "facing away, arms down" equal those of "facing the camera, arms raised"), and the canonical
    # body faces the camera: close for a person facing the camera, far off for one facing away
    qt = kinematics.angles_to_pose3d(got, template=p)
    assert ((unit_dirs(p, UPPER_ARMS) * unit_dirs(qt, UPPER_ARMS)).sum(-1)).min() > 1 - 1e-6
    err = np.degrees(np.arccos(np.clip((unit_dirs(p, UPPER_ARMS) * unit_dirs(q, UPPER_ARMS)).sum(-1), -1, 1)))
    med = [float(np.median(err[view == k])) for k in range(4)]
    print(f"upper-arm direction error without template, median deg per camera azimuth 0/40/115/206: {med}")
    assert med[0] < 25 and med[3] > 90


# ---------------------------------------------------------------------------------------------------------------
# FK and round trips


def test_round_trip_random_poses():
    p = random_poses(1000, seed=1)
    a = kinematics.pose3d_to_angles(p)
    q = kinematics.angles_to_pose3d(a)
    assert q.shape == (1000, 17, 3)
    assert angle_err(kinematics.pose3d_to_angles(q), a).max() < 1e-4
    assert ((unit_dirs(p, ENCODED_BONES) * unit_dirs(q, ENCODED_BONES)).sum(-1)).min() > 1 - 1e-6
    # bone lengths honoured; template supplies everything the angles do not encode
    L = kinematics.bone_lengths_of(p)
    assert np.allclose(kinematics.bone_lengths_of(kinematics.angles_to_pose3d(a, bone_lengths=L))[:, 1:], L[:, 1:])
    assert np.allclose(kinematics.bone_lengths_of(kinematics.angles_to_pose3d(a, bone_lengths=L[:, 1:]))[:, 1:], L[:, 1:])
    q2 = kinematics.angles_to_pose3d(a, bone_lengths={"l_knee": 0.5})
    assert np.allclose(kinematics.bone_lengths_of(q2)[:, 5], 0.5) and np.allclose(kinematics.bone_lengths_of(q2)[:, 2], 0.43)
    with pytest.raises(ValueError, match="knee"):
        kinematics.angles_to_pose3d(a, bone_lengths={"knee": 0.5})
    with pytest.raises(ValueError, match="last dim 22"):
        kinematics.angles_to_pose3d(a[:, :21])
    with pytest.raises(ValueError, match="17, 3"):
        kinematics.pose3d_to_angles(p[:, :16])
    qt = kinematics.angles_to_pose3d(a, template=p)
    assert np.abs(qt - p).max() < 1e-8
    assert ((unit_dirs(p, UPPER_ARMS) * unit_dirs(qt, UPPER_ARMS)).sum(-1)).min() > 1 - 1e-6


def test_round_trip_from_angles_and_canonical_pose():
    # IK(FK(a)) == a on the IK manifold: a = IK(p) for p = FK(random angles) with random bone lengths
    rng = np.random.default_rng(2)
    a0 = rng.uniform(-math.pi, math.pi, size=(500, 22))
    a = kinematics.pose3d_to_angles(kinematics.angles_to_pose3d(a0, bone_lengths=rng.uniform(0.05, 0.5, size=(500, 17))))
    assert angle_err(kinematics.pose3d_to_angles(kinematics.angles_to_pose3d(a)), a).max() < 1e-4
    # an upright person facing the camera with hanging arms, bent knees/elbows: FK(IK(p)) == p (canonical body)
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
    a = kinematics.pose3d_to_angles(p)
    assert np.allclose(a[:3], [-math.pi, 0, -math.pi])  # the exactly vertical spine is IK's -I case
    assert np.abs(kinematics.angles_to_pose3d(a) - p).max() < 1e-9
    # why FK(IK(p)) cannot keep every upper arm: turned to face away (pi about y), the same person has exactly the
    # angles of the person facing the camera with both arms raised (upper arms and forearms reversed)
    away = p * [-1, 1, -1]
    raised = p.copy()
    for sh, el, wr in [(11, 12, 13), (14, 15, 16)]:
        raised[el] = p[sh] - (p[el] - p[sh])
        raised[wr] = raised[el] - (p[wr] - p[el])
    assert angle_err(kinematics.pose3d_to_angles(away), kinematics.pose3d_to_angles(raised)).max() < 1e-9


def test_torch_matches_numpy_and_gradients_flow():
    p = random_poses(64, seed=3)
    a_np = kinematics.pose3d_to_angles(p)
    a_t = kinematics.pose3d_to_angles(torch.from_numpy(p))
    assert isinstance(a_t, torch.Tensor) and a_t.dtype == torch.float64
    assert np.abs(a_t.numpy() - a_np).max() < 1e-12
    q_t = kinematics.angles_to_pose3d(a_t)
    assert np.abs(q_t.numpy() - kinematics.angles_to_pose3d(a_np)).max() < 1e-12
    # float32 in -> float32 out (numpy and torch)
    assert kinematics.pose3d_to_angles(p.astype(np.float32)).dtype == np.float32
    assert kinematics.angles_to_pose3d(a_t.float()).dtype == torch.float32
    # gradients through FK (the pipeline fits angles by gradient descent) and IK
    x = a_t[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: kinematics.angles_to_pose3d(v), (x,), eps=1e-6, atol=1e-5)
    y = torch.from_numpy(p[:2]).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: model_io.encode_angles(kinematics.pose3d_to_angles(v)), (y,), eps=1e-6,
                                    atol=1e-5)
    # a few steps of gradient descent through FK reduce a pose-fitting loss
    target = torch.from_numpy(kinematics.angles_to_pose3d(a_np[:8])).float()
    v = (torch.from_numpy(a_np[:8]).float() + 0.3).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.02)
    losses = []
    for _ in range(30):
        loss = (kinematics.angles_to_pose3d(v) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(v.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------------------------
# Mirroring, encoding, text


def test_flip():
    p = random_poses(200, seed=4)
    a = kinematics.pose3d_to_angles(p)
    assert np.array_equal(kinematics.flip_pose3d(kinematics.flip_pose3d(p)), p)
    assert np.array_equal(kinematics.flip_angles(kinematics.flip_angles(a)), a)
    assert angle_err(kinematics.flip_angles(a), kinematics.pose3d_to_angles(kinematics.flip_pose3d(p))).max() < 1e-9
    # FK is mirror-equivariant too, and torch agrees
    assert np.abs(kinematics.angles_to_pose3d(kinematics.flip_angles(a)) - kinematics.flip_pose3d(kinematics.angles_to_pose3d(a))).max() < 1e-9
    assert np.array_equal(kinematics.flip_angles(torch.from_numpy(a)).numpy(), kinematics.flip_angles(a))
    assert np.array_equal(kinematics.flip_pose3d(torch.from_numpy(p)).numpy(), kinematics.flip_pose3d(p))
    assert [kinematics.H36M_JOINT_NAMES[i] for i in kinematics.H36M_FLIP_PERM][1:4] == ["l_hip", "l_knee", "l_ankle"]
    assert [kinematics.JOINT_NAMES[i] for i in kinematics.ANGLE_FLIP_PERM][3] == "r_hip_pitch"


def test_encode_decode():
    a = np.random.default_rng(5).uniform(-3 * math.pi, 3 * math.pi, size=(7, 16, 22))
    x = model_io.encode_angles(a)
    assert x.shape == (7, 16, 44)
    assert np.allclose(x[..., 4], np.sin(a[..., 2])) and np.allclose(x[..., 5], np.cos(a[..., 2]))
    assert angle_err(model_io.decode_angles(x), a).max() < 1e-12
    xt = model_io.encode_angles(torch.from_numpy(a))
    assert np.allclose(xt.numpy(), x) and np.allclose(model_io.decode_angles(xt).numpy(), model_io.decode_angles(x))
    assert len(kinematics.JOINT_NAMES) == 22 and sorted(sum(kinematics.JOINT_GROUPS.values(), [])) == list(range(22))


def test_flip_text():
    assert data.flip_text("Raise your left arm, then the RIGHT leg. Left-hand turn to the Right.") == \
        "Raise your right arm, then the LEFT leg. Right-hand turn to the Left."
    assert data.flip_text("leftover rights bright") == "leftover rights bright"


def test_split_rule():
    ids = [f"vid{i}_000{i % 7}_{i}" for i in range(5000)]
    for cid in ids[:50]:
        h = int(hashlib.md5(cid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        assert data.split_of(cid) == ("val" if h < 0.02 else "train")
    frac = np.mean([data.split_of(c) == "val" for c in ids])
    assert 0.01 < frac < 0.03


# --------------------------------------------------------------------------------------------------
# Clip format


def colour_of(i):
    return (int(10 * i % 250), int(37 * i % 250), 200 - i)


def make_clip(T=30, size=(224, 224), cid="clip_a", action="waving", desc="Wave your left hand.", seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(T):
        buf = io.BytesIO()
        Image.new("RGB", size, colour_of(i)).save(buf, format="JPEG", quality=95)
        frames.append(buf.getvalue())
    pose = kinematics.angles_to_pose3d(rng.uniform(-1, 1, size=(T, 22))).astype(np.float32)
    boxes = np.tile(np.array([[50, 40, 150, 200]], np.float32), (T, 1))
    return data.Clip(clip_id=cid, frames_jpeg=frames, boxes=boxes, pose3d=pose,
                     angles=kinematics.pose3d_to_angles(pose), src_frame_index=np.arange(T) * 3,
                     src_time=np.arange(T) / 10.0, src_fps=30.0, width=size[0], height=size[1],
                     action_class=action, description=desc, video_id="vid", extra={"k": "v"})


def test_clip_round_trip_and_partial_reads(tmp_path):
    clip = make_clip()
    path = data.write_clip(tmp_path, clip)
    assert path == data.clip_path(tmp_path, "clip_a") and path.is_file()
    back = data.read_clip(path)
    assert back.frames_jpeg == clip.frames_jpeg and back.split == data.split_of("clip_a")
    for k in ("boxes", "pose3d", "angles", "src_frame_index", "src_time"):
        assert np.array_equal(getattr(back, k), getattr(clip, k)), k
    assert (back.action_class, back.description, back.extra, back.width) == \
        ("waving", clip.description, {"k": "v"}, 224)
    cf = data.ClipFile(path)
    assert cf.num_frames == 30 and cf.meta["src_fps"] == 30.0
    assert np.array_equal(cf.read("pose3d", 5, 9), clip.pose3d[5:9])
    assert np.array_equal(cf.boxes, clip.boxes) and np.array_equal(cf.src_time, clip.src_time)
    # frames by index read only their own bytes: garble every other frame's JPEG bytes in the file
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header["jpeg"]["data_offsets"][0]
    offs = np.concatenate([[0], np.cumsum([len(f) for f in clip.frames_jpeg])])
    keep = [3, 4, 5, 6]
    for i in range(30):
        if i not in keep:
            raw[start + offs[i]:start + offs[i + 1]] = b"\x00" * (offs[i + 1] - offs[i])
    path.write_bytes(bytes(raw))
    ims = data.ClipFile(path).frames(keep)
    for i, im in zip(keep, ims):
        assert np.abs(np.asarray(im)[100, 100].astype(int) - colour_of(i)).max() <= 3
    with pytest.raises(Exception):
        data.ClipFile(path).frames([0])
    with pytest.raises(IndexError, match="out of range"):
        data.ClipFile(path).frame_bytes([30])


def test_write_clip_is_atomic_and_validates(tmp_path, monkeypatch):
    path = data.write_clip(tmp_path, make_clip())
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "fsync", boom)
    with pytest.raises(OSError):
        data.write_clip(tmp_path, make_clip(T=25))
    with pytest.raises(OSError):
        data.write_clip(tmp_path, make_clip(cid="clip_b"))
    monkeypatch.undo()
    assert path.read_bytes() == before                                  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert not data.clip_path(tmp_path, "clip_b").exists()
    bad = make_clip()
    bad.pose3d = bad.pose3d[:, :16]
    with pytest.raises(ValueError, match="pose3d"):
        data.write_clip(tmp_path, bad)
    with pytest.raises(ValueError, match="clip_id"):
        data.write_clip(tmp_path, make_clip(cid="../evil"))


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    # a plain open() gives 0666 minus the umask; mkstemp's private 0600 would hide a shared
    # dataset from other users
    old = os.umask(0o022)
    try:
        p = tmp_path / "a" / "f.bin"
        data.atomic_write_bytes(p, b"x")
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
        os.umask(0o077)
        data.atomic_write_bytes(tmp_path / "g.bin", b"y")
        assert stat.S_IMODE(os.stat(tmp_path / "g.bin").st_mode) == 0o600
    finally:
        os.umask(old)


def test_index(tmp_path):
    for k in range(5):
        data.write_clip(tmp_path, make_clip(T=20 + k, cid=f"c{k}"))
    entries = data.list_clips(tmp_path)  # index missing -> built
    assert (tmp_path / data.INDEX_FILE).is_file()
    assert sorted(e["clip_id"] for e in entries) == [f"c{k}" for k in range(5)]
    e = next(e for e in entries if e["clip_id"] == "c3")
    assert e["num_frames"] == 23 and e["action_class"] == "waving" and (tmp_path / e["path"]).is_file()
    assert e["split"] == data.split_of("c3")
    assert len(data.list_clips(tmp_path, "train")) + len(data.list_clips(tmp_path, "val")) == 5
    # the dataset's vectorised window table equals window_starts clip by clip
    for stride in (1, 3, 16):
        ds = data.WindowDataset(tmp_path, split=None, stride=stride, flip=False)
        want = [(p, s) for p, e in zip(ds.paths, entries) for s in data.window_starts(e["num_frames"], stride)]
        assert [(ds.paths[c], s) for c, s in zip(ds.win_clip, ds.win_start)] == want


# --------------------------------------------------------------------------------------------------
# Windows


def test_window_starts():
    assert list(data.window_starts(40)) == [4, 20]
    assert list(data.window_starts(36)) == [4, 20]
    assert list(data.window_starts(35)) == [4]
    assert list(data.window_starts(19)) == []
    assert list(data.window_starts(30, stride=3)) == list(range(4, 15, 3))


def test_window_dataset_timing_box_and_flip(tmp_path):
    clip = make_clip(T=40, desc="Wave your left hand.")
    clip.split = "train"
    data.write_clip(tmp_path, clip)
    ds = data.WindowDataset(tmp_path, split="train", stride=16, flip=True)
    assert len(ds) == 4 and list(ds.win_start) == [4, 20]
    assert len(data.WindowDataset(tmp_path, split="val")) == 0
    for idx, s in [(0, 4), (1, 20)]:
        it = ds[idx]
        assert it["start"] == s and not it["flipped"] and it["clip_id"] == "clip_a"
        assert it["text"] == "Task: waving. Instruction: Wave your left hand."
        assert it["state"].shape == (44,) and it["actions"].shape == (16, 44)
        assert torch.allclose(it["actions"], torch.from_numpy(model_io.encode_angles(clip.angles[s:s + 16])).float())
        assert torch.equal(it["state"], it["actions"][0])
        assert len(it["images"]) == 4
        for k, im in enumerate(it["images"]):
            x = np.asarray(im).astype(int)
            assert x.shape == (224, 224, 3)
            assert np.abs(x[120, 100] - colour_of(s - 4 + k)).max() <= 3        # frame s-4+k, inside the box
            assert (x[100, 49:52] == [0, 255, 0]).all() and (x[100, 48] != [0, 255, 0]).any()  # 3 px, centred
            assert (x[100, 52] != [0, 255, 0]).any() and (x[39:42, 100] == [0, 255, 0]).all()
    f = ds[2 + 1]  # the mirror of window 1
    assert f["flipped"] and f["start"] == 20 and f["text"] == "Task: waving. Instruction: Wave your right hand."
    flipped = kinematics.flip_pose3d(clip.pose3d[20:36].astype(np.float64))
    want = model_io.encode_angles(kinematics.pose3d_to_angles(flipped))
    assert torch.allclose(f["actions"], torch.from_numpy(want).float(), atol=1e-6)
    got = model_io.decode_angles(f["actions"].numpy())
    assert angle_err(got, kinematics.flip_angles(clip.angles[20:36])).max() < 1e-4
    x = np.asarray(f["images"][0]).astype(int)
    assert (x[100, 223 - 51:223 - 48] == [0, 255, 0]).all()  # the box mirrored with the frame
    assert np.array_equal(np.asarray(f["images"][2]), np.asarray(ds[1]["images"][2])[:, ::-1])


def test_collate_plain_and_encoded(tmp_path):
    data.write_clip(tmp_path, make_clip(T=40, cid="a1", desc="Go left."))
    data.write_clip(tmp_path, make_clip(T=40, cid="a2", desc="Go."))
    root_split = data.list_clips(tmp_path)[0]["split"]
    ds = data.WindowDataset(tmp_path, split=root_split, flip=False)
    b = data.collate([ds[i] for i in range(len(ds))])
    assert b["state"].shape == (len(ds), 44) and b["actions"].shape == (len(ds), 16, 44)
    assert len(b["images"]) == len(ds) and len(b["images"][0]) == 4 and b["start"].dtype == torch.int64

    # stands in for model.InputEncoder: per-sample token ids of varying length
    def encode(images, text):
        n = len(text)
        return {"frames": torch.full((4, 8, 8, 3), n, dtype=torch.uint8), "input_ids": torch.arange(1, n + 1),
                "position_ids": torch.arange(n).expand(3, n) + 1, "image_positions": torch.tensor([0, 2])}

    ds = data.WindowDataset(tmp_path, split=root_split, flip=True, encode=encode)
    items = [ds[i] for i in range(len(ds))]
    assert "images" not in items[0]
    b = data.collate(items, pad_token_id=-7)
    lens = [len(it["text"]) for it in items]
    L = max(lens)
    assert b["input_ids"].shape == (len(items), L) and b["position_ids"].shape == (3, len(items), L)
    for r, n in enumerate(lens):
        assert b["attention_mask"][r].sum() == n and (b["input_ids"][r, n:] == -7).all()
        assert (b["position_ids"][:, r, n:] == 0).all() and (b["position_ids"][:, r, :n] > 0).all()
        assert (b["frames"][r] == n).all()
    assert b["frames"].shape == (len(items), 4, 8, 8, 3) and b["frames"].dtype == torch.uint8
    # flat rows b * L + s of the image tokens, batch-major
    assert b["visual_rows"].tolist() == [r * L + s for r in range(len(items)) for s in (0, 2)]
    assert b["state"].shape == (len(items), 44) and b["clip_id"] == [it["clip_id"] for it in items]


def test_dataloader_workers(tmp_path):
    # files are opened per item inside the worker (nothing open crosses the fork)
    data.write_clip(tmp_path, make_clip(T=40, cid="w1"))
    split = data.list_clips(tmp_path)[0]["split"]
    ds = data.WindowDataset(tmp_path, split=split)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=data.collate)
    batches = list(loader)
    assert sum(len(b["clip_id"]) for b in batches) == 4
    assert torch.equal(torch.cat([b["actions"] for b in batches]), torch.stack([ds[i]["actions"] for i in range(4)]))


def test_input_encoder_matches_the_processor(tmp_path):
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    from qwen3vl import Qwen3VLConfig, rope_index
    from qwen3vl_processor import Qwen3VLProcessor, pixel_values_from_frames

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    words = ["[UNK]", "user", "assistant", "Task", ":", ".", "Instruction", "\n"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words + special)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z_]+\|>|\w+|[^\w\s]|\n"), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    proc = Qwen3VLProcessor(tok)
    with pytest.raises(ValueError, match="would resize 224x224"):  # the stock min_pixels upscales 224 to 256
        InputEncoder(proc, Qwen3VLConfig.from_hf(TINY_QWEN), image_size=224)
    proc.image_config = replace(proc.image_config, min_pixels=224 * 224)  # as model.build_processor does
    qcfg = replace(Qwen3VLConfig.from_hf(TINY_QWEN), image_token_id=proc.image_token_id,
                   video_token_id=proc.video_token_id, vision_start_token_id=proc.vision_start_token_id,
                   vision_end_token_id=proc.vision_end_token_id)
    data.write_clip(tmp_path, make_clip(T=40, cid="q1", desc="Wave your left hand now."))
    split = data.list_clips(tmp_path)[0]["split"]
    enc = InputEncoder(proc, qcfg, image_size=224)
    ds = data.WindowDataset(tmp_path, split=split, encode=enc)
    items = [ds[i] for i in range(len(ds))]
    one = items[0]
    # the processor's own output for the same images and prompt: same ids, same
    # pixels (patched from uint8)
    plain = data.WindowDataset(tmp_path, split=split)[0]
    content = [{"type": "image"}] * 4 + [{"type": "text", "text": plain["text"]}]
    ref = proc(text=proc.apply_chat_template([{"role": "user", "content": content}]), images=plain["images"])
    assert torch.equal(one["input_ids"], ref["input_ids"][0])
    pv, grid = pixel_values_from_frames(one["frames"], proc.image_config)
    assert torch.equal(pv, ref["pixel_values"]) and torch.equal(grid, ref["image_grid_thw"])
    pos, _ = rope_index(qcfg, ref["input_ids"], ref["image_grid_thw"])
    assert torch.equal(one["position_ids"], pos[:, 0])
    assert (one["input_ids"][one["image_positions"]] == proc.image_token_id).all()
    # 224x224 -> 14x14 patches -> 7x7 merged tokens per frame
    assert len(one["image_positions"]) == 4 * 49
    text = proc.tokenizer.decode(one["input_ids"].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and text.count("<|vision_start|>") == 4
    b = data.collate(items, pad_token_id=enc.pad_token_id)
    assert b["input_ids"].shape[0] == len(items) and len(b["visual_rows"]) == 4 * 49 * len(items)


def test_draw_box_and_cli(tmp_path, capsys):
    im = Image.new("RGB", (64, 48))
    model_io.draw_box(im, [60, 40, 10, 5])          # inverted: nothing drawn
    model_io.draw_box(im, [np.nan, 0, 10, 10])      # no box
    assert np.asarray(im).max() == 0
    model_io.draw_box(im, [-5, -5, 100, 100])       # clamped to the frame
    x = np.asarray(im)
    assert (x[0:2, 10] == [0, 255, 0]).all() and (x[47, 10] == [0, 255, 0]).all() and x[20, 20].max() == 0
    path = data.write_clip(tmp_path, make_clip(T=40, cid="cli1"))
    data.main(["index", str(tmp_path)])
    data.main(["info", str(tmp_path)])
    data.main(["info", str(path)])
    out = capsys.readouterr().out
    assert "indexed 1 clips" in out and "1 action classes" in out and "clip cli1: 40 frames" in out
