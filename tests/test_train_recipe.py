# Tests of the train.py mechanics that the released recipe (512 = micro-batch x accumulation x
# world) and exact resume rely on: gradient accumulation == one big micro-batch, in one process
# and under DDP (2 gloo ranks); exact resume with dropout on; the validation loss; the logged lr
# against the warmup + cosine schedule, and the update the optimizer really made; gradient
# clipping; the dataset flags; a data order and flow noise that change every epoch. CPU only, on
# the toy dataset and the shrunk tiny preset of tests/test_train.py.
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import REPO, SMALL, argv, free_port, losses, make_dataset, params

import data
import train
from model import PRESETS, VLAConfig, VLAModel

# LoRA on the tiny backbone and the released DiT dropout: the CPU RNG state becomes training state
DROPOUT = {**SMALL, "diffusion_dropout": 0.1, "use_lora": True, "lora_rank": 4, "lora_alpha": 8,
           "lora_dropout": 0.1}
# 3 steps of 8 samples stay inside the first epoch for every micro-batch below (an epoch's uneven
# tail is dropped per micro-batch, so later steps would legitimately differ); a small lr as in
# test_train's DDP test
EQUIV = dict(steps=3, save_every=3, lr=1e-5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # stride 4: 15 train windows (30 with mirrors), 5 val windows
    return make_dataset(tmp_path_factory.mktemp("clips"))


def train_once(args):
    n = torch.get_num_threads()
    try:
        train.main(args)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_batch_of_8(dataset, tmp_path_factory):
    """The reference: one process, micro-batch 8, no accumulation (1 thread, as each rank has)."""
    out = tmp_path_factory.mktemp("ref")
    train_once(argv(dataset, out, batch_size=8, total_batch=8, num_workers=1, **EQUIV))
    return out


def run_ranks(args, world=2):
    """train.py under `world` gloo ranks (the torchrun environment); returns rank 0's log."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return logs[0]


def initial_model():
    torch.manual_seed(0)  # train.main seeds seed + rank before building the model
    return VLAModel(VLAConfig(**{**PRESETS["tiny"], **SMALL}))


def assert_same_training(a, b, step):
    """Same logged losses and gradient norms (rtol 1e-5) and parameters (1e-6) after `step` steps;
    the parameters moved by much more than that, so a real difference cannot hide under it."""
    la, lb = losses(a), losses(b)
    assert [s for s, _, _ in la] == [s for s, _, _ in lb] == list(range(1, step + 1))
    np.testing.assert_allclose([x[1:] for x in la], [x[1:] for x in lb], rtol=1e-5)
    pa, pb = params(a / f"ckpt-{step:07d}"), params(b / f"ckpt-{step:07d}")
    assert pa.keys() == pb.keys()
    diff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert diff <= 1e-6, diff
    init = initial_model().state_dict()
    assert max((pb[k] - init[k]).abs().max().item() for k in pb) > 10 * 1e-6


def first_update_size(out):
    """Largest change of a trainable parameter without weight decay (norm weights, biases) made by
    update 1 (checkpoint ckpt-0000001 against the initial model)."""
    first = params(out / "ckpt-0000001")
    return max((first[n] - p.detach()).abs().max().item()
               for n, p in initial_model().named_parameters() if p.requires_grad and p.dim() < 2)


# -------------------------------------------------------------------------------------------------
# Gradient accumulation


def test_accumulation_equals_one_big_micro_batch(dataset, tmp_path, one_batch_of_8):
    """micro-batch 4 x accumulation 2 == micro-batch 8 x 1: the same samples per step, the loss
    divided by the accumulation count (else the gradient norm and the clipping are off by it)."""
    out = tmp_path / "accum"
    train.main(argv(dataset, out, batch_size=4, total_batch=8, num_workers=1, **EQUIV))
    assert_same_training(out, one_batch_of_8, 3)


def test_ddp_with_accumulation_equals_one_process(dataset, tmp_path, one_batch_of_8):
    """2 gloo ranks x micro-batch 2 x accumulation 2 == 1 process x micro-batch 8: gradients are
    all-reduced on the last micro-step of each accumulation (no_sync on the others), so the
    replicas never drift apart."""
    out = tmp_path / "ddp"
    log = run_ranks(argv(dataset, out, batch_size=2, total_batch=8, num_workers=0, **EQUIV))
    assert "world 2 x batch 2 x accum 2 = 8" in log
    assert_same_training(out, one_batch_of_8, 3)


# -------------------------------------------------------------------------------------------------
# Exact resume with dropout on: the CPU RNG state is part of the training state


@pytest.fixture(scope="module")
def dropout_run(dataset, tmp_path_factory):
    """4 steps with dropout on, checkpoints at steps 2 and 4, the validation loss at step 4."""
    out = tmp_path_factory.mktemp("dropout")
    train_once(argv(dataset, out, DROPOUT, save_every=2, keep_last=0))
    return out


def test_resume_with_dropout_is_exact(dataset, tmp_path, dropout_run):
    """LoRA and DiT dropout draw from the CPU RNG, so a resume must restore its state: resuming from
    the step-2 checkpoint reproduces steps 3-4 of the uninterrupted run float for float."""
    res = tmp_path / "resumed"
    train.main(argv(dataset, res, DROPOUT, save_every=2, resume=dropout_run / "ckpt-0000002"))
    assert [s for s, _, _ in losses(res)] == [3, 4]
    assert losses(res) == losses(dropout_run)[2:]
    pa, pb = params(dropout_run / "ckpt-0000004"), params(res / "ckpt-0000004")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_two_rank_resume_with_dropout_is_exact(dataset, tmp_path):
    ref, res = tmp_path / "ref", tmp_path / "resumed"
    flags = dict(batch_size=2, total_batch=4, save_every=2, num_workers=0)
    run_ranks(argv(dataset, ref, DROPOUT, keep_last=0, **flags))
    run_ranks(argv(dataset, res, DROPOUT, resume=ref / "ckpt-0000002", **flags))
    assert losses(res) == losses(ref)[2:]


def test_validation_loss_is_the_mean_over_windows_in_eval_mode(dataset, dropout_run):
    """The logged validation loss is the mean over all 5 validation windows (micro-batches of 4 and
    1) of the flow loss at each window's fixed t / noise, dropout off: recomputed here window by
    window from the step-4 checkpoint."""
    rows = [json.loads(line) for line in (dropout_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in logged] == [4]
    model = VLAModel.from_pretrained(dropout_run / "ckpt-0000004").eval()
    windows = data.WindowDataset(dataset, split="val", stride=4, flip=False, encode=model.encoder(),
                                 image_size=64)
    val = train.FlowSamples(windows, 0, 16, 44)
    assert len(val) == 5
    per_window = []
    with torch.no_grad():
        for i in range(len(val)):
            b = train.collate([val[(-1, i)]])
            loss = model(inputs=train.model_inputs(b), actions=b["actions"], robot_state=b["state"],
                         timesteps=b["t"], noise=b["noise"])["loss"]
            per_window.append(loss.item())
    assert logged[0]["val_loss"] == pytest.approx(np.mean(per_window), rel=1e-5)
    assert np.std(per_window) > 1e-3 * np.mean(per_window)  # a wrong weighting would show


# -------------------------------------------------------------------------------------------------
# Optimizer: learning rate schedule, clipping


def test_logged_lr_follows_warmup_and_cosine(dataset, tmp_path):
    """Each metrics record holds the lr its update used: linear warmup from lr / warmup (not 0: an
    update at lr 0 is wasted) to lr at update `warmup`, then cosine towards min_lr_ratio x lr. The
    first update shows the optimizer used it: AdamW's first step moves a parameter without weight
    decay by lr x g / (|g| + eps), i.e. by lr wherever the gradient is not tiny."""
    lr, out = 1e-3, tmp_path / "run"
    train.main(argv(dataset, out, steps=6, warmup=2, lr=lr, min_lr_ratio=0.1, batch_size=2,
                    total_batch=2, save_every=1, keep_last=0, num_workers=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    # updates 1, 2 warm up (1/2, 2/2); updates 3..6 are cosine steps 0..3 of 4 down to the floor 0.1
    expect = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in got], np.array(expect) * lr, rtol=1e-9)
    assert first_update_size(out) == pytest.approx(expect[0] * lr, rel=1e-3)


def test_gradients_are_clipped_before_the_step(dataset, tmp_path):
    """With --grad-clip 1e-12 every gradient entry falls far below AdamW's eps (1e-8), so the first
    update moves no parameter by more than ~1e-4 x lr; the logged norm is the one before clipping."""
    lr, out = 1e-3, tmp_path / "run"
    train.main(argv(dataset, out, steps=1, warmup=1, lr=lr, grad_clip=1e-12, batch_size=2,
                    total_batch=2, save_every=1, num_workers=0))
    assert losses(out)[0][2] > 1e-3
    assert 0 < first_update_size(out) < 1e-3 * lr


def test_dataset_flags_reach_the_datasets(dataset, tmp_path, capsys):
    """--stride, --no-flip and --require decide the windows (steps 0: build, validate, stop)."""
    train.main(argv(dataset, tmp_path, steps=0, stride=8, no_flip=True))
    # starts 4, 12, 20 in each of 3 train + 1 val clips, no mirrors
    assert "9 train / 3 val windows" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no clip carries pipeline quality flags"):
        train.main(argv(dataset, tmp_path, steps=0, require="prog_good"))


# -------------------------------------------------------------------------------------------------
# Data order and flow noise


def test_data_order_changes_every_epoch_and_shards_interleave():
    n, seed = 30, 0
    orders = [train.ShardedOrder(n, 0, 1, seed, epoch).indices() for epoch in range(3)]
    assert all(sorted(o) == list(range(n)) for o in orders)  # each epoch: every sample once
    assert orders[0] != orders[1] != orders[2] != orders[0]  # in a new order each epoch
    assert train.ShardedOrder(n, 0, 1, seed, 1).indices() == orders[1]  # fixed by (seed, epoch)
    assert train.ShardedOrder(n, 0, 1, seed + 1, 1).indices() != orders[1]
    # ranks interleave the one-process order without its uneven tail, so a global batch is the
    # same set of samples for any number of ranks
    for world, size in ((2, 31), (3, 31), (4, 30)):
        full = train.ShardedOrder(size, 0, 1, seed, 2).indices()
        usable = size // world * world
        shards = [train.ShardedOrder(size, r, world, seed, 2) for r in range(world)]
        assert all(len(s.indices()) == len(s) == usable // world for s in shards)
        assert [shards[i % world].indices()[i // world] for i in range(usable)] == full[:usable]
    # resuming inside an epoch continues from the saved position
    part = train.ShardedOrder(n, 1, 2, seed, 1, start=5)
    assert [i for _, i in part] == train.ShardedOrder(n, 1, 2, seed, 1).indices()[5:]
    assert len(part) == 10 and {e for e, _ in part} == {1}


def test_flow_time_and_noise_belong_to_the_sample_and_epoch():
    class Windows:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"i": i}

    a, b = train.FlowSamples(Windows(), 0, 16, 44), train.FlowSamples(Windows(), 0, 16, 44)
    x = a[(0, 2)]
    assert x["i"] == 2 and x["t"].shape == () and x["noise"].shape == (16, 44) and 0 <= x["t"] < 1
    assert torch.equal(x["noise"], b[(0, 2)]["noise"]) and x["t"] == b[(0, 2)]["t"]
    # another epoch, another sample, another seed: other draws
    for other in (a[(1, 2)], a[(0, 3)], train.FlowSamples(Windows(), 1, 16, 44)[(0, 2)]):
        assert x["t"] != other["t"] and not torch.equal(x["noise"], other["noise"])
