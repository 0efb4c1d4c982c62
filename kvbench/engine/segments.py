"""Labelled token spans of a prompt: `instruction`, `shot`, `question`, `context`."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("instruction", "shot", "question", "context", "template")


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of a prompt (indices into its real, unpadded tokens)."""

    kind: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown segment kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad segment span [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start
