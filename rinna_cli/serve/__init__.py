"""``rinna serve``: an OpenAI-compatible HTTP server on the local engine (FastAPI + uvicorn).

Other OpenAI clients (editors, scripts, the ``openai`` package) thereby get
rinna's exact prompt format and tokenizer, which a generic server gets wrong:

* ``POST /v1/completions``: the prompt as text (newlines become ``<NL>``) or
  as token ids; streamed (server-sent events) or not; ``"return_token_ids":
  true`` adds the prompt's and the reply's token ids, as vLLM does.
* ``POST /v1/chat/completions``: user and assistant messages become the
  model card's ``ユーザー``/``システム`` turns (rinna has no system turn: a
  system message is refused with a 400, or with ``--system-messages merge``
  put at the start of the next user message).
* ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (status, queue, batch and token counters).

Up to ``parallel`` replies are generated at once (1: one at a time, the plain
engine; more: a batching engine); up to ``queue_size`` more requests wait their
turn and any beyond get 429. A client that disconnects stops its own generation
after the current token. With an API key, every request must carry it as a
Bearer token. Each request is one access-log line on stderr (unless quiet).

:mod:`.command` is the CLI entry; :mod:`.requests` checks request bodies (pure);
:mod:`.jobs` is the queue; :mod:`.shapes` builds the OpenAI answers; :mod:`.app`
holds the routes. FastAPI and uvicorn (the optional ``serve`` extra) are
imported only by :mod:`.app` and when the server starts.
"""
