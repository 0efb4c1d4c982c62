"""Evaluate a task under methods: accuracy, plus fidelity to the full cache, per sample.

Per sample, one prefill is captured and every (method, ratio) cache is built from it,
the full cache included ("prefill once, compress many"). Then, against each cache:

- multiple choice by option log-likelihood (default): each option's continuation is
  teacher-forced through a fresh copy of the compressed cache and the best sum wins;
  or by the generated letter (`mc="letter"`);
- generation: greedy decoding with the task's stop strings, then its named filters;
- fidelity (how far the compressed model drifts from the full-cache one on the same
  sample): `agree` (same extracted answer as the full cache), `delta_nll` (increase of
  the gold target's teacher-forced NLL, per token) and `kl` (mean KL(full || compressed)
  of the next-token distributions along the gold target). All three are 0 at ratio 1.0.
  Beyond the means (`fidelity.py`, llama.cpp's KL-divergence report): `top1` (the share of
  gold-target positions where both caches' most likely token agree), `kl_p99` and `kl_max`
  (the worst positions), and for generation `follow` (tokens the output follows the full
  cache's output before diverging).
"""

from kvbench.evaluation.configs import FULL, configurations
from kvbench.evaluation.scoring import Row, evaluate, evaluate_group, evaluate_sample, groups, summarize
from kvbench.evaluation.session import SampleRun, continuation_logprobs
from kvbench.methods import label

__all__ = ["FULL", "Row", "SampleRun", "configurations", "continuation_logprobs", "evaluate", "evaluate_group",
           "evaluate_sample", "groups", "label", "summarize"]
