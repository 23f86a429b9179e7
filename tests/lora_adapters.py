"""LoRA adapters for the tests, made with `peft` on the bundled model (nothing is downloaded): random
non-zero pairs, large enough to change the greedy tokens."""

from __future__ import annotations

import os

import torch

from tests.helpers import MODEL

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(folder: str, seed: int, rank: int = 8, targets=ALL, alpha: int | None = None) -> str:
    """Saves a PEFT LoRA adapter (random A and B) for the bundled model in `folder`; returns it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        return folder
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets),
                                            lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    return folder
