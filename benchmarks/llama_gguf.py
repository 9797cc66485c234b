"""The benchmark model as GGUF for llama.cpp's ``llama-bench`` (an optional speed reference; docs/benchmarks.md).

``python benchmarks/llama_gguf.py LLAMA_CPP_DIR OUT.gguf [--layers 36]`` runs llama.cpp's own
``convert_hf_to_gguf.py --outtype q8_0`` on :mod:`benchmarks.model`'s random model. Its GPT-NeoX
converter wants a ``tokenizer.json``, which rinna's repositories do not ship: here it reads the
sentencepiece vocabulary instead, from a folder of links that names ``spiece.model`` as
``tokenizer.model``, and gets ``rotary_pct`` back from config.json (transformers 5 renames it). Q4_0 then comes from ``llama-quantize --allow-requantize OUT.gguf Q4.gguf Q4_0``.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.model import FULL_LAYERS, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llama_cpp", type=Path, help="llama.cpp's source folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=FULL_LAYERS)
    args = parser.parse_args()
    folder = build(args.layers)
    with tempfile.TemporaryDirectory(prefix="rinna-gguf-") as links:
        for name in ("config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json"):
            (Path(links) / name).symlink_to(folder / name)
        (Path(links) / "tokenizer.model").symlink_to(folder / "spiece.model")
        sys.path[:0] = [str(args.llama_cpp), str(args.llama_cpp / "gguf-py")]
        from conversion.gptneox import GPTNeoXModel  # type: ignore[import-not-found]

        GPTNeoXModel.set_vocab = lambda self: self._set_vocab_sentencepiece()
        set_parameters = GPTNeoXModel.set_gguf_parameters

        def with_rotary_pct(self) -> None:  # transformers 5 moves it into rope_parameters
            self.hparams.setdefault("rotary_pct", json.loads((folder / "config.json").read_text())["rotary_pct"])
            set_parameters(self)

        GPTNeoXModel.set_gguf_parameters = with_rotary_pct
        sys.argv = ["convert_hf_to_gguf.py", links, "--outtype", "q8_0", "--outfile", str(args.out)]
        runpy.run_path(str(args.llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
