"""How precisely may a 4-bit product's inputs be held? The engine multiplies bfloat16 activations in
float32; integer kernels (OpenVINO's CPU plugin by default, llama.cpp) round them to int8 per group
first, which doubles an AVX2 CPU's multiply-adds per cycle (VPMADDUBSW) but is a different accuracy.

On the held-out prompts of tests/data/heldout_prompts.txt (chat template), the last position's
float32 logits of: a float32 model with the dequantized 4-bit weights (the truth, as
tests/model/test_engine.py's accuracy test), `generate()`'s model (the 4-bit layers of
transformers + bitsandbytes, bfloat16), and the float32 model with every 4-bit layer's input first
rounded to bfloat16 and then to a signed integer of B bits per group of G inputs (symmetric, scale
the group's largest magnitude). Each side's RMS error against the truth, averaged over the
prompts, as a ratio to `generate()`'s: the engine's accuracy test holds its own prefill to 1.2x.

Writes bench/results/activation_precision.json.

    python -m bench.activation_precision [--prompts 16]
"""

from __future__ import annotations

import argparse

import torch

from bench.output_layer import MODEL, heldout_texts

SETTINGS = ((8, 32), (8, 64), (12, 64), (16, 64))  # (bits, group)


def rounded(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x's last dimension in groups of `group`, each rounded to `bits`-bit signed integers times a scale."""
    shape = x.shape
    x = x.reshape(*shape[:-1], -1, group)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / (2 ** (bits - 1) - 1)
    return (torch.round(x / scale) * scale).reshape(shape)


def run(count: int) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from transformers import AutoTokenizer

    from genrpc.launch import describe_cpu
    from model_svc.loader import load_model

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    quantized = load_model(MODEL, "bfloat16", "4bit", "cpu")
    weights = {name: bnb_functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
               for name, m in quantized.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    exact = load_model(MODEL, "float32", "none", "cpu")
    setting: list = [None]

    def round_inputs(module, args):
        if setting[0] is None:
            return None
        return (rounded(args[0].bfloat16().float(), *setting[0]),)

    for name, module in exact.model.named_modules():
        if name in weights:
            module.weight.data.copy_(weights[name])
            module.register_forward_pre_hook(round_inputs)
    texts = heldout_texts(tokenizer, count)
    errors: dict[str, list[float]] = {"generate": [], **{f"int{b} groups of {g}": [] for b, g in SETTINGS}}
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.inference_mode():
            setting[0] = None
            truth = exact.model(ids).logits[0, -1].float()
            errors["generate"].append(float((quantized.model(ids).logits[0, -1].float() - truth).pow(2).mean().sqrt()))
            for bits, group in SETTINGS:
                setting[0] = (bits, group)
                rms = float((exact.model(ids).logits[0, -1] - truth).pow(2).mean().sqrt())
                errors[f"int{bits} groups of {group}"].append(rms)
    mean = {side: sum(v) / len(v) for side, v in errors.items()}
    return {"cpu": describe_cpu(), "prompts": len(texts),
            "sides": [{"side": side, "mean_rms": mean[side], "worst_rms": max(errors[side]),
                       "ratio_to_generate": mean[side] / mean["generate"]} for side in errors]}


def markdown(report: dict) -> str:
    rows = [f"{report['prompts']} held-out prompts, last-position logits against float32 on the same weights:", "",
            "| inputs of the 4-bit products | mean RMS error | worst | against generate()'s |", "|---|---|---|---|"]
    for s in report["sides"]:
        name = "generate() (bfloat16)" if s["side"] == "generate" else s["side"]
        rows.append(f"| {name} | {s['mean_rms']:.4f} | {s['worst_rms']:.4f} | {s['ratio_to_generate']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="how many held-out prompts (of 64)")
    args = parser.parse_args()
    report = run(args.prompts)
    from bench import readme

    readme.save("activation_precision", report)
    print(markdown(report))


if __name__ == "__main__":
    main()
