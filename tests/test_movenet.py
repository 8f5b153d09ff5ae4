"""MoveNet-332 importer (movenet.py) on a tiny Parquet written here (the release's schema) + videos
written with PyAV: clips load with data.read_clip, frames/boxes/pose/angles come from the same
source frame at 10 Hz, a missing video is listed, a corrupt one skipped with a reason, a re-run
resumes, malformed rows give clear errors."""

import io
import json
import os
import zlib

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

import data  # noqa: E402
import kinematics
import model_io
import movenet  # noqa: E402


def z(arr, dtype):
    return zlib.compress(np.ascontiguousarray(arr, dtype=dtype).tobytes(), 6)


def code_of(i):
    """Frame i is drawn as two gray halves encoding i // 10 and i % 10 (steps of 16 survive two
    lossy codecs)."""
    return 40 + 16 * (i // 10), 40 + 16 * (i % 10)


def write_video(path, n, fps, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "2"}
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            a, b = code_of(i)
            img[:, : w // 2], img[:, w // 2:] = a, b
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_code(jpeg):
    x = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), np.float64)
    w = x.shape[1]
    a, b = x[:, 1: w // 2 - 1].mean(), x[:, w // 2 + 1: -1].mean()
    return int(round((a - 40) / 16)) * 10 + int(round((b - 40) / 16))


def make_row(rng, cid, cls, fps, idx, w, h, boxes=True, yt=None, split="train"):
    F = len(idx)
    pose = rng.normal(0, 0.3, (F, 17, 3))
    kp = rng.uniform(0.2, 0.8, (F, 17, 2)) * [w, h]
    sc = rng.uniform(0.5, 1.0, (F, 17))
    sc[:, :3] = 0.1            # joints below the 0.3 threshold: not part of a keypoint box
    sc[1] = 0.0                # a frame with no usable joint: NaN box
    bb = np.concatenate([kp.min(1) - 5, kp.max(1) + 5], -1)
    bb[3] = np.nan             # a frame without a track
    angles = kinematics.pose3d_to_angles(pose)
    yt = yt or cid.rsplit("_", 2)[0]
    return {"clip_id": cid, "action_class": cls, "youtube_id": yt, "time_start": 10, "time_end": 20,
            "split": split, "instruction": f"do {cls}", "fps": float(fps), "num_pose_frames": F,
            "video_width": w, "video_height": h, "has_hard_cuts": False, "quality": 1.0,
            "pose3d": z(pose, "<f4"), "keypoints2d": z(kp, "<f4"), "scores2d": z(sc, "<f4"),
            "bboxes": z(bb, "<f4") if boxes else None,
            "joint_angles": z(model_io.encode_angles(angles), "<f4"),
            "frame_indices": z(idx, "<i4"), "tracking_confidence": z(np.full(F, 0.9), "<f4")}, \
        {"pose": pose.astype(np.float32), "kp": kp.astype(np.float32), "sc": sc.astype(np.float32),
         "bb": bb.astype(np.float32), "idx": np.asarray(idx)}


def expected_samples(idx, fps, rate=10.0):
    """Independent reference: for t0 + k / rate (t0 = first pose time) the nearest pose frame
    (ties: earlier), while within half a period; returns pose rows."""
    t = np.asarray(idx) / fps
    rows, k = [], 0
    while t[0] + k / rate <= t[-1] + 0.5 / rate + 1e-9:
        d = np.abs(t - (t[0] + k / rate))
        assert d.min() <= 0.5 / rate + 1e-9
        rows.append(int(np.argmin(d)))
        k += 1
    return np.array(rows)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("movenet")
    rng = np.random.default_rng(0)
    vids, pq_dir = tmp / "videos", tmp / "parquet"
    # A: Kinetics layout, poses at the native 30 fps on frames 3..74
    write_video(vids / "train" / "jumping_jacks" / "aaaaaaaaaaa_000010_000020.mp4", 75, 30, 64, 48)
    # B: flat folder, 25 fps, poses at upstream's 10 Hz sampling int(k * 2.5); the row's pixels
    # are 2x the video's
    write_video(vids / "bbbbbbbbbbb_000010_000020.mp4", 60, 25, 96, 72)
    # D: a corrupt file
    (vids / "ddddddddddd_000010_000020.mp4").write_bytes(os.urandom(3000))
    idx_b = np.array([int(k * 2.5) for k in range(24)])
    ra, ta = make_row(rng, "aaaaaaaaaaa_000010_000020", "jumping jacks", 30, np.arange(3, 75), 64,
                      48)
    rb, tb = make_row(rng, "bbbbbbbbbbb_000010_000020", "waving", 25, idx_b, 192, 144, boxes=False,
                      split="val")
    rc, _ = make_row(rng, "ccccccccccc_000010_000020", "running", 30, np.arange(0, 60), 64, 48)
    rd, _ = make_row(rng, "ddddddddddd_000010_000020", "running", 30, np.arange(0, 60), 64, 48)
    # E: stores fps 20 (a v2 retrack row) for A's video (found through youtube_id): cannot be paired
    re_, _ = make_row(rng, "eeeeeeeeeee_000000_000010", "jumping jacks", 20, np.arange(0, 40), 64,
                      48, yt="aaaaaaaaaaa")
    pq_dir.mkdir()
    pq.write_table(pa.Table.from_pylist([ra, rb, rc]), pq_dir / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([rd, re_]), pq_dir / "train-00001-of-00002.parquet")
    out = tmp / "out"
    assert movenet.main(["--parquet", str(pq_dir), "--videos", str(vids), "--out", str(out)]) == 0
    return {"out": out, "A": (ta, 30.0, 1.0), "B": (tb, 25.0, 0.5), "pq": pq_dir, "vids": vids}


@pytest.mark.parametrize("name,cid", [("A", "aaaaaaaaaaa_000010_000020"), ("B", "bbbbbbbbbbb_000010_000020")])
def test_clip_contents(dataset, name, cid):
    t, fps, scale = dataset[name]
    clip = data.read_clip(data.clip_path(dataset["out"], cid))
    rows = expected_samples(t["idx"], fps)
    T = len(rows)
    assert T == len(clip.frames_jpeg) >= 20
    np.testing.assert_array_equal(clip.src_frame_index, t["idx"][rows])
    np.testing.assert_allclose(clip.src_time, t["idx"][rows] / fps, atol=1e-6)
    # each stored image is the video frame the pose was computed on
    assert [decode_code(j) for j in clip.frames_jpeg] == list(t["idx"][rows])
    np.testing.assert_array_equal(clip.pose3d, t["pose"][rows])  # camera frame kept unchanged
    np.testing.assert_allclose(clip.angles, kinematics.pose3d_to_angles(t["pose"][rows].astype(np.float64)), atol=1e-6)
    assert (clip.width, clip.height) == ((64, 48) if name == "A" else (96, 72))
    if name == "A":  # stored boxes, same pixel size
        np.testing.assert_allclose(clip.boxes, t["bb"][rows], atol=1e-5)
        assert rows[1] == 3 and np.isnan(clip.boxes[1]).all()  # pose row 3 has no track
        assert clip.extra["box_source"] == "bboxes" and clip.split == "train"
    else:  # bboxes null: keypoints with score >= 0.3, scaled to our frame, padded 10%, clipped
        kp, sc = t["kp"][rows] * scale, t["sc"][rows]
        for n in range(T):
            ok = sc[n] >= 0.3
            if ok.sum() < 2:
                assert np.isnan(clip.boxes[n]).all()
                continue
            lo, hi = kp[n, ok].min(0), kp[n, ok].max(0)
            ref = np.clip(np.r_[lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)], 0, [96, 72, 96, 72])
            np.testing.assert_allclose(clip.boxes[n], ref, atol=1e-4)
        assert np.isnan(clip.boxes[1]).all()  # pose row 1 (all scores 0) is sample 1 at 10 Hz
        assert clip.extra["box_source"] == "keypoints2d" and clip.split == "val"
    assert abs(clip.src_fps - fps) < 1e-6
    assert abs(float(clip.extra["pose_fps"]) - (fps if name == "A" else 10.0)) < 0.6
    assert float(clip.extra["stored_angles_max_err"]) < 1e-5
    assert clip.description.startswith("do ") and clip.video_id == cid


def test_missing_skipped_and_summary(dataset):
    out = dataset["out"]
    missing = (out / "missing.txt").read_text().splitlines()
    assert [m.split("\t")[0] for m in missing] == ["ccccccccccc_000010_000020"]
    skipped = dict(line.split("\t", 1) for line in (out / "skipped.txt").read_text().splitlines())
    assert skipped["ddddddddddd_000010_000020"].startswith("OPEN_FAILED")
    assert skipped["eeeeeeeeeee_000000_000010"].startswith("FPS_MISMATCH")
    assert sorted(e["clip_id"] for e in data.list_clips(out)) == ["aaaaaaaaaaa_000010_000020",
                                                                   "bbbbbbbbbbb_000010_000020"]
    s = json.loads((out / "import_summary.json").read_text())
    assert s["this_run"] == {"ok": 2, "missing": 1, "skipped": 2,
                             "already_done": 0} and s["rows"] == 5


def test_resume_does_not_redo(dataset):
    out = dataset["out"]
    p = data.clip_path(out, "aaaaaaaaaaa_000010_000020")
    before = p.stat().st_mtime_ns
    s = movenet.import_movenet(dataset["pq"], dataset["vids"], out, progress=False)
    assert s["this_run"] == {"ok": 0, "missing": 1, "skipped": 0, "already_done": 4}
    assert p.stat().st_mtime_ns == before


def test_malformed_rows_name_the_field(tmp_path):
    rng = np.random.default_rng(1)
    row, _ = make_row(rng, "xxxxxxxxxxx_000000_000010", "waving", 30, np.arange(10), 64, 48)
    movenet.decode_row(row, "r0")  # valid
    bad = dict(row, pose3d=zlib.compress(np.zeros((10, 17, 2), "<f4").tobytes()))
    with pytest.raises(movenet.RowError, match=r"r0 \(clip_id 'xxxxxxxxxxx_000000_000010'\): field 'pose3d'"):
        movenet.decode_row(bad, "r0")
    with pytest.raises(movenet.RowError, match="'bboxes' is not zlib"):
        movenet.decode_row(dict(row, bboxes=b"raw"), "r0")
    with pytest.raises(movenet.RowError, match="num_pose_frames = 11"):
        movenet.decode_row(dict(row, num_pose_frames=11), "r0")
    with pytest.raises(movenet.RowError, match=r"missing or null required fields \['frame_indices'\]"):
        movenet.decode_row(dict(row, frame_indices=None), "r0")
    with pytest.raises(movenet.RowError, match="strictly increasing"):
        movenet.decode_row(dict(row, frame_indices=z(np.r_[0, 2, 1, 3:10], "<i4")), "r0")
    # a malformed row in a shard is skipped with the message; a shard without a required
    # column is refused
    (tmp_path / "v").mkdir()
    pq.write_table(pa.Table.from_pylist([bad]), tmp_path / "a.parquet")
    movenet.import_movenet(tmp_path / "a.parquet", tmp_path / "v", tmp_path / "o", progress=False)
    assert "BAD_ROW" in (tmp_path / "o" / "skipped.txt").read_text()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "fps"}]),
                   tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['fps'\]"):
        movenet.import_movenet(tmp_path / "b.parquet", tmp_path / "v", tmp_path / "o2",
                               progress=False)


def test_gap_keeps_longest_run_and_one_decode_serves_two_rows(dataset):
    vid = dataset["vids"] / "train" / "jumping_jacks" / "aaaaaaaaaaa_000010_000020.mp4"
    rng = np.random.default_rng(2)
    raw1, t1 = make_row(rng, "ggggggggggg_000010_000020", "jumping jacks", 30, np.arange(0, 75), 64,
                        48)
    pose = t1["pose"].copy()
    pose[20:24] = np.nan  # frames 20..23 have no pose: the 0.7 s sample (frame 21) has none within 0.05 s
    raw1["pose3d"] = z(pose, "<f4")
    raw2, t2 = make_row(rng, "hhhhhhhhhhh_000010_000020", "jumping jacks", 30, np.arange(30, 75),
                        64, 48)
    rows = [movenet.decode_row(raw1, "r1"), movenet.decode_row(raw2, "r2")]
    cfg = movenet.ImportConfig(min_frames=5)
    info, samplers, rejected = movenet.decode_for_rows(vid, rows, cfg)
    assert not rejected and info["num_decoded"] == 75 and info["fps"] == 30
    c1 = movenet.build_clip(rows[0], samplers[rows[0].clip_id], info, cfg)
    # samples 0.0..0.6 s (frames 0..18, 7) | gap at 0.7 s | 0.8..2.5 s (18, the longest run, kept);
    # the 2.5 s sample has no frame 75 and takes frame 74 (1/30 s away)
    expect = [*range(24, 75, 3), 74]
    np.testing.assert_array_equal(c1.src_frame_index, expect)
    assert c1.extra["warnings"] == "GAP_TRIMMED"
    assert [decode_code(j) for j in c1.frames_jpeg] == expect
    c2 = movenet.build_clip(rows[1], samplers[rows[1].clip_id], info, cfg)
    np.testing.assert_array_equal(c2.src_frame_index, [*range(30, 75, 3), 74])
    assert [decode_code(j) for j in c2.frames_jpeg] == [*range(30, 75, 3), 74]
    with pytest.raises(movenet.SkipVideo, match="TOO_SHORT"):
        movenet.build_clip(rows[1], samplers[rows[1].clip_id], info,
                           movenet.ImportConfig(min_frames=20))


def test_a_row_with_infinite_values_is_skipped_with_the_reason(dataset, tmp_path):
    """write_clip refuses non-finite arrays; the importer records that row as
    skipped and goes on."""
    rng = np.random.default_rng(3)
    good, _ = make_row(rng, "aaaaaaaaaaa_000010_000020", "jumping jacks", 30, np.arange(3, 75), 64,
                       48)
    bad, t = make_row(rng, "aaaaaaaaaaa_000010_000020", "jumping jacks", 30, np.arange(3, 75), 64,
                      48, yt="aaaaaaaaaaa")
    bb = t["bb"].copy()
    bb[10:] = np.inf
    bad = dict(bad, clip_id="iiiiiiiiiii_000010_000020", bboxes=z(bb, "<f4"))
    pq.write_table(pa.Table.from_pylist([bad, good]), tmp_path / "x.parquet")
    s = movenet.import_movenet(tmp_path / "x.parquet", dataset["vids"], tmp_path / "o",
                               progress=False)
    assert s["this_run"]["ok"] == 1 and s["this_run"]["skipped"] == 1
    skipped = dict(line.split("\t", 1) for line in (tmp_path / "o" / "skipped.txt").read_text().splitlines())
    assert skipped["iiiiiiiiiii_000010_000020"].startswith("BAD_VALUES") and "boxes" in skipped[
        "iiiiiiiiiii_000010_000020"]
