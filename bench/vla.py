"""
Benchmark of MIMIC inference (model.py): the rolling control loop against the original
implementation's path on the same weights, measured in the same run, plus compile time and
the policy server's round trip.

The loop: 20 calls at batch 1, the 4-frame window sliding by one frame per call (a robot at 10 Hz),
one Euler flow step. Each call is complete: 640x480 camera frames with the target box drawn and
resized, preprocessing, vision tower, decoder layers 0..tap, head; CUDA is synchronised around it.

  reference  what the original code runs: transformers' Qwen3-VL + peft LoRA on the same weights,
             truncated to the kept layers; hooks, output_hidden_states and the LM head on every
             token; transformers' processor on every call; then our DiT head
  eager      VLAModel.predict()
  cache      + a VisionCache: one new frame through the vision tower per call instead of four
  merged     + inference.optimize(): LoRA folded into the base weights once
  compiled   + inference.optimize(compile=True) (CUDA graphs on CUDA); compile time and
             recompiles are reported
  bf16       + inference.optimize(dtype=torch.bfloat16), on CUDA or a CPU with bf16 instructions

Every row's first-call actions are checked against the reference's (beyond tolerance the run
stops); rounds alternate the rows so machine load hits them alike. 'call 1' and 'steady' are
medians over --repeats loops (steady: calls 2..20), 'loop' the mean over the 20 calls. The server
row runs the cache + merged model behind serve.PolicyServer and reports the round trip minus the
in-process call. Configs (random weights, byte-level tokenizer): mid, CPU-sized with the released
structure and its vocabulary scaled so that the reference's LM head weighs what it does at 4B
(21% of the kept layers); mimic-4b, the released shapes (built on the meta device); tiny.

  python bench/vla.py                                   # mid, CPU, fp32 (+ bf16 where supported)
  python bench/vla.py --configs mimic-4b --device cuda  # bf16; target: <= 15 ms on an H100
  python bench/vla.py --plot docs/rolling_latency.png   # also draw the per-call timeline
"""

import argparse
import copy
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qwen3vl  # noqa: E402
import qwen3vl_processor  # noqa: E402
from inference import VisionCache, optimize  # noqa: E402
from model import PRESETS, TINY_QWEN, VLAConfig, VLAModel  # noqa: E402
from model_io import collate_inputs, encode_angles, frame_image, prompt_text  # noqa: E402

# The byte-level tokenizer's special ids (TINY_QWEN): every config uses them, so its processor works
_IDS = {k: TINY_QWEN[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}


def layer_weights(t) -> int:
    """Weights of one Qwen3 decoder layer's matrices (attention + SwiGLU) for a text config dict."""
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    return t["hidden_size"] * (2 * q + 2 * kv) + 3 * t["hidden_size"] * t["intermediate_size"]


def scaled_vocab(text, kept) -> int:
    """The vocabulary giving an LM head the same share of the kept layers' weights as at 4B (21%)."""
    t4 = qwen3vl.PRESETS["4B"].to_hf()["text_config"]
    share = t4["vocab_size"] * t4["hidden_size"] / (18 * layer_weights(t4))
    return int(round(share * kept * layer_weights(text) / text["hidden_size"] / 8)) * 8


def _mid_qwen():
    q = copy.deepcopy(TINY_QWEN)
    q["text_config"].update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=64)
    q["text_config"]["vocab_size"] = scaled_vocab(q["text_config"], kept=4)  # 5040; ids used < 266
    q["text_config"]["rope_scaling"]["mrope_section"] = [12, 10, 10]  # 3/8, 5/16, 5/16 of hd / 2
    # 8 layers -> 4 kept, tap 3: both DeepStack levels are used
    q["vision_config"].update(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                              deepstack_visual_indexes=[1, 3])
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
    """VLAModel of a benchmark config on `device`. dtype bf16: the backbone in bf16,
    trainable tensors fp32 (as train.py on a GPU). meta (default: for mimic-4b):
    build on the meta device, then materialise random weights. LoRA B is random too
    (a fresh adapter's zero B would hide any LoRA mistake in the comparisons)."""
    config = VLAConfig(**CONFIGS[name]())
    bdt = torch.bfloat16 if dtype == torch.bfloat16 else None
    if meta if meta is not None else name == "mimic-4b":
        with torch.device("meta"):
            model = VLAModel(config, load_backbone=False, backbone_dtype=bdt)
        model.to_empty(device=device)
        # random weights: small normal matrices, unit norm scales, zero biases
        with torch.no_grad():
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
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".lora_B"):
                    p.normal_(0.0, 0.02)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --------------------------------------------------------------------------------------------------
# The original code's path


class Reference:
    """transformers + peft as the original code runs them, on `model`'s weights; our head after."""

    def __init__(self, model: VLAModel, device, dtype):
        import peft
        import transformers
        from transformers import PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        cfg, d = model.config, model.qwen_config.to_hf()
        hf_cfg = transformers.Qwen3VLConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                                            tie_word_embeddings=d["tie_word_embeddings"], **_IDS)
        hf_cfg._attn_implementation = "sdpa"
        with torch.device(device):
            hf = transformers.Qwen3VLForConditionalGeneration(hf_cfg).eval()
        # our key names are transformers' (qwen_model.<name>); LoRA goes to peft below
        sd = {k[len("qwen_model."):]: v for k, v in model.state_dict().items()
              if k.startswith("qwen_model.") and ".lora_" not in k}
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        # allowed to be missing: the layers after the tap (truncated below), the final norm
        # (ones) and the tied head
        extra = [k for k in missing if not (k.startswith("model.language_model.layers.") and
                                            int(k.split(".")[3]) >= model.kept)
                 and k not in ("model.language_model.norm.weight", "lm_head.weight")]
        if extra or unexpected:
            raise RuntimeError(f"reference: missing {extra}, unexpected {unexpected}")
        hf.to(dtype)
        if cfg.use_lora:  # peft first, then truncation: the original's order
            hf = peft.get_peft_model(hf, peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                         lora_dropout=cfg.lora_dropout,
                                                         target_modules=list(cfg.lora_target_modules)))
            ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
            theirs = {n: p for n, p in hf.named_parameters() if ".lora_" in n}
            with torch.no_grad():
                # qwen_model.X.lora_A -> base_model.model.X.lora_A.default.weight
                for k, v in ours.items():
                    theirs.pop("base_model.model." + k[len("qwen_model."):] + ".default.weight").copy_(v)
            left = [n for n in theirs if ".layers." not in n or int(n.split(".layers.")[1].split(".")[0]) < model.kept]
            if left:
                raise RuntimeError(f"reference: LoRA tensors without our weights: {left[:5]}")
            hf.eval()
        lm = hf.get_base_model().model.language_model if cfg.use_lora else hf.model.language_model
        lm.layers = lm.layers[:model.kept]
        self.feats = {}
        for i in (model.deep_tap, model.tap):  # the original's hooks: each layer's own output
            lm.layers[i].register_forward_hook(lambda mod, args, out, i=i: self.feats.__setitem__(i, out))
        tok = PreTrainedTokenizerFast(tokenizer_object=qwen3vl_processor.byte_level_tokenizer(),
                                      pad_token="<|endoftext|>")
        ic = model.processor.image_config
        ip = Qwen2VLImageProcessorPil(patch_size=ic.patch_size, temporal_patch_size=ic.temporal_patch_size,
                                      merge_size=ic.merge_size, image_mean=list(ic.image_mean),
                                      image_std=list(ic.image_std), resample=3,
                                      size={"shortest_edge": ic.min_pixels, "longest_edge": ic.max_pixels})

        class _NoVideo:  # images only; transformers' video processor needs torchvision
            merge_size, temporal_patch_size = ic.merge_size, ic.temporal_patch_size

        check = Qwen3VLProcessor.check_argument_for_proper_class
        Qwen3VLProcessor.check_argument_for_proper_class = lambda s, name, arg: (
            type(arg) if name == "video_processor" else check(s, name, arg))
        try:
            self.processor = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=_NoVideo())
        finally:
            Qwen3VLProcessor.check_argument_for_proper_class = check
        self.model, self.vla, self.device = hf, model, device
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()

    def preprocess(self, frames, boxes, task, instruction):
        """Boxed, resized frames + prompt -> transformers' processor outputs (the original's
        per-call CPU work)."""
        images = [frame_image(f, b, self.vla.config.image_size) for f, b in zip(frames, boxes)]
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt_text(task, instruction)}]
        text = qwen3vl_processor.apply_chat_template([{"role": "user", "content": content}])
        return self.processor(text=[text], images=images, return_tensors="pt")

    @torch.inference_mode()
    def actions(self, frames, boxes, task, instruction, state44, noise):
        """One call -> (1, H, 44) actions on the device."""
        m = self.vla
        batch = {k: v.to(self.device) for k, v in self.preprocess(frames, boxes, task, instruction).items()}
        with self.amp:
            self.feats.clear()
            self.model(**batch, output_hidden_states=True)
            vl = self.feats[m.tap]
            deep = torch.cat([self.feats[m.deep_tap], vl], -1) if m.config.use_deepstack_features else None
            hd = m.action_head.future_tokens.dtype
            return m.action_head.sample(vl.to(hd), deep.to(hd) if deep is not None else None,
                                        batch["attention_mask"].bool(), state44.to(self.device, hd),
                                        steps=m.config.diffusion_steps, noise=noise.to(self.device, hd),
                                        method=m.config.sampler)


# --------------------------------------------------------------------------------------------------
# The rolling loop


def camera(calls, num_frames, rng, size=(640, 480)):
    """calls + num_frames - 1 camera frames (smooth random colour fields, so JPEG and PIL see
    image-like content) with a target box drifting right, the instruction, per-call states and
    noise."""
    n = calls + num_frames - 1
    small = rng.integers(0, 256, (n, size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    frames = [Image.fromarray(s).resize(size, Image.BILINEAR) for s in small]
    x = np.linspace(100, 300, n)
    boxes = np.stack([x, np.full(n, 80.0), x + 180, np.full(n, 440.0)], 1)
    states = rng.uniform(-1.0, 1.0, (calls, 22))
    noise = [torch.from_numpy(rng.standard_normal((16, 44)).astype(np.float32)) for _ in range(calls)]
    return frames, boxes, states, noise


def first_call_actions(model, frames, boxes, state, noise):
    """Ours, one call -> (1, H, 44) raw actions (the comparison with the reference)."""
    inputs = collate_inputs([model.prepare(frames, boxes, "jumping jacks", "Do jumping jacks.")])
    with torch.inference_mode(), model.autocast():
        return model(inputs=inputs, robot_state=torch.from_numpy(encode_angles(state)).float()[None],
                     compute_loss=False, noise=noise[None])["actions"]


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def run_loop(call, calls, device):
    """Per-call seconds of one loop; call(k, cache) does call k; a fresh cache per loop."""
    cache, times = VisionCache(), []
    for k in range(calls):
        sync(device)
        t0 = time.perf_counter()
        call(k, cache)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def server_rows(model, cam, F, calls, device):
    """The cache + merged model behind PolicyServer on localhost: (round trip, in-process) pairs."""
    try:
        import policy_client
        import serve
    except ImportError:
        print("server: serve.py is not in this checkout; no server row")
        return None
    frames, boxes, states, _ = cam
    jpegs = [policy_client.jpeg_bytes(f, quality=90) for f in frames]  # what a camera sends
    decoded = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    cache = VisionCache()

    def in_process(k):  # timed in a thread of its own, as the server's model runs
        window = slice(k, k + F)
        t0 = time.perf_counter()
        [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs[window]]  # what the server adds
        decode.append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        out = model.predict(decoded[window], boxes[window], "jumping jacks", "Do jumping jacks.", states[k],
                            noise=torch.randn(16, 44, generator=torch.Generator().manual_seed(k)), cache=cache)
        sync(device)
        return out, time.perf_counter() - t0

    pairs, worst, decode = [], 0.0, []
    with serve.PolicyServer(model, port=0) as server, ThreadPoolExecutor(1) as worker:
        client = policy_client.PolicyClient(server.url)
        for k in range(calls):
            mine, t_in = worker.submit(in_process, k).result()
            # the server draws its noise from the seed, as in_process does
            theirs = client.act(jpegs[k:k + F], boxes[k:k + F], "jumping jacks", "Do jumping jacks.", states[k],
                                seed=k)
            pairs.append((theirs["round_trip_ms"] / 1e3, t_in))
            worst = max(worst, float(np.abs(np.angle(np.exp(1j * (theirs["angles"] - mine)))).max()))
        client.close()
    return pairs, worst, statistics.median(decode)


# --------------------------------------------------------------------------------------------------
# Report


COLORS = [(90, 90, 90), (214, 39, 40), (255, 127, 14), (31, 119, 180), (44, 160, 44), (148, 103, 189),
          (23, 190, 207)]


def plot_timeline(per_call, title, path):
    """Per-call latency (ms) of every row along the loop (the first call encodes four frames)."""
    from eval import load_font, nice_ticks, save_png

    W, H, px0, py0, px1, py1 = 800, 420, 60, 40, 520, 380
    img = Image.new("RGB", (W, H), "white")
    draw, f = ImageDraw.Draw(img), load_font(12)
    draw.text((W / 2, 6), title, fill=(0, 0, 0), font=load_font(13), anchor="mt")
    n = max(len(v) for v in per_call.values())
    yt = nice_ticks(0.0, max(max(v) for v in per_call.values()) * 1e3)
    X = lambda k: px0 + k / max(n - 1, 1) * (px1 - px0)  # noqa: E731
    Y = lambda ms: py1 - ms / yt[-1] * (py1 - py0)  # noqa: E731
    for t in yt:
        draw.line([(px0, Y(t)), (px1, Y(t))], fill=(225, 225, 225))
        draw.text((px0 - 5, Y(t)), f"{t:g}", fill=(0, 0, 0), font=f, anchor="rm")
    for k in sorted({0, n - 1} | set(range(4, n - 1, 5))):
        draw.text((X(k), py1 + 5), str(k + 1), fill=(0, 0, 0), font=f, anchor="mt")
    draw.rectangle([px0, py0, px1, py1], outline=(0, 0, 0))
    draw.text(((px0 + px1) / 2, H - 8), "call in the rolling loop (10 Hz, window slides by one frame)",
              fill=(0, 0, 0), font=f, anchor="mb")
    draw.text((px0 - 50, py0 - 6), "ms per call", fill=(0, 0, 0), font=f, anchor="lb")
    for j, (name, ts) in enumerate(per_call.items()):
        c = COLORS[j % len(COLORS)]
        pts = [(X(k), Y(t * 1e3)) for k, t in enumerate(ts)]
        draw.line(pts, fill=c, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        draw.line([(px1 + 15, py0 + 10 + 20 * j), (px1 + 35, py0 + 10 + 20 * j)], fill=c, width=3)
        draw.text((px1 + 40, py0 + 10 + 20 * j), name, fill=(0, 0, 0), font=f, anchor="lm")
    return save_png(img, path)


def bench_config(name, args, device):
    rng = np.random.default_rng(0)
    cuda = device.type == "cuda"
    # the precision rule: bf16 autocast on CUDA, fp32 on CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    base = build_model(name, device, dtype).eval()
    print(f"\n== {name}: {sum(p.numel() for p in base.parameters()) / 1e6:,.1f}M parameters, {device.type}, "
          f"built in {time.perf_counter() - t0:.1f} s")
    F, calls = base.config.num_frames, args.calls
    cam = camera(calls, F, rng)
    frames, boxes, states, noise = cam
    ref = Reference(base, device, dtype)
    vocab = base.qwen_config.text.vocab_size
    print(f"reference: transformers + peft, {base.kept} layers kept, LM head {vocab:,} x "
          f"{base.qwen_config.text.hidden_size} on every token, transformers' processor per call")

    rows = {"reference": None, "eager": base, "cache": base}
    rows["merged"] = optimize(copy.deepcopy(base), dtype=dtype if cuda else None)
    if not args.no_compile:
        rows["compiled"] = optimize(copy.deepcopy(base), dtype=dtype if cuda else None,
                                    compile="reduce-overhead" if cuda else True)
    if not cuda and cpu_has_bf16() and not args.no_bf16:
        rows["merged bf16"] = optimize(copy.deepcopy(base), dtype=torch.bfloat16)
    labels = {"reference": "reference (transformers + peft)", "eager": "ours, eager", "cache": "ours + cache",
              "merged": "ours + cache + merged LoRA" + (", bf16 weights" if cuda else ""),
              "compiled": "ours + cache + merged + compiled" + (" (CUDA graphs)" if cuda else ""),
              "merged bf16": "ours + cache + merged, bf16"}

    # --- the same numbers first ---
    w = slice(0, F)
    s44 = torch.from_numpy(encode_angles(states[0])).float()[None]
    want = ref.actions(frames[w], boxes[w], "jumping jacks", "Do jumping jacks.", s44, noise[0][None]).float().cpu()
    tol = {torch.float32: 1e-3, torch.bfloat16: 0.15}
    compile_s = None
    for key, model in rows.items():
        if model is None:
            continue
        t0 = time.perf_counter()
        got = first_call_actions(model, frames[w], boxes[w], states[0], noise[0]).float().cpu()
        if key == "compiled":
            compile_s, graphs = time.perf_counter() - t0, compiled_graphs()
        diff = float((got - want).abs().max())
        half = cuda or "bf16" in key
        lim = tol[torch.bfloat16 if half else torch.float32]
        print(f"  {labels[key]:45s} max |actions - reference| = {diff:.2e} (tolerance {lim:g})")
        if not diff <= lim and not half:
            raise SystemExit(f"{labels[key]} disagrees with the reference: {diff:.3g} > {lim:g}")
        # bf16 rounding differs between implementations: say it, but still time the rows
        if not diff <= lim:
            print(f"  WARNING: {labels[key]} is {diff:.3g} from the reference in bf16 (> {lim:g}); check it")

    def call_fn(key):
        model = rows[key]
        if key == "reference":
            return lambda k, cache: ref.actions(frames[k:k + F], boxes[k:k + F], "jumping jacks", "Do jumping jacks.",
                                                torch.from_numpy(encode_angles(states[k])).float()[None],
                                                noise[k][None])
        use = None if key == "eager" else True
        return lambda k, cache: model.predict(frames[k:k + F], boxes[k:k + F], "jumping jacks", "Do jumping jacks.",
                                              states[k], noise=noise[k], cache=cache if use else None)

    fns = {key: call_fn(key) for key in rows}
    for key, fn in fns.items():  # warm-up loop: lazy initialisation, allocator and caches
        run_loop(fn, calls, device)
    times = {key: [] for key in fns}
    reset_peak(device)
    for r in range(args.repeats):
        for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[key].append(run_loop(fns[key], calls, device))
    per_call = {key: [statistics.median(t[k] for t in ts) for k in range(calls)] for key, ts in times.items()}
    loop = {key: statistics.mean(v) for key, v in per_call.items()}
    print(f"rolling loop, {calls} calls, batch 1, {base.config.diffusion_steps} flow step; median of {args.repeats} "
          f"loops per call; peak memory {peak_mib(device):,.0f} MiB")
    print(f"  {'row':45s} {'call 1':>9s} {'steady':>9s} {'loop mean':>10s} {'vs reference':>13s}")
    for key, v in per_call.items():
        print(f"  {labels[key]:45s} {v[0] * 1e3:7.1f}ms {statistics.median(v[1:]) * 1e3:7.1f}ms "
              f"{loop[key] * 1e3:8.1f}ms {loop[key] / loop['reference']:12.2f}x")
    pre = {}
    for key, fn in (("reference", ref.preprocess), ("ours", base.prepare)):
        ts = []
        for k in range(calls):
            t0 = time.perf_counter()
            fn(frames[k:k + F], boxes[k:k + F], "jumping jacks", "Do jumping jacks.")
            ts.append(time.perf_counter() - t0)
        pre[key] = statistics.median(ts)
    print(f"  preprocessing alone (boxes, resize, prompt, tokens; the reference also patches pixels): reference "
          f"{pre['reference'] * 1e3:.1f} ms, ours {pre['ours'] * 1e3:.1f} ms (patching happens on the device)")
    if compile_s is not None:
        after = compiled_graphs()
        print(f"  compiled row: first call {compile_s:.1f} s, compiling {graphs} graphs (the vision tower for one "
              f"frame, the step); after all loops {after}: " + ("no recompilation" if after == graphs else
                                                               "RECOMPILED during the loops"))

    if not args.no_server:
        srv = server_rows(rows["merged"], cam, F, calls, device)
        if srv is not None:
            pairs, worst, decode = srv
            over = statistics.median(a - b for a, b in pairs[1:])
            print(f"server (127.0.0.1, JSON + base64 JPEG, cache + merged model): round trip "
                  f"{statistics.median(a for a, _ in pairs[1:]) * 1e3:.1f} ms vs in-process "
                  f"{statistics.median(b for _, b in pairs[1:]) * 1e3:.1f} ms: overhead {over * 1e3:.1f} ms "
                  f"(median of calls 2..{calls}), of which decoding the {F} JPEGs is {decode * 1e3:.1f} ms; "
                  f"max |angle difference| {worst:.1e} rad")
    if args.plot:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
        path = plot_timeline({labels[k]: v for k, v in per_call.items()},
                             f"{name}, {where}, load {load:.1f}: latency of each call of the rolling loop", args.plot)
        print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help="comma list of tiny, mid, mimic-4b (default: mid on CPU, "
                                                    "mimic-4b on CUDA)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--calls", type=int, default=20, help="calls in the rolling loop")
    ap.add_argument("--repeats", type=int, default=3, help="timed loops per row (per-call medians)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled row (its compile takes minutes)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the CPU bf16 row")
    ap.add_argument("--no-server", action="store_true", help="skip the server round trip")
    ap.add_argument("--plot", default=None, help="write the per-call latency picture (PNG) here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    names = (args.configs or ("mimic-4b" if device.type == "cuda" else "mid")).split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device.type} ({gpu}), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} cores")
    for name in names:
        bench_config(name, args, device)


if __name__ == "__main__":
    main()
