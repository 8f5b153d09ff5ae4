"""
The MIMIC vision-language-action model: an early-exit Qwen3-VL backbone (+ LoRA on its LLM) feeding
a DiT flow-matching head that predicts 16 steps of 22 joint angles (44 sin/cos numbers) at 10 Hz.

    4 frames (224x224, target box drawn) + "Task: {class}. Instruction: {text}"
      -> Qwen3-VL decoder layers 0..tap (tap = 17 of the 4B's 36; no final norm, no lm_head)
      -> vl = layer-tap output (B, S, 2560); deep = concat(layer tap//2, layer tap) (B, S, 5120)
      -> dit.ActionHead(vl, masked-mean(deep), state): Euler / RK4 from noise -> (B, 16, 44)

The input / output conventions are model_io.py's. With qwen3vl.py, qwen3vl_processor.py, lora.py,
dit.py and model_io.py this file stands alone (they import nothing else of the repo).

    python model.py describe --preset mimic-4b     # parameter breakdown on the meta device
"""

import argparse
import json
import math
import os
import re
import sys
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import qwen3vl
import qwen3vl_processor
from dit import ActionHead, DiTConfig
from lora import apply_lora, lora_modules
from model_io import InputEncoder, collate_inputs, decode_angles, encode_angles, frame_image, prompt_text

# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class VLAConfig:
    """The released config.yaml's `model_config` fields (its defaults) plus a few of ours."""

    qwen_model_name: str = "Qwen/Qwen3-VL-4B-Instruct"  # a local folder; a hub id is never fetched
    qwen_hidden_size: int = 2560  # Q, checked against the backbone config
    use_intermediate_hidden: bool = True  # features of layer `tap` (released) or of the last layer
    hidden_layer_fraction: float = 0.5  # kept layers = int(num_layers * fraction); tap = kept - 1
    use_deepstack_features: bool = True  # MIMIC's pooled concat(layer tap//2, layer tap)
    projection_dim: int = 1024  # P in qwen_projection
    action_dim: int = 44  # 22 angles as interleaved sin/cos
    diffusion_hidden_dim: int = 1536  # D
    num_diffusion_layers: int = 24
    num_diffusion_heads: int = 24
    num_future_tokens: int = 4
    action_horizon: int = 16  # H: 1.6 s at 10 Hz
    num_frames: int = 4  # frames before the window fed as images
    use_lora: bool = True
    lora_rank: int = 128
    lora_alpha: float = 128.0
    lora_dropout: float = 0.05
    lora_target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    freeze_vision_encoder: bool = True
    freeze_qwen_layers: bool = True  # the LLM's base weights (LoRA trains either way)
    diffusion_steps: int = 1  # sampler steps at inference (released: 1 Euler step)
    diffusion_dropout: float = 0.1
    image_size: int = 224
    # accepted so that the released config.yaml loads; they steered the original code, not this one
    hidden_layer_index: int = 18  # ignored in favour of hidden_layer_fraction, as the original did
    use_early_exit: bool = True  # layers after the tap never affect the output: always on
    use_flash_attention: bool = False  # ignored: torch SDPA picks flash kernels itself
    use_thinking_mode: bool = False  # must be False: the plain Instruct template
    init_from_current_pose: bool = False  # must be False: the original never implemented it
    use_dynamic_resolution: bool = False  # must be False: frames are resized to image_size
    action_chunking: bool = True  # must be True: the head predicts the whole horizon
    # ours
    qwen_config: dict = None  # the backbone's config.json; None: from qwen_model_name or a preset
    time_sampling: str = "uniform"  # training t: "uniform" (released) or "beta"
    sampler: str = "euler"  # "euler" (released) or "rk4"

    def __post_init__(self):
        for name in ("use_thinking_mode", "init_from_current_pose", "use_dynamic_resolution"):
            if getattr(self, name):
                raise ValueError(f"VLAConfig.{name}=True is not supported: the released model does not use it "
                                 f"(the original never implemented it); set it to False")
        if not self.action_chunking:
            raise ValueError("VLAConfig.action_chunking=False is not supported: the head predicts the whole horizon")
        if self.action_dim % 2:
            raise ValueError(f"action_dim must be 2 x the number of angles (sin/cos), got {self.action_dim}")
        if self.sampler not in ("euler", "rk4"):
            raise ValueError(f"sampler must be 'euler' or 'rk4', got {self.sampler!r}")

    def kept_layers(self, num_hidden_layers: int) -> int:
        """Decoder layers to build: int(L * fraction) as the original computes it, or all."""
        if not self.use_intermediate_hidden:
            return num_hidden_layers
        k = int(num_hidden_layers * self.hidden_layer_fraction)
        if not 1 <= k <= num_hidden_layers:
            raise ValueError(f"hidden_layer_fraction={self.hidden_layer_fraction} keeps {k} of "
                             f"{num_hidden_layers} layers")
        return k


# A tiny backbone for tests and CPU demos: Qwen3-VL's structure at toy width (config.json form),
# with qwen3vl_processor.byte_level_tokenizer, so nothing needs downloading.
TINY_QWEN = {
    "model_type": "qwen3_vl",
    "tie_word_embeddings": True,
    "image_token_id": 263, "video_token_id": 264, "vision_start_token_id": 260, "vision_end_token_id": 261,
    "text_config": {
        "vocab_size": 266, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0, "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2],
                                                  "mrope_interleaved": True},
        "max_position_embeddings": 4096, "hidden_act": "silu", "attention_bias": False,
        "bos_token_id": 256, "eos_token_id": 258, "tie_word_embeddings": True,
    },
    "vision_config": {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "in_channels": 3, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0, 1], "hidden_act": "gelu_pytorch_tanh",
    },
}

PRESETS = {
    "mimic-4b": dict(),  # the released model
    # toy sizes for tests and the CPU demo; the backbone trains fully (it is random), no LoRA
    "tiny": dict(qwen_model_name="tiny", qwen_hidden_size=64, projection_dim=64, image_size=128,
                 diffusion_hidden_dim=128, num_diffusion_layers=4, num_diffusion_heads=4, use_lora=False,
                 freeze_vision_encoder=False, freeze_qwen_layers=False, diffusion_dropout=0.0),
}


def backbone_config(config: VLAConfig):
    """(Qwen3VLConfig, folder or None): from config.qwen_config, the local folder or a preset."""
    folder = Path(config.qwen_model_name) if config.qwen_model_name else None
    folder = folder if folder is not None and (folder / "config.json").is_file() else None
    if folder is not None and "text_config" not in json.loads((folder / "config.json").read_text()):
        folder = None  # a converted MIMIC folder: the backbone config is in its qwen_config
    if config.qwen_config is not None:
        qcfg = qwen3vl.Qwen3VLConfig.from_hf(config.qwen_config)
    elif config.qwen_model_name == "tiny":
        qcfg = qwen3vl.Qwen3VLConfig.from_hf(TINY_QWEN)
    elif folder is not None:
        qcfg = qwen3vl.Qwen3VLConfig.from_hf(json.loads((folder / "config.json").read_text()))
    else:
        size = re.search(r"Qwen3-VL-(\d+B)", config.qwen_model_name or "")
        if size is None or size.group(1) not in qwen3vl.PRESETS:
            raise ValueError(f"qwen_model_name={config.qwen_model_name!r} is neither a local Qwen3-VL folder (with "
                             f"config.json) nor a known hub name; nothing is ever downloaded: pass a folder")
        qcfg = qwen3vl.PRESETS[size.group(1)]
    if qcfg.text.hidden_size != config.qwen_hidden_size:
        raise ValueError(f"qwen_hidden_size={config.qwen_hidden_size} but the backbone's hidden size is "
                         f"{qcfg.text.hidden_size}")
    return qcfg, folder


# The Qwen3-VL checkpoints' preprocessor_config.json, for the tiny preset (which has no folder)
QWEN3VL_PREPROCESSOR = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                        "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216},
                        "resample": 3}


def build_processor(config: VLAConfig, folder, qcfg):
    """The folder's tokenizer + preprocessor (Qwen3-VL or converted MIMIC), or the tiny preset's.
    min_pixels drops to image_size^2: 224x224 frames stay 224x224 (49 tokens, as released) where
    the stock 65536 would upscale them to 256x256."""
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        proc = qwen3vl_processor.Qwen3VLProcessor.from_pretrained(folder)
    elif config.qwen_model_name == "tiny":
        tokenizer = qwen3vl_processor.byte_level_tokenizer()
        image_cfg = qwen3vl_processor.Qwen3VLPreprocessConfig.from_hf(QWEN3VL_PREPROCESSOR, "image")
        proc = qwen3vl_processor.Qwen3VLProcessor(tokenizer, image_cfg)
    else:
        raise FileNotFoundError(f"no tokenizer for qwen_model_name={config.qwen_model_name!r}: point it (or --qwen) "
                                f"at a local Qwen3-VL folder with tokenizer.json and preprocessor_config.json")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(proc, name) != getattr(qcfg, name):
            raise ValueError(f"tokenizer's {name} {getattr(proc, name)} != backbone config's {getattr(qcfg, name)}")
    proc.image_config = replace(proc.image_config, min_pixels=min(proc.image_config.min_pixels, config.image_size ** 2))
    return proc


# --------------------------------------------------------------------------------------------------
# The model


def use_tf32(enabled: bool = True):
    """TF32 for fp32 CUDA matmuls (train, eval and sample turn it on); off is exact fp32. Only the
    newer switch is touched where it exists: mixed with allow_tf32, torch cannot report the mode."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:  # torch < 2.9
        matmul.allow_tf32 = enabled


def frozen_checksum(model: nn.Module) -> float:
    """Sum of |w| of the frozen parameters as bf16, in float64 (the same for fp32 or bf16 copies): a
    trainable-only folder records it, so that a different base is an error, not a silent change."""
    total = torch.zeros((), dtype=torch.float64)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad and p.is_floating_point():
            total += p.detach().to(torch.bfloat16).double().abs().sum().cpu()
    return float(total)


def cast_frozen_(module: nn.Module, dtype):
    """Frozen parameters to `dtype` (bf16 on a GPU, as released). Parameters that train stay fp32:
    AdamW updates of ~1e-5 on weights of ~0.02 would round away in bf16. Buffers stay fp32."""
    for p in module.parameters():
        want = torch.float32 if p.requires_grad else dtype
        if want is not None and p.dtype != want and p.is_floating_point():
            p.data = p.data.to(want)


class VLAModel(nn.Module):
    """Backbone (`qwen_model`, a Qwen3VL cut after layer `tap`) + `action_head` (dit.ActionHead).
    Loads the Qwen3-VL weights of a local config.qwen_model_name folder (unless load_backbone is
    False), else initialises randomly; `backbone_dtype` applies to the frozen parameters only."""

    def __init__(self, config: VLAConfig, load_backbone: bool = True, backbone_dtype=None):
        super().__init__()
        self.config = config
        qcfg, folder = backbone_config(config)
        self.qwen_config = qcfg
        self.kept = config.kept_layers(qcfg.text.num_hidden_layers)
        self.tap = self.kept - 1  # the VL tokens: layer 17's own output for the 4B
        self.deep_tap = self.tap // 2  # MIMIC's "deep" features pair it with layer 8 (4B)
        if folder is not None and load_backbone:
            self.qwen_model = qwen3vl.Qwen3VL.from_pretrained(folder, num_layers=self.kept,
                                                              dtype=backbone_dtype or torch.float32)
        else:
            self.qwen_model = qwen3vl.Qwen3VL(qcfg, num_layers=self.kept)
        if config.use_lora:  # on the LLM only (the vision tower's names differ); freezes the rest
            apply_lora(self.qwen_model.model.language_model, list(config.lora_target_modules),
                       rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
        self.qwen_model.model.language_model.requires_grad_(not config.freeze_qwen_layers)
        for m in lora_modules(self.qwen_model).values():
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
        self.qwen_model.model.visual.requires_grad_(not config.freeze_vision_encoder)
        # DeepStack level j is added after layer j and we read layer tap's own output, so levels
        # j >= tap (toy configs only) get no gradient: frozen, or DDP fails on them
        for j, merger in enumerate(self.qwen_model.model.visual.deepstack_merger_list):
            if j >= self.tap:
                merger.requires_grad_(False)
        cast_frozen_(self.qwen_model, backbone_dtype)
        self.action_head = ActionHead(DiTConfig.from_vla(asdict(config)))
        self._processor = self._encoder = None
        self._luts = {}  # device -> the (256, 3) pixel table on it
        self._inference = None  # inference.Optimized once inference.optimize has run
        tok_dir = Path(config.qwen_model_name or ".")
        self._processor_folder = tok_dir if (tok_dir / "tokenizer.json").is_file() else None

    # --- inputs ---------------------------------------------------------------------------------

    @property
    def processor(self):
        """The Qwen3-VL processor (tokenizer + image settings), built lazily (build_processor)."""
        if self._processor is None:
            self._processor = build_processor(self.config, self._processor_folder, self.qwen_config)
        return self._processor

    def encoder(self) -> InputEncoder:
        """The picklable (images, text) -> one sample's input (DataLoader workers, servers)."""
        if self._encoder is None:
            self._encoder = InputEncoder(self.processor, self.qwen_config, self.config.image_size)
        return self._encoder

    def prepare(self, frames, boxes, task: str, instruction: str) -> dict:
        """One sample's input, as training builds it: the num_frames frames before now (PIL or uint8
        (H, W, 3), any size, oldest first), the target's box in each ((F, 4) x1 y1 x2 y2 in that
        frame's pixels; a NaN row draws nothing), the task (action class) and the instruction."""
        F_ = self.config.num_frames
        if frames is None or len(frames) != F_:
            raise ValueError(f"need the {F_} frames before now, got {None if frames is None else len(frames)}")
        if boxes is None or isinstance(boxes, str):
            raise ValueError("boxes are required: the target person's (x1, y1, x2, y2) in each frame, shape "
                             f"({F_}, 4) (the model was trained with the box drawn; NaN rows = unknown); "
                             "call predict(frames, boxes, task, instruction, state_angles)")
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (F_, 4):
            raise ValueError(f"boxes must have shape ({F_}, 4), got {boxes.shape}")
        for name, v in (("task", task), ("instruction", instruction)):
            if not isinstance(v, str):
                raise ValueError(f"{name} must be a string (the prompt is 'Task: {{task}}. Instruction: "
                                 f"{{instruction}}'), got {type(v).__name__}")
        images = [frame_image(f, b, self.config.image_size) for f, b in zip(frames, boxes)]
        return self.encoder()(images, prompt_text(task, instruction))

    def encode(self, images, instructions) -> dict:
        """The original's inputs: B lists of frames (box drawn) and B full prompts -> a batch."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} image lists but {len(instructions)} instructions")
        enc = self.encoder()
        samples = [enc(list(fr), text) for fr, text in zip(images, instructions)]
        return collate_inputs(samples, enc.pad_token_id)

    def encode_frames(self, frames: torch.Tensor):
        """frames (N, S, S, 3) uint8 -> the vision tower's (tokens, [DeepStack levels])."""
        dev = self.action_head.future_tokens.device
        return self.vision_on_device(frames.to(dev, non_blocking=True), self.pixel_lut(dev))

    def pixel_lut(self, dev):
        if dev not in self._luts:
            self._luts[dev] = qwen3vl_processor.pixel_lut(self.processor.image_config).to(dev)
        return self._luts[dev]

    def vision_on_device(self, frames: torch.Tensor, lut: torch.Tensor):
        """encode_frames for frames already on the device (what compile=True traces)."""
        cfg = self.processor.image_config
        pv, _ = qwen3vl_processor.pixel_values_from_frames(frames, cfg, lut)
        n, h, w, _ = frames.shape
        return self.qwen_model.model.visual(pv, [(1, h // cfg.patch_size, w // cfg.patch_size)] * n)

    def features(self, inputs: dict, cache=None):
        """collate_inputs' batch (CPU tensors) -> (vl (B, S, Q), deep (B, S, 2Q) or None, mask
        (B, S) bool); only layers 0..tap run. `cache` reuses per-frame vision outputs."""
        dev = self.action_head.future_tokens.device
        frames = inputs["frames"]  # (B, F, S, S, 3) uint8
        flat = frames.reshape(-1, *frames.shape[2:])
        image_embeds = cache.encode(flat, self.encode_frames) if cache is not None else self.encode_frames(flat)
        out = self.qwen_model(input_ids=inputs["input_ids"].to(dev, non_blocking=True),
                              attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
                              image_embeds=image_embeds, visual_rows=inputs["visual_rows"],
                              hidden_layers=(self.deep_tap, self.tap))
        vl = out.layer_outputs[self.tap]
        deep = torch.cat([out.layer_outputs[self.deep_tap], vl], dim=-1) if self.config.use_deepstack_features else None
        return vl, deep, inputs["attention_mask"].to(dev, non_blocking=True).bool()

    def autocast(self):
        """The one precision rule of training and inference: bf16 autocast on CUDA (as released),
        fp32 on the CPU; after inference.optimize(dtype=...), that dtype on any device."""
        dev = self.action_head.future_tokens.device
        dtype = self._inference.dtype if self._inference is not None else None
        if dtype is not None:
            return torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    # --- training / inference -------------------------------------------------------------------

    def forward(self, images=None, instructions=None, actions=None, timesteps=None, robot_state=None,
                compute_loss=True, noise=None, inputs=None, steps=None, cache=None):
        """The original's signature: images + instructions (see encode) or `inputs` (a collated
        batch), robot_state (B, 44), actions (B, H, 44) sin/cos targets, timesteps (B,), noise
        (B, H, 44) for exact reproduction. -> {'loss'} when actions are given (and compute_loss),
        else {'actions': (B, H, 44)}."""
        if robot_state is None:
            raise ValueError("robot_state (B, 44) is required: the head is conditioned on the current pose")
        if inputs is None:
            inputs = self.encode(images, instructions)
        if self._inference is not None and (actions is None or not compute_loss):  # optimized
            return {"actions": self._inference.actions(self, inputs, robot_state, noise, steps, cache)}
        dev = self.action_head.future_tokens.device
        vl, deep, mask = self.features(inputs, cache)
        head_dtype = self.action_head.future_tokens.dtype
        vl, deep = vl.to(head_dtype), deep.to(head_dtype) if deep is not None else None
        state = robot_state.to(dev, head_dtype)
        noise = noise.to(dev, head_dtype) if noise is not None else None
        if actions is not None and compute_loss:
            timesteps = timesteps.to(dev) if timesteps is not None else None
            loss = self.action_head.loss(vl, deep, mask, state, actions.to(dev, head_dtype), timesteps=timesteps,
                                         noise=noise, schedule=self.config.time_sampling)
            return {"loss": loss}
        acts = self.action_head.sample(vl, deep, mask, state, steps=steps or self.config.diffusion_steps,
                                       noise=noise, method=self.config.sampler)
        return {"actions": acts}

    @torch.inference_mode()
    def predict(self, frames, boxes, task: str, instruction: str, state_angles, steps=None, noise=None,
                cache=None) -> np.ndarray:
        """One control step: frames, boxes, task, instruction (see prepare) and the current angles
        (22,) in radians -> (H, 22) predicted radians, row 0 the current step. `noise` (H, 44) fixes
        the sampler's start; `cache` reuses the vision outputs of frames seen before."""
        state = np.asarray(state_angles, dtype=np.float64)  # sin/cos in float64, as in training
        if state.shape != (self.config.action_dim // 2,) or not np.all(np.isfinite(state)):
            raise ValueError(f"state_angles must be {self.config.action_dim // 2} finite radians, got shape "
                             f"{state.shape}")
        inputs = collate_inputs([self.prepare(frames, boxes, task, instruction)], self.encoder().pad_token_id)
        if noise is not None:
            noise = torch.as_tensor(noise, dtype=torch.float32).reshape(1, self.config.action_horizon, -1)
        with self.autocast():
            robot_state = torch.from_numpy(encode_angles(state)).float()[None]
            out = self(inputs=inputs, robot_state=robot_state, compute_loss=False, noise=noise, steps=steps,
                       cache=cache)["actions"]
        return decode_angles(out[0].float().cpu().numpy())

    def train(self, mode: bool = True):
        if mode and getattr(self, "_inference", None) is not None:
            raise RuntimeError("this model was optimized for inference (LoRA merged, weights cast or compiled): it "
                               "must not train; load a fresh model to train")
        return super().train(mode)

    # --- checkpoints ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Our own keys or the released checkpoint's (mapped by map_released_keys). strict raises
        naming every unplaced or missing key; strict=False (the model card's call) prints the same
        lists as a loud warning and loads the rest. A shape mismatch always raises."""
        mapped, ignored, unplaced = map_released_keys(state_dict, self)
        own = self.state_dict()
        missing = sorted(set(own) - set(mapped))
        bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
               for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError("shape mismatch for %d tensors:\n  " % len(bad) + "\n  ".join(bad))
        if unplaced or missing:
            msg = (f"VLAModel.load_state_dict: {len(unplaced)} checkpoint keys could not be placed, {len(missing)} "
                   f"model keys are missing" + "".join(f"\n  unplaced: {k}" for k in unplaced)
                   + "".join(f"\n  missing: {k}" for k in missing))
            if strict:
                raise KeyError(msg)
            warnings.warn(msg, stacklevel=2)
            print("WARNING " + msg, file=sys.stderr)
        params = dict(self.named_parameters())  # placed explicitly, tensor by tensor
        buffers = dict(self.named_buffers())
        with torch.no_grad():
            for k, v in mapped.items():
                target = params.get(k, buffers.get(k))
                if assign or target.is_meta:
                    _assign(self, k, v.to(target.dtype) if not target.is_meta else v, k in params)
                else:
                    target.copy_(v)
        return torch.nn.modules.module._IncompatibleKeys(missing, unplaced)

    def trainable_state_dict(self) -> dict:
        """Only the tensors that train (LoRA, head, whatever is unfrozen)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def save_pretrained(self, out, merge_lora_weights: bool = False, trainable_only: bool = False, base=None):
        """OUT/model.safetensors + config.json (+ processor files), atomically. merge_lora_weights
        folds the adapters in. trainable_only keeps what trains; `base` records where the frozen
        rest comes from: {"qwen": folder}, {"init_seed": seed} or {"folder": a MIMIC folder}."""
        if self._inference is not None:
            raise ValueError("save_pretrained: save the model before inference.optimize (its weights are merged "
                             "or cast now; a merged LoRA would be applied twice on load)")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["qwen_config"] = self.qwen_config.to_hf()
        sd = self.state_dict()
        if merge_lora_weights and self.config.use_lora:
            sd = merged_state_dict(self)
            cfg["use_lora"] = False
        if trainable_only:
            keep = set(self.trainable_state_dict())
            sd = {k: v for k, v in sd.items() if k in keep}
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        atomic_write(out / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
        meta = {"mimic_format": 1, "trainable_only": trainable_only, "model_config": cfg}
        if trainable_only:
            meta.update(base=base, frozen_checksum=frozen_checksum(self))
        atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
        if self._processor_folder is not None:
            for name in qwen3vl_processor.PROCESSOR_FILES:
                src = self._processor_folder / name
                if src.is_file():
                    data = src.read_bytes()
                    atomic_write(out / name, lambda p, d=data: Path(p).write_bytes(d))
        return out

    @classmethod
    def from_pretrained(cls, folder, device="cpu", backbone_dtype=None, base=None):
        """Load a folder of save_pretrained / convert.py, strictly. A trainable-only folder takes
        its frozen weights from `base` (a model or a full folder; default: the base it records)."""
        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        cfg = dict(meta["model_config"])
        if (folder / "tokenizer.json").is_file():  # the processor files travel with the folder
            cfg["qwen_model_name"] = str(folder)
        config = VLAConfig(**cfg)
        if meta.get("trainable_only"):
            base = base if base is not None else meta.get("base")
            if isinstance(base, dict):
                model = _build_base(cls, config, base, folder)
            else:
                model = base if isinstance(base, VLAModel) else (cls.from_pretrained(base) if base else None)
            if model is None:
                raise ValueError(f"{folder} holds only the trainable weights and records no base: pass base= "
                                 f"(a model or a full folder)")
            sd = load_safetensors(folder / "model.safetensors")
            missing = sorted(set(model.trainable_state_dict()) - set(sd))
            unknown = sorted(set(sd) - set(model.state_dict()))
            if missing or unknown:
                raise KeyError(f"{folder}: missing {missing}, unknown {unknown}")
            model.load_state_dict({**model.state_dict(), **sd}, strict=True)
            want = meta.get("frozen_checksum")
            if want is not None and not math.isclose(got := frozen_checksum(model), want, rel_tol=1e-9):
                raise ValueError(f"{folder}: the frozen weights of base {base if isinstance(base, dict) else 'given'} "
                                 f"are not the ones it was trained with (checksum {got!r}, recorded {want!r})")
            cast_frozen_(model.qwen_model, backbone_dtype)
            return model.to(device)
        with torch.device("meta"):
            model = cls(config, load_backbone=False)
        model.load_state_dict(load_safetensors(folder / "model.safetensors"), strict=True, assign=True)
        model.reinit_buffers()
        cast_frozen_(model.qwen_model, backbone_dtype)  # what trains (adapters...) stays fp32
        return model.to(device)

    def reinit_buffers(self):
        """Recompute the rotary buffers, which a meta-device build leaves empty."""
        self.qwen_model.init_buffers()


def _build_base(cls, config: VLAConfig, base: dict, folder):
    """The model whose frozen weights a trainable-only folder was trained on, from its `base`."""
    if "qwen" in base:
        return cls(replace(config, qwen_model_name=base["qwen"]))  # reads that folder's weights
    if "init_seed" in base:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(int(base["init_seed"]))
            return cls(config)
    if "folder" in base:
        return cls.from_pretrained(base["folder"])
    raise ValueError(f"{folder}: unknown base record {base!r} (expected qwen, init_seed or folder)")


# --------------------------------------------------------------------------------------------------
# Released checkpoint names -> ours (docs/released_checkpoint.md)
#
#   module.                                              -> (stripped)
#   qwen_model.base_model.model.<rest>                   -> qwen_model.<rest>   (peft's wrappers)
#   ..._proj.base_layer.{weight,bias}                    -> ..._proj.{weight,bias}
#   ..._proj.lora_A.default.weight (r, in)               -> ..._proj.lora_A     (lora_B: (out, r))
#   language_model.norm, lm_head, layers >= kept         -> ignored (early exit)
#   visual.*, language_model.*, action_head.*            -> unchanged

_PEFT_PREFIX = "qwen_model.base_model.model."
_LORA_RE = re.compile(r"^(.*)\.(lora_[AB])\.default\.weight$")
_BASE_RE = re.compile(r"^(.*)\.base_layer\.(weight|bias)$")
_LAYER_RE = re.compile(r"^qwen_model\.model\.language_model\.layers\.(\d+)\.")


def map_released_keys(state_dict, model: VLAModel):
    """-> (mapped {our key: tensor}, ignored [released keys unused after the early exit],
    unplaced [keys that match nothing]). Pure renaming, by the table above."""
    own = set(model.state_dict())
    mapped, ignored, unplaced = {}, [], []
    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_PEFT_PREFIX):
            k = "qwen_model." + k[len(_PEFT_PREFIX):]
        if (m := _LORA_RE.match(k)) is not None:
            k = f"{m.group(1)}.{m.group(2)}"
        elif (m := _BASE_RE.match(k)) is not None:
            k = f"{m.group(1)}.{m.group(2)}"
        if k in own:
            mapped[k] = value
            continue
        layer = _LAYER_RE.match(k)
        if k in ("qwen_model.model.language_model.norm.weight", "qwen_model.lm_head.weight") or (
                layer is not None and int(layer.group(1)) >= model.kept):
            ignored.append(key)  # in the released file, unused after the early exit
        else:
            unplaced.append(key)
    return mapped, ignored, unplaced


def merged_state_dict(model: VLAModel) -> dict:
    """State dict with every LoRA update folded into its base weight, no lora_* keys."""
    sd = dict(model.state_dict())
    for fqn, m in lora_modules(model).items():
        sd[f"{fqn}.weight"] = (m.weight.detach().float() + m.delta_weight().detach()).to(m.weight.dtype)
        del sd[f"{fqn}.lora_A"], sd[f"{fqn}.lora_B"]
    return sd


# --------------------------------------------------------------------------------------------------
# Utilities


def atomic_write(path, write):
    """write(tmp_path), then rename: a crash never leaves a half-written file under the name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_safetensors(path) -> dict:
    """{key: tensor} of a safetensors file. Tensors at an odd offset are copied to aligned memory:
    CPU matmuls round differently on unaligned inputs, and a saved model must give the same bits."""
    with safe_open(str(path), framework="pt") as f:
        return {k: t if (t := f.get_tensor(k)).data_ptr() % 64 == 0 else t.clone() for k in f.keys()}


def _assign(model: nn.Module, key: str, value: torch.Tensor, is_param: bool):
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if is_param:
        old = getattr(mod, name)
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod._buffers[name] = value


def count_parameters(model: VLAModel) -> dict:
    """Parameter breakdown as the model card states it (numel works on the meta device)."""
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    vision = sum(p.numel() for p in model.qwen_model.model.visual.parameters())
    llm = sum(p.numel() for n, p in model.qwen_model.model.language_model.named_parameters() if ".lora_" not in n)
    head = sum(p.numel() for p in model.action_head.parameters())
    other = sum(p.numel() for p in model.parameters()) - lora - vision - llm - head
    return {"llm (truncated)": llm, "vision": vision, "dit head": head, "lora": lora, "other": other,
            "total": lora + vision + llm + head + other}


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe", help="parameter breakdown of a preset, built on the meta device")
    d.add_argument("--preset", default="mimic-4b", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    with torch.device("meta"):
        model = VLAModel(VLAConfig(**PRESETS[args.preset]), load_backbone=False)
    counts = count_parameters(model)
    print(f"preset {args.preset}: kept decoder layers {model.kept} (tap {model.tap}, deep tap {model.deep_tap})")
    for name, n in counts.items():
        print(f"  {name:16s} {n:>15,d}  ({n / 1e9:.3f}B)")
    return counts


if __name__ == "__main__":
    main()
