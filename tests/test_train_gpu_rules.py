# The rules a GPU run depends on, checked on the CPU: tensors reach the head's device
# (a model on `meta` with inputs on `cpu` shows any mix-up), trainable parameters stay fp32 when
# the frozen ones are bf16, randomness is a function of (seed, rank, step) so a 2-rank resume
# with dropout is exact, trainable-only checkpoints record their base and load for eval / sample,
# the batch split, device choice and DDP options of train.py, and TF32.
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import argv, free_port, losses, make_dataset, params

import eval as evaluation
import sample
import train
from model import PRESETS, VLAConfig, VLAModel, use_tf32
from model_io import collate_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"image_size": 64, "num_diffusion_layers": 1}
# the released structure at toy size: LoRA on the LLM (with dropout), frozen vision and
# base weights, DiT dropout
LORA = {**SMALL, "use_lora": True, "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.05,
        "freeze_vision_encoder": True, "freeze_qwen_layers": True, "diffusion_dropout": 0.1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("clips"))


def tiny(**kw):
    return VLAConfig(**{**PRESETS["tiny"], **SMALL, **kw})


def sample_input(model):
    frames = [np.full((64, 64, 3), 60 + 30 * i, np.uint8) for i in range(4)]
    return collate_inputs([model.prepare(frames, np.tile([4.0, 4, 60, 60], (4, 1)), "wave", "Wave.")])


# --------------------------------------------------------------------------------------------------
# devices and dtypes


def test_every_tensor_reaches_the_head_on_its_device():
    """predict(noise=...) and the training loss with everything given on the CPU
    and the model on `meta`: each tensor the head receives is on the head's device
    (on a GPU, a CPU noise tensor crashed predict)."""
    torch.manual_seed(0)
    model = VLAModel(tiny()).eval()
    inputs = sample_input(model)
    model.to("meta")
    seen = []

    def spy(name):
        def call(*args, **kw):
            seen.append(name)
            for i, t in enumerate([*args, *kw.values()]):
                if isinstance(t, torch.Tensor):
                    assert t.device.type == "meta", f"{name}: argument {i} is on {t.device}, the head on meta"
            return torch.zeros(1, 16, 44) if name == "sample" else torch.zeros(())
        return call

    model.action_head.sample = spy("sample")
    model.action_head.loss = spy("loss")
    # (its padding check reads a value, which meta cannot)
    model.action_head.context = lambda *a, **k: None
    noise = np.random.default_rng(0).standard_normal((16, 44)).astype(np.float32)
    frames = [np.full((64, 64, 3), 60 + 30 * i, np.uint8) for i in range(4)]
    out = model.predict(frames, np.tile([4.0, 4, 60, 60], (4, 1)), "wave", "Wave.", np.zeros(22), noise=noise)
    assert out.shape == (16, 22)
    model(inputs=inputs, actions=torch.zeros(1, 16, 44), robot_state=torch.zeros(1, 44),
          timesteps=torch.full((1,), 0.5), noise=torch.zeros(1, 16, 44))
    assert seen == ["sample", "loss"]


@pytest.mark.parametrize("kind", ["unfrozen", "lora"])
def test_gpu_run_keeps_trainable_fp32_and_frozen_bf16(kind):
    """train.build_model for a GPU (built here on the CPU, not moved): every frozen parameter
    is bf16 and every parameter the optimizer sees is fp32, for a fully unfrozen backbone as
    for LoRA; one AdamW step of 1e-6 then moves every trainable weight that has a gradient
    (in bf16, such updates round away)."""
    config = tiny() if kind == "unfrozen" else tiny(**{**LORA, "lora_dropout": 0.0, "diffusion_dropout": 0.0})
    model, base = train.build_model(config, torch.device("cuda"), seed=0)
    assert base == {"init_seed": 0}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the dead DeepStack merger at least
    args = train.get_args(["--lr", "1e-6", "--warmup", "1"])
    opt = train.build_optimizer(model, args)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert {p.dtype for p in seen} == {torch.float32}
    assert len(seen) == sum(p.requires_grad for p in model.parameters())
    if kind == "lora":
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
        assert model.qwen_model.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    before = [p.detach().clone() for p in seen]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU's bf16 autocast, on the CPU
        loss = model(inputs=sample_input(model), actions=torch.randn(1, 16, 44), robot_state=torch.randn(1, 44),
                     timesteps=torch.full((1,), 0.5), noise=torch.randn(1, 16, 44))["loss"]
    loss.backward()
    with_grad = [p.grad is not None and bool(p.grad.abs().max() > 0) for p in seen]
    opt.step()
    moved = [not torch.equal(a, p.detach()) for a, p in zip(before, seen)]
    assert sum(with_grad) > 10 and moved == with_grad


def test_bf16_loading_keeps_adapters_fp32(tmp_path):
    """from_pretrained(..., backbone_dtype=bf16), full folder or trainable-only with its recorded
    base: adapters and head fp32, frozen base weights bf16."""
    torch.manual_seed(3)
    model = VLAModel(tiny(**{**LORA, "lora_dropout": 0.0}))
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "small", trainable_only=True, base={"init_seed": 3})
    for name in ("full", "small"):
        back = VLAModel.from_pretrained(tmp_path / name, backbone_dtype=torch.bfloat16)
        for n, p in back.named_parameters():
            want = torch.float32 if p.requires_grad else torch.bfloat16
            assert p.dtype == want, (name, n, p.dtype)
        assert any(".lora_A" in n for n, _ in back.named_parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v.to(back.state_dict()[k].dtype), back.state_dict()[k]), (name, k)


def test_tf32_switch():
    """use_tf32 sets torch's per-backend matmul precision (and only that one of torch's two APIs)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: the legacy allow_tf32 flag is the only switch")
    old = matmul.fp32_precision
    try:
        use_tf32(True)
        assert matmul.fp32_precision == "tf32"
        use_tf32(False)
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = old


# --------------------------------------------------------------------------------------------------
# train.py: batch split, devices, DDP options


def test_batch_split_is_derived_or_an_argparse_error(monkeypatch, capsys):
    # `torchrun --nproc_per_node=2 train.py` with the tiny defaults
    assert train.batch_split(16, 2) == (8, 1)
    assert train.batch_split(16, 1) == (16, 1)
    assert train.batch_split(512, 4) == (16, 8)
    assert train.batch_split(512, 4, 8) == (8, 16)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = train.get_args([])
    assert (args.batch_size, args.accum) == (8, 1)
    for flags, words in ((["--total-batch", "15"], ["15", "2 processes"]),
                         (["--batch-size", "16"], ["16", "8 samples each", "2 processes"]),
                         (["--total-batch", "24", "--batch-size", "5"], ["24", "12 samples", "--batch-size 5"])):
        with pytest.raises(SystemExit) as e:
            train.get_args(flags)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and all(w in err for w in words), err
    monkeypatch.setenv("RANK", "1")  # the other ranks exit quietly: rank 0 says it once
    with pytest.raises(SystemExit):
        train.get_args(["--total-batch", "15"])
    assert capsys.readouterr().err == ""


def test_device_of_a_rank_and_backend(monkeypatch):
    """LOCAL_RANK modulo the visible GPUs (a task shown only its own GPU uses cuda:0);
    ranks sharing a GPU use gloo."""
    calls = []
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train.torch.cuda, "set_device", lambda d: calls.append(("device", str(d))))
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for gpus, local_world, device, backend in ((1, "1", "cuda:0", "nccl"), (2, "2", "cuda:1", "nccl"),
                                               (1, "2", "cuda:0", "gloo")):
        monkeypatch.setattr(train.torch.cuda, "device_count", lambda n=gpus: n)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        calls.clear()
        ddp, rank, world, dev = train.setup_distributed("auto", 30.0)
        assert (ddp, rank, world, str(dev)) == (True, 1, 2, device)
        assert calls[0] == ("device", device) and calls[1][0] == backend
        assert calls[1][1].total_seconds() == 30 * 60


def test_ddp_options_and_barrier(dataset, tmp_path, monkeypatch):
    """Under torchrun (here one gloo rank in this process): DDP without buffer broadcasts, gradients
    as bucket views, and every rank meets at a barrier after rank 0 saved."""
    seen = {}
    real_ddp, real_barrier = train.DDP, train.dist.barrier

    @functools.wraps(real_ddp)  # the same signature, which train.py inspects
    def ddp(module, **kw):
        seen["ddp"] = kw
        return real_ddp(module, **kw)

    def barrier(*a, **k):
        seen["barriers"] = seen.get("barriers", 0) + 1
        return real_barrier(*a, **k)

    monkeypatch.setattr(train, "DDP", ddp)
    monkeypatch.setattr(train.dist, "barrier", barrier)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    train.main(argv(dataset, tmp_path / "run", steps=2, save_every=1, num_workers=0))
    assert seen["ddp"].get("forward_sync_buffers", seen["ddp"].get("broadcast_buffers")) is False
    assert seen["ddp"]["gradient_as_bucket_view"] is True
    assert seen["barriers"] == 2  # after each of the two saves
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-0000001", "ckpt-0000002"]


# --------------------------------------------------------------------------------------------------
# exact resume with dropout over 2 ranks; trainable-only checkpoints


def run_two_ranks(dataset, out, **flags):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"),
                                       *argv(dataset, out, LORA, num_workers=0, **flags)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return logs


def test_two_rank_resume_with_dropout_is_exact(dataset, tmp_path):
    """2 gloo ranks, LoRA dropout 0.05 and DiT dropout 0.1 (the released recipe): stop after step
    1, resume, finish at 2: the same losses, bit for bit, and the same weights as the uninterrupted
    run. (Restoring rank 0's RNG state on every rank made both ranks draw the same dropout
    masks after a resume.) The LoRA run saves only what trains, so this also resumes from
    a trainable-only checkpoint."""
    flags = dict(steps=2, save_every=1, lr=1e-3)
    run_two_ranks(dataset, tmp_path / "ref", **flags)
    run_two_ranks(dataset, tmp_path / "cut", stop_after=1, **flags)
    assert [s for s, _, _ in losses(tmp_path / "cut")] == [1]
    run_two_ranks(dataset, tmp_path / "cut", resume=True, **flags)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    a, b = params(tmp_path / "ref" / "ckpt-0000002"), params(tmp_path / "cut" / "ckpt-0000002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "cut" / "ckpt-0000002" / "config.json").read_text())
    assert meta["trainable_only"] is True and meta["base"] == {"init_seed": 0}
    assert not any(".visual." in k or k.endswith("up_proj.weight") for k in a), "frozen weights were saved"


def test_trainable_only_checkpoint_loads_for_eval_and_sample(dataset, tmp_path):
    """A LoRA run's default checkpoint holds only what trains and names its base (here: the seed of
    the random backbone); from_pretrained rebuilds it, equal to a full checkpoint of the same run;
    eval.py and sample.py load it by itself; a different base is refused by the recorded checksum."""
    cfg = {**LORA, "lora_dropout": 0.0, "diffusion_dropout": 0.0}
    train.main(argv(dataset, tmp_path / "small", cfg, steps=2, save_every=2, num_workers=0))
    train.main(argv(dataset, tmp_path / "full", cfg, steps=2, save_every=2, num_workers=0, save_full=True))
    small, full = tmp_path / "small" / "ckpt-0000002", tmp_path / "full" / "ckpt-0000002"
    assert len(params(small)) < len(params(full))
    loaded = VLAModel.from_pretrained(small).state_dict()
    ref = params(full)
    assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)

    res = evaluation.main(["--ckpt", str(tmp_path / "small"), "--data", str(dataset), "--num-windows", "2",
                           "--steps", "16", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert res["settings"]["checkpoint"] == str(small) and np.isfinite(res["table"]["16"]["model"])
    clip = next(dataset.rglob("c3.safetensors"))
    rec = sample.main(["--ckpt", str(small), "--clip", str(clip), "--device", "cpu", "--out", str(tmp_path / "s")])
    assert np.isfinite(rec["angles_rad"]).all()

    meta = json.loads((small / "config.json").read_text())
    meta["base"] = {"init_seed": 1}
    (small / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not the ones it was trained with"):
        VLAModel.from_pretrained(small)
