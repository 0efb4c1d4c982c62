"""kvbench as an lm-evaluation-harness model: any lm-eval task, scored under KV-cache compression.

    python -m kvbench.lmeval --model kvbench \\
        --model_args pretrained=smollm2-135m,method=snapkv,ratio=0.3 --tasks TASKS [--include_path DIR]

lm-eval (>= 0.4.9) finds models only by import -- its registry has no plugin discovery -- so
`python -m kvbench.lmeval` imports this module, which registers the model type "kvbench", and
hands its arguments to lm-eval's own command line (the same options as ``lm_eval``). From Python:
``import kvbench.lmeval`` then ``lm_eval.simple_evaluate(model="kvbench", model_args=...)``.

model_args: ``pretrained`` (a kvbench model alias, directory or .gguf; default the embedded
smollm2-135m), ``method`` (default ``full``), ``ratio`` / ``budget`` and any setting of the method
(``window_size=16``...), ``dtype`` (float32), ``segments`` (``none`` | ``paragraphs``, below),
``protocol`` (``strict`` | ``after-prefill`` | ``question-agnostic``, `kvbench.evaluation.protocols`).

Scoring is kvbench's own (`evaluate.SampleRun`). Under ``strict`` (the default) a request's context
is prefilled but its last token, the cache compressed by the method, and the last token and the
continuation go through the compressed cache, so every scored token sees only what was kept.
Under ``after-prefill`` the whole context is prefilled and compressed, the continuation's first
token is scored from the full prefill and the rest through the compressed cache; under
``question-agnostic`` what comes before the last paragraph is compressed and the last paragraph
(the question) enters uncompressed: it needs ``segments=paragraphs``.
- ``loglikelihood``: the continuation's summed log-probability and whether greedy decoding would
  produce it. Requests sharing a context (a question's options) share one prefill.
- ``generate_until``: greedy (sampling is refused), stopping at EOS or any ``until`` string, at most
  ``max_gen_toks`` tokens (default 256).
- ``loglikelihood_rolling`` (perplexity tasks) is refused: such a text has no prompt to compress.

Tokenization follows kvbench, not lm-eval's HF model: the context and the continuation are
tokenized separately (HFLM tokenizes them jointly and splits), so a continuation's tokens never
merge with the context's last characters. Whitespace ending the context moves to the
continuation first, as HFLM does. A context shorter than two tokens gets the tokenizer's BOS
(else EOS) in front, as HFLM scores from its prefix token.

Segments: lm-eval hands over a flat string, so by default the context is one ``question`` part
and segment-aware methods (ShotKV, random-shot) see no shots. ``segments=paragraphs`` labels every
blank-line-separated paragraph of the context but the last a ``shot`` and the last the
``question``: lm-eval's few-shot delimiter is a blank line by default, so each example (and a
description) becomes a shot.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from kvbench.errors import KvbenchError

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models, lazily: its registry loads them only while empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("kvbench.lmeval needs lm-evaluation-harness: pip install 'kvbench[lmeval]' "
                      "(or see scripts/setup.sh for the offline set)") from e

SEGMENTS = ("none", "paragraphs")


def context_parts(context: str, segments: str = "none") -> list:
    """The context as kvbench prompt parts (see the module docstring)."""
    from kvbench.engine.prompts import Part

    if segments == "none":
        return [Part("question", context)]
    paras = context.split("\n\n")
    texts = [p + "\n\n" for p in paras[:-1]] + [paras[-1]]
    if not texts[-1] and len(texts) > 1:  # a context ending in a blank line: that is the question's end
        texts.pop()
    return [Part("shot", t) for t in texts[:-1]] + [Part("question", texts[-1])]


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move whitespace ending the context to the start of the continuation (HFLM's rule)."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def check_model_args(pretrained: str = "smollm2-135m", method: str = "full", dtype: str = "float32",
                     device: str | None = None, segments: str = "none", max_gen_toks: int = 256,
                     batch_size: int | str | None = None, max_batch_size: int | None = None,
                     protocol: str = "strict", **settings):
    """The kvbench model's arguments, checked without loading anything; returns the method to run.

    Called by `main` before lm-eval indexes its tasks (slow) and by `KvbenchLM` before the model loads.
    """
    from kvbench.evaluation.protocols import QUESTION_AGNOSTIC, check_protocol
    from kvbench.jobs.config import DTYPES, is_device
    from kvbench.methods import make_method
    from kvbench.models import check_model

    if segments not in SEGMENTS:
        raise KvbenchError(f"segments={segments!r}: use one of {', '.join(SEGMENTS)}")
    check_protocol(protocol)
    if protocol == QUESTION_AGNOSTIC and segments == "none":
        raise KvbenchError("protocol=question-agnostic needs segments=paragraphs: with segments=none the whole context "
                           "is the question and nothing comes before it to compress")
    if not isinstance(dtype, torch.dtype) and str(dtype) not in (*DTYPES, "auto"):
        raise KvbenchError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)} or auto")
    if device is not None and not is_device(str(device)):
        raise KvbenchError(f"device={device!r}: use cpu, cuda, cuda:N or mps")
    if isinstance(max_gen_toks, bool) or not str(max_gen_toks).isdigit() or int(max_gen_toks) < 1:
        raise KvbenchError(f"max_gen_toks={max_gen_toks!r}: give a whole number >= 1, e.g. max_gen_toks=256")
    if "ratio" in settings and "budget" in settings:
        raise KvbenchError("ratio= and budget= given together in model_args; give only one of them")
    if "ratio" in settings:
        try:
            settings["ratio"] = float(settings["ratio"])
        except (TypeError, ValueError):
            raise KvbenchError(f"ratio={settings['ratio']!r}: give the fraction kept, in (0, 1], "
                               "e.g. ratio=0.3") from None
    made = make_method(str(method), **settings)  # unknown methods and settings, out-of-range ratios fail here
    check_model(str(pretrained))
    return made


def _device(device: str | None) -> str:
    """lm-eval's command line asks for "cuda" by default: fall back to the CPU where there is none, as HFLM does."""
    if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device:
            logging.getLogger(__name__).warning("kvbench.lmeval: %s is not available; using the CPU", device)
        return "cpu"
    return str(device)


@register_model("kvbench")
class KvbenchLM(LM):
    """lm-eval's model interface over a kvbench model and a compression method."""

    def __init__(self, pretrained: str = "smollm2-135m", method: str = "full", dtype: str = "float32",
                 device: str | None = None, segments: str = "none", max_gen_toks: int = 256,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, protocol: str = "strict",
                 **settings):
        super().__init__()
        from kvbench.models import load_model

        self.method = check_model_args(pretrained, method, dtype, device, segments, max_gen_toks,
                                       protocol=protocol, **settings)
        self.segments, self.max_gen_toks, self.protocol = segments, int(max_gen_toks), protocol
        self.model, self.tok = load_model(str(pretrained), dtype=dtype, device=_device(device))
        self._device = self.model.device
        self.name = str(pretrained)

    # ------------------------------------------------------------ one context, one prefill
    def _run(self, context: str):
        from kvbench.evaluation import SampleRun
        from kvbench.tasks.base import Sample

        if len(self.tok(context, add_special_tokens=True)["input_ids"]) < 2:
            context = (self.tok.bos_token or self.tok.eos_token or "") + context
        sample = Sample("lm-eval", tuple(context_parts(context, self.segments)), target="", answer="")
        return SampleRun(self.model, self.tok, None, sample, [self.method], chat=False, protocol=self.protocol)

    def _score(self, run, continuation: str) -> tuple[float, bool]:
        ids = self.tok(continuation, add_special_tokens=False)["input_ids"]
        if not ids:
            return 0.0, True
        lp, _ = run.logprobs(self.method, ids)
        target = torch.tensor(ids, device=lp.device)
        return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    # ------------------------------------------------------------ lm-eval's interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out: list = [None] * len(requests)
        by_context: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, continuation = split_whitespace(*req.args)
            by_context[context].append((i, continuation))
        with tqdm(total=len(requests), desc="kvbench loglikelihood", disable=disable_tqdm) as bar:
            for context, items in by_context.items():
                run = self._run(context)
                for i, continuation in items:
                    out[i] = self._score(run, continuation)
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
                    bar.update(1)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise KvbenchError("the kvbench model does not score loglikelihood_rolling (perplexity) requests: a text "
                           "scored from its first token has no prompt cache to compress; use lm-eval's hf model")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="kvbench generate_until", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise KvbenchError("kvbench decodes greedily: set do_sample=false and temperature=0 in gen_kwargs")
            until = kwargs.get("until") or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            text, _ = self._run(context).generate(self.method, int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                                  until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def get_model_info(self) -> dict:

        return {"model": self.name, "kvbench_method": self.method.name, "kvbench_settings": self.method.values(),
                "kvbench_protocol": self.protocol}


def _precheck(argv: list[str]) -> None:
    """What lm-eval checks only after indexing its tasks or evaluating (an --output_path it cannot write is a
    warning at the very end), checked now: the kvbench model's arguments and the output path."""
    import contextlib
    import io
    from pathlib import Path

    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from kvbench.jobs.config import out_dir

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        args = HarnessCLI().parse_args()  # its usage errors exit 2, as lm_eval's do
    finally:
        sys.argv = saved
    if getattr(args, "command", None) != "run":
        return
    logging.disable(logging.WARNING)  # lm-eval warns again when it parses the same flags
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints a --config once is enough
            cfg = EvaluatorConfig.from_cli(args)
    finally:
        logging.disable(logging.NOTSET)
    if cfg.output_path:
        path = Path(cfg.output_path)
        out_dir(path.parent if path.suffix == ".json" else path, "--output_path")
    if cfg.model == "kvbench":
        check_model_args(**{**(cfg.model_args or {}), **({"device": cfg.device} if cfg.device else {})})


def _from_lm_eval_config(e: BaseException) -> bool:
    """Raised by lm-eval's own check of its flags (`EvaluatorConfig`: unknown tasks, flags that need others)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == "lm_eval.config.evaluate_config"


def main(argv: list[str] | None = None) -> int:
    """`kvbench-lm-eval ARGS` (`python -m kvbench.lmeval`): lm-eval's command line, with the kvbench model
    registered. A problem with the arguments is one line on stderr and exit status 2, before any work."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _precheck(argv)
        sys.argv = ["lm_eval", *argv]
        cli_evaluate()
    except KvbenchError as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return e.status
    except (ValueError, TypeError, FileNotFoundError) as e:
        if not _from_lm_eval_config(e):
            raise
        print(f"kvbench: error: {e}; see `kvbench-lm-eval run --help`", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
