#!/usr/bin/env python
"""Engine overhead benchmark: what kvbench's attention function and evicting cache cost
over plain transformers (DynamicCache + sdpa), at prefill and per decoded token.

Run:  python benchmarks/engine.py [--model smollm2-135m] [--dtype float32] [--tokens 2048]
                                  [--repeats 5] [--decode-steps 32] [--out benchmarks/results/engine.json]

The issue-7 performance targets are measured by `kvbench bench --targets` (kvbench/bench/),
which shares this file's timing discipline (`kvbench.bench.measure`); this script keeps the
finer breakdown (capture with and without accumulated attention, compress alone).

Everything compared is measured side by side in one run: in every repeat each variant of
a group runs once, the order alternating between repeats (ABC, CBA, ...), so drift in the
machine's speed hits all of them; one untimed warm-up round comes first. Reported: the
median and the min-max of each variant's samples, and the ratios as the median (min-max)
of the per-repeat ratios (paired samples of the same repeat), which is robust to drift.

Groups:
  prefill  - one forward over a ~`--tokens` few-shot prompt (GSM8K exemplars repeated):
             sdpa+DynamicCache, kvbench+KVCache(None), KVCache(<method> ratio 0.1) for the
             prefill-compressing methods present (snapkv, pyramidkv, chunkkv, shotkv), and
             the capture `kvbench.prefill` (window 64) without / with accumulated attention.
  compress - `Prefill.compress(method)` alone ("prefill once, compress many"), relative to
             the prefill time.
  decode   - per token, with kvbench.greedy (the prefill-once decode loop) for every variant:
             plain sdpa+DynamicCache over the 2048-token prompt vs KVCache(full); plain over a
             k-token cache (k = the snapkv 0.1 cache size; the physical limit) vs KVCache(snapkv 0.1).
  decoding - per token with decoding-phase compression active (streamingllm / h2o with
             ratio 0.1 and `--decoding-budget`, evicting every step once the budget is
             reached) vs the same method without it, and vs the plain k-token limit.

OMP_WAIT_POLICY defaults to PASSIVE (set it to override): on a shared machine libgomp's
spin-waiting makes 2-thread timings bimodal (30 ms or 700 ms for the same decode step).
Each repeat line prints the 1-minute load average; trust the ratios, not absolute times.

The plain caches of the decode groups are DynamicCaches filled with the very key/value
tensors the kvbench caches hold (the capture's, or snapkv's kept ones), so both sides
attend over identical shapes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Under CPU contention (other processes on this shared machine) libgomp's default spin-waiting
# makes 2-thread runs bimodal: the same decode step takes 30 ms or 700 ms depending on whether
# both OpenMP threads are scheduled. Passive waiting keeps ratios meaningful; set the variable
# yourself to override (it must be set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvbench  # noqa: E402
from kvbench.bench import measure as bench_measure  # noqa: E402
from kvbench.engine.cache import KVCache  # noqa: E402
from kvbench.engine.prompts import build_prompt, fewshot_parts, load_parts  # noqa: E402
from kvbench.methods import REGISTRY, make_method  # noqa: E402

RATIO = 0.1
WINDOW = 64  # capture window: the largest any method here uses (snapkv/shotkv: 32)
PREFILL_METHODS = ("snapkv", "pyramidkv", "chunkkv", "shotkv")  # measured inline when registered
COMPRESS_METHODS = ("snapkv", "h2o", "streamingllm", "shotkv")
TARGETS = {"decode_wrapper": 1.05, "decode_compressed_vs_limit": 1.05, "decoding_compression": 1.10}


# --- measuring ------------------------------------------------------------------------------


class Variant:
    """`setup()` (untimed) returns the argument of `run(arg)` (timed)."""

    def __init__(self, name: str, run: Callable, setup: Callable | None = None):
        self.name, self.run, self.setup = name, run, setup or (lambda: None)
        self.samples: list[float] = []
        self.last = None


def measure(group: str, variants: list[Variant], repeats: int, per: int = 1, warmup: bool = True,
            inputs: dict | None = None, warm_inputs: dict | None = None) -> None:
    """Interleave the variants (order alternating each repeat) after one untimed warm-up round.

    `per`: divide each sample by this (e.g. decode steps, giving seconds per token).
    `inputs` / `warm_inputs`: when given, `inputs` is updated from `warm_inputs` for the warm-up
    round (e.g. a shorter prompt: same code paths, less time) and restored for the timed ones.
    """
    rounds = ([-1] if warmup else []) + list(range(repeats))
    t_group = time.perf_counter()
    timed = dict(inputs) if inputs is not None else None
    for r in rounds:
        if inputs is not None:
            inputs.update(warm_inputs if r < 0 and warm_inputs else timed)
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            arg = v.setup()
            gc.collect()
            gc.disable()
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out = v.run(arg)
                    dt = time.perf_counter() - t0
            finally:
                gc.enable()
            v.last = out
            if r >= 0:
                v.samples.append(dt / per)
        label = "warm-up" if r < 0 else f"repeat {r + 1}/{repeats}"
        print(f"  [{group}] {label} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{v.name}={(v.samples[-1] if r >= 0 else float('nan')) * (1e3 if per > 1 else 1):.3g}" for v in variants),
            flush=True)
    print(f"  [{group}] {time.perf_counter() - t_group:.0f}s", flush=True)


def summary(samples: list[float]) -> dict:
    return bench_measure.summary(samples)


def paired(a: Variant, b: Variant) -> dict:
    """a/b per repeat (same repeat = same machine state), summarized; also the ratios of medians and of mins."""
    out = bench_measure.paired(a.samples, b.samples)
    out.update(num=a.name, den=b.name, ratio_of_mins=min(a.samples) / min(b.samples))
    return out


# --- inputs ----------------------------------------------------------------------------------


def fewshot_prompt(tokenizer, n_tokens: int):
    """The GSM8K 8-shot prompt with its shots repeated (cyclically) to at most `n_tokens` tokens."""
    parts = load_parts(ROOT / "kvbench" / "examples" / "gsm8k-8shot.json")
    instruction = next(p.text for p in parts if p.kind == "instruction").rstrip("\n")
    shots = [p.text.rstrip("\n") for p in parts if p.kind == "shot"]
    question = next(p.text for p in parts if p.kind == "question")
    chosen: list[str] = []
    built = build_prompt(fewshot_parts(instruction, chosen, question), tokenizer)
    while True:
        trial = chosen + [shots[len(chosen) % len(shots)]]
        b = build_prompt(fewshot_parts(instruction, trial, question), tokenizer)
        if len(b.input_ids) > n_tokens:
            break
        chosen, built = trial, b
    if len(chosen) == 0:
        raise SystemExit(f"--tokens {n_tokens} is shorter than the instruction, one shot and the question")
    return built, len(chosen)


def dynamic_from(model, layers) -> DynamicCache:
    """A transformers DynamicCache holding the given (keys, values) per layer (copied, contiguous)."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        cache.update(k.contiguous().clone(), v.contiguous().clone(), i)
    return cache


# --- the benchmark ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length (at most; whole shots)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--decoding-budget", type=int, default=8,
                    help="generated tokens kept by decoding-phase compression (below --decode-steps, "
                         "so eviction runs every step once reached)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup-tokens", type=int, default=256,
                    help="prompt length of the prefill group's warm-up round (same code paths, less time)")
    ap.add_argument("--prefill-methods", default=",".join(PREFILL_METHODS),
                    help="methods run inline (KVCache(method)) in the prefill group, those registered")
    ap.add_argument("--skip", default="", help="comma-separated groups to skip: prefill,compress,decode,decoding")
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    model, tok = kvbench.load_model(args.model, dtype=args.dtype)
    from kvbench.engine.attention import NAME as KVB
    from kvbench.models import model_info

    info = model_info(model)
    built, n_shots = fewshot_prompt(tok, args.tokens)
    ids = torch.tensor([built.input_ids])
    mask = torch.ones_like(ids)
    segments = [list(built.segments)]
    T, N = ids.shape[1], args.decode_steps

    def prompt_inputs(b) -> dict:
        i = torch.tensor([b.input_ids])
        return {"ids": i, "mask": torch.ones_like(i), "pos": torch.arange(i.shape[1])[None],
                "segments": [list(b.segments)]}

    P = prompt_inputs(built)  # what the prefill variants read; a short prompt during their warm-up
    warm_P = prompt_inputs(fewshot_prompt(tok, min(args.tokens, args.warmup_tokens))[0])
    print(f"model {args.model} ({info['architecture']}, {info['n_layers']} layers, {info['n_heads']}/"
          f"{info['n_kv_heads']} heads, dtype {info['dtype']}); torch {torch.__version__} threads "
          f"{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); prompt {T} tokens "
          f"({n_shots} shots); repeats {args.repeats}; decode steps {N}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; load average {os.getloadavg()[0]:.1f}", flush=True)

    def use(impl: str):
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)

    def forward(cache):
        return model(input_ids=P["ids"], attention_mask=P["mask"], position_ids=P["pos"], past_key_values=cache,
                     use_cache=True, logits_to_keep=1)

    groups: dict[str, list[Variant]] = {}
    results: dict = {"ratios": {}, "targets": {}}

    # --- 1. prefill -------------------------------------------------------------------------
    present = [m for m in args.prefill_methods.split(",") if m in REGISTRY]
    if "prefill" not in skip:
        print(f"\n== prefill ({T} tokens); inline methods: {', '.join(present)}", flush=True)
        pv = [
            Variant("sdpa+DynamicCache", forward, lambda: (use("sdpa"), DynamicCache(config=model.config))[1]),
            Variant("kvbench+KVCache(None)", forward,
                    lambda: (use(KVB), KVCache(model.config, None, P["segments"]))[1]),
        ]
        for m in present:
            meth = make_method(m, ratio=RATIO)
            pv.append(Variant(f"kvbench+KVCache({m} {RATIO})", forward,
                              lambda meth=meth: (use(KVB), KVCache(model.config, meth, P["segments"]))[1]))
        for acc in (False, True):
            pv.append(Variant(f"capture(window={WINDOW}{', accumulated' if acc else ''})",
                              lambda _, acc=acc: kvbench.prefill(model, P["ids"], P["mask"], P["segments"],
                                                                 window=WINDOW, accumulated=acc),
                              lambda: use(KVB)))
        measure("prefill", pv, args.repeats, inputs=P, warm_inputs=warm_P)
        groups["prefill"] = pv
        sdpa, none = pv[0], pv[1]
        r = results["ratios"]
        r["prefill.kvbench_none_vs_sdpa"] = paired(none, sdpa)
        for v, key in zip(pv[2:], [m.replace("-", "_") for m in present] + ["capture", "capture_accumulated"]):
            r[f"prefill.{key}_vs_none"] = paired(v, none)
        r["prefill.capture_accumulated_vs_capture"] = paired(pv[-1], pv[-2])
        capture = pv[-1].last  # Prefill with accumulated attention, for compress and decode
    else:
        use(KVB)
        capture = kvbench.prefill(model, ids, mask, segments, window=WINDOW, accumulated=True)

    # --- 1b. compress many ----------------------------------------------------------------------
    if "compress" not in skip:
        print("\n== Prefill.compress(method) alone", flush=True)
        cv = []
        for m in COMPRESS_METHODS:
            if m in REGISTRY:
                meth = make_method(m, ratio=RATIO)
                cv.append(Variant(f"compress({m} {RATIO})", lambda _, meth=meth: capture.compress(meth)))
        measure("compress", cv, args.repeats)
        groups["compress"] = cv
        ref = statistics.median(groups["prefill"][1].samples) if "prefill" in groups else None
        for v in cv:
            s = summary(v.samples)
            if ref:
                s["share_of_prefill_kvbench_none"] = s["median"] / ref
            results["ratios"]["compress." + v.name.split("(")[1].split()[0]] = s

    # --- 2 + 3. decode per token: wrapper overhead; compressed cache vs its physical limit ----------
    full_kv = [(layer.keys, layer.values) for layer in capture.cache.layers]
    snap = capture.compress(make_method("snapkv", ratio=RATIO))
    k = snap.layers[0].stored_length()
    snap_kv = [(layer.keys, layer.values) for layer in snap.layers]
    logits = capture.logits
    mask_k = torch.ones(1, k, dtype=mask.dtype)

    def decode(arg):
        cache, m = arg
        return kvbench.greedy(model, cache, logits, m, N + 1)  # N forwards, timed as a loop

    def plain(kv, m):
        return lambda: (use("sdpa"), (dynamic_from(model, kv), m))[1]

    def kvb(method, m=mask):
        return lambda: (use(KVB), (capture.compress(method), m))[1]

    if "decode" not in skip:
        print(f"\n== decode per token ({N} steps): prompt cache {T} slots, and k={k} slots (snapkv {RATIO})",
              flush=True)
        dv = [
            Variant(f"sdpa+DynamicCache[{T}]", decode, plain(full_kv, mask)),
            Variant(f"kvbench full[{T}]", decode, kvb(make_method("full"))),
            Variant(f"sdpa+DynamicCache[k={k}]", decode, plain(snap_kv, mask_k)),
            Variant(f"kvbench snapkv {RATIO}[k={k}]", decode, kvb(make_method("snapkv", ratio=RATIO))),
        ]
        measure("decode", dv, args.repeats, per=N)
        groups["decode"] = dv
        r = results["ratios"]
        r["decode.full_vs_sdpa"] = paired(dv[1], dv[0])
        r["decode.snapkv_vs_sdpa_k"] = paired(dv[3], dv[2])
        r["decode.snapkv_vs_full (speed-up)"] = paired(dv[3], dv[1])
        r["decode.sdpa_k_vs_sdpa_full"] = paired(dv[2], dv[0])
        results["targets"]["decode wrapper: kvbench full / sdpa <= 1.05"] = r["decode.full_vs_sdpa"]["median"] <= 1.05
        results["targets"]["decode compressed: snapkv 0.1 / sdpa[k] <= 1.05"] = \
            r["decode.snapkv_vs_sdpa_k"]["median"] <= 1.05

    # --- 4. decoding-phase compression every step ----------------------------------------------------
    if "decoding" not in skip:
        db = args.decoding_budget
        print(f"\n== decode per token with decoding compression (decoding_budget={db}, {N} steps: evicts "
              f"every step from step {db + 1})", flush=True)
        xv = [Variant(f"sdpa+DynamicCache[k={k}]", decode, plain(snap_kv, mask_k))]
        for m in ("streamingllm", "h2o"):
            if m in REGISTRY:
                xv.append(Variant(f"{m} {RATIO}", decode, kvb(make_method(m, ratio=RATIO))))
                xv.append(Variant(f"{m} {RATIO}+db{db}", decode, kvb(make_method(m, ratio=RATIO, decoding_budget=db))))
        measure("decoding", xv, args.repeats, per=N)
        groups["decoding"] = xv
        r = results["ratios"]
        for i in range(1, len(xv), 2):
            m = xv[i].name.split()[0]
            r[f"decoding.{m}_db_vs_{m}"] = paired(xv[i + 1], xv[i])
            r[f"decoding.{m}_db_vs_sdpa_k"] = paired(xv[i + 1], xv[0])
            r[f"decoding.{m}_vs_sdpa_k"] = paired(xv[i], xv[0])
            results["targets"][f"decoding compression: {m}+db / {m} <= 1.10"] = \
                r[f"decoding.{m}_db_vs_{m}"]["median"] <= 1.10
            results["targets"][f"decoding compression: {m}+db / sdpa[k] <= 1.10"] = \
                r[f"decoding.{m}_db_vs_sdpa_k"]["median"] <= 1.10

    # --- report ------------------------------------------------------------------------------------
    total = time.perf_counter() - t_start
    print_report(groups, results, N)
    print(f"\ntotal {total:.0f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results.update(
        config={**vars(args), "threads": torch.get_num_threads(), "prompt_tokens": T, "shots": n_shots,
                "k_slots": k, "ratio": RATIO, "capture_window": WINDOW},
        model=info, env={"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "python": platform.python_version(), "machine": platform.machine(),
                         "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg(),
                         "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        variants={g: {v.name: summary(v.samples) for v in vs} for g, vs in groups.items()},
        units={"prefill": "s", "compress": "s", "decode": "s/token", "decoding": "s/token"},
        total_seconds=total,
    )
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


def print_report(groups: dict, results: dict, n_steps: int) -> None:
    print("\n" + "=" * 100)
    for g, vs in groups.items():
        per_tok = g in ("decode", "decoding")
        unit, scale = ("ms/token", 1e3) if per_tok else (("ms", 1e3) if g == "compress" else ("s", 1.0))
        print(f"\n{g}  [{unit}]   median   min-max   IQR")
        for v in vs:
            s = summary(v.samples)
            print(f"  {v.name:<44} {s['median'] * scale:9.4g}   {s['min'] * scale:.4g}-{s['max'] * scale:.4g}"
                  f"   {s['q1'] * scale:.4g}-{s['q3'] * scale:.4g}")
    print("\nratios: median of the per-repeat paired ratios (their min-max; ratio of medians; ratio of mins)")
    for name, s in results["ratios"].items():
        if "num" in s:
            print(f"  {name:<44} {s['median']:.3f}  ({s['min']:.3f}-{s['max']:.3f}; {s['ratio_of_medians']:.3f}; "
                  f"{s['ratio_of_mins']:.3f})"
                  + f"   ({100 * (s['median'] - 1):+.1f}%)")
        elif "share_of_prefill_kvbench_none" in s:
            print(f"  {name:<44} {s['median'] * 1e3:.1f} ms = {100 * s['share_of_prefill_kvbench_none']:.2f}% "
                  "of a prefill")
    if results["targets"]:
        print("\ntargets")
        for name, ok in results["targets"].items():
            print(f"  {'MET ' if ok else 'MISS'} {name}")


if __name__ == "__main__":
    main()
