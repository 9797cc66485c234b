"""One pass of GPT-NeoX over the rows of many sequences, each attending to its own KV cache.

The layers are run from the loaded model's own modules (layer norms, linear layers
whatever their kind, e.g. :class:`rinna_cli.int8.Int8Linear`, the rotary embedding), in
transformers' order, so that the linear layers read the weights once for every row of
the step. Every row is multiplied as it would be alone: where a quantized layer picks
its kernel by row count (:class:`rinna_cli.int8.QuantLinear`) and the kernels' rows
can differ (``QuantLinear.rowwise``), the decode rows and each prompt's rows go through
the layers as separate groups. Attention is per sequence: a prompt read whole uses the
causal kernel from an empty cache, as the single engine does; a later chunk of a prompt
is masked (offset by what is cached), which can round differently. A step of one row (a sequence decoding alone, a
lone client of ``rinna serve``) takes the single engine's one native call for a layer's attention half where it
applies (:func:`rinna_cli.attention.fused`, the same bits). Tokens are chosen with transformers'
logits processors and a ``torch.Generator`` per sequence seeded with its seed, the way
the single engine seeds torch's global one.

Imported only where a local model is loaded (torch).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from rinna_cli import attention, native
from rinna_cli.attention import fused, rotate
from rinna_cli.contract import Sampling
from rinna_cli.int8 import QuantLinear


def processors(sampling: Sampling) -> LogitsProcessorList:
    """transformers' processors, in its order, for what ``GenerationConfig`` would get from ``sampling``."""
    chosen = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        chosen.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            chosen.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k != 0:
            chosen.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            chosen.append(TopPLogitsWarper(top_p=sampling.top_p))
    return chosen


@dataclass(eq=False)
class Sequence:
    """One ``generate`` call: its ids, its cache (room for its prompt and reply) and its sampler."""

    prompt: list[int]
    sampling: Sampling
    stop: threading.Event
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # ids whose keys and values are in the cache
    keys: torch.Tensor | None = None  # (layers, heads, capacity, head size)
    values: torch.Tensor | None = None
    generator: torch.Generator | None = None
    processors: LogitsProcessorList | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def remaining(self) -> int:
        """Prompt ids not yet in the cache."""
        return len(self.prompt) - self.fed

    def next_ids(self, budget: int) -> list[int]:
        """The ids to feed this step: up to ``budget`` of the prompt, or the last generated id."""
        if self.prefilling:
            return self.prompt[self.fed : self.fed + budget]
        return self.generated[-1:]

    def pick(self, logits: torch.Tensor) -> int:
        """The next id, as transformers' generate picks it."""
        if self.processors:
            seen = torch.tensor([self.prompt + self.generated], device=logits.device)
            logits = self.processors(seen, logits)
        if self.sampling.greedy:
            return int(torch.argmax(logits, dim=-1))
        return int(torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=self.generator))

    def release(self) -> None:
        """Drop the cache now, not when the caller lets go of the sequence."""
        self.keys = self.values = None


class BatchedForward:
    """The loaded model's GPT-NeoX layers over a step's rows (``forward``), and each sequence's cache (``start``)."""

    def __init__(self, model):
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._layers = list(self._base.layers)
        attention = self._layers[0].attention
        self._heads = model.config.num_attention_heads
        self._head_size = attention.head_size
        self._scaling = attention.scaling
        self._parallel_residual = model.config.use_parallel_residual
        self._whole_rotary = attention.rotary_ndims == attention.head_size  # rinna's: every value of a head rotated
        self._config = model.config  # its attention, as the plan (rinna_cli.attention.use) sets it
        embedding = self._base.embed_in.weight
        self._device, self._dtype = embedding.device, embedding.dtype
        # kernels chosen by row count: the rows of a step cannot all be multiplied together
        self._grouped = any(isinstance(m, QuantLinear) and not m.rowwise() for m in model.modules())

    def start(self, sequence: Sequence) -> None:
        """A sequence enters the batch: its cache (room for its prompt and reply), generator and processors."""
        capacity = len(sequence.prompt) + sequence.sampling.max_new_tokens
        shape = (len(self._layers), self._heads, capacity, self._head_size)
        # torch.empty maps memory lazily: the cache costs what is written, not its capacity
        sequence.keys = torch.empty(shape, dtype=self._dtype, device=self._device)
        sequence.values = torch.empty(shape, dtype=self._dtype, device=self._device)
        sequence.generator = torch.Generator(device=self._device)
        if sequence.sampling.seed >= 0:
            sequence.generator.manual_seed(sequence.sampling.seed)
        else:
            sequence.generator.seed()
        sequence.processors = processors(sequence.sampling)

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Sequence, list[int]]]) -> list[torch.Tensor | None]:
        """One pass of all the batch's rows; the next-token logits of each sequence whose step ends its input.

        The decoding sequences' rows come first. Does not advance ``fed``: the caller does, after the pass.
        """
        ids = [i for _, chunk in batch for i in chunk]
        positions = [p for sequence, chunk in batch for p in range(sequence.fed, sequence.fed + len(chunk))]
        hidden = self._base.embed_in(torch.tensor(ids, device=self._device))
        cos, sin = self._base.rotary_emb(hidden[None], torch.tensor([positions], device=self._device))
        groups = self._groups(batch)
        for index, layer in enumerate(self._layers):
            hidden = self._layer(layer, index, batch, groups, hidden, cos, sin)
        last, wanted, row = [], [], 0
        for sequence, chunk in batch:
            row += len(chunk)
            wanted.append(sequence.fed + len(chunk) >= len(sequence.prompt))
            if wanted[-1]:
                last.append(row - 1)
        if not last:
            return [None] * len(batch)
        logits = iter(self._head(self._base.final_layer_norm(hidden[last])).float())
        return [next(logits)[None] if want else None for want in wanted]

    def _groups(self, batch: list[tuple[Sequence, list[int]]]) -> list[slice]:
        """The row ranges multiplied apart: all rows at once, or the decode rows and each prompt's rows."""
        rows = sum(len(chunk) for _, chunk in batch)
        if not self._grouped:
            return [slice(0, rows)]
        decode = sum(1 for sequence, _ in batch if not sequence.prefilling)
        groups, row = [slice(0, decode)] if decode else [], decode
        for _, chunk in batch[decode:]:
            groups.append(slice(row, row + len(chunk)))
            row += len(chunk)
        return groups

    @staticmethod
    def _rowwise(module, hidden: torch.Tensor, groups: list[slice]) -> torch.Tensor:
        """``module`` (row by row in effect) over each group of rows."""
        if len(groups) == 1:
            return module(hidden)
        return torch.cat([module(hidden[group]) for group in groups])

    def _layer(self, layer, index: int, batch, groups, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
        """One GPT-NeoX layer, as transformers runs it, with attention per sequence."""
        rows, attention = hidden.shape[0], layer.attention
        normed = layer.input_layernorm(hidden)
        if rows == 1 and not self._parallel_residual:  # one sequence's step alone: as the single engine takes it
            sequence = batch[0][0]
            assert sequence.keys is not None and sequence.values is not None
            attended = fused(
                layer, normed, cos, sin, sequence.keys[index][None], sequence.values[index][None], sequence.fed, hidden
            )
            if attended is not None:
                return layer.mlp(layer.post_attention_layernorm(attended)) + attended
        qkv = self._rowwise(attention.query_key_value, normed, groups)
        qkv = qkv.view(1, rows, self._heads, 3 * self._head_size).transpose(1, 2)
        size = self._head_size
        if self._whole_rotary:  # transformers' rotary in fewer operations, the same bits
            pairs = qkv[..., : 2 * size].unflatten(-1, (2, size))  # (1, heads, rows, 2, size): queries and keys
            rotated = rotate(pairs, cos[:, None, :, None], sin[:, None, :, None])
            query, key, value = rotated[..., 0, :], rotated[..., 1, :], qkv[..., 2 * size :]
        else:
            query, key, value = qkv.chunk(3, dim=-1)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        outputs, row = [], 0
        for sequence, chunk in batch:
            outputs.append(self._attend(sequence, index, query, key, value, row, len(chunk)))
            row += len(chunk)
        context = torch.cat(outputs, dim=2).transpose(1, 2).reshape(rows, -1)
        attended = self._rowwise(attention.dense, context, groups)
        if self._parallel_residual:
            return self._rowwise(layer.mlp, layer.post_attention_layernorm(hidden), groups) + attended + hidden
        attended = attended + hidden
        return self._rowwise(layer.mlp, layer.post_attention_layernorm(attended), groups) + attended

    def _attend(self, sequence: Sequence, layer: int, query, key, value, row: int, count: int) -> torch.Tensor:
        """Attention of ``count`` rows of one sequence against its cache, after storing their keys and values."""
        start, end = sequence.fed, sequence.fed + count
        assert sequence.keys is not None and sequence.values is not None
        keys, values = sequence.keys[layer], sequence.values[layer]
        keys[:, start:end] = key[0, :, row : row + count]
        values[:, start:end] = value[0, :, row : row + count]
        if count == 1 and attention.chosen(self._config) == "attend":  # a decode step, as the single engine's
            one, cached = query[:, :, row : row + 1], (keys[None, :, :end], values[None, :, :end])
            if attention.takes(one, *cached):
                return native.library().attend(one, *cached, self._scaling)
        mask = None
        if count > 1 and start > 0:  # a later chunk: causal, offset by what is cached
            mask = torch.ones(count, end, dtype=torch.bool, device=self._device).tril(start)
        return F.scaled_dot_product_attention(
            query[:, :, row : row + count],
            keys[None, :, :end],
            values[None, :, :end],
            attn_mask=mask,
            is_causal=count > 1 and start == 0,
            scale=self._scaling,
        )
