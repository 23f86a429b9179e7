"""Runs the model on one step's packed batch.

All tokens of the step (one per decoding sequence, a chunk per prefilling one)
are packed into a single row, so every linear layer runs once for the whole
step; attention then runs per sequence over that sequence's own KV cache,
exact length and unpadded: decoded tokens (and prompt tokens, by default) all
in one native call (see decode_attention.py), long prompts' chunks in another
(prefill_attention.py); otherwise through transformers' own SDPA function.
The layers themselves are the Hugging Face modules (bitsandbytes-quantized
linears included); only the loop over them is ours, because transformers'
caches batch sequences by padding them, and padding changes the numbers.
With native prefill (the default) the norms, rotary positions and cache
writes run as fused native calls with the modules' weights (fused.py), and a
step whose tokens all attend natively runs every layer in one native call
that makes the same kernel calls (layers.py): the same bits, less overhead.

Supported: decoder-only models built like Llama (Llama, Mistral, Qwen2,
SmolLM): pre-norm layers with q/k/v/o projections (with or without biases),
rotary positions (with the model's own scaling, e.g. Llama 3's) and a gated
MLP; a sliding window (Mistral) through SDPA with the window applied.
tests/unit/test_architectures.py checks each against generate() on tiny
random-weight models; any other model type is refused at start.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_svc.engine import decode_attention, fused, gemm, kernel_choice, layers, lora, prefill_attention
from model_svc.engine.kv_cache import KVCache, KVSpec
from model_svc.engine.linear import Linears
from model_svc.engine.schedule_types import ScheduledSequence

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class Attend(enum.Enum):
    """The attention path a sequence takes in a step (ModelRunner.path)."""

    NATIVE = "native"  # decode_attention.py's kernel: decoded tokens, proposals, prompts up to NATIVE_MAX_PROMPT
    LONG = "long"  # prefill_attention.py's kernel: a long prompt's chunk
    SDPA = "sdpa"  # transformers' own SDPA function, per sequence (--prefill-attention sdpa, --match-generate)


@dataclass
class PackedBatch:
    """One step's tokens, packed: sequence i owns input_ids[starts[i] : starts[i] + lengths[i]]."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] arena slot of each token's keys and values
    # Each SDPA sequence's cached slots after this step (a slice when contiguous; an empty one for the others).
    kv_slots: list[torch.Tensor | slice]
    starts: list[int]
    lengths: list[int]
    kv_lengths: list[int]  # each sequence's cached length after this step
    logit_rows: list[int]  # packed rows whose logits the step returns (ScheduledSequence: its last, or all)
    paths: list[Attend]  # each sequence's attention path
    # Rows attended by the native kernel: (packed rows, the block tables concatenated, each row's
    # table offset, number of keys each row sees).
    native: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Long prompts' chunks through the prefill kernel: (starts, lengths, pasts, tables, table offsets).
    long: tuple[torch.Tensor, ...] | None = None
    # Whether a product of one row gets a second (ModelRunner.one_row_runs_alone): the step's one token a
    # dummy row (in input_ids), a lone logit row a copy of itself.
    pad_one_row: bool = True
    # Rows 0 .. long_rows - 1 are long prompts' (path LONG): their 4-bit products take their own sums on
    # AMX tiles (Gemm.nf4), as their attention takes its own kernel.
    long_rows: int = 0


class StepInterrupted(Exception):
    """The step was stopped between layers (ModelRunner.execute's `interrupt`)."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


DECODE_ATTENTION = ("native", "sdpa")
MATMUL = ("native", "library")
PREFILL_ATTENTION = ("native", "sdpa")
LAYER_LOOP = ("native", "python")
AMX = ("auto", "on", "off")
# With native prefill, prompts up to this long attend as decoded tokens do (their cache blocks are then
# shared exactly); longer ones through the long-prompt kernel, or SDPA where it cannot run.
NATIVE_MAX_PROMPT = 1024


class ModelRunner:
    """How a decoded token attends (all three batch-invariant):
    - `match_generate`: through the very SDPA call transformers makes for a batch-1 `generate()`
      (GQA inside the kernel), so greedy tokens equal it bit for bit;
    - `decode_attention="sdpa"`: one SDPA call per sequence with its query heads grouped under their
      shared key/value head as one small block: the same math, several times faster than the above,
      rounding differently in the last bit
      now and then;
    - `decode_attention="native"` (default; falls back to "sdpa" where it cannot be compiled): every
      decoded token of the step in one call of the C kernel, much faster than "sdpa" for many
      sequences, rounding like "sdpa" does (float32 scores, bfloat16 probabilities).
      bfloat16 models only; others use "sdpa".
    How a prompt attends:
    - `prefill_attention="native"` (default, with native decode): each prompt token of a prompt up to
      NATIVE_MAX_PROMPT tokens attends through the kernel as a decoded token would. A prompt's
      numbers then do not depend on how it was chunked, and a prefix copied from another sequence
      is bit for bit a recomputed one, which is what exact prefix sharing needs. Longer prompts'
      chunks attend through the long-prompt kernel (prefill_attention.py; SDPA where it cannot
      run): also independent of chunking, ~3x faster per key, rounding its own way; on AMX tiles
      their 4-bit products take their own sums too (PackedBatch.long_rows, Gemm.nf4). It rounds
      differently from the SDPA call `generate()` makes, and through 30 bfloat16 layers that moves
      last-position logits by up to ~0.9 either way. Against a float32 computation with the same
      weights it is as accurate as `generate()` (mean RMS error 0.151 vs 0.153 over the test's 8
      prompts, 0.108 vs 0.123 over 16; worst logit 0.88 vs 0.85),
      but where `generate()`'s top two tokens are that close, the first token can differ (a Korean
      prompt of 27 byte-level tokens: margin 0.6).
    - `prefill_attention="sdpa"`: the SDPA call `generate()` makes (causal, GQA in the kernel), so
      a prompt's numbers are `generate()`'s and so is the first token; no prefix sharing."""

    def __init__(self, model: torch.nn.Module, match_generate: bool = False, decode_attention_impl: str = "native",
                 prefill_attention_impl: str = "native", matmul: str = "native", direct_rows: int | None = None,
                 layer_loop: str = "native", amx: str = "auto"):
        """direct_rows: up to how many rows the native kernel reads weights directly (None: measured on
        this CPU, kernel_choice.py); the bits are the same either way. amx: "auto" (timed, cached), "on"
        or "off": the native 4-bit and int8 products on AMX tiles where the CPU has them (other bits
        than AVX-512's, the same at every row count). layer_loop: "native" runs a
        step's layers in one native call where it can (layers.py), "python" always loops in Python:
        the same bits either way."""
        if amx not in AMX:
            raise ValueError(f"amx {amx!r}: expected one of {', '.join(AMX)}")
        if layer_loop not in LAYER_LOOP:
            raise ValueError(f"layer loop {layer_loop!r}: expected one of {', '.join(LAYER_LOOP)}")
        if decode_attention_impl not in DECODE_ATTENTION:
            raise ValueError(f"decode attention {decode_attention_impl!r}: "
                             f"expected one of {', '.join(DECODE_ATTENTION)}")
        if prefill_attention_impl not in PREFILL_ATTENTION:
            raise ValueError(
                f"prefill attention {prefill_attention_impl!r}: expected one of {', '.join(PREFILL_ATTENTION)}")
        if matmul not in MATMUL:
            raise ValueError(f"matmul {matmul!r}: expected one of {', '.join(MATMUL)}")
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # A sliding window (Mistral): a token attends to itself and the window - 1 tokens before it.
        # The native kernel has no window: such a model attends through SDPA, with the window applied.
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None  # Qwen2 carries a window in its config but uses it only when told to
        if window is not None and config.model_type == "qwen2" and getattr(config, "max_window_layers", 0) < \
                config.num_hidden_layers:
            raise ValueError("Qwen2 with a sliding window on some layers only (max_window_layers) is not supported")
        self.sliding_window = int(window) if window and window < config.max_position_embeddings else None
        self.model = model
        self.match_generate = match_generate
        self.base = model.model
        self.device = next(model.parameters()).device
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dtype = self.base.embed_tokens.weight.dtype
        self.kv_spec = KVSpec(config.num_hidden_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        self.native_decode = None
        if (decode_attention_impl == "native" and not match_generate and self.dtype == torch.bfloat16
                and self.device.type == "cpu" and self.sliding_window is None):
            self.native_decode = decode_attention.load()
        self.native_prefill = prefill_attention_impl == "native" and self.native_decode is not None
        # Long prompts' chunks (over NATIVE_MAX_PROMPT tokens) through prefill_attention.py, native numerics only.
        self.long_prefill = prefill_attention.load() if self.native_prefill else None
        if self.long_prefill is not None and not self.long_prefill.fits(self.head_dim):
            self.long_prefill = None
        # Native numerics only (fused.py): norms, rotary positions and cache writes in one call each.
        # (The gated MLP's silu included: models with another activation keep PyTorch's operators.)
        self.fused = fused.load() if self.native_prefill and getattr(config, "hidden_act", "silu") == "silu" else None
        # Native matrix products (gemm.py): 4-bit layers with the library's bits, wherever they run; the
        # bfloat16 output embedding in the kernel's own order, with native numerics only.
        native = matmul == "native" and self.dtype == torch.bfloat16 and self.device.type == "cpu"
        kernel = gemm.load() if native else None
        self.linear = Linears(kernel, dense=self.fused is not None)
        # The layers in one native call where a step allows (layers.py): the same bits as the Python loop.
        self._layer_library = (layers.load() if layer_loop == "native" and self.fused is not None
                               and kernel is not None else None)
        self._layers: layers.NativeLayers | bool | None = None if self._layer_library is not None else False
        self.num_native_loop_steps = 0  # steps whose layers ran in the native loop, since start
        # one_row_runs_alone: None until every product has had its first call (native numerics only).
        self._one_row_alone: bool | None = None if self.fused is not None and kernel is not None else False
        self.adapters = lora.Adapters([])  # set_adapters
        self._lora: lora.StepRows | None = None  # the step's rows by adapter
        self.kernel_choice = None
        self.amx_choice = kernel_choice.AmxChoice(False, "unavailable")
        if kernel is not None:
            shapes = self._product_shapes()
            self.kernel_choice = kernel_choice.choose(kernel, *shapes, forced=direct_rows)
            if self.fused is not None:
                self.amx_choice = kernel_choice.choose_amx(kernel, shapes[0], shapes[2], forced=amx)
            elif amx == "on":
                raise kernel_choice.AmxUnavailable("without native numerics the 4-bit layers keep bitsandbytes' bits")
            elif kernel.has_amx:  # the library's bits: never on tiles
                self.amx_choice = kernel_choice.AmxChoice(False, "library bits")
        if self.long_prefill is not None and self.long_prefill.has_amx:  # long prompts' attention follows
            self.long_prefill.use_amx(self.amx_choice.on)

    def set_adapters(self, adapters: list[lora.Adapter]) -> None:
        """The LoRA adapters sequences may name (lora.py): native numerics where the runner's are."""
        self.adapters = lora.Adapters(adapters, lora.load_kernel() if self.linear.dense and adapters else None)
        if self._layers:
            self._layers.set_adapters(self.adapters)

    def _product_shapes(self) -> tuple[list, list, list]:
        """The model's 4-bit layer shapes and its bfloat16 or int8 output layer's (if the native kernel
        takes it), as kernel_choice.choose wants them: (n, k, blocksize, how many layers). Called only
        with the kernel loaded."""
        counts: dict[tuple[int, int, int], int] = {}
        for module in self.model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None and getattr(state, "shape", None) is not None and len(state.shape) == 2:
                n, k = int(state.shape[0]), int(state.shape[1])
                if gemm.Gemm.fits(n, k, int(state.blocksize)):
                    shape = (n, k, int(state.blocksize))
                    counts[shape] = counts.get(shape, 0) + 1
        head = self.model.get_output_embeddings()
        dense = []
        if (self.linear.dense and type(head) is torch.nn.Linear and head.weight.dtype == torch.bfloat16
                and gemm.Gemm.fits(head.out_features, head.in_features)):
            dense.append((head.out_features, head.in_features, 0, 1))
        int8 = []
        if isinstance(head, gemm.Int8Linear) and self.linear.gemm.has_int8:
            int8.append((head.out_features, head.in_features, head.blocksize, 1))
        return [(*shape, count) for shape, count in sorted(counts.items())], dense, int8

    @property
    def matmul_detail(self) -> str:
        """The matrix products' path, the kernel's instructions and its row-count choice, for logs and ModelInfo."""
        if self.linear.gemm is None:
            return "library"
        amx = self.amx_choice.describe()
        return f"native {self.linear.gemm.isa}: {self.kernel_choice.describe()}" + (f"; {amx}" if amx else "")

    @property
    def layer_loop(self) -> str:
        """How steps loop over the layers: "native" (in one C call where a step allows, layers.py) or "python"."""
        return "python" if self._layers is False else "native"

    @property
    def matmul(self) -> str:
        """What the matrix products run through: "native" (gemm.py) or "library"."""
        return "native" if self.linear.gemm is not None else "library"

    @property
    def decode_attention(self) -> str:
        """What decoded tokens attend through: "generate", "native" or "sdpa"."""
        return "generate" if self.match_generate else "native" if self.native_decode else "sdpa"

    @property
    def prefill_attention(self) -> str:
        """What prompt tokens attend through: "native" or "sdpa"."""
        return "native" if self.native_prefill else "sdpa"

    def path(self, item: ScheduledSequence) -> Attend:
        """The attention path of `item`'s tokens this step."""
        if self.native_decode is None:
            return Attend.SDPA
        seq = item.seq
        # A long prompt's tokens go through the long-prompt kernel, its last one alone too (after a
        # shared prefix), so its numbers do not depend on how much of it was shared.
        long_prompt = self.long_prefill is not None and seq.num_prompt_tokens > NATIVE_MAX_PROMPT
        if ((item.num_new_tokens == 1 and not (long_prompt and seq.num_computed_tokens < seq.num_prompt_tokens))
                or item.proposals or (self.native_prefill and seq.num_prompt_tokens <= NATIVE_MAX_PROMPT)):
            return Attend.NATIVE
        return Attend.LONG if self.long_prefill is not None else Attend.SDPA

    def pack(self, scheduled: list[ScheduledSequence], kv: KVCache) -> PackedBatch:
        """The step's tokens in one row, and each attention path's arguments (one pass: a sequence's
        path is chosen first, then its rows are added to that path's). Long prompts' rows come first
        (PackedBatch.long_rows); the per-sequence lists and the logit rows keep `scheduled`'s order."""
        bs = kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        n = len(scheduled)
        starts, lengths, kv_lengths, logits, kv_slots = [0] * n, [0] * n, [0] * n, [[] for _ in range(n)], [None] * n
        native_rows, native_tables, native_offsets, native_counts = [], [], [], []
        long_starts, long_lengths, long_pasts, long_tables, long_offsets = [], [], [], [], []
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        paths = [self.path(item) for item in scheduled]
        order = [i for i in range(n) if paths[i] is Attend.LONG] + [i for i in range(n) if paths[i] is not Attend.LONG]
        for i in order:
            item, path = scheduled[i], paths[i]
            table = item.seq.block_table
            past = item.seq.num_computed_tokens
            tokens = item.tokens()
            start, length, kv_length = len(ids), len(tokens), past + len(tokens)
            starts[i], lengths[i], kv_lengths[i] = start, length, kv_length
            ids.extend(tokens)
            positions.extend(range(past, kv_length))
            slots.extend(table.slots(past, kv_length, bs))
            if item.proposals or item.prompt_rows:  # every row: proposals' to sample, a prompt's logprobs
                logits[i] = list(range(start, start + length))
            elif item.completes_prompt:
                logits[i] = [start + length - 1]
            if path is Attend.NATIVE:  # query row r sees its sequence's keys up to its own position
                native_rows.extend(range(start, start + length))
                native_offsets.extend([len(native_tables)] * length)
                native_tables.extend(table.covering(kv_length, bs))
                native_counts.extend(range(past + 1, kv_length + 1))
                kv_slots[i] = slice(0, 0)  # the kernels read through the table
            elif path is Attend.LONG:
                long_starts.append(start)
                long_lengths.append(length)
                long_pasts.append(past)
                long_offsets.append(len(long_tables))
                long_tables.extend(table.covering(kv_length, bs))
                kv_slots[i] = slice(0, 0)
            else:
                blocks = table.covering(kv_length, bs)
                if blocks == list(range(blocks[0], blocks[0] + len(blocks))):  # one run of blocks: a view
                    kv_slots[i] = slice(blocks[0] * bs, blocks[0] * bs + kv_length)
                else:
                    kv_slots[i] = as_tensor(table.slots(0, kv_length, bs))
        long_rows = sum(long_lengths)
        logit_rows = [row for rows in logits for row in rows]
        pad = not (self.one_row_runs_alone()
                   and (self.adapters.kernel is not None or not any(item.seq.adapter for item in scheduled)))
        if len(ids) == 1 and pad:
            # Matrix products on one row take a different kernel (GEMV) than on two or more (GEMM),
            # and the two round differently. A step of a single token gets a dummy second row, so
            # every token always takes the GEMM path and a sequence's numbers never depend on what
            # else is in the batch. The dummy row writes to the scratch slot and is dropped.
            ids.append(ids[0])
            positions.append(positions[0])
            slots.append(kv.scratch_slot)
        native = (tuple(map(as_tensor, (native_rows, native_tables, native_offsets, native_counts)))
                  if native_rows else None)
        long = (tuple(map(as_tensor, (long_starts, long_lengths, long_pasts, long_tables, long_offsets)))
                if long_starts else None)
        return PackedBatch(as_tensor(ids), as_tensor(positions), as_tensor(slots), kv_slots, starts, lengths,
                           kv_lengths, logit_rows, paths, native, long, pad, long_rows)

    def one_row_runs_alone(self) -> bool:
        """Whether a product of one row may run as one row (no dummy second row, pack): with native
        numerics and every layer's product and the output layer's through the native kernel, whose
        sums do not depend on the row count, one included (tests/model/test_linear.py). A lone
        sequence's step then computes half the rows (on AVX2, 0.78x the time: docs/measurements.md).
        Known once every product has had its first call (until then a step keeps the dummy row, as
        the first calls compare the kernel with the library's on the step's rows)."""
        if self._one_row_alone is None:
            products = [self.model.get_output_embeddings()]
            for layer in self.base.layers:
                attn, mlp = layer.self_attn, layer.mlp
                products += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                             mlp.down_proj]
            if all(self.linear.called(module) for module in products):
                self._one_row_alone = all(self.linear.uses_native(module) for module in products)
        return bool(self._one_row_alone)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence], kv: KVCache,
                interrupt: threading.Event | None = None) -> torch.Tensor:
        """Computes the step; returns float32 logits [N, vocab] in the order of `scheduled`: a row per
        sequence that samples, and one per computed token for a decode with proposals or a prompt
        chunk whose logprobs were asked. A proposal's row attends like a decoded token's (native
        kernel): its numbers are those of a one-token step.
        interrupt: checked before each layer; once set, the step stops with StepInterrupted. Its
        tokens count as not computed: what it wrote to their cache slots is written again, with
        the same values, by the step that computes them."""
        batch = self.pack(scheduled, kv)
        if self.linear.gemm is not None and self.linear.gemm.has_amx:  # one process-wide switch: this runner's
            self.linear.gemm.set_amx(self.amx_choice.on)
        self._lora = (self.adapters.rows([item.seq.adapter for item in scheduled], batch.starts, batch.lengths)
                      if self.adapters else None)
        self.linear.long_rows = batch.long_rows  # the layers' products; back to 0 for the output layer
        try:
            if self.fused is not None:
                return self._execute_fused(batch, kv, interrupt)
            return self._execute_modules(batch, kv, interrupt)
        finally:
            self.linear.long_rows = 0

    def _execute_modules(self, batch: PackedBatch, kv: KVCache, interrupt: threading.Event | None) -> torch.Tensor:
        """`execute` through the modules' own norms and activation (no fused kernels)."""
        hidden = self.base.embed_tokens(batch.input_ids[None])  # [1, T, H]
        cos, sin = self.base.rotary_emb(hidden, batch.positions[None])  # [1, T, D] each
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
        for layer_idx, layer in enumerate(self.base.layers):
            if interrupt is not None and interrupt.is_set():
                raise StepInterrupted()
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = self._attention(layer.self_attn, layer_idx, hidden, cos, sin, batch, kv)
            hidden = residual + hidden
            residual = hidden
            hidden = self._mlp(layer.mlp, layer_idx, layer.post_attention_layernorm(hidden))
            hidden = residual + hidden
        rows = batch.logit_rows * 2 if len(batch.logit_rows) == 1 and batch.pad_one_row else batch.logit_rows
        last = self.base.norm(hidden[0, rows])  # [N, H]
        self.linear.long_rows = 0
        return self.linear(self.model.lm_head, last)[: len(batch.logit_rows)].float()  # [N, V]

    def _execute_fused(self, batch: PackedBatch, kv: KVCache, interrupt: threading.Event | None) -> torch.Tensor:
        """`execute` with the fused kernels: the residual stream is one [T, H] tensor updated in place."""
        fused = self.fused
        hidden = self.base.embed_tokens(batch.input_ids)  # [T, H]
        cos, sin = self.base.rotary_emb(hidden[None], batch.positions[None])  # [1, T, D] each
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        if self._native_loop(batch, interrupt):
            dummy = len(batch.input_ids) > sum(batch.lengths)
            adapter_rows = self._lora.native_args if self._lora else (0, None, None, None)
            out_rows = torch.tensor(sorted(set(batch.logit_rows)), dtype=torch.long)  # all the step reads
            delta = self._layers(hidden, cos, sin, batch.slots, batch.native, batch.long, dummy, kv.block_size,
                                 interrupt, adapter_rows, batch.long_rows, out_rows)
            if delta is None:
                raise StepInterrupted()
            self.num_native_loop_steps += 1
        else:
            delta = self._python_loop(hidden, cos, sin, batch, kv, interrupt)
            if self._layers is None:  # the layers' products are bound after their first calls
                self._layers = layers.plan(self._layer_library, self, kv)
        rows = batch.logit_rows * 2 if len(batch.logit_rows) == 1 and batch.pad_one_row else batch.logit_rows
        last = fused.add_rmsnorm(hidden[rows], delta[rows], self.base.norm)  # [N, H]
        self.linear.long_rows = 0
        return self.linear(self.model.lm_head, last)[: len(batch.logit_rows)].float()  # [N, V]

    def _native_loop(self, batch: PackedBatch, interrupt: threading.Event | None) -> bool:
        """Whether the step's layers run in one native call (layers.py): planned, every token attending
        through a native kernel, adapter rows only with the native LoRA kernel, and an interrupt it can
        poll."""
        return (bool(self._layers) and (self._lora is None or self._layers.adapters)
                and all(path is not Attend.SDPA for path in batch.paths)
                and (interrupt is None or isinstance(interrupt, layers.Interrupt)))

    def _python_loop(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch,
                     kv: KVCache, interrupt: threading.Event | None) -> torch.Tensor:
        """The layers, one Python call per kernel: hidden [T, H] updated in place; returns the last
        MLP's output (not yet added)."""
        fused = self.fused
        delta = None  # what the last sublayer adds to the residual stream
        for layer_idx, layer in enumerate(self.base.layers):
            if interrupt is not None and interrupt.is_set():
                raise StepInterrupted()
            normed = fused.add_rmsnorm(hidden, delta, layer.input_layernorm)
            attended = self._attention(layer.self_attn, layer_idx, normed[None], cos, sin, batch, kv)
            normed = fused.add_rmsnorm(hidden, attended[0], layer.post_attention_layernorm)
            delta = self._mlp(layer.mlp, layer_idx, normed)
        return delta

    def _projections(self, modules: tuple, names: tuple[str, ...], layer_idx: int, x: torch.Tensor) -> list:
        """The modules' products of x (one native call where they share it), each adapter's update
        added to its rows (lora.py)."""
        outs = self.linear.many(modules, x) if len(modules) > 1 else [self.linear(modules[0], x)]
        if self._lora is not None:
            self.adapters.apply(self._lora, layer_idx, names, x, outs)
        return outs

    def _mlp(self, mlp, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """LlamaMLP.forward, with our linear calls."""
        gate, up = self._projections((mlp.gate_proj, mlp.up_proj), ("gate_proj", "up_proj"), layer_idx, x)
        product = (self.fused.silu_mul(gate, up, self.linear.long_rows) if self.fused is not None
                   else mlp.act_fn(gate) * up)
        return self._projections((mlp.down_proj,), ("down_proj",), layer_idx, product)[0]

    def _prompt_mask(self, kv_length: int, length: int) -> torch.Tensor:
        """[t, kv_length]: which keys each of a prompt's last `length` tokens sees: those up to its own
        position, and with a sliding window none more than window - 1 positions back (the mask
        transformers builds)."""
        q_pos = torch.arange(kv_length - length, kv_length, device=self.device)[:, None]
        k_pos = torch.arange(kv_length, device=self.device)[None, :]
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return mask

    def _attention(self, attn, layer_idx, hidden, cos, sin, batch: PackedBatch, kv: KVCache):
        num_tokens = hidden.shape[1]
        # Token-major layouts, [T, heads, D], so that one decoded token's heads are one contiguous block.
        query, key, value = self._projections((attn.q_proj, attn.k_proj, attn.v_proj), ("q_proj", "k_proj", "v_proj"),
                                              layer_idx, hidden)
        query = query.view(num_tokens, -1, self.head_dim)  # [T, Hq, D]
        key = key.view(num_tokens, -1, self.head_dim)  # [T, Hkv, D]
        value = value.view(num_tokens, -1, self.head_dim)
        keys_all, values_all = kv.layer(layer_idx)  # [Hkv, slots, D] each
        if self.fused is not None:  # cos, sin: [T, D]
            self.fused.rope_store(query, key, value, cos, sin, batch.slots, keys_all, values_all)
        else:  # cos, sin: [T, 1, D]
            query = query * cos + rotate_half(query) * sin
            key = key * cos + rotate_half(key) * sin
            kv.write(layer_idx, batch.slots, key.transpose(0, 1), value.transpose(0, 1))
        grouped = query.view(num_tokens, self.num_kv_heads, -1, self.head_dim)  # [T, Hkv, Hq/Hkv, D]
        out = torch.empty_like(query)  # [T, Hq, D]
        if batch.native is not None:
            self.native_decode(query, keys_all, values_all, out, *batch.native, kv.block_size, attn.scaling)
        if batch.long is not None:
            self.long_prefill(query, keys_all, values_all, out, batch.long, kv.block_size, attn.scaling)
        for i, (start, length, kv_length, kv_slots) in enumerate(
                zip(batch.starts, batch.lengths, batch.kv_lengths, batch.kv_slots)):
            if batch.paths[i] is not Attend.SDPA:
                continue  # done above
            # [1, Hkv, L, D]: a view where the sequence's blocks are one run, else gathered
            keys = keys_all[None, :, kv_slots]
            values = values_all[None, :, kv_slots]
            window = self.sliding_window
            if window is not None and length == 1 and kv_length > window:  # a decoded token: the last keys
                keys, values = keys[:, :, -window:], values[:, :, -window:]
            windowed = window is not None and length > 1 and kv_length > window
            if length == 1 and not self.match_generate:
                # The query heads sharing a key/value head become the rows of one query block.
                attended = F.scaled_dot_product_attention(grouped[start][None], keys, values, scale=attn.scaling)
                out[start] = attended.view(-1, self.head_dim)
                continue
            q = query[start:start + length].transpose(0, 1)[None]  # [1, Hq, t, D], as transformers lays it out
            if length == 1 or (kv_length == length and not windowed):
                # As transformers' sdpa_attention_forward calls it with no mask: GQA in the kernel,
                # causal for a prompt, plain for one decoded token.
                attended = F.scaled_dot_product_attention(
                    q, keys, values, dropout_p=0.0, scale=attn.scaling, is_causal=length > 1, enable_gqa=True)
            else:  # a chunk after earlier ones (or a windowed prompt): causal with an offset, a mask
                # The query heads sharing a key/value head become rows of one block (rows: head in the
                # group, then token), so the keys and values are read in place, not repeated per query
                # head: the same values as transformers' repeat-and-mask call, and faster for a short
                # chunk after thousands of tokens (README, "Measured costs behind the design").
                group = self.num_heads // self.num_kv_heads
                mask = self._prompt_mask(kv_length, length).repeat(group, 1)
                rows = q.reshape(1, self.num_kv_heads, group * length, self.head_dim)
                attended = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask[None, None],
                                                          scale=attn.scaling)
                attended = attended.view(1, self.num_heads, length, self.head_dim)
            out[start:start + length] = attended[0].transpose(0, 1)  # [t, Hq, D]
        if num_tokens > sum(batch.lengths):  # the dummy row: any finite values do
            out[-1] = out[0]
        return self._projections((attn.o_proj,), ("o_proj",), layer_idx, out.view(1, num_tokens, -1))[0]  # [1, T, H]
