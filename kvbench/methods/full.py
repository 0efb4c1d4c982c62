"""The full cache: nothing evicted. The reference every ΔP is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register


@register("full")
@dataclass(frozen=True)
class Full(Method):
    """No compression: the full KV cache."""

    phases = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 1.0 or self.budget is not None:
            raise KvbenchError("method full keeps everything; drop --ratio/--budget or pick a compressing method")
