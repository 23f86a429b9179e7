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
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model_svc.engine.kv_cache import KVCacheManager, KVSpec
from model_svc.engine.scheduler import ScheduledSequence

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class PackedBatch:
    """One step's tokens, packed: sequence i owns input_ids[starts[i] : starts[i] + lengths[i]]."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] arena slot of each token's keys and values
    starts: list[int]
    lengths: list[int]
    kv_lengths: list[int]  # each sequence's cached length after this step
    logit_rows: list[int]  # packed index of the last token of each sequence that samples this step


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """`match_generate`: decode attention through the very SDPA call transformers makes for a batch-1
    `generate()` (GQA inside the kernel), so greedy tokens equal it bit for bit. Off, a decoded
    token's query heads are grouped under their shared key/value head and attended as one small
    block: the same math, 2.5-6x faster on this CPU (40 vs 15 us at 40 cached tokens, 305 vs 52 at
    600), rounding differently in the last bit now and then. Both are batch-invariant."""

    def __init__(self, model: torch.nn.Module, match_generate: bool = False):
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.match_generate = match_generate
        self.base = model.model
        self.device = next(model.parameters()).device
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dtype = self.base.embed_tokens.weight.dtype
        self.kv_spec = KVSpec(config.num_hidden_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)

    def pack(self, scheduled: list[ScheduledSequence], kv: KVCacheManager) -> PackedBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, lengths, kv_lengths, logit_rows = [], [], [], []
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            tokens = seq.token_ids()[start:start + item.num_new_tokens]
            starts.append(len(ids))
            lengths.append(len(tokens))
            kv_lengths.append(start + len(tokens))
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            base = seq.kv_cache.start
            slots.extend(range(base + start, base + start + len(tokens)))
            if item.completes_prompt:
                logit_rows.append(len(ids) - 1)
        if len(ids) == 1:
            # Matrix products on one row take a different kernel (GEMV) than on two or more (GEMM),
            # and the two round differently. A step of a single token gets a dummy second row, so
            # every token always takes the GEMM path and a sequence's numbers never depend on what
            # else is in the batch. The dummy row writes to the scratch slot and is dropped.
            ids.append(ids[0])
            positions.append(positions[0])
            slots.append(kv.scratch_slot)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return PackedBatch(as_tensor(ids), as_tensor(positions), as_tensor(slots), starts, lengths, kv_lengths,
                           logit_rows)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence], kv: KVCacheManager) -> torch.Tensor:
        """Computes the step; returns float32 logits [N, vocab], one row per sequence that samples,
        in the order of `scheduled`."""
        batch = self.pack(scheduled, kv)
        ranges = [item.seq.kv_cache for item in scheduled]
        hidden = self.base.embed_tokens(batch.input_ids[None])  # [1, T, H]
        cos, sin = self.base.rotary_emb(hidden, batch.positions[None])  # [1, T, D] each
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
        for layer_idx, layer in enumerate(self.base.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = self._attention(layer.self_attn, layer_idx, hidden, cos, sin, batch, kv, ranges)
            hidden = residual + hidden
            residual = hidden
            hidden = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + hidden
        rows = batch.logit_rows if len(batch.logit_rows) != 1 else batch.logit_rows * 2  # GEMM path, as above
        last = self.base.norm(hidden[0, rows])  # [N, H]
        return self.model.lm_head(last)[: len(batch.logit_rows)].float()  # [N, V]

    def _attention(self, attn, layer_idx, hidden, cos, sin, batch: PackedBatch, kv: KVCacheManager, ranges):
        num_tokens = hidden.shape[1]
        # Token-major layouts, [T, heads, D], so that one decoded token's heads are one contiguous block.
        query = attn.q_proj(hidden).view(num_tokens, -1, self.head_dim)  # [T, Hq, D]
        key = attn.k_proj(hidden).view(num_tokens, -1, self.head_dim)  # [T, Hkv, D]
        value = attn.v_proj(hidden).view(num_tokens, -1, self.head_dim)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        kv.write(layer_idx, batch.slots, key.transpose(0, 1), value.transpose(0, 1))
        keys_all, values_all = kv.layer(layer_idx)  # [Hkv, slots, D] each
        grouped = query.view(num_tokens, self.num_kv_heads, -1, self.head_dim)  # [T, Hkv, Hq/Hkv, D]
        outputs = []
        for start, length, kv_length, kv_range in zip(batch.starts, batch.lengths, batch.kv_lengths, ranges):
            kv_start = kv_range.start
            keys = keys_all[None, :, kv_start:kv_start + kv_length]  # [1, Hkv, L, D]
            values = values_all[None, :, kv_start:kv_start + kv_length]
            if length == 1 and not self.match_generate:
                # The query heads sharing a key/value head become the rows of one query block.
                out = F.scaled_dot_product_attention(grouped[start][None], keys, values, scale=attn.scaling)
                outputs.append(out.view(1, -1))
                continue
            q = query[start:start + length].transpose(0, 1)[None]  # [1, Hq, t, D], as transformers lays it out
            if length == 1 or kv_length == length:
                # As transformers' sdpa_attention_forward calls it with no mask: GQA in the kernel,
                # causal for a prompt, plain for one decoded token.
                out = F.scaled_dot_product_attention(
                    q, keys, values, dropout_p=0.0, scale=attn.scaling, is_causal=length > 1, enable_gqa=True)
            else:  # a prefill chunk after earlier chunks: causal with an offset, as an explicit mask
                past = kv_length - length
                q_pos = torch.arange(past, kv_length, device=self.device)[:, None]
                mask = (q_pos >= torch.arange(kv_length, device=self.device)[None, :])[None, None]
                out, _ = sdpa_attention_forward(attn, q, keys, values, attention_mask=mask, scaling=attn.scaling,
                                                dropout=0.0)
                out = out.transpose(1, 2)
            outputs.append(out[0].transpose(0, 1).reshape(length, -1))  # [t, Hq * D]
        if num_tokens > sum(batch.lengths):  # the dummy row: any finite values do
            outputs.append(outputs[-1][-1:])
        return attn.o_proj(torch.cat(outputs)[None])  # [1, T, H]
