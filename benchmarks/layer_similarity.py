"""How alike are adjacent layers' KV states? MiniCache's premise, measured on a model (not a test).

    python benchmarks/layer_similarity.py [--model smollm2-135m] [--prompt-file kvbench/examples/gsm8k-8shot.json]

Prints, per pair of adjacent layers, the mean cosine similarity of the same token's key (and value)
vectors in the same KV head, and the mean angular distance MiniCache thresholds (arccos / pi: 0 is
parallel, 0.5 orthogonal), over one prompt's tokens. MiniCache merges pairs of layers from half depth
by a shared direction per token: it preserves a model only where these cosines are high.
"""

from __future__ import annotations

import json
import math

import torch
from prompt_capture import capture


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def main() -> None:
    args, model, tok, enc, captured = capture(__doc__, lambda ap: ap.add_argument("--json", action="store_true"))
    layers = captured.cache.layers
    rows = []
    for i in range(len(layers) - 1):
        a, b = layers[i], layers[i + 1]
        if a.sliding_window is not None or b.sliding_window is not None:
            continue
        ck, cv = cosines(a.keys, b.keys), cosines(a.values, b.values)
        rows.append({"layers": [i, i + 1], "cos_k": float(ck.mean()), "cos_v": float(cv.mean()),
                     "dist_k": float(ck.clamp(-1, 1).arccos().mean() / math.pi),
                     "dist_v": float(cv.clamp(-1, 1).arccos().mean() / math.pi)})
    if args.json:
        print(json.dumps({"model": args.model, "tokens": enc.lengths[0], "pairs": rows}))
        return
    print(f"{args.model}, {enc.lengths[0]}-token prompt: adjacent layers, same token and KV head")
    print("layers   cos(keys)  cos(values)  dist(keys)  dist(values)")
    for r in rows:
        print(f"{r['layers'][0]:>2}-{r['layers'][1]:<3}  {r['cos_k']:9.3f}  {r['cos_v']:11.3f}  {r['dist_k']:10.3f}  "
              f"{r['dist_v']:12.3f}")
    deep = rows[len(rows) // 2:]
    print(f"from half depth: mean cos(keys) {sum(r['cos_k'] for r in deep) / len(deep):.3f}, "
          f"cos(values) {sum(r['cos_v'] for r in deep) / len(deep):.3f}")


if __name__ == "__main__":
    main()
