# mocap.py: the loaders + FK on the shipped files and resampling at any times. The mocap ships
# inside the repo (assets/mocap), so nothing skips.
import dataclasses

import numpy as np
import pytest

import bvh
import mocap

# (parent, child) bones of the 17 Human3.6M joints
BONES = [(0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (0, 7), (7, 8), (8, 9), (9, 10), (8, 11),
         (11, 12), (12, 13), (8, 14), (14, 15), (15, 16)]
UPRIGHT = {"walk", "run", "jog", "zombie_walk", "stealthy_walk", "jump", "kick", "spinkick",
           "punch", "amp_walk", "amp_run", "jumping_jacks"}


def _sample_all(m):
    """Every source frame, and for loops two and a half cycles (exercises the cycle chaining and
    seam closure)."""
    if m.loop:
        return np.concatenate([m.times, m.times[-1] + np.linspace(0.0, 1.5 * m.times[-1], 40)])
    return m.times


@pytest.mark.parametrize("key,file", [(k, f) for k, f, _, _ in mocap.MOTIONS])
def test_loader_plausible_skeleton(key, file):
    m = mocap.load_motion(file)
    p, _, _ = mocap.sample_motion(m, _sample_all(m))
    assert p.shape[1:] == (mocap.NUM_SITES, 3) and np.isfinite(p).all()
    # rigid bones keep their length; in the CMU skeleton thorax is a point on the upper chest, so
    # the two bones reaching it across the Chest2 / neck joints are not rigid, nor is pelvis ->
    # spine (the pelvis is the midpoint of hips that hang from their own LHipJoint / RHipJoint)
    bones = [b for b in BONES if not (file.endswith(".bvh") and b in ((0, 7), (7, 8), (8, 9)))]
    lengths = np.stack([np.linalg.norm(p[:, a] - p[:, b], axis=-1) for a, b in bones], 1)
    assert np.ptp(lengths, 0).max() < 1e-4
    assert (lengths > 0.05).all() and (lengths < 0.6).all()  # metres
    thigh, shin = lengths[0, 1], lengths[0, 2]
    assert 0.35 < thigh < 0.5 and 0.35 < shin < 0.5
    if key in UPRIGHT:  # world up is +Y: the head stays well above the pelvis
        assert np.mean(p[:, 10, 1] > p[:, 0, 1] + 0.2) > 0.95
    # chirality: the right hip lies on the body's right, right = facing x up (Y up, right-handed);
    # the toes show the facing reliably while both feet point ahead (locomotion, jumping jacks)
    if key in {"walk", "run", "jog", "zombie_walk", "stealthy_walk", "amp_walk", "amp_run",
               "jumping_jacks"}:
        facing = (p[:, 17] - p[:, 3] + p[:, 18] - p[:, 6]) * np.array([1.0, 0.0, 1.0])  # toes point forward
        right = np.cross(facing, [0.0, 1.0, 0.0])
        assert np.mean(np.sum((p[:, 1] - p[:, 4]) * right, -1) > 0) > 0.9
        assert np.mean(np.sum((p[:, 14] - p[:, 11]) * right, -1) > 0) > 0.9


@pytest.mark.parametrize("file", ["deepmimic_humanoid3d_walk.txt", "isaac_amp_humanoid_walk.npz"])
def test_walk_feet_on_ground(file):
    m = mocap.load_motion(file)  # both sources put the ground at height 0
    p, _, _ = mocap.sample_motion(m, np.arange(0.0, 4.0, 0.05))
    lowest_ankle = p[:, [3, 6], 1].min(1)
    assert (lowest_ankle > -0.03).all() and (lowest_ankle < 0.15).all()  # always a foot on the ground
    assert np.ptp(p[:, 0, 1]) < 0.1  # the pelvis keeps its height
    assert np.linalg.norm(p[-1, 0, [0, 2]] - p[0, 0, [0, 2]]) > 3.0  # and it goes somewhere: ~1.2 m/s for 4 s


def test_amp_repeats_dropped_and_loop_cut():
    # the AMP files store 30 Hz captures at 60 fps (each pose twice); the loader keeps one of each
    # and cuts the longest near-cyclic span, so consecutive kept frames differ and the cycle is long
    # enough to be a gait cycle
    m = mocap.load_motion("isaac_amp_humanoid_walk.npz")
    with np.load(mocap.ASSET_DIR / "isaac_amp_humanoid_walk.npz", allow_pickle=False) as z:
        n_file, fps = len(z["rotation_xyzw"]), float(z["fps"])
    assert m.loop and m.times[-1] >= 0.75
    assert (np.abs(np.diff(m.rot, axis=0)).max((1, 2)) > 1e-7).all()
    np.testing.assert_allclose(m.times, (m.src_index - m.src_index[0]) / fps)
    assert 0 <= m.src_index[0] and m.src_index[-1] < n_file
    q = m.rot[[0, -1], 1:]  # start and end poses of the cut span match within the 12 deg tolerance
    assert np.degrees(2 * np.arccos(np.abs((q[0] * q[1]).sum(-1)).clip(0, 1))).max() <= 12.0


def test_resampling_follows_source_frames_and_dt():
    loop = mocap.load_motion("deepmimic_humanoid3d_roll.txt")  # one frame of this clip lasts 0.0327 s, not 1/60
    dt = np.diff(loop.times)
    assert dt.max() - dt.min() > 0.01
    # played once (no seam closure), the sampler returns exactly the source frames at their times
    m = dataclasses.replace(loop, loop=False)
    p, idx, t = mocap.sample_motion(m, m.times[:-1])
    ref = mocap.forward_kinematics(m, m.root_pos[:-1], m.rot[:-1])
    np.testing.assert_allclose(p, ref, atol=1e-9)
    np.testing.assert_array_equal(idx, np.arange(len(m.times) - 1))
    # midway between two frames the root moves halfway
    mid = (m.times[10] + m.times[11]) / 2
    p_mid, _, _ = mocap.sample_motion(m, np.array([mid]))
    np.testing.assert_allclose(p_mid[0, 0], (m.root_pos[10] + m.root_pos[11]) / 2, atol=1e-9)
    # the loop seam is closed: no jump between the end of a cycle and the next one
    period = loop.times[-1]
    p_seam, _, _ = mocap.sample_motion(loop, np.array([period - 1e-7, period + 1e-7, 2 * period - 1e-7, 2 * period]))
    assert np.abs(p_seam[0] - p_seam[1]).max() < 1e-4 and np.abs(p_seam[2] - p_seam[3]).max() < 1e-4


def _hip_angle(p):
    """Degrees between pelvis -> right hip and pelvis -> left hip: 180 on Human3.6M's
    straight hip line."""
    a, b = p[:, 1] - p[:, 0], p[:, 4] - p[:, 0]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


@pytest.mark.parametrize("key,file", [(k, f) for k, f, _, _ in mocap.MOTIONS])
def test_pelvis_on_the_hip_line(key, file):
    # Human3.6M's pelvis lies between the hips; the CMU root sits ~0.1 m above them, which
    # made a ~70 deg V
    m = mocap.load_motion(file)
    p, _, _ = mocap.sample_motion(m, _sample_all(m))
    assert _hip_angle(p).min() > 179.0
    np.testing.assert_allclose(p[:, 0], (p[:, 1] + p[:, 4]) / 2, atol=1e-9)


def test_shipped_cmu_file_maps_to_its_joints():
    m = mocap.load_motion("ad_jumping_jacks.bvh")
    assert m.info["up"] == "y" and m.info["unit"] == "cmu"
    want = dict(l_hip="LeftHip", l_knee="LeftKnee", l_ankle="LeftAnkle", r_hip="RightHip",
                l_shoulder="LeftShoulder", l_elbow="LeftElbow", l_wrist="LeftWrist", head="Head",
                spine="Chest", chest="Chest2")
    assert {k: m.info["joints"][k] for k in want} == want


# --------------------------------------------------------------------------------------------------
# BVH rigs of other sources, written here: one body (metres, x = its left, y up, z forward) named
# and laid out as each family does, in its unit and up axis. Frame 0: the rest pose; frame 1: left
# knee bent 90 deg (the shin points backwards); frame 2: the rest pose 0.5 m further forward.

ROLES = {"root": (0, 0, 0), "zero": (0, 0, 0), "hip": (0.09, -0.06, 0), "knee": (0, -0.42, 0),
         "ankle": (0, -0.41, 0), "toe": (0, -0.05, 0.12), "toe_end": (0, 0, 0.06),
         "spine1": (0, 0.10, 0), "spine2": (0, 0.12, 0), "spine3": (0, 0.12, 0),
         "neck": (0, 0.14, 0), "head": (0, 0.10, 0), "head_leaf": (0, 0.10, 0),
         "head_top": (0, 0.18, 0), "collar": (0.03, 0.08, 0), "shoulder": (0.12, 0, 0),
         "elbow": (0.28, 0, 0), "wrist": (0.25, 0, 0), "finger": (0.08, 0, 0),
         "thumb": (0.02, 0, 0.03)}
ENDS = {"toe": (0, 0, 0.06), "head": (0, 0.18, 0), "finger": (0.03, 0, 0), "thumb": (0, 0, 0.03),
        "toe_end": (0, 0, 0.0), "head_top": (0, 0.01, 0)}
LEGS = ("hip", "knee", "ankle", "toe")
ARMS = ("collar", "shoulder", "elbow", "wrist", "finger")


def _rig(spine, legs, arms, root, legs_from, arms_from, extra=()):
    """A family's joints [(name, parent, role, x sign: -1 on the right)]: spine [(name, role)]
    chained from the root; per side the leg and arm chains with names formatted by side
    ({Side}=Left, {S}=L, {s}=l, ...)."""
    out, parent = [(root, None, "root", 1)], root
    for name, role in spine:
        out.append((name, parent, role, 1))
        parent = name
    for chain, roles, top in ((legs, LEGS, legs_from), (arms, ARMS, arms_from)):
        for Side in ("Left", "Right"):
            fmt = dict(Side=Side, S=Side[0], s=Side[0].lower(), side=Side.lower())
            names = [n.format(**fmt) for n in chain]
            parents = [top.format(**fmt)] + names[:-1]
            out += [(n, p, r, 1 if Side == "Left" else -1) for n, p, r in zip(names, parents, roles)]
    for name, parent, role in extra:
        for Side in ("Left", "Right"):
            fmt = dict(Side=Side, S=Side[:1], s=Side[:1].lower(), side=Side.lower())
            out.append((name.format(**fmt), parent.format(**fmt), role, 1 if Side == "Left" else -1))
    return out


FAMILIES = {  # name: (joints, file unit in metres, Z up, channel order, the unit the loader should report)
    "cgspeed_cmu": (_rig([("LowerBack", "zero"), ("Spine", "spine1"), ("Spine1", "spine2"), ("Neck", "neck"),
                          ("Neck1", "zero"), ("Head", "head")],
                         ["{Side}UpLeg", "{Side}Leg", "{Side}Foot", "{Side}ToeBase"],
                         ["{Side}Shoulder", "{Side}Arm", "{Side}ForeArm", "{Side}Hand", "{Side}HandIndex1"],
                         "Hips", "{S}HipJoint", "Spine1", [("{S}HipJoint", "Hips", "zero"),
                                                           ("{S}Thumb", "{Side}Hand", "thumb")]),
                    bvh.CMU_SCALE, False, "Zrotation Yrotation Xrotation", "cmu"),
    "mixamo": (_rig([("mixamorig:Spine", "spine1"), ("mixamorig:Spine1", "spine2"), ("mixamorig:Spine2", "spine3"),
                     ("mixamorig:Neck", "neck"), ("mixamorig:Head", "head"), ("mixamorig:HeadTop_End", "head_top")],
                    ["mixamorig:{Side}UpLeg", "mixamorig:{Side}Leg", "mixamorig:{Side}Foot", "mixamorig:{Side}ToeBase"],
                    ["mixamorig:{Side}Shoulder", "mixamorig:{Side}Arm", "mixamorig:{Side}ForeArm",
                     "mixamorig:{Side}Hand", "mixamorig:{Side}HandIndex1"], "mixamorig:Hips",
                     "mixamorig:Hips",
                    "mixamorig:Spine2", [("mixamorig:{Side}Toe_End", "mixamorig:{Side}ToeBase", "toe_end")]),
               0.01, False, "Zrotation Xrotation Yrotation", "cm"),
    "fair_actor": (_rig([("Spine", "spine1"), ("Spine1", "spine2"), ("Spine2", "spine3"), ("Spine3", "zero"),
                         ("Neck", "neck"), ("Head", "head")],
                        ["{Side}UpLeg", "{Side}Leg", "{Side}Foot", "{Side}ToeBase"],
                        ["{Side}Shoulder", "{Side}Arm", "{Side}ForeArm", "{Side}Hand", "{Side}HandEnd"],
                        "Hips", "Hips", "Spine3", [("{Side}HandThumb1", "{Side}Hand", "thumb")]),
                   0.039, True, "Xrotation Yrotation Zrotation", None),  # no standard unit: legs scaled
    "pymo": (_rig([("Spine", "spine1"), ("Head", "head")], ["{Side}UpLeg", "{Side}Leg", "{Side}Foot", "{Side}ToeBase"],
                  ["{Side}Shoulder", "{Side}Arm", "{Side}ForeArm", "{Side}Hand", "{Side}Hand_End"],
                  "Hips", "Hips", "Spine", [("{Side}HandThumb1", "{Side}Hand", "thumb")]),
             0.0254, False, "Xrotation Yrotation Zrotation", "inch"),
    "biped_truebones": (_rig([("Bip01 Pelvis", "zero"), ("Bip01 Spine", "spine1"), ("Bip01 Spine1", "spine2"),
                              ("Bip01 Neck", "neck"), ("Bip01 Head", "head"), ("Bip01 HeadNub", "head_top")],
                             ["Bip01 {S} Thigh", "Bip01 {S} Calf", "Bip01 {S} Foot", "Bip01 {S} Toe0"],
                             ["Bip01 {S} Clavicle", "Bip01 {S} UpperArm", "Bip01 {S} Forearm", "Bip01 {S} Hand",
                              "Bip01 {S} Finger0"], "Bip01", "Bip01 Pelvis", "Bip01 Neck"),
                        0.0254, True, "Zrotation Xrotation Yrotation", "inch"),
    "smpl": (_rig([("Spine1", "spine1"), ("Spine2", "spine2"), ("Spine3", "spine3"), ("Neck", "neck"),
                   ("Head", "head_leaf")], ["{S}_Hip", "{S}_Knee", "{S}_Ankle", "{S}_Foot"],
                  ["{S}_Collar", "{S}_Shoulder", "{S}_Elbow", "{S}_Wrist", "{S}_Hand"], "Pelvis", "Pelvis", "Spine3"),
             1.0, False, "Zrotation Xrotation Yrotation", "m"),
    "unreal": (_rig([("pelvis", "zero"), ("spine_01", "spine1"), ("spine_02", "spine2"), ("spine_03", "spine3"),
                     ("neck_01", "neck"), ("head", "head")], ["thigh_{s}", "calf_{s}", "foot_{s}",
                     "ball_{s}"],
                    ["clavicle_{s}", "upperarm_{s}", "lowerarm_{s}", "hand_{s}", "index_01_{s}"],
                    "root", "pelvis", "spine_03",
                    [("lowerarm_twist_01_{s}", "lowerarm_{s}", "zero")]),
               0.01, True, "Xrotation Yrotation Zrotation", "cm"),
}


def _write_bvh(path, joints, unit, zup, order, poses=None):
    """The joints in the family's unit and axes; poses: per frame (root position m, {joint:
    {axis: degrees}})."""
    to_file = (lambda v: np.array([v[0], -v[2], v[1]]) if zup else np.array(v, float))
    axis_file = {"X": ("X", 1), "Y": ("Z", 1) if zup else ("Y", 1),
                 "Z": ("Y", -1) if zup else ("Z", 1)}
    kids = {}
    for name, parent, role, sign in joints:
        kids.setdefault(parent, []).append((name, role, sign))
    lines, order_cols = [], []

    def emit(name, role, sign, depth):
        pad = "  " * depth
        off = np.array(role[0] if isinstance(role, tuple) else ROLES[role], float) * [sign, 1, 1]
        lines.append(f"{pad}{'ROOT' if depth == 0 else 'JOINT'} {name}\n{pad}{{")
        lines.append(f"{pad}  OFFSET " + " ".join(f"{v:.6f}" for v in to_file(off) / unit))
        chans = ("Xposition Yposition Zposition " if depth == 0 else "") + order
        lines.append(f"{pad}  CHANNELS {len(chans.split())} {chans}")
        order_cols.append((name, chans.split()))
        for child, r, sg in kids.get(name, []):
            emit(child, r, sg, depth + 1)
        if name not in kids:
            end = np.array(role[1] if isinstance(role, tuple) else ENDS.get(role, (0, 0, 0)),
                           float) * [sign, 1, 1]
            lines.append(f"{pad}  End Site\n{pad}  {{\n{pad}    OFFSET "
                         + " ".join(f"{v:.6f}" for v in to_file(end) / unit) + f"\n{pad}  }}")
        lines.append(f"{pad}}}")

    emit(*kids[None][0], 0)
    if poses is None:
        knee = next(n for n, _, r, sign in joints if r == "knee" and sign > 0)
        poses = [((0, 0.95, 0), {}), ((0, 0.95, 0), {knee: {"X": 90.0}}), ((0, 0.95, 0.5), {})]
    rows = []
    for root, rots in poses:
        row = []
        for name, chans in order_cols:
            file_rot = {}
            for ax, deg in rots.get(name, {}).items():
                fa, sg = axis_file[ax]
                file_rot[fa] = sg * deg
            for c in chans:
                row.append(to_file(root)["XYZ".index(c[0])] / unit if c.endswith("position") else
                           file_rot.get(c[0], 0.0))
        rows.append(" ".join(f"{v:.6f}" for v in row))
    path.write_text("HIERARCHY\n" + "\n".join(lines) + f"\nMOTION\nFrames: {len(rows)}\nFrame Time: 0.0333333\n"
                    + "\n".join(rows) + "\n")
    return path


def _check_body(p, leg_scale=1.0):
    """Sites (3, NUM_SITES, 3) of _write_bvh's three frames, in metres, Y up, facing
    +z, left = +x."""
    np.testing.assert_allclose(p[:, 0], (p[:, 1] + p[:, 4]) / 2, atol=1e-9)
    assert _hip_angle(p).min() > 179.0
    np.testing.assert_allclose(np.linalg.norm(p[:, 2] - p[:, 1], axis=-1), 0.42 * leg_scale,
                               rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(p[:, 3] - p[:, 2], axis=-1), 0.41 * leg_scale,
                               rtol=1e-4)
    assert p[0, 4, 0] - p[0, 1, 0] > 0.1  # the left hip on the body's left
    assert p[0, 13, 0] > p[0, 11, 0] > p[0, 14, 0] > p[0, 16, 0]  # T-pose: left wrist far left, right far right
    y = p[0, :, 1]
    assert y[3] < y[2] < y[1] < y[0] + 1e-9 and y[0] < y[7] < y[8] < y[9] < y[10]  # feet below, head above
    assert (p[0, 17, 2] > p[0, 3, 2] + 0.05) and (p[0, 19, 2] > p[0, 9, 2])  # toes and face ahead
    shin = (p[1, 6] - p[1, 5]) / np.linalg.norm(p[1, 6] - p[1, 5])
    np.testing.assert_allclose(shin, [0, 0, -1], atol=1e-4)  # the bent left knee: the shin points backwards
    np.testing.assert_allclose(p[1, 3] - p[1, 2], p[0, 3] - p[0, 2], atol=1e-6)  # the right leg did not move
    np.testing.assert_allclose(p[2] - p[0], np.broadcast_to([0, 0, 0.5 * leg_scale], p[0].shape),
                               atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bvh_rig_families(family, tmp_path):
    joints, unit, zup, order, unit_name = FAMILIES[family]
    m = mocap.load_bvh(_write_bvh(tmp_path / f"{family}.bvh", joints, unit, zup, order))
    p, _, _ = mocap.sample_motion(m, m.times)
    assert m.info["up"] == ("z" if zup else "y")
    if unit_name:
        assert m.info["unit"] == unit_name
        _check_body(p)
    else:  # no unit makes a human leg: scaled to 0.85 m hip to ankle
        assert "scaled" in m.info["unit"]
        _check_body(p, leg_scale=0.85 / 0.83)


def test_bvh_rest_pose_not_upright(tmp_path):
    # Rokoko's rig: every bone along its joint's +x at rest, the rotations of every frame make the
    # body; the up axis then comes from the frames, not from the (meaningless) rest pose
    z = (0, 0, 0)
    joints = [("Hips", None, (z, z), 1), ("Spine", "Hips", ((0, 0.10, 0), z), 1),
              ("Spine1", "Spine", ((0.12, 0, 0), z), 1), ("Spine2", "Spine1", ((0.12, 0, 0), z), 1),
              ("Neck", "Spine2", ((0.14, 0, 0), z), 1),
              ("Head", "Neck", ((0.10, 0, 0), (0.18, 0, 0)), 1)]
    for side, s in (("Left", 1), ("Right", -1)):
        joints += [(n, p, r, 1) for n, p, r in [
            (f"{side}Shoulder", "Spine2", ((0.08, -0.03 * s, 0), z)),
            (f"{side}Arm", f"{side}Shoulder", ((0.12, 0, 0), z)),
            (f"{side}ForeArm", f"{side}Arm", ((0.28, 0, 0), z)),
            (f"{side}Hand", f"{side}ForeArm", ((0.25, 0, 0), z)),
            (f"{side}HandIndex1", f"{side}Hand", ((0.08, 0, 0), (0.03, 0, 0))),
            (f"{side}UpLeg", "Hips", ((0.09 * s, -0.06, 0), z)),
            (f"{side}Leg", f"{side}UpLeg", ((0.42, 0, 0), z)),
            (f"{side}Foot", f"{side}Leg", ((0.41, 0, 0), z)),
            (f"{side}ToeBase", f"{side}Foot", ((0.05, 0, 0.12), (0, 0, 0.06)))]]
    base = {"Spine": {"Z": 90.0}, "LeftShoulder": {"Z": -90.0}, "RightShoulder": {"Z": 90.0},
            "LeftUpLeg": {"Z": -90.0}, "RightUpLeg": {"Z": -90.0}}  # +x up the spine, out the arms, down the legs
    poses = [((0, 0.95, 0), base), ((0, 0.95, 0), base | {"LeftLeg": {"Y": 90.0}}),
             ((0, 0.95, 0.5), base)]
    m = mocap.load_bvh(_write_bvh(tmp_path / "rokoko.bvh", joints, 0.01, False, "Yrotation Xrotation Zrotation",
                                  poses))
    assert m.info["up"] == "y" and m.info["unit"] == "cm"
    _check_body(mocap.sample_motion(m, m.times)[0])


def _cgspeed(tmp_path, rename=lambda n: n, name="rig.bvh"):
    joints, unit, zup, order, _ = FAMILIES["cgspeed_cmu"]
    names = {n: rename(n) for n, _, _, _ in joints}
    joints = [(names[n], names.get(p), r, sign) for n, p, r, sign in joints]
    return _write_bvh(tmp_path / name, joints, unit, zup, order), names


def test_bvh_unknown_rig_needs_a_joint_map(tmp_path):
    path, names = _cgspeed(tmp_path, lambda n: f"bone{abs(hash(n)) % 10**6}")
    with pytest.raises(ValueError) as e:
        mocap.load_bvh(path)
    msg = str(e.value)
    assert str(path) in msg and "no left ankle" in msg and names["LeftFoot"] in msg and "joint map" in msg
    jm = {"l_hip": "LeftUpLeg", "l_knee": "LeftLeg", "l_ankle": "LeftFoot", "r_hip": "RightUpLeg",
          "r_knee": "RightLeg", "r_ankle": "RightFoot", "l_shoulder": "LeftArm",
          "l_elbow": "LeftForeArm", "l_wrist": "LeftHand", "r_shoulder": "RightArm",
          "r_elbow": "RightForeArm", "r_wrist": "RightHand", "head": "Head"}
    m = mocap.load_bvh(path, joint_map={k: names[v] for k, v in jm.items()})
    _check_body(mocap.sample_motion(m, m.times)[0])
    # a map that swaps left and right is refused: the toes would point backwards
    swapped = {k: names[v] for k, v in jm.items() if k != "head"}
    swapped = {("r" if k[0] == "l" else "l") + k[1:]: v for k, v in swapped.items()} | {"head": names["Head"]}
    with pytest.raises(ValueError, match="swapped"):
        mocap.load_bvh(path, joint_map=swapped)
    with pytest.raises(ValueError, match="not one of"):
        mocap.load_bvh(path, joint_map={"left_foot": names["LeftFoot"]})
    with pytest.raises(ValueError, match="no joint 'Nope'"):
        mocap.load_bvh(path, joint_map={"l_ankle": "Nope"})


def test_bvh_partial_joint_map(tmp_path):
    # feet named unlike any family: the map names only them, the rest is found as usual
    path, names = _cgspeed(tmp_path, lambda n: n.replace("Foot", "Paw"))
    with pytest.raises(ValueError, match="no left ankle"):
        mocap.load_bvh(path)
    m = mocap.load_bvh(path, joint_map={"l_ankle": "LeftPaw", "r_ankle": "RightPaw"})
    assert m.info["joints"]["l_knee"] == "LeftLeg" and m.info["joints"]["l_hip"] == "LeftUpLeg"
    _check_body(mocap.sample_motion(m, m.times)[0])


def test_bvh_up_and_unit_can_be_given(tmp_path):
    joints, unit, zup, order, _ = FAMILIES["mixamo"]
    path = _write_bvh(tmp_path / "m.bvh", joints, unit, zup, order)
    auto = mocap.load_bvh(path)
    given = mocap.load_bvh(path, up="y", unit="cm")
    np.testing.assert_array_equal(mocap.sample_motion(auto, auto.times)[0],
                                  mocap.sample_motion(given, given.times)[0])
    in_m = mocap.load_bvh(path, unit=1.0)  # the numbers read as metres: 100x the body
    np.testing.assert_allclose(np.linalg.norm(in_m.offsets, axis=-1),
                               100 * np.linalg.norm(auto.offsets, axis=-1))
    lying = mocap.load_bvh(path, up="z")  # the file's +z (the body's forward) turned up: the body lies on its back
    p = mocap.sample_motion(lying, lying.times)[0]
    assert lying.info["up"] == "z" and p[0, 10, 2] < p[0, 0, 2] - 0.4
    with pytest.raises(ValueError, match="unit"):
        mocap.load_bvh(path, unit="furlong")


def test_bvh_parse_errors_name_the_file(tmp_path):
    path, _ = _cgspeed(tmp_path)
    text = path.read_text()
    for name, bad in (("short.bvh", text.rsplit("\n", 2)[0]),
                      ("nomotion.bvh", text.split("MOTION")[0]),
                      ("token.bvh", text.replace("OFFSET", "OFSET", 1))):
        (tmp_path / name).write_text(bad)
        with pytest.raises(ValueError, match=name):
            mocap.load_bvh(tmp_path / name)


def _amp_dict():
    with np.load(mocap.ASSET_DIR / "isaac_amp_humanoid_walk.npz", allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    return {"rotation": {"arr": a["rotation_xyzw"]},
            "root_translation": {"arr": a["root_translation"]},
            "skeleton_tree": {"node_names": list(a["node_names"]), "parent_indices": {"arr": a["parent_indices"]},
                              "local_translation": {"arr": a["local_translation"]}},
            "is_local": True, "fps": float(a["fps"])}


def test_amp_npy_only_with_allow_pickle(tmp_path):
    path = tmp_path / "walk.npy"  # the original AMP format: a pickled dict (poselib SkeletonMotion)
    np.save(path, np.array(_amp_dict(), dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as e:
        mocap.load_file(path)
    assert str(path) in str(e.value) and "--convert-amp" in str(e.value) and "--allow-pickle" in str(e.value)
    m = mocap.load_file(path, allow_pickle=True)
    ref = mocap.load_motion("isaac_amp_humanoid_walk.npz")
    np.testing.assert_array_equal(m.rot, ref.rot)
    np.testing.assert_array_equal(m.root_pos, ref.root_pos)
    mocap.convert_amp_npy(path, tmp_path / "walk.npz")
    np.testing.assert_array_equal(mocap.load_file(tmp_path / "walk.npz").rot, ref.rot)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not a poselib SkeletonMotion"):
        mocap.load_file(tmp_path / "plain.npy", allow_pickle=True)


def test_load_dir_lists_loaded_refused_ignored(tmp_path):
    joints, unit, zup, order, _ = FAMILIES["mixamo"]
    (tmp_path / "sub").mkdir()
    good = _write_bvh(tmp_path / "sub" / "good.bvh", joints, unit, zup, order)
    bad, _ = _cgspeed(tmp_path, lambda n: n.replace("Foot", "Paw"), name="paws.bvh")
    np.save(tmp_path / "amp.npy", np.array(_amp_dict(), dtype=object), allow_pickle=True)
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / "broken.txt").write_text("{not json")
    loaded, refused, ignored = mocap.load_dir(tmp_path)
    assert [p for p, _ in loaded] == [good] and ignored == [tmp_path / "notes.md"]
    assert sorted(p.name for p, _ in refused) == ["amp.npy", "broken.txt", "paws.bvh"]
    assert all(str(p) in why for p, why in refused)
    lines = mocap.load_report(loaded, refused, ignored)
    assert len(lines) == 5 and lines[0].startswith("loaded") and "unit cm" in lines[0]
    # a joint map holds for every BVH of the folder: one whose joints it does not name is
    # refused, saying so
    loaded, refused, _ = mocap.load_dir(tmp_path, allow_pickle=True,
                                        joint_map={"l_ankle": "LeftPaw",
                                                                                "r_ankle": "RightPaw"})
    assert sorted(p.name for p, _ in loaded) == ["amp.npy", "paws.bvh"]
    assert sorted(p.name for p, _ in refused) == ["broken.txt", "good.bvh"] and "no joint 'LeftPaw'" in refused[1][1]
    with pytest.raises(FileNotFoundError):
        mocap.load_dir(tmp_path / "nope")
