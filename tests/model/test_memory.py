"""A quantized model keeps no page of its checkpoint: the layers left unquantized are copied out of
the file's memory map at load (model_svc/loader.py: release_checkpoint)."""

import subprocess
import sys

from tests.helpers import MODEL, ROOT

CHECK = """
import sys
from model_svc.loader import load_model
loaded = load_model(sys.argv[1], "bfloat16", sys.argv[2], "cpu")
with open("/proc/self/maps") as f:
    print("mapped" if "model.safetensors" in f.read() else "released")
"""


def test_a_quantized_model_lets_its_checkpoint_go():
    for quantize, expected in (("4bit", "released"), ("none", "mapped")):  # unquantized: the map is the weights
        done = subprocess.run([sys.executable, "-c", CHECK, MODEL, quantize], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == expected, quantize
