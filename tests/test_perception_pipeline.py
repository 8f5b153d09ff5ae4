# The whole pipeline on its real perception and VLM code paths: `python pipeline.py
# --videos/--manifest ... --detector YOLOS_DIR --pose VITPOSE_DIR --vlm-local QWEN_DIR`
# (pipeline.main in-process) on rendered demo videos, the three folders being tiny random
# checkpoints written here (YOLOS / ViTPose by transformers' save_pretrained, the test-only
# reference; Qwen3-VL in our own format from model.TINY_QWEN). Random models see nothing and say
# nothing useful: the run must still finish, write one status record per video with every stage's
# outcome and reason, and print the attrition table. (1) all random: every segment stops at
# NO_DETECTIONS. (2) the detector's last head layers pinned so every detection token says "person"
# at a fixed box around the walker: the chain goes through the oracle, tracking, ViTPose, the 2D->3D
# fit, the checks, the captioner and the judge; the garbage replies are recorded as unparsed and the
# written clip holds exactly what the models and the fit give. (3) a pinned box too small:
# SMALL_BBOX fails and the default keep mode writes nothing. (4) --device auto places the perception
# models and the local VLM together. CPU only, no network; ~17 s.
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import data
import fit3d
import pipeline
import qwen3vl
import qwen3vl_processor
import shards
import synth
import video
import vitpose
import vlm
import yolos
from model import QWEN3VL_PREPROCESSOR, TINY_QWEN

transformers = pytest.importorskip("transformers")

CHECKS = {"HARD_CUTS", "TOO_SHORT", "BBOX_JUMPS", "SIZE_SPIKES", "IOU_BREAKS", "POSE_JUMPS",
          "LOW_CONFIDENCE", "LOW_COVERAGE", "LOW_MOTION", "SMALL_BBOX", "FIT_COLLAPSE"}
FAST = ["--fit-steps", "20", "--fit-flip-steps", "0", "--no-progress"]


def _randomize(model, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "layernorm" in name and "weight" in name else 0))


def _yolos_dir(path, person_box=None, seed=0):
    """A tiny random YOLOS folder whose labels include "person" (the class the detector keeps).
    person_box: (cx, cy, w, h) normalised; when given, the last layers of both heads are zeroed and
    their biases set so that every detection token says "person" (score ~1) at exactly that box,
    whatever the image."""
    cfg = transformers.YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, image_size=[64, 96],
                                   num_detection_tokens=10, use_mid_position_embeddings=True,
                                   id2label={0: "N/A", 1: "person", 2: "dog"})
    torch.manual_seed(seed)
    model = transformers.YolosForObjectDetection(cfg).eval()
    _randomize(model, seed, 0.3)
    if person_box is not None:
        with torch.no_grad():
            cls, box = model.class_labels_classifier.layers[-1], model.bbox_predictor.layers[-1]
            cls.weight.zero_()
            cls.bias.copy_(torch.tensor([0.0, 12.0, 0.0, 0.0]))  # N/A, person, dog, no-object
            box.weight.zero_()
            box.bias.copy_(torch.logit(torch.tensor(person_box, dtype=torch.float32)))  # sigmoid -> the box
    model.save_pretrained(path)
    transformers.YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 112}).save_pretrained(path)
    return path


def _vitpose_dir(path, seed=0):
    bc = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16],
                                            hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, out_indices=[2])
    torch.manual_seed(seed)
    model = transformers.VitPoseForPoseEstimation(transformers.VitPoseConfig(backbone_config=bc, num_labels=17))
    _randomize(model.eval(), seed, 0.2)
    model.save_pretrained(path)
    from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen3-VL folder in our own format: config.json from TINY_QWEN, the byte-level
    tokenizer, the released preprocessor settings, random weights in model.safetensors."""
    path = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    cfg = qwen3vl.Qwen3VLConfig.from_hf(TINY_QWEN)
    model = qwen3vl.Qwen3VL(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    qwen3vl_processor.byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN3VL_PREPROCESSOR))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two rendered demo videos (30 fps, 10 Hz samples): one clip (44 samples) and two clips spliced
    (a hard cut)."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("vids")
    synth.render_demo_videos(root, num_videos=2)
    return root


@pytest.fixture
def vlm_calls(monkeypatch):
    """Every call of the local Qwen3-VL backend goes through unchanged; its arguments and reply are
    recorded as (number of images, prompt, max_tokens, temperature, reply)."""
    calls, real_call = [], vlm.LocalQwen3VL.__call__

    def recording_call(self, images, prompt, max_tokens, temperature):
        reply = real_call(self, images, prompt, max_tokens, temperature)
        calls.append((len(images), prompt, max_tokens, temperature, reply))
        return reply

    monkeypatch.setattr(vlm.LocalQwen3VL, "__call__", recording_call)
    return calls


def _run(argv, out, capsys):
    rc = pipeline.main(argv + ["--out", str(out)] + FAST)
    printed = capsys.readouterr().out
    assert rc == 0
    return shards.read_records(out / "status" / "shard-00000-of-00001.jsonl"), printed


def _check_record_structure(r):
    """What every status record of a decoded video holds, whatever the perception saw."""
    assert r["status"] in ("OK", "NO_CLIPS") and r["version"] == pipeline.PIPELINE_VERSION
    assert r["config"] == pipeline.config_hash(pipeline.PipelineConfig()) and r["seconds"] > 0
    assert r["decode"]["width"] == 320 and r["decode"]["height"] == 240 and r["decode"]["samples"] >= 40
    segs = r["segments"]
    assert segs and all(g["end"] > g["start"] for g in segs)
    assert [g["start"] for g in segs] == sorted(g["start"] for g in segs)
    for g in segs:
        code = g["status"].split(":")[0]
        assert code in ("TOO_SHORT", "NO_DETECTIONS", "SHORT_RUN", "LIFT_FAIL",
                        "TRACKED"), g["status"]
        if code in ("SHORT_RUN", "LIFT_FAIL", "TRACKED"):  # a candidate pool was built: heuristic (+ oracle)
            assert 1 <= g["candidates"] <= 6 and len(g["heuristic"]) == g["candidates"]
            assert g["start"] <= g["anchor"] < g["end"]
            # more than one candidate: the VLM oracle was asked; a random model's reply
            # is no valid pick
            assert ("oracle" in g) == (g["candidates"] > 1)
            if "oracle" in g:
                assert g["oracle"]["chosen"] is None and g["oracle"]["error"] is None
                assert isinstance(g["oracle"]["raw"], str) and g["picker"] == "heuristic"
        if code == "TRACKED":
            assert set(g["checks"]) == CHECKS
            assert sorted(g["issues"]) == sorted(k for k, v in g["checks"].items() if not v["ok"])
            assert g["prog_good"] == (not g["issues"])
            # garbage replies: no caption, no verdict (unparsed, not a transport error), so never
            # vlm_good / strict
            assert g["caption"]["text"] is None and g["caption"]["error"] == "EMPTY_CAPTION"
            j = g["judge"]
            assert not j["judged"] and j["error"] is None and isinstance(j["raw"], str) and j["attempts"] == 1
            assert not j["tracking_consistent"] and not j["motion_matches"]
            assert not g["vlm_good"] and not g["strict"]
    assert r["reason"] == ("" if r["status"] == "OK" else ";".join(pipeline._segment_reasons(r)))
    # clips: exactly the written clips; every other tracked segment's clip is in
    # rejected, with a reason
    assert r["clips"] == [g["clip_id"] for g in segs if g.get("written")] and len(r["clips"]) == r["written"]
    assert sorted(r["clips"] + [x["clip_id"] for x in r["rejected"]]) == \
        sorted(g["clip_id"] for g in segs if g["status"] == "TRACKED")
    assert all(x["reason"] for x in r["rejected"])


def test_random_perception_and_vlm_run_to_the_end(videos, qwen_dir, tmp_path, capsys, vlm_calls):
    det, pose = _yolos_dir(tmp_path / "yolos"), _vitpose_dir(tmp_path / "vitpose")
    out = tmp_path / "out"
    records, printed = _run(["--videos", str(videos), "--detector", str(det), "--pose", str(pose),
                             "--vlm-local", str(qwen_dir)], out, capsys)
    assert sorted(r["video_id"] for r in records) == ["jog__demo-jog-000", "walk__demo-walk-000"]
    for r in records:
        _check_record_structure(r)
    spliced = next(r for r in records if r["video_id"].startswith("jog"))
    assert len(spliced["cuts"]) == 1 and [g["start"] for g in spliced["segments"]] == [0, spliced["cuts"][0]]
    # this random YOLOS gives "person" at most ~0.03 (measured), far under det_conf 0.3:
    # every segment stops at NO_DETECTIONS, nothing reaches the VLM, nothing is written, and
    # the table says so
    segs = [g for r in records for g in r["segments"]]
    assert len(segs) == 3 and all(g["status"] == "NO_DETECTIONS" for g in segs)
    assert all(r["status"] == "NO_CLIPS" and r["written"] == 0 and not r["clips"] for r in records)
    assert spliced["reason"] == "NO_DETECTIONS;NO_DETECTIONS" and vlm_calls == []
    assert not (out / "clips").exists() and not (out / "index.jsonl").exists()
    assert printed.endswith(pipeline.summarize(records) + "\n")
    assert "videos: 2" in printed
    assert "      2  NO_CLIPS\n" in printed and "      3  NO_DETECTIONS" in printed


def test_pinned_detector_reaches_pose_fit_checks_and_judge(videos, qwen_dir, tmp_path, capsys,
                                                           vlm_calls):
    # one fixed box around the walker's whole path (from the render's ground truth), in
    # normalised cx, cy, w, h
    vid = next(videos.rglob("demo-walk-000.mp4"))
    gt = synth.load_ground_truth(vid)["boxes"][:, 0]  # (F, 4) target person
    (x1, y1), (x2, y2) = gt[:, :2].min(0), gt[:, 2:].max(0)
    W, H = 320, 240
    box = [(x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H]
    det, pose = _yolos_dir(tmp_path / "yolos", person_box=box), _vitpose_dir(tmp_path / "vitpose")
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"video": str(vid), "video_id": "walk0", "action_class": "walk",
                                    "description": "Walk forward."}) + "\n")
    out = tmp_path / "out"
    records, printed = _run(["--manifest", str(manifest), "--detector", str(det), "--pose", str(pose),
                             "--vlm-local", str(qwen_dir), "--keep", "all"], out, capsys)
    assert len(records) == 1
    r = records[0]
    _check_record_structure(r)
    T = r["decode"]["samples"]
    (g,) = r["segments"]
    # 10 identical person boxes per frame: 6 candidates, the oracle asked (garbage -> heuristic),
    # IoU 1 everywhere, so the first candidate is tracked through the whole video, posed, lifted,
    # checked, captioned and judged
    assert g["status"] == "TRACKED" and g["candidates"] == 6 and g["chosen"] == 0 and g["attempt"] == 0
    assert g["run"] == [0, T] and g["checks"]["TOO_SHORT"]["value"] == T
    assert g["checks"]["SMALL_BBOX"]["value"] == pytest.approx((x2 - x1) * (y2 - y1) / (W * H),
                                                               rel=1e-3)
    cfg = pipeline.PipelineConfig()
    # the three VLM calls, in order, with the prompts' image counts and token budgets; the records
    # keep the replies
    assert [(n, mt, temp) for n, _, mt, temp, _ in vlm_calls] == [(1, 1024, 0.0), (cfg.caption_frames, 150, 0.0),
                                                             (cfg.judge_frames, 2048, 0.0)]
    assert [k in c[1] for k, c in zip(("numbered bounding boxes", "imperative", "skeleton"), vlm_calls)] == [True] * 3
    assert "Walk forward." in vlm_calls[2][1]  # no caption came back: the judge is given the manifest's instruction
    assert g["oracle"]["raw"] == vlm_calls[0][4][:500] and vlm.parse_pick(vlm_calls[0][4], 6) is None
    assert g["caption"]["raw"] == vlm_calls[1][4][:1000] and vlm.parse_caption(vlm_calls[1][4]) is None
    assert g["judge"]["raw"] == vlm_calls[2][4][:2000] and not vlm.parse_verdict(vlm_calls[2][4])["judged"]
    # keep=all writes the clip although the judge failed; the attrition table counts both outcomes
    assert r["status"] == "OK" and r["written"] == 1 and r["clips"] == [g["clip_id"]] and g["written"]
    assert printed.endswith(pipeline.summarize(records) + "\n")
    assert "JUDGE_UNPARSED" in printed and "WRITTEN" in printed
    # the clip holds exactly what the perception models and the fit give on the decoded frames
    clip = data.read_clip(data.clip_path(out, g["clip_id"]))
    boxes = np.tile(np.array([x1, y1, x2, y2], np.float32), (T, 1))
    np.testing.assert_allclose(clip.boxes, boxes, atol=1e-3)
    dec = video.decode_video(vid)
    # the detector's float32 boxes
    kp, sc = vitpose.ViTPoseEstimator(pose)(dec.frames, clip.boxes.astype(np.float64))
    kp_h, sc_h = pipeline.coco_to_h36m(kp, sc)
    np.testing.assert_allclose(json.loads(clip.extra["kp2d_h36m"]), kp_h, atol=0.051)
    np.testing.assert_allclose(json.loads(clip.extra["kp2d_score"]), sc_h, atol=5.1e-4)
    pose3d = fit3d.FitLifter(fit3d.FitConfig(steps=20, flip_steps=0))(kp_h, sc_h, W, H)
    np.testing.assert_allclose(clip.pose3d, pose3d, atol=1e-5)
    assert clip.description == "Walk forward." and clip.extra["description_source"] == "manifest"
    assert clip.extra["vlm_good"] == "False" and clip.extra["strict"] == "False"
    assert json.loads(clip.extra["issues"]) == g["issues"]


def test_tracked_segment_failing_a_check_is_recorded_and_not_kept(videos, qwen_dir, tmp_path,
                                                                  capsys, vlm_calls):
    # a pinned box of 2% of the frame: tracked and judged, but SMALL_BBOX fails; the default keep
    # (strict, as a VLM is given) writes nothing and the record's reason lists the failing check and
    # the unparsed verdict
    vid = next(videos.rglob("demo-walk-000.mp4"))
    det = _yolos_dir(tmp_path / "yolos", person_box=[0.5, 0.5, 0.1, 0.2])
    out = tmp_path / "out"
    records, printed = _run(["--videos", str(vid.parent), "--detector", str(det), "--pose",
                             str(_vitpose_dir(tmp_path / "vitpose")), "--vlm-local", str(qwen_dir)],
                             out, capsys)
    (r,) = records
    _check_record_structure(r)
    (g,) = r["segments"]
    assert g["status"] == "TRACKED" and g["checks"]["SMALL_BBOX"] == {"value": 0.02, "limit": 0.08,
                                                                      "ok": False}
    assert "SMALL_BBOX" in g["issues"] and not g["prog_good"] and not g["written"] and len(vlm_calls) == 3
    assert r["status"] == "NO_CLIPS" and r["written"] == 0
    assert r["reason"] == ";".join(g["issues"] + ["JUDGE_UNPARSED"])
    assert r["clips"] == [] and r["rejected"] == [{"clip_id": g["clip_id"], "reason": r["reason"]}]
    assert not (out / "clips").exists() and "SMALL_BBOX" in printed and "JUDGE_UNPARSED" in printed


def test_device_auto_is_shared_by_perception_and_vlm(monkeypatch, tmp_path):
    """--device auto resolves once: cuda when there is one, for the perception models AND the local
    VLM (which used to stay on the CPU by default); --vlm-device moves the VLM alone. On cuda the
    ViT trunks are bf16 unless --perception-dtype says otherwise (yolos.py and vitpose.py keep their
    heads float32, tests/test_yolos.py, tests/test_vitpose.py); float32 turns TF32 off. Checked
    through pipeline.main with cuda reported present and the model classes replaced by recorders;
    the run stops once the models are built."""
    for cuda, dev in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
        assert pipeline.resolve_devices("auto", "") == (dev, dev)
        assert pipeline.resolve_devices("auto", "cpu") == (dev, "cpu")
        assert pipeline.resolve_devices("cuda:1", "auto") == ("cuda:1", dev)
        assert pipeline.resolve_devices("cpu", "") == ("cpu", "cpu")
    seen = []

    class Built(Exception):
        pass

    def vlm_backend(path, device):
        seen.append(("vlm", device))
        return object()

    def detector(path, device, dtype, **kw):
        seen.append(("det", device, dtype))

    def pose(path, device, dtype, **kw):
        seen.append(("pose", device, dtype))
        raise Built

    monkeypatch.setattr(pipeline, "LocalQwen3VL", vlm_backend)
    monkeypatch.setattr(yolos, "YolosDetector", detector)
    monkeypatch.setattr(vitpose, "ViTPoseEstimator", pose)
    (tmp_path / "a.mp4").write_bytes(b"")
    argv = ["--videos", str(tmp_path), "--out", str(tmp_path / "out"), "--detector", "D",
            "--pose", "P", "--vlm-local", "Q"]
    bf16, f32 = torch.bfloat16, torch.float32
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, cublas.allow_tf32
    for cuda, extra, vlm_dev, dev, dtype in (
            (True, [], "cuda", "cuda", bf16), (False, [], "cpu", "cpu", f32),
            (True, ["--vlm-device", "cpu"], "cpu", "cuda", bf16),
            (True, ["--perception-dtype", "float32"], "cuda", "cuda", f32),
            (False, ["--device", "cuda:1", "--perception-dtype", "bfloat16"], "cuda:1", "cuda:1",
             bf16)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
        seen.clear()
        cudnn.allow_tf32 = cublas.allow_tf32 = True
        try:
            with pytest.raises(Built):
                pipeline.main(argv + extra)
            tf32 = cudnn.allow_tf32, cublas.allow_tf32
        finally:
            cudnn.allow_tf32, cublas.allow_tf32 = saved
        assert seen == [("vlm", vlm_dev), ("det", dev, dtype), ("pose", dev, dtype)], extra
        # float32 trunks also mean no TF32, so that a cuda run computes what a CPU run does
        assert tf32 == ((False, False) if dtype == f32 else (True, True)), extra
