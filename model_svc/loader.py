"""Loads the weights: a Hugging Face folder, a hub id, or a GGUF file; a dtype; a device;
bitsandbytes 4-bit (nf4) or 8-bit quantization, as `load_in_4bit` does in the tutorial."""

from __future__ import annotations

import ctypes
import gc
import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig

from genrpc.model_path import ModelSource

log = logging.getLogger("genrpc.loader")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = ("none", "4bit", "8bit")
OUTPUT_LAYERS = ("none", "int8", "nf4")
INT8_BLOCKSIZE = 64  # inputs per int8 scale of the output layer
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
    output_layer: str = "none"  # the output embedding's quantization: "int8", "nf4" or "none" (the model's dtype)


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


def quantize_output_layer(model: torch.nn.Module) -> None:
    """The output embedding as a bitsandbytes nf4 layer, with the blocks the 4-bit layers have: one
    stream's step reads the bfloat16 output layer (49,152 x 576 here) as many bytes as all 4-bit
    layers together, and nf4 reads a quarter of them. The input embedding keeps its own weight (a
    lookup reads one row a token). transformers leaves this layer unquantized; so does the default,
    since on held-out prompts the 4-bit output layer agreed less often with float32 on the first
    token (docs/measurements.md)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    body = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if body is None or not isinstance(head, torch.nn.Linear) or isinstance(head, bnb.nn.Linear4bit):
        raise ValueError("--output-layer nf4 needs a model quantized with --quantize 4bit and an nn.Linear "
                         "output layer")
    state = body.weight.quant_state
    device = head.weight.device
    layer = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=head.bias is not None,
                              compute_dtype=head.weight.dtype, compress_statistics=False,
                              quant_type=state.quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(head.weight.detach().clone().cpu(), requires_grad=False, blocksize=state.blocksize,
                                     compress_statistics=False, quant_type=state.quant_type,
                                     module=layer).to(device)
    if head.bias is not None:
        layer.bias = torch.nn.Parameter(head.bias.detach().clone(), requires_grad=False)
    model.set_output_embeddings(layer.eval())


def int8_output_layer(model: torch.nn.Module) -> None:
    """The output embedding in int8 with a float32 scale per column and 64 inputs (gemm.Int8Linear):
    half the bfloat16 bytes one stream's step reads, and on held-out prompts as close to float32 as
    the bfloat16 layer (docs/measurements.md). The input embedding keeps its own weight."""
    from model_svc.engine.gemm import Int8Linear

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError("--output-layer int8 needs an nn.Linear output layer")
    if head.out_features % 32 or head.in_features % INT8_BLOCKSIZE:
        raise ValueError(f"--output-layer int8: an output layer of {head.out_features} x {head.in_features} does not "
                         f"split into blocks of 32 columns and {INT8_BLOCKSIZE} inputs")
    model.set_output_embeddings(Int8Linear(head.weight, head.bias, INT8_BLOCKSIZE).to(head.weight.device).eval())


def release_checkpoint(model) -> None:
    """After quantizing at load, the checkpoint stays memory-mapped (the layers left unquantized,
    embeddings and norms, still point into it) with every page quantization read resident, and
    the loader's freed heap stays with the allocator: on a 1B Llama, RSS 4.2 GB after loading for
    0.66 GB of weights. Copying those few tensors into the process's own memory lets the map go,
    and glibc's malloc_trim returns the free heap (1.1 GB left; see docs/operations.md)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the heap stays as its allocator keeps it


def load_model(model: str, dtype: str = "bfloat16", quantize: str = "4bit", device: str = "auto",
               output_layer: str = "none") -> LoadedModel:
    """output_layer "nf4" quantizes the output embedding like the 4-bit layers (quantize_output_layer),
    "int8" to int8 (int8_output_layer); "none" leaves it as transformers loads it."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    if output_layer not in OUTPUT_LAYERS:
        raise ValueError(f"--output-layer {output_layer!r}: allowed {', '.join(OUTPUT_LAYERS)}")
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
    if output_layer == "nf4":
        quantize_output_layer(hf_model)
    elif output_layer == "int8":
        int8_output_layer(hf_model)
    if quantization in ("4bit-nf4", "8bit") and device == "cpu":
        release_checkpoint(hf_model)
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
        output_layer=output_layer,
    )
    log.info("loaded %s: dtype %s, quantization %s, output layer %s, device %s", loaded.name, dtype, quantization,
             output_layer, loaded.device)
    return loaded
