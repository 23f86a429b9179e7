"""Every field of transformers' GenerationConfig and what genrpc does with it: served (as which
GenerationConfig field of ours, in what range), decided by the server rather than per request, not
applicable to a server, or not served yet (and why). docs/generation-config.md is written from this
table (`python -m genrpc.generation_fields`); tests/unit/test_generation_fields.py holds it to
transformers' own field list, so a new transformers field fails the test until it is placed here.
"""

from __future__ import annotations

import os

SERVED = "served"
SERVER = "server-side"
NOT_APPLICABLE = "not applicable"
NOT_YET = "not served yet"

_GROUPS = ("group beam search is not served (transformers 5 moved it out of generate() to the Hub): "
           "INVALID_ARGUMENT above 1 / 0")
_ASSISTED = "speculative decoding is the server's: prompt lookup, or --draft-model"
_CACHE = "the engine's paged KV cache (docs/engine.md)"

# transformers field -> (status, our field or "", what it means here)
FIELDS: dict[str, tuple[str, str, str]] = {
    "max_new_tokens": (SERVED, "max_new_tokens", "1 .. context - 1; unset: the model's default, shrunk to fit"),
    "min_new_tokens": (SERVED, "min_new_tokens", "0 .. max_new_tokens"),
    "max_length": (NOT_APPLICABLE, "", "prompt + new tokens; say max_new_tokens "
                                       "(the prompt's length is the tokenizer's)"),
    "min_length": (NOT_APPLICABLE, "", "prompt + new tokens; say min_new_tokens"),
    "max_time": (SERVED, "time_limit_ms", "1 .. 3,600,000 ms; the call's deadline applies too"),
    "stop_strings": (SERVED, "stop", "up to 32 strings, matched across token boundaries"),
    "early_stopping": (SERVED, "early_stopping", "TRUE, FALSE (default) or NEVER, as generate()'s True, False, "
                                                 "\"never\"; with num_beams > 1"),
    "do_sample": (SERVED, "do_sample", ""),
    "num_beams": (SERVED, "num_beams", "1 .. 16; generate()'s beam search, greedy (no do_sample, logprobs or "
                                       "structured output with it); each sequence's score in sequence_score"),
    "num_beam_groups": (NOT_YET, "num_beam_groups", _GROUPS),
    "penalty_alpha": (NOT_YET, "", "contrastive search is not served"),
    "dola_layers": (NOT_YET, "", "DoLa decoding is not served"),
    "use_cache": (SERVER, "", _CACHE),
    "cache_implementation": (SERVER, "", _CACHE),
    "cache_config": (SERVER, "", _CACHE),
    "max_cache_len": (SERVER, "", _CACHE + "; --kv-cache-memory sizes it"),
    "prefill_chunk_size": (SERVER, "", "the scheduler chunks long prompts by time (docs/scheduling.md)"),
    "continuous_batching_config": (SERVER, "", "the engine batches continuously (docs/scheduling.md)"),
    "temperature": (SERVED, "temperature", "(0, 100]"),
    "top_k": (SERVED, "top_k", ">= 0; 0 off"),
    "top_p": (SERVED, "top_p", "(0, 1]"),
    "min_p": (SERVED, "min_p", "[0, 1]"),
    "top_h": (NOT_YET, "", "the entropy-budget warper is not served"),
    "typical_p": (SERVED, "typical_p", "(0, 1]"),
    "epsilon_cutoff": (SERVED, "epsilon_cutoff", "[0, 1); 0 off"),
    "eta_cutoff": (SERVED, "eta_cutoff", "[0, 1); 0 off"),
    "diversity_penalty": (NOT_YET, "diversity_penalty", _GROUPS),
    "repetition_penalty": (SERVED, "repetition_penalty", "(0, 100]; 1 off"),
    "encoder_repetition_penalty": (NOT_APPLICABLE, "", "encoder-decoder models only; genrpc serves decoder-only ones"),
    "length_penalty": (SERVED, "length_penalty", "finite; default 1.0; with num_beams > 1"),
    "no_repeat_ngram_size": (SERVED, "no_repeat_ngram_size", "0 .. 64; 0 off"),
    "bad_words_ids": (SERVED, "bad_words", "strings, tokenized by the gateway as generate()'s bad_words_ids are made"),
    "renormalize_logits": (SERVED, "renormalize_logits", ""),
    "forced_bos_token_id": (NOT_APPLICABLE, "", "encoder-decoder models only"),
    "forced_eos_token_id": (SERVED, "forced_eos_token_id", "up to 16 ids"),
    "remove_invalid_values": (SERVER, "", "the engine's logits are finite; a failed step fails its sequences"),
    "exponential_decay_length_penalty": (SERVED, "exponential_decay_length_penalty",
                                         "start_index 0 .. 2^20, decay_factor (0, 10]"),
    "suppress_tokens": (SERVED, "suppress_tokens", "up to 1,024 ids"),
    "begin_suppress_tokens": (SERVED, "begin_suppress_tokens", "up to 1,024 ids"),
    "sequence_bias": (SERVED, "sequence_bias", "up to 300 sequences of 1 .. 16 ids, biases in [-100, 100]; "
                                               "logit_bias for single tokens, OpenAI's name"),
    "token_healing": (NOT_YET, "", "token healing is not served"),
    "guidance_scale": (NOT_YET, "", "classifier-free guidance is not served"),
    "watermarking_config": (SERVED, "watermarking_config", "transformers' WatermarkingConfig fields and defaults; "
                                                           "the DetectWatermark RPC scores a text for it"),
    "num_return_sequences": (SERVED, "num_return_sequences", "1 .. 16, with do_sample; with num_beams, "
                                                             "at most num_beams (the best, best first)"),
    "output_attentions": (NOT_APPLICABLE, "", "no tensors leave the server"),
    "output_hidden_states": (NOT_APPLICABLE, "", "no tensors leave the server"),
    "output_scores": (SERVED, "logprobs", "log-probabilities of the chosen tokens (top_logprobs: alternatives)"),
    "output_logits": (SERVED, "top_logprobs", "0 .. 20 alternatives a position, as log-probabilities"),
    "return_dict_in_generate": (NOT_APPLICABLE, "", "the response is a message"),
    "pad_token_id": (NOT_APPLICABLE, "", "the tokenizer pads; the engine drops the padding"),
    "bos_token_id": (NOT_APPLICABLE, "", "the tokenizer and chat template add it"),
    "eos_token_id": (SERVED, "stop_token_ids", "up to 64 ids, in addition to the model's EOS"),
    "encoder_no_repeat_ngram_size": (NOT_APPLICABLE, "", "encoder-decoder models only"),
    "decoder_start_token_id": (NOT_APPLICABLE, "", "encoder-decoder models only"),
    "is_assistant": (SERVER, "", _ASSISTED),
    "num_assistant_tokens": (SERVED, "prompt_lookup_num_tokens", "0 .. 32 proposals a step, whoever proposes"),
    "num_assistant_tokens_schedule": (SERVER, "", _ASSISTED + "; proposals are priced per step"),
    "assistant_confidence_threshold": (SERVER, "", _ASSISTED),
    "prompt_lookup_num_tokens": (SERVED, "prompt_lookup_num_tokens", "0 .. 32; unset: the server's default"),
    "max_matching_ngram_size": (SERVED, "max_matching_ngram_size", "1 .. 8; default the server's 4; speed only"),
    "assistant_early_exit": (SERVER, "", _ASSISTED),
    "assistant_lookbehind": (SERVER, "", _ASSISTED),
    "target_lookbehind": (SERVER, "", _ASSISTED),
    "assistant_ensemble_weight": (SERVER, "", _ASSISTED),
    "speculation_type": (SERVER, "", _ASSISTED),
    "use_mtp": (NOT_APPLICABLE, "", "the served models have no multi-token prediction heads"),
    "compile_config": (SERVER, "", "the engine's kernels are chosen at start (docs/engine.md)"),
    "disable_compile": (SERVER, "", "the engine's kernels are chosen at start (docs/engine.md)"),
    "low_memory": (NOT_APPLICABLE, "", "a beam/contrastive-search option of generate()"),
    "constraints": (NOT_YET, "", "constrained beam search is not served (moved out of generate() too)"),
    "force_words_ids": (NOT_YET, "", "constrained beam search is not served (moved out of generate() too)"),
}

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "generation-config.md")


def markdown() -> str:
    """docs/generation-config.md."""
    rows = ["# transformers' GenerationConfig in genrpc", "",
            "Written by `python -m genrpc.generation_fields` from `genrpc/generation_fields.py`; a test holds",
            "that table to the installed transformers' field list. *served*: set it in `GenerationConfig`",
            "under the name in the second column (ranges in `protos/genrpc/v1/generation.proto`);",
            "*server-side*: the server decides, not a request; *not applicable*: it has no meaning for a",
            "server; *not served yet*: a request cannot ask for it (where the genrpc field exists, asking",
            "for it is `INVALID_ARGUMENT` naming the field).", "",
            "| transformers field | status | genrpc field | notes |", "|---|---|---|---|"]
    for name, (status, ours, note) in FIELDS.items():
        rows.append(f"| `{name}` | {status} | {f'`{ours}`' if ours else ''} | {note} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    with open(DOC, "w") as f:
        f.write(markdown())
