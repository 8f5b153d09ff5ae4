"""
Train MIMIC: flow matching of 16x22 future joint angles from 4 past frames + an instruction (mimic.md section 5).

The same file runs on one CPU/GPU and under torchrun:

    python train.py                                   # main job: demo data (built if missing), tiny preset, CPU
    python train.py --preset mimic-4b --qwen /models/Qwen3-VL-4B-Instruct --data /data/clips --out runs/4b
    torchrun --nproc_per_node=4 train.py --preset mimic-4b --qwen ... --data ... --total-batch 512 --batch-size 8
    python train.py --resume runs/tiny                # continue exactly where the last checkpoint stopped

Released recipe (mimic.md 5): LoRA r128/a128 on the LLM, frozen vision, bf16 autocast on GPU with fp32 master
weights, AdamW (wd 0.01), warmup + cosine, grad clip 1.0, total batch 512 = per-device batch x accumulation x world.
DataLoader workers do all CPU work (JPEG decode, box drawing, Qwen3-VL patching, tokenisation).

Checkpoints: OUT/ckpt-<step>/{model.safetensors, config.json, state.pt}, written to a temporary folder and renamed;
state.pt (optimizer, scheduler, step, RNG, data position) is read back with weights_only=True. The last
--keep-last are kept. Metrics: OUT/metrics.jsonl (+ wandb with --wandb).
"""

import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import PRESETS, VLAConfig, VLAModel, atomic_write, load_safetensors

# -----------------------------------------------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--qwen", default=None, help="local Qwen3-VL folder (overrides the preset's qwen_model_name)")
    ap.add_argument("--model-config", default=None, help='JSON of VLAConfig fields overriding the preset, e.g. '
                                                         '\'{"image_size": 64, "num_diffusion_layers": 1}\'')
    ap.add_argument("--data", default="data/demo", help="clip dataset folder (data.py format); the demo is built "
                                                        "there if it is the default and missing")
    ap.add_argument("--out", default="runs/tiny", help="checkpoints, metrics.jsonl")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16, help="micro-batch per device")
    ap.add_argument("--total-batch", type=int, default=16, help="samples per optimizer step over all devices")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (released recipe: 1e-5)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--stride", type=int, default=16, help="window stride in frames (released: 16)")
    ap.add_argument("--no-flip", action="store_true", help="disable the mirror augmentation")
    ap.add_argument("--require", default=None, choices=list(data.QUALITY_FLAGS),
                    help="train on the pipeline clips that passed this verdict only (strict: checks AND judge, "
                    "vlm_good: judge only), e.g. from one `pipeline.py --keep all` run")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=500, help="validation loss every N steps (and at the end)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--save-trainable-only", action="store_true", help="checkpoints hold only trainable tensors")
    ap.add_argument("--resume", nargs="?", const="auto", default=None,
                    help="resume from the latest checkpoint in --out (or a given ckpt folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--final-eval-windows", type=int, default=200, help="windows in the closing rolling eval (0: skip)")
    ap.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (off by default)")
    ap.add_argument("--stop-after", type=int, default=None, help="exit after this step (testing resume)")
    return ap.parse_args(argv)


# -----------------------------------------------------------------------------------------------------------------
# Distributed setup (the nanoGPT idiom: RANK in the environment means torchrun)


def setup_distributed():
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ddp, rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


class DummyWandb:
    def log(self, *a, **k):
        pass

    def finish(self):
        pass


# -----------------------------------------------------------------------------------------------------------------
# Data order: a deterministic permutation per epoch, sharded by rank; the position is saved for exact resume.


class ShardedOrder(torch.utils.data.Sampler):
    """Yields (epoch, index) for this rank from position `start` on: perm(seed, epoch)[:usable][rank::world].
    Interleaved sharding makes the global batch of a step the same set of samples for any world size, so N
    processes train exactly like one process with the same total batch (tested). The uneven tail is dropped."""

    def __init__(self, n, rank, world, seed, epoch=0, start=0):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.start = epoch, start

    def indices(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        usable = self.n // self.world * self.world
        return perm[:usable][self.rank::self.world].tolist()

    def __iter__(self):
        return ((self.epoch, i) for i in self.indices()[self.start:])

    def __len__(self):
        return self.n // self.world - self.start


class FlowSamples(torch.utils.data.Dataset):
    """Wraps a WindowDataset: item (epoch, i) -> the window plus its flow-matching time t and noise, drawn from a
    generator seeded by (seed, epoch, i). The randomness belongs to the sample, not to a process, so resuming and
    changing the number of processes reproduce the same training exactly."""

    def __init__(self, windows, seed, horizon, action_dim):
        self.windows, self.seed, self.shape = windows, seed, (horizon, action_dim)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, key):
        epoch, i = key
        item = dict(self.windows[i])
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch + 1) * 1_000_003 + i) % (1 << 63))
        item["t"] = torch.rand((), generator=g)
        item["noise"] = torch.randn(self.shape, generator=g)
        return item


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def model_inputs(batch):
    """The processor tensors of a collated batch (what VLAModel(inputs=...) takes)."""
    return {k: batch[k] for k in MODEL_INPUTS}


def collate(items):
    """data.collate for the window fields, plus the per-sample flow t (B,) and noise (B, H, A)."""
    b = data.collate([{k: v for k, v in it.items() if k not in ("t", "noise")} for it in items])
    b["t"] = torch.stack([it["t"] for it in items])
    b["noise"] = torch.stack([it["noise"] for it in items])
    return b


def loader(dataset, sampler, batch_size, num_workers, drop_last=True):
    # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                       num_workers=num_workers, collate_fn=collate, generator=torch.Generator(),
                                       prefetch_factor=4 if num_workers else None)


def batches(dataset, args, rank, world, micro, pos):
    """Endless micro-batches. pos = {"epoch", "sample"}: this rank's samples consumed in the epoch; advanced by the
    caller as batches are USED (workers prefetch ahead, so the sampler can't know)."""
    if len(dataset) // world < micro:  # otherwise no epoch ever yields a batch and this would loop forever
        raise SystemExit(f"{len(dataset)} training windows cannot fill a micro-batch of {micro} on each of {world} "
                         f"processes: lower --batch-size or --stride, or add clips")
    while True:
        order = ShardedOrder(len(dataset), rank, world, args.seed, pos["epoch"], pos["sample"])
        if len(order) >= micro:
            yield from loader(dataset, order, micro, args.num_workers)
        pos["epoch"], pos["sample"] = pos["epoch"] + 1, 0


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, step, raw_model, optimizer, scheduler, pos, args, keep_last):
    """Write OUT/ckpt-<step> atomically: a temp folder first, renamed when complete; then prune old ones."""
    final = out / f"ckpt-{step:07d}"
    tmp = out / f".tmp-ckpt-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    raw_model.save_pretrained(tmp, trainable_only=args.save_trainable_only)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "data_epoch": pos["epoch"], "data_sample": pos["sample"], "rng_cpu": torch.get_rng_state(),
             "args": json.dumps(vars(args))}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(out / "latest.json", lambda p: Path(p).write_text(json.dumps({"checkpoint": final.name})))
    ckpts = sorted(out.glob("ckpt-*"))
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume(args) -> Path:
    if args.resume != "auto":
        return Path(args.resume)
    latest = Path(args.out) / "latest.json"
    if not latest.is_file():
        return None
    return Path(args.out) / json.loads(latest.read_text())["checkpoint"]


# -----------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    args = get_args(argv)
    ddp, rank, world, device = setup_distributed()
    if device.type == "cpu":
        # DataLoader workers need cores too: oversubscribed OpenMP threads spin and can slow a CPU step 10x
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world - args.num_workers))
    master = rank == 0
    torch.manual_seed(args.seed + rank)  # per-rank seeds (dropout); flow t / noise belong to the samples (FlowSamples)
    np.random.seed(args.seed + rank)
    out = Path(args.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # --- data ---
    root = Path(args.data)
    if not (root / data.INDEX_FILE).is_file() and args.data == "data/demo":
        if master:
            print0(f"building the demo dataset in {root} (once)")
            import synth  # the demo builder, needed only here
            synth.build_demo(root)
        if ddp:
            dist.barrier()

    # --- model ---
    cfg = dict(PRESETS[args.preset])
    if args.qwen:
        cfg["qwen_model_name"] = args.qwen
    if args.model_config:
        cfg.update(json.loads(args.model_config))  # an unknown field is an error naming it (VLAConfig)
    config = VLAConfig(**cfg)
    resume = find_resume(args) if args.resume else None
    on_gpu = device.type == "cuda"
    # bf16 frozen backbone on GPU (as released), fp32 everywhere on CPU; trainable tensors stay fp32 (master weights)
    model = VLAModel(config, backbone_dtype=torch.bfloat16 if on_gpu and config.use_lora else None)
    if resume is not None:  # a trainable-only checkpoint is completed by the freshly loaded frozen weights
        model.load_state_dict({**model.state_dict(), **load_safetensors(resume / "model.safetensors")}, strict=True)
    model.to(device)
    raw_model = model
    encode = data.QwenEncoder(raw_model.processor, image_size=config.image_size)
    H, A = config.action_horizon, config.action_dim
    windows = dict(stride=args.stride, encode=encode, image_size=config.image_size, require=args.require)
    train_set = FlowSamples(data.WindowDataset(root, split="train", flip=not args.no_flip, **windows), args.seed, H, A)
    val_set = FlowSamples(data.WindowDataset(root, split="val", flip=False, **windows), args.seed, H, A)
    if len(train_set) == 0:
        raise SystemExit(f"no training windows in {root}")
    # Every rank reads the same index, so all take the same decision; validation and the final evaluation run on
    # rank 0 only, with no collective inside, so skipping them cannot leave another rank waiting.
    has_val = len(val_set) > 0

    assert args.total_batch % (args.batch_size * world) == 0, "--total-batch must divide by batch-size x world"
    accum = args.total_batch // (args.batch_size * world)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norm weights and biases: no weight decay (as nanoGPT)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                                  fused=on_gpu)

    def lr_lambda(step):  # linear warmup, then cosine down to min_lr_ratio
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    start_step, pos = 0, {"epoch": 0, "sample": 0}
    if resume is not None:
        state = torch.load(resume / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, pos = state["step"], {"epoch": state["data_epoch"], "sample": state["data_sample"]}
        torch.set_rng_state(state["rng_cpu"])
        if on_gpu and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        print0(f"resumed from {resume} at step {start_step}")
    if ddp:
        model = DDP(model, device_ids=[device.index] if on_gpu else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()
    wandb = DummyWandb()
    if args.wandb and master:
        import wandb as _wandb  # optional dependency, only when asked for

        wandb = _wandb.init(project="mimic", config=vars(args))
    n_trainable = sum(p.numel() for p in params)
    print0(f"{len(train_set)} train / {len(val_set)} val windows; {n_trainable:,} trainable parameters; "
           f"world {world} x batch {args.batch_size} x accum {accum} = {args.total_batch}")
    if not has_val:  # a NaN validation loss, then a crash in the final evaluation, would say it less clearly
        print0(f"note: no val windows in {root} (the split is a hash of the clip/video id, ~2% val, so a small "
               f"dataset may have none): skipping the validation loss and the final rolling evaluation")

    def val_loss():
        """Mean flow loss on the first eval-batches of the validation windows, with each window's fixed t / noise
        (epoch -1), so successive evaluations are comparable."""
        raw_model.eval()
        losses = []
        order = [(-1, i) for i in range(min(len(val_set), args.eval_batches * args.batch_size))]
        with torch.no_grad():
            for b in loader(val_set, order, args.batch_size, args.num_workers, drop_last=False):
                with autocast:
                    loss = raw_model(inputs=model_inputs(b), actions=b["actions"], robot_state=b["state"],
                                     timesteps=b["t"].to(device), noise=b["noise"].to(device))["loss"].item()
                losses.append((loss * len(b["t"]), len(b["t"])))  # per-window mean: the last batch may be short
        raw_model.train()
        return sum(l for l, _ in losses) / sum(n for _, n in losses)

    # --- loop ---
    stream = batches(train_set, args, rank, world, args.batch_size, pos)
    metrics = open(out / "metrics.jsonl", "a") if master else None
    bar = tqdm(total=args.steps, initial=start_step, disable=not master, desc="train", dynamic_ncols=True)
    model.train()
    t0 = time.time()
    for step in range(start_step, args.steps + 1):
        last_step = step == args.steps
        if master and has_val and (last_step or (step > 0 and step % args.eval_every == 0)):
            vl = val_loss()
            log = {"step": step, "val_loss": vl}
            metrics.write(json.dumps(log) + "\n")
            metrics.flush()
            wandb.log(log, step=step)
            bar.write(f"step {step}: val loss {vl:.4f}")
        if master and step > start_step and (last_step or step % args.save_every == 0):
            path = save_checkpoint(out, step, raw_model, optimizer, scheduler, pos, args, args.keep_last)
            bar.write(f"saved {path}")
        if last_step or (args.stop_after is not None and step >= args.stop_after):
            break
        loss_sum = 0.0
        for micro in range(accum):
            b = next(stream)
            pos["sample"] += args.batch_size
            # DDP: all-reduce gradients only on the last micro-step of the accumulation
            sync = nullcontext() if (not ddp or micro == accum - 1) else model.no_sync()
            with sync, autocast:
                loss = model(inputs=model_inputs(b), actions=b["actions"].to(device), robot_state=b["state"].to(device),
                             timesteps=b["t"].to(device), noise=b["noise"].to(device))["loss"]
                (loss / accum).backward()
            loss_sum += loss.detach()
        if ddp:  # log the global batch's loss, not rank 0's shard (equal to what one process would log)
            dist.all_reduce(loss_sum)
            loss_sum = loss_sum / world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if master:
            dt = time.time() - t0
            t0 = time.time()
            loss_val = (loss_sum / accum).item()
            log = {"step": step + 1, "loss": loss_val, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "samples_per_s": args.total_batch / max(dt, 1e-9)}
            metrics.write(json.dumps(log) + "\n")
            wandb.log(log, step=step + 1)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{log['lr']:.2e}", sps=f"{log['samples_per_s']:.1f}")
            bar.update(1)
    bar.close()
    if master:
        metrics.close()
        wandb.finish()
        png = plot_losses(out / "metrics.jsonl", out / "loss.png")
        if png is not None:
            print0(f"loss curves: {png}")
        if args.final_eval_windows and args.stop_after is None and has_val:
            final_evaluation(raw_model, root, args, device, out)
    if ddp:
        dist.destroy_process_group()


def plot_losses(metrics_path, png_path, bins=15):
    """metrics.jsonl -> a PNG of the training loss (mean per bin of steps) and the validation loss, drawn with
    eval.py's PIL line chart (no val curve when there was no validation). After a resume the file holds repeated
    steps: the last record of a step wins."""
    import eval as evaluation

    train, val = {}, {}
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        (train if "loss" in r else val)[r["step"]] = r.get("loss", r.get("val_loss"))
    if not train:
        return None
    steps = sorted(train)
    edges = np.linspace(0, len(steps), min(bins, len(steps)) + 1).astype(int)
    xs = [steps[hi - 1] for lo, hi in zip(edges[:-1], edges[1:])]  # each bin is labelled by its last step
    series = {"train loss": [float(np.mean([train[s] for s in steps[lo:hi]])) for lo, hi in zip(edges[:-1], edges[1:])]}
    val = {step: v for step, v in val.items() if v is not None and math.isfinite(v)}  # older runs logged NaN
    if val:
        series["val loss"] = [None] * len(xs)
    for step, v in val.items():  # a validation point goes to the bin whose last step is nearest
        series["val loss"][int(np.argmin([abs(x - step) for x in xs]))] = v
    img = evaluation.Image.new("RGB", (720, 300), "white")
    draw = evaluation.ImageDraw.Draw(img)
    evaluation._legend(draw, 10, 8, list(series))
    evaluation.line_panel(draw, (0, 30, 700, 300), xs, series, "flow-matching loss", xlabel="optimizer step")
    return evaluation.save_png(img, png_path)


def final_evaluation(model, root, args, device, out):
    """A short rolling evaluation (S = 16, future frames t = 1..15): model vs static vs linear. eval.py has the full one."""
    import eval as evaluation

    res = evaluation.rolling_eval(model, root, num_windows=args.final_eval_windows, steps=(16,), seed=args.seed,
                                  device=device, batch_size=args.batch_size, num_workers=args.num_workers)
    row = res["table"]["16"]
    print0(f"rolling eval S=16 on {res['num_windows']} val windows, RMSE deg (t=1..15): model {row['model']:.2f} | "
           f"static {row['static']:.2f} | linear {row['linear']:.2f}  (model - static = {row['model'] - row['static']:+.2f})")
    atomic_write(out / "final_eval.json", lambda p: Path(p).write_text(json.dumps(res, indent=2)))
    ckpts = sorted(out.glob("ckpt-*"))
    print0(f"checkpoint: {ckpts[-1] if ckpts else out}")


if __name__ == "__main__":
    main()
