"""
Benchmark of the pipeline's perception (yolos.py, vitpose.py): frames/s of YOLOS person detection
and ViTPose top-down pose (one box per frame), end to end (pre-processing + model + post-processing)
and the model alone.

Without checkpoints it builds random-weight models in the Hugging Face layout (config.json +
model.safetensors) from the presets below (the architectures of the public checkpoints) and loads
them through the normal loader; with --detector / --pose it times the real checkpoint folders.

  python bench/perception.py                                    # CPU, small sizes (tiny-like models, small frames)
  python bench/perception.py --real --device cuda --dtype bf16 --frames 32 --workers 8  # GPU, 480p frames
  python bench/perception.py --detector ckpt/yolos-small --pose ckpt/vitpose-plus-base --device cuda --frames 64
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vit  # noqa: E402
import vitpose  # noqa: E402
import yolos  # noqa: E402

# Architectures of the public checkpoints (hidden, layers, heads, ...); weights are random here.
YOLOS_PRESETS = {
    "yolos-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                       image_size=[800, 1333], use_mid_position_embeddings=False),
    "yolos-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        image_size=[800, 1333], use_mid_position_embeddings=False),
    "yolos-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=[800, 1344], use_mid_position_embeddings=True),
}
POSE_PRESETS = {
    "vitpose-base-simple": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitpose-plus-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, num_experts=6,
                               part_features=96),
    "vitpose-plus-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_experts=6,
                              part_features=192),
    "vitpose-plus-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_experts=6,
                               part_features=256),
}


def write_random_checkpoint(model, folder, config, renames, seed=0):
    """Random weights for `model` saved under the HF names, with its config.json: a stand-in
    checkpoint folder."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t = torch.randn(t.shape, generator=g) * 0.02 + (1.0 if "layernorm" in name and "weight" in name else 0)
            if "running_var" in name:
                t = t.abs() + 1.0
        sd[vit.hf_key(name, renames)] = t.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def random_yolos(folder, preset, shortest, longest):
    cfg = {"model_type": "yolos", "patch_size": 16, "num_detection_tokens": 100,
           "id2label": {str(i): ("person" if i == 1 else f"c{i}") for i in range(91)},
           **YOLOS_PRESETS[preset]}
    c = yolos.YolosConfig.from_hf(cfg)
    renames = vit.TRUNK_RENAMES + yolos.YOLOS_MLP_RENAMES
    write_random_checkpoint(yolos.Yolos(c), folder, cfg, renames)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": shortest, "max_size": longest}))


def random_vitpose(folder, preset):
    bb = {"image_size": [256, 192], "patch_size": [16, 16], "out_indices": [-1],
          **POSE_PRESETS[preset]}
    cfg = {"model_type": "vitpose", "backbone_config": bb, "use_simple_decoder": True,
           "id2label": {str(i): f"kp{i}" for i in range(17)}}
    write_random_checkpoint(vitpose.ViTPose(vitpose.ViTPoseConfig.from_hf(cfg)), folder, cfg,
                            vit.TRUNK_RENAMES)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up: allocations, position-embedding cache, kernel selection
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="",
                    help="YOLOS checkpoint folder (default: random weights of a preset)")
    ap.add_argument("--pose", default="",
                    help="ViTPose checkpoint folder (default: random weights of a preset)")
    ap.add_argument("--real", action="store_true",
                    help="real sizes: yolos-small, vitpose-plus-base, 480x854 frames")
    ap.add_argument("--det-preset", default="", help=f"one of {sorted(YOLOS_PRESETS)}")
    ap.add_argument("--pose-preset", default="", help=f"one of {sorted(POSE_PRESETS)}")
    ap.add_argument("--height", type=int, default=0,
                    help="frame height (default 120, or 480 with --real)")
    ap.add_argument("--width", type=int, default=0,
                    help="frame width (default 160, or 854 with --real)")
    ap.add_argument("--shortest-edge", type=int, default=0,
                    help="YOLOS resize (default 128, or 800 with --real)")
    ap.add_argument("--longest-edge", type=int, default=0,
                    help="YOLOS resize cap (default 224, or 1333)")
    ap.add_argument("--frames", type=int, default=4, help="frames per call (= batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--workers", type=int, default=1,
                    help="threads for the detector's Pillow resizes")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    H, W = a.height or (480 if a.real else 120), a.width or (854 if a.real else 160)
    short, long_ = a.shortest_edge or (800 if a.real else 128), a.longest_edge or (1333 if a.real else 224)
    det_preset = a.det_preset or ("yolos-small" if a.real else "yolos-tiny")
    pose_preset = a.pose_preset or ("vitpose-plus-base" if a.real else "vitpose-plus-small")

    tmp = Path(tempfile.mkdtemp(prefix="bench_perception_"))
    det_path, pose_path = a.detector, a.pose
    if not det_path:
        det_path = tmp / "det"
        random_yolos(det_path, det_preset, short, long_)
    if not pose_path:
        pose_path = tmp / "pose"
        random_vitpose(pose_path, pose_preset)
    det = yolos.YolosDetector(det_path, a.device, dtype, batch_size=a.frames, workers=a.workers)
    pose = vitpose.ViTPoseEstimator(pose_path, a.device, dtype, batch_size=a.frames)

    rs = np.random.RandomState(0)
    frames = [rs.randint(0, 256, (H, W, 3)).astype(np.uint8) for _ in range(a.frames)]
    boxes = np.tile([[W * 0.3, H * 0.1, W * 0.6, H * 0.95]], (a.frames, 1))
    c = det.model.c
    pixels, _ = yolos.yolos_preprocess(frames, c, a.device)
    crops, _, _ = pose.preprocess(np.stack(frames), np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1))
    with torch.no_grad():
        t_det = timed(lambda: det(frames), a.device, a.repeats)
        t_det_model = timed(lambda: det.model(pixels.to(dtype)), a.device, a.repeats)
        t_pose = timed(lambda: pose(frames, boxes), a.device, a.repeats)
        t_pose_model = timed(lambda: pose.model(crops.to(dtype), 0), a.device, a.repeats)
    n = a.frames
    print(f"device {a.device} {a.dtype} threads {torch.get_num_threads()}, {n} frames of {H}x{W}")
    print(f"detector {a.detector or det_preset + ' (random weights)'}: input {tuple(pixels.shape[2:])}, "
          f"{n / t_det:.1f} frames/s end to end, {n / t_det_model:.1f} frames/s model only")
    print(f"pose {a.pose or pose_preset + ' (random weights)'}: crops {pose.model.c.image_size}, "
          f"{n / t_pose:.1f} frames/s end to end, {n / t_pose_model:.1f} frames/s model only")


if __name__ == "__main__":
    main()
