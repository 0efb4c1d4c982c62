"""Prompts built from labelled parts, tokenized with each part's token span.

A prompt is a sequence of `Part`s (instruction, shots, question, context...).
`build_prompt` joins their texts *as given* -- no separator is inserted, so
put ``"\\n\\n"`` (or whatever the format needs) into the texts themselves;
`fewshot_parts` does that for you -- tokenizes the result once, and maps
each part's character range to a token span through the fast tokenizer's
offset mapping. The tokenization is exactly the tokenizer's own for the
whole text: segments never change `input_ids`.

Which part owns a token (the boundary rule): the part holding the token's
first non-whitespace character, or, for a token that is all whitespace, the
part holding its first character. So with parts ``"Say the word "`` and
``"hello"``, the token ``" hello"`` belongs to the second part, and
``"4.\\n\\n"`` with ``"Question"`` keeps the newlines with the first. A token
whose non-whitespace characters come from two parts (``"hel" + "lo"`` giving
one token ``"hello"``) has no honest owner: `build_prompt` raises
`KvbenchError`; separate such parts with whitespace. Hence each span decodes
to its part's text up to whitespace at its two ends.

Tokens outside every part get no segment: a BOS the tokenizer adds, and with
``chat=True`` the chat template's own tokens (role headers, the default
system prompt, the generation prompt). `segments[i]` is always the span of
`parts[i]`, so the two lists zip; methods that protect non-shot tokens
(ShotKV) treat unlabelled tokens as non-shot.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbench.engine.segments import KINDS, Segment
from kvbench.errors import KvbenchError

_SENTINEL = "\x00kvbench-part-sentinel\x00"


@dataclass(frozen=True)
class Part:
    """One labelled piece of prompt text; `kind` is one of `kvbench.engine.segments.KINDS`."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown part kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(self.text, str):
            raise TypeError(f"part text must be a str, not {type(self.text).__name__}")


@dataclass(frozen=True)
class BuiltPrompt:
    """A rendered, tokenized prompt and the token span of each of its parts.

    Attributes
    ----------
    text : the exact string that was tokenized (chat template applied if asked).
    input_ids : its token ids, special tokens included.
    segments : one `Segment` per part, in order, ``[start, end)`` into `input_ids`;
        contiguous with each other; an empty span if a part owns no token.
    parts : the parts, in order.
    char_spans : ``(start, end)`` of each part's text in `text`.
    """

    text: str
    input_ids: list[int]
    segments: list[Segment]
    parts: tuple[Part, ...]
    char_spans: list[tuple[int, int]]


@dataclass(frozen=True)
class Prompt:
    """Parts plus how to render them; ``Prompt(parts).build(tokenizer)``."""

    parts: tuple[Part, ...]
    chat: bool = False
    system: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))

    def build(self, tokenizer) -> BuiltPrompt:
        return build_prompt(self.parts, tokenizer, chat=self.chat, system=self.system)


def build_prompt(
    parts: Sequence[Part], tokenizer, chat: bool = False, system: str | None = None
) -> BuiltPrompt:
    """Join `parts` (no separator added), tokenize, and label each part's tokens.

    With ``chat=True`` the joined text is one user message (after an optional
    `system` message) rendered by ``tokenizer.apply_chat_template`` with
    ``add_generation_prompt=True``; the template supplies any BOS, so it is
    tokenized with ``add_special_tokens=False``, as transformers does. Without
    it the text is tokenized with the tokenizer's own special tokens (BOS).
    """
    parts = tuple(parts)
    if not parts:
        raise ValueError("build_prompt needs at least one part")
    if not getattr(tokenizer, "is_fast", False):
        raise KvbenchError(
            f"{type(tokenizer).__name__} is a slow tokenizer; token spans need offsets, "
            "load a fast tokenizer (AutoTokenizer with use_fast=True)"
        )
    content = "".join(p.text for p in parts)
    bounds, pos = [], 0
    for p in parts:
        bounds.append((pos, pos + len(p.text)))
        pos += len(p.text)
    if chat:
        text, bounds = _render_chat(content, bounds, tokenizer, system)
    else:
        text = content
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    spans = _token_spans(text, offsets, bounds, parts)
    segments = [Segment(p.kind, a, b) for p, (a, b) in zip(parts, spans, strict=True)]
    return BuiltPrompt(text, ids, segments, parts, bounds)


def _render_chat(content, bounds, tokenizer, system):
    """Render `content` as a user message; return the text and each part's char range in it.

    The template is rendered once with a sentinel as the message, to learn the
    text around the message without searching for it (the message may repeat
    inside the template). Templates that `trim` the message are handled: the
    parts' ranges are clipped to what survives.
    """

    from jinja2 import TemplateError  # a transformers dependency; templates raise it to refuse input

    if getattr(tokenizer, "chat_template", None) is None:
        raise KvbenchError(
            "chat=True but the tokenizer has no chat template; use chat=False or set tokenizer.chat_template"
        )

    def render(message: str) -> str:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": message})
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (ValueError, TemplateError) as e:
            raise KvbenchError(
                f"the chat template refused the prompt ({e}); use chat=False or a different system message"
            ) from None

    text = render(content)
    probe = render(_SENTINEL)
    if probe.count(_SENTINEL) == 1:
        before, after = probe.split(_SENTINEL)
        left = len(content) - len(content.lstrip())
        right = len(content.rstrip())
        for lo, hi in ((0, len(content)), (left, right), (left, len(content)), (0, right)):
            if lo <= hi and before + content[lo:hi] + after == text:
                shift = len(before) - lo
                clip = [(min(max(a, lo), hi) + shift, min(max(b, lo), hi) + shift) for a, b in bounds]
                return text, clip
    if text.count(content) == 1:
        shift = text.index(content)
        return text, [(a + shift, b + shift) for a, b in bounds]
    raise KvbenchError(
        "the chat template rewrites the user message, so its parts cannot be located; "
        "build this prompt with chat=False"
    )


def _token_spans(text, offsets, bounds, parts) -> list[tuple[int, int]]:
    """Token span of each part by the boundary rule (see the module docstring)."""
    points = [a for a, _ in bounds] + [bounds[-1][1]]  # contiguous ranges: n + 1 boundaries

    def region(x: int) -> int:  # -1 before the parts, i for part i, n after them
        return bisect_right(points, x) - 1 if x < points[-1] else len(parts)

    anchors, owners, index = [], [], []  # over tokens with a non-empty character range
    for j, (a, b) in enumerate(offsets):
        if a >= b:  # special token added by the tokenizer (BOS/EOS): no characters, no part
            continue
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        first = a + lead if lead < len(piece) else a
        last = a + len(piece.rstrip()) - 1 if lead < len(piece) else a
        r, r_last = region(first), region(last)
        if r != r_last:
            raise KvbenchError(_straddle_message(text[a:b], r, r_last, parts))
        if anchors and first < anchors[-1]:
            raise RuntimeError(f"token offsets go backwards at token {j}; cannot assign segments")
        anchors.append(first)
        owners.append(r)
        index.append(j)
    spans = []
    for i in range(len(parts)):
        lo = bisect_right(owners, i - 1)  # owners is non-decreasing
        hi = bisect_right(owners, i)
        if lo < hi:
            start, end = index[lo], index[hi - 1] + 1
            if end - start != hi - lo:
                raise RuntimeError(f"part {i} ({parts[i].kind}) has foreign tokens inside its span")
        else:  # owns no token: an empty span where its tokens would be
            start = end = index[lo] if lo < len(index) else (index[-1] + 1 if index else len(offsets))
        spans.append((start, end))
    return spans


def _straddle_message(token: str, r: int, r_last: int, parts) -> str:
    def name(k: int) -> str:
        return f"part {k} ({parts[k].kind})" if 0 <= k < len(parts) else "the chat template"

    return (
        f"token {token!r} joins {name(r)} and {name(r_last)}, so neither owns it; "
        "put whitespace (e.g. a newline) between them"
    )


def fewshot_parts(
    instruction: str | None, shots: Sequence[str], question: str, sep: str = "\n\n"
) -> list[Part]:
    """``[instruction?, shot..., question]``, `sep` appended to every part but the last."""
    texts = [("instruction", instruction)] if instruction is not None else []
    texts += [("shot", s) for s in shots] + [("question", question)]
    return [Part(k, t + sep if i < len(texts) - 1 else t) for i, (k, t) in enumerate(texts)]


def load_parts(path: str | Path) -> list[Part]:
    """Parts from JSON: ``{"parts": [{"kind": ..., "text": ...}, ...]}`` or the bare list.

    Other keys are ignored. Any problem raises `KvbenchError` naming the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KvbenchError(f"{path}: cannot read prompt file ({e.strerror}); check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvbenchError(
            f"{path}: not valid JSON ({e}); fix the file or give a plain-text prompt "
            "in a file not ending in .json"
        ) from None
    items = data.get("parts") if isinstance(data, dict) else data
    shape = 'expected {"parts": [{"kind": ..., "text": ...}, ...]} or a bare list of such objects'
    if not isinstance(items, list) or not items:
        raise KvbenchError(f"{path}: {shape}")
    parts = []
    for i, item in enumerate(items):
        if not (
            isinstance(item, dict) and isinstance(item.get("kind"), str) and isinstance(item.get("text"), str)
        ):
            raise KvbenchError(f'{path}: part {i} needs string fields "kind" and "text"; {shape}')
        if item["kind"] not in KINDS:
            raise KvbenchError(
                f"{path}: part {i} has unknown kind {item['kind']!r}; use one of {', '.join(KINDS)}"
            )
        parts.append(Part(item["kind"], item["text"]))
    return parts


def read_prompt_file(path: str | Path) -> list[Part]:
    """Parts of a prompt file: a ``.json`` file via `load_parts`; any other file is
    one ``question`` part holding its text, trailing newlines removed."""
    path = Path(path)
    if path.is_dir():
        raise KvbenchError(f"{path}: the prompt file is a directory; give a text or .json file")
    if path.suffix.lower() == ".json":
        return load_parts(path)
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise KvbenchError(f"{path}: cannot read prompt file ({e.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise KvbenchError(f"{path}: the prompt file is not UTF-8 text; give a UTF-8 text or .json file") from None
    if not text.strip():
        raise KvbenchError(f"{path}: the prompt file is empty; write the prompt into it")
    return [Part("question", text)]
