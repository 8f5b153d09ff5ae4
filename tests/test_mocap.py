# mocap.py: the loaders + FK on the shipped files and resampling at any times. The mocap ships inside the repo
# (assets/mocap), so nothing skips.
import dataclasses

import numpy as np
import pytest

import mocap

# (parent, child) bones of the 17 Human3.6M joints
BONES = [(0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (0, 7), (7, 8), (8, 9), (9, 10), (8, 11), (11, 12),
         (12, 13), (8, 14), (14, 15), (15, 16)]
UPRIGHT = {"walk", "run", "jog", "zombie_walk", "stealthy_walk", "jump", "kick", "spinkick", "punch", "amp_walk",
           "amp_run", "jumping_jacks"}


def _sample_all(m):
    """Every source frame, and for loops two and a half cycles (exercises the cycle chaining and seam closure)."""
    if m.loop:
        return np.concatenate([m.times, m.times[-1] + np.linspace(0.0, 1.5 * m.times[-1], 40)])
    return m.times


@pytest.mark.parametrize("key,file", [(k, f) for k, f, _, _ in mocap.MOTIONS])
def test_loader_plausible_skeleton(key, file):
    m = mocap.load_motion(file)
    p, _, _ = mocap.sample_motion(m, _sample_all(m))
    assert p.shape[1:] == (mocap.NUM_SITES, 3) and np.isfinite(p).all()
    # rigid bones keep their length; in the CMU skeleton thorax is a point on the upper chest, so the two bones
    # reaching it across the Chest2 / neck joints are not rigid
    bones = [b for b in BONES if not (file.endswith(".bvh") and b in ((7, 8), (8, 9)))]
    lengths = np.stack([np.linalg.norm(p[:, a] - p[:, b], axis=-1) for a, b in bones], 1)
    assert np.ptp(lengths, 0).max() < 1e-4
    assert (lengths > 0.05).all() and (lengths < 0.6).all()  # metres
    thigh, shin = lengths[0, 1], lengths[0, 2]
    assert 0.35 < thigh < 0.5 and 0.35 < shin < 0.5
    if key in UPRIGHT:  # world up is +Y: the head stays well above the pelvis
        assert np.mean(p[:, 10, 1] > p[:, 0, 1] + 0.2) > 0.95
    # chirality: the right hip lies on the body's right, right = facing x up (Y up, right-handed); the toes show
    # the facing reliably while both feet point ahead (locomotion, jumping jacks)
    if key in {"walk", "run", "jog", "zombie_walk", "stealthy_walk", "amp_walk", "amp_run", "jumping_jacks"}:
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
    # the AMP files store 30 Hz captures at 60 fps (each pose twice); the loader keeps one of each and cuts the
    # longest near-cyclic span, so consecutive kept frames differ and the cycle is long enough to be a gait cycle
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
