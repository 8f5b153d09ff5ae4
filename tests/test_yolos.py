"""yolos.py against transformers' YOLOS on tiny random checkpoints written by save_pretrained: raw
outputs within 1e-4 (in practice bit-equal on CPU), processor outputs equal, decoded boxes within
1e-4, every preprocessor_config.json setting honoured or refused, strict loading (vit.load_weights),
float32 heads under a bf16 trunk."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vit
import yolos

transformers = pytest.importorskip("transformers")


def _randomize(model, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "layernorm" in name and "weight" in name else 0))


def _frames(seed, shapes):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8) for h, w in shapes]


# --------------------------------------------------------------------------------------------------
# YOLOS


def _save_yolos(tmp_path, mid=True, seed=0, std=0.3):
    cfg = transformers.YolosConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   intermediate_size=64, image_size=[64, 96],
                                   num_detection_tokens=10, use_mid_position_embeddings=mid,
                                   id2label={0: "N/A", 1: "person", 2: "dog"})
    torch.manual_seed(seed)
    model = transformers.YolosForObjectDetection(cfg).eval()
    _randomize(model, seed, std)
    model.save_pretrained(tmp_path)
    proc = transformers.YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 112})
    proc.save_pretrained(tmp_path)
    return model, proc


@pytest.mark.parametrize("mid", [True, False])
def test_yolos_parity(tmp_path, mid):
    ref, proc = _save_yolos(tmp_path, mid)
    det = yolos.YolosDetector(tmp_path, threshold=0.0)
    assert det.model.c.size == {"shortest_edge": 64,
                                "longest_edge": 112} and det.model.c.person_label == 1
    for shapes in ([(50, 70), (50, 70)], [(50, 70), (90, 40), (33, 33)]):  # same size, then padded batches
        images = _frames(1, shapes)
        inputs = proc(images, return_tensors="pt")
        pixels, sizes = yolos.yolos_preprocess(images, det.model.c)
        assert torch.equal(pixels, inputs["pixel_values"])  # resize, normalisation and padding are identical
        with ThreadPoolExecutor(2) as pool:
            assert torch.equal(yolos.yolos_preprocess(images, det.model.c, pool=pool)[0], pixels)
        with torch.no_grad():
            out = ref(pixel_values=inputs["pixel_values"])
            logits, boxes = det.model(pixels)
        torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, out.pred_boxes, atol=1e-4, rtol=0)
        probs = out.logits.softmax(-1)[..., :-1].max(-1).values
        thr = float(probs.median())  # keeps about half of the queries
        want = proc.post_process_object_detection(out, threshold=thr, target_sizes=sizes)
        det.threshold = thr
        got = det.detect(images, people_only=False)
        people = det(images) if len(set(shapes)) > 1 else det(np.stack(images))  # a list, or one (T, H, W, 3) array
        for w, (s, lab, b), p in zip(want, got, people):
            assert torch.equal(lab, w["labels"]) and 0 < len(lab)
            torch.testing.assert_close(s, w["scores"], atol=1e-5, rtol=0)
            torch.testing.assert_close(b, w["boxes"], atol=1e-4, rtol=0)
            keep = w["labels"] == 1
            np.testing.assert_allclose(p, torch.cat([w["boxes"][keep], w["scores"][keep, None]], 1).numpy(),
                                       atol=1e-4)


def test_yolos_size_rule_and_legacy_config():
    proc_fn = pytest.importorskip("transformers.models.yolos.image_processing_pil_yolos")
    for h, w in [(480, 854), (854, 480), (800, 800), (100, 1000), (720, 1280), (33, 47), (64, 200)]:
        for s, m in [(800, 1333), (512, 864), (64, 112)]:
            assert yolos.yolos_resize_shape(h, w, s, m) == proc_fn.get_size_with_aspect_ratio_yolos((h, w), s, m)
    c = yolos.YolosConfig.from_hf({"model_type": "yolos", "id2label": {"0": "N/A", "1": "person"}},
                                {"size": 512, "max_size": 864})
    assert c.size == {"shortest_edge": 512,
                      "longest_edge": 864} and (c.num_labels, c.person_label) == (2, 1)


def test_checkpoint_errors(tmp_path):
    _save_yolos(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    good = dict(sd)
    del sd["vit.encoder.layer.1.output.dense.weight"]
    sd["vit.extra"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"missing \['vit.encoder.layer.1.output.dense.weight'\].*vit.extra"):
        yolos.YolosDetector(tmp_path)
    good["bbox_predictor.layers.2.weight"] = torch.zeros(5, 32)
    save_file(good, path)
    with pytest.raises(ValueError, match=r"bbox_predictor.layers.2.weight has shape \(5, 32\)"):
        yolos.YolosDetector(tmp_path)


# --------------------------------------------------------------------------------------------------
# preprocessor_config.json settings: honoured as transformers applies them, or
# refused with an error naming the folder, the key and its value

YOLOS_BASE = {"size": {"shortest_edge": 64, "longest_edge": 112}}
YOLOS_CFG = {"model_type": "yolos", "id2label": {"0": "N/A", "1": "person"}}
YOLOS_PRE = [  # settings the reference YOLOS processor applies ...
    {"size": {"height": 48, "width": 80}}, {"size": {"max_height": 70, "max_width": 90}},
    {"size": [40, 72]}, {"size": 40, "max_size": 100}, {"size": 40},
    {"size": {"shortest_edge": 40, "longest_edge": 96}, "max_size": 96},
    {"resample": 0}, {"resample": 1}, {"resample": 3}, {"resample": 4}, {"resample": 5},
    {"do_rescale": False}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False},
    {"rescale_factor": 1 / 127.5, "image_mean": 0.5, "image_std": [0.2, 0.3, 0.4]},
    {"do_resize": False}, {"do_pad": False}, {"pad_and_return_pixel_mask": False},
    {"pad_size": {"height": 128, "width": 128}}, {"pad_size": 128},
    {"pad_size": {"height": 128, "width": 128}, "do_pad": False},
    # ... and those it reads but never applies, or that concern annotations or the caller's arrays
    {"do_center_crop": True, "crop_size": {"height": 8, "width": 8}, "default_to_square": True,
     "format": "coco_panoptic", "do_convert_annotations": False, "do_convert_rgb": True,
     "input_data_format": "channels_last", "image_processor_type": "YolosImageProcessor",
     "feature_extractor_type": "YolosFeatureExtractor", "_processor_class": None}]


def _write_pre(folder, pre, cfg=None):
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))


@pytest.mark.parametrize("settings", YOLOS_PRE, ids=lambda d: ",".join(d))
def test_yolos_preprocessor_settings_parity(tmp_path, settings):
    _write_pre(tmp_path, {**YOLOS_BASE, **settings}, YOLOS_CFG)
    proc = transformers.YolosImageProcessorPil.from_pretrained(tmp_path)  # reads the same file
    c = vit.load_config(yolos.YolosConfig, tmp_path)
    for shapes in ([(50, 70), (50, 70)], [(50, 70), (90, 40), (33, 33)]):
        images = _frames(1, shapes)
        batches = [images]
        if len(set(shapes)) > 1 and not proc.do_pad:  # the reference returns unequal sizes
            with pytest.raises(ValueError, match="do_pad false"):
                yolos.yolos_preprocess(images, c)
            batches = [[im] for im in images]
        for ims in batches:
            # uint8 when neither rescaled nor normalised
            want = torch.as_tensor(np.stack(proc(ims)["pixel_values"])).float()
            got, sizes = yolos.yolos_preprocess(ims, c)
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert sizes == [i.shape[:2] for i in ims]


@pytest.mark.parametrize("settings,match", [
    ({"size": {"shortest_edge": 64}}, "size={'shortest_edge': 64}"),
    ({"size": {"longest_edge": 64}}, "size="), ({"size": {"height": 0, "width": 80}}, "size="),
    ({"size": {"height": 48, "width": 80, "max_height": 4}}, "size="),
    ({"size": None}, "size=None"), ({"size": 40, "max_size": 99.5}, "max_size=99.5"),
    ({"size": {"shortest_edge": 40, "longest_edge": 96}, "max_size": 100}, "max_size=100 disagrees"),
    ({"max_size": 1000}, "max_size=1000 disagrees"),  # the reference would silently keep 1333
    ({"resample": 6}, "resample=6"), ({"resample": "bilinear"}, "resample='bilinear'"),
    ({"do_rescale": "false"}, "do_rescale='false'"), ({"do_normalize": None}, "do_normalize=None"),
    ({"rescale_factor": None}, "rescale_factor=None"),
    ({"image_mean": [0.5, 0.5]}, "image_mean=[0.5, 0.5]"),
    ({"pad_size": {"height": 128}}, "pad_size={'height': 128}"),
    ({"do_flip": True}, "unsupported setting(s) do_flip=True"),
    ({"image_processor_type": "DetrImageProcessor"}, "image_processor_type='DetrImageProcessor'")])
def test_yolos_preprocessor_settings_refused(tmp_path, settings, match):
    _write_pre(tmp_path, {**YOLOS_BASE, **settings}, YOLOS_CFG)
    with pytest.raises(ValueError) as e:
        yolos.YolosDetector(tmp_path)  # refused before any weight is read
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: preprocessor_config.json: ") and match in msg, msg


@pytest.mark.parametrize("settings", [
    {"size": {"max_height": 70, "max_width": 90}, "resample": 3, "rescale_factor": 1 / 127.5,
     "image_mean": 0.5},
    {"size": {"max_height": 70, "max_width": 90}, "do_pad": False, "do_normalize": False}])
def test_yolos_detections_with_settings(tmp_path, settings):
    """The whole detector against the reference with non-default settings. The reference pads the
    four images into one batch; without padding it cannot batch different sizes, so each image is
    its own run (our detector batches the images of one resized shape together)."""
    ref, _ = _save_yolos(tmp_path)
    _write_pre(tmp_path, {**YOLOS_BASE, **settings})
    proc = transformers.YolosImageProcessorPil.from_pretrained(tmp_path)
    det = yolos.YolosDetector(tmp_path, threshold=0.0)
    images = _frames(6, [(50, 70), (90, 40), (50, 70), (33, 33)])
    got = det.detect(images, people_only=False)
    want = []
    for ims in [images] if proc.do_pad else [[im] for im in images]:
        with torch.no_grad():
            out = ref(pixel_values=torch.as_tensor(np.stack(proc(ims)["pixel_values"])).float())
        sizes = [im.shape[:2] for im in ims]
        want += proc.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
    for (s, lab, b), w in zip(got, want, strict=True):
        assert torch.equal(lab, w["labels"]) and len(lab) == 10
        torch.testing.assert_close(s, w["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(b, w["boxes"], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# precision: bf16 trunks (the pipeline's choice on a GPU), float32 heads and decoding


def test_yolos_bf16_trunk_keeps_fp32_heads_and_boxes(tmp_path):
    """The trunk in bf16, here on the CPU: the heads still run in float32, so the boxes on a
    1920x1080 frame stay within 0.1 px of the float32 model's, where a bf16 box head rounds each
    normalised coordinate to 2^-9 (up to ~3.75 px per edge at this width; 4.1 px on these boxes
    with the old all-bf16 model). A mildly random trunk and a box head whose last layer reads the
    features weakly keep the trunk's own bf16 rounding (weight-dependent) out of the comparison."""
    ref, _ = _save_yolos(tmp_path, std=0.05)
    with torch.no_grad():
        last = ref.bbox_predictor.layers[-1]
        last.weight.mul_(0.02)
        last.bias.copy_(torch.logit(torch.tensor([0.5371, 0.4123, 0.3317, 0.6629])))
    ref.save_pretrained(tmp_path)
    frame = _frames(5, [(1080, 1920)])
    f32 = yolos.YolosDetector(tmp_path, threshold=0.0)
    b16 = yolos.YolosDetector(tmp_path, dtype=torch.bfloat16, threshold=0.0)
    (s32, _, box32), (s16, _, box16) = f32.detect(frame, False)[0], b16.detect(frame, False)[0]
    assert len(box32) == len(box16) == 10
    err = (box16 - box32).abs().max().item()
    assert err < 0.1, f"boxes differ by {err:.3f} px"
    torch.testing.assert_close(s16, s32, atol=0.05, rtol=0)  # the class head reads bf16 features
    m = b16.model
    heads = [*m.class_labels_classifier.parameters(), *m.bbox_predictor.parameters()]
    assert {p.dtype for p in m.vit.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in heads} == {torch.float32}
    pixels, _ = yolos.yolos_preprocess(frame, m.c)
    with torch.no_grad():
        assert [t.dtype for t in m(pixels)] == [torch.float32, torch.float32]
