"""eval.py: metrics on hand-made trajectories with known answers, baselines against an independent
computation, the no-leak rule (an instrumented frame reader + frames that carry their own index),
caching and determinism of model calls, and the CLI end to end (baselines only, and a tiny model)
writing its files."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import kinematics
import model_io
from model import VLAModel

STEPS = (1, 2, 3, 5, 8, 16)


# ---------------------------------------------------------------------------------------------------------------
# Tiny datasets written with data.write_clip. Frame t of every clip is a flat colour whose red
# channel is 7 * t, so whatever reaches a model tells which frame it was; angle 0 of frame t is
# 0.01 * t rad, so the state tells t too.


def frame_jpeg(t, size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, (7 * t, 40, 90)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_clip(root, clip_id, angles, action_class="waving", split="val"):
    T = len(angles)
    clip = data.Clip(clip_id=clip_id, frames_jpeg=[frame_jpeg(t) for t in range(T)],
                     boxes=np.tile(np.float32([4, 4, 44, 36]), (T, 1)),
                     pose3d=np.asarray(kinematics.angles_to_pose3d(np.asarray(angles, np.float64)), np.float32),
                     angles=np.asarray(angles, np.float32),
                     src_frame_index=np.arange(T), src_time=np.arange(T) / 10.0, src_fps=10.0, width=48, height=40,
                     action_class=action_class, description=f"Do {action_class}.", split=split)
    return data.write_clip(root, clip)


def random_walk(rng, T, scale=0.3):
    """Angles that wander and cross +-pi often (radians, wrapped like IK output)."""
    a = rng.uniform(-np.pi, np.pi, 22) + np.cumsum(rng.normal(0, scale, (T, 22)), axis=0)
    return kinematics.wrap_angle(a)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three val clips (two classes) and one train clip; lengths 20 and 21 have windows
    ending at the last frame."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for i, (T, cls) in enumerate([(20, "waving"), (21, "waving"), (27, "squats")]):
        a = random_walk(rng, T)
        a[:, 0] = 0.01 * np.arange(T)  # angle 0 encodes the frame index (for the no-leak test)
        write_clip(root, f"clip{i}", a, cls)
    write_clip(root, "train0", random_walk(rng, 30), "squats", split="train")
    data.write_index(root)
    return root


# --------------------------------------------------------------------------------------------------
# Hand-made trajectories with known answers


def test_wrapped_errors_cross_180():
    assert ev.wrap_deg(180.0) == -180.0 and ev.wrap_deg(-180.0) == -180.0 and ev.wrap_deg(540.0) == -180.0
    pred, gt = np.radians([179.0, -179.0, 10.0]), np.radians([-179.0, 179.0, -10.0])
    np.testing.assert_allclose(ev.errors_deg(pred, gt), [-2.0, 2.0, 20.0], atol=1e-9)


def test_constant_velocity_through_180_known_answers():
    """One joint turns 3 deg per frame from 170 deg, crossing +180 -> -180 at t = 4.
    Linear is exact; static's error at t is 3 * (t mod S); unwrapped differences would
    instead see jumps of 360 deg."""
    deg = (170.0 + 3.0 * np.arange(-1, 16) + 180.0) % 360.0 - 180.0  # frames s-1 .. s+15
    ext = np.zeros((1, 17, 22))
    ext[0, :, 5] = np.radians(deg)
    gt = ext[:, 1:]
    offsets = ev.restart_offsets(STEPS)
    assert offsets == list(range(16))
    static, linear = ev.baseline_calls(ext, offsets)
    table, metrics, gaps, *_ = ev.score(gt, {"static": static, "linear": linear}, offsets, STEPS,
                                        np.array(["x"], dtype=object))
    t = np.arange(1, 16)
    for S in STEPS:
        row = table[str(S)]
        assert row["linear"] == pytest.approx(0.0, abs=1e-9) and row["model"] is None
        want = math.sqrt(np.sum((3.0 * (t % S)) ** 2) / (15 * 22))
        assert row["static"] == pytest.approx(want, rel=1e-9)
        # excluding restart frames: only t % S != 0 are averaged (none left for S = 1)
        keep = t[t % S != 0]
        want_nr = math.sqrt(np.sum((3.0 * (keep % S)) ** 2) / (len(keep) * 22)) if len(keep) else None
        assert metrics[str(S)]["static"]["rmse_no_restart"] == (pytest.approx(want_nr) if want_nr else None)
        # per step and per group: the error lives in the legs group only (joint 5 = l_hip_yaw)
        np.testing.assert_allclose(metrics[str(S)]["static"]["per_step"], 3.0 * (t % S) / math.sqrt(22))
        assert metrics[str(S)]["static"]["per_group"]["arms"] == 0.0
        assert metrics[str(S)]["static"]["per_group"]["legs"] == pytest.approx(
            math.sqrt(np.sum((3.0 * (t % S)) ** 2) / (15 * 8)))
    # the naive (unwrapped) difference the original took would be off by 360 deg across the crossing
    assert np.abs(np.degrees(static[0, 0, 1:, 5] - gt[0, 1:, 5])).max() > 300


def test_rolled_takes_each_frame_from_the_latest_restart():
    offsets = list(range(16))
    calls = np.zeros((1, 16, 16, 22))
    for r in range(16):
        calls[0, r, :, 0] = 100 * r + np.arange(16)  # value = 100 * restart + steps since it
    for S in STEPS:
        got = ev.rolled(calls, offsets, S)[0, :, 0]
        want = [100 * (t // S * S) + t % S for t in range(16)]
        np.testing.assert_array_equal(got, want)


def test_high_motion_quartile_per_window_and_classes():
    assert ev.top_quartile([1, 5, 5, 2, 0, 9, 3, 4]).tolist() == [False, True, False, False, False, True, False, False]
    assert ev.top_quartile([3.0]).tolist() == [True]
    # four windows moving one joint at 0, 1, 2, 4 deg per frame; static at S = 16 errs by v * t
    ext = np.zeros((4, 17, 22))
    v = np.array([0.0, 1.0, 2.0, 4.0])
    ext[:, :, 3] = np.radians(v[:, None] * np.arange(-1, 16))
    static, linear = ev.baseline_calls(ext, [0])
    classes = np.array(["a", "a", "b", "b"], dtype=object)
    table, metrics, _, per_window, disp, high = ev.score(ext[:, 1:], {"static": static, "linear": linear}, [0],
                                                         [16], classes)
    np.testing.assert_allclose(disp, 15 * v)
    assert high.tolist() == [False, False, False, True]
    t = np.arange(1, 16)
    unit = math.sqrt(np.sum(t ** 2) / (15 * 22))  # RMSE of a window moving 1 deg per frame
    m = metrics["16"]["static"]
    assert m["rmse_high"] == pytest.approx(4 * unit)
    np.testing.assert_allclose(per_window["16"]["static"], v * unit)
    assert m["per_window"]["median"] == pytest.approx(np.median(v) * unit)
    assert m["per_window"]["p25"] == pytest.approx(np.percentile(v, 25) * unit)
    assert m["per_window"]["p75"] == pytest.approx(np.percentile(v, 75) * unit)
    assert m["per_class"]["a"] == {"count": 2, "rmse": pytest.approx(math.sqrt(0.5) * unit)}
    assert m["per_class"]["b"] == {"count": 2, "rmse": pytest.approx(math.sqrt(10.0) * unit)}
    assert table["16"]["linear"] == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Baselines on a written dataset, against an independent per-frame loop


def independent_baselines(root, S):
    """Every window of every val clip, loops and scalar math only: (static, linear) sums of squared
    wrapped errors and the count of scored numbers."""
    sums, count = {"static": 0.0, "linear": 0.0}, 0
    for e in data.list_clips(root, "val"):
        a = np.degrees(data.read_clip(root / e["path"]).angles.astype(np.float64))
        T = len(a)
        for s in range(4, T - 16 + 1):
            for t in range(1, 16):
                r = t // S * S  # the last restart at or before t
                k = t - r
                for j in range(22):
                    now, prev, true = a[s + r, j], a[s + r - 1, j], a[s + t, j]
                    vel = (now - prev + 180) % 360 - 180
                    for name, pred in (("static", now), ("linear", now + k * vel)):
                        d = (pred - true + 180) % 360 - 180
                        sums[name] += d * d
                count += 22
    return {k: math.sqrt(v / count) for k, v in sums.items()}


def test_baselines_match_independent_computation_and_windows_reach_clip_end(dataset):
    res = ev.rolling_eval(None, dataset, num_windows=1000, steps=STEPS, progress=False)
    starts = sorted((w["clip_id"], w["start"]) for w in res["windows"])
    # clip0 (T=20): s = 4; clip1 (T=21): s = 4, 5 (ends on the last frame); clip2 (T=27): s = 4..11
    assert starts == [("clip0", 4), ("clip1", 4), ("clip1", 5)] + [("clip2", s) for s in range(4, 12)]
    assert res["num_windows"] == 11 and res["model_calls"] == 0
    for S in STEPS:
        want = independent_baselines(dataset, S)
        assert res["table"][str(S)]["static"] == pytest.approx(want["static"], rel=1e-9)
        assert res["table"][str(S)]["linear"] == pytest.approx(want["linear"], rel=1e-9)
    # the seeded draw of a subset is reproducible and changes with the seed
    a = [w["start"] for w in ev.rolling_eval(None, dataset, num_windows=5, steps=(16,), seed=1,
                                             progress=False)["windows"]]
    b = [w["start"] for w in ev.rolling_eval(None, dataset, num_windows=5, steps=(16,), seed=1,
                                             progress=False)["windows"]]
    assert a == b and len(a) == 5


# --------------------------------------------------------------------------------------------------
# The model path: no leak, one call per (window, restart), fixed noise


class FrameEncoder:
    """Stand-in for model.encoder() with the real input contract (uint8 frames, a few token ids):
    the spy reads which clip frame each image was from its pixels (red channel = 7 * frame) and
    whether the green box was drawn."""

    pad_token_id = 0

    def __call__(self, images, text):
        assert len(images) == 4 and all(im.size == (224, 224) for im in images)
        return {"frames": torch.from_numpy(np.stack([np.asarray(im) for im in images])),
                "input_ids": torch.arange(3), "position_ids": torch.arange(3).expand(3, 3),
                "image_positions": torch.tensor([1])}


class SpyModel(torch.nn.Module):
    """Same call signature as VLAModel. Predicts state + 0.05 * noise and
    records what every call saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"image_size": 224, "action_horizon": 16, "action_dim": 44, "num_frames": 4})()
        self.seen = []

    # the real input preparation and predict(), running on this model's encoder and forward
    prepare = VLAModel.prepare
    predict = VLAModel.predict

    def encoder(self):
        return FrameEncoder()

    def autocast(self):
        return contextlib.nullcontext()

    def forward(self, inputs=None, robot_state=None, compute_loss=True, noise=None, steps=None, **kw):
        assert not compute_loss and noise.shape == (len(robot_state), 16, 44)
        t_now = torch.round(model_io.decode_angles(robot_state)[:, 0] / 0.01).long()  # frame index of the state
        for frames, t in zip(inputs["frames"], t_now):  # (4, 224, 224, 3) uint8 each
            ids = [round(int(f[112, 112, 0]) / 7) for f in frames]
            green = all(int(f[112, int(4 * 224 / 48), 1]) > 200 for f in frames)  # on the box's left edge
            self.seen.append((ids, int(t), green))
        return {"actions": robot_state[:, None, :] + 0.05 * noise}


def test_no_frame_at_or_after_the_restart_reaches_the_model(dataset, monkeypatch):
    reads = []
    original = data.ClipFile.frame_bytes

    def spy_frame_bytes(self, indices):  # the instrumented frame reader
        reads.append(list(indices))
        return original(self, indices)

    monkeypatch.setattr(data.ClipFile, "frame_bytes", spy_frame_bytes)
    model = SpyModel()
    res = ev.rolling_eval(model, dataset, num_windows=1000, steps=STEPS, batch_size=7, progress=False)
    n = res["num_windows"]
    assert res["model_calls"] == n * 16 == len(model.seen) == len(reads)  # once per (window, offset), for all S
    for ids, t, green in model.seen:
        assert ids == [t - 4, t - 3, t - 2, t - 1], f"restart at frame {t} was given frames {ids}"
        assert green, "the target box must be drawn on the model's frames, as in training"
    assert sorted(map(tuple, reads)) == sorted(tuple(range(t - 4, t)) for _, t, _ in model.seen)
    restarts = sorted(t for _, t, _ in model.seen)
    want = sorted(w["start"] + r for w in res["windows"] for r in range(16))
    assert restarts == want


def test_model_calls_are_deterministic_and_batch_independent(dataset):
    a = ev.rolling_eval(SpyModel(), dataset, num_windows=4, steps=(3, 16), batch_size=1, seed=3, progress=False)
    b = ev.rolling_eval(SpyModel(), dataset, num_windows=4, steps=(3, 16), batch_size=5, seed=3, progress=False,
                        num_workers=2)  # DataLoader workers build the inputs
    c = ev.rolling_eval(SpyModel(), dataset, num_windows=4, steps=(3, 16), batch_size=5, seed=4, progress=False)
    assert a["model_calls"] == 4 * len(ev.restart_offsets((3, 16)))
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])
    assert a["table"]["16"]["model"] > 0 and a["gaps"]["16"]["all"] is not None
    assert c["table"]["16"]["model"] != a["table"]["16"]["model"] or c["windows"] != a["windows"]


def test_restart_images_match_training_windows(dataset):
    """For r = 0 the model's images are exactly WindowDataset's
    (box drawn, resized) for the same window."""
    ds = data.WindowDataset(dataset, split="val", stride=1, flip=False)
    item = ds[0]
    path = dataset / ds.paths[ds.win_clip[0]]
    ours = ev.restart_images(path, int(ds.win_start[0]))
    assert [np.asarray(a).tobytes() for a in ours] == [np.asarray(b).tobytes() for b in item["images"]]
    assert ev.clip_prompt(data.ClipFile(path).meta) == item["text"]


# --------------------------------------------------------------------------------------------------
# CLI end to end


def test_cli_baselines_only_writes_table_json_and_plots(dataset, tmp_path, capsys):
    out = tmp_path / "ev"
    res = ev.main(["--data", str(dataset), "--baselines-only", "--steps", "1", "3", "16", "--out", str(out),
                   "--num-workers", "0"])
    printed = capsys.readouterr().out
    assert "static" in printed and "linear" in printed and "high-motion" in printed
    saved = json.loads((out / "eval.json").read_text())
    assert saved["table"] == json.loads(json.dumps(res["table"]))
    for name in ("rmse_vs_step.png",):
        im = Image.open(out / name)
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
        assert im.size[0] > 300 and len(colours) > 3  # a drawn chart, not a blank
    assert not (out / "class_gaps.png").exists()  # no model, no gap


def test_cli_with_a_tiny_saved_model_writes_table_json_and_plots(dataset, tmp_path, capsys):
    from model import PRESETS, VLAConfig, VLAModel

    torch.manual_seed(0)
    ckpt = VLAModel(VLAConfig(**PRESETS["tiny"])).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "ev"
    res = ev.main(["--ckpt", str(ckpt), "--data", str(dataset), "--num-windows", "3", "--steps", "5", "16",
                   "--out", str(out), "--num-workers", "0", "--batch-size", "4", "--device", "cpu"])
    assert res["model_calls"] == 3 * len(ev.restart_offsets((5, 16))) == 3 * 4
    for S in ("5", "16"):
        row = res["table"][S]
        assert row["model"] > 0 and row["static"] > 0 and res["gaps"][S]["all"] == pytest.approx(
            row["model"] - row["static"])
    assert "model" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["settings"]["checkpoint"] == str(ckpt)
    for name in ("rmse_vs_step.png", "class_gaps.png"):
        assert Image.open(out / name).size[0] > 300
