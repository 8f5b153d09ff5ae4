# Tests of track.py: box geometry, the sticky IoU tracker (identity through a crossing, occlusion
# gaps, size jumps), anchor frame and heuristic picker, core-joint coverage, and the deterministic
# checks (each flags exactly the fault injected). Pure numpy on synthetic boxes and poses; runs in
# well under a second.
import ast
from pathlib import Path

import numpy as np
import pytest

import kinematics
import pipeline  # PipelineConfig: the checks' thresholds
import track


def _det(*boxes):
    """(N, 5) detections [x1, y1, x2, y2, score 0.9] of the given boxes."""
    return np.array([list(b) + [0.9] for b in boxes], np.float64).reshape(-1, 5)


def test_track_does_not_import_pipeline():
    # pipeline.py imports track.py; the reverse would be a circular import (cfg is
    # passed in instead)
    tree = ast.parse((Path(track.__file__)).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "pipeline" not in names and names <= {"math", "numpy", "kinematics"}, names


# --------------------------------------------------------------------------------------------------
# 3-4. boxes, tracker, candidates, picker


def test_box_area_and_iou():
    a = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, -4, 10], [np.nan, 0, 10, 10]], np.float64)
    np.testing.assert_allclose(track.box_area(a[:3]), [100, 100, 0])  # an inverted box has area 0
    iou = track.box_iou(a, a)
    assert iou.shape == (4, 4)
    np.testing.assert_allclose(iou[0, :2], [1.0, 50 / 150])
    np.testing.assert_allclose(iou[1, 0], 50 / 150)  # symmetric
    assert (iou[2] == 0).all() and (iou[3] == 0).all() and np.isfinite(iou).all()  # empty / NaN boxes: 0, not NaN
    assert track.box_iou(a[:1], np.zeros((0, 4))).shape == (1, 0)


def test_tracker_keeps_identity_through_a_crossing():
    # A walks right, B walks left; they cross around t = 20 (boxes overlap heavily there)
    T = 41
    dets = []
    for t in range(T):
        ax, bx = 20 + 3 * t, 140 - 3 * t
        d = _det((ax, 50, ax + 40, 150), (bx, 55, bx + 40, 150))
        dets.append(d[::-1] if t % 2 else d)  # detection order must not matter
    boxes, (s, e) = track.sticky_track(dets, 0, dets[0][0, :4])
    assert (s, e) == (0, T - 1)
    np.testing.assert_allclose(boxes[:, 0], 20 + 3 * np.arange(T))  # still A after the crossing
    boxes, (s, e) = track.sticky_track(dets, T - 1, _det((140 - 3 * 40, 55, 180 - 3 * 40, 150))[0, :4])
    np.testing.assert_allclose(boxes[:, 0], 140 - 3 * np.arange(T))  # backwards from the anchor: still B


def test_tracker_occlusion_gaps_and_size_jumps():
    T = 30
    base = [_det((10 + t, 10, 60 + t, 110)) for t in range(T)]
    gap3 = [d if not 10 <= t < 13 else _det() for t, d in enumerate(base)]
    boxes, run = track.sticky_track(gap3, 0, base[0][0, :4])
    assert run == (0, T - 1) and np.isnan(boxes[10:13]).all()  # 3 misses: continues
    filled = track.fill_gaps(boxes)
    np.testing.assert_allclose(filled[:, 0], 10 + np.arange(T))  # interpolated through the gap
    gap4 = [d if not 10 <= t < 14 else _det() for t, d in enumerate(base)]
    _, run = track.sticky_track(gap4, 0, base[0][0, :4])
    assert run == (0, 9)  # more than 3 consecutive misses: stops
    _, run = track.sticky_track(gap4, 20, base[20][0, :4])
    assert run == (14, T - 1)  # the other direction from an anchor after the gap
    grow = [d.copy() for d in base]
    grow[15] = _det((0, 0, 200, 200))  # a size jump (area ratio > 2.5) is a miss, not a switch
    boxes, run = track.sticky_track(grow, 0, base[0][0, :4])
    assert run == (0, T - 1) and np.isnan(boxes[15]).all()
    far = [d if t < 5 else _det((200 + t, 10, 250 + t, 110)) for t, d in enumerate(base)]
    _, run = track.sticky_track(far, 0, base[0][0, :4])
    assert run == (0, 4)  # low IoU: never accepted


def test_anchor_candidates_and_heuristic():
    T = 21
    dets = [_det((100, 40, 180, 230)) for _ in range(T)]
    dets[10] = _det((100, 40, 180, 230), (10, 10, 30, 50), (250, 10, 270, 40))  # the middle pool frame has most
    dets[0] = _det((100, 40, 180, 230), (5, 5, 15, 15), (20, 20, 30, 30))
    anchor, count = track.anchor_frame(dets, 5)
    assert (anchor, count) == (10, 3)  # a tie between 0 and 10: nearest the middle wins
    runs = [track.sticky_track(dets, anchor, c[:4])[1] for c in dets[anchor]]
    h = track.heuristic_scores(dets[anchor], runs, 320, 240, T)
    assert int(np.argmax(h)) == 0 and runs[0] == (0, T - 1)
    # centrality uses normalised coordinates: a same-size box in the corner scores lower
    h2 = track.heuristic_scores(_det((120, 80, 200, 160), (0, 0, 80, 80)), [(0, 9), (0, 9)], 320,
                                240, 10)
    assert h2[0] > h2[1]


def test_fill_gaps_edges_copy_the_nearest_box():
    b = np.full((6, 4), np.nan)
    b[2], b[4] = [0, 0, 10, 10], [4, 2, 14, 12]
    f = track.fill_gaps(b)
    np.testing.assert_allclose(f[:3], [[0, 0, 10, 10]] * 3)  # before the first valid box: a copy of it
    np.testing.assert_allclose(f[3], [2, 1, 12, 11])  # between: linear
    np.testing.assert_allclose(f[5], [4, 2, 14, 12])
    assert np.isnan(b[0]).all()  # the input is not modified


def test_core_coverage_uses_the_estimator_layout():
    sc = np.full((3, 17), 0.1)
    sc[0, [0, 5, 6]] = 0.9  # COCO nose + shoulders
    sc[1, [9, 11, 14]] = 0.9  # Human3.6M nose + shoulders
    sc[2, [0, 5]] = 0.9  # only 2 of 5
    assert track.core_coverage(sc, "coco").tolist() == [True, False, False]
    assert track.core_coverage(sc, "h36m").tolist() == [False, True, False]
    assert track.core_coverage(sc, "coco", thr=0.95).tolist() == [False, False, False]


# --------------------------------------------------------------------------------------------------
# 7. deterministic checks: each flags exactly the fault injected


def _clean_clip(T=40):
    t = np.arange(T)
    boxes = np.stack([100 + t, 40 + 0 * t, 180 + t, 220 + 0 * t], 1).astype(float)
    rest = np.asarray(kinematics.angles_to_pose3d(np.zeros(22)))  # any fixed skeleton
    pose = np.repeat(rest[None], T, 0) + np.array([0, 0, 4.0])
    pose[:, 13, 0] += 0.3 * np.sin(t / 2)  # a waving wrist: enough motion
    return boxes, np.full((T, 17), 0.9), pose


def test_checks_flag_exactly_the_injected_faults():
    cfg = pipeline.PipelineConfig()
    boxes, sc, pose = _clean_clip()
    checks, issues = track.run_checks(boxes, sc, pose, 320, 240, cfg)
    assert issues == [], checks
    faults = {}
    b = boxes.copy()
    b[[5, 15, 25], :] += [150, 0, 150, 0]  # three centre jumps (six transitions of 39)
    faults["BBOX_JUMPS"] = dict(boxes=b)
    b = boxes.copy()
    b[[10, 20], 2:] += [160, 0]  # two 3x wider boxes: four spikes of 39 > 3%
    b2 = b.copy()
    faults["SIZE_SPIKES"] = dict(boxes=b2)
    p = pose.copy()
    for t in (8, 9, 20, 21):
        p[t, 3] += [0, 0.0, 1.5]  # an ankle teleports (and comes back): 4 jumps + 4 returns of 39
    faults["POSE_JUMPS"] = dict(pose=p)
    s = sc.copy()
    s[:20] = 0.1
    faults["LOW_CONFIDENCE"] = dict(sc=s)
    still = pose.copy()
    still[:, 13, 0] = still[0, 13, 0]
    faults["LOW_MOTION"] = dict(pose=still)
    faults["SMALL_BBOX"] = dict(boxes=boxes * [1, 1, 0.6, 0.5] + [40, 10, 0, 0])
    faults["TOO_SHORT"] = dict(boxes=boxes[:15], sc=sc[:15], pose=pose[:15])
    faults["HARD_CUTS"] = dict(n_cuts=1)
    faults["LOW_COVERAGE"] = dict(core_ok=np.arange(40) < 10)
    faults["FIT_COLLAPSE"] = dict(fit_residual=0.08)  # the 3D fit cannot match the 2D
    for name, kw in faults.items():
        args = dict(boxes=boxes, sc=sc, pose=pose, n_cuts=0, core_ok=None, raw_valid=None,
                    fit_residual=0.02)
        args.update(kw)
        checks, issues = track.run_checks(args["boxes"], args["sc"], args["pose"], 320, 240, cfg,
                                          args["n_cuts"], args["core_ok"], args["raw_valid"],
                                          args["fit_residual"])
        assert checks["FIT_COLLAPSE"] == {"value": args["fit_residual"],
                                          "limit": cfg.max_fit_residual,
                                          "ok": args["fit_residual"] <= cfg.max_fit_residual}
        if name == "SIZE_SPIKES":
            issues = [i for i in issues if i != "IOU_BREAKS"]
        assert issues == [name], (name, issues)
    # IoU breaks: the box swaps to a far, much smaller one and back, 5 times (10 breaks
    # of 39 transitions)
    b = boxes.copy()
    for t in (3, 10, 17, 24, 31):
        b[t] = [250, 0, 300, 20]
    checks, issues = track.run_checks(b, sc, pose, 320, 240, cfg)
    assert "IOU_BREAKS" in issues and checks["IOU_BREAKS"]["value"] == pytest.approx(10 / 39, abs=1e-4)
    # interpolated boxes (not detections) do not count as IoU breaks
    _, issues = track.run_checks(b, sc, pose, 320, 240, cfg,
                                 raw_valid=~np.isin(np.arange(40), [3, 10, 17, 24, 31]))
    assert "IOU_BREAKS" not in issues


def test_sole_overlap_rule_follows_a_flip_but_not_into_a_crowd():
    # a backflip at 10 Hz: the box goes tall <-> wide while travelling 8 px a sample; consecutive
    # IoU 0.25 < 0.5, and the same shape two samples later is already too far (IoU 0.43), so
    # skipping frames does not help
    T = 21
    flip = []
    for t in range(T):
        w, h = (40, 100) if t % 2 == 0 else (100, 40)
        cx = 60 + 8 * t
        flip.append(_det((cx - w / 2, 120 - h / 2, cx + w / 2, 120 + h / 2)))
    ious = [track.box_iou(flip[t][:, :4], flip[t + 1][:, :4])[0, 0] for t in range(T - 1)]
    assert max(ious) < 0.5 and min(ious) > 0.2
    _, run = track.sticky_track(flip, 10, flip[10][0, :4])
    assert run == (10, 10)  # the upstream rule (sole_iou = 0) loses it at once
    boxes, run = track.sticky_track(flip, 10, flip[10][0, :4], sole_iou=0.2)
    assert run == (0, T - 1)
    # with a companion overlapping the last box the rule is off: exactly the upstream result
    crowd = [np.concatenate([d, _det((45 + 8 * t, 70, 85 + 8 * t, 170))]) for t, d in enumerate(flip)]  # a companion
    with_rule = track.sticky_track(crowd, 10, crowd[10][0, :4], sole_iou=0.2)
    upstream = track.sticky_track(crowd, 10, crowd[10][0, :4])
    assert with_rule[1] == upstream[1]
    np.testing.assert_array_equal(with_rule[0], upstream[0])
    # and the crossing people stay apart (two overlapping detections at the crossing)
    dets = []
    for t in range(41):
        ax, bx = 20 + 3 * t, 140 - 3 * t
        dets.append(_det((ax, 50, ax + 40, 150), (bx, 55, bx + 40, 150)))
    boxes, _ = track.sticky_track(dets, 0, dets[0][0, :4], sole_iou=0.2)
    np.testing.assert_allclose(boxes[:, 0], 20 + 3 * np.arange(41))


def test_sole_overlap_rule_needs_exactly_one_overlapping_detection():
    # the backflip above next to a bystander standing beside its path: each frame has a detection
    # of IoU in [0.2, 0.5) with the last box and another one overlapping it, so the rule must stay
    # off and the upstream 0.5 rule decide (else the track may take the bystander's box)
    T, anchor = 21, 10
    flip, crowd = [], []
    for t in range(T):
        w, h = (40, 100) if t % 2 == 0 else (100, 40)
        cx = 60 + 8 * t
        flip.append(_det((cx - w / 2, 120 - h / 2, cx + w / 2, 120 + h / 2)))
        crowd.append(np.concatenate([flip[-1], _det((100, 60, 180, 180))]))  # + the bystander
    box = crowd[anchor][0, :4]
    for t in (anchor - 1, anchor + 1):  # what the rule sees first, both ways
        iou = track.box_iou(box[None], crowd[t][:, :4])[0]
        assert 0.2 <= iou.max() < 0.5 and (iou > 0).sum() == 2, iou
    with_rule = track.sticky_track(crowd, anchor, box, sole_iou=0.2)
    upstream = track.sticky_track(crowd, anchor, box)
    assert with_rule[1] == upstream[1] == (anchor, anchor)
    np.testing.assert_array_equal(with_rule[0], upstream[0])
    # alone, the same target is followed whole: the bystander is what switches the rule off
    assert track.sticky_track(flip, anchor, box, sole_iou=0.2)[1] == (0, T - 1)


def test_checks_pass_exactly_at_their_limits():
    """Each limit is inclusive: a value equal to it passes, one more event fails."""
    cfg = pipeline.PipelineConfig()

    def ok(name, boxes, sc, pose, core_ok=None):
        return track.run_checks(boxes, sc, pose, 320, 240, cfg, core_ok=core_ok)[0][name]["ok"]

    def switch(base, other, n, every=8):  # n lasting switches between two box tracks
        b = base.copy()
        for k in range(n):
            b[4 + every * k:] = (other if k % 2 == 0 else base)[4 + every * k:]
        return b

    boxes, sc, pose = _clean_clip(41)  # 40 transitions
    moved = boxes + [150, 0, 150, 0]  # a centre jump of 150 px > half the 197 px box diagonal
    assert ok("BBOX_JUMPS", switch(boxes, moved, 2), sc, pose)  # 2 / 40 = 0.05
    assert not ok("BBOX_JUMPS", switch(boxes, moved, 3), sc, pose)
    far = np.tile([260.0, 0, 300, 40], (41, 1))  # IoU 0 and a 9x smaller area: an IoU break
    assert ok("IOU_BREAKS", switch(boxes, far, 4), sc, pose)  # 4 / 40 = 0.1
    assert not ok("IOU_BREAKS", switch(boxes, far, 5), sc, pose)
    boxes, sc, pose = _clean_clip(40)
    s = sc.copy()
    s[:16] = 0.1
    assert ok("LOW_CONFIDENCE", boxes, s, pose)  # 16 / 40 = 0.4
    s[16] = 0.1
    assert not ok("LOW_CONFIDENCE", boxes, s, pose)
    assert ok("LOW_COVERAGE", boxes, sc, pose, core_ok=np.arange(40) < 16)  # 16 / 40 = 0.4
    assert not ok("LOW_COVERAGE", boxes, sc, pose, core_ok=np.arange(40) < 15)
    assert ok("TOO_SHORT", boxes[:20], sc[:20], pose[:20])
    assert not ok("TOO_SHORT", boxes[:19], sc[:19], pose[:19])
    eight = np.tile([100.0, 40, 164, 136], (40, 1))  # 64 x 96 px = 8% of 320 x 240
    assert ok("SMALL_BBOX", eight, sc, pose)
    assert not ok("SMALL_BBOX", eight - [0, 0, 1, 0], sc, pose)
    boxes, sc, pose = _clean_clip(101)  # 100 transitions
    c, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2 * np.sqrt(3)
    grown = np.concatenate([c - half, c + half], 1)  # 3x the area, same centre: IoU 1/3, no jump
    assert ok("SIZE_SPIKES", switch(boxes, grown, 3, every=20), sc, pose)  # 3 / 100 = 0.03
    assert not ok("SIZE_SPIKES", switch(boxes, grown, 4, every=20), sc, pose)
