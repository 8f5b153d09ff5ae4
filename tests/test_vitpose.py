"""vitpose.py against transformers' ViTPose / ViTPose+ (MoE) on tiny random checkpoints written by
save_pretrained: heatmaps within 1e-4, crops equal, decoded keypoints within 1e-4, config.json and
preprocessor_config.json read as transformers reads them or refused, a float32 head under a bf16
backbone. scipy is not in the venv: its two calls in the reference ViTPose processor are replaced
by test-local stand-ins, and both those and ours are checked against values computed once by
scipy 1.17.1."""

import json
import math

import numpy as np
import pytest
import torch

import vitpose

transformers = pytest.importorskip("transformers")
from transformers.models.vitpose import image_processing_pil_vitpose as ref_vitpose_proc  # noqa: E402

# scipy.ndimage.gaussian_filter(h, sigma=0.8, radius=(5, 5), axes=(0, 1)) of
# RandomState(0).rand(2, 6, 5) * 2 - 0.5 (float32), and affine_transform(img, [[0.77, 0, -1.3], [0,
# 1.31, 0.45], [0, 0, 1]], output_shape=(8, 6), order=1) of the next RandomState(0).randint(0, 256,
# (7, 9)) uint8 image, both by scipy 1.17.1 / numpy 2.4.6.
SCIPY_GAUSS = [
    0.6925169229507446, 0.7666964530944824, 0.8100148439407349, 0.6968125104904175,
    0.4503263831138611,
    0.7283077239990234, 0.7167989611625671, 0.9089632630348206, 0.8741125464439392,
    0.4408818185329437,
    0.6000146269798279, 0.5587798357009888, 0.8299955129623413, 0.8924704790115356,
    0.46186286211013794,
    0.3875367045402527, 0.41576632857322693, 0.7519406080245972, 0.8871749043464661,
    0.6564560532569885,
    0.7538938522338867, 0.6312716007232666, 0.7488656640052795, 0.7251339554786682,
    0.41792023181915283,
    0.7255792617797852, 0.56203693151474, 0.7761832475662231, 0.6557731628417969,
    0.3431324362754822,
    0.40271705389022827, 0.6601079106330872, 0.653750479221344, 0.5106551051139832,
    0.13860966265201569,
    0.5144082307815552, 0.6338743567466736, 0.6919203400611877, 0.6795487999916077,
    0.5786294341087341,
    0.4567211866378784, 0.44460856914520264, 0.4460188150405884, 0.39109891653060913,
    0.5293938517570496,
    0.5078470706939697, 0.3390348553657532, 0.26572638750076294, 0.15540041029453278,
    0.21825431287288666,
    0.45436155796051025, 0.4683118462562561, 0.4448220431804657, 0.16719932854175568,
    0.03099801391363144,
    0.21471823751926422, 0.44103124737739563, 0.3952837288379669, 0.21479329466819763,
    0.052525728940963745]
SCIPY_AFFINE = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 123, 148, 133, 68, 56, 95, 175, 118, 189, 58,
                79, 177, 125, 90, 142, 73, 138, 127, 145, 117, 63, 105, 105, 153, 148, 144, 45, 115,
                86, 198, 101, 144, 129, 92, 129, 216]


def _scipy_inputs():
    rs = np.random.RandomState(0)
    hm = (rs.rand(2, 6, 5).astype(np.float32) * 2 - 0.5)
    img = rs.randint(0, 256, size=(7, 9)).astype(np.uint8)
    return hm, img


# Test-only stand-ins for the two scipy.ndimage calls of the reference ViTPose processor (scipy is
# not in the venv), written directly from scipy's definitions and checked against SCIPY_* above;
# injected into the reference module.
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
    monkeypatch.setattr(ref_vitpose_proc, "affine_transform", standin_affine_transform,
                        raising=False)


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


# --------------------------------------------------------------------------------------------------
# scipy primitives


def test_scipy_primitives():
    hm, img = _scipy_inputs()
    want = np.array(SCIPY_GAUSS, np.float32).reshape(2, 6, 5)
    np.testing.assert_array_equal(vitpose.gaussian_blur(torch.from_numpy(hm), 0.8, 5).numpy(), want)
    np.testing.assert_array_equal(np.stack([standin_gaussian_filter(h, 0.8, (5, 5), (0, 1)) for h in hm]), want)
    want = np.array(SCIPY_AFFINE, np.uint8).reshape(8, 6)
    M = np.array([[0.77, 0.0, -1.3], [0.0, 1.31, 0.45], [0, 0, 1.0]])
    np.testing.assert_array_equal(standin_affine_transform(img, M, (8, 6), 1), want)
    frames = torch.from_numpy(np.repeat(img[None, :, :, None], 3, -1))  # (1, 7, 9, 3)
    ours = vitpose.warp_crops(frames, ([1.31], [0.45], [0.77], [-1.3]), (8, 6))
    np.testing.assert_array_equal(ours[0, ..., 1].numpy(), want)


# --------------------------------------------------------------------------------------------------
# ViTPose / ViTPose+


def _save_vitpose(tmp_path, simple=True, experts=1, seed=0):
    bc = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16],
                                            hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_experts=experts,
                                            part_features=8, out_indices=[2])
    cfg = transformers.VitPoseConfig(backbone_config=bc, use_simple_decoder=simple, num_labels=17)
    torch.manual_seed(seed)
    model = transformers.VitPoseForPoseEstimation(cfg).eval()
    _randomize(model, seed, std=0.2)
    model.save_pretrained(tmp_path)
    proc = ref_vitpose_proc.VitPoseImageProcessorPil(size={"height": 64, "width": 48})
    proc.save_pretrained(tmp_path)
    return model, proc


@pytest.mark.parametrize("simple,experts,index",
                         [(True, 1, 0), (False, 1, 0), (True, 3, 0), (True, 3, 2)])
def test_vitpose_parity(tmp_path, ref_scipy, simple, experts, index):
    ref, proc = _save_vitpose(tmp_path, simple, experts)
    pose = vitpose.ViTPoseEstimator(tmp_path, dataset_index=index)
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
    # The chain below runs the reference model on the estimator's batches (the two 60x80 frames,
    # then the 45x30 one): DARK's Newton step amplifies the ~1e-6 batch-composition noise of
    # random-weight (noisy) heatmaps to ~1e-2 px.
    with torch.no_grad():
        grouped = torch.cat([ref(inputs["pixel_values"][s], dataset_index=None if ds is None else ds[s]).heatmaps
                             for s in (slice(0, 2), slice(2, 3))])
    out = type(out)(heatmaps=grouped)
    want = proc.post_process_pose_estimation(out, boxes=xywh)
    # decoding alone on the reference heatmaps, then the whole chain through the
    # PoseEstimator interface
    center, scale = vitpose.box_to_center_scale(np.array([b[0] for b in xywh]), c)
    kp0, sc0 = vitpose.heatmaps_to_keypoints(out.heatmaps, center, scale)
    kp, sc = pose(images, xyxy)
    for n in range(len(images)):
        np.testing.assert_allclose(kp0[n], want[n][0]["keypoints"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(kp[n], want[n][0]["keypoints"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(sc[n], want[n][0]["scores"].numpy(), atol=1e-4, rtol=0)


def test_vitpose_mixed_experts_and_bad_boxes(tmp_path):
    ref, _ = _save_vitpose(tmp_path, True, 3)
    model = vitpose.ViTPose.from_pretrained(tmp_path)
    x = torch.randn(3, 3, 64, 48)
    with torch.no_grad():
        for ds in (torch.tensor([2, 0, 1]), torch.tensor([1, 1, 1])):  # a mixed batch, then one expert for all
            torch.testing.assert_close(model(x, ds), ref(x, dataset_index=ds).heatmaps, atol=1e-4,
                                       rtol=0)
    with pytest.raises(ValueError, match="dataset_index"):
        model(x, 3)
    pose = vitpose.ViTPoseEstimator(tmp_path)
    images = _frames(3, [(40, 40)] * 3)
    kp, sc = pose(images, np.array([[1, 1, 20, 30], [5, 5, 5, 9], [np.nan, 0, 3, 3]], float))
    assert kp.shape == (3, 17, 2) and sc.shape == (3, 17)
    assert (sc[0] != 0).any() and not kp[1:].any() and not sc[1:].any()
    same = np.array([[1, 1, 20, 30]] * 3, float)
    np.testing.assert_array_equal(pose(np.stack(images), same)[0], pose(images, same)[0])  # frames as one array


def test_dark_recovers_subpixel_peak():
    """A Gaussian heatmap with a known sub-pixel peak decodes to it (DARK is exact on Gaussians)."""
    c = vitpose.ViTPoseConfig(image_size=(256, 192))
    h, w = 64, 48
    peaks = np.array([[20.3, 30.7], [11.55, 40.2], [33.9, 12.25]])
    yy, xx = np.mgrid[0:h, 0:w]
    hm = np.stack([np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * 2.0 ** 2)) for px, py in peaks])
    center, scale = vitpose.box_to_center_scale(np.array([[100.0, 50.0, 96.0, 128.0]]), c)
    kp, sc = vitpose.heatmaps_to_keypoints(hm[None].astype(np.float32), center, scale)
    s = scale[0] * 200.0
    expect = peaks * s / [w - 1, h - 1] + center[0] - s / 2
    np.testing.assert_allclose(kp[0], expect, atol=0.05 * s[0] / (w - 1))
    assert math.isclose(float(sc[0].max()), 1.0, abs_tol=0.1)


# --------------------------------------------------------------------------------------------------
# preprocessor_config.json and config.json settings: honoured as transformers applies them, or
# refused with an error naming the folder, the key and its value


def _write_pre(folder, pre, cfg=None):
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))


VITPOSE_PRE = [  # settings the reference ViTPose processor applies ...
    {}, {"do_rescale": False}, {"do_normalize": False},
    {"do_rescale": False, "do_normalize": False},
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
    pose = vitpose.ViTPoseEstimator(tmp_path)
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
    ({"normalize_factor": "200"}, "normalize_factor='200'"),
    ({"do_normalize": 1}, "do_normalize=1"),
    ({"image_std": [0.5, 0.5, 0.5, 0.5]}, "image_std=[0.5, 0.5, 0.5, 0.5]"),
    ({"do_normalise": False}, "do_normalise=False"),
    ({"image_processor_type": "YolosImageProcessor"}, "image_processor_type='YolosImageProcessor'")])
def test_vitpose_preprocessor_settings_refused(tmp_path, settings, match):
    cfg = {"model_type": "vitpose",
           "backbone_config": {"model_type": "vitpose_backbone", "image_size": [64, 48]}}
    _write_pre(tmp_path, {"size": {"height": 64, "width": 48}, **settings}, cfg)
    with pytest.raises(ValueError) as e:
        vitpose.ViTPoseEstimator(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: preprocessor_config.json: ") and match in msg, msg


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


@pytest.mark.parametrize("bb", [
    None, {}, {"out_indices": [-2]}, {"out_indices": [0]}, {"out_indices": [1, 3]},
    {"out_features": ["stage1", "stage2"]}, {"out_features": ["stem"]},
    {"out_indices": [2], "out_features": ["stage2"]},
    {"image_size": 48, "patch_size": 8, "mlp_ratio": 2, "num_experts": 2, "part_features": 4,
     "hidden_act": "gelu_new", "layer_norm_eps": 1e-6, "qkv_bias": False,
     "hidden_dropout_prob": 0.1, "initializer_range": 1.0}])
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
    c = vitpose.ViTPoseConfig.from_hf(cfg, {"size": list(_pair(rb.image_size))})
    assert c.out_index == rb.out_indices[-1] % (rb.num_hidden_layers + 1)
    assert (c.image_size, c.patch_size) == (_pair(rb.image_size), _pair(rb.patch_size))
    assert (c.num_keypoints, c.scale_factor, c.use_simple_decoder) == (ref.num_labels, 2, False)
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "mlp_ratio", "num_experts",
              "part_features", "hidden_act", "layer_norm_eps", "qkv_bias", "num_channels"):
        assert getattr(c, k) == getattr(rb, k), k


@pytest.mark.parametrize("bb", [{"out_features": ["stage1"]}, {"out_indices": [0]}])
def test_vitpose_out_stage_parity(tmp_path, bb):
    bc = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16],
                                            hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, **bb)
    cfg = transformers.VitPoseConfig(backbone_config=bc, num_labels=17)
    ref = transformers.VitPoseForPoseEstimation(cfg).eval()
    _randomize(ref, 1, std=0.2)
    ref.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got, want = vitpose.ViTPose.from_pretrained(tmp_path)(x), ref(x).heatmaps
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
        vitpose.ViTPoseConfig.from_hf({"model_type": "vitpose", "backbone_config": bc})
    assert match in str(e.value)


# --------------------------------------------------------------------------------------------------
# precision: bf16 trunks (the pipeline's choice on a GPU), float32 heads and decoding


def test_vitpose_bf16_backbone_keeps_fp32_head(tmp_path):
    _save_vitpose(tmp_path, simple=False)
    f32 = vitpose.ViTPose.from_pretrained(tmp_path)
    b16 = vitpose.ViTPose.from_pretrained(tmp_path, dtype=torch.bfloat16)
    head = [t for t in [*b16.head.parameters(), *b16.head.buffers()] if t.is_floating_point()]
    assert {p.dtype for p in b16.backbone.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in head} == {torch.float32}
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        hm, want = b16(x), f32(x)
    assert hm.dtype == torch.float32
    torch.testing.assert_close(hm, want, atol=0.05 * float(want.abs().max()), rtol=0)
