"""Generation on an OpenAI-compatible server (vLLM, ``rinna serve``), with token ids both ways.

A plain OpenAI client gets rinna wrong: the server's transformers tokenizer
drops the trailing space of ``システム: `` and loses byte-fallback characters.
So :class:`RemoteEngine` builds and tokenizes the prompt here, exactly as for
the local engine, sends it to ``POST /v1/completions`` as a list of token ids,
and reads the reply back as token ids, which the same
:class:`~rinna_cli.streamer.ReplyDecoder` turns into text. It implements
:class:`rinna_cli.contract.Engine`, so ``ask`` and ``chat`` use it unchanged.

:mod:`.transport` speaks HTTP (errors, server-sent events, closing on Ctrl-C);
:mod:`.engine` knows the API (model discovery, the request, the token-id modes).
"""

from rinna_cli.remote.engine import MODES, RemoteEngine, connect
from rinna_cli.remote.transport import EndpointError, base_url

__all__ = ["MODES", "EndpointError", "RemoteEngine", "base_url", "connect"]
