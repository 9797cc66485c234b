"""A decode step's attention by rinna-cli's own kernel (``attend.c``), where the plan picked it.

transformers runs GPT-NeoX's attention through the function its config names
(``config._attn_implementation``); importing this module registers :func:`forward` under
:data:`NAME`, and :func:`use` names it, or torch's ``sdpa`` again. :func:`forward` takes a
step of one query row without a mask (a single sequence decoding, the case that
repeats for every token) and hands everything else, prompts included, to
transformers' SDPA path; :class:`rinna_cli.batched_forward.BatchedForward` calls the
same kernel for each decoding sequence, so a reply is the same alone and batched. Where the plan picked
rinna-cli's attention, :func:`use` also makes the model's layers :class:`DecodeLayer`, which runs that step of one
sequence in a dozen operations, or its attention half in one native call (``decode.c``) where rinna-cli's kernels
decode the layer (the rest of a layer's work is transformers').

Imported only where a local model is loaded (torch, transformers).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

from rinna_cli import native
from rinna_cli.int8 import QuantLinear

NAME = "rinna_attend"


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel takes this step (:func:`rinna_cli.native.attendable`, no gradient); the rest is SDPA's."""
    return not torch.is_grad_enabled() and native.attendable(query, key, value)


def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: rinna-cli's kernel for an unmasked step it :func:`takes`, else SDPA's path."""
    if attention_mask is None and not dropout and takes(query, key, value):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return native.library().attend(query, key, value, scale).transpose(1, 2), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes (none for an unpadded step of one row)


def rotate(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on queries and keys side by side (..., 2, head size), every value
    rotated over the whole head (GPT-NeoX's ``rotary_pct`` 1): the same products and sums, so the same bits, in 4
    operations instead of 24."""
    half = query_key.shape[-1] // 2
    turned = torch.cat((-query_key[..., half:], query_key[..., :half]), dim=-1)
    return query_key * cos + turned * sin


class DecodeLayer(GPTNeoXLayer):
    """A GPT-NeoX layer that takes a decode step of one sequence (one row, no mask) with rinna-cli's attention in
    fewer operations and module calls (the rotary in 4 operations, no dropout or MLP module): 1.9 ms less of a
    44 ms int4 step on a 2-core Zen 5. Where rinna-cli's kernels decode its linear layers, the attention half is one
    native call instead (:meth:`_fused`; 1-2 ms less of a 37-48 ms int4 step there, 2026-12-07). Everything else is
    transformers' own :meth:`GPTNeoXLayer.forward`. The same operations on the same values, so the same bits."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False, layer_past=None,
                position_embeddings=None, **kwargs):  # fmt: skip
        attention, mlp = self.attention, self.mlp
        if (
            attention_mask is not None
            or layer_past is None
            or position_embeddings is None
            or hidden_states.shape[:2] != (1, 1)
            or self.use_parallel_residual
            or self.training
            or attention.rotary_ndims != attention.head_size
            or chosen(attention.config) != "attend"
        ):
            return super().forward(hidden_states, attention_mask, position_ids, use_cache, layer_past,
                                   position_embeddings, **kwargs)  # fmt: skip
        normed = self.input_layernorm(hidden_states)
        attended = self._fused(normed, layer_past, position_embeddings, hidden_states)
        if attended is not None:
            return mlp.dense_4h_to_h(mlp.act(mlp.dense_h_to_4h(self.post_attention_layernorm(attended)))) + attended
        size = attention.head_size
        qkv = attention.query_key_value(normed)
        heads = qkv.view(1, 1, -1, 3 * size).transpose(1, 2)  # (1, heads, 1, 3 * size), as transformers views it
        cos, sin = position_embeddings
        rotated = rotate(heads[..., : 2 * size].unflatten(-1, (2, size)), cos[:, :, None], sin[:, :, None])
        query, key, value = rotated[..., 0, :], rotated[..., 1, :], heads[..., 2 * size :]
        if not takes(query, key, value):  # nor then the cache, which holds keys and values like these
            return super().forward(hidden_states, attention_mask, position_ids, use_cache, layer_past,
                                   position_embeddings, **kwargs)  # fmt: skip
        keys, values = layer_past.update(key, value, attention.layer_idx)
        context = native.library().attend(query, keys, values, attention.scaling).reshape(1, 1, -1)
        attended = attention.dense(context) + hidden_states
        return mlp.dense_4h_to_h(mlp.act(mlp.dense_h_to_4h(self.post_attention_layernorm(attended)))) + attended

    def _fused(self, normed, cache, position_embeddings, hidden_states):
        """:func:`fused` on the engine's cache (:class:`rinna_cli.engine._GrowingLayer`, which grows to make room);
        None where either does not apply."""
        layers = getattr(cache, "layers", ())
        index = self.attention.layer_idx
        stored = layers[index] if index < len(layers) else None
        if not hasattr(stored, "reserve") or not stored.is_initialized or stored.keys.dim() != 4:
            return None
        keys, values, tokens = stored.reserve(1)
        attended = fused(self, normed, *position_embeddings, keys, values, tokens, hidden_states)
        if attended is not None:
            stored.extend(1)
        return attended


def fused(layer, normed, cos, sin, keys, values, tokens: int, hidden_states):
    """A GPT-NeoX layer's attention half for one decode row of one sequence in one native call
    (:meth:`rinna_cli.native.Library.decode_attention`), with the bits of its operations one by one (DecodeLayer's,
    BatchedForward's), where rinna-cli's kernels decode the layer's linears and rinna-cli's attention was chosen:
    ``keys`` and ``values`` (1, heads, room, size) with room for token ``tokens``; None where it does not apply."""
    attention = layer.attention
    qkv, dense = attention.query_key_value, attention.dense
    if (
        torch.is_grad_enabled()
        or not isinstance(qkv, QuantLinear)
        or not isinstance(dense, QuantLinear)
        or attention.rotary_ndims != attention.head_size
        or chosen(attention.config) != "attend"
    ):
        return None
    qkv_weights, dense_weights = qkv.native_weights(), dense.native_weights()
    if qkv_weights is None or dense_weights is None:
        return None
    step = native.AttentionStep(
        normed, qkv_weights, cos, sin, keys, values, tokens, dense_weights, hidden_states, attention.scaling
    )
    try:
        return native.library().decode_attention(step)
    except ValueError:  # not what decode.c takes (AttentionStep.fusable): the operations one by one
        return None


def use(model, implementation: str) -> None:
    """Run ``model``'s attention with ``implementation``: ``"attend"`` (rinna-cli's, its decode steps by
    :class:`DecodeLayer`) or ``"sdpa"`` (torch's)."""
    model.config._attn_implementation = NAME if implementation == "attend" else "sdpa"
    for layer in model.modules():
        if isinstance(layer, GPTNeoXLayer):
            layer.__class__ = DecodeLayer if implementation == "attend" else GPTNeoXLayer


def chosen(config) -> str:
    """The implementation a model of ``config`` runs: ``"attend"`` or ``"sdpa"``."""
    return "attend" if config._attn_implementation == NAME else "sdpa"
