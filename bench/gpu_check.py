"""
Checks a machine with one GPU for MIMIC within 8 minutes: each stage runs in its own process under
its own time limit (a crashed or hung stage cannot take the others down) and prints PASS/FAIL with
its figures as it ends. --quick: tiny shapes, few steps, stages in this process (CI, on the CPU).

  env         torch, CUDA, the GPU, bf16, which SDPA kernels run, the six dependencies
  agree       tiny preset, CPU vs GPU in fp32 (TF32 off): features, loss, actions, predict, dtypes
  shapes      mimic-4b shapes, random weights: fp32 vs bf16 (frozen bf16 + autocast), tolerance
  latency     control step, batch 1, 4B shapes, LoRA merged, vision cache: p50/p90, syncs, GPU busy
  trainstep   training step, 4B shapes, batch 8 and 16: samples/s vs 14.6 (2x the released run)
  trainrun    train.py (tiny, LoRA + dropout, --deterministic): run, stop, --resume: the same losses
  evalsample  eval.py and sample.py --rollout on that (trainable-only) checkpoint
  ddp         2 processes vs 1, same global batch: NCCL on 2 GPUs, else 2 gloo ranks sharing the GPU

    PYTHONPATH=. python bench/gpu_check.py                        # JSON to $OUT or --out
    PYTHONPATH=. python bench/gpu_check.py --stages env,agree     # some stages only
    PYTHONPATH=. python bench/gpu_check.py --quick --device cpu   # tiny shapes on the CPU

Needs only the six dependencies (torch with CUDA for the GPU stages); torch 2.4's API suffices.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the root: "train" must be ../train.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGES = ("env", "agree", "shapes", "latency", "trainstep", "trainrun", "evalsample", "ddp")
LIMIT_S = {"env": 60, "agree": 90, "shapes": 150, "latency": 120, "trainstep": 180, "trainrun": 180,
           "evalsample": 120, "ddp": 150}  # seconds per stage
TARGET_SPS = 2 * 14.9e6 / (566 * 3600)  # 2x the released run: 14.9M samples in 566 GPU-hours
FP32_REL = 1e-4  # fp32 CPU vs GPU with TF32 off: the same maths, summed in another order
# bf16 (frozen weights + autocast) vs fp32, same weights: relative L2 error of the features and
# actions. bf16 keeps 8 mantissa bits: a few % after 18 layers is expected, 10% is a wrong dtype.
BF16_REL = 0.10
BF16_PREDICT_DEG = 2.0  # predict() in bf16 vs fp32: median difference per angle, degrees
SMALL = {"image_size": 64, "num_diffusion_layers": 1}
LORA = {**SMALL, "use_lora": True, "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.05,
        "freeze_vision_encoder": True, "freeze_qwen_layers": True, "diffusion_dropout": 0.1}


# --------------------------------------------------------------------------------------------------
# helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a, b):
    """Relative L2 difference of b from a."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


def count_syncs(device, fn):
    """(result, host-device syncs fn made, by torch.cuda.set_sync_debug_mode; None on the CPU)."""
    if device.type != "cuda":
        return fn(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out, sum("synchroniz" in str(w.message) for w in caught)


def frames_for(size, n, seed):
    """n frames with structure (a gradient plus noise), as uint8 arrays."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    base = np.stack([x, y, (x + y) // 2], -1) * (255.0 / max(1, 2 * size))
    return [np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def make_batch(model, batch, seed=0):
    """An encoded training batch (as the DataLoader workers deliver it) + targets, t, noise."""
    from model_io import collate_inputs, encode_angles

    rng = np.random.default_rng(seed)
    enc, S = model.encoder(), model.config.image_size
    boxes = np.tile([S * 0.2, S * 0.1, S * 0.8, S * 0.95], (4, 1))
    items = [model.prepare(frames_for(S, 4, seed + i), boxes, "jumping jacks", f"Do jumping jacks, sample {i}.")
             for i in range(batch)]
    angles = rng.uniform(-1.5, 1.5, (batch, model.config.action_horizon, 22))
    actions = torch.as_tensor(encode_angles(angles), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return {"inputs": collate_inputs(items, enc.pad_token_id), "actions": actions, "state": actions[:, 0].clone(),
            "t": torch.rand(batch, generator=g), "noise": torch.randn(actions.shape, generator=g)}


def loss_of(model, b, device, amp=None):
    amp = model.autocast() if amp is None else amp
    with amp:
        return model(inputs=b["inputs"], actions=b["actions"].to(device), robot_state=b["state"].to(device),
                     timesteps=b["t"].to(device), noise=b["noise"].to(device))["loss"]


def random_model(ctx, dtype, seed=0):
    """The mimic-4b shapes with random weights (bench/vla.py's build_model; frozen weights bf16 when
    dtype is), or with --quick the tiny preset at 64 px with one DiT block."""
    from vla import build_model

    from model import PRESETS, VLAConfig, VLAModel

    torch.manual_seed(seed)
    if not ctx.quick:
        return build_model("mimic-4b", ctx.device, dtype)
    config = VLAConfig(**{**PRESETS["tiny"], **SMALL})
    return VLAModel(config, backbone_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None).to(ctx.device)


def run_script(args, timeout, env=None, cwd=ROOT):
    """Run one of the repo's scripts; raise with its output's tail if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited {r.returncode}:\n" + (r.stdout + r.stderr)[-2500:])
    return r.stdout + r.stderr


def make_dataset(root, n_train=4, T=40, size=64, seed=0):
    """Small clips of smooth random joint motion with noise frames; the last is the val clip."""
    import io

    from PIL import Image

    import data
    import kinematics

    root = Path(root)
    if (root / data.INDEX_FILE).is_file():
        return root
    rng = np.random.default_rng(seed)
    for k in range(n_train + 1):
        t = np.arange(T)[:, None]
        ang = 0.6 * np.sin(0.3 * t + rng.uniform(0, 6, 22)) * rng.uniform(0.2, 1.0, 22)
        pose = kinematics.angles_to_pose3d(ang)
        pose[..., 2] += 3.0
        jpegs = []
        for im in frames_for(size, T, seed + 100 * k):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG")
            jpegs.append(buf.getvalue())
        data.write_clip(root, data.Clip(
            clip_id=f"g{k}", frames_jpeg=jpegs, boxes=np.tile(np.float32([8, 8, size - 8, size - 8]), (T, 1)),
            pose3d=pose.astype(np.float32), angles=kinematics.pose3d_to_angles(pose).astype(np.float32),
            src_frame_index=np.arange(T), src_time=np.arange(T) / 10.0, src_fps=10.0, width=size, height=size,
            action_class="jumping jacks", description="Do jumping jacks.", split="val" if k == n_train else "train"))
    data.write_index(root)
    return root


def train_argv(ctx, data_root, out, config, **flags):
    base = {"data": data_root, "out": out, "model-config": json.dumps(config), "steps": 4, "batch-size": 4,
            "total-batch": 8, "stride": 4, "warmup": 1, "eval-every": 100, "save-every": 2, "num-workers": 1,
            "final-eval-windows": 0, "log-every": 2}
    base.update({k.replace("_", "-"): v for k, v in flags.items()})
    out = [ROOT / "train.py"]
    for k, v in base.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None and v is not False:
            out += [f"--{k}", str(v)]
    return out


def train_losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def device_env(ctx):
    """Environment of child scripts: --device cpu hides the GPUs from them."""
    return {"CUDA_VISIBLE_DEVICES": ""} if ctx.device.type == "cpu" else {}


# --------------------------------------------------------------------------------------------------
# stages: each returns (ok, figures) or raises


def stage_env(ctx):
    import PIL
    import safetensors
    import tokenizers
    import tqdm

    f = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "python": sys.version.split()[0], "numpy": np.__version__, "safetensors": safetensors.__version__,
         "tokenizers": tokenizers.__version__, "pillow": PIL.__version__, "tqdm": tqdm.__version__,
         "cpu_threads": torch.get_num_threads()}
    try:
        import av
        f["pyav"] = av.__version__
    except ImportError:
        f["pyav"] = None  # only sample.py --video and the pipeline need it
    if ctx.device.type != "cuda":
        return True, f
    dev = ctx.device
    p = torch.cuda.get_device_properties(dev)
    f.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
             memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 256, 128, device=dev, dtype=torch.bfloat16)
    runs = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            sync(dev)
            runs[name.lower()] = True
        except RuntimeError:
            runs[name.lower()] = False
    f["sdpa_bf16"] = runs
    return f["bf16"] and (runs.get("flash_attention") or runs.get("efficient_attention")), f


def stage_agree(ctx):
    import copy

    from model import PRESETS, VLAConfig, VLAModel, use_tf32

    dev, cpu = ctx.device, torch.device("cpu")
    use_tf32(False)
    torch.manual_seed(0)
    ref = VLAModel(VLAConfig(**{**PRESETS["tiny"], **(SMALL if ctx.quick else {})})).eval()
    gpu = copy.deepcopy(ref).to(dev)
    b = make_batch(ref, 2)
    f = {}
    with torch.no_grad():
        fa, fb = ref.features(b["inputs"]), gpu.features(b["inputs"])
        f["features_rel"] = rel(fa[0], fb[0])
        f["deep_rel"] = rel(fa[1], fb[1])
        la, lb = loss_of(ref, b, cpu, amp=torch.autocast("cpu", enabled=False)), loss_of(
            gpu, b, dev, amp=torch.autocast(dev.type, enabled=False))
        f["loss_rel"] = abs(float(la) - float(lb)) / abs(float(la))
        kw = dict(inputs=b["inputs"], robot_state=b["state"], compute_loss=False, noise=b["noise"])
        aa, ab = ref(**kw)["actions"], gpu(**kw)["actions"]  # CPU tensors in, the model moves them
        f["actions_rel"] = rel(aa, ab)
    # predict: CPU noise into a GPU model, under predict's own precision (bf16 on CUDA)
    S = ref.config.image_size
    frames, boxes = frames_for(S, 4, 7), np.tile([4.0, 4, S - 4, S - 4], (4, 1))
    state = np.random.default_rng(1).uniform(-1, 1, 22)
    noise = np.random.default_rng(2).standard_normal((16, 44)).astype(np.float32)
    pa = ref.predict(frames, boxes, "wave", "Wave your hand.", state, noise=noise)
    pb = gpu.predict(frames, boxes, "wave", "Wave your hand.", state, noise=noise)
    d = np.degrees(np.abs((pa - pb + np.pi) % (2 * np.pi) - np.pi))
    f["predict_median_deg"], f["predict_max_deg"] = float(np.median(d)), float(d.max())
    # adapters stay fp32 when the frozen backbone is bf16, built on the device or loaded
    lora = VLAConfig(**{**PRESETS["tiny"], **LORA})
    m = VLAModel(lora, backbone_dtype=torch.bfloat16).to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        back = VLAModel.from_pretrained(tmp, device=dev, backbone_dtype=torch.bfloat16)
    wrong = [n for mod in (m, back) for n, p in mod.named_parameters()
             if p.dtype != (torch.float32 if p.requires_grad else torch.bfloat16)]
    f["adapter_dtypes_ok"] = not wrong
    ok = (max(f["features_rel"], f["deep_rel"], f["loss_rel"], f["actions_rel"]) < FP32_REL
          and f["predict_median_deg"] < BF16_PREDICT_DEG and not wrong and np.isfinite(pb).all())
    f["tolerance"] = f"fp32 rel < {FP32_REL}; bf16 predict median < {BF16_PREDICT_DEG} deg"
    return ok, f


def stage_shapes(ctx):
    from model import cast_frozen_

    dev = ctx.device
    name = "tiny" if ctx.quick else "mimic-4b"
    model = random_model(ctx, torch.float32).eval()
    b = make_batch(model, 2)
    kw = dict(inputs=b["inputs"], robot_state=b["state"], compute_loss=False, noise=b["noise"])
    f = {"config": name, "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
         "tokens": b["inputs"]["input_ids"].shape[1]}
    with torch.no_grad():
        vl32, deep32, _ = model.features(b["inputs"])
        act32 = model(**kw)["actions"]
        # as training and serving run it: frozen bf16, autocast
        cast_frozen_(model.qwen_model, torch.bfloat16)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            vl16, deep16, _ = model.features(b["inputs"])
            act16 = model(**kw)["actions"]
    f.update(features_rel=rel(vl32, vl16), deep_rel=rel(deep32, deep16), actions_rel=rel(act32, act16),
             features_rms=float(vl32.double().pow(2).mean().sqrt()), tolerance=f"rel < {BF16_REL}",
             finite=finite(vl32, vl16, deep16, act32, act16))
    ok = f["finite"] and max(f["features_rel"], f["deep_rel"], f["actions_rel"]) < BF16_REL
    return ok, f


def stage_latency(ctx):
    from inference import VisionCache, optimize

    dev = ctx.device
    name = "tiny" if ctx.quick else "mimic-4b"
    model = random_model(ctx, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    model = optimize(model)
    merged = "inference.optimize() (LoRA merged)" if model.config.use_lora else "inference.optimize() (no LoRA)"
    S, n = model.config.image_size, 4 if ctx.quick else 30
    video = frames_for(S, n + 8, 3)
    boxes = np.tile([S * 0.2, S * 0.1, S * 0.8, S * 0.95], (4, 1))
    state = np.zeros(22)
    noise = np.random.default_rng(0).standard_normal((16, 44)).astype(np.float32)
    cache = VisionCache()

    # the robot loop at 10 Hz: the window slides by one frame, 3 of 4 frames are cached
    def call(t):
        return model.predict(video[t - 4:t], boxes, "jumping jacks", "Do jumping jacks.", state, noise=noise,
                             cache=cache)

    for t in range(4, 7):  # warm-up
        call(t)
    ms, outs = [], []
    for t in range(7, 7 + n):
        sync(dev)
        t0 = time.perf_counter()
        outs.append(call(t))
        sync(dev)
        ms.append(1e3 * (time.perf_counter() - t0))
    _, syncs = count_syncs(dev, lambda: call(7 + n))
    f = {"config": name, "lora": merged, "calls": n, "p50_ms": statistics.median(ms),
         "p90_ms": float(np.percentile(ms, 90)), "host_syncs_per_call": syncs,
         "cache_hits": cache.hits, "cache_misses": cache.misses}
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync(dev)
            t0 = time.perf_counter()
            for t in range(8, 13):
                call(t)
            sync(dev)
            wall = time.perf_counter() - t0
        attr = "self_device_time_total" if hasattr(prof.key_averages()[0], "self_device_time_total") else (
            "self_cuda_time_total")  # the name before torch 2.4
        gpu_us = sum(getattr(e, attr) for e in prof.key_averages())
        f.update(profiled_wall_ms=1e3 * wall / 5, profiled_gpu_ms=gpu_us / 1e3 / 5,
                 gpu_busy=gpu_us / 1e6 / max(wall, 1e-9))
    return all(np.isfinite(o).all() for o in outs), f


def stage_trainstep(ctx):
    import qwen3vl_processor
    import train

    dev = ctx.device
    name = "tiny" if ctx.quick else "mimic-4b"
    batches = (2,) if ctx.quick else (8, 16)
    steps = 2 if ctx.quick else 6
    f = {"config": name, "target_samples_per_s": round(TARGET_SPS, 1)}
    ok = True
    model = random_model(ctx, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model.train()
    # frames cross to the device as uint8, not as fp32 patches (with the temporal copy)
    S = model.config.image_size
    fr = torch.zeros(1, S, S, 3, dtype=torch.uint8)
    pv, _ = qwen3vl_processor.pixel_values_from_frames(fr, model.processor.image_config)
    f["frame_bytes_uint8"], f["frame_bytes_fp32_patches"] = fr.nbytes, pv.nbytes
    args = argparse.Namespace(lr=1e-4, weight_decay=0.01)
    for B in batches:
        opt = train.build_optimizer(model, args)  # refuses trainable parameters that are not fp32
        params = [p for g in opt.param_groups for p in g["params"]]
        b = make_batch(model, B, seed=B)
        f[f"b{B}_batch_mib_uint8"] = b["inputs"]["frames"].nbytes / 2**20

        def step():
            loss = loss_of(model, b, dev)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            losses = [step()]  # the first step also allocates AdamW's state
            _, syncs = count_syncs(dev, step)
            times = []
            for _ in range(steps):
                sync(dev)
                t0 = time.perf_counter()
                losses.append(step())
                sync(dev)
                times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError as e:
            f[f"b{B}"] = f"out of memory: {str(e).splitlines()[0]}"
            ok = False
            continue
        finally:
            opt = None  # frees AdamW's state before the next batch size (`step` shares the name)
            model.zero_grad(set_to_none=True)
        vals = [float(v) for v in losses]
        sps = B / statistics.median(times)
        f[f"b{B}_samples_per_s"] = sps
        f[f"b{B}_vs_target"] = sps / TARGET_SPS
        f[f"b{B}_host_syncs_per_step"] = syncs
        f[f"b{B}_loss_first_last"] = (vals[0], vals[-1])
        if dev.type == "cuda":
            f[f"b{B}_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        ok &= all(map(math.isfinite, vals)) and vals[-1] < vals[0]
    best = max((v for k, v in f.items() if k.endswith("_samples_per_s") and k != "target_samples_per_s"),
               default=0.0)
    f["target_met"] = best >= TARGET_SPS
    return ok and (ctx.quick or f["target_met"]), f


def stage_trainrun(ctx):
    """train.py tiny with LoRA + dropout, --deterministic: 4 steps straight, and 2 + --resume 2."""
    root = make_dataset(ctx.work / "data")
    flags = dict(deterministic=True, steps=2 if ctx.quick else 4,
                 save_every=1 if ctx.quick else 2)
    stop = 1 if ctx.quick else 2
    env = device_env(ctx)
    t = ctx.limit  # the stage's own limit bounds them all (the scripts are timed, not hurried)
    run_script(train_argv(ctx, root, ctx.work / "ref", LORA, **flags), t, env)
    shutil.rmtree(ctx.work / "run", ignore_errors=True)
    run_script(train_argv(ctx, root, ctx.work / "run", LORA, stop_after=stop, **flags), t, env)
    log = run_script(train_argv(ctx, root, ctx.work / "run", LORA, resume=True, **flags), t, env)
    a, b = train_losses(ctx.work / "ref"), train_losses(ctx.work / "run")
    diff = max(abs(x[1] - y[1]) / abs(x[1]) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
    f = {"steps": [s for s, _ in b], "losses": [round(v, 6) for _, v in b], "max_rel_diff_vs_uninterrupted": diff,
         "bitwise": a == b, "resumed": "resumed from" in log}
    meta = json.loads((ctx.work / "run" / json.loads((ctx.work / "run" / "latest.json").read_text())["checkpoint"]
                       / "config.json").read_text())
    f["checkpoint_trainable_only"] = meta["trainable_only"]
    f["checkpoint_base"] = meta.get("base")
    ok = f["resumed"] and [s for s, _ in a] == [s for s, _ in b] and all(math.isfinite(v) for _, v in b)
    ok &= diff <= (0.0 if ctx.device.type == "cpu" else 1e-5)
    return ok, f


def stage_evalsample(ctx):
    root = make_dataset(ctx.work / "data")
    run = ctx.work / "run"
    env = device_env(ctx)
    if not (run / "latest.json").is_file():  # trainrun failed or did not run: train one here
        run_script(train_argv(ctx, root, run, LORA, steps=2, save_every=2), ctx.limit, env)
    dev = ["--device", ctx.device.type]
    run_script([ROOT / "eval.py", "--ckpt", run, "--data", root, "--num-windows", "4", "--steps", "16",
                *([] if ctx.quick else ["1", "4"]),
                "--num-workers", "0", "--out", ctx.work / "eval", *dev], ctx.limit, env)
    res = json.loads((ctx.work / "eval" / "eval.json").read_text())
    clip = next(root.rglob("g4.safetensors"))  # the validation clip
    out = run_script([ROOT / "sample.py", "--ckpt", run, "--clip", clip, "--rollout", "16" if ctx.quick else "4",
                      "--out", ctx.work / "sample", *dev], ctx.limit, env)
    roll = json.loads((ctx.work / "sample" / "rollout.json").read_text())
    f = {"eval_windows": res["num_windows"], "eval_rmse_s16": {k: round(res["table"]["16"][k], 2)
                                                               for k in ("model", "static", "linear")},
         "rollout_calls": len(roll["calls_at_frame"]), "rollout_median_ms": roll["latency"]["median_ms"],
         "sample_said": next((line for line in out.splitlines() if line.startswith("rollout:")), "")[:150]}
    ok = math.isfinite(res["table"]["16"]["model"]) and np.isfinite(roll["angles_rad"]).all()
    return ok, f


def stage_ddp(ctx):
    """2 ranks x micro-batch 4 vs 1 process x micro-batch 8 (same global batch): the same losses."""
    root = make_dataset(ctx.work / "data")
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    flags = dict(steps=2 if ctx.quick else 3, save_every=100, lr=1e-5, num_workers=0)
    cfg = {**SMALL, "diffusion_dropout": 0.0}
    env = device_env(ctx)
    args = train_argv(ctx, root, ctx.work / "ddp", cfg, batch_size=4, **flags)
    log = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args], ctx.limit, env)
    run_script(train_argv(ctx, root, ctx.work / "one", cfg, batch_size=8, **flags), ctx.limit, env)
    a, b = train_losses(ctx.work / "ddp"), train_losses(ctx.work / "one")
    diff = max(abs(x[1] - y[1]) / abs(x[1]) for x, y in zip(a, b)) if len(a) == len(b) > 0 else float("inf")
    how = ("nccl, 2 GPUs" if gpus >= 2 else "gloo, 2 ranks sharing one GPU" if gpus == 1 else "gloo on the CPU")
    f = {"ranks": how, "losses_2_ranks": [round(v, 6) for _, v in a], "max_rel_diff_vs_1_process": diff,
         "world_line": next((line.strip() for line in log.splitlines() if "world 2 x" in line), None)}
    f["tolerance"] = 1e-5 if gpus == 0 else 1e-3  # a GPU's bf16 kernels round batches 4 and 8 apart
    return diff < f["tolerance"], f


# --------------------------------------------------------------------------------------------------
# runner


def run_stage(name, ctx):
    t0 = time.perf_counter()
    try:
        ok, figures = globals()[f"stage_{name}"](ctx)
        result = {"stage": name, "status": "PASS" if ok else "FAIL", "figures": figures}
    except Exception as e:  # noqa: BLE001 (a stage's failure is its result)
        result = {"stage": name, "status": "FAIL", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def report(r):
    line = f"{r['status']:4s} {r['stage']:10s} {r['seconds']:6.1f} s"
    if "figures" in r:
        line += "  " + "  ".join(f"{k}={fmt(v)}" for k, v in r["figures"].items())
    if "error" in r:
        line += "  " + r["error"].splitlines()[0][:300]
    print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few steps everywhere (CI on the CPU)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all stages (default 480; --quick 900, "
                                                               "for slow CI machines); a stage that would start "
                                                               "with less than 20 s left is skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_check", help="folder of gpu_check.json "
                                                                                    "(default: $OUT if set)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.budget = args.budget or (900 if args.quick else 480)
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible: only the env stage can say why", flush=True)

    if args.stage:  # child: one stage, its result as JSON
        ctx = argparse.Namespace(device=torch.device(args.device), quick=args.quick, work=Path(args.work),
                                 limit=args.limit)
        if ctx.device.type == "cpu":
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        Path(args.result).write_text(json.dumps(run_stage(args.stage, ctx), default=str))
        return 0

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {args.device}{' --quick' if args.quick else ''}, stages {', '.join(names)}; "
          f"budget {args.budget:.0f} s; scratch {work}", flush=True)
    summary = {"device": args.device, "quick": args.quick, "stages": []}
    t_start = time.perf_counter()
    for name in names:
        left = args.budget - (time.perf_counter() - t_start)
        limit = min(LIMIT_S[name], left)
        if limit < 20:
            r = {"stage": name, "status": "FAIL", "error": f"skipped: {left:.0f} s of the budget left",
                 "seconds": 0.0}
        elif args.quick:  # tiny shapes: in this process (saves a torch start-up per stage)
            r = run_stage(name, argparse.Namespace(device=torch.device(args.device), quick=True, work=work,
                                                   limit=limit))
        else:
            result = work / f"{name}.json"
            cmd = [sys.executable, __file__, "--stage", name, "--device", args.device, "--work", str(work),
                   "--result", str(result), "--limit", str(limit)] + (["--quick"] if args.quick else [])
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
                r = (json.loads(result.read_text()) if result.is_file() else
                     {"stage": name, "status": "FAIL", "error": f"stage process exited {p.returncode} without a "
                      f"result: {(p.stdout + p.stderr)[-1500:]}"})
            except subprocess.TimeoutExpired:
                r = {"stage": name, "status": "FAIL", "error": f"timed out after {limit:.0f} s"}
            r["seconds"] = round(time.perf_counter() - t0, 1)
        report(r)
        summary["stages"].append(r)
        path = out / "gpu_check.json"  # rewritten after every stage: a killed run leaves results
        path.write_text(json.dumps(summary, indent=1, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r["stage"] for r in summary["stages"] if r["status"] != "PASS"]
    print(f"{'PASS' if not bad else 'FAIL'}: {len(names) - len(bad)}/{len(names)} stages passed"
          f"{' (failed: ' + ', '.join(bad) + ')' if bad else ''} in {time.perf_counter() - t_start:.0f} s; "
          f"summary {out / 'gpu_check.json'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
