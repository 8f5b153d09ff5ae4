# Tests of data.py: sin/cos, the clip format (round trip, partial reads, atomic writes, index), training windows
# (timing, box, flip) and collate. The IK/FK and mirroring tests are in test_kinematics.py.
import hashlib
import io
import json
import math
import os
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import kinematics
import model_io
from model import TINY_QWEN
from model_io import InputEncoder


def angle_err(a, b):
    return np.abs(kinematics.wrap_angle(np.asarray(a, float) - np.asarray(b, float)))


# ---------------------------------------------------------------------------------------------------------------
# Encoding, text


def test_encode_decode():
    a = np.random.default_rng(5).uniform(-3 * math.pi, 3 * math.pi, size=(7, 16, 22))
    x = model_io.encode_angles(a)
    assert x.shape == (7, 16, 44)
    assert np.allclose(x[..., 4], np.sin(a[..., 2])) and np.allclose(x[..., 5], np.cos(a[..., 2]))
    assert angle_err(model_io.decode_angles(x), a).max() < 1e-12
    xt = model_io.encode_angles(torch.from_numpy(a))
    assert np.allclose(xt.numpy(), x) and np.allclose(model_io.decode_angles(xt).numpy(), model_io.decode_angles(x))
    assert len(kinematics.JOINT_NAMES) == 22 and sorted(sum(kinematics.JOINT_GROUPS.values(), [])) == list(range(22))


def test_flip_text():
    assert data.flip_text("Raise your left arm, then the RIGHT leg. Left-hand turn to the Right.") == \
        "Raise your right arm, then the LEFT leg. Right-hand turn to the Left."
    assert data.flip_text("leftover rights bright") == "leftover rights bright"


def test_split_rule():
    ids = [f"vid{i}_000{i % 7}_{i}" for i in range(5000)]
    for cid in ids[:50]:
        h = int(hashlib.md5(cid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        assert data.split_of(cid) == ("val" if h < 0.02 else "train")
    frac = np.mean([data.split_of(c) == "val" for c in ids])
    assert 0.01 < frac < 0.03


# --------------------------------------------------------------------------------------------------
# Clip format


def colour_of(i):
    return (int(10 * i % 250), int(37 * i % 250), 200 - i)


def make_clip(T=30, size=(224, 224), cid="clip_a", action="waving", desc="Wave your left hand.", seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(T):
        buf = io.BytesIO()
        Image.new("RGB", size, colour_of(i)).save(buf, format="JPEG", quality=95)
        frames.append(buf.getvalue())
    pose = kinematics.angles_to_pose3d(rng.uniform(-1, 1, size=(T, 22))).astype(np.float32)
    boxes = np.tile(np.array([[50, 40, 150, 200]], np.float32), (T, 1))
    return data.Clip(clip_id=cid, frames_jpeg=frames, boxes=boxes, pose3d=pose,
                     angles=kinematics.pose3d_to_angles(pose), src_frame_index=np.arange(T) * 3,
                     src_time=np.arange(T) / 10.0, src_fps=30.0, width=size[0], height=size[1],
                     action_class=action, description=desc, video_id="vid", extra={"k": "v"})


def test_clip_round_trip_and_partial_reads(tmp_path):
    clip = make_clip()
    path = data.write_clip(tmp_path, clip)
    assert path == data.clip_path(tmp_path, "clip_a") and path.is_file()
    back = data.read_clip(path)
    assert back.frames_jpeg == clip.frames_jpeg and back.split == data.split_of("clip_a")
    for k in ("boxes", "pose3d", "angles", "src_frame_index", "src_time"):
        assert np.array_equal(getattr(back, k), getattr(clip, k)), k
    assert (back.action_class, back.description, back.extra, back.width) == \
        ("waving", clip.description, {"k": "v"}, 224)
    cf = data.ClipFile(path)
    assert cf.num_frames == 30 and cf.meta["src_fps"] == 30.0
    assert np.array_equal(cf.read("pose3d", 5, 9), clip.pose3d[5:9])
    assert np.array_equal(cf.boxes, clip.boxes) and np.array_equal(cf.src_time, clip.src_time)
    # frames by index read only their own bytes: garble every other frame's JPEG bytes in the file
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header["jpeg"]["data_offsets"][0]
    offs = np.concatenate([[0], np.cumsum([len(f) for f in clip.frames_jpeg])])
    keep = [3, 4, 5, 6]
    for i in range(30):
        if i not in keep:
            raw[start + offs[i]:start + offs[i + 1]] = b"\x00" * (offs[i + 1] - offs[i])
    path.write_bytes(bytes(raw))
    ims = data.ClipFile(path).frames(keep)
    for i, im in zip(keep, ims):
        assert np.abs(np.asarray(im)[100, 100].astype(int) - colour_of(i)).max() <= 3
    with pytest.raises(Exception):
        data.ClipFile(path).frames([0])
    with pytest.raises(IndexError, match="out of range"):
        data.ClipFile(path).frame_bytes([30])


def test_write_clip_is_atomic_and_validates(tmp_path, monkeypatch):
    path = data.write_clip(tmp_path, make_clip())
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "fsync", boom)
    with pytest.raises(OSError):
        data.write_clip(tmp_path, make_clip(T=25))
    with pytest.raises(OSError):
        data.write_clip(tmp_path, make_clip(cid="clip_b"))
    monkeypatch.undo()
    assert path.read_bytes() == before                                  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert not data.clip_path(tmp_path, "clip_b").exists()
    bad = make_clip()
    bad.pose3d = bad.pose3d[:, :16]
    with pytest.raises(ValueError, match="pose3d"):
        data.write_clip(tmp_path, bad)
    with pytest.raises(ValueError, match="clip_id"):
        data.write_clip(tmp_path, make_clip(cid="../evil"))


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    # a plain open() gives 0666 minus the umask; mkstemp's private 0600 would hide a shared
    # dataset from other users
    old = os.umask(0o022)
    try:
        p = tmp_path / "a" / "f.bin"
        data.atomic_write_bytes(p, b"x")
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
        os.umask(0o077)
        data.atomic_write_bytes(tmp_path / "g.bin", b"y")
        assert stat.S_IMODE(os.stat(tmp_path / "g.bin").st_mode) == 0o600
    finally:
        os.umask(old)


def test_index(tmp_path):
    for k in range(5):
        data.write_clip(tmp_path, make_clip(T=20 + k, cid=f"c{k}"))
    entries = data.list_clips(tmp_path)  # index missing -> built
    assert (tmp_path / data.INDEX_FILE).is_file()
    assert sorted(e["clip_id"] for e in entries) == [f"c{k}" for k in range(5)]
    e = next(e for e in entries if e["clip_id"] == "c3")
    assert e["num_frames"] == 23 and e["action_class"] == "waving" and (tmp_path / e["path"]).is_file()
    assert e["split"] == data.split_of("c3")
    assert len(data.list_clips(tmp_path, "train")) + len(data.list_clips(tmp_path, "val")) == 5
    # the dataset's vectorised window table equals window_starts clip by clip
    for stride in (1, 3, 16):
        ds = data.WindowDataset(tmp_path, split=None, stride=stride, flip=False)
        want = [(p, s) for p, e in zip(ds.paths, entries) for s in data.window_starts(e["num_frames"], stride)]
        assert [(ds.paths[c], s) for c, s in zip(ds.win_clip, ds.win_start)] == want


# --------------------------------------------------------------------------------------------------
# Windows


def test_window_starts():
    assert list(data.window_starts(40)) == [4, 20]
    assert list(data.window_starts(36)) == [4, 20]
    assert list(data.window_starts(35)) == [4]
    assert list(data.window_starts(19)) == []
    assert list(data.window_starts(30, stride=3)) == list(range(4, 15, 3))


def test_window_dataset_timing_box_and_flip(tmp_path):
    clip = make_clip(T=40, desc="Wave your left hand.")
    clip.split = "train"
    data.write_clip(tmp_path, clip)
    ds = data.WindowDataset(tmp_path, split="train", stride=16, flip=True)
    assert len(ds) == 4 and list(ds.win_start) == [4, 20]
    assert len(data.WindowDataset(tmp_path, split="val")) == 0
    for idx, s in [(0, 4), (1, 20)]:
        it = ds[idx]
        assert it["start"] == s and not it["flipped"] and it["clip_id"] == "clip_a"
        assert it["text"] == "Task: waving. Instruction: Wave your left hand."
        assert it["state"].shape == (44,) and it["actions"].shape == (16, 44)
        assert torch.allclose(it["actions"], torch.from_numpy(model_io.encode_angles(clip.angles[s:s + 16])).float())
        assert torch.equal(it["state"], it["actions"][0])
        assert len(it["images"]) == 4
        for k, im in enumerate(it["images"]):
            x = np.asarray(im).astype(int)
            assert x.shape == (224, 224, 3)
            assert np.abs(x[120, 100] - colour_of(s - 4 + k)).max() <= 3        # frame s-4+k, inside the box
            assert (x[100, 49:52] == [0, 255, 0]).all() and (x[100, 48] != [0, 255, 0]).any()  # 3 px, centred
            assert (x[100, 52] != [0, 255, 0]).any() and (x[39:42, 100] == [0, 255, 0]).all()
    f = ds[2 + 1]  # the mirror of window 1
    assert f["flipped"] and f["start"] == 20 and f["text"] == "Task: waving. Instruction: Wave your right hand."
    flipped = kinematics.flip_pose3d(clip.pose3d[20:36].astype(np.float64))
    want = model_io.encode_angles(kinematics.pose3d_to_angles(flipped))
    assert torch.allclose(f["actions"], torch.from_numpy(want).float(), atol=1e-6)
    got = model_io.decode_angles(f["actions"].numpy())
    assert angle_err(got, kinematics.flip_angles(clip.angles[20:36])).max() < 1e-4
    x = np.asarray(f["images"][0]).astype(int)
    assert (x[100, 223 - 51:223 - 48] == [0, 255, 0]).all()  # the box mirrored with the frame
    assert np.array_equal(np.asarray(f["images"][2]), np.asarray(ds[1]["images"][2])[:, ::-1])


def test_collate_plain_and_encoded(tmp_path):
    data.write_clip(tmp_path, make_clip(T=40, cid="a1", desc="Go left."))
    data.write_clip(tmp_path, make_clip(T=40, cid="a2", desc="Go."))
    root_split = data.list_clips(tmp_path)[0]["split"]
    ds = data.WindowDataset(tmp_path, split=root_split, flip=False)
    b = data.collate([ds[i] for i in range(len(ds))])
    assert b["state"].shape == (len(ds), 44) and b["actions"].shape == (len(ds), 16, 44)
    assert len(b["images"]) == len(ds) and len(b["images"][0]) == 4 and b["start"].dtype == torch.int64

    # stands in for model.InputEncoder: per-sample token ids of varying length
    def encode(images, text):
        n = len(text)
        return {"frames": torch.full((4, 8, 8, 3), n, dtype=torch.uint8), "input_ids": torch.arange(1, n + 1),
                "position_ids": torch.arange(n).expand(3, n) + 1, "image_positions": torch.tensor([0, 2])}

    ds = data.WindowDataset(tmp_path, split=root_split, flip=True, encode=encode)
    items = [ds[i] for i in range(len(ds))]
    assert "images" not in items[0]
    b = data.collate(items, pad_token_id=-7)
    lens = [len(it["text"]) for it in items]
    L = max(lens)
    assert b["input_ids"].shape == (len(items), L) and b["position_ids"].shape == (3, len(items), L)
    for r, n in enumerate(lens):
        assert b["attention_mask"][r].sum() == n and (b["input_ids"][r, n:] == -7).all()
        assert (b["position_ids"][:, r, n:] == 0).all() and (b["position_ids"][:, r, :n] > 0).all()
        assert (b["frames"][r] == n).all()
    assert b["frames"].shape == (len(items), 4, 8, 8, 3) and b["frames"].dtype == torch.uint8
    # flat rows b * L + s of the image tokens, batch-major
    assert b["visual_rows"].tolist() == [r * L + s for r in range(len(items)) for s in (0, 2)]
    assert b["state"].shape == (len(items), 44) and b["clip_id"] == [it["clip_id"] for it in items]


def test_dataloader_workers(tmp_path):
    # files are opened per item inside the worker (nothing open crosses the fork)
    data.write_clip(tmp_path, make_clip(T=40, cid="w1"))
    split = data.list_clips(tmp_path)[0]["split"]
    ds = data.WindowDataset(tmp_path, split=split)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=data.collate)
    batches = list(loader)
    assert sum(len(b["clip_id"]) for b in batches) == 4
    assert torch.equal(torch.cat([b["actions"] for b in batches]), torch.stack([ds[i]["actions"] for i in range(4)]))


def test_input_encoder_matches_the_processor(tmp_path):
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    from qwen3vl import Qwen3VLConfig, rope_index
    from qwen3vl_processor import Qwen3VLProcessor, pixel_values_from_frames

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    words = ["[UNK]", "user", "assistant", "Task", ":", ".", "Instruction", "\n"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words + special)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z_]+\|>|\w+|[^\w\s]|\n"), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    proc = Qwen3VLProcessor(tok)
    with pytest.raises(ValueError, match="would resize 224x224"):  # the stock min_pixels upscales 224 to 256
        InputEncoder(proc, Qwen3VLConfig.from_hf(TINY_QWEN), image_size=224)
    proc.image_config = replace(proc.image_config, min_pixels=224 * 224)  # as model.build_processor does
    qcfg = replace(Qwen3VLConfig.from_hf(TINY_QWEN), image_token_id=proc.image_token_id,
                   video_token_id=proc.video_token_id, vision_start_token_id=proc.vision_start_token_id,
                   vision_end_token_id=proc.vision_end_token_id)
    data.write_clip(tmp_path, make_clip(T=40, cid="q1", desc="Wave your left hand now."))
    split = data.list_clips(tmp_path)[0]["split"]
    enc = InputEncoder(proc, qcfg, image_size=224)
    ds = data.WindowDataset(tmp_path, split=split, encode=enc)
    items = [ds[i] for i in range(len(ds))]
    one = items[0]
    # the processor's own output for the same images and prompt: same ids, same
    # pixels (patched from uint8)
    plain = data.WindowDataset(tmp_path, split=split)[0]
    content = [{"type": "image"}] * 4 + [{"type": "text", "text": plain["text"]}]
    ref = proc(text=proc.apply_chat_template([{"role": "user", "content": content}]), images=plain["images"])
    assert torch.equal(one["input_ids"], ref["input_ids"][0])
    pv, grid = pixel_values_from_frames(one["frames"], proc.image_config)
    assert torch.equal(pv, ref["pixel_values"]) and torch.equal(grid, ref["image_grid_thw"])
    pos, _ = rope_index(qcfg, ref["input_ids"], ref["image_grid_thw"])
    assert torch.equal(one["position_ids"], pos[:, 0])
    assert (one["input_ids"][one["image_positions"]] == proc.image_token_id).all()
    # 224x224 -> 14x14 patches -> 7x7 merged tokens per frame
    assert len(one["image_positions"]) == 4 * 49
    text = proc.tokenizer.decode(one["input_ids"].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and text.count("<|vision_start|>") == 4
    b = data.collate(items, pad_token_id=enc.pad_token_id)
    assert b["input_ids"].shape[0] == len(items) and len(b["visual_rows"]) == 4 * 49 * len(items)


def test_draw_box_and_cli(tmp_path, capsys):
    im = Image.new("RGB", (64, 48))
    model_io.draw_box(im, [60, 40, 10, 5])          # inverted: nothing drawn
    model_io.draw_box(im, [np.nan, 0, 10, 10])      # no box
    assert np.asarray(im).max() == 0
    model_io.draw_box(im, [-5, -5, 100, 100])       # clamped to the frame
    x = np.asarray(im)
    assert (x[0:2, 10] == [0, 255, 0]).all() and (x[47, 10] == [0, 255, 0]).all() and x[20, 20].max() == 0
    path = data.write_clip(tmp_path, make_clip(T=40, cid="cli1"))
    data.main(["index", str(tmp_path)])
    data.main(["info", str(tmp_path)])
    data.main(["info", str(path)])
    out = capsys.readouterr().out
    assert "indexed 1 clips" in out and "1 action classes" in out and "clip cli1: 40 frames" in out
