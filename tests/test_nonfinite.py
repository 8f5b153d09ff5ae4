# Non-finite values never get into a training run silently: data.write_clip refuses them and
# a clip file that has them anyway is refused when read, naming the clip, array and frames
# (boxes may be NaN = unknown); training never applies or saves a step with a non-finite loss or
# gradient: it stops naming the step and its samples (clip@window), leaving the last good checkpoint
# as it was, or skips the step with --on-nonfinite skip.
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from test_train import argv, losses, make_dataset, params

import data
import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("clips"))


def clip_of(dataset, cid):
    return data.read_clip(next(dataset.rglob(f"{cid}.safetensors")))


# --------------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("name", ["angles", "pose3d", "src_time", "boxes"])
def test_write_clip_refuses_non_finite_arrays(dataset, tmp_path, name):
    clip = clip_of(dataset, "c0")
    clip.clip_id = "bad_clip"
    arr = getattr(clip, name).astype(np.float64).copy()
    arr[[5, 6, 7, 9]] = np.inf if name == "boxes" else np.nan
    setattr(clip, name, arr)
    with pytest.raises(ValueError, match=rf"clip bad_clip: {name} has .* at 4 frames \(5, 6, 7, 9\)"):
        data.write_clip(tmp_path, clip)
    assert not list(tmp_path.rglob("*.safetensors")), "a refused clip was written"


def test_unknown_boxes_stay_allowed(dataset, tmp_path):
    clip = clip_of(dataset, "c0")
    clip.boxes = clip.boxes.copy()
    clip.boxes[3:6] = np.nan  # no box known in those frames: drawn as nothing
    path = data.write_clip(tmp_path, clip)
    assert np.isnan(data.ClipFile(path).boxes[3:6]).all()


def test_reading_a_clip_with_non_finite_angles_names_it(dataset, tmp_path):
    """A clip file written by other means with NaN angles in frames 30..33: the training
    window that reads them fails naming the clip, the array and the frames; windows that do
    not touch them still load."""
    src = next(dataset.rglob("c1.safetensors"))
    with safe_open(str(src), framework="numpy") as f:
        arrays, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    arrays["angles"][30:34] = np.nan
    root = tmp_path / "broken"
    (root / "clips").mkdir(parents=True)
    save_file(arrays, str(root / "clips" / "c1.safetensors"), metadata=meta)
    data.write_index(root)
    ds = data.WindowDataset(root, split="train", stride=4, flip=False)
    starts = [int(s) for s in ds.win_start]
    hit = next(j for j, s in enumerate(starts) if s <= 30 < s + 16)
    # that window reads frames 16..31
    with pytest.raises(ValueError, match=r"clip c1 .*angles has non-finite values at 2 frames \(30, 31\)"):
        ds[hit]
    clean = [j for j, s in enumerate(starts) if s + 16 <= 30]
    assert clean and np.isfinite(ds[clean[0]]["actions"].numpy()).all()


# --------------------------------------------------------------------------------------------------
# training


def poison(monkeypatch, at_call):
    """The at_call-th sample the training loader reads (num_workers=0: in this process) gets NaN
    flow noise, as a corrupt sample would; returns what that sample was, as train.py names it."""
    real = train.FlowSamples.__getitem__
    calls, hit = [0], {}

    def getitem(self, key):
        item = real(self, key)
        if key[0] >= 0:  # training samples (validation uses epoch -1)
            if calls[0] == at_call:
                item["noise"] = torch.full_like(item["noise"], float("nan"))
                hit["name"] = f"{item['clip_id']}@{item['start']}{'~' if item['flipped'] else ''}"
            calls[0] += 1
        return item

    monkeypatch.setattr(train.FlowSamples, "__getitem__", getitem)
    return hit


def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    """Batch 4 x accumulation 2: samples 16..23 make step 3. Its loss is NaN: the run stops at
    the next read-back naming step 3 and the poisoned sample; ckpt-2 stays exactly what a clean run
    saved; nothing is saved after."""
    flags = dict(steps=4, save_every=2, num_workers=0)
    train.main(argv(dataset, tmp_path / "clean", **flags))
    hit = poison(monkeypatch, 16)
    out = tmp_path / "run"
    with pytest.raises(train.NonFinite) as e:
        train.main(argv(dataset, out, **flags))
    msg = str(e.value)
    assert msg.startswith("step 3: non-finite loss nan") and hit["name"] in msg, msg
    assert f"last good checkpoint is {out / 'ckpt-0000002'}" in msg
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002"]
    assert json.loads((out / "latest.json").read_text())["checkpoint"] == "ckpt-0000002"
    good, ref = params(out / "ckpt-0000002"), params(tmp_path / "clean" / "ckpt-0000002")
    assert all(torch.equal(good[k], ref[k]) for k in ref)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"] is None, r.get("skipped", False)) for r in rows if "loss" in r] == [
        (1, False, False), (2, False, False), (3, True, True), (4, False, False)]


def test_non_finite_step_is_skipped_on_request(dataset, tmp_path, monkeypatch, capsys):
    """--on-nonfinite skip: step 3 is logged as skipped, the optimizer never applied it
    (AdamW counted 3 updates in 4 steps) and the run finishes with finite weights."""
    hit = poison(monkeypatch, 16)
    out = tmp_path / "run"
    train.main(argv(dataset, out, steps=4, save_every=2, num_workers=0, on_nonfinite="skip"))
    text = capsys.readouterr()
    assert "warning: step 3: non-finite loss nan" in text.out + text.err and hit["name"] in text.out + text.err
    assert [s for s, _, _ in losses(out)] == [1, 2, 3, 4]
    assert [loss is None for _, loss, _ in losses(out)] == [False, False, True, False]
    state = torch.load(out / "ckpt-0000004" / "state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}
    assert all(torch.isfinite(v).all() for v in params(out / "ckpt-0000004").values())
