# Tests of train.py on CPU with a toy dataset written here (4 short clips) and a shrunk tiny
# preset: DDP (2 gloo processes) == 1 process with the same global batch, exact resume
# (full and trainable-only checkpoints), atomic checkpoints and --keep-last pruning, and the main
# job end to end (val loss, rolling eval, final_eval.json). Runs of the single-process job call
# train.main in-process (saves the import time).
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import kinematics
import train
from model import PRESETS, VLAConfig, VLAModel, load_safetensors

REPO = Path(__file__).resolve().parents[1]

# The tiny preset at 64x64 frames (4 visual tokens per frame) with one DiT block. Its second
# DeepStack level is injected after the tap layer, so VLAModel freezes that merger (else DDP refuses
# parameters without gradients): the DDP test below runs through exactly that case.
SMALL = {"image_size": 64, "num_diffusion_layers": 1}
# so that a trainable-only checkpoint leaves keys out
FROZEN_VISION = {**SMALL, "freeze_vision_encoder": True}


def make_dataset(root, n_train=3, n_val=1, T=36, size=64, seed=0):
    """Clips of smooth random joint motion (pose from FK, angles from IK so flips are
    consistent) and noise frames."""
    rng = np.random.default_rng(seed)
    for k in range(n_train + n_val):
        t = np.arange(T)[:, None]
        ang = 0.6 * np.sin(0.3 * t + rng.uniform(0, 6, 22)) * rng.uniform(0.2, 1.0, 22)
        pose = kinematics.angles_to_pose3d(ang)
        pose[..., 2] += 3.0  # in front of the camera
        frames = []
        for _ in range(T):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
            frames.append(buf.getvalue())
        data.write_clip(root, data.Clip(
            clip_id=f"c{k}", frames_jpeg=frames, boxes=np.tile(np.float32([8, 8, size - 8, size - 8]), (T, 1)),
            pose3d=pose.astype(np.float32), angles=kinematics.pose3d_to_angles(pose).astype(np.float32),
            src_frame_index=np.arange(T), src_time=np.arange(T) / 10.0, src_fps=10.0, width=size, height=size,
            action_class="jumping jacks", description="Do jumping jacks.", split="val" if k >= n_train else "train"))
    data.write_index(root)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # stride 4 below: 5 windows per clip -> 15 train windows (30 with flips), 5 val windows
    return make_dataset(tmp_path_factory.mktemp("clips"))


def argv(dataset, out, model_config=SMALL, **flags):
    base = {"data": dataset, "out": out, "model-config": json.dumps(model_config), "steps": 4, "batch-size": 4,
            "total-batch": 8, "stride": 4, "warmup": 1, "eval-every": 100, "save-every": 100, "num-workers": 1,
            "final-eval-windows": 0}
    base.update({k.replace("_", "-"): v for k, v in flags.items()})
    out = []
    for k, v in base.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None and v is not False:
            out += [f"--{k}", str(v)]
    return out


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def params(ckpt):
    return load_safetensors(Path(ckpt) / "model.safetensors")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------


def test_ddp_two_processes_equal_one_process(dataset, tmp_path):
    """2 gloo ranks x micro-batch 4 == 1 process x micro-batch 8 (same global batch of 8): same
    losses, gradient norms and parameters after 3 steps. A small lr keeps AdamW's sign-like
    first steps from amplifying float rounding in gradients that are mathematically zero
    (attention key biases) past the 1e-6 tolerance; a sharding or synchronisation bug still moves
    parameters by ~lr = 1e-5 per step."""
    flags = dict(steps=3, save_every=3, lr=1e-5, num_workers=0)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                       *argv(dataset, tmp_path / "ddp", batch_size=4, **flags)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    assert "world 2 x batch 4 x accum 1 = 8" in logs[0]
    train.main(argv(dataset, tmp_path / "one", batch_size=8, **{**flags, "num_workers": 1}))  # 1 thread, as a rank

    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _, _ in a] == [1, 2, 3] and [s for s, _, _ in b] == [1, 2, 3]
    np.testing.assert_allclose([x[1:] for x in a], [x[1:] for x in b], rtol=1e-5)
    pa, pb = params(tmp_path / "ddp" / "ckpt-0000003"), params(tmp_path / "one" / "ckpt-0000003")
    assert pa.keys() == pb.keys()
    diff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert diff <= 1e-6, diff
    # the comparison has teeth: training moved the parameters by much more than the tolerance
    torch.manual_seed(0)  # train.main seeds seed + rank before building the model
    init = VLAModel(VLAConfig(**{**PRESETS["tiny"], **SMALL})).state_dict()
    assert max((pb[k] - init[k]).abs().max().item() for k in pb) > 10 * 1e-6


def test_resume_is_exact_full_and_trainable_only(dataset, tmp_path):
    """Stop after step 2, resume, finish at 4: the logged losses and the final parameters
    are identical to an uninterrupted run, for a full checkpoint and for a trainable-only one
    (frozen weights rebuilt from the seed)."""
    ref = tmp_path / "ref"
    train.main(argv(dataset, ref, FROZEN_VISION))
    for name, extra in (("full", {}), ("trainable", {"save_trainable_only": True})):
        out = tmp_path / name
        train.main(argv(dataset, out, FROZEN_VISION, save_every=2, stop_after=2, **extra))
        assert [s for s, _, _ in losses(out)] == [1, 2]
        assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002"]
        assert not (out / "final_eval.json").exists()
        saved = params(out / "ckpt-0000002")
        meta = json.loads((out / "ckpt-0000002" / "config.json").read_text())
        if name == "trainable":
            assert meta["trainable_only"] is True
            assert saved and not any(".visual." in k for k in saved), "frozen vision weights were saved"
        else:
            assert any(".visual." in k for k in saved)
        train.main(argv(dataset, out, FROZEN_VISION, save_every=2, resume=True, **extra))
        assert losses(out) == losses(ref), name  # exact: same floats, step by step
        pa, pb = params(ref / "ckpt-0000004"), params(out / "ckpt-0000004")
        for k in pb:
            assert torch.equal(pa[k], pb[k]), (name, k)


def _small_training_objects(tmp_path):
    torch.manual_seed(0)
    model = VLAModel(VLAConfig(**{**PRESETS["tiny"], **FROZEN_VISION}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = train.get_args(["--out", str(tmp_path)])
    return model, opt, sched, args


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    model, opt, sched, args = _small_training_objects(tmp_path)
    pos = {"epoch": 0, "sample": 8}
    real_save = torch.save

    def crash(obj, f, *a, **k):  # die while writing the state file, after the weights were written
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt("killed mid-checkpoint")

    monkeypatch.setattr(train.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(tmp_path, 1, model, opt, sched, pos, args, keep_last=2)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert not list(tmp_path.glob("ckpt-*")), "a half-written checkpoint is visible under its final name"
    assert not (tmp_path / "latest.json").exists()
    args.resume = "auto"
    assert train.find_resume(args) is None

    for step in range(1, 5):
        train.save_checkpoint(tmp_path, step, model, opt, sched, pos, args, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000003", "ckpt-0000004"]
    assert not list(tmp_path.glob(".tmp-ckpt-*")), "temporary folders left behind"
    assert train.find_resume(args) == tmp_path / "ckpt-0000004"
    ck = tmp_path / "ckpt-0000004"
    assert {p.name for p in ck.iterdir()} >= {"model.safetensors", "config.json", "state.pt"}
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data_sample"] == 8
    assert params(ck).keys() == model.state_dict().keys()
    # trainable-only: exactly the tensors that train, nothing frozen
    args.save_trainable_only = True
    train.save_checkpoint(tmp_path, 5, model, opt, sched, pos, args, keep_last=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(params(tmp_path / "ckpt-0000005")) == trainable != set(model.state_dict())


def test_main_job_end_to_end(dataset, tmp_path):
    """The main job's command line, shrunk: trains, logs (bar + metrics.jsonl), reports
    the validation loss, saves, runs the closing rolling evaluation, writes final_eval.json and says
    where the checkpoint is."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *argv(dataset, out, steps=3, save_every=2,
                                                                       num_workers=2, final_eval_windows=4)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    text = r.stdout + r.stderr
    assert "rolling eval S=16 on 4 val windows" in text
    assert f"checkpoint: {out / 'ckpt-0000003'}" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in rows if "loss" in r)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 1 and np.isfinite(val[0])
    res = json.loads((out / "final_eval.json").read_text())
    assert res["num_windows"] == 4
    assert all(np.isfinite(res["table"]["16"][m]) for m in ("model", "static", "linear"))
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000003"]
    assert f"loss curves: {out / 'loss.png'}" in text
    with Image.open(out / "loss.png") as im:  # the loss curves as a picture
        assert im.size == (720, 300)


def test_too_few_windows_is_an_error_not_a_hang(dataset, tmp_path):
    with pytest.raises(SystemExit, match="cannot fill a micro-batch of 64"):
        train.main(argv(dataset, tmp_path / "x", batch_size=64, total_batch=64, steps=1, num_workers=0))


def test_no_val_windows_trains_and_skips_validation(tmp_path, capsys):
    """A dataset whose clips all fall in train (a small one often does: ~2% of clip ids hash to val)
    trains to the end: a one-line note up front, no NaN validation points in metrics.jsonl,
    the train curve in loss.png, and the final rolling evaluation skipped instead
    of failing with 'no val windows'."""
    root = make_dataset(tmp_path / "clips", n_train=2, n_val=0)
    assert not data.list_clips(root, "val")
    out = tmp_path / "run"
    train.main(argv(root, out, steps=2, eval_every=1, save_every=2, num_workers=0, final_eval_windows=4))
    text = capsys.readouterr()
    text = text.out + text.err
    assert "0 val windows" in text
    notes = [line for line in text.splitlines() if line.startswith("note: no val windows")]
    assert len(notes) == 1 and "skipping the validation loss and the final rolling evaluation" in notes[0], text
    assert ": val loss" not in text and "rolling eval S=16" not in text
    raw = (out / "metrics.jsonl").read_text()
    assert "NaN" not in raw
    rows = [json.loads(line) for line in raw.splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and not any("val_loss" in r for r in rows)
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert not (out / "final_eval.json").exists()
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002"]
    assert f"loss curves: {out / 'loss.png'}" in text
    with Image.open(out / "loss.png") as im:
        assert im.size == (720, 300)
