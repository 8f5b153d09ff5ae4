# Tests of lifter.py: features, mirrored training data, training, save/load, the refine that keeps
# learned depths, and that cross-validation never trains on a held-out motion.
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import fit3d
import kinematics
import lifter
import mocap

TINY = lifter.LifterConfig(hidden=64, blocks=1, clips=6, frames=12, steps=80, batch=64, lr=3e-3)


def _case(seed=3, frames=16):
    return next(fit3d.mocap_cases(1, seed, frames, 2.0, 0.1))


def test_features_ignore_position_and_scale_of_the_person():
    _, kp, sc, _, f, W, H = _case()
    a = lifter.frame_features(kp, sc, W, H, f)
    b = lifter.frame_features(kp * 1.7 + np.array([40.0, -25.0]), sc, W, H, f)
    assert a.shape == (len(kp), lifter.FEATURES)
    np.testing.assert_allclose(a[:, :17 * 2], b[:, :17 * 2], atol=1e-5)  # joints relative to the person
    assert not np.allclose(a[:, -3:], b[:, -3:])  # ... while where and how big it is in the view is kept
    vis = a[:, 34:51]
    np.testing.assert_array_equal(vis, (sc > 0).astype(np.float32))
    assert (a[:, :34].reshape(-1, 17, 2)[vis == 0] == 0).all()  # dropped joints carry no position


def test_window_repeats_edges():
    feat = np.arange(5, dtype=np.float32)[:, None]
    w = lifter.frame_windows(feat, 3)
    np.testing.assert_array_equal(w[:, 0], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(w[:, 2], [1, 2, 3, 4, 4])


def test_training_set_mirrors_left_and_right():
    m = mocap.load_motion(mocap.MOTIONS[0][1])
    clips = list(lifter.mocap_clips([m], 1, seed=0, frames=10))
    X, Y = lifter.training_set(clips, 9)
    assert X.shape == (20, 9 * lifter.FEATURES) and Y.shape == (20, 16, 3)
    np.testing.assert_allclose(Y.norm(dim=-1), 1.0, atol=1e-5)
    # bones are (child joint - 1): 1 = right thigh, 4 = left thigh; a mirror swaps
    # them and negates x
    np.testing.assert_allclose(Y[10:, 4], Y[:10, 1] * torch.tensor([-1.0, 1.0, 1.0]), atol=1e-6)
    np.testing.assert_allclose(Y[10:, 14], Y[:10, 11] * torch.tensor([-1.0, 1.0, 1.0]), atol=1e-6)


def _direction_error(net, X, Y):
    with torch.no_grad():
        return float((net(X) - Y).pow(2).sum(-1).mean())


def test_training_learns_the_directions():
    motions = [mocap.load_motion(mocap.MOTIONS[i][1]) for i in (0, 2)]
    X, Y = lifter.training_set(lifter.mocap_clips(motions, TINY.clips, TINY.seed, TINY.frames),
                               TINY.window)
    torch.manual_seed(TINY.seed)
    before = _direction_error(lifter.LifterNet(TINY).eval(), X, Y)
    net = lifter.train_lifter(motions, TINY, progress=False)
    assert _direction_error(net, X, Y) < 0.4 * before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    motions = [mocap.load_motion(mocap.MOTIONS[i][1]) for i in (0, 2)]
    net = lifter.train_lifter(motions, TINY, progress=False)
    path = tmp_path_factory.mktemp("lifter") / "lifter.safetensors"
    lifter.save_lifter(net, TINY, path)
    return net, path


def test_save_load_roundtrip_and_errors(trained, tmp_path):
    net, path = trained
    net2, cfg2 = lifter.load_lifter(path)
    assert cfg2 == TINY
    x = torch.randn(3, TINY.window * lifter.FEATURES)
    torch.testing.assert_close(net(x), net2(x), rtol=0, atol=0)
    state = load_file(str(path))
    state.pop("out.1.weight")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"lifter_config": json.dumps(dataclasses.asdict(TINY))})
    with pytest.raises(ValueError, match="out.1.weight"):
        lifter.load_lifter(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a lifter file"):
        lifter.load_lifter(plain)


def _reproj_px(pose, kp, sc, f, W, H):
    uv = f * pose[..., :2] / pose[..., 2:3] + np.array([W / 2, H / 2])
    return float(np.linalg.norm(uv - kp, axis=-1)[sc > 0].mean())


def test_refine_matches_the_2d_and_keeps_the_learned_directions(trained):
    net, path = trained
    _, kp, sc, gt, f, W, H = _case()
    lift = lifter.LearnedLifter.from_file(path, focal=f, refine=dataclasses.replace(lifter.REFINE, steps=150))
    assert "LearnedLifter" in repr(lift) and str(path) in repr(lift)
    start = lift.initial_pose(kp, sc, W, H)
    pose = lift(kp, sc, W, H)
    assert pose.shape == gt.shape and np.isfinite(pose).all()
    # (the fit alone ends near 4 px here: 2 px noise and its smoothness prior)
    assert _reproj_px(pose, kp, sc, f, W, H) < 0.7 * _reproj_px(start, kp, sc, f, W, H)
    cos = (lifter.bone_directions(pose) * lifter.bone_directions(start)).sum(-1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).mean() < 15.0
    # the refined body still satisfies the clip invariant angles == IK(pose3d) with a
    # consistent FK round trip
    back = kinematics.angles_to_pose3d(kinematics.pose3d_to_angles(pose), template=pose)
    cos = (lifter.bone_directions(back)[:, [1, 4, 6]] * lifter.bone_directions(pose)[:, [1, 4, 6]]).sum(-1)
    assert cos.min() > 0.999


def test_cross_validation_never_trains_on_a_held_out_motion(monkeypatch, tmp_path):
    trained_on = []
    real = lifter.train_lifter

    def spy(motions, cfg=None, progress=True):
        trained_on.append({id(m) for m in motions})
        return real(motions[:1], dataclasses.replace(TINY, steps=2, clips=1), progress)

    monkeypatch.setattr(lifter, "train_lifter", spy)
    fast = fit3d.FitConfig(steps=5, yaws=(0.0,))
    res, rows, cases = lifter.cross_validate(folds=3, cfg=TINY, fit_cfg=fast,
                                             refine=dataclasses.replace(fast, w_init=0.1),
                                             n_clips=4, frames=6, progress=False, return_poses=True)
    assert set(res) == {"lifter", "lifter+fit",
                        "fit"} and all(np.isfinite(r["rmse_deg"]) for r in res.values())
    assert [r["motion"] for r in rows] == [c[0] for c in cases]
    assert all(r["kept"] in ("init", "refined") and r["fit_residual"] > 0 for r in rows)
    assert len(cases) == 4 and all(p.shape == gt.shape == (6, 17, 3) for _, poses, gt in cases for p in poses.values())
    from PIL import Image
    png = lifter.plot_poses(tmp_path / "cv.png", cases[:2], frames=(0, 5), size=60)
    with Image.open(png) as im:
        assert im.size == (110 + 60 * 2 * 2, 34 + 60 * 2)
    keys = [m[0] for m in mocap.MOTIONS]
    tested = [c[0] for c in fit3d.mocap_cases(4, 0, 6)]
    folds = sorted({keys.index(k) % 3 for k in tested})
    assert len(trained_on) == len(folds)
    for fold, used in zip(folds, trained_on):
        for k in tested:
            if keys.index(k) % 3 == fold:
                assert id(mocap.load_motion(mocap.MOTIONS[keys.index(k)][1])) not in used
        assert len(used) == sum(1 for i in range(len(keys)) if i % 3 != fold)


def test_pipeline_uses_a_learned_lifter(trained, tmp_path):
    pytest.importorskip("av")
    import pipeline
    import shards
    import synth
    _, path = trained
    synth.render_demo_videos(tmp_path / "vids", num_videos=1)
    out = tmp_path / "out"
    assert pipeline.main(["--videos", str(tmp_path / "vids"), "--out", str(out), "--lifter", str(path),
                          "--fit-steps", "20", "--no-progress"]) == 0
    records = shards.read_records(out / "status" / "shard-00000-of-00001.jsonl")
    assert len(records) == 1 and records[0]["lifter"].startswith("LearnedLifter(") and records[0]["written"] >= 1
    for e in data.list_clips(out):
        clip = data.read_clip(out / e["path"])
        np.testing.assert_allclose(clip.angles, kinematics.pose3d_to_angles(clip.pose3d), atol=1e-4)
    with pytest.raises(SystemExit):  # a wrong path is a clear CLI error, not a traceback deep in the run
        pipeline.main(["--videos", str(tmp_path / "vids"), "--out", str(out), "--lifter", str(tmp_path / "nope")])


def test_directions_are_mirror_equivariant(trained):
    net, _ = trained
    _, kp, sc, _, f, W, H = _case()
    lift = lifter.LearnedLifter(net, TINY, focal=f)
    flip = list(kinematics.H36M_FLIP_PERM)
    kp_m = kp[:, flip].copy()
    kp_m[..., 0] = W - kp_m[..., 0]
    d, d_m = lift.directions(kp, sc, W, H), lift.directions(kp_m, sc[:, flip], W, H)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-9)
    # the mirrored view's left thigh (bone 4) is the original's right thigh (bone 1)
    # with x negated, etc.
    bone_flip = [j - 1 for j in flip[1:]]
    np.testing.assert_allclose(d_m[:, bone_flip] * np.array([-1.0, 1.0, 1.0]), d, atol=1e-5)


def test_lifter_file_from_another_version_is_a_clear_error(trained, tmp_path):
    _, path = trained
    state = load_file(str(path))
    bad = tmp_path / "future.safetensors"
    save_file(state, str(bad), metadata={"lifter_config": json.dumps({**dataclasses.asdict(TINY), "heads": 4})})
    with pytest.raises(ValueError, match="heads"):
        lifter.load_lifter(bad)


def test_refine_never_ends_above_the_lifters_own_pose(trained):
    # the refine's objective at its result never exceeds its value at the lifter's pose (the init);
    # a refine that cannot improve (here Adam's steps are absurdly large, so every step overshoots)
    # returns the init itself
    net, _ = trained
    _, kp, sc, gt, f, W, H = _case()
    for refine, kept in ((dataclasses.replace(lifter.REFINE, steps=60), "refined"),
                         (dataclasses.replace(lifter.REFINE, steps=10, lr=50.0), "init")):
        lift = lifter.LearnedLifter(net, TINY, focal=f, refine=refine)
        init = lift.initial_pose(kp, sc, W, H)
        pose, info = lift.lift(kp, sc, W, H)
        assert info["kept"] == kept and info["loss"] <= info["loss_init"]
        # loss_init is the fit's objective evaluated at the lifter's output, and loss the
        # one at the result
        assert info["loss_init"] == pytest.approx(fit3d.objective(init, kp, sc, W, H, f, refine)["total"], rel=1e-9)
        # (objective() takes the elevation prior's mean, the refine its fitted elevation: a tiny
        # gravity term apart)
        assert info["loss"] == pytest.approx(fit3d.objective(pose, kp, sc, W, H, f, refine)["total"]
                                             + refine.w_init * info["losses"]["init"], rel=1e-3)
        if kept == "init":
            np.testing.assert_allclose(pose, init, atol=1e-9)
    # without the best-iterate rule the same absurd refine ends far above its start
    clip = fit3d._Clip(kp, sc, W, H, f, dataclasses.replace(lifter.REFINE, lr=50.0))
    *_, total_last, _, _, start = clip.optimize(clip.params_of_pose(init), 10, keep_best=False)
    assert float(total_last[0]) > float(start[0])


def _amp_npy(path):
    """The shipped AMP walk written back in its original format, a pickled poselib dict."""
    with np.load(mocap.ASSET_DIR / "isaac_amp_humanoid_walk.npz", allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    d = {"rotation": {"arr": a["rotation_xyzw"]},
         "root_translation": {"arr": a["root_translation"]},
         "skeleton_tree": {"node_names": list(a["node_names"]), "parent_indices": {"arr": a["parent_indices"]},
                           "local_translation": {"arr": a["local_translation"]}}, "is_local": True,
                           "fps": 60.0}
    np.save(path, np.array(d, dtype=object), allow_pickle=True)


def test_mocap_dir_lists_and_refuses_never_skips(tmp_path):
    (tmp_path / "cmu").mkdir()
    shutil.copy(mocap.ASSET_DIR / "ad_jumping_jacks.bvh", tmp_path / "cmu" / "jj.bvh")
    _amp_npy(tmp_path / "walk.npy")
    (tmp_path / "README.txt").write_text("my mocap")
    lines = []
    with pytest.raises(ValueError, match="2 of 3 mocap files .* refused"):  # .npy without opt-in, a non-mocap .txt
        lifter.load_motions(tmp_path, log=lines.append)
    assert lines[0].startswith(f"loaded  {tmp_path / 'cmu' / 'jj.bvh'}: BVH")
    assert any(line.startswith("refused") and "walk.npy" in line and "--allow-pickle" in line for line in lines)
    named = lifter.load_motions(tmp_path, skip_refused=True, log=lines.append)
    assert [k for k, _ in named] == ["cmu/jj"]
    (tmp_path / "README.txt").unlink()
    named = lifter.load_motions(tmp_path, allow_pickle=True, log=lines.append)
    assert [k for k, _ in named] == ["cmu/jj", "walk"]
    np.testing.assert_array_equal(named[1][1].rot, mocap.load_motion("isaac_amp_humanoid_walk.npz").rot)
    # the command line says why and exits, before any training
    r = subprocess.run([sys.executable, "lifter.py", "train", "--mocap-dir", str(tmp_path), "--out",
                        str(tmp_path / "l.safetensors")], capture_output=True, text=True,
                        timeout=120,
                       cwd=Path(lifter.__file__).parent)
    assert r.returncode == 2 and "refused" in r.stderr + r.stdout and "walk.npy" in r.stdout
    assert not (tmp_path / "l.safetensors").exists()


def test_unseen_protocol_trains_on_all_shipped_motions_and_scores_only_the_folder(monkeypatch, tmp_path):
    trained_on = []
    real = lifter.train_lifter

    def spy(motions, cfg=None, progress=True):
        trained_on.append(len(motions))
        return real(motions[:1], dataclasses.replace(TINY, steps=2, clips=1), progress)

    monkeypatch.setattr(lifter, "train_lifter", spy)
    shutil.copy(mocap.ASSET_DIR / "ad_jumping_jacks.bvh", tmp_path / "jacks.bvh")
    fast = fit3d.FitConfig(steps=5, yaws=(0.0,))
    res, rows = lifter.unseen_validate(tmp_path, TINY, fast, dataclasses.replace(fast, w_init=0.1),
                                       clips_per_motion=2, frames=6, progress=False)
    assert trained_on == [len(mocap.MOTIONS)]  # one model, on every shipped motion
    assert [r["motion"] for r in rows] == ["jacks", "jacks"] and set(res) == {"lifter", "lifter+fit", "fit"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no mocap file loaded"):
        lifter.unseen_validate(tmp_path / "empty", TINY, progress=False)
