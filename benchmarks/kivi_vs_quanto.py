"""KIVI (kvbench) against transformers' QuantizedCache (quanto backend) on one prompt (not a test).

    python benchmarks/kivi_vs_quanto.py [--model smollm2-135m] [--prompt-file examples/gsm8k-8shot.json]

Same prompt, bits and group size (32), residual 128. Errors are relative Frobenius errors of the
dequantized keys / values over the tokens both quantize (KIVI keeps its residual in full precision);
bytes are per quantized value (codes + scales + minima) and for the whole cache, against float32.
`tests/test_storage_real.py` asserts the relations printed here.
"""

from __future__ import annotations

import torch
from prompt_capture import capture
from transformers import QuantizedCache

from kvbench.methods import make_method


def rel(pairs) -> float:
    return (sum(float(((a - b) ** 2).sum()) for a, b in pairs) / sum(float((b ** 2).sum()) for _, b in pairs)) ** .5


def main() -> None:
    args, model, tok, enc, captured = capture(__doc__)
    full = captured.cache.layers
    print(f"{args.model}, {enc.lengths[0]} tokens; relative error on the tokens both quantize")
    print("bits  keys kivi  keys quanto  values kivi  values quanto  bytes/value kivi  quanto  cache kivi  quanto")
    for bits in (2, 4):
        ours = captured.compress(make_method("kivi", bits=bits, group_size=32, residual=128))
        theirs = QuantizedCache("quanto", model.config, nbits=bits, q_group_size=32, residual_length=128)
        ok, ov, tk, tv, their_bytes, our_q, n_q = [], [], [], [], 0, 0, 0
        for i, (src, layer) in enumerate(zip(full, ours.layers)):
            k, v = layer.codec.load(layer)
            c = layer.codec
            ok.append((k[:, :, :c.n_k], src.keys[:, :, :c.n_k]))
            ov.append((v[:, :, :c.n_v], src.values[:, :, :c.n_v]))
            theirs.update(src.keys.clone(), src.values.clone(), i)
            q = theirs.layers[i]
            tk.append((q._dequantize(q._quantized_keys)[:, :, :c.n_k], src.keys[:, :, :c.n_k]))
            tv.append((q._dequantize(q._quantized_values)[:, :, :c.n_v], src.values[:, :, :c.n_v]))
            for t in (q._quantized_keys, q._quantized_values):
                their_bytes += sum(x.numel() * x.element_size() for x in (t._data._data, t._scale, t._shift))
            our_q += sum(t.numel() * t.element_size() for t in (c.k_codes, c.k_scale, c.k_min, c.v_codes, c.v_scale,
                                                                    c.v_min))
            n_q += (c.n_k + c.n_v) * src.keys.shape[1] * src.keys.shape[3]
        elements = sum(2 * src.keys.numel() for src in full)
        fp32 = 4 * elements
        print(f"{bits:>4}  {rel(ok):9.3f}  {rel(tk):11.3f}  {rel(ov):11.3f}  {rel(tv):13.3f}  "
              f"{our_q / (4 * n_q):16.4f}  {their_bytes / fp32:6.4f}  {ours.nbytes() / fp32:10.3f}  "
              f"{their_bytes / fp32:6.3f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
