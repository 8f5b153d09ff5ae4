# Make the flat top-level modules (qwen3vl.py, lora.py, ...) importable from tests without installing the package.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
