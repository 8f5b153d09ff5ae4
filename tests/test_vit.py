"""vit.py against transformers (YOLOS, ViTPose, ViTPose+ MoE) on tiny random checkpoints written by save_pretrained:
raw outputs within 1e-4 (in practice bit-equal on CPU), processors' outputs equal, decoded boxes / keypoints within
1e-4, strict loading. scipy is not in the venv: its two calls in the reference ViTPose processor are replaced by
test-local stand-ins, and both those and ours are checked against values computed once by scipy 1.17.1."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vit

transformers = pytest.importorskip("transformers")
from transformers.models.vitpose import image_processing_pil_vitpose as ref_vitpose_proc  # noqa: E402

# scipy.ndimage.gaussian_filter(h, sigma=0.8, radius=(5, 5), axes=(0, 1)) of RandomState(0).rand(2, 6, 5) * 2 - 0.5
# (float32), and affine_transform(img, [[0.77, 0, -1.3], [0, 1.31, 0.45], [0, 0, 1]], output_shape=(8, 6), order=1)
# of the next RandomState(0).randint(0, 256, (7, 9)) uint8 image, both by scipy 1.17.1 / numpy 2.4.6.
SCIPY_GAUSS = [
    0.6925169229507446, 0.7666964530944824, 0.8100148439407349, 0.6968125104904175, 0.4503263831138611,
    0.7283077239990234, 0.7167989611625671, 0.9089632630348206, 0.8741125464439392, 0.4408818185329437,
    0.6000146269798279, 0.5587798357009888, 0.8299955129623413, 0.8924704790115356, 0.46186286211013794,
    0.3875367045402527, 0.41576632857322693, 0.7519406080245972, 0.8871749043464661, 0.6564560532569885,
    0.7538938522338867, 0.6312716007232666, 0.7488656640052795, 0.7251339554786682, 0.41792023181915283,
    0.7255792617797852, 0.56203693151474, 0.7761832475662231, 0.6557731628417969, 0.3431324362754822,
    0.40271705389022827, 0.6601079106330872, 0.653750479221344, 0.5106551051139832, 0.13860966265201569,
    0.5144082307815552, 0.6338743567466736, 0.6919203400611877, 0.6795487999916077, 0.5786294341087341,
    0.4567211866378784, 0.44460856914520264, 0.4460188150405884, 0.39109891653060913, 0.5293938517570496,
    0.5078470706939697, 0.3390348553657532, 0.26572638750076294, 0.15540041029453278, 0.21825431287288666,
    0.45436155796051025, 0.4683118462562561, 0.4448220431804657, 0.16719932854175568, 0.03099801391363144,
    0.21471823751926422, 0.44103124737739563, 0.3952837288379669, 0.21479329466819763, 0.052525728940963745]
SCIPY_AFFINE = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 123, 148, 133, 68, 56, 95, 175, 118, 189, 58, 79, 177, 125, 90,
                142, 73, 138, 127, 145, 117, 63, 105, 105, 153, 148, 144, 45, 115, 86, 198, 101, 144, 129, 92, 129, 216]


def _scipy_inputs():
    rs = np.random.RandomState(0)
    hm = (rs.rand(2, 6, 5).astype(np.float32) * 2 - 0.5)
    img = rs.randint(0, 256, size=(7, 9)).astype(np.uint8)
    return hm, img


# Test-only stand-ins for the two scipy.ndimage calls of the reference ViTPose processor (scipy is not in the venv),
# written directly from scipy's definitions and checked against SCIPY_* above; injected into the reference module.
def standin_gaussian_filter(a, sigma, radius, axes):
    out = np.asarray(a)
    for ax, r in zip(axes, radius):
        x = np.arange(-r, r + 1)
        k = np.exp(-0.5 / sigma ** 2 * x ** 2)
        k /= k.sum()
        n = out.shape[ax]
        src = np.arange(n)[:, None] + x[None, :]  # (n, 2r+1) source index of each tap
        period = 2 * n
        src = np.mod(src, period)
        src = np.where(src >= n, period - 1 - src, src)  # half-sample reflection
        moved = np.moveaxis(out.astype(np.float64), ax, -1)
        res = (moved[..., src] * k).sum(-1)
        out = np.moveaxis(res, -1, ax).astype(a.dtype)
    return out


def standin_affine_transform(img, M, output_shape, order):
    assert order == 1
    rr, cc = np.meshgrid(np.arange(output_shape[0]), np.arange(output_shape[1]), indexing="ij")
    r = M[0, 0] * rr + M[0, 1] * cc + M[0, 2]
    c = M[1, 0] * rr + M[1, 1] * cc + M[1, 2]
    H, W = img.shape
    inside = (r >= 0) & (r <= H - 1) & (c >= 0) & (c <= W - 1)
    r0, c0 = np.clip(np.floor(r).astype(int), 0, H - 1), np.clip(np.floor(c).astype(int), 0, W - 1)
    r1, c1 = np.minimum(r0 + 1, H - 1), np.minimum(c0 + 1, W - 1)
    tr, tc = r - np.floor(r), c - np.floor(c)
    f = img.astype(np.float64)
    v = (f[r0, c0] * (1 - tr) * (1 - tc) + f[r0, c1] * (1 - tr) * tc + f[r1, c0] * tr * (1 - tc)
         + f[r1, c1] * tr * tc)
    return np.floor(np.where(inside, v, 0) + 0.5).astype(img.dtype)


@pytest.fixture
def ref_scipy(monkeypatch):
    monkeypatch.setattr(ref_vitpose_proc, "gaussian_filter", standin_gaussian_filter, raising=False)
    monkeypatch.setattr(ref_vitpose_proc, "affine_transform", standin_affine_transform, raising=False)


def _randomize(model, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "layernorm" in name and "weight" in name else 0))
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif "running_mean" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _frames(seed, shapes):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8) for h, w in shapes]


# ---------------------------------------------------------------------------------------------------------------
# scipy primitives


def test_scipy_primitives():
    hm, img = _scipy_inputs()
    want = np.array(SCIPY_GAUSS, np.float32).reshape(2, 6, 5)
    np.testing.assert_array_equal(vit.gaussian_blur(torch.from_numpy(hm), 0.8, 5).numpy(), want)
    np.testing.assert_array_equal(np.stack([standin_gaussian_filter(h, 0.8, (5, 5), (0, 1)) for h in hm]), want)
    want = np.array(SCIPY_AFFINE, np.uint8).reshape(8, 6)
    M = np.array([[0.77, 0.0, -1.3], [0.0, 1.31, 0.45], [0, 0, 1.0]])
    np.testing.assert_array_equal(standin_affine_transform(img, M, (8, 6), 1), want)
    frames = torch.from_numpy(np.repeat(img[None, :, :, None], 3, -1))  # (1, 7, 9, 3)
    ours = vit.warp_crops(frames, ([1.31], [0.45], [0.77], [-1.3]), (8, 6))
    np.testing.assert_array_equal(ours[0, ..., 1].numpy(), want)


# ---------------------------------------------------------------------------------------------------------------
# YOLOS


def _save_yolos(tmp_path, mid=True, seed=0, std=0.3):
    cfg = transformers.YolosConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                   image_size=[64, 96], num_detection_tokens=10, use_mid_position_embeddings=mid,
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
    det = vit.YolosDetector(tmp_path, threshold=0.0)
    assert det.model.c.size == {"shortest_edge": 64, "longest_edge": 112} and det.model.c.person_label == 1
    for shapes in ([(50, 70), (50, 70)], [(50, 70), (90, 40), (33, 33)]):  # same size, then padded batches
        images = _frames(1, shapes)
        inputs = proc(images, return_tensors="pt")
        pixels, sizes = vit.yolos_preprocess(images, det.model.c)
        assert torch.equal(pixels, inputs["pixel_values"])  # resize, normalisation and padding are identical
        with ThreadPoolExecutor(2) as pool:
            assert torch.equal(vit.yolos_preprocess(images, det.model.c, pool=pool)[0], pixels)
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
            assert vit.yolos_resize_shape(h, w, s, m) == proc_fn.get_size_with_aspect_ratio_yolos((h, w), s, m)
    c = vit.YolosConfig.from_hf({"model_type": "yolos", "id2label": {"0": "N/A", "1": "person"}},
                                {"size": 512, "max_size": 864})
    assert c.size == {"shortest_edge": 512, "longest_edge": 864} and (c.num_labels, c.person_label) == (2, 1)


def test_checkpoint_errors(tmp_path):
    _save_yolos(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    good = dict(sd)
    del sd["vit.encoder.layer.1.output.dense.weight"]
    sd["vit.extra"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"missing \['vit.encoder.layer.1.output.dense.weight'\].*vit.extra"):
        vit.YolosDetector(tmp_path)
    good["bbox_predictor.layers.2.weight"] = torch.zeros(5, 32)
    save_file(good, path)
    with pytest.raises(ValueError, match=r"bbox_predictor.layers.2.weight has shape \(5, 32\)"):
        vit.YolosDetector(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# ViTPose / ViTPose+


def _save_vitpose(tmp_path, simple=True, experts=1, seed=0):
    bc = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, num_experts=experts,
                                            part_features=8, out_indices=[2])
    cfg = transformers.VitPoseConfig(backbone_config=bc, use_simple_decoder=simple, num_labels=17)
    torch.manual_seed(seed)
    model = transformers.VitPoseForPoseEstimation(cfg).eval()
    _randomize(model, seed, std=0.2)
    model.save_pretrained(tmp_path)
    proc = ref_vitpose_proc.VitPoseImageProcessorPil(size={"height": 64, "width": 48})
    proc.save_pretrained(tmp_path)
    return model, proc


@pytest.mark.parametrize("simple,experts,index", [(True, 1, 0), (False, 1, 0), (True, 3, 0), (True, 3, 2)])
def test_vitpose_parity(tmp_path, ref_scipy, simple, experts, index):
    ref, proc = _save_vitpose(tmp_path, simple, experts)
    pose = vit.ViTPoseEstimator(tmp_path, dataset_index=index)
    images = _frames(2, [(60, 80), (60, 80), (45, 30)])
    xyxy = np.array([[10.3, 5.7, 41.2, 55.9], [-8.0, 20.5, 30.25, 70.0], [3.0, 4.0, 20.0, 12.5]])
    xywh = [[list(map(float, np.r_[b[:2], b[2:] - b[:2]]))] for b in xyxy]
    inputs = proc(images, boxes=xywh, return_tensors="pt")
    c = pose.model.c
    crops = []
    for n, im in enumerate(images):
        crops.append(pose.preprocess(im[None], np.array(xywh[n]))[0])
    torch.testing.assert_close(torch.cat(crops), inputs["pixel_values"], atol=0, rtol=0)  # crops are identical
    ds = torch.full((len(images),), index) if experts > 1 else None
    with torch.no_grad():
        out = ref(inputs["pixel_values"], dataset_index=ds)
        hm = pose.model(inputs["pixel_values"], index)
    assert c.out_index == 2 and hm.shape == (3, 17, 16, 12)
    torch.testing.assert_close(hm, out.heatmaps, atol=1e-4, rtol=0)
    # The chain below runs the reference model on the estimator's batches (the two 60x80 frames, then the 45x30 one):
    # DARK's Newton step amplifies the ~1e-6 batch-composition noise of random-weight (noisy) heatmaps to ~1e-2 px.
    with torch.no_grad():
        grouped = torch.cat([ref(inputs["pixel_values"][s], dataset_index=None if ds is None else ds[s]).heatmaps
                             for s in (slice(0, 2), slice(2, 3))])
    out = type(out)(heatmaps=grouped)
    want = proc.post_process_pose_estimation(out, boxes=xywh)
    # decoding alone on the reference heatmaps, then the whole chain through the PoseEstimator interface
    center, scale = vit.box_to_center_scale(np.array([b[0] for b in xywh]), c)
    kp0, sc0 = vit.heatmaps_to_keypoints(out.heatmaps, center, scale)
    kp, sc = pose(images, xyxy)
    for n in range(len(images)):
        np.testing.assert_allclose(kp0[n], want[n][0]["keypoints"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(kp[n], want[n][0]["keypoints"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(sc[n], want[n][0]["scores"].numpy(), atol=1e-4, rtol=0)


def test_vitpose_mixed_experts_and_bad_boxes(tmp_path):
    ref, _ = _save_vitpose(tmp_path, True, 3)
    model = vit.ViTPose.from_pretrained(tmp_path)
    x = torch.randn(3, 3, 64, 48)
    with torch.no_grad():
        for ds in (torch.tensor([2, 0, 1]), torch.tensor([1, 1, 1])):  # a mixed batch, then one expert for all
            torch.testing.assert_close(model(x, ds), ref(x, dataset_index=ds).heatmaps, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="dataset_index"):
        model(x, 3)
    pose = vit.ViTPoseEstimator(tmp_path)
    images = _frames(3, [(40, 40)] * 3)
    kp, sc = pose(images, np.array([[1, 1, 20, 30], [5, 5, 5, 9], [np.nan, 0, 3, 3]], float))
    assert kp.shape == (3, 17, 2) and sc.shape == (3, 17)
    assert (sc[0] != 0).any() and not kp[1:].any() and not sc[1:].any()
    same = np.array([[1, 1, 20, 30]] * 3, float)
    np.testing.assert_array_equal(pose(np.stack(images), same)[0], pose(images, same)[0])  # frames as one array


def test_dark_recovers_subpixel_peak():
    """A Gaussian heatmap with a known sub-pixel peak decodes to it (DARK is exact on Gaussians)."""
    c = vit.ViTPoseConfig(image_size=(256, 192))
    h, w = 64, 48
    peaks = np.array([[20.3, 30.7], [11.55, 40.2], [33.9, 12.25]])
    yy, xx = np.mgrid[0:h, 0:w]
    hm = np.stack([np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * 2.0 ** 2)) for px, py in peaks])
    center, scale = vit.box_to_center_scale(np.array([[100.0, 50.0, 96.0, 128.0]]), c)
    kp, sc = vit.heatmaps_to_keypoints(hm[None].astype(np.float32), center, scale)
    s = scale[0] * 200.0
    expect = peaks * s / [w - 1, h - 1] + center[0] - s / 2
    np.testing.assert_allclose(kp[0], expect, atol=0.05 * s[0] / (w - 1))
    assert math.isclose(float(sc[0].max()), 1.0, abs_tol=0.1)



# ---------------------------------------------------------------------------------------------------------------
# preprocessor_config.json and config.json settings: honoured as transformers applies them, or
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
    c = vit.load_config(vit.YolosConfig, tmp_path)
    for shapes in ([(50, 70), (50, 70)], [(50, 70), (90, 40), (33, 33)]):
        images = _frames(1, shapes)
        batches = [images]
        if len(set(shapes)) > 1 and not proc.do_pad:  # the reference returns unequal sizes
            with pytest.raises(ValueError, match="do_pad false"):
                vit.yolos_preprocess(images, c)
            batches = [[im] for im in images]
        for ims in batches:
            # uint8 when neither rescaled nor normalised
            want = torch.as_tensor(np.stack(proc(ims)["pixel_values"])).float()
            got, sizes = vit.yolos_preprocess(ims, c)
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert sizes == [i.shape[:2] for i in ims]


@pytest.mark.parametrize("settings,match", [
    ({"size": {"shortest_edge": 64}}, "size={'shortest_edge': 64}"),
    ({"size": {"longest_edge": 64}}, "size="), ({"size": {"height": 0, "width": 80}}, "size="),
    ({"size": {"height": 48, "width": 80, "max_height": 4}}, "size="), ({"size": None}, "size=None"),
    ({"size": 40, "max_size": 99.5}, "max_size=99.5"),
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
        vit.YolosDetector(tmp_path)  # refused before any weight is read
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
    det = vit.YolosDetector(tmp_path, threshold=0.0)
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


VITPOSE_PRE = [  # settings the reference ViTPose processor applies ...
    {}, {"do_rescale": False}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False},
    {"rescale_factor": 0.01, "image_mean": 0.4, "image_std": [0.3, 0.2, 0.1]},
    {"normalize_factor": 150.0}, {"size": [64, 48]},
    # ... and those it reads but never applies, or that concern the caller's arrays
    {"do_resize": True, "resample": 0, "do_pad": True, "pad_size": {"height": 100, "width": 100},
     "do_center_crop": True, "crop_size": {"height": 8, "width": 8}, "do_convert_rgb": True,
     "default_to_square": False, "image_processor_type": "VitPoseImageProcessor"}]


@pytest.mark.parametrize("settings", VITPOSE_PRE, ids=lambda d: ",".join(d) or "defaults")
def test_vitpose_preprocessor_settings_parity(tmp_path, ref_scipy, settings):
    """Crops identical to the reference processor's; keypoints decoded as the reference decodes
    heatmaps, with the centre / scale the crop was taken with (the reference's
    post_process_pose_estimation assumes normalize_factor 200)."""
    ref, _ = _save_vitpose(tmp_path)
    _write_pre(tmp_path, {"size": {"height": 64, "width": 48}, **settings})
    proc = ref_vitpose_proc.VitPoseImageProcessorPil.from_pretrained(tmp_path)
    pose = vit.ViTPoseEstimator(tmp_path)
    image, xywh = _frames(4, [(60, 80)])[0], [10.3, 5.7, 30.9, 50.2]
    want = proc([image], boxes=[[xywh]], return_tensors="pt")["pixel_values"]  # maybe uint8
    crops = pose.preprocess(image[None], np.array([xywh]))[0]
    assert crops.dtype == torch.float32 and torch.equal(crops, want.float())
    with torch.no_grad():
        hm = ref(crops).heatmaps.numpy()
    nf = settings.get("normalize_factor", 200.0)
    center, scale = ref_vitpose_proc.box_to_center_and_scale(xywh, 48, 64, nf)
    kp_want, sc_want = proc.keypoints_from_heatmaps(hm, center[None], scale[None])
    kp, sc = pose([image], np.array([xywh[:2] + [xywh[0] + xywh[2], xywh[1] + xywh[3]]]))
    np.testing.assert_allclose(kp[0], kp_want[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(sc[0], sc_want[0, :, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings,match", [
    ({"do_affine_transform": False}, "do_affine_transform=False"),
    ({"size": {"height": 32, "width": 48}}, "size={'height': 32, 'width': 48} differs"),
    ({"size": {"shortest_edge": 64}}, "size="), ({"size": 64}, "size=64 differs"),
    ({"size": 64, "default_to_square": False}, "size=64 is not"),
    ({"normalize_factor": "200"}, "normalize_factor='200'"), ({"do_normalize": 1}, "do_normalize=1"),
    ({"image_std": [0.5, 0.5, 0.5, 0.5]}, "image_std=[0.5, 0.5, 0.5, 0.5]"),
    ({"do_normalise": False}, "do_normalise=False"),
    ({"image_processor_type": "YolosImageProcessor"}, "image_processor_type='YolosImageProcessor'")])
def test_vitpose_preprocessor_settings_refused(tmp_path, settings, match):
    cfg = {"model_type": "vitpose",
           "backbone_config": {"model_type": "vitpose_backbone", "image_size": [64, 48]}}
    _write_pre(tmp_path, {"size": {"height": 64, "width": 48}, **settings}, cfg)
    with pytest.raises(ValueError) as e:
        vit.ViTPoseEstimator(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: preprocessor_config.json: ") and match in msg, msg


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


@pytest.mark.parametrize("bb", [
    None, {}, {"out_indices": [-2]}, {"out_indices": [0]}, {"out_indices": [1, 3]},
    {"out_features": ["stage1", "stage2"]}, {"out_features": ["stem"]},
    {"out_indices": [2], "out_features": ["stage2"]},
    {"image_size": 48, "patch_size": 8, "mlp_ratio": 2, "num_experts": 2, "part_features": 4,
     "hidden_act": "gelu_new", "layer_norm_eps": 1e-6, "qkv_bias": False, "hidden_dropout_prob": 0.1,
     "initializer_range": 1.0}])
def test_vitpose_config_fields(bb):
    """config.json read as transformers reads it: the stage the head sees (out_indices,
    out_features, the default backbone's stage 4), the sizes and the MLP layout; dropout and init
    are training-only."""
    cfg = {"model_type": "vitpose", "num_labels": 5, "scale_factor": 2, "use_simple_decoder": False}
    if bb is not None:
        cfg["backbone_config"] = {"model_type": "vitpose_backbone", "num_hidden_layers": 3,
                                  "hidden_size": 32, "num_attention_heads": 2, **bb}
    ref = transformers.VitPoseConfig.from_dict(cfg)
    rb = ref.backbone_config
    c = vit.ViTPoseConfig.from_hf(cfg, {"size": list(_pair(rb.image_size))})
    assert c.out_index == rb.out_indices[-1] % (rb.num_hidden_layers + 1)
    assert (c.image_size, c.patch_size) == (_pair(rb.image_size), _pair(rb.patch_size))
    assert (c.num_keypoints, c.scale_factor, c.use_simple_decoder) == (ref.num_labels, 2, False)
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "mlp_ratio", "num_experts",
              "part_features", "hidden_act", "layer_norm_eps", "qkv_bias", "num_channels"):
        assert getattr(c, k) == getattr(rb, k), k


@pytest.mark.parametrize("bb", [{"out_features": ["stage1"]}, {"out_indices": [0]}])
def test_vitpose_out_stage_parity(tmp_path, bb):
    bc = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, **bb)
    cfg = transformers.VitPoseConfig(backbone_config=bc, num_labels=17)
    ref = transformers.VitPoseForPoseEstimation(cfg).eval()
    _randomize(ref, 1, std=0.2)
    ref.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got, want = vit.ViTPose.from_pretrained(tmp_path)(x), ref(x).heatmaps
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bb,match", [
    ({"model_type": "vit"}, "backbone_config.model_type='vit'"),
    ({"out_indices": [4]}, "out_indices=[4]"),
    ({"out_indices": 2}, "out_indices=2"), ({"out_indices": [True]}, "out_indices=[True]"),
    ({"out_features": ["stage9"]}, "out_features=['stage9']"),
    ({"out_indices": [1], "out_features": ["stage2"]}, "disagree"),
    ({"num_channels": 4}, "num_channels=4"),
    ({"hidden_act": "silu"}, "hidden_act 'silu'")])
def test_vitpose_config_refused(bb, match):
    bc = {"model_type": "vitpose_backbone", "num_hidden_layers": 3, **bb}
    with pytest.raises(ValueError) as e:
        vit.ViTPoseConfig.from_hf({"model_type": "vitpose", "backbone_config": bc})
    assert match in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
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
    f32 = vit.YolosDetector(tmp_path, threshold=0.0)
    b16 = vit.YolosDetector(tmp_path, dtype=torch.bfloat16, threshold=0.0)
    (s32, _, box32), (s16, _, box16) = f32.detect(frame, False)[0], b16.detect(frame, False)[0]
    assert len(box32) == len(box16) == 10
    err = (box16 - box32).abs().max().item()
    assert err < 0.1, f"boxes differ by {err:.3f} px"
    torch.testing.assert_close(s16, s32, atol=0.05, rtol=0)  # the class head reads bf16 features
    m = b16.model
    heads = [*m.class_labels_classifier.parameters(), *m.bbox_predictor.parameters()]
    assert {p.dtype for p in m.vit.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in heads} == {torch.float32}
    pixels, _ = vit.yolos_preprocess(frame, m.c)
    with torch.no_grad():
        assert [t.dtype for t in m(pixels)] == [torch.float32, torch.float32]


def test_vitpose_bf16_backbone_keeps_fp32_head(tmp_path):
    _save_vitpose(tmp_path, simple=False)
    f32 = vit.ViTPose.from_pretrained(tmp_path)
    b16 = vit.ViTPose.from_pretrained(tmp_path, dtype=torch.bfloat16)
    head = [t for t in [*b16.head.parameters(), *b16.head.buffers()] if t.is_floating_point()]
    assert {p.dtype for p in b16.backbone.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in head} == {torch.float32}
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        hm, want = b16(x), f32(x)
    assert hm.dtype == torch.float32
    torch.testing.assert_close(hm, want, atol=0.05 * float(want.abs().max()), rtol=0)
