# Make the flat top-level modules (qwen3vl.py, lora.py, ...) importable from tests without installing the package.
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Tests use tiny tensors: one intra-op thread avoids OpenMP spin-waiting against DataLoader workers, torchrun
# children and other processes on small CI machines (measured: tiny ops 30x slower with 2 contended threads).
torch.set_num_threads(1)
