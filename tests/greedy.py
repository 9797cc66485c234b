"""Greedy replies of a loaded model to the memorized conversations (transformers' ``generate``, no engine).

Shared by the quantization tests, so that they test the weights and kernels alone.
"""

from __future__ import annotations

import torch

from rinna_cli.session import Conversation
from rinna_cli.streamer import ReplyDecoder
from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.memorized_data import CONVERSATIONS

EXPECTED = [[answer for _, answer in turns] for turns in CONVERSATIONS]


def replies(model, tok: Tokenizer, max_new_tokens: int = 96) -> tuple[list[list[str]], list[list[int]]]:
    """The reply texts per conversation and the generated ids of every reply."""
    texts, all_ids = [], []
    for turns in CONVERSATIONS:
        conversation, out = Conversation(tok), []
        for question, _ in turns:
            conversation.add_user(question)
            prompt = torch.tensor([conversation.prompt_ids()])
            with torch.inference_mode():
                output = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new_tokens,
                    eos_token_id=tok.special.eos, pad_token_id=tok.special.pad,
                )
            generated = output[0, prompt.shape[1]:].tolist()
            decoder = ReplyDecoder(tok)
            decoder.push(generated)
            decoder.finish()
            conversation.add_reply(decoder.text, decoder.ids)
            out.append(decoder.text)
            all_ids.append(generated)
        texts.append(out)
    return texts, all_ids
