"""
Training throughput of train.py's pieces, in samples/s:

  1. the data path alone: data.WindowDataset (read a window's 4 JPEG frames, draw the box, resize,
     IK for flipped windows, sin/cos) + model_io.InputEncoder (chat template, tokens, M-RoPE
     positions) + train.collate, through train.loader with 0, 1 and 2 DataLoader workers (what
     one training process can be fed);
  2. full training steps (forward, flow loss, backward, clip, AdamW) with batches from that
     loader: end to end, and the model alone on one prefetched batch. tiny on the CPU; the
     mimic-4b shapes in bf16 autocast on CUDA (random weights, bench/vla.py's build_model).

The released run trained ~14.9M samples in 566 GPU-hours: 7.3 samples/s per GPU. Only the
mimic-4b row on a GPU compares with it (the target: at least 2x on an H100).

  python bench/train.py                                   # data path + tiny training steps on CPU
  python bench/train.py --configs mimic-4b --batch 8      # on a GPU machine
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the root: "train" must be ../train.py, not this file
from vla import build_model, peak_mib, reset_peak, sync  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402

RELEASED_SAMPLES_PER_GPU_S = 14.9e6 / (566 * 3600)  # ~7.3


def window_loader(root, encoder, image_size, batch, workers, seed=0, horizon=16, action_dim=44):
    """train.py's training loader (one process, epoch 0) over the train windows of root."""
    windows = data.WindowDataset(root, split="train", stride=16, flip=True, image_size=image_size, encode=encoder)
    dataset = train.FlowSamples(windows, seed, horizon, action_dim)
    order = train.ShardedOrder(len(dataset), 0, 1, seed)
    return train.loader(dataset, order, batch, workers)


def bench_data_path(root, encoder, image_size, batch, workers, num_batches):
    """Samples/s of the loader after its first batch (worker start-up excluded)."""
    it = iter(window_loader(root, encoder, image_size, batch, workers))
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(num_batches):
        try:
            n += len(next(it)["t"])
        except StopIteration:
            break
    return n / (time.perf_counter() - t0), n


def bench_training(name, root, args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(name, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    image_size = model.config.image_size

    def step(b):
        with amp:
            loss = model(inputs=train.model_inputs(b), actions=b["actions"].to(device),
                         robot_state=b["state"].to(device), timesteps=b["t"].to(device),
                         noise=b["noise"].to(device))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def batches():
        while True:  # epochs until enough steps were timed
            yield from window_loader(root, model.encoder(), image_size, args.batch, args.workers)

    stream = batches()
    first = next(stream)
    reset_peak(device)
    for _ in range(args.warmup):
        step(first)
    # model alone: one prefetched batch, no data loading
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step(first)
        sync(device)
        times.append(time.perf_counter() - t0)
    model_sps = args.batch / statistics.median(times)
    # end to end: batches from the loader (workers run alongside the steps)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(next(stream))
    sync(device)
    e2e_sps = args.batch * args.steps / (time.perf_counter() - t0)
    mem = peak_mib(device)
    n_train = sum(p.numel() for p in params)
    tokens = first["input_ids"].shape[1]
    print(f"{name} training on {device.type} ({'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}), "
          f"{n_train / 1e6:,.1f}M trainable, batch {args.batch} x {tokens} tokens, {args.workers} workers: "
          f"model alone {model_sps:.1f} samples/s (median step {statistics.median(times) * 1e3:.0f} ms), "
          f"end to end {e2e_sps:.1f} samples/s; peak {mem:,.0f} MiB")
    ratio = e2e_sps / RELEASED_SAMPLES_PER_GPU_S
    comparable = name == "mimic-4b" and device.type == "cuda"
    note = "" if comparable else "  (not comparable: a different model/device)"
    print(f"  vs the released run's {RELEASED_SAMPLES_PER_GPU_S:.2f} samples/s per GPU: {ratio:.2f}x{note}")
    opt = model = None  # frees the weights and AdamW's state (the closures share these names)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "demo"),
                    help="clip dataset (default: the demo; a small demo is built in a temp folder if missing)")
    ap.add_argument("--demo-clips", type=int, default=24,
                    help="clips of the temporary demo when --data is missing")
    ap.add_argument("--configs", default=None,
                    help="comma list of tiny, mid, mimic-4b for the training steps "
                         "(default: tiny on CPU, mimic-4b on CUDA; 'none' skips)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--workers", type=int, default=2,
                    help="DataLoader workers of the training-step benchmark")
    ap.add_argument("--data-workers", default="0,1,2", help="worker counts of the data-path benchmark")
    ap.add_argument("--data-batches", type=int, default=12, help="batches timed per data-path measurement")
    ap.add_argument("--image-size", type=int, default=224,
                    help="frame size of the data-path benchmark (released)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads, load average {load:.2f} on "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data)
        if not (root / data.INDEX_FILE).is_file():
            root = Path(tmp) / "demo"
            print(f"{args.data} has no dataset: building a {args.demo_clips}-clip demo in {root}")
            import synth  # the demo builder, needed only here
            synth.build_demo(root, num_clips=args.demo_clips)
        n_windows = len(data.WindowDataset(root, split="train", stride=16, flip=True))
        print(f"data: {root} ({n_windows} train windows with flips)")

        # 1. the data path alone, with the released frame size and the Qwen3-VL patching of the tiny
        #    processor (the same image pipeline as Qwen3-VL-4B's; its tokenizer is byte-level, so
        #    text is a few more tokens)
        from model import PRESETS, VLAConfig, backbone_config, build_processor
        from model_io import InputEncoder
        cfg = replace(VLAConfig(**PRESETS["tiny"]), image_size=args.image_size)
        qcfg = backbone_config(cfg)[0]
        encoder = InputEncoder(build_processor(cfg, None, qcfg), qcfg, args.image_size)
        for w in (int(x) for x in args.data_workers.split(",") if x.strip()):
            sps, n = bench_data_path(root, encoder, args.image_size, args.batch, w, args.data_batches)
            print(f"data path, {w} workers, batch {args.batch}, {args.image_size}px: {sps:.1f} samples/s "
                  f"({n} samples timed)")

        # 2. full training steps
        names = args.configs or ("mimic-4b" if device.type == "cuda" else "tiny")
        for name in [] if names == "none" else names.split(","):
            bench_training(name, root, args, device)


if __name__ == "__main__":
    main()
