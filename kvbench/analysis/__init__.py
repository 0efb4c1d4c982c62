"""Where attention goes over a prompt, and how much of it each method keeps (`kvbench analyze`).

Per task sample, from the very prefill evaluation runs (`evaluate.SampleRun`: the prompt but its
last token, captured once), two sets of queries are read over that prompt, per layer and KV head
(the query heads of a group averaged, as the methods see them):

- ``window``: the last `window` prompt queries, the observation window SnapKV, ShotKV and ChunkKV
  score with, read by the same `LayerView.window_attention` they use;
- ``answer``: the queries that predict the first `gen_tokens` answer tokens -- the prompt's last
  token and the tokens greedily generated after it with the full cache. Their attention comes
  from a second capture over prompt + answer whose window is exactly those queries; only the
  part landing on the compressible prompt is kept (renormalised; `prompt_share` says how much).

Summaries of each: mean entropy of a query's attention (nats; `entropy_norm` divides by
log T), concentration (how many tokens hold 50% / 90% of the queries' summed attention), the
share on the first token (the attention sink), and the share on each segment (instruction,
shot 1..k, question; `other` for tokens in no part, e.g. a BOS).

**Attention recall** of a method at a ratio: the share of the summed attention that falls on
the tokens it keeps, mean over layers and heads. The kept tokens are read from the method's real
cache (`SampleRun.cache`, the one evaluation scores against), so no selection is reimplemented.
`full` recalls 1; uniform attention would give about the kept fraction. Recall is a cheap
predictor of what a method costs; `recall_vs_delta` checks it against a run's stored ΔP.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from kvbench.engine.decode import eos_ids, greedy, max_len
from kvbench.engine.prefill import prefill
from kvbench.errors import KvbenchError
from kvbench.evaluation import FULL, SampleRun
from kvbench.methods import Method, label, make_method

FILE = "analysis.json"
PLOTS = "analysis"  # PNGs go to RUN_DIR/analysis/ (the report rewrites RUN_DIR/plots/)
METHODS = ("streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv", "shotkv", "pyramidinfer", "random",
           "random-shot")
RATIOS = (0.1, 0.3, 0.5, 0.7)


# ---------------------------------------------------------------- attention statistics (tensors in, numbers out)

def distribution(attn: torch.Tensor) -> torch.Tensor:
    """(L, H, Q, T) attention rows -> (L, H, T): the queries' summed attention, normalised to 1 per layer and head."""
    mass = attn.float().sum(2)
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)


def entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each query's attention over the T tokens, rows renormalised: (L, H).

    Rows without mass (padding queries) are left out."""
    p = attn.float()
    total = p.sum(-1, keepdim=True)
    live = (total[..., 0] > 0).float()
    p = p / total.clamp_min(1e-30)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (L, H, Q)
    return (h * live).sum(-1) / live.sum(-1).clamp_min(1)


def concentration(dist: torch.Tensor, share: float) -> torch.Tensor:
    """The fewest tokens holding `share` of each (layer, head)'s attention, heaviest first: (L, H)."""
    cum = dist.sort(-1, descending=True).values.cumsum(-1)
    return ((cum < share - 1e-6).sum(-1) + 1).clamp(max=dist.shape[-1])


def segment_names(segments) -> list[tuple[str, int, int]]:
    """(name, start, end) per segment: shots numbered in prompt order ("shot 1", "shot 2", ...)."""
    out, shots = [], 0
    for s in segments:
        if s.kind == "shot":
            shots += 1
        out.append((f"shot {shots}" if s.kind == "shot" else s.kind, s.start, s.end))
    return out


def segment_shares(dist: torch.Tensor, names: list[tuple[str, int, int]]) -> dict[str, float]:
    """Share of the attention on each named segment, mean over layers and heads; `other`: tokens in none."""
    flat = dist.mean(dim=tuple(range(dist.dim() - 1)))  # each (layer, head) sums to 1, so the mean does too
    covered = torch.zeros_like(flat, dtype=torch.bool)
    out: dict[str, float] = {}
    for name, a, b in names:
        out[name] = out.get(name, 0.0) + float(flat[a:b].sum())
        covered[a:b] = True
    if not bool(covered.all()):
        out["other"] = float(flat[~covered].sum())
    return out


def keep_mask(cache, layers: list[int], T: int) -> torch.Tensor:
    """(L, H, T) True where layer `layers[l]`, head h of `cache` holds prompt token t (batch row 0).

    Read from the cache's slot positions and validity: what the method really kept."""
    out = []
    for i in layers:
        layer = cache.layers[i]
        pos = layer.pos[0].long()  # (H, K)
        ok = layer.valid[0].expand_as(pos) & (pos < T)
        m = torch.zeros(pos.shape[0], T + 1, dtype=torch.bool, device=pos.device)
        m.scatter_(1, torch.where(ok, pos, T), True)
        out.append(m[:, :T])
    return torch.stack(out)


def recall(dist: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Share of each layer's attention on kept tokens, mean over heads: (L,)."""
    return (dist * keep.to(dist.device)).sum(-1).mean(-1)


def summarize_attention(attn: torch.Tensor, names: list[tuple[str, int, int]]) -> dict:
    """Entropy, concentration, sink share and segment shares of (L, H, Q, T) attention over a T-token prompt."""
    T = attn.shape[-1]
    dist, ent = distribution(attn), entropy(attn)
    top50, top90 = concentration(dist, 0.5).float(), concentration(dist, 0.9).float()
    return {"entropy": float(ent.mean()), "entropy_norm": float(ent.mean()) / math.log(max(T, 2)),
            "entropy_per_layer": ent.mean(-1).tolist(),
            "top50": float(top50.mean()), "top90": float(top90.mean()),
            "top50_frac": float(top50.mean()) / T, "top90_frac": float(top90.mean()) / T,
            "first_token": float(dist[..., 0].mean()), "segments": segment_shares(dist, names)}


# ---------------------------------------------------------------- one sample

def _window_attention(run: SampleRun, layers: list[int], window: int) -> torch.Tensor:
    views = [run.captured.cache.layers[i].captured for i in layers]
    w = min(window, views[0].queries.shape[2])
    return torch.stack([v.window_attention(w)[0] for v in views])  # (L, H, w, T)


@torch.inference_mode()
def _answer_attention(model, run: SampleRun, layers: list[int], gen_tokens: int) -> tuple[torch.Tensor, float, list]:
    """Attention of the queries predicting the first answer tokens over the prompt: (L, H, G, T), the share of
    their attention on the prompt at all, and the generated ids (greedy, full cache)."""
    dev = run.mask.device
    n = int(run.mask.sum())
    cache = run.cache(FULL)
    logits = model(input_ids=torch.tensor([[run.last]], device=dev), attention_mask=run.mask,
                   position_ids=torch.tensor([[n - 1]], device=dev), past_key_values=cache,
                   use_cache=True).logits[:, -1].float()
    eos = eos_ids(model, run.tok)
    new = greedy(model, cache, logits, run.mask, gen_tokens, eos)[0].tolist()
    queries = [run.last, *new[:-1]]  # each predicts the next answer token from the prompt (+ the answer so far)
    ids = torch.cat([run.head[0], torch.tensor(queries, device=dev)])[None]
    cap = prefill(model, ids, window=len(queries))
    T = run.head.shape[1]
    full = torch.stack([cap.cache.layers[i].captured.window_attention(len(queries))[0] for i in layers])
    return full[..., :T], float(full[..., :T].sum(-1).mean()), new


def analyze_sample(model, tokenizer, task, sample, methods: list[Method], window: int = 32, gen_tokens: int = 8,
                   chat: bool = False) -> dict:
    """One sample's attention summaries and every configuration's recall (see the module docstring).

    The record's "_maps" holds (L, T) per-layer attention (mean over heads) for the heatmaps."""
    probe = make_method("snapkv", window_size=window)  # SampleRun captures the widest window its methods read
    run = SampleRun(model, tokenizer, task, sample, [*methods, probe], chat)
    layers = [i for i, layer in enumerate(run.captured.cache.layers) if layer.captured is not None]
    T = run.head.shape[1]
    names = segment_names(run.segments[0])
    attn = {"window": _window_attention(run, layers, window)}
    rec: dict = {"sample": sample.id, "prompt_tokens": T, "segments": [list(x) for x in names], "attention": {}}
    if gen_tokens > 0:
        attn["answer"], share, new = _answer_attention(model, run, layers, gen_tokens)
        rec["answer_text"] = tokenizer.decode(new, skip_special_tokens=True)
    dists = {k: distribution(a) for k, a in attn.items()}
    for k, a in attn.items():
        rec["attention"][k] = summarize_attention(a, names)
    w = attn["window"].shape[2]
    rec["attention"]["window"]["window_share"] = float(dists["window"][..., T - w:].sum(-1).mean())
    if "answer" in attn:
        rec["attention"]["answer"]["prompt_share"] = share
    rec["recall"] = []
    for m in [FULL, *methods]:
        keep = keep_mask(run.cache(m), layers, T)
        rec["recall"].append({"config": label(m), "method": m.name, "ratio": None if m.budget is not None else m.ratio,
                              "budget": m.budget, "kept_fraction": float(keep.float().mean()),
                              **{k: float(recall(d, keep).mean()) for k, d in dists.items()}})
    rec["_maps"] = {k: d.mean(1) for k, d in dists.items()}
    return rec


# ---------------------------------------------------------------- a task, a model

def _mean_dicts(dicts: list[dict]) -> dict[str, float]:
    """Key-wise mean, a key missing from a dict counting as 0 (a segment a prompt lacks gets no attention)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in keys}


def summarize_task(records: list[dict]) -> dict:
    """Means over a task's samples: attention summaries per query set, token shares, recall per configuration."""
    out: dict = {"n": len(records), "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in records]))}
    for kind in records[0]["attention"]:
        recs = [r["attention"][kind] for r in records]
        scal = {k: float(np.mean([x[k] for x in recs])) for k, v in recs[0].items() if isinstance(v, float)}
        out[kind] = {**scal, "segments": _mean_dicts([x["segments"] for x in recs]),
                     "entropy_per_layer": np.mean([x["entropy_per_layer"] for x in recs], 0).tolist()}
    tokens = []
    for r in records:
        t = defaultdict(float)
        for name, a, b in r["segments"]:
            t[name] += (b - a) / r["prompt_tokens"]
        if 1.0 - sum(t.values()) > 1e-9:
            t["other"] = 1.0 - sum(t.values())
        tokens.append(t)
    out["token_shares"] = _mean_dicts(tokens)
    by = defaultdict(list)
    for r in records:
        for x in r["recall"]:
            by[x["config"]].append(x)
    out["recall"] = [{**{k: v for k, v in xs[0].items() if not isinstance(v, float)},
                      **{k: float(np.mean([x[k] for x in xs])) for k, v in xs[0].items() if isinstance(v, float)}}
                     for xs in by.values()]
    return out


def analyze(model, tokenizer, tasks: list[tuple[str, object]], methods: list[Method], limit: int | None = 4,
            window: int = 32, gen_tokens: int = 8, chat: bool = False, model_name: str = "",
            progress: bool = True) -> dict:
    """The analysis document for `tasks` ((task_key, Task) pairs): per task, its summary, a heatmap of its
    first sample, and the per-sample records; plus flat recall records (what `recall_vs_delta` reads)."""
    from tqdm.auto import tqdm

    if window < 1 or gen_tokens < 0:
        raise KvbenchError("--window must be >= 1 and --gen-tokens >= 0")
    doc: dict = {"model": model_name, "window": window, "gen_tokens": gen_tokens,
                 "configs": [label(m) for m in [FULL, *methods]], "tasks": [], "recall": []}
    for key, task in tasks:
        task.bind(tokenizer, max_len(model))
        samples = task.samples(limit)
        if not samples:
            raise KvbenchError(f"task {key} has no samples to analyse")
        records = []
        for s in tqdm(samples, desc=f"analyze {key}", disable=not progress):
            records.append(analyze_sample(model, tokenizer, task, s, methods, window, gen_tokens, chat))
        maps = records[0]["_maps"]
        heat = {"sample": records[0]["sample"], "segments": records[0]["segments"],
                **{k: np.round(v.cpu().numpy(), 6).tolist() for k, v in maps.items()}}
        for r in records:
            del r["_maps"]
            doc["recall"] += [{"model": model_name, "task": task.name, "task_key": key,
                               "ability": task.config.ability, "sample": r["sample"], **x} for x in r["recall"]]
        doc["tasks"].append({"model": model_name, "task": task.name, "task_key": key, "ability": task.config.ability,
                             "summary": summarize_task(records), "heatmap": heat, "samples": records})
    return doc


# ---------------------------------------------------------------- does recall predict loss?

def spearman(x, y) -> float | None:
    """Spearman's rank correlation (ties take their mean rank); None with fewer than 3 points or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts + 1) / 2)[inverse]  # 0-based mean rank of each tie group


def recall_vs_delta(rows: list[dict], recall_records: list[dict]) -> dict:
    """Each (model, task, configuration)'s mean attention recall against its ΔP and mean KL in a run's rows.

    ΔP = (P_c - P_full) / P_full on the samples both have (the report's definition; points where P_full
    is 0 have no ΔP). Spearman rank correlations per ability and over all: recall against ΔP (expected
    positive: keeping the attended tokens costs less) and against KL (expected negative); plus, per
    sample, recall against that sample's KL (many more points than configurations)."""
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[(r["model"], r["task_key"], r["config"])][r["sample"]] = r
    rec: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for x in recall_records:
        rec[(x["model"], x["task_key"], x["config"])][x["sample"]] = x
    predictors = [p for p in ("window", "answer") if any(p in x for x in recall_records)]
    points, pairs = [], defaultdict(list)
    for key, got in sorted(rec.items()):
        model, task_key, config = key
        mine, full = by.get(key), by.get((model, task_key, "full"))
        if not mine or not full or config == "full":
            continue
        common = sorted(set(mine) & set(full))
        if not common:
            continue
        pf, pc = np.mean([full[s]["score"] for s in common]), np.mean([mine[s]["score"] for s in common])
        kls = [mine[s]["kl"] for s in common if mine[s].get("kl") is not None]
        x0 = next(iter(got.values()))
        point = {"model": model, "task_key": task_key, "ability": x0.get("ability", "unknown"), "config": config,
                 "method": x0["method"], "ratio": x0.get("ratio"), "n": len(common),
                 "dp": float((pc - pf) / pf) if pf > 0 else None, "kl": float(np.mean(kls)) if kls else None}
        for p in predictors:
            point[f"recall_{p}"] = float(np.mean([g[p] for g in got.values() if p in g]))
            for s, g in got.items():
                if s in mine and mine[s].get("kl") is not None and p in g:
                    pairs[p].append((g[p], mine[s]["kl"]))
        points.append(point)
    corr = []
    for ability in ["all", *sorted({p["ability"] for p in points})]:
        here = [p for p in points if ability == "all" or p["ability"] == ability]
        for p in predictors:
            for target in ("dp", "kl"):
                xy = [(q[f"recall_{p}"], q[target]) for q in here if q[target] is not None]
                corr.append({"ability": ability, "predictor": p, "target": target, "n": len(xy),
                             "spearman": spearman(*zip(*xy)) if xy else None})
    per_sample = [{"predictor": p, "target": "kl", "n": len(v), "spearman": spearman(*zip(*v)) if v else None}
                  for p, v in pairs.items()]
    return {"points": points, "correlations": corr, "per_sample": per_sample}


# ---------------------------------------------------------------- files

def _finite(v):
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def read(run_dir) -> dict | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KvbenchError(f"{path} is not valid JSON ({e}); delete it and run `kvbench analyze` again") from None


def merge(old: dict | None, new: dict) -> dict:
    """`new` over `old`: tasks (and their recall records) of the same (model, task_key) are replaced."""
    if not old or old.get("window") != new["window"] or old.get("gen_tokens") != new["gen_tokens"]:
        return new
    keys = {(t["model"], t["task_key"]) for t in new["tasks"]}
    tasks = [t for t in old.get("tasks", []) if (t["model"], t["task_key"]) not in keys]
    recs = [r for r in old.get("recall", []) if (r["model"], r["task_key"]) not in keys]
    return {**new, "tasks": tasks + new["tasks"], "recall": recs + new["recall"],
            "configs": list(dict.fromkeys(old.get("configs", []) + new["configs"]))}


def write(doc: dict, run_dir) -> list[Path]:
    """Merge `doc` into RUN_DIR/analysis.json, correlate with RUN_DIR's results if any, draw the PNGs."""
    import kvbench.analysis.plots as report

    run_dir = Path(run_dir)
    (run_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    doc = merge(read(run_dir), doc)
    rows = _stored_rows(run_dir)
    doc["recall_vs_delta"] = recall_vs_delta(rows, doc["recall"]) if rows else None
    files = report.draw_all(doc, run_dir / PLOTS)
    doc["plots"] = [str(p.relative_to(run_dir)) for p in files]
    path, tmp = run_dir / FILE, run_dir / (FILE + ".tmp")
    try:  # whole or not at all: a full disk must not truncate the analyses already merged into the file
        tmp.write_text(json.dumps(_finite(doc), allow_nan=False), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return [path, *files]


def _stored_rows(run_dir: Path) -> list[dict]:
    from kvbench import store

    return store.Store(run_dir).rows() if (run_dir / store.FILE).is_file() else []


def html_section(run_dir) -> str:
    """The report's "Attention analysis" section for RUN_DIR (empty without analysis.json). ΔP links are
    recomputed from the run's current results, so the section follows a resumed run."""
    import kvbench.analysis.plots as report

    doc = read(run_dir)
    if not doc:
        return ""
    rows = _stored_rows(Path(run_dir))
    return report.html(doc, Path(run_dir), recall_vs_delta(rows, doc["recall"]) if rows else None)
