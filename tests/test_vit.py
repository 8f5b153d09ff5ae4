"""vit.py against transformers (YOLOS, ViTPose, ViTPose+ MoE) on tiny random checkpoints written by save_pretrained:
raw outputs within 1e-4 (in practice bit-equal on CPU), processors' outputs equal, decoded boxes / keypoints within
1e-4, strict loading. scipy is not in the venv: its two calls in the reference ViTPose processor are replaced by
test-local stand-ins, and both those and ours are checked against values computed once by scipy 1.17.1."""

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


def _save_yolos(tmp_path, mid=True, seed=0):
    cfg = transformers.YolosConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                   image_size=[64, 96], num_detection_tokens=10, use_mid_position_embeddings=mid,
                                   id2label={0: "N/A", 1: "person", 2: "dog"})
    torch.manual_seed(seed)
    model = transformers.YolosForObjectDetection(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(tmp_path)
    proc = transformers.YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 112})
    proc.save_pretrained(tmp_path)
    return model, proc


@pytest.mark.parametrize("mid", [True, False])
def test_yolos_parity(tmp_path, mid):
    ref, proc = _save_yolos(tmp_path, mid)
    det = vit.YolosDetector(tmp_path, threshold=0.0)
    assert (det.model.c.shortest_edge, det.model.c.longest_edge, det.model.c.person_label) == (64, 112, 1)
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
    assert (c.shortest_edge, c.longest_edge, c.num_labels, c.person_label) == (512, 864, 2, 1)


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

