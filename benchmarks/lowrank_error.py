"""How low-rank are a model's keys and values? `lowrank`'s reconstruction error by rank (not a test).

    python benchmarks/lowrank_error.py [--model smollm2-135m] [--prompt-file kvbench/examples/gsm8k-8shot.json]

For each ratio (rank = ratio x head dim), the relative Frobenius error of the keys and of the values the
`lowrank` cache gives back for one prompt, over all layers, and the bytes it holds against full.
"""

from __future__ import annotations

import torch
from prompt_capture import capture

from kvbench.methods import make_method


def main() -> None:
    args, model, tok, enc, captured = capture(__doc__)
    print(f"{args.model}, {enc.lengths[0]} tokens\nratio  key error  value error  bytes")
    for ratio in (0.25, 0.5, 0.75):
        cache = captured.compress(make_method("lowrank", ratio=ratio))
        err = {"k": 0.0, "v": 0.0}
        norm = {"k": 0.0, "v": 0.0}
        for src, layer in zip(captured.cache.layers, cache.layers):
            k, v = layer.codec.load(layer)
            for w, x, y in (("k", k, src.keys), ("v", v, src.values)):
                err[w] += float(((x - y) ** 2).sum())
                norm[w] += float((y ** 2).sum())
        print(f"{ratio:5}  {(err['k'] / norm['k']) ** .5:9.3f}  {(err['v'] / norm['v']) ** .5:11.3f}  "
              f"{cache.nbytes() / cache.full_nbytes():.3f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
