"""Where compression happens relative to the prompt: the three evaluation protocols.

- ``strict`` (the default): the prompt is prefilled but its last token, compressed, and the last token fed
  through the compressed cache, so even the first answer token is predicted from what was kept. A one-token
  answer (a multiple-choice letter) cannot escape compression.
- ``after-prefill``: the whole prompt is prefilled with full attention and compressed after, as KVCache-Factory
  does at the end of prefill and as the study (arXiv 2502.01941) ran it through lm-evaluation-harness; the first
  answer token is predicted from the full prefill, later ones (the rest of an option, of the gold target, of a
  generation) through the compressed cache. A one-token continuation's score cannot change.
- ``question-agnostic``: everything before the prompt's ``question`` segment is prefilled and compressed (its own
  last tokens are the observation window), then the question is appended uncompressed, and the answer predicted
  as under ``strict``: a context cached before the question is known (prefix caching, multi-turn, kvpress's
  default evaluation, SCBench's shared context). A prompt without a question segment cannot run under it.

At ratio 1.0 (nothing dropped) all three equal the full cache. `session.SampleRun` implements them.
"""

from __future__ import annotations

from kvbench.errors import KvbenchError

STRICT, AFTER_PREFILL, QUESTION_AGNOSTIC = "strict", "after-prefill", "question-agnostic"
PROTOCOLS = (STRICT, AFTER_PREFILL, QUESTION_AGNOSTIC)


def check_protocol(protocol) -> str:
    """`protocol` if it is one of `PROTOCOLS`, else a one-line error naming them."""
    if protocol not in PROTOCOLS:
        raise KvbenchError(f"protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    return protocol
