"""
Benchmark qwen3vl.py against transformers' Qwen3VLForConditionalGeneration on the MIMIC
input (4 frames of 224x224 as 4 images + ~40 text tokens), with the SAME random weights
(the reference is saved with save_pretrained and loaded by our loader).

Measures, as the median over --iters runs after one warm-up:
  - full forward (all logits) at batch 1 and 8: ours / reference time ratio
  - k-layer feature extraction (MIMIC: layers k//2 and k-1 of a k-layer early-exit model);
    the reference is the HF model with its decoder truncated to k layers
    (what MIMIC's original code does) + output_hidden_states
  - peak RSS of Qwen3VL.from_pretrained(num_layers=k) in a fresh subprocess
    (RSS peak minus RSS before) against the bytes of the tensors it keeps.

  python bench/qwen3vl.py                                             # mid-size config, fp32, CPU
  python bench/qwen3vl.py --device cuda --dtype bf16 --preset 4B --k 18
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qwen3vl  # noqa: E402

VS, VE, IMG, VID = 151652, 151653, 151655, 151656
OFF = 151652 - 31990  # mid-size config: special ids shifted into its 32000-token vocabulary


def hf_config(args):
    import transformers
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    if args.preset:
        p = qwen3vl.PRESETS[args.preset]
        t, v = p.text, p.vision
        text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                    intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                    num_attention_heads=t.num_attention_heads,
                    num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim)
        vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      num_heads=v.num_heads, out_hidden_size=v.out_hidden_size,
                      deepstack_visual_indexes=list(v.deepstack_visual_indexes))
        tie = p.tie_word_embeddings
    else:  # mid-size: fits a small CPU box; vocab cut to 32000 (token ids moved inside it) so
        # that, as in the 4B, the LM head is a small share of the FLOPs, not the comparison
        ids = dict(image_token_id=IMG - OFF, video_token_id=VID - OFF, vision_start_token_id=VS - OFF,
                   vision_end_token_id=VE - OFF)
        text = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64)
        vision = dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4,
                      out_hidden_size=512, deepstack_visual_indexes=[1, 3, 5])
        tie = True
    # (T, H, W) slots: 3/8, 5/16, 5/16 of the half dim ([24, 20, 20] for 128)
    half = text["head_dim"] // 2
    text["rope_parameters"] = dict(
        rope_type="default", rope_theta=5e6, mrope_interleaved=True,
        mrope_section=[half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16])
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                      tie_word_embeddings=tie, **ids)


def mimic_inputs(cfg, batch, device, gen):
    # <|im_start|>user\n + 4 x (vision_start, 49 image pads, vision_end) + ~40 text
    # tokens (task + instruction)
    vs, ve, img = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id
    one = [1, 872, 198]
    for _ in range(4):
        one += [vs] + [img] * 49 + [ve]
    one += torch.randint(0, vs - 10, (34,), generator=gen).tolist() + [2, 198, 1, 7709, 198]
    ids = torch.tensor([one] * batch, device=device)
    grid = torch.tensor([[1, 14, 14]] * 4 * batch, device=device)
    pix = torch.randn(4 * batch * 196, 1536, generator=gen).to(device)
    return ids, grid, pix


def timed(fns, iters, device):
    """Median seconds of each fn; rounds alternate a, b / b, a / ... so background load and
    allocator or cache state left by the previous call hit both alike."""
    times = [[] for _ in fns]
    for it in range(iters + 1):
        order = list(zip(fns, times))
        for fn, ts in (order if it % 2 else order[::-1]):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if it > 0:  # the first round is warm-up
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def load_rss(path, k, dtype):
    """In a subprocess: peak RSS growth while loading a k-layer early-exit model, its kept bytes."""
    # VmHWM (not ru_maxrss, which a child inherits from its parent across fork+exec) is this
    # process's RSS peak. safetensors maps the file; tensors that need no cast stay file-backed and
    # are paged in lazily, so we also report the RSS after touching every kept tensor once.
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import qwen3vl
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
# warm-up: `before` then holds what a first torch/safetensors call maps in (kernels, allocator)
with torch.device('meta'):
    qwen3vl.Qwen3VL(qwen3vl.Qwen3VLConfig.from_hf(__import__('json').load(open({path!r} + '/config.json'))))
float((torch.randn(64, 64) @ torch.randn(64, 64)).sum())
qwen3vl.safetensors_files({path!r})
before = status('VmRSS')
m = qwen3vl.Qwen3VL.from_pretrained({path!r}, num_layers={k}, dtype=torch.{dtype})
peak = status('VmHWM')
touched = sum(float(t.sum()) for t in m.state_dict().values())
after = status('VmRSS')
kept = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(before, peak, after, kept)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak, after, kept = map(int, out)
    return peak - before, after - before, kept


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(qwen3vl.PRESETS), default=None,
                   help="real shapes (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--k", type=int, default=None,
                   help="early-exit layers (default: 18 for presets with >= 36 layers, else L // 2)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    import transformers
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = hf_config(args)
    L = cfg.text_config.num_hidden_layers
    k = args.k or (18 if L >= 36 else L // 2)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(args.device):
            ref = transformers.Qwen3VLForConditionalGeneration(cfg).to(dtype).eval()
        ref.save_pretrained(tmp)
        # reload so the reference gets transformers' own from_pretrained dtype
        # handling (fp32 inv_freq)
        del ref
        ref = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp, dtype=dtype,
                                                                           device_map=args.device).eval()
        ours = qwen3vl.Qwen3VL.from_pretrained(tmp, dtype=dtype, device=args.device)
        ours_k = qwen3vl.Qwen3VL.from_pretrained(tmp, num_layers=k, dtype=dtype, device=args.device)
        # truncated reference, as MIMIC's original code does it: a second HF model whose
        # decoder keeps layers[:k]
        ref_k = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp, dtype=dtype,
                                                                             device_map=args.device).eval().model
        ref_k.language_model.layers = ref_k.language_model.layers[:k]
        ref_k.language_model.config.num_hidden_layers = k
        print(f"device={args.device} dtype={args.dtype} preset={args.preset or 'mid-size'} L={L} k={k} "
              f"threads={torch.get_num_threads()} torch={torch.__version__} "
              f"transformers={transformers.__version__}")
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            ids, grid, pix = mimic_inputs(cfg, B, args.device, gen)
            mm = (ids == cfg.image_token_id).int()
            pix = pix.to(dtype)
            with torch.inference_mode():
                t_ref, t_our = timed([
                    lambda: ref(input_ids=ids, pixel_values=pix, image_grid_thw=grid, mm_token_type_ids=mm,
                                use_cache=False),
                    lambda: ours(ids, pixel_values=pix, image_grid_thw=grid)], args.iters, args.device)
                f_ref, f_our = timed([
                    lambda: ref_k(input_ids=ids, pixel_values=pix, image_grid_thw=grid, mm_token_type_ids=mm,
                                  use_cache=False, output_hidden_states=True),
                    lambda: ours_k(ids, pixel_values=pix, image_grid_thw=grid, hidden_layers=(k // 2, k - 1))],
                    args.iters, args.device)
            print(f"batch {B} (S={ids.shape[1]}): full forward  ours {t_our * 1e3:8.1f} ms  "
                  f"ref {t_ref * 1e3:8.1f} ms  ratio {t_our / t_ref:.2f}")
            print(f"batch {B} (S={ids.shape[1]}): {k}-layer feats ours {f_our * 1e3:8.1f} ms  "
                  f"ref {f_ref * 1e3:8.1f} ms  ratio {f_our / f_ref:.2f}")
        if not args.skip_memory and args.device == "cpu":
            del ref, ours, ours_k, ref_k
            peak, touched, kept = load_rss(tmp, k, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
            print(f"load num_layers={k}: kept tensors {kept / 2**20:.1f} MiB; peak RSS growth during load "
                  f"{peak / 2**20:.1f} MiB ({peak / kept:.2f}x); RSS growth after touching every tensor "
                  f"{touched / 2**20:.1f} MiB ({touched / kept:.2f}x)")


if __name__ == "__main__":
    main()
