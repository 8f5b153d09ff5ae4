"""
Benchmark of the policy server (serve.py): what serving adds to a control step, and what batching
gives. Target: <= 3 ms of overhead.

  overhead      batch 1: the in-process VLAModel.predict() (frames decoded) against a round trip
                through PolicyServer on 127.0.0.1 with PolicyClient (JPEG bytes in), the two
                alternating in one loop; the median over pairs of their difference. "direct": the
                round trip minus the server's own prepare + model time. Vision cache off on both
                sides; predict() runs in a thread of its own, as the server's model does (torch's
                OpenMP threads behave differently in the main thread). Frames at the model's size
                and at 640x480.
  serving path  the same round trip with the model's forward a no-op, minus the server's prepare
                time (which predict() has too): what serving adds, free of the model's noise.
  clients       --clients concurrent clients, each sending requests in a loop: requests/s against
                one client's, and the mean batch the model thread ran.

The server runs in this process (its own threads), with bench/vla.py's configs and random weights.

  python bench/serve.py                                     # tiny + mid, CPU
  python bench/serve.py --configs mimic-4b --device cuda    # the released shapes on a GPU
"""

import argparse
import concurrent.futures
import copy
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vla import CONFIGS, build_model  # noqa: E402  (bench/vla.py)

import policy_client  # noqa: E402
import serve  # noqa: E402


def camera_jpeg(rng, width, height, quality=90):
    """A smooth random picture (upsampled noise), so the JPEG is about a camera
    frame's size, not noise's."""
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def overhead(model, client, pool, rng, size, args):
    jpegs = [camera_jpeg(rng, *size) for _ in range(4)]
    frames = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    w, h = size
    boxes = np.tile([0.2 * w, 0.1 * h, 0.7 * w, 0.95 * h], (4, 1))
    state = rng.uniform(-1, 1, 22)
    cfg = model.config
    noise = torch.randn((cfg.action_horizon, cfg.action_dim), generator=torch.Generator().manual_seed(0))
    obs = dict(frames=jpegs, boxes=boxes, task="jumping jacks", instruction="Do jumping jacks.", state=state)
    def in_process():
        t0 = time.perf_counter()
        angles = model.predict(frames, boxes, obs["task"], obs["instruction"], state, noise=noise,
                               steps=args.flow_steps)
        return angles, time.perf_counter() - t0

    local, remote, timing = [], [], []
    for i in range(args.warmup + args.iters):
        mine, t_local = pool.submit(in_process).result()
        t0 = time.perf_counter()
        out = client.act(**obs, seed=0, steps=args.flow_steps)
        t_remote = time.perf_counter() - t0
        if i >= args.warmup:
            local.append(t_local)
            remote.append(t_remote)
            timing.append(dict(out["timing"], round_trip_ms=1e3 * t_remote))
    err = float(np.abs(out["angles"] - mine).max())
    med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    parts = {k: statistics.median(t[k] for t in timing) for k in ("parse_ms", "prepare_ms", "queue_ms", "infer_ms")}
    direct = statistics.median(t["round_trip_ms"] - t["prepare_ms"] - t["infer_ms"] for t in timing)
    print(f"  {w}x{h} frames ({sum(map(len, jpegs)) / 4e3:.0f} kB JPEG each): in-process {med(local):7.1f} ms, "
          f"round trip {med(remote):7.1f} ms, overhead {med([r - l for r, l in zip(remote, local)]):5.2f} ms, "
          f"direct {direct:.2f} ms (server: parse {parts['parse_ms']:.2f}, prepare {parts['prepare_ms']:.2f}, "
          f"queue {parts['queue_ms']:.2f}, model {parts['infer_ms']:.1f} ms); "
          f"max |served - in-process| {err:.1e} rad")
    return obs


def serving_path(model, rng, size, args):
    """Round trip minus prepare with a no-op forward: parse, queue hand-offs, HTTP and JSON only."""
    cfg = model.config
    noop = copy.copy(model)  # shares the weights; only this copy's forward changes
    noop.forward = lambda robot_state, **kw: {"actions": torch.zeros(len(robot_state), cfg.action_horizon,
                                                                     cfg.action_dim)}
    w, h = size
    obs = dict(frames=[camera_jpeg(rng, w, h) for _ in range(4)], boxes=np.tile([0, 0, w - 1, h - 1.0], (4, 1)),
               task="jumping jacks", instruction="Do jumping jacks.", state=np.zeros(22))
    rows = []
    with serve.PolicyServer(noop, port=0, cache_frames=0) as server:
        client = policy_client.PolicyClient(server.url)
        for i in range(args.warmup + args.iters):
            out = client.act(**obs, seed=0)
            t = out["timing"]
            if i >= args.warmup:
                rows.append((out["round_trip_ms"] - t["prepare_ms"] - t["infer_ms"], t["parse_ms"], t["queue_ms"]))
        client.close()
    over, parse, queue = (np.percentile([r[j] for r in rows], [10, 50, 90]) for j in range(3))
    print(f"  serving path alone, {w}x{h} frames: overhead median {over[1]:.2f} ms (p10 {over[0]:.2f}, p90 "
          f"{over[2]:.2f}); parse {parse[1]:.2f}, queue {queue[1]:.2f} ms")


def clients(server, obs, args, one_rps):
    n, done, batches = args.clients, [], []

    def loop(c):
        client = policy_client.PolicyClient(server.url)
        for k in range(args.iters):
            out = client.act(**obs, seed=c * 1000 + k, steps=args.flow_steps)
            batches.append(out["timing"]["batch_size"])
        done.append(c)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rps = n * args.iters / (time.perf_counter() - t0)
    print(f"  {n} concurrent clients: {rps:.1f} requests/s vs {one_rps:.1f} for one client "
          f"({rps / one_rps:.2f}x), mean batch {statistics.mean(batches):.2f}")


def bench_config(name, args, device, dtype):
    rng = np.random.default_rng(0)
    model = build_model(name, device, dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: {n / 1e6:,.1f}M parameters, {device.type}, image {model.config.image_size}, "
          f"{args.flow_steps} flow step(s)")
    with serve.PolicyServer(model, port=0, max_batch=args.max_batch, cache_frames=0) as server, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = policy_client.PolicyClient(server.url)
        s = model.config.image_size
        obs = None
        for size in [(s, s), (640, 480)]:
            obs = overhead(model, client, pool, rng, size, args)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            client.act(**obs, seed=0, steps=args.flow_steps)
        one_rps = args.iters / (time.perf_counter() - t0)
        if args.clients > 1:
            clients(server, obs, args, one_rps)
        client.close()
    for size in [(s, s), (640, 480)]:
        serving_path(model, rng, size, args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None,
                    help="comma list of tiny, mid, mimic-4b (default: tiny,mid on CPU; mimic-4b on CUDA)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--iters", type=int, default=20, help="timed calls (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    ap.add_argument("--flow-steps", type=int, default=1, help="sampler steps (released: 1)")
    ap.add_argument("--clients", type=int, default=4,
                    help="concurrent clients of the throughput test (1: skip)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's batch limit")
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
