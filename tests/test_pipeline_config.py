# pipeline.py's wiring, without videos or models: the PipelineConfig fields of stages 1-7 reach the
# stage that uses them (a stage running on its own default instead is invisible end to end), the
# flip-keeping tracker rule and max_attempts through process_segment, a shard assignment that never
# changes, and --resume removing only its own shard's temp files.
import inspect

import numpy as np

import kinematics
import pipeline
import shards
import track
import video


def _det(*boxes, score=0.9):
    return np.array([list(b) + [score] for b in boxes], np.float64).reshape(-1, 5)


class _Pose(pipeline.PoseEstimator):
    keypoint_format = "h36m"

    def __call__(self, images, boxes, keys):
        return np.zeros((len(keys), 17, 2)) + 50, np.full((len(keys), 17), 0.9)


def _still_body(kp, sc, w, h):  # a lifter: the rest pose 3 m in front of the camera, every frame
    rest = np.asarray(kinematics.angles_to_pose3d(np.zeros(22)))
    return np.tile(rest[None], (len(kp), 1, 1)) + [0, 0, 3]


def _decoded(T):
    rng = np.random.default_rng(0)
    frames = [rng.integers(90, 110, (240, 320, 3), dtype=np.uint8) for _ in range(T)]  # one shot
    return video.Decoded(frames, np.arange(T), np.arange(T) / 10.0, 10.0, 320, 240)


def _spy(monkeypatch, module, name, calls, result=None):
    """Replace module.name by a wrapper recording each call's arguments by parameter name (defaults
    filled in); it returns result(...) if given, else the real function's result."""
    fn = getattr(module, name)
    sig = inspect.signature(fn)

    def wrapper(*a, **k):
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        calls.setdefault(name, []).append(dict(bound.arguments))
        return (result or fn)(*a, **k)

    monkeypatch.setattr(module, name, wrapper)


def test_config_fields_reach_their_stages(monkeypatch):
    cfg = pipeline.PipelineConfig(fps=5.0, max_short_side=360, max_seconds=30.0, cut_threshold=0.3,
                                  min_frames=21, pool_frames=7, max_candidates=2, det_conf=0.5,
                                  iou_track=0.6, size_ratio_max=2.2, max_misses=2,
                                  track_sole_iou=0.25, low_conf=0.35)
    calls = {}
    _spy(monkeypatch, video, "decode_video", calls, result=lambda *a, **k: _decoded(30))
    for module, name in ((video, "detect_cuts"), (video, "split_segments"), (track, "anchor_frame"),
                         (track, "sticky_track"), (track, "core_coverage"), (track, "run_checks")):
        _spy(monkeypatch, module, name, calls)

    class Det(pipeline.Detector):  # the target, two bystanders, a faint detection under det_conf
        def __call__(self, images, keys):
            return [np.concatenate([_det((100 + t, 40, 180 + t, 230), (10, 10, 60, 110)),
                                    _det((250, 20, 300, 120), score=0.7),
                                    _det((120, 60, 160, 200), score=0.45)]) for _, t in keys]

    rec = pipeline.process_video({"video": "x.mp4", "video_id": "x"}, cfg, Det(), _Pose(),
                                 _still_body)
    assert rec["segments"][0]["status"] == "TRACKED", rec
    decode = calls["decode_video"]
    assert [(c["fps"], c["max_short_side"], c["max_seconds"]) for c in decode] == [(5.0, 360, 30.0)]
    # the video's cuts, then the tracked clip's own frames
    assert [c["threshold"] for c in calls["detect_cuts"]] == [0.3, 0.3]
    assert [c["min_len"] for c in calls["split_segments"]] == [21]
    assert [c["pool_frames"] for c in calls["anchor_frame"]] == [7]
    assert all(len(d) == 3 for d in calls["anchor_frame"][0]["dets"])  # the faint one is dropped
    assert rec["segments"][0]["candidates"] == 2  # max_candidates of the 3
    assert len(calls["sticky_track"]) == 2
    for c in calls["sticky_track"]:
        assert (c["iou_thr"], c["size_ratio_max"], c["max_misses"], c["sole_iou"]) == \
            (0.6, 2.2, 2, 0.25)
    assert [c["thr"] for c in calls["core_coverage"]] == [0.35]
    assert [c["cfg"] for c in calls["run_checks"]] == [cfg]


def test_segment_keeps_a_flip_with_the_configured_sole_overlap_rule():
    # a backflip's box (tall <-> wide, consecutive IoU ~0.25): whole with the default rule, lost
    # without it
    T = 25
    flip = []
    for t in range(T):
        w, h = (40, 100) if t % 2 == 0 else (100, 40)
        cx = 60 + 8 * t
        flip.append(_det((cx - w / 2, 120 - h / 2, cx + w / 2, 120 + h / 2)))

    class Det(pipeline.Detector):
        def __call__(self, images, keys):
            return [flip[t] for _, t in keys]

    for sole, expect in ((pipeline.PipelineConfig().track_sole_iou, [0, T]), (0.0, None)):
        cfg = pipeline.PipelineConfig(track_sole_iou=sole)
        rec, clip = pipeline.process_segment(_decoded(T), 0, T, {"video_id": "v"}, cfg, Det(),
                                             _Pose(), _still_body, None)
        assert rec.get("run") == expect, (sole, rec)
        assert (clip is None) == (expect is None)
        assert (rec["status"] == "TRACKED") == (expect is not None)


def test_max_attempts_limits_the_candidates_tried():
    # the oracle picks a person who leaves after 8 samples: with 2 attempts the next candidate is
    # tracked, with 1 the segment ends as a short run
    from test_pipeline import _ScriptedVLM

    from vlm import VLMClient

    T = 30
    dets = [_det((100, 40, 180, 230), (5, 5, 60, 100)) if t < 8 else _det((100, 40, 180, 230))
            for t in range(T)]

    class Det(pipeline.Detector):
        def __call__(self, images, keys):
            return [dets[t] for _, t in keys]

    for attempts, status in ((2, "TRACKED"), (1, "SHORT_RUN:8")):
        vlm = VLMClient(local=_ScriptedVLM(pick='{"chosen_index": 2}', judge="{}"), retries=0)
        rec, _ = pipeline.process_segment(_decoded(T), 0, T, {"video_id": "v"},
                                          pipeline.PipelineConfig(max_attempts=attempts), Det(),
                                          _Pose(), _still_body, vlm)
        assert rec["picker"] == "oracle" and rec["status"] == status, rec


def test_shard_assignment_never_changes():
    # the shards of a running multi-machine job must not move between versions or processes
    # (md5 of the video id, never Python's salted hash)
    ids = ["walk/abc", "jumping_jacks__x1", "v0", "Ümlaut id"]
    assert [shards.shard_of(v, 16) for v in ids] == [12, 9, 12, 2]
    assert [shards.shard_of(v, 3) for v in ids] == [shards.shard_of(v, 48) % 3 for v in ids]


def test_resume_removes_only_this_shards_stale_temp_files(tmp_path):
    ids = {shards.shard_of(f"vid{i}", 2): f"vid{i}" for i in range(10)}
    stale = {k: tmp_path / "clips" / "00" / f".{v}-00010.safetensors.abc.tmp" for k, v in ids.items()}
    stale[0].parent.mkdir(parents=True)
    for p in stale.values():
        p.write_bytes(b"partial")
    pipeline.run([], tmp_path, pipeline.PipelineConfig(), None, None, None, shard=(0, 2),
                 resume=True, progress=False)
    assert not stale[0].exists() and stale[1].exists()  # shard 1 may still be writing its clip
