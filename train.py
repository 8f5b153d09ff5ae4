"""
Train MIMIC: flow matching of 16 future steps of 22 joint angles from the 4 frames before them and
an instruction (the windows of docs/conventions.md). One file for one CPU / GPU and for torchrun:

    python train.py                             # demo data (built if missing), tiny preset, CPU
    python train.py --preset mimic-4b --qwen /models/Qwen3-VL-4B-Instruct --data /data/clips
    torchrun --nproc_per_node=4 train.py --preset mimic-4b ... --total-batch 512 --batch-size 8
    python train.py --resume                          # continue runs/tiny exactly

Released recipe: LoRA r128/a128 on the LLM, frozen vision (bf16 on a GPU; what trains stays fp32
under bf16 autocast), AdamW (wd 0.01), warmup + cosine, grad clip 1.0, total batch 512 = per-device
batch x accumulation x world. DataLoader workers do the CPU work and ship uint8 frames; the loop
reads metrics back every --log-every steps and never applies a non-finite step. Checkpoints
OUT/ckpt-<step>/ (model.safetensors, config.json, state.pt) are written atomically; LoRA runs save
only what trains. Metrics: OUT/metrics.jsonl (+ wandb with --wandb).
"""

import argparse
import datetime
import inspect
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
from model import PRESETS, VLAConfig, VLAModel, atomic_write, backbone_config, load_safetensors, use_tf32
from model_io import BATCH_KEYS

# --------------------------------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--qwen", default=None,
                    help="local Qwen3-VL folder (overrides the preset's qwen_model_name)")
    ap.add_argument("--model-config", default=None, help='JSON of VLAConfig fields overriding the preset, e.g. '
                                                         '\'{"image_size": 64, "num_diffusion_layers": 1}\'')
    ap.add_argument("--data", default="data/demo", help="clip dataset folder (data.py format); the demo is built "
                                                        "there if it is the default and missing")
    ap.add_argument("--out", default="runs/tiny", help="checkpoints, metrics.jsonl")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="micro-batch per device (default: the largest divisor of total-batch / world <= 16)")
    ap.add_argument("--total-batch", type=int, default=16,
                    help="samples per optimizer step over all devices")
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
    ap.add_argument("--eval-every", type=int, default=500,
                    help="validation loss every N steps (and at the end)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--keep-last", type=int, default=2)
    save = ap.add_mutually_exclusive_group()
    save.add_argument("--save-trainable-only", action="store_true",
                      help="checkpoints hold only the tensors that train (default for LoRA runs)")
    save.add_argument("--save-full", action="store_true",
                      help="checkpoints hold every tensor (default otherwise)")
    ap.add_argument("--resume", nargs="?", const="auto", default=None,
                    help="resume from the latest checkpoint in --out (or a given ckpt folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10,
                    help="read the loss and gradient norm back from the device every N steps (one wait each)")
    ap.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                    help="a step with a non-finite loss or gradient is never applied; then stop "
                         "(default) or go on")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic GPU kernels: a rerun or resume repeats the same bits, somewhat slower")
    ap.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                    help="auto: nccl when each local rank has its own GPU, else gloo")
    ap.add_argument("--dist-timeout", type=float, default=60.0,
                    help="minutes a rank waits in a collective (rank 0 may be saving or validating)")
    ap.add_argument("--final-eval-windows", type=int, default=200,
                    help="windows in the closing rolling eval (0: skip)")
    ap.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (off by default)")
    ap.add_argument("--stop-after", type=int, default=None, help="exit after this step (testing resume)")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        args.batch_size, args.accum = batch_split(args.total_batch, world, args.batch_size)
    except ValueError as e:
        if int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(2) from None  # rank 0 says it, once
        ap.error(str(e))
    if args.log_every < 1:
        ap.error(f"--log-every must be >= 1, got {args.log_every}")
    return args


def batch_split(total, world, micro=None, max_micro=16):
    """-> (micro-batch per device, accumulation steps), total = micro x accum x world. Without a
    given micro: the largest divisor of total / world up to max_micro. Impossible ones raise."""
    if total < 1 or (micro is not None and micro < 1):
        raise ValueError(f"--total-batch {total} and --batch-size {micro} must be positive")
    if total % world:
        raise ValueError(f"--total-batch {total} does not divide over {world} processes")
    per_rank = total // world
    if micro is None:
        micro = max(d for d in range(1, min(per_rank, max_micro) + 1) if per_rank % d == 0)
    elif per_rank % micro:
        raise ValueError(f"--total-batch {total} over {world} processes is {per_rank} samples each, which "
                         f"--batch-size {micro} does not divide (total = batch-size x accumulation x processes)")
    return micro, per_rank // micro


# --------------------------------------------------------------------------------------------------
# Distributed setup (the nanoGPT idiom: RANK in the environment means torchrun)


def setup_distributed(backend="auto", timeout_min=60.0):
    """-> (ddp, rank, world, device). A rank uses GPU LOCAL_RANK modulo the GPUs it sees, so a
    scheduler showing each task its own GPU works, and ranks may share a GPU (over gloo)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
    if backend == "auto":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        own_gpu = device.type == "cuda" and local_world <= torch.cuda.device_count()
        backend = "nccl" if own_gpu else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    return True, dist.get_rank(), dist.get_world_size(), device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


class DummyWandb:
    def log(self, *a, **k):
        pass

    def finish(self):
        pass


# --------------------------------------------------------------------------------------------------
# Data order: a deterministic permutation per epoch, sharded by rank; the position is saved


class ShardedOrder(torch.utils.data.Sampler):
    """Yields (epoch, index) for this rank from position `start` on: perm(seed, epoch)[:usable]
    [rank::world]. Interleaved, so a step's global batch is the same samples for any world size and
    N processes train like one with the same total batch. The uneven tail is dropped."""

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
    """Wraps a WindowDataset: item (epoch, i) -> the window plus its flow-matching t and noise, from
    a generator seeded by (seed, epoch, i): the randomness belongs to the sample, not to a process,
    so a resume or another number of processes reproduces the same training."""

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


def model_inputs(batch):
    """The model-input tensors of a collated batch (what VLAModel(inputs=...) takes)."""
    return {k: batch[k] for k in BATCH_KEYS}


def collate(items):
    """data.collate for the window fields, plus the per-sample flow t (B,) and noise (B, H, A)."""
    b = data.collate([{k: v for k, v in it.items() if k not in ("t", "noise")} for it in items])
    b["t"] = torch.stack([it["t"] for it in items])
    b["noise"] = torch.stack([it["noise"] for it in items])
    return b


def loader(dataset, sampler, batch_size, num_workers, drop_last=True, pin_memory=False):
    # own generator: the worker seed is not drawn from the global RNG; pinned: async copies
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                       num_workers=num_workers, collate_fn=collate, generator=torch.Generator(),
                                       prefetch_factor=4 if num_workers else None, pin_memory=pin_memory)


def to_device(batch, device):
    """A batch's flow-matching targets on `device`, without waiting (inputs move in the model)."""
    return {k: batch[k].to(device, non_blocking=True) for k in ("actions", "state", "t", "noise")}


def step_seed(seed, rank, step):
    """Seed of the global RNGs (dropout masks) for `step` on `rank`: a resumed run draws what the
    uninterrupted one drew, with nothing saved."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % (1 << 63)


def batches(dataset, args, rank, world, micro, pos, pin_memory=False):
    """Endless micro-batches. pos = {"epoch", "sample"}: this rank's samples consumed in the epoch,
    advanced by the caller as batches are USED (workers prefetch ahead: the sampler cannot know)."""
    if len(dataset) // world < micro:  # else no epoch yields a batch and this loops forever
        raise SystemExit(f"{len(dataset)} training windows cannot fill a micro-batch of {micro} on each of {world} "
                         f"processes: lower --batch-size or --stride, or add clips")
    while True:
        order = ShardedOrder(len(dataset), rank, world, args.seed, pos["epoch"], pos["sample"])
        if len(order) >= micro:
            yield from loader(dataset, order, micro, args.num_workers, pin_memory=pin_memory)
        pos["epoch"], pos["sample"] = pos["epoch"] + 1, 0


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, step, raw_model, optimizer, scheduler, pos, args, keep_last, base=None):
    """Write OUT/ckpt-<step> atomically (a temp folder, renamed when complete), then prune old
    ones. No RNG state: dropout masks come from step_seed."""
    final = out / f"ckpt-{step:07d}"
    tmp = out / f".tmp-ckpt-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    trainable_only = args.save_trainable_only or (raw_model.config.use_lora and not args.save_full)
    raw_model.save_pretrained(tmp, trainable_only=trainable_only, base=base)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "data_epoch": pos["epoch"], "data_sample": pos["sample"], "args": json.dumps(vars(args))}
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(out / "latest.json", lambda p: Path(p).write_text(json.dumps({"checkpoint": final.name})))
    ckpts = sorted(out.glob("ckpt-*"))
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out) -> Path:
    """OUT/latest.json's checkpoint folder, or None."""
    latest = Path(out) / "latest.json"
    return Path(out) / json.loads(latest.read_text())["checkpoint"] if latest.is_file() else None


def find_resume(args) -> Path:
    return Path(args.resume) if args.resume != "auto" else latest_checkpoint(args.out)


# --------------------------------------------------------------------------------------------------
# Model and optimizer


def build_model(config: VLAConfig, device: torch.device, seed: int):
    """-> (model on the CPU, base record). Random initialisation under `seed`, the same on every
    rank; on a GPU the frozen parameters are bf16 and what trains fp32. The base record (the
    Qwen3-VL folder, or the seed) lets a trainable-only checkpoint be loaded anywhere."""
    torch.manual_seed(seed)
    model = VLAModel(config, backbone_dtype=torch.bfloat16 if device.type == "cuda" else None)
    folder = backbone_config(config)[1]
    return model, ({"qwen": str(folder)} if folder is not None else {"init_seed": seed})


def build_optimizer(model, args):
    """AdamW over the parameters that train (all fp32): matrices with weight decay, norms and
    biases without. Fused: one kernel per step, and it skips a step on the device (found_inf)."""
    params = [p for p in model.parameters() if p.requires_grad]
    bad = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if bad:
        raise ValueError(f"trainable parameters must be fp32 (AdamW updates round away in bf16): {bad[:5]}")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), fused=True)


class NonFinite(SystemExit):
    """Training stopped on a non-finite loss or gradient (nothing was applied or saved after it)."""


# --------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    args = get_args(argv)
    if args.deterministic:  # before any CUDA work: cuBLAS reads this when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops with no such kernel warn
        torch.backends.cudnn.benchmark = False
    ddp, rank, world, device = setup_distributed(args.dist_backend, args.dist_timeout)
    on_gpu = device.type == "cuda"
    if on_gpu:
        use_tf32(True)
    else:  # leave the DataLoader workers their cores: oversubscribed OpenMP threads spin
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world - args.num_workers))
    master = rank == 0
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
    if args.model_config:  # an unknown field is an error naming it (VLAConfig)
        cfg.update(json.loads(args.model_config))
    config = VLAConfig(**cfg)
    resume = find_resume(args) if args.resume else None
    model, base = build_model(config, device, args.seed)
    if resume is not None:
        if json.loads((resume / "config.json").read_text()).get("trainable_only"):
            VLAModel.from_pretrained(resume, base=model)  # into `model`, checking the frozen ones
        else:
            model.load_state_dict(load_safetensors(resume / "model.safetensors"), strict=True)
    model.to(device)
    raw_model = model
    encode = raw_model.encoder()
    H, A = config.action_horizon, config.action_dim
    windows = dict(stride=args.stride, encode=encode, image_size=config.image_size, require=args.require)
    train_set = FlowSamples(data.WindowDataset(root, split="train", flip=not args.no_flip, **windows), args.seed, H, A)
    val_set = FlowSamples(data.WindowDataset(root, split="val", flip=False, **windows), args.seed, H, A)
    if len(train_set) == 0:
        raise SystemExit(f"no training windows in {root}")
    # the same on every rank; validation runs on rank 0 alone, with no collective inside
    has_val = len(val_set) > 0

    accum = args.accum
    optimizer = build_optimizer(raw_model, args)
    params = [p for g in optimizer.param_groups for p in g["params"]]

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
        print0(f"resumed from {resume} at step {start_step}")
    if ddp:
        # no buffer broadcast before every forward (the rotary tables are the same everywhere;
        # newer torch calls it forward_sync_buffers); gradients live in the all-reduce buckets
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[device.index] if on_gpu else None, gradient_as_bucket_view=True, **no_sync)
    wandb = DummyWandb()
    if args.wandb and master:
        import wandb as _wandb  # optional dependency, only when asked for

        wandb = _wandb.init(project="mimic", config=vars(args))
    n_trainable = sum(p.numel() for p in params)
    print0(f"{len(train_set)} train / {len(val_set)} val windows; {n_trainable:,} trainable parameters; "
           f"world {world} x batch {args.batch_size} x accum {accum} = {args.total_batch}")
    if not has_val:  # said up front, rather than as a NaN loss and a failing final evaluation
        print0(f"note: no val windows in {root} (the split is a hash of the clip/video id, ~2% val, so a small "
               f"dataset may have none): skipping the validation loss and the final rolling evaluation")

    def val_loss():
        """Mean flow loss on the first validation windows, each with its fixed t and noise (epoch
        -1), so successive evaluations are comparable."""
        raw_model.eval()
        losses = []
        order = [(-1, i) for i in range(min(len(val_set), args.eval_batches * args.batch_size))]
        with torch.no_grad():
            for b in loader(val_set, order, args.batch_size, args.num_workers, drop_last=False, pin_memory=on_gpu):
                with raw_model.autocast():
                    t = to_device(b, device)
                    loss = raw_model(inputs=model_inputs(b), actions=t["actions"], robot_state=t["state"],
                                     timesteps=t["t"], noise=t["noise"])["loss"].item()
                # a mean per window: the last batch may be short
                losses.append((loss * len(b["t"]), len(b["t"])))
        raw_model.train()
        return sum(l for l, _ in losses) / sum(n for _, n in losses)

    # --- loop ---
    stream = batches(train_set, args, rank, world, args.batch_size, pos, pin_memory=on_gpu)
    metrics = open(out / "metrics.jsonl", "a") if master else None
    bar = tqdm(total=args.steps, initial=start_step, disable=not master, desc="train", dynamic_ncols=True)
    pending = []  # steps whose loss / gradient norm are still on the device (flush reads them)
    clock = {"t": time.time()}

    def flush():
        """Read the pending steps back (one wait for the device), log, act on a non-finite one."""
        if not pending:
            return
        values = torch.stack([torch.stack([p["loss"], p["grad_norm"].float()]) for p in pending]).tolist()
        now = time.time()
        sps = args.total_batch * len(pending) / max(now - clock["t"], 1e-9)
        clock["t"] = now
        bad = []
        for p, (loss, grad_norm) in zip(pending, values):
            ok = math.isfinite(loss) and math.isfinite(grad_norm)
            log = {"step": p["step"], "loss": loss if ok else None, "lr": p["lr"],
                   "grad_norm": grad_norm if ok else None, "samples_per_s": sps}
            if not ok:
                log["skipped"] = True
                bad.append((p, loss, grad_norm))
            if master:
                metrics.write(json.dumps(log) + "\n")
                wandb.log(log, step=p["step"])
        if master:
            metrics.flush()
            loss, _ = values[-1]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{pending[-1]['lr']:.2e}", sps=f"{sps:.1f}")
        pending.clear()
        for p, loss, grad_norm in bad:  # the same steps on every rank (all-reduced numbers)
            samples = p["samples"]
            if ddp:
                every = [None] * world
                dist.all_gather_object(every, samples)
                samples = [s for rank_samples in every for s in rank_samples]
            msg = (f"step {p['step']}: non-finite loss {loss} / gradient norm {grad_norm}; the update was not "
                   f"applied. Its samples (clip@window start, ~ = mirrored): {', '.join(samples)}")
            if args.on_nonfinite == "stop":  # every rank stops; rank 0 says why
                latest = latest_checkpoint(out)
                raise NonFinite(f"{msg}\nstopped; nothing was saved after it; the last good checkpoint is "
                                f"{latest if latest is not None else '(none yet)'}" if master else 1)
            bar.write(f"warning: {msg}; skipped (--on-nonfinite skip)")

    model.train()
    for step in range(start_step, args.steps + 1):
        last_step = step == args.steps
        stop = last_step or (args.stop_after is not None and step >= args.stop_after)
        evaluate = has_val and (last_step or (step > 0 and step % args.eval_every == 0))
        save = step > start_step and (last_step or step % args.save_every == 0)
        if stop or evaluate or save or step % args.log_every == 0:  # the same steps on every rank
            flush()
        if master and evaluate:
            vl = val_loss()
            log = {"step": step, "val_loss": vl}
            metrics.write(json.dumps(log) + "\n")
            metrics.flush()
            wandb.log(log, step=step)
            bar.write(f"step {step}: val loss {vl:.4f}")
            clock["t"] = time.time()  # samples/s counts training time only
        if save:
            if master:
                path = save_checkpoint(out, step, raw_model, optimizer, scheduler, pos, args, args.keep_last, base)
                bar.write(f"saved {path}")
            if ddp:  # the others wait here (under --dist-timeout), not in an all-reduce
                dist.barrier()
            clock["t"] = time.time()
        if stop:
            break
        torch.manual_seed(step_seed(args.seed, rank, step))
        loss_sum = torch.zeros((), device=device)
        samples = []
        for micro in range(accum):
            b = next(stream)
            pos["sample"] += args.batch_size
            samples += [f"{c}@{s}{'~' if f else ''}" for c, s, f in zip(b["clip_id"], b["start"].tolist(),
                                                                         b["flipped"].tolist())]
            t = to_device(b, device)
            # DDP all-reduces gradients on the last micro-step of the accumulation only
            sync = nullcontext() if (not ddp or micro == accum - 1) else model.no_sync()
            with sync, raw_model.autocast():
                loss = model(inputs=model_inputs(b), actions=t["actions"], robot_state=t["state"],
                             timesteps=t["t"], noise=t["noise"])["loss"]
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        if ddp:  # log the global batch's loss, as one process would
            dist.all_reduce(loss_sum)
            loss_sum = loss_sum / world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        # a non-finite step must never reach the weights: fused AdamW skips its update on the
        # device when found_inf is 1 (torch.amp.GradScaler's protocol), with no wait for the GPU
        optimizer.found_inf = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
        lr = scheduler.get_last_lr()[0]  # this update's lr, logged with its loss and grad norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append({"step": step + 1, "loss": loss_sum / accum, "grad_norm": grad_norm,
                        "lr": lr, "samples": samples})
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
    """metrics.jsonl -> a PNG of the training loss (mean per bin of steps) and the validation loss
    (eval.py's PIL chart). After a resume, the last record of a repeated step wins."""
    import eval as evaluation

    train, val = {}, {}
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        if r.get("loss", r.get("val_loss")) is not None:  # a skipped step is logged as null
            (train if "loss" in r else val)[r["step"]] = r.get("loss", r.get("val_loss"))
    if not train:
        return None
    steps = sorted(train)
    edges = np.linspace(0, len(steps), min(bins, len(steps)) + 1).astype(int)
    xs = [steps[hi - 1] for lo, hi in zip(edges[:-1], edges[1:])]  # a bin's label: its last step
    series = {"train loss": [float(np.mean([train[s] for s in steps[lo:hi]])) for lo, hi in zip(edges[:-1], edges[1:])]}
    val = {step: v for step, v in val.items() if v is not None and math.isfinite(v)}  # older runs logged NaN
    if val:
        series["val loss"] = [None] * len(xs)
    for step, v in val.items():  # a validation point goes to the bin whose last step is nearest
        series["val loss"][int(np.argmin([abs(x - step) for x in xs]))] = v
    img = evaluation.Image.new("RGB", (720, 300), "white")
    draw = evaluation.ImageDraw.Draw(img)
    evaluation.legend(draw, 10, 8, list(series))
    evaluation.line_panel(draw, (0, 30, 700, 300), xs, series, "flow-matching loss", xlabel="optimizer step")
    return evaluation.save_png(img, png_path)


def final_evaluation(model, root, args, device, out):
    """A short rolling evaluation (S = 16, t = 1..15): model vs static vs linear (eval.py: all)."""
    import eval as evaluation

    res = evaluation.rolling_eval(model, root, num_windows=args.final_eval_windows, steps=(16,), seed=args.seed,
                                  device=device, batch_size=args.batch_size, num_workers=args.num_workers)
    row = res["table"]["16"]
    print0(f"rolling eval S=16 on {res['num_windows']} val windows, RMSE deg (t=1..15): "
           f"model {row['model']:.2f} | static {row['static']:.2f} | linear {row['linear']:.2f}  "
           f"(model - static = {row['model'] - row['static']:+.2f})")
    atomic_write(out / "final_eval.json", lambda p: Path(p).write_text(json.dumps(res, indent=2)))
    ckpts = sorted(out.glob("ckpt-*"))
    print0(f"checkpoint: {ckpts[-1] if ckpts else out}")


if __name__ == "__main__":
    main()
