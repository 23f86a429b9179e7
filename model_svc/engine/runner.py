"""Runs the model on one step's packed batch.

All tokens of the step (one per decoding sequence, a chunk per prefilling one)
are packed into a single row, so every linear layer runs once for the whole
step; attention then runs per sequence over that sequence's own KV cache,
exact length and unpadded, through transformers' own SDPA attention function.
The layers themselves are the Hugging Face modules (bitsandbytes-quantized
linears included); only the loop over them is ours, because transformers'
caches batch sequences by padding them, and padding changes the numbers.

Supported: decoder-only models built like Llama (Llama, Mistral, Qwen2,
SmolLM): pre-norm layers with q/k/v/o projections, rotary positions and a
gated MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model_svc.engine.kv_cache import KVSpec
from model_svc.engine.scheduler import ScheduledSequence

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class PackedBatch:
    """One step's tokens, packed: sequence i owns input_ids[starts[i] : starts[i] + lengths[i]]."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    starts: list[int]
    lengths: list[int]
    logit_rows: list[int]  # packed index of the last token of each sequence that samples this step


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    def __init__(self, model: torch.nn.Module):
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.base = model.model
        self.device = next(model.parameters()).device
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dtype = self.base.embed_tokens.weight.dtype
        self.kv_spec = KVSpec(config.num_hidden_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)

    def pack(self, scheduled: list[ScheduledSequence]) -> PackedBatch:
        ids: list[int] = []
        positions: list[int] = []
        starts, lengths, logit_rows = [], [], []
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            tokens = seq.token_ids()[start:start + item.num_new_tokens]
            starts.append(len(ids))
            lengths.append(len(tokens))
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            if item.completes_prompt:
                logit_rows.append(len(ids) - 1)
        return PackedBatch(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            starts, lengths, logit_rows,
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """Computes the step; returns float32 logits [N, vocab], one row per sequence that samples,
        in the order of `scheduled`."""
        batch = self.pack(scheduled)
        # Matrix products on one row take a different kernel (GEMV) than on two or more (GEMM),
        # and the two round differently. A step of a single token gets a dummy second row, so
        # every token always takes the GEMM path and a sequence's numbers never depend on
        # what else is in the batch. The dummy row attends to nothing and is dropped.
        num_real = batch.input_ids.shape[0]
        input_ids, positions = batch.input_ids, batch.positions
        if num_real == 1:
            input_ids, positions = input_ids.repeat(2), positions.repeat(2)
        hidden = self.base.embed_tokens(input_ids[None])  # [1, T, H]
        cos, sin = self.base.rotary_emb(hidden, positions[None])  # [1, T, D] each
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, T, D]
        caches = [item.seq.kv_cache for item in scheduled]
        cache_starts = [item.seq.num_computed_tokens for item in scheduled]
        for layer_idx, layer in enumerate(self.base.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = self._attention(layer.self_attn, layer_idx, hidden, cos, sin, batch, caches, cache_starts)
            hidden = residual + hidden
            residual = hidden
            hidden = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + hidden
        rows = batch.logit_rows if len(batch.logit_rows) != 1 else batch.logit_rows * 2  # GEMM path, as above
        last = self.base.norm(hidden[0, rows])  # [N, H]
        return self.model.lm_head(last)[: len(batch.logit_rows)].float()  # [N, V]

    def _attention(self, attn, layer_idx, hidden, cos, sin, batch: PackedBatch, caches, cache_starts):
        num_tokens = hidden.shape[1]
        query = attn.q_proj(hidden).view(1, num_tokens, -1, self.head_dim).transpose(1, 2)  # [1, Hq, T, D]
        key = attn.k_proj(hidden).view(1, num_tokens, -1, self.head_dim).transpose(1, 2)  # [1, Hkv, T, D]
        value = attn.v_proj(hidden).view(1, num_tokens, -1, self.head_dim).transpose(1, 2)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        outputs = []
        for start, length, kv, past in zip(batch.starts, batch.lengths, caches, cache_starts):
            end = start + length
            keys, values = kv.write(layer_idx, past, key[:, :, start:end], value[:, :, start:end])
            mask = None
            if past > 0 and length > 1:  # a prefill chunk after earlier chunks: causal with an offset
                q_pos = torch.arange(past, past + length, device=self.device)[:, None]
                mask = (q_pos >= torch.arange(past + length, device=self.device)[None, :])[None, None]
            out, _ = sdpa_attention_forward(
                attn, query[:, :, start:end], keys, values, attention_mask=mask, scaling=attn.scaling, dropout=0.0
            )  # [1, t, Hq, D]
            outputs.append(out)
        if num_tokens > batch.input_ids.shape[0]:  # the dummy row: any finite values do
            outputs.append(outputs[-1])
        out = torch.cat(outputs, dim=1).reshape(1, num_tokens, -1)
        return attn.o_proj(out)
