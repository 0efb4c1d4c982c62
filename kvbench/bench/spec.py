"""What `kvbench bench` measures (methods, ratios, lengths, batches) and the prompt length that fits.
Light to import: the peak-memory process reads it before anything large is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbench.errors import KvbenchError
from kvbench.methods import Method, configure
from kvbench.models import max_context


@dataclass
class Spec:
    """What to measure. Lengths are prompt tokens (at most; whole shots), capped so the prompt and
    the generated tokens fit the model's window."""

    methods: list[str] = field(default_factory=lambda: ["streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv",
                                                        "shotkv"])
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.3])
    lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    gen: int = 64
    batches: list[int] = field(default_factory=lambda: [1])
    repeats: int = 3
    settings: dict = field(default_factory=dict)  # method settings applied to every method (e.g. window_size)

    def configs(self) -> list[Method]:
        """`full` first (the reference), then every method at every ratio (once for a method that takes no
        ratio). `settings` go to the methods that have them."""
        return configure(["full", *[n for n in self.methods if n != "full"]], self.settings, self.ratios)


def prompt_length(model, requested: int, gen: int) -> int:
    """`requested` prompt tokens, or fewer so that they and `gen` generated ones fit the model's window."""
    window = max_context(model)
    if requested + gen > window:
        requested = window - gen
    if requested < 1:
        raise KvbenchError(f"prompt length {requested}: give a positive number of tokens")
    return requested
