"""A decode step's attention by rinna-cli's own kernel (``attend.c``), where the plan picked it.

transformers runs GPT-NeoX's attention through the function its config names
(``config._attn_implementation``); importing this module registers :func:`forward` under
:data:`NAME`, and :func:`use` names it, or torch's ``sdpa`` again. :func:`forward` takes a
step of one query row without a mask (a single sequence decoding, the case that
repeats for every token) and hands everything else, prompts included, to
transformers' SDPA path; :class:`rinna_cli.batched_forward.BatchedForward` calls the
same kernel for each decoding sequence, so a reply is the same alone and batched.

Imported only where a local model is loaded (torch, transformers).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rinna_cli import native

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


def use(model, implementation: str) -> None:
    """Run ``model``'s attention with ``implementation``: ``"attend"`` (rinna-cli's) or ``"sdpa"`` (torch's)."""
    model.config._attn_implementation = NAME if implementation == "attend" else "sdpa"


def chosen(config) -> str:
    """The implementation a model of ``config`` runs: ``"attend"`` or ``"sdpa"``."""
    return "attend" if config._attn_implementation == NAME else "sdpa"
