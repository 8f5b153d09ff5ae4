"""The model's one input path: a training window (data.WindowDataset + collate) and the public inference API
(VLAModel.predict / prepare) build bit-identical inputs and actions; the per-frame vision cache changes no number,
alone or in a batch; bad calls say what is missing."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import perturb_lora, tiny_lora_config

import data
from model import VisionCache, VLAModel, collate_inputs, decode_angles, encode_angles


def textured_clip(T=40, size=(160, 120), cid="inf_a", seed=0):
    """Random-texture frames (so every frame gives the vision tower different tokens), a moving box, real angles."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(T):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
        frames.append(buf.getvalue())
    pose = data.angles_to_pose3d(rng.uniform(-1, 1, size=(T, 22))).astype(np.float32)
    x = np.linspace(10, 60, T, dtype=np.float32)
    boxes = np.stack([x, x * 0 + 15, x + 80, x * 0 + 110], 1)
    return data.Clip(clip_id=cid, frames_jpeg=frames, boxes=boxes, pose3d=pose, angles=data.pose3d_to_angles(pose),
                     src_frame_index=np.arange(T), src_time=np.arange(T) / 10.0, src_fps=10.0, width=size[0],
                     height=size[1], action_class="waving", description="Wave your left hand.", video_id="v")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config(image_size=64)).eval()
    perturb_lora(m)
    return m


def test_training_window_and_inference_api_are_bit_identical(model, tmp_path):
    clip = textured_clip()
    data.write_clip(tmp_path, clip)
    split = data.list_clips(tmp_path)[0]["split"]
    ds = data.WindowDataset(tmp_path, split=split, flip=False, encode=model.encoder(), image_size=64)
    j = 1
    item = ds[j]
    s = item["start"]
    batch = data.collate([item], pad_token_id=model.encoder().pad_token_id)
    cf = data.ClipFile(data.clip_path(tmp_path, clip.clip_id))
    frames = cf.frames(range(s - 4, s))  # what a robot has: the raw frames, their boxes, task and instruction
    mine = collate_inputs([model.prepare(frames, cf.read("boxes", s - 4, s), "waving", "Wave your left hand.")],
                          model.encoder().pad_token_id)
    for k, v in mine.items():
        assert torch.equal(v, batch[k]), k
    state = item["state"][None]
    noise = torch.randn(1, 16, 44, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        train_path = model(inputs={k: batch[k] for k in mine}, robot_state=state, compute_loss=False,
                           noise=noise)["actions"]
    api = model.predict(frames, cf.read("boxes", s - 4, s), "waving", "Wave your left hand.",
                        cf.read("angles", s, s + 1)[0], noise=noise[0])
    assert np.array_equal(api, decode_angles(train_path[0].numpy()))


def rolling_inputs(model, clip, starts, batch=1):
    """The batched inputs of a rolling loop over `starts`, `batch` copies of each call with different boxes."""
    out = []
    for s in starts:
        frames = [Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[s - 4:s]]
        items = [model.prepare(frames, clip.boxes[s - 4:s] + 3 * k, "waving", f"Wave {k}.") for k in range(batch)]
        out.append(collate_inputs(items, model.encoder().pad_token_id))
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_vision_cache_changes_no_number(model, batch):
    clip = textured_clip(T=16, seed=2)
    steps = rolling_inputs(model, clip, range(4, 12), batch)
    state = encode_angles(torch.from_numpy(clip.angles[4:4 + batch]).float())
    noise = torch.randn(batch, 16, 44, generator=torch.Generator().manual_seed(3))
    cache = VisionCache(max_frames=4 * batch + 2)
    with torch.inference_mode():
        for inputs in steps:
            plain = model(inputs=inputs, robot_state=state, compute_loss=False, noise=noise)["actions"]
            cached = model(inputs=inputs, robot_state=state, compute_loss=False, noise=noise, cache=cache)["actions"]
            assert torch.equal(plain, cached)
    # the window slides by one frame: after the first call, one new frame per copy is encoded, three are reused
    assert cache.misses == 4 * batch + (len(steps) - 1) * batch
    assert cache.hits == (len(steps) - 1) * 3 * batch
    assert len(cache.entries) <= 4 * batch + 2


def test_vision_cache_is_keyed_by_the_pixels_after_the_box(model):
    clip = textured_clip(T=8, seed=4)
    frames = [Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[:4]]
    cache = VisionCache()
    a = model.prepare(frames, clip.boxes[:4], "waving", "Go.")
    b = model.prepare(frames, clip.boxes[:4] + 20, "waving", "Go.")  # same frames, another box: new inputs
    with torch.inference_mode():
        model.features(collate_inputs([a]), cache)
        model.features(collate_inputs([b]), cache)
    assert cache.misses == 8 and cache.hits == 0
    with pytest.raises(ValueError, match="on the CPU"):
        cache.encode(torch.zeros(1, 64, 64, 3, dtype=torch.uint8, device="meta"), model.encode_frames)


def test_predict_rejects_incomplete_or_bad_inputs(model):
    clip = textured_clip(T=8, seed=5)
    frames = [Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[:4]]
    ok = dict(frames=frames, boxes=clip.boxes[:4], task="waving", instruction="Go.", state_angles=np.zeros(22))
    assert model.predict(**ok).shape == (16, 22)
    for change, match in [({"frames": frames[:3]}, "need the 4 frames"), ({"boxes": None}, "boxes are required"),
                          ({"boxes": clip.boxes[:3]}, r"shape \(4, 4\)"), ({"task": None}, "task must be a string"),
                          ({"state_angles": np.full(22, np.nan)}, "22 finite radians"),
                          ({"state_angles": np.zeros(44)}, "22 finite radians")]:
        with pytest.raises(ValueError, match=match):
            model.predict(**{**ok, **change})
