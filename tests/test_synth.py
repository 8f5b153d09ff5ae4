# synth.py: camera convention, 10 Hz clip times, rendering determinism and a small demo build read
# back through data.py.
import io
import json

import numpy as np
from PIL import Image

import data
import kinematics
import mocap
import synth


def test_camera_convention():
    # a camera at the origin looking along world +X (Y up): its right is +Z in a right-handed world
    cam = synth.Camera(synth.look_rotation([1.0, 0.0, 0.0]), np.zeros((1, 3)), focal=300.0)
    pts = np.array([[[5.0, 0.0, 0.0], [5.0, 0.0, 1.0], [5.0, 1.0, 0.0]]])  # ahead, to the right, above
    pc = synth.world_to_camera(cam, pts)[0]
    np.testing.assert_allclose(pc[0], [0.0, 0.0, 5.0], atol=1e-12)
    assert pc[1, 0] > 0 and pc[2, 1] < 0  # right -> x > 0, above -> y < 0 (y is image-down)
    uv = synth.project(cam, pc)
    assert uv[1, 0] > synth.WIDTH / 2 and uv[2, 1] < synth.HEIGHT / 2
    assert abs(np.linalg.det(cam.rot) - 1.0) < 1e-12  # a rotation, no mirror: left stays left
    # random cameras are upright (world up -> image up), keep the body in front and in frame
    m = mocap.load_motion("deepmimic_humanoid3d_walk.txt")
    p, _, _ = mocap.sample_motion(m, np.arange(40) / 10)
    for seed in range(5):
        cam = synth.random_camera(np.random.default_rng(seed), p)
        assert (cam.rot @ [0.0, 1.0, 0.0])[1] < 0 and abs(np.linalg.det(cam.rot) - 1) < 1e-9
        pc = synth.world_to_camera(cam, p)
        uv = synth.project(cam, pc)
        assert (pc[..., 2] > 0.5).all()
        assert (uv >= 0).all() and (uv[..., 0] <= synth.WIDTH).all() and (uv[..., 1] <= synth.HEIGHT).all()
        assert -10.001 <= cam.params["elevation_deg"] <= 30.001


def test_clip_times_at_10_hz():
    m = mocap.load_motion("deepmimic_humanoid3d_roll.txt")  # a loop
    times = synth.clip_times(np.random.default_rng(0), m)
    np.testing.assert_allclose(np.diff(times), 0.1, atol=1e-12)
    assert synth.MIN_FRAMES <= len(times) <= synth.MAX_FRAMES


def test_one_shot_motions_hold_to_reach_min_frames():
    m = mocap.load_motion("deepmimic_humanoid3d_kick.txt")  # 1.53 s, not a loop
    assert not m.loop
    times = synth.clip_times(np.random.default_rng(1), m)
    assert len(times) == synth.MIN_FRAMES and times[0] <= 0 and times[-1] >= m.times[-1]
    p, _, src_t = mocap.sample_motion(m, times)
    assert src_t.min() >= 0 and src_t.max() <= m.times[-1] + 1e-12  # held, never extrapolated
    first, _, _ = mocap.sample_motion(m, np.array([0.0]))
    np.testing.assert_allclose(p[0], first[0], atol=1e-12)


def test_make_clip_deterministic():
    a, b = synth.make_clip(5, seed=0), synth.make_clip(5, seed=0)
    assert a.frames_jpeg == b.frames_jpeg
    for name in ("boxes", "pose3d", "angles", "src_frame_index", "src_time"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.clip_id, a.description, a.extra) == (b.clip_id, b.description, b.extra)
    c = synth.make_clip(5, seed=1)
    assert c.clip_id == a.clip_id and c.frames_jpeg != a.frames_jpeg  # ids are stable, content follows the seed


def _check_clip(clip):
    T = len(clip.frames_jpeg)
    assert T >= synth.MIN_FRAMES
    assert clip.pose3d.shape == (T, 17, 3) and clip.angles.shape == (T, 22) and clip.boxes.shape == (T, 4)
    np.testing.assert_allclose(clip.angles, kinematics.pose3d_to_angles(clip.pose3d), atol=1e-5)
    im = Image.open(io.BytesIO(clip.frames_jpeg[T // 2]))
    assert im.size == (clip.width, clip.height) == (synth.WIDTH, synth.HEIGHT) and im.mode == "RGB"
    # the box holds the body: every joint, projected with the clip's camera, lies inside it
    focal = json.loads(clip.extra["camera"])["focal_px"]
    uv = focal * clip.pose3d[..., :2] / clip.pose3d[..., 2:] + np.array([clip.width / 2, clip.height / 2])
    uv = np.clip(uv, 0, [clip.width - 1, clip.height - 1])
    x1, y1, x2, y2 = (clip.boxes[:, None, i] for i in range(4))
    assert ((uv[..., 0] >= x1) & (uv[..., 0] <= x2) & (uv[..., 1] >= y1) & (uv[..., 1] <= y2)).all()
    assert (clip.boxes[:, 2] - clip.boxes[:, 0] > 10).all() and (clip.boxes[:, 3] - clip.boxes[:, 1] > 10).all()
    # upright camera: the head is above the pelvis in the image for a standing motion
    # (y is image-down)
    if clip.action_class in ("walk", "jumping jacks", "jog"):
        assert np.mean(clip.pose3d[:, 10, 1] < clip.pose3d[:, 0, 1]) > 0.95
    assert clip.action_class and clip.description.endswith(".")


def test_small_build_reads_back(tmp_path):
    n = len(mocap.MOTIONS)  # one clip of every motion: every loader and the renderer on each skeleton
    root = synth.build_demo(tmp_path / "demo", seed=0, num_clips=n, workers=2)
    marker = root / synth.MARKER
    assert json.loads(marker.read_text()) == {"demo_version": synth.DEMO_VERSION, "seed": 0,
                                              "num_clips": n}
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name != synth.MARKER and p.suffix != ".tmp")
    clips = [data.read_clip(p) for p in paths if p.name != getattr(data, "INDEX_FILE", None)]
    assert sorted(c.clip_id for c in clips) == sorted(f"demo-{k}-000" for k, _, _, _ in mocap.MOTIONS)
    for clip in clips:
        _check_clip(clip)
    # a second call finds the marker and does nothing
    stamp = marker.stat().st_mtime_ns
    synth.build_demo(root, seed=0, num_clips=n)
    assert marker.stat().st_mtime_ns == stamp


def test_build_same_seed_same_bytes(tmp_path):
    a = synth.build_demo(tmp_path / "a", seed=3, num_clips=2, workers=1)
    b = synth.build_demo(tmp_path / "b", seed=3, num_clips=2, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert (a / data.INDEX_FILE).read_bytes() == (b / data.INDEX_FILE).read_bytes()
    # every byte synth.py produces is equal (JPEG frames, arrays, texts); the safetensors container
    # may order its header's metadata keys differently from one write to the next, so clips are
    # compared field by field
    for f in files:
        if f.suffix != ".safetensors":
            continue
        ca, cb = data.read_clip(a / f), data.read_clip(b / f)
        assert ca.frames_jpeg == cb.frames_jpeg, f
        for name in ("boxes", "pose3d", "angles", "src_frame_index", "src_time"):
            assert getattr(ca, name).tobytes() == getattr(cb, name).tobytes(), (f, name)
        for name in ("clip_id", "src_fps", "width", "height", "action_class", "description",
                     "video_id", "split", "extra"):
            assert getattr(ca, name) == getattr(cb, name), (f, name)


def test_default_size_gives_validation_clips():
    ids = [f"demo-{mocap.MOTIONS[i % len(mocap.MOTIONS)][0]}-{i // len(mocap.MOTIONS):03d}"
           for i in range(synth.DEFAULT_NUM_CLIPS)]
    val = [i for i in ids if data.split_of(i) == "val"]
    assert len(set(ids)) == len(ids) and len(val) >= 8
