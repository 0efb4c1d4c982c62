"""KIVI (kvbench) against transformers' QuantizedCache (quanto backend) on one prompt (not a test).

    python benchmarks/kivi_vs_quanto.py [--model smollm2-135m] [--prompt-file kvbench/examples/gsm8k-8shot.json]

Same prompt, bits and group size (32), residual 128. Errors are relative Frobenius errors of the
dequantized keys / values over the tokens both quantize (KIVI keeps its residual in full precision);
bytes are per quantized value (codes + scales + minima) and for the whole cache, against float32.
`tests/test_storage_real.py` asserts the relations printed here, on `compare`'s figures.
"""

from __future__ import annotations

import torch
from prompt_capture import capture
from transformers import QuantizedCache

from kvbench.methods import make_method


def rel(pairs) -> float:
    """Relative Frobenius error of the (approximation, original) pairs, over all of them."""
    return (sum(float(((a - b) ** 2).sum()) for a, b in pairs) / sum(float((b ** 2).sum()) for _, b in pairs)) ** .5


def compare(model, captured, bits: int) -> dict:
    """KIVI and transformers' QuantizedCache (quanto) at `bits` on one captured prefill: relative errors over
    the tokens both quantize, bytes of the quantized values (ours: codes, scales, minima; theirs: the same),
    how many values those are, the float32 size of the whole cache, and our compressed cache itself."""
    full = captured.cache.layers
    ours = captured.compress(make_method("kivi", bits=bits, group_size=32, residual=128))
    theirs = QuantizedCache("quanto", model.config, nbits=bits, q_group_size=32, residual_length=128)
    ok, ov, tk, tv, their_bytes, our_q, n_q = [], [], [], [], 0, 0, 0
    for i, (src, layer) in enumerate(zip(full, ours.layers)):
        k, v = layer.codec.load(layer)
        c = layer.codec  # compare what both quantized (KIVI keeps a residual in full precision)
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
    return {"keys_kivi": rel(ok), "keys_quanto": rel(tk), "values_kivi": rel(ov), "values_quanto": rel(tv),
            "quantized_bytes_kivi": our_q, "quantized_values_kivi": n_q, "bytes_quanto": their_bytes,
            "elements": elements, "fp32_bytes": 4 * elements, "cache": ours}


def main() -> None:
    args, model, tok, enc, captured = capture(__doc__)
    print(f"{args.model}, {enc.lengths[0]} tokens; relative error on the tokens both quantize")
    print("bits  keys kivi  keys quanto  values kivi  values quanto  bytes/value kivi  quanto  cache kivi  quanto")
    for bits in (2, 4):
        r = compare(model, captured, bits)
        fp32 = r["fp32_bytes"]
        print(f"{bits:>4}  {r['keys_kivi']:9.3f}  {r['keys_quanto']:11.3f}  {r['values_kivi']:11.3f}  "
              f"{r['values_quanto']:13.3f}  {r['quantized_bytes_kivi'] / (4 * r['quantized_values_kivi']):16.4f}  "
              f"{r['bytes_quanto'] / fp32:6.4f}  {r['cache'].nbytes() / fp32:10.3f}  {r['bytes_quanto'] / fp32:6.3f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
