"""sample.py: one prediction and a rollout from our clip format and from a frame folder
(the model only ever sees the frames before "now"), the default no-argument run on a dataset's
validation clip, the pictures, the video path (PyAV when installed, a clear error when not), and
the CLI end to end on a tiny saved model."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import SpyModel, frame_jpeg, random_walk, write_clip

import data
import kinematics
import sample

# real test videos, where the machine has them (CI passes their folder in MIMIC_TEST_VIDEOS)
VIDEOS = Path(os.environ["MIMIC_TEST_VIDEOS"]) if os.environ.get("MIMIC_TEST_VIDEOS") else None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(1)
    for i, T in enumerate([27, 22]):
        a = random_walk(rng, T, scale=0.05)
        a[:, 0] = 0.01 * np.arange(T)  # angle 0 encodes the frame index
        write_clip(root, f"s{i}", a, "jumping jacks")
    data.write_index(root)
    return root


def args_for(dataset, out, *extra):
    return sample.get_args(["--data", str(dataset), "--out", str(out), "--device", "cpu", *extra])


def test_resample_to_10hz_takes_the_last_frame_shown():
    np.testing.assert_array_equal(sample.resample_indices(np.arange(13) / 30.0), [0, 3, 6, 9, 12])
    np.testing.assert_array_equal(sample.resample_indices([0.0, 0.25, 0.26, 0.5]), [0, 0, 0, 2, 2, 3])


def test_default_run_predicts_from_the_past_frames_and_writes_files(dataset, tmp_path):
    model = SpyModel()
    out = tmp_path / "s"
    rec = sample.run(model, args_for(dataset, out))
    first = data.list_clips(dataset, "val")[0]
    clip = data.read_clip(dataset / first["path"])
    # now = frame 4: the model saw frames 0..3 with the box, and the ground-truth state of frame 4
    assert model.seen == [([0, 1, 2, 3], 4, True)]
    saved = json.loads((out / "prediction.json").read_text())
    assert saved["joint_names"] == list(kinematics.JOINT_NAMES) and saved["start_frame"] == 4
    assert saved["prompt"] == "Task: jumping jacks. Instruction: Do jumping jacks."
    pred = np.load(out / "prediction.npy")
    assert pred.shape == (16, 22)
    np.testing.assert_allclose(saved["angles_rad"], pred, atol=1e-6)
    np.testing.assert_allclose(saved["ground_truth_rad"], clip.angles[4:20], atol=1e-6)
    np.testing.assert_allclose(saved["state_rad"], clip.angles[4], atol=1e-7)
    assert rec["rmse_deg_t1_15"] > 0
    strip = Image.open(out / "sample.png")
    assert strip.size == (200 * 10, 236)
    px = np.asarray(strip.convert("RGB"))[36:, 800:].reshape(-1, 3)  # the skeleton panels: both colours
    for color in (sample.PRED_COLOR, sample.GT_COLOR):
        assert (np.abs(px.astype(int) - color).sum(1) < 30).sum() > 50
    gif = Image.open(out / "sample.gif")
    assert gif.n_frames == 16


def test_rollout_requeries_every_s_steps_with_latency(dataset, tmp_path):
    model = SpyModel()
    out = tmp_path / "r"
    sample.run(model, args_for(dataset, out, "--clip", str(dataset / data.list_clips(dataset)[0]["path"]),
                               "--rollout", "5", "--start", "0.6"))
    T = data.ClipFile(dataset / data.list_clips(dataset)[0]["path"]).num_frames
    roll = json.loads((out / "rollout.json").read_text())
    assert roll["calls_at_frame"] == list(range(6, T, 5))
    assert roll["frames"] == list(range(6, T))
    assert np.load(out / "rollout.npy").shape == (T - 6, 22)
    assert roll["latency"]["calls"] == len(roll["calls_at_frame"]) and roll["latency"]["median_ms"] > 0
    # every call (the single prediction first) saw exactly the 4 frames before its time
    assert [t for _, t, _ in model.seen] == [6] + roll["calls_at_frame"]
    assert all(ids == list(range(t - 4, t)) for ids, t, _ in model.seen)
    assert roll["rmse_deg_no_restart"] > 0
    assert Image.open(out / "rollout.gif").n_frames == T - 6


def test_frame_folder_with_box_and_no_ground_truth(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(30):  # 3 s at 10 fps... written at 20 fps: every second file is used
        (folder / f"{i:04d}.jpg").write_bytes(frame_jpeg(i))
    model = SpyModel()
    out = tmp_path / "f"
    rec = sample.run(model, sample.get_args(["--frames", str(folder), "--fps", "20", "--instruction", "Jog.",
                                             "--task", "jogging", "--box", "4", "4", "44", "36", "--start", "1.0",
                                             "--rollout", "4", "--out", str(out), "--device", "cpu"]))
    assert rec["prompt"] == "Task: jogging. Instruction: Jog."
    assert "ground_truth_rad" not in rec and "rmse_deg_t1_15" not in rec
    # now = 1.0 s = tick 10: ticks 6..9 = files 12, 14, 16, 18, box drawn
    assert model.seen[0][0] == [12, 14, 16, 18] and model.seen[0][2]
    np.testing.assert_allclose(rec["state_rad"], kinematics.pose3d_to_angles(sample.STANDING_POSE3D), atol=1e-9)
    roll = json.loads((out / "rollout.json").read_text())
    assert roll["state"] == "own prediction" and roll["calls_at_frame"] == [10, 14]


def test_video_needs_pyav_or_says_how_to_get_it(tmp_path, monkeypatch):
    video = VIDEOS / "stgcn_tai_chi.mp4" if VIDEOS is not None else None
    try:
        import av  # noqa: F401
        have_av = True
    except ImportError:
        have_av = False
    if have_av and video is not None and video.is_file():  # 300 frames at 29.97 fps -> 100 at 10 Hz
        src = sample.load_video(video)
        assert len(src.frames) == 100 and src.frames[0].size == (340, 256) and src.angles is None
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(SystemExit, match="pip install av"):
        sample.main(["--video", str(tmp_path / "x.mp4"), "--instruction", "x", "--out", str(tmp_path)])


def test_cli_end_to_end_with_a_tiny_saved_model(dataset, tmp_path):
    from model import PRESETS, VLAConfig, VLAModel

    torch.manual_seed(0)
    ckpt = VLAModel(VLAConfig(**PRESETS["tiny"])).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "cli"
    clip = dataset / data.list_clips(dataset)[0]["path"]
    rec = sample.main(["--ckpt", str(ckpt), "--clip", str(clip), "--rollout", "8", "--out", str(out), "--device",
                       "cpu"])
    for name in ("prediction.json", "prediction.npy", "sample.png", "sample.gif", "rollout.json", "rollout.npy",
                 "rollout.gif"):
        assert (out / name).is_file(), name
    pred = np.load(out / "prediction.npy")
    assert pred.shape == (16, 22) and np.all(np.abs(pred) <= np.pi + 1e-6)
    again = sample.main(["--ckpt", str(ckpt), "--clip", str(clip), "--out", str(tmp_path / "cli2"), "--device",
                         "cpu"])
    np.testing.assert_array_equal(np.asarray(rec["angles_rad"]), np.asarray(again["angles_rad"]))  # seeded noise
