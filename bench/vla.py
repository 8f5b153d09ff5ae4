"""
Benchmark of the MIMIC VLA (model.py): one control step and one training step, with random weights.

  control step: 4 frames (image_size^2: 224, tiny 128) + instruction + current angles -> (16, 22) angles, one Euler
                flow step (the released setting), batch 1. Timed as predict() end to end and split into
                preprocessing (Qwen3-VL processor: chat template, tokenisation, patching), backbone (layers 0..tap)
                and head (one DiT sampling call).
  training step: batch --batch (8) of already-encoded samples (the DataLoader workers do that part), forward, flow
                loss, backward, grad clip and AdamW on the trainable tensors, as train.py runs it.

Configs: tiny (the test preset), mid (a CPU-sized model with the released structure: frozen vision, LoRA r16 on the
LLM, a 4-block DiT) and mimic-4b (the released shapes: 18 of 36 Qwen3-VL-4B layers, LoRA r128, 24-block DiT; built
on the meta device, then materialised with random weights on the target device). No weights or tokenizer are
read: the byte-level test tokenizer stands in for Qwen's (the model's special token ids are set to its ids), so the
text part of the sequence is a little longer than with the real tokenizer (sequence length printed).

Times are medians of --iters runs after --warmup runs (torch.cuda.synchronize around each on GPU). Peak memory:
torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (VmHWM, reset before each measurement).

  python bench/vla.py                                       # tiny + mid, fp32, CPU
  python bench/vla.py --configs mimic-4b --device cuda      # the released shapes in bf16 on a GPU
"""

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qwen3vl  # noqa: E402
from model import BATCH_KEYS, PRESETS, TINY_QWEN, VLAConfig, VLAModel, encode_angles  # noqa: E402

# The byte-level tokenizer's special ids (TINY_QWEN): every benchmark config uses them, so its processor works.
_IDS = {k: TINY_QWEN[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}


def _mid_qwen():
    q = copy.deepcopy(TINY_QWEN)
    q["text_config"].update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=64)
    q["text_config"]["rope_scaling"]["mrope_section"] = [12, 10, 10]  # 3/8, 5/16, 5/16 of head_dim / 2
    q["vision_config"].update(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                              deepstack_visual_indexes=[1, 3])  # 8 layers -> 4 kept, tap 3: both levels used
    return q


def _4b_qwen():
    q = qwen3vl.PRESETS["4B"].to_hf()
    q.update(_IDS)  # same shapes as Qwen3-VL-4B; only the ids of the special tokens differ
    return q


CONFIGS = {
    "tiny": lambda: dict(PRESETS["tiny"]),
    "mid": lambda: dict(PRESETS["tiny"], qwen_config=_mid_qwen(), qwen_hidden_size=512, projection_dim=256,
                        image_size=224, diffusion_hidden_dim=512, num_diffusion_layers=4, num_diffusion_heads=8,
                        use_lora=True, lora_rank=16, lora_alpha=16.0, freeze_vision_encoder=True,
                        freeze_qwen_layers=True),
    "mimic-4b": lambda: dict(PRESETS["mimic-4b"], qwen_model_name="tiny", qwen_config=_4b_qwen()),
}


def build_model(name, device, dtype, meta=None):
    """VLAModel of a benchmark config on `device`. dtype bf16: the backbone in bf16, trainable tensors fp32 (as
    train.py on a GPU). meta (default: for mimic-4b): build on the meta device, then materialise random weights."""
    config = VLAConfig(**CONFIGS[name]())
    bdt = torch.bfloat16 if dtype == torch.bfloat16 else None
    if meta if meta is not None else name == "mimic-4b":
        with torch.device("meta"):
            model = VLAModel(config, load_backbone=False, backbone_dtype=bdt)
        model.to_empty(device=device)
        with torch.no_grad():  # random weights: small normal matrices, unit norm scales, zero biases
            for n, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
                elif "norm" in n:
                    p.fill_(1.0)
                else:
                    p.zero_()
        model.reinit_buffers()
    else:
        torch.manual_seed(0)
        model = VLAModel(config, backbone_dtype=bdt).to(device)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs_for(model, rng, batch):
    """A batch of encoded samples: 4 random image_size^2 frames + an instruction each, random angle targets."""
    size = model.config.image_size
    frames = [[Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
              for _ in range(batch)]
    texts = [f"Task: jumping jacks. Instruction: Do jumping jacks, sample {i}." for i in range(batch)]
    angles = rng.uniform(-1.5, 1.5, (batch, model.config.action_horizon, 22))
    actions = torch.as_tensor(encode_angles(angles), dtype=torch.float32)  # (B, H, 44)
    return frames, texts, actions


def bench_config(name, args, device, dtype):
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    reset_peak(device)
    model = build_model(name, device, dtype, meta=True if args.meta else None)
    build_s = time.perf_counter() - t0
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights_mib = peak_mib(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    print(f"\n== {name}: {n_all / 1e6:,.1f}M parameters ({n_train / 1e6:,.1f}M trainable), {device.type} "
          f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, built in {build_s:.1f} s, peak after build "
          f"{weights_mib:,.0f} MiB")

    # --- control step (batch 1) ---
    model.eval()
    frames, texts, _ = inputs_for(model, rng, 1)
    state = rng.uniform(-1.0, 1.0, 22)
    state44 = torch.as_tensor(encode_angles(state), dtype=torch.float32)[None].to(device)
    size = model.config.image_size
    enc = {}

    def pre():
        enc.update(model.encode(frames, texts))

    def backbone():
        with torch.inference_mode(), amp:
            enc["feat"] = model.features({k: v for k, v in enc.items() if k in BATCH_KEYS})

    def head():
        vl, deep, mask = enc["feat"]
        hd = model.action_head.future_tokens.dtype
        with torch.inference_mode(), amp:
            model.action_head.sample(vl.to(hd), deep.to(hd) if deep is not None else None, mask, state44.to(hd),
                                     steps=args.flow_steps, method=model.config.sampler)

    def control():
        with amp:
            model.predict(frames[0], np.tile([0.0, 0.0, size - 1, size - 1], (4, 1)), "jumping jacks",
                          "Do jumping jacks.", state, steps=args.flow_steps)

    reset_peak(device)
    t_pre = timeit(pre, device, args.iters, args.warmup)
    t_bb = timeit(backbone, device, args.iters, args.warmup)
    t_head = timeit(head, device, args.iters, args.warmup)
    t_all = timeit(control, device, args.iters, args.warmup)
    mem_ctrl = peak_mib(device)
    seq = enc["input_ids"].shape[1]
    print(f"control step (batch 1, {seq} tokens, {args.flow_steps} flow step): predict() {t_all * 1e3:8.1f} ms = "
          f"preprocessing {t_pre * 1e3:.1f} + backbone {t_bb * 1e3:.1f} + head {t_head * 1e3:.1f} ms (parts "
          f"timed apart); peak {mem_ctrl:,.0f} MiB")
    if args.no_train:
        return

    # --- training step (batch args.batch, inputs already encoded as the DataLoader workers deliver them) ---
    model.train()
    frames, texts, actions = inputs_for(model, rng, args.batch)
    inputs = {k: v.to(device) for k, v in model.encode(frames, texts).items()}
    actions = actions.to(device)
    state = actions[:, 0].clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")

    def step():
        with amp:
            loss = model(inputs=inputs, actions=actions, robot_state=state)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    t_step = timeit(step, device, args.iters, max(1, args.warmup))  # the first step also allocates AdamW state
    mem_train = peak_mib(device)
    print(f"training step (batch {args.batch}, {inputs['input_ids'].shape[1]} tokens): {t_step * 1e3:8.1f} ms = "
          f"{args.batch / t_step:.1f} samples/s; peak {mem_train:,.0f} MiB")
    del opt, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help="comma list of tiny, mid, mimic-4b (default: tiny,mid on CPU; "
                                                    "mimic-4b on CUDA)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=8, help="training batch")
    ap.add_argument("--iters", type=int, default=5, help="timed runs (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--flow-steps", type=int, default=1, help="sampler steps of the control step (released: 1)")
    ap.add_argument("--no-train", action="store_true", help="control step only")
    ap.add_argument("--meta", action="store_true", help="build every config on meta + random init (mimic-4b always)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else torch.float32
    names = (args.configs or ("mimic-4b" if device.type == "cuda" else "tiny,mid")).split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device.type} ({gpu}), load average {load:.2f} on {os.cpu_count()} cores")
    for name in names:
        bench_config(name, args, device, dtype)


if __name__ == "__main__":
    main()
