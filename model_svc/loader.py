"""Loads the weights: a Hugging Face folder, a hub id, or a GGUF file; a dtype; a device;
bitsandbytes 4-bit (nf4) or 8-bit quantization, as `load_in_4bit` does in the tutorial."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig

from genrpc.model_path import ModelSource

log = logging.getLogger("genrpc.loader")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = ("none", "4bit", "8bit")
DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default length when nothing is set


@dataclass
class GenerationDefaults:
    """What an unset GenerationConfig field means for this model (its generation_config.json,
    then transformers' own defaults)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> "GenerationDefaults":
        d = cls()
        if config.max_new_tokens is not None:
            d.max_new_tokens = int(config.max_new_tokens)
        for name in ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty"):
            value = getattr(config, name, None)
            if value is not None:
                setattr(d, name, type(getattr(d, name))(value))
        return d


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    dtype: str
    device: str
    quantization: str
    max_context: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def quantization_config(quantize: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "none":
        return None
    raise ValueError(f"--quantize {quantize!r}: allowed {', '.join(QUANTIZATIONS)}")


def load_model(model: str, dtype: str = "bfloat16", quantize: str = "4bit", device: str = "auto") -> LoadedModel:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    source = ModelSource.parse(model)
    device = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    kwargs = dict(source.kwargs(), dtype=torch_dtype)
    quantization = quantize
    if source.gguf_file:
        # A GGUF file carries its own quantization; transformers loads it as it is.
        quantization = "gguf"
    else:
        bnb = quantization_config(quantize, torch_dtype)
        if bnb is not None:
            kwargs["quantization_config"] = bnb
            kwargs["device_map"] = {"": device}
            quantization = "4bit-nf4" if quantize == "4bit" else "8bit"
    hf_model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    if "device_map" not in kwargs:
        hf_model.to(device)
    hf_model.eval()
    config = hf_model.config
    gen_config = hf_model.generation_config
    eos = gen_config.eos_token_id if gen_config.eos_token_id is not None else config.eos_token_id
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    loaded = LoadedModel(
        model=hf_model,
        name=source.display_name,
        dtype=dtype,
        device=str(next(hf_model.parameters()).device),
        quantization=quantization,
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
        vocab_size=int(config.vocab_size),
        eos_token_ids=eos_ids,
        defaults=GenerationDefaults.from_generation_config(gen_config),
    )
    log.info("loaded %s: dtype %s, quantization %s, device %s", loaded.name, dtype, quantization, loaded.device)
    return loaded
