"""Shared by the scripts here: `--model` / `--prompt-file` arguments, the model, and one captured prefill."""

from __future__ import annotations

import argparse

import kvbench
from kvbench.engine.decode import encode
from kvbench.engine.prompts import read_prompt_file


def capture(description: str, extra=None):
    """(args, model, tokenizer, encoded prompt, captured prefill); `extra(parser)` adds arguments."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-file", default="kvbench/examples/gsm8k-8shot.json")
    if extra:
        extra(ap)
    args = ap.parse_args()
    model, tok = kvbench.load_model(args.model)
    enc = encode(tok, [read_prompt_file(args.prompt_file)])
    return args, model, tok, enc, kvbench.prefill(model, enc.input_ids, enc.attention_mask)
