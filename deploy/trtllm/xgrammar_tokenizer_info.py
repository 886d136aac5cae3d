"""The tokenizer description TensorRT-LLM's C++ guided decoding (xgrammar) needs.

    python deploy/trtllm/xgrammar_tokenizer_info.py --hf-dir HF --end-token '<|im_end|>' OUT.json

The tensorrtllm backend reads the file named by `xgrammar_tokenizer_info_path`
(model_instance_state.cc, getGuidedDecodingConfigFromParams) and builds xgrammar's TokenizerInfo
from three keys:

    encoded_vocab    every token's string as the tokenizer stores it, indexed by token id
                     (byte-level BPE: the 'Ġ'-style strings), "" for ids the tokenizer lacks
    tokenizer_str    the fast tokenizer's tokenizer.json, from which xgrammar reads how tokens
                     decode (byte-level or not, prefix space)
    stop_token_ids   the tokens that may end a constrained answer: the end token the guard
                     sends as end_id, and the tokenizer's end-of-sequence token

TensorRT-LLM's own examples/generate_xgrammar_tokenizer_info.py writes the same keys; this one
also puts the guard's end token among the stop tokens, because LlavaGuard stops at <|im_end|>
and a grammar that could not emit it would run to max_tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def tokenizer_info(tokenizer: Any, end_tokens: Sequence[str]) -> dict[str, Any]:
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    encoded = [""] * size
    for token, index in vocab.items():
        encoded[index] = token
    stop_ids: list[int] = []
    for token in [*end_tokens, tokenizer.eos_token]:
        if token is None:
            continue
        if token not in vocab:
            raise ValueError(f"end token {token!r} is not in the vocabulary")
        if vocab[token] not in stop_ids:
            stop_ids.append(vocab[token])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("a fast (tokenizers) tokenizer is needed: xgrammar reads tokenizer.json")
    return {
        "encoded_vocab": encoded,
        "tokenizer_str": backend.to_str(),
        "stop_token_ids": stop_ids,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, required=True, help="the -hf checkpoint")
    parser.add_argument(
        "--end-token", action="append", default=[], help="a token that ends an answer (repeat)"
    )
    parser.add_argument("out", type=Path, help="the JSON file to write")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.hf_dir))
    info = tokenizer_info(tokenizer, args.end_token)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info))
    print(
        f"xgrammar tokenizer info: {len(info['encoded_vocab'])} tokens, stop ids "
        f"{info['stop_token_ids']} -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
