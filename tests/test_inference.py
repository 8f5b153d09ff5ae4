"""The model's one input path: a training window (data.WindowDataset + collate) and the public
inference API (VLAModel.predict / prepare) build bit-identical inputs and actions; the per-frame
vision cache changes no number, alone or in a batch; bad calls say what is missing.
inference.optimize: merged LoRA, the bf16 rule, bucket padding and torch.compile (inductor on the
CPU) give the eager numbers within tolerance, without recompiling."""

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import kinematics
from inference import VisionCache, optimize, pad_inputs
from lora import LoRALinear, lora_modules
from model import cast_frozen_
from model_io import collate_inputs, decode_angles, encode_angles


def textured_clip(T=40, size=(160, 120), cid="inf_a", seed=0):
    """Random-texture frames (every frame gives the vision tower other tokens), a moving box,
    real angles."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(T):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
        frames.append(buf.getvalue())
    pose = kinematics.angles_to_pose3d(rng.uniform(-1, 1, size=(T, 22))).astype(np.float32)
    x = np.linspace(10, 60, T, dtype=np.float32)
    boxes = np.stack([x, x * 0 + 15, x + 80, x * 0 + 110], 1)
    return data.Clip(clip_id=cid, frames_jpeg=frames, boxes=boxes, pose3d=pose,
                     angles=kinematics.pose3d_to_angles(pose), src_frame_index=np.arange(T),
                     src_time=np.arange(T) / 10.0, src_fps=10.0, width=size[0], height=size[1],
                     action_class="waving", description="Wave your left hand.", video_id="v")


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
    # what a robot has: the raw frames, their boxes, task and instruction
    frames = cf.frames(range(s - 4, s))
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
    """The batched inputs of a rolling loop over `starts`: `batch` copies of each call, other boxes."""
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
    # the window slides by one frame: after the first call, one new frame per copy is
    # encoded, three are reused
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


# --------------------------------------------------------------------------------------------------
# inference.optimize: merged LoRA, inference dtype, bucket padding, torch.compile


def raw_actions(model, inputs, state, noise, cache=None):
    with torch.inference_mode():
        return model(inputs=inputs, robot_state=state, compute_loss=False, noise=noise, cache=cache)["actions"]


def mixed_batch(model, clip, s=4):
    """Three samples of different text lengths (right-padded by collate), their states and noise."""
    frames = [Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[s - 4:s]]
    items = [model.prepare(frames, clip.boxes[s - 4:s] + 3 * k, "waving", text)
             for k, text in enumerate(["Wave.", "Wave your left hand slowly.", "Wave twice."])]
    inputs = collate_inputs(items, model.encoder().pad_token_id)
    state = encode_angles(torch.from_numpy(clip.angles[s:s + 3]).float())
    return inputs, state, torch.randn(3, 16, 44, generator=torch.Generator().manual_seed(s))


def test_merged_lora_matches_and_the_optimized_model_never_trains(model, tmp_path):
    clip = textured_clip(T=10, seed=7)
    inputs, state, noise = mixed_batch(model, clip)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # really padded
    plain = raw_actions(model, inputs, state, noise)
    merged = optimize(copy.deepcopy(model))
    assert all(m.merged for m in lora_modules(merged).values())
    torch.testing.assert_close(raw_actions(merged, inputs, state, noise), plain, rtol=0, atol=1e-5)
    # unmerged, one sample: the optimized path is the plain path, bit for bit
    one = collate_inputs([model.prepare([Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[:4]], clip.boxes[:4],
                                        "waving", "Wave.")])
    same = optimize(copy.deepcopy(model), merge_lora=False)
    assert torch.equal(raw_actions(same, one, state[:1], noise[:1]), raw_actions(model, one, state[:1], noise[:1]))
    with pytest.raises(RuntimeError, match="must not train"):
        merged.train()
    layer = next(iter(lora_modules(merged).values()))
    with pytest.raises(RuntimeError, match="merged: call unmerge"):
        layer.train()(torch.zeros(1, layer.in_features))
    with pytest.raises(ValueError, match="before inference.optimize"):
        merged.save_pretrained(tmp_path / "m")
    assert not optimize(copy.deepcopy(model).train()).training
    with pytest.raises(RuntimeError, match="already applied"):
        optimize(merged)


def test_bf16_inference_equals_the_training_precision_rule(model):
    """Weights cast once == the training rule (bf16 backbone, fp32 head, bf16 autocast) casting on
    every call."""
    clip = textured_clip(T=10, seed=8)
    inputs, state, noise = mixed_batch(model, clip)
    rule = copy.deepcopy(model)
    cast_frozen_(rule.qwen_model, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = raw_actions(rule, inputs, state, noise)
    fast = optimize(copy.deepcopy(model), dtype=torch.bfloat16, merge_lora=False)
    head = fast.action_head
    assert head.dit_blocks[0].ffn[0].weight.dtype == torch.bfloat16 == head.dit_blocks[0].self_attn.in_proj_weight.dtype
    assert head.action_pos_embed.dtype == torch.float32
    assert head.qwen_projection[1].weight.dtype == torch.float32  # a LayerNorm
    assert torch.equal(raw_actions(fast, inputs, state, noise), want)
    assert (raw_actions(fast, inputs, state, noise) - raw_actions(model, inputs, state, noise)).abs().max() > 1e-4


def test_lora_under_autocast_skips_the_fp32_round_trip_exactly():
    torch.manual_seed(0)
    for scale_alpha in (4.0, 8.0):  # scale 1 (no multiply) and 2
        layer = LoRALinear(torch.nn.Linear(32, 48).to(torch.bfloat16), rank=4, alpha=scale_alpha).eval()
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        x = torch.randn(3, 32, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            old = (F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B)
                   * layer.scale).to(torch.bfloat16)  # the formula with the fp32 copy of x
            assert torch.equal(layer(x), old)


def test_bucket_padding_changes_nothing_beyond_rounding(model):
    clip = textured_clip(T=10, seed=9)
    inputs, state, noise = mixed_batch(model, clip)
    L = inputs["input_ids"].shape[1]
    padded = pad_inputs(inputs, 64)
    assert padded["input_ids"].shape[1] == -(-L // 64) * 64 > L
    image_ids = lambda b: b["input_ids"].flatten()[b["visual_rows"]]  # noqa: E731
    assert torch.equal(image_ids(padded), image_ids(inputs))
    plain = raw_actions(model, inputs, state, noise)
    torch.testing.assert_close(raw_actions(model, padded, state, noise), plain, rtol=0, atol=1e-5)
    bucketed = optimize(copy.deepcopy(model), merge_lora=False, bucket=64)  # no key mask: causal only
    torch.testing.assert_close(raw_actions(bucketed, inputs, state, noise), plain, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")  # raised inside inductor
def test_compiled_step_matches_eager_and_a_new_instruction_in_its_bucket_does_not_recompile(model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = optimize(copy.deepcopy(model), compile=True)
    clip = textured_clip(T=10, seed=10)
    cache, graphs, lengths = VisionCache(), [], []
    for s, text in ((4, "Wave."), (5, "Wave your left hand.")):  # the window slides by one frame
        frames = [Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[s - 4:s]]
        inputs = collate_inputs([model.prepare(frames, clip.boxes[s - 4:s], "waving", text)])
        lengths.append(inputs["input_ids"].shape[1])
        state = encode_angles(torch.from_numpy(clip.angles[s:s + 1]).float())
        noise = torch.randn(1, 16, 44, generator=torch.Generator().manual_seed(s))
        got = raw_actions(compiled, inputs, state, noise, cache)
        torch.testing.assert_close(got, raw_actions(model, inputs, state, noise), rtol=0, atol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert lengths[0] != lengths[1] and lengths[0] // 32 == lengths[1] // 32 and lengths[1] % 32  # one bucket
    # no cache, and tensors made outside inference mode: still the same graphs
    with torch.no_grad():
        compiled(inputs=inputs, robot_state=state, compute_loss=False, noise=noise)
    graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2, 2]  # the vision tower (one frame) and the step, each compiled once
    assert (cache.misses, cache.hits) == (5, 3)


def test_a_failing_compile_raises_instead_of_falling_back(model, monkeypatch):
    def broken(fn, **kw):
        def run(*a):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *x: None, RuntimeError("no C++ compiler"))
        return run
    monkeypatch.setattr(torch, "compile", broken)
    fast = optimize(copy.deepcopy(model), compile=True)
    clip = textured_clip(T=8, seed=11)
    frames = [Image.open(io.BytesIO(b)) for b in clip.frames_jpeg[:4]]
    with pytest.raises(RuntimeError, match="torch.compile .* failed on this platform"):
        fast.predict(frames, clip.boxes[:4], "waving", "Go.", np.zeros(22))
