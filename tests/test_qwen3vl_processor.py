"""Parity of qwen3vl_processor.py against transformers' own Qwen3-VL processor classes (CPU, no
weights, no network).

The test writes a tiny checkpoint folder: a byte-level BPE tokenizer.json trained here with
the Qwen2 pipeline plus the Qwen special tokens, a tokenizer_config.json whose chat_template
is the Qwen3-VL-Instruct jinja template (reference side only), and preprocessor_config.json
/ video_preprocessor_config.json with the real Qwen3-VL values. Reference: AutoImageProcessor
(-> Qwen2VLImageProcessorPil here, no torchvision), AutoTokenizer (Qwen2Tokenizer),
Qwen3VLVideoProcessor and Qwen3VLProcessor; tests that need them skip when transformers is absent.
The video processor needs torchvision for two kernels; the test supplies them as torchvision runs
them on CPU (resize = F.interpolate on uint8 with antialias, normalize = sub/div), so the video
resize itself is not checked independently, except that identity-size clips bypass it entirely.
Everything else is compared bit for bit.
"""

import enum
import json
from contextlib import ExitStack

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwen3vl_processor import (
    Qwen3VLPreprocessConfig,
    Qwen3VLProcessor,
    apply_chat_template,
    preprocess_images,
    preprocess_video,
    smart_resize,
    smart_resize_video,
    video_timestamps,
)

QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
                "rescale_factor": 0.00392156862745098, "do_convert_rgb": True, "do_rescale": True,
                "do_normalize": True, "processor_class": "Qwen3VLProcessor",
                "image_processor_type": "Qwen2VLImageProcessorFast"}
VIDEO_PREPROCESSOR = {**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"},
                      "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 2, "min_frames": 4,
                      "max_frames": 768, "video_processor_type": "Qwen3VLVideoProcessor"}

# Qwen3-VL-Instruct chat template (tool branches left out: this port raises on
# tools), reference side only
CHAT_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].content is string %}
        {{- messages[0].content }}
    {%- else %}
        {%- for content in messages[0].content %}
            {%- if 'text' in content %}
                {{- content.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _write_tokenizer(path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()  # the Qwen2 pipeline, as Qwen2Tokenizer rebuilds it
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["Task: pick up the cup. Instruction: move the left hand to the red cup and grasp it.",
              "user assistant system Describe this image. You are a robot. seconds 0.5 1.0 12.5 <3.5 seconds>",
              "The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café!"] * 20
    trainer = BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False)
                    for s in ["<tool_call>", "</tool_call>", "<think>", "</think>"]])
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3vl_proc")
    _write_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 262144, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "chat_template": CHAT_TEMPLATE}))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (d / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    return d


class _TorchvisionCPU:
    """The torchvision.transforms.v2.functional calls the transformers video path
    makes, as they run on CPU."""

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        LANCZOS = "lanczos"

    @staticmethod
    def resize(image, size, interpolation=None, antialias=True):
        *lead, c, h, w = image.shape
        if tuple(size) == (h, w):  # torchvision returns the input untouched
            return image
        assert image.dtype == torch.uint8 and interpolation.value == "bicubic" and antialias
        # the native uint8 kernel: torchvision's CPU path for uint8 bicubic
        x = F.interpolate(image.reshape(-1, c, h, w), size=list(size), mode="bicubic", align_corners=False,
                          antialias=True)
        return x.reshape(*lead, c, *size)

    @staticmethod
    def normalize(x, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
        return (x if inplace else x.clone()).sub_(mean).div_(std)

    @staticmethod
    def grayscale_to_rgb(video):
        return video if video.shape[-3] == 3 else video.expand(*video.shape[:-3], 3, *video.shape[-2:])


@pytest.fixture(scope="module")
def ref(model_dir):
    """transformers' Qwen3VLProcessor assembled by hand (AutoProcessor refuses without torchvision)."""
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor, AutoTokenizer, image_processing_backends, video_processing_utils
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as RefProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    ip = AutoImageProcessor.from_pretrained(model_dir)
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil"  # the class this port matches
    tok = AutoTokenizer.from_pretrained(model_dir)
    vp = Qwen3VLVideoProcessor(**VIDEO_PREPROCESSOR, cap_pixels_per_frame=False)
    tv = _TorchvisionCPU
    with ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(image_processing_backends, "tvF", tv, raising=False)
        mp.setattr(video_processing_utils, "tvF", tv, raising=False)
        mp.setattr(image_processing_backends, "pil_torch_interpolation_mapping",
                   {3: tv.InterpolationMode.BICUBIC, 2: tv.InterpolationMode.BILINEAR})
        # the class check looks the video base class up in transformers, a dummy without torchvision
        orig = RefProcessor.check_argument_for_proper_class
        mp.setattr(RefProcessor, "check_argument_for_proper_class",
                   lambda self, name, arg: type(arg) if name == "video_processor" else orig(self, name, arg))
        yield RefProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def proc(model_dir):
    return Qwen3VLProcessor.from_pretrained(model_dir)


def _img(h, w, seed=0, mode="RGB"):
    """A smooth random image (gradients + noise) so bicubic resizing has real work to do."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    a = np.clip(base + rs.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rs.randint(0, 256, (h, w, 1)).astype(np.uint8)
        return Image.fromarray(np.concatenate([a, alpha], -1), mode="RGBA")
    return Image.fromarray(a).convert(mode)


def _compare(ours, theirs, keys=("input_ids", "attention_mask", "mm_token_type_ids")):
    for k in keys:
        assert torch.equal(ours[k], theirs[k]), k
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (k in ours) == (k in theirs), k
        if k in ours:  # exact: same uint8 resize, same float ops
            assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
            assert torch.equal(ours[k], theirs[k]), (k, (ours[k] - theirs[k]).abs().max())


def _user(*items):
    return [{"role": "user", "content": list(items)}]


# -----------------------------------------------------------------------------


def test_smart_resize_spec_examples():
    assert smart_resize(480, 640) == (480, 640)  # 640x480 -> grid (1, 30, 40), 300 tokens
    assert smart_resize(400, 400) == (384, 384)  # 12.5 rounds half to even
    assert smart_resize(50, 50) == (256, 256)  # upscaled to >= 65536 pixels: 64 tokens
    assert smart_resize(224, 224) == (256, 256)  # the MIMIC frames are upscaled too
    assert smart_resize(10000, 10000) == (4096, 4096)  # max clamp: exactly 4096^2 = max_pixels
    assert smart_resize(10000, 9000) == (4288, 3872)  # max clamp rounds down
    assert smart_resize(20, 3000, 32, 32, 10**9) == (32, 3008)  # max(factor, ...) keeps a side of 32
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2001)
    with pytest.raises(ValueError, match="temporal_factor"):
        smart_resize_video(1, 64, 64)


def test_smart_resize_matches_reference_sweep():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_image
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as ref_video

    rs = np.random.RandomState(0)
    sizes = [(int(h), int(w)) for h, w in rs.randint(8, 3000, (300, 2))] + [(16 * k, 16 * k) for k in range(1, 60)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w) == ref_image(h, w, 32, 65536, 16777216), (h, w)
        assert smart_resize(h, w, 32, 4096, 2**22) == ref_image(h, w, 32, 4096, 2**22), (h, w)
        for t in (2, 3, 7, 16):
            got = smart_resize_video(t, h, w, 2, 32, 4096, 25165824)
            assert got == ref_video(t, h, w, 2, 32, 4096, 25165824), (t, h, w)
            assert smart_resize_video(t, h, w) == ref_video(t, h, w, 2, 32, 128 * 32 * 32, 768 * 32 * 32)


def test_mimic_prompt_four_frames(proc, ref):
    frames = [_img(224, 224, seed=i) for i in range(4)]
    msgs = _user(*[{"type": "image"}] * 4, {"type": "text", "text": "Task: x. Instruction: y"})
    text = proc.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ours = proc(text=[text], images=frames)
    theirs = ref(text=[text], images=frames, return_tensors="pt")
    _compare(ours, theirs)
    assert ours["image_grid_thw"].tolist() == [[1, 16, 16]] * 4  # 224 -> 256: 64 tokens per frame
    assert (ours["input_ids"] == proc.image_token_id).sum() == 4 * 64
    assert ours["pixel_values"].shape == (4 * 256, 1536)


@pytest.mark.parametrize("h,w,grid", [(480, 640, (1, 30, 40)), (400, 400, (1, 24, 24)), (50, 50, (1, 16, 16)),
                                      (333, 517, None), (1000, 37, None)])
def test_single_image_sizes(proc, ref, h, w, grid):
    image = _img(h, w, seed=h)
    text = proc.apply_chat_template(_user({"type": "image"}, {"type": "text", "text": "Describe this image."}))
    ours = proc(text=text, images=[image])
    _compare(ours, ref(text=[text], images=[image], return_tensors="pt"))
    g = ours["image_grid_thw"][0]
    if grid is not None:
        assert tuple(g.tolist()) == grid
    assert (ours["input_ids"] == proc.image_token_id).sum() == g.prod() // 4  # 300 / 144 / 64 pads


@pytest.mark.parametrize("kind", ["RGBA", "LA", "L", "P", "array_rgb", "array_rgba", "array_gray"])
def test_image_modes(proc, ref, kind):
    if kind.startswith("array"):
        a = np.asarray(_img(70, 90, seed=3, mode="RGBA"))
        image = {"array_rgb": a[..., :3].copy(), "array_rgba": a.copy(), "array_gray": a[..., :1].copy()}[kind]
    else:
        image = _img(70, 90, seed=3, mode=kind)
    pv, grid = preprocess_images([image], proc.image_config)
    r = ref.image_processor([image], return_tensors="pt")
    assert torch.equal(pv, r["pixel_values"]) and torch.equal(grid, r["image_grid_thw"])


def test_pixel_layout_and_normalization():
    """Independent of transformers: a 64x32 image kept at its size (min_pixels lowered) maps each
    pixel to the documented slot: rows in merge-window order, features (C, T, 16, 16)."""
    rs = np.random.RandomState(1)
    a = rs.randint(0, 256, (64, 32, 3)).astype(np.uint8)
    pv, grid = preprocess_images([a], Qwen3VLPreprocessConfig(min_pixels=1024))
    assert grid.tolist() == [[1, 4, 2]] and pv.shape == (8, 1536)
    x = pv.view(8, 3, 2, 16, 16)  # (patch, C, T, ph, pw) = Conv3d layout
    assert torch.equal(x[:, :, 0], x[:, :, 1])  # still image repeated in time
    want = torch.from_numpy(a).float() / 255 * 2 - 1
    for row, (bh, mh, mw) in enumerate([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0)]):
        ph, pw = (bh * 2 + mh) * 16, mw * 16
        assert torch.allclose(x[row, :, 0], want[ph:ph + 16, pw:pw + 16].permute(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_three_with_padding(proc, ref, side):
    texts = [proc.apply_chat_template(_user({"type": "image"}, {"type": "text", "text": "Task: x. Instruction: y"})),
             proc.apply_chat_template(_user({"type": "text", "text": "The quick brown fox jumps over the lazy dog."})),
             proc.apply_chat_template(_user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}))]
    images = [_img(100, 120, 1), _img(224, 224, 2), _img(480, 640, 3)]
    ours = proc(text=texts, images=images, padding=True, padding_side=side)
    theirs = ref(text=texts, images=images, padding=True, padding_side=side, return_tensors="pt")
    _compare(ours, theirs)
    m = ours["attention_mask"]
    assert m.sum(1).unique().numel() == 3 and (m[:, -1 if side == "left" else 0] == 1).all()
    nested = proc(text=texts, images=[[images[0]], [], images[1:]], padding_side=side)  # per-sample lists flatten
    _compare(nested, theirs)


def test_chat_template_roles(ref):
    conversations = [
        [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "again"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "sys "}, {"type": "text", "text": "two"}]},
         {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "video"},
                                      {"type": "text", "text": "what?"}, {"image_url": "u"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}],
        [{"role": "user", "content": [{"type": "image"}]}, {"role": "tool", "content": "r1"},
         {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "r2"}]},
         {"role": "assistant", "content": ""}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            for vid in (False, True):
                want = ref.apply_chat_template(msgs, add_generation_prompt=gen, add_vision_id=vid, tokenize=False)
                assert apply_chat_template(msgs, add_generation_prompt=gen, add_vision_id=vid) == want
    with pytest.raises(ValueError, match="first message"):
        apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(ValueError, match="unknown role"):
        apply_chat_template([{"role": "robot", "content": "a"}])


def test_video_identity_resize_and_timestamps(proc, ref):
    """64x64 frames need no resize (4*64*64 >= 4096), so this checks the reference video path
    with no stand-in kernel except torchvision's normalize; 5 pre-sampled frames exercise
    the odd-T padding and timestamps."""
    rs = np.random.RandomState(5)
    clip = rs.randint(0, 256, (5, 64, 64, 3)).astype(np.uint8)
    meta = {"fps": 6.0, "frames_indices": [0, 3, 6, 9, 12], "total_num_frames": 13}
    text = proc.apply_chat_template(_user({"type": "video"}, {"type": "text", "text": "Describe this image."}))
    ours = proc(text=text, videos=[clip], video_metadata=[meta])
    theirs = ref(text=[text], videos=[clip], video_metadata=[dict(meta)], do_sample_frames=False, return_tensors="pt")
    _compare(ours, theirs)
    assert ours["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert video_timestamps(meta["frames_indices"], 6.0) == [0.25, 1.25, 2.0]
    # the checkpoints' own layout (transformers 4.57, and 5.25 again): the template's
    # start/pad/end triple becomes the per-frame blocks, with no outer start/end pair around
    # them (5.0-5.24 kept one)
    frame = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    expected = "user\n<0.2 seconds>" + frame + "<1.2 seconds>" + frame + "<2.0 seconds>" + frame + "Describe"
    assert expected in proc.decode(ours["input_ids"][0])
    x = ours["pixel_values_videos"].view(3, 2, 2, 2, 2, 3, 2, 16, 16)  # (gt, bh, bw, mh, mw, C, T, ph, pw)
    # frame 5 repeated to fill the last temporal patch
    assert torch.equal(x[2, ..., 0, :, :], x[2, ..., 1, :, :])


def test_bare_video_token_expands_like_the_triple(proc, ref):
    """A prompt with a bare <|video_pad|> (no start/end around it, as servers may write it) gets
    the same per-frame blocks; next to a wrapped video in the same batch, each is replaced in order."""
    rs = np.random.RandomState(7)
    clips = [rs.randint(0, 256, (4, 64, 64, 3)).astype(np.uint8) for _ in range(2)]
    meta = [{"fps": 2.0, "frames_indices": [0, 1, 2, 3], "total_num_frames": 4} for _ in clips]
    wrapped = proc.apply_chat_template(_user({"type": "video"}, {"type": "text", "text": "a"}))
    bare = wrapped.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
    ours = proc(text=[bare, wrapped], videos=clips, video_metadata=meta)
    theirs = ref(text=[bare, wrapped], videos=clips, video_metadata=[dict(m) for m in meta],
                 do_sample_frames=False, padding=True, return_tensors="pt")
    _compare(ours, theirs)
    assert torch.equal(ours["input_ids"][0], ours["input_ids"][1])


def test_video_sampling_and_resize(proc, ref):
    rs = np.random.RandomState(6)
    clip = rs.randint(0, 256, (23, 90, 150, 3)).astype(np.uint8)  # 23 frames at 5 fps -> int(4.6*2) = 9 sampled
    text = proc.apply_chat_template(_user({"type": "text", "text": "Task: x."}, {"type": "video"}))
    ours = proc(text=[text], videos=[clip], video_metadata=[{"fps": 5.0}])
    theirs = ref(text=[text], videos=[clip], video_metadata=[{"fps": 5.0, "total_num_frames": 23}],
                 return_tensors="pt")
    _compare(ours, theirs)
    pv, grid, ts, idx = preprocess_video(clip, 5.0, cfg=proc.video_config)
    assert idx.tolist() == np.linspace(0, 22, 9).round().astype(int).tolist() and grid == (5, 6, 10)
    assert len(ts) == 5 and torch.equal(pv, ours["pixel_values_videos"])


def test_decode_matches_reference(proc, ref):
    text = proc.apply_chat_template(_user({"type": "image"}, {"type": "text", "text": "Héllo wörld, naïve café!"}))
    ids = proc(text=[text, "short"], images=[_img(40, 40)], padding_side="left")["input_ids"]
    for skip in (False, True):
        assert proc.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert proc.decode(ids[0], skip_special_tokens=skip) == ref.decode(ids[0], skip_special_tokens=skip)


def test_errors(proc, tmp_path):
    text = proc.apply_chat_template(_user({"type": "image"}))
    with pytest.raises(ValueError, match="placeholders"):
        proc(text=[text, text], images=[_img(32, 32)])
    with pytest.raises(ValueError, match="placeholders"):
        proc(text=[text], images=[_img(32, 32), _img(32, 32)])
    with pytest.raises(ValueError, match="padding=True"):
        proc(text=["a", "abc def"], padding=False)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen3VLProcessor.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="channels-last"):
        preprocess_images([np.zeros((3, 32, 32, 2), np.uint8)])


def test_config_defaults_follow_transformers_classes():
    img = Qwen3VLPreprocessConfig.from_hf({}, "image")  # Qwen2VLImageProcessor defaults
    assert (img.patch_size, img.min_pixels, img.max_pixels) == (14, 3136, 1003520)
    vid = Qwen3VLPreprocessConfig.from_hf({}, "video")  # Qwen3VLVideoProcessor defaults
    assert (vid.patch_size, vid.min_pixels, vid.max_pixels, vid.fps) == (16, 131072, 786432, 2)
    real = Qwen3VLPreprocessConfig.from_hf(PREPROCESSOR, "image")
    assert real == Qwen3VLPreprocessConfig(rescale_factor=0.00392156862745098)


def test_class_default_config_per_channel_stats():
    """Class defaults (patch 14, CLIP mean/std differing per channel) against
    the reference class defaults."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = [_img(100, 150, 7), _img(30, 40, 8, "RGBA")]
    pv, grid = preprocess_images(images, Qwen3VLPreprocessConfig.from_hf({}, "image"))
    r = Qwen2VLImageProcessorPil()(images, return_tensors="pt")
    assert pv.shape[1] == 3 * 2 * 14 * 14
    assert torch.equal(pv, r["pixel_values"]) and torch.equal(grid, r["image_grid_thw"])


def test_mixed_batch_images_and_videos(proc, ref):
    rs = np.random.RandomState(9)
    clips = [rs.randint(0, 256, (8, 48, 80, 3)).astype(np.uint8), rs.randint(0, 256, (4, 64, 64, 3)).astype(np.uint8)]
    meta = [{"fps": 4.0, "frames_indices": list(range(0, 16, 2)), "total_num_frames": 16},
            {"fps": 1.0, "frames_indices": [0, 1, 2, 3], "total_num_frames": 4}]
    texts = [proc.apply_chat_template(_user({"type": "video"}, {"type": "image"}, {"type": "text", "text": "a"})),
             proc.apply_chat_template(_user({"type": "image"}, {"type": "video"}))]
    images = [_img(60, 200, 1), _img(300, 90, 2)]
    ours = proc(text=texts, images=images, videos=clips, video_metadata=meta, padding_side="left")
    theirs = ref(text=texts, images=images, videos=clips, video_metadata=[dict(m) for m in meta],
                 do_sample_frames=False, padding=True, padding_side="left", return_tensors="pt")
    _compare(ours, theirs)
    as_np = proc(text=texts, images=images, videos=clips, video_metadata=meta, return_tensors="np")
    assert isinstance(as_np["input_ids"], np.ndarray) and isinstance(as_np["pixel_values_videos"], np.ndarray)


def test_video_processor_variants(ref):
    """Video preprocessing alone: PIL frame lists, unknown fps (24 assumed),
    the per-frame pixel cap."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    rs = np.random.RandomState(11)
    clip = rs.randint(0, 256, (50, 120, 72, 3)).astype(np.uint8)
    frames = [Image.fromarray(f) for f in clip]
    for cap in (False, True):
        cfg_d = {**VIDEO_PREPROCESSOR, "size": {"longest_edge": 8 * 64 * 32 * 32, "shortest_edge": 4096}}
        vp = Qwen3VLVideoProcessor(**cfg_d, cap_pixels_per_frame=cap)
        cfg = Qwen3VLPreprocessConfig.from_hf({**cfg_d, "cap_pixels_per_frame": cap, "max_video_tokens": 20}, "video")
        vp.max_video_tokens = 20  # small cap so that it binds
        r = vp(videos=[clip], return_metadata=True, return_tensors="pt")  # no metadata: fps 24 assumed
        for video in (clip, frames):
            pv, grid, ts, idx = preprocess_video(video, None, cfg=cfg)
            assert torch.equal(pv, r["pixel_values_videos"]) and list(grid) == r["video_grid_thw"][0].tolist()
            assert idx.tolist() == list(r["video_metadata"][0].frames_indices)
            assert ts == ref._calculate_timestamps(list(idx), 24, 2)


def test_placeholders_without_media_raise(proc, ref):
    for item in ({"type": "image"}, {"type": "video"}):
        text = proc.apply_chat_template(_user(item, {"type": "text", "text": "x"}))
        for call in (lambda: proc(text=[text]), lambda: ref(text=[text], return_tensors="pt")):
            with pytest.raises(ValueError, match="placeholder|tokens in the text"):
                call()


def test_system_and_assistant_turns_ids(proc, ref):
    msgs = [{"role": "system", "content": "You are a robot."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Task: pick up the cup."}]},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "again"}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a robot.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                         "<|im_start|>assistant\n")
    image = _img(96, 128, 4)
    _compare(proc(text=text, images=[image]), ref(text=[text], images=[image], return_tensors="pt"))
