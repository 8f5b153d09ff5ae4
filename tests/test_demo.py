# demo.py: mocap loaders + FK on the shipped files, 10 Hz resampling, camera convention, rendering determinism and
# a small dataset build read back through data.py. The mocap ships inside the repo (assets/mocap), so nothing skips.
import dataclasses
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

import data
import demo

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


@pytest.mark.parametrize("key,file", [(k, f) for k, f, _, _ in demo.MOTIONS])
def test_loader_plausible_skeleton(key, file):
    m = demo.load_motion(file)
    p, _, _ = demo.sample_motion(m, _sample_all(m))
    assert p.shape[1:] == (demo.NUM_SITES, 3) and np.isfinite(p).all()
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
    m = demo.load_motion(file)  # both sources put the ground at height 0
    p, _, _ = demo.sample_motion(m, np.arange(0.0, 4.0, 0.05))
    lowest_ankle = p[:, [3, 6], 1].min(1)
    assert (lowest_ankle > -0.03).all() and (lowest_ankle < 0.15).all()  # always a foot on the ground
    assert np.ptp(p[:, 0, 1]) < 0.1  # the pelvis keeps its height
    assert np.linalg.norm(p[-1, 0, [0, 2]] - p[0, 0, [0, 2]]) > 3.0  # and it goes somewhere: ~1.2 m/s for 4 s


def test_amp_repeats_dropped_and_loop_cut():
    # the AMP files store 30 Hz captures at 60 fps (each pose twice); the loader keeps one of each and cuts the
    # longest near-cyclic span, so consecutive kept frames differ and the cycle is long enough to be a gait cycle
    m = demo.load_motion("isaac_amp_humanoid_walk.npz")
    with np.load(demo.ASSET_DIR / "isaac_amp_humanoid_walk.npz", allow_pickle=False) as z:
        n_file, fps = len(z["rotation_xyzw"]), float(z["fps"])
    assert m.loop and m.times[-1] >= 0.75
    assert (np.abs(np.diff(m.rot, axis=0)).max((1, 2)) > 1e-7).all()
    np.testing.assert_allclose(m.times, (m.src_index - m.src_index[0]) / fps)
    assert 0 <= m.src_index[0] and m.src_index[-1] < n_file
    q = m.rot[[0, -1], 1:]  # start and end poses of the cut span match within the 12 deg tolerance
    assert np.degrees(2 * np.arccos(np.abs((q[0] * q[1]).sum(-1)).clip(0, 1))).max() <= 12.0


def test_resampling_follows_source_frames_and_dt():
    loop = demo.load_motion("deepmimic_humanoid3d_roll.txt")  # one frame of this clip lasts 0.0327 s, not 1/60
    dt = np.diff(loop.times)
    assert dt.max() - dt.min() > 0.01
    # played once (no seam closure), the sampler returns exactly the source frames at their times
    m = dataclasses.replace(loop, loop=False)
    p, idx, t = demo.sample_motion(m, m.times[:-1])
    ref = demo.forward_kinematics(m, m.root_pos[:-1], m.rot[:-1])
    np.testing.assert_allclose(p, ref, atol=1e-9)
    np.testing.assert_array_equal(idx, np.arange(len(m.times) - 1))
    # midway between two frames the root moves halfway
    mid = (m.times[10] + m.times[11]) / 2
    p_mid, _, _ = demo.sample_motion(m, np.array([mid]))
    np.testing.assert_allclose(p_mid[0, 0], (m.root_pos[10] + m.root_pos[11]) / 2, atol=1e-9)
    # 10 Hz clip times, and the loop seam is closed: no jump between the end of a cycle and the next one
    rng = np.random.default_rng(0)
    times = demo.clip_times(rng, m)
    np.testing.assert_allclose(np.diff(times), 0.1, atol=1e-12)
    assert demo.MIN_FRAMES <= len(times) <= demo.MAX_FRAMES
    period = loop.times[-1]
    p_seam, _, _ = demo.sample_motion(loop, np.array([period - 1e-7, period + 1e-7, 2 * period - 1e-7, 2 * period]))
    assert np.abs(p_seam[0] - p_seam[1]).max() < 1e-4 and np.abs(p_seam[2] - p_seam[3]).max() < 1e-4


def test_one_shot_motions_hold_to_reach_min_frames():
    m = demo.load_motion("deepmimic_humanoid3d_kick.txt")  # 1.53 s, not a loop
    assert not m.loop
    times = demo.clip_times(np.random.default_rng(1), m)
    assert len(times) == demo.MIN_FRAMES and times[0] <= 0 and times[-1] >= m.times[-1]
    p, _, src_t = demo.sample_motion(m, times)
    assert src_t.min() >= 0 and src_t.max() <= m.times[-1] + 1e-12  # held, never extrapolated
    first, _, _ = demo.sample_motion(m, np.array([0.0]))
    np.testing.assert_allclose(p[0], first[0], atol=1e-12)


def test_camera_convention():
    # a camera at the origin looking along world +X (Y up): its right is +Z in a right-handed world
    cam = demo.Camera(demo.look_rotation([1.0, 0.0, 0.0]), np.zeros((1, 3)), focal=300.0)
    pts = np.array([[[5.0, 0.0, 0.0], [5.0, 0.0, 1.0], [5.0, 1.0, 0.0]]])  # ahead, to the right, above
    pc = demo.world_to_camera(cam, pts)[0]
    np.testing.assert_allclose(pc[0], [0.0, 0.0, 5.0], atol=1e-12)
    assert pc[1, 0] > 0 and pc[2, 1] < 0  # right -> x > 0, above -> y < 0 (y is image-down)
    uv = demo.project(cam, pc)
    assert uv[1, 0] > demo.WIDTH / 2 and uv[2, 1] < demo.HEIGHT / 2
    assert abs(np.linalg.det(cam.rot) - 1.0) < 1e-12  # a rotation, no mirror: left stays left
    # random cameras are upright (world up -> image up), keep the body in front and in frame
    m = demo.load_motion("deepmimic_humanoid3d_walk.txt")
    p, _, _ = demo.sample_motion(m, np.arange(40) / 10)
    for seed in range(5):
        cam = demo.random_camera(np.random.default_rng(seed), p)
        assert (cam.rot @ [0.0, 1.0, 0.0])[1] < 0 and abs(np.linalg.det(cam.rot) - 1) < 1e-9
        pc = demo.world_to_camera(cam, p)
        uv = demo.project(cam, pc)
        assert (pc[..., 2] > 0.5).all()
        assert (uv >= 0).all() and (uv[..., 0] <= demo.WIDTH).all() and (uv[..., 1] <= demo.HEIGHT).all()
        assert -10.001 <= cam.params["elevation_deg"] <= 30.001


def test_make_clip_deterministic():
    a, b = demo.make_clip(5, seed=0), demo.make_clip(5, seed=0)
    assert a.frames_jpeg == b.frames_jpeg
    for name in ("boxes", "pose3d", "angles", "src_frame_index", "src_time"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.clip_id, a.description, a.extra) == (b.clip_id, b.description, b.extra)
    c = demo.make_clip(5, seed=1)
    assert c.clip_id == a.clip_id and c.frames_jpeg != a.frames_jpeg  # ids are stable, content follows the seed


def _check_clip(clip):
    T = len(clip.frames_jpeg)
    assert T >= demo.MIN_FRAMES
    assert clip.pose3d.shape == (T, 17, 3) and clip.angles.shape == (T, 22) and clip.boxes.shape == (T, 4)
    np.testing.assert_allclose(clip.angles, data.pose3d_to_angles(clip.pose3d), atol=1e-5)
    im = Image.open(io.BytesIO(clip.frames_jpeg[T // 2]))
    assert im.size == (clip.width, clip.height) == (demo.WIDTH, demo.HEIGHT) and im.mode == "RGB"
    # the box holds the body: every joint, projected with the clip's camera, lies inside it
    focal = json.loads(clip.extra["camera"])["focal_px"]
    uv = focal * clip.pose3d[..., :2] / clip.pose3d[..., 2:] + np.array([clip.width / 2, clip.height / 2])
    uv = np.clip(uv, 0, [clip.width - 1, clip.height - 1])
    x1, y1, x2, y2 = (clip.boxes[:, None, i] for i in range(4))
    assert ((uv[..., 0] >= x1) & (uv[..., 0] <= x2) & (uv[..., 1] >= y1) & (uv[..., 1] <= y2)).all()
    assert (clip.boxes[:, 2] - clip.boxes[:, 0] > 10).all() and (clip.boxes[:, 3] - clip.boxes[:, 1] > 10).all()
    # upright camera: the head is above the pelvis in the image for a standing motion (y is image-down)
    if clip.action_class in ("walk", "jumping jacks", "jog"):
        assert np.mean(clip.pose3d[:, 10, 1] < clip.pose3d[:, 0, 1]) > 0.95
    assert clip.action_class and clip.description.endswith(".")


def test_small_build_reads_back(tmp_path):
    n = len(demo.MOTIONS)  # one clip of every motion: every loader and the renderer on each skeleton
    root = demo.build_demo(tmp_path / "demo", seed=0, num_clips=n, workers=2)
    marker = root / demo.MARKER
    assert json.loads(marker.read_text()) == {"demo_version": demo.DEMO_VERSION, "seed": 0, "num_clips": n}
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name != demo.MARKER and p.suffix != ".tmp")
    clips = [data.read_clip(p) for p in paths if p.name != getattr(data, "INDEX_FILE", None)]
    assert sorted(c.clip_id for c in clips) == sorted(f"demo-{k}-000" for k, _, _, _ in demo.MOTIONS)
    for clip in clips:
        _check_clip(clip)
    # a second call finds the marker and does nothing
    stamp = marker.stat().st_mtime_ns
    demo.build_demo(root, seed=0, num_clips=n)
    assert marker.stat().st_mtime_ns == stamp


def test_build_same_seed_same_bytes(tmp_path):
    a = demo.build_demo(tmp_path / "a", seed=3, num_clips=2, workers=1)
    b = demo.build_demo(tmp_path / "b", seed=3, num_clips=2, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert (a / data.INDEX_FILE).read_bytes() == (b / data.INDEX_FILE).read_bytes()
    # every byte demo.py produces is equal (JPEG frames, arrays, texts); the safetensors container may order its
    # header's metadata keys differently from one write to the next, so clips are compared field by field
    for f in files:
        if f.suffix != ".safetensors":
            continue
        ca, cb = data.read_clip(a / f), data.read_clip(b / f)
        assert ca.frames_jpeg == cb.frames_jpeg, f
        for name in ("boxes", "pose3d", "angles", "src_frame_index", "src_time"):
            assert getattr(ca, name).tobytes() == getattr(cb, name).tobytes(), (f, name)
        for name in ("clip_id", "src_fps", "width", "height", "action_class", "description", "video_id", "split",
                     "extra"):
            assert getattr(ca, name) == getattr(cb, name), (f, name)


def test_default_size_gives_validation_clips():
    ids = [f"demo-{demo.MOTIONS[i % len(demo.MOTIONS)][0]}-{i // len(demo.MOTIONS):03d}"
           for i in range(demo.DEFAULT_NUM_CLIPS)]
    val = [i for i in ids if data.split_of(i) == "val"]
    assert len(set(ids)) == len(ids) and len(val) >= 8
