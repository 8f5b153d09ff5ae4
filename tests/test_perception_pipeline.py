# The whole pipeline with its real perception and VLM code paths: `python pipeline.py --videos/--manifest ... --detector
# YOLOS_DIR --pose VITPOSE_DIR --vlm-local QWEN_DIR` (pipeline.main in-process) on rendered demo videos, where the three
# folders are tiny random checkpoints written here (YOLOS / ViTPose by transformers' save_pretrained, the test-only
# reference; Qwen3-VL from our qwen3vl config). Random models see nothing and say nothing useful: the run must still
# finish, write one status record per video with every stage's outcome and reason, record the garbage VLM replies as
# unparsed, and print the attrition table. A second run pins the detector's heads to a fixed "person" box so the chain
# provably goes past tracking into pose, the 2D->3D fit, the checks and the judge. CPU only, no network.
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import data
import pipeline
import qwen3vl
from model import QWEN3VL_PREPROCESSOR, TINY_QWEN

transformers = pytest.importorskip("transformers")

CHECKS = {"HARD_CUTS", "TOO_SHORT", "BBOX_JUMPS", "SIZE_SPIKES", "IOU_BREAKS", "POSE_JUMPS", "LOW_CONFIDENCE",
          "LOW_COVERAGE", "LOW_MOTION", "SMALL_BBOX"}
FAST = ["--fit-steps", "20", "--fit-flip-steps", "0", "--no-progress"]


def _randomize(model, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "layernorm" in name and "weight" in name else 0))


def _yolos_dir(path, person_box=None, seed=0):
    """A tiny random YOLOS folder whose labels include "person" (the class the detector keeps). person_box: (cx, cy,
    w, h) normalised; when given, the last layers of both heads are zeroed and their biases set so that every
    detection token says "person" (score ~1) at exactly that box, whatever the image."""
    cfg = transformers.YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=[64, 96], num_detection_tokens=10, use_mid_position_embeddings=True,
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
    bc = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, out_indices=[2])
    torch.manual_seed(seed)
    model = transformers.VitPoseForPoseEstimation(transformers.VitPoseConfig(backbone_config=bc, num_labels=17))
    _randomize(model.eval(), seed, 0.2)
    model.save_pretrained(path)
    from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen3-VL folder in our own format: config.json from TINY_QWEN, the byte-level tokenizer, the
    released preprocessor settings, random weights in model.safetensors."""
    path = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    cfg = qwen3vl.Qwen3VLConfig.from_hf(TINY_QWEN)
    model = qwen3vl.Qwen3VL(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    qwen3vl.byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN3VL_PREPROCESSOR))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two rendered demo videos (30 fps, 10 Hz samples): one clip (44 samples) and two clips spliced (a hard cut)."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("vids")
    pipeline.render_demo_videos(root, num_videos=2)
    return root


def _run(argv, out, capsys):
    rc = pipeline.main(argv + ["--out", str(out)] + FAST)
    printed = capsys.readouterr().out
    assert rc == 0
    return pipeline.read_records(out / "status" / "shard-00000-of-00001.jsonl"), printed


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
        assert code in ("TOO_SHORT", "NO_DETECTIONS", "SHORT_RUN", "LIFT_FAIL", "TRACKED"), g["status"]
        if code in ("SHORT_RUN", "LIFT_FAIL", "TRACKED"):  # a candidate pool was built: heuristic (+ oracle)
            assert 1 <= g["candidates"] <= 6 and len(g["heuristic"]) == g["candidates"]
            assert g["start"] <= g["anchor"] < g["end"]
            # more than one candidate: the VLM oracle was asked; a random model's reply is no valid pick
            assert ("oracle" in g) == (g["candidates"] > 1)
            if "oracle" in g:
                assert g["oracle"]["chosen"] is None and g["oracle"]["error"] is None
                assert isinstance(g["oracle"]["raw"], str) and g["picker"] == "heuristic"
        if code == "TRACKED":
            assert set(g["checks"]) == CHECKS
            assert g["issues"] == [k for k, v in g["checks"].items() if not v["ok"]]
            assert g["prog_good"] == (not g["issues"])
            # garbage replies: no caption, no verdict (unparsed, not a transport error), so never vlm_good / strict
            assert g["caption"]["text"] is None and g["caption"]["error"] == "EMPTY_CAPTION"
            j = g["judge"]
            assert not j["judged"] and j["error"] is None and isinstance(j["raw"], str) and j["attempts"] == 1
            assert not j["tracking_consistent"] and not j["motion_matches"]
            assert not g["vlm_good"] and not g["strict"]
    assert r["reason"] == ("" if r["status"] == "OK" else ";".join(pipeline._segment_reasons(r)))


def test_random_perception_and_vlm_run_to_the_end(videos, qwen_dir, tmp_path, capsys):
    det, pose = _yolos_dir(tmp_path / "yolos"), _vitpose_dir(tmp_path / "vitpose")
    out = tmp_path / "out"
    records, printed = _run(["--videos", str(videos), "--detector", str(det), "--pose", str(pose),
                             "--vlm-local", str(qwen_dir)], out, capsys)
    assert len(records) == 2 and sorted(r["video_id"] for r in records) == ["jog__demo-jog-000", "walk__demo-walk-000"]
    for r in records:
        _check_record_structure(r)
        assert r["status"] == "NO_CLIPS" and r["written"] == 0  # keep=strict (a VLM is given): the judge never passes
    spliced = next(r for r in records if r["cuts"])
    assert len(spliced["segments"]) == 2 and spliced["segments"][1]["start"] == spliced["cuts"][0]
    print(json.dumps([[g["status"] for g in r["segments"]] for r in records]))  # noqa
    # the attrition table lists the videos and every segment's outcome
    assert "videos: 2" in printed and "NO_CLIPS" in printed
    for code in {c for r in records for c in pipeline._segment_reasons(r)}:
        assert code in printed
    assert not data.list_clips(out) if (out / "index.jsonl").exists() else True


def test_pinned_detector_reaches_pose_fit_checks_and_judge(videos, qwen_dir, tmp_path, capsys):
    # one fixed box around the walker's whole path (from the render's ground truth), in normalised cx, cy, w, h
    vid = next(videos.rglob("demo-walk-000.mp4"))
    gt = pipeline.load_ground_truth(vid)["boxes"][:, 0]  # (F, 4) target person
    x1, y1 = gt[:, :2].min(0)
    x2, y2 = gt[:, 2:].max(0)
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
    (g,) = r["segments"]
    print(json.dumps(g)[:3000])
    assert g["status"] == "TRACKED" and g["candidates"] == 6 and "oracle" in g  # 10 identical boxes, 6 kept
    assert g["run"] == [0, r["decode"]["samples"]]  # IoU 1 every frame: tracked through the whole video
    assert r["status"] == "OK" and r["written"] == 1
    assert "JUDGE_UNPARSED" in printed and "WRITTEN" in printed
    clip = data.read_clip(data.clip_path(out, g["clip_id"]))
    T = r["decode"]["samples"]
    want = np.array([x1, y1, x2, y2], np.float32)
    np.testing.assert_allclose(clip.boxes, np.tile(want, (T, 1)), atol=0.05)
    assert clip.pose3d.shape == (T, 17, 3) and np.isfinite(clip.pose3d).all()
    assert clip.description == "Walk forward." and clip.extra["description_source"] == "manifest"
    assert clip.extra["vlm_good"] == "False" and clip.extra["strict"] == "False"
    assert json.loads(clip.extra["issues"]) == g["issues"]
