"""Storage codecs on tensors small enough to check by hand: KIVI quantization and packing, the
low-rank basis against numpy's SVD, ragged per-head packing, MiniCache's SLERP merge.

Each codec is driven through a real `CompressedLayer` (update -> park -> update ...), the way
the engine drives it, and its bytes are compared with sizes written out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvbench.engine.cache import CompressedLayer
from kvbench.engine.storage.lowrank import LowRank, basis, lowrank_bytes
from kvbench.engine.storage.merged import Merged, Pair, slerp
from kvbench.engine.storage.quantized import Kivi, dequantize, kivi_bytes, pack, quantize, unpack
from kvbench.engine.storage.ragged import Ragged, select_rows


def layer_with(keys: torch.Tensor, values: torch.Tensor, codec=None, valid: torch.Tensor | None = None):
    """A prefilled layer holding `keys`/`values` (B, H, T, D); `valid` (B, T) marks padding."""
    layer = CompressedLayer()
    layer.update(keys, values)
    if valid is not None:
        layer.valid, layer.all_valid = valid[:, None].clone(), bool(valid.all())
    layer.n_prompt = layer.seen
    layer.n_prefill_slots = layer.stored_length()
    layer.prefill_kept = layer.kept_tokens()
    layer.codec = codec
    layer.park()
    return layer


def step(layer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: what attention reads, then park."""
    keys, values = layer.update(k, v)
    layer.park()
    return keys, values


# --- KIVI: packing and quantization ---------------------------------------------------------------

def test_pack_puts_the_first_code_in_the_lowest_bits():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 + (2 << 2) + (3 << 4), 255]]
    assert pack(torch.tensor([[5, 12]], dtype=torch.uint8), 4).tolist() == [[5 + (12 << 4)]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 2, 5, 16), dtype=torch.uint8, generator=g)
    codes[0, 0, 0, :2] = torch.tensor([0, (1 << bits) - 1])  # the extremes: every bit of a code set and clear
    packed = pack(codes, bits)
    assert packed.shape == (3, 2, 5, 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_quantize_a_group_by_hand():
    # min 0, max 3.3, 2 bits: scale 1.1; 1.0 / 1.1 = 0.909 -> 1, 2.0 / 1.1 = 1.818 -> 2
    x = torch.tensor([[0.0, 1.0, 2.0, 3.3]])
    codes, scale, mn = quantize(x, 2, dim=1)
    assert codes.tolist() == [[0, 1, 2, 3]]
    assert scale.item() == pytest.approx(1.1) and mn.item() == 0.0
    assert dequantize(codes, scale, mn, torch.float32)[0].tolist() == pytest.approx([0.0, 1.1, 2.2, 3.3])


def test_quantize_error_is_at_most_half_a_step():
    x = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4):
        codes, scale, mn = quantize(x, bits, dim=1)
        err = (dequantize(codes, scale, mn, torch.float32) - x).abs()
        assert bool((err <= scale / 2 + 1e-6).all())


def test_quantize_constant_group_and_masked_padding():
    codes, scale, mn = quantize(torch.full((1, 4), 2.5), 2, dim=1)
    assert codes.tolist() == [[0, 0, 0, 0]] and scale.item() == 0 and mn.item() == 2.5
    # A padding slot with a huge value takes no part in the range.
    x = torch.tensor([[1000.0, 0.0, 1.0, 3.0]])
    ok = torch.tensor([[False, True, True, True]])
    _, scale, mn = quantize(x, 2, dim=1, valid=ok)
    assert scale.item() == pytest.approx(1.0) and mn.item() == 0.0


def test_kivi_layout_by_hand():
    """T=10, D=8, G=2, R=4, 2 bits, float32. Keys: 8 quantized (two blocks of R), 2 full precision;
    values: 6 quantized, the 4 newest full precision."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 10, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g)
    codec = Kivi(bits=2, group_size=2, residual=4)
    layer = layer_with(k, v, codec)
    assert layer.keys is None and codec.n_k == 8 and codec.n_v == 6
    assert codec.k_codes.shape == (1, 1, 8, 2) and codec.k_scale.shape == (1, 1, 4, 8)  # 4 groups of 2 tokens
    assert codec.v_codes.shape == (1, 1, 6, 2) and codec.v_scale.shape == (1, 1, 6, 4)  # 4 groups of 2 channels
    assert torch.equal(codec.k_tail, k[:, :, 8:]) and torch.equal(codec.v_tail, v[:, :, 6:])
    # keys: 16 B codes + 2*4*8*4 B scale/min + 2*8*4 B tail; values: 12 + 2*6*4*4 + 4*8*4
    assert layer.nbytes() == (16 + 256 + 64) + (12 + 192 + 128) == kivi_bytes(10, 1, 8, torch.float32, 2, 2, 4)
    # two generated tokens: the key residual fills (R=4) and is quantized; one more value moves per token
    for _ in range(2):
        keys, values = step(layer, torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g))
    assert keys.shape == (1, 1, 12, 8) and codec.n_k == 12 and codec.k_tail is None and codec.n_v == 8
    assert layer.nbytes() == kivi_bytes(12, 1, 8, torch.float32, 2, 2, 4)


def test_kivi_keys_per_channel_values_per_token():
    """An outlier channel in the keys spoils only its own channel; an outlier token in the values only itself."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 8, 8, generator=g) * 0.1
    k[..., 3] += 50.0
    v = torch.randn(1, 1, 8, 8, generator=g) * 0.1
    v[:, :, 2] *= 500.0
    codec = Kivi(bits=2, group_size=8, residual=8)
    layer = layer_with(k, v, codec)
    step(layer, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))  # 16 slots: 8 keys, 8 values quantized
    keys, values = codec.load(layer)
    kerr, verr = (keys[0, 0, :8] - k[0, 0]).abs(), (values[0, 0, :8] - v[0, 0]).abs()
    span = 0.1 * 8  # ~ the range of a N(0, 0.1) group: a step of span / 3
    assert kerr[:, [0, 1, 2, 4, 5, 6, 7]].max() < span and verr[[0, 1, 3, 4, 5, 6, 7]].max() < span


def test_kivi_prompt_only_leaves_generated_tokens_in_full_precision():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    codec = Kivi(bits=4, group_size=4, residual=4, prompt_only=True)
    layer = layer_with(k, v, codec)
    new = [torch.randn(1, 2, 1, 8, generator=g) for _ in range(6)]
    for x in new:
        step(layer, x, x)
    # Only the prompt is quantized (all of it once generated tokens fill the value residual); every
    # generated token stays in full precision, where decoding eviction may still drop it.
    assert codec.n_k == 8 and codec.n_v == 8
    assert torch.equal(codec.k_tail, torch.cat(new, dim=2)) and torch.equal(codec.v_tail, torch.cat(new, dim=2))


# --- low rank ---------------------------------------------------------------------------------------

def kivi_rows(lengths, bits, dtype, g, filler=False):
    """One-row layers held by KIVI stores (H 2, D 8, G 4, R 8), prompts of `lengths`; with `filler`, the second row
    evicts first: its heads keep 5 and 7 slots (fewer than a block), so its first two slots are filler in head 0."""
    rows = []
    for i, n in enumerate(lengths):
        k, v = torch.randn(1, 2, n, 8, generator=g, dtype=dtype), torch.randn(1, 2, n, 8, generator=g, dtype=dtype)
        if filler and i == 1:
            layer = layer_with(k, v)
            mask = torch.ones(1, 2, n, dtype=torch.bool)
            mask[0, 0, :n - 5], mask[0, 1, :n - 7] = False, False
            layer.keep(mask)
            layer.n_prefill_slots, layer.prefill_kept = layer.stored_length(), layer.kept_tokens()
            layer.codec = Kivi(bits, 4, 8)
            layer.park()
        else:
            layer = layer_with(k, v, Kivi(bits, 4, 8))
        rows.append(layer)
    return rows


def same_as_alone(stacked, rows, feeds, g, dtype):
    """Feed the stack and each row alone the same new keys and values, pass by pass; after every pass each stacked
    row's slots equal, bit for bit, what its own store gives attention (`Kivi.load`)."""
    for q in feeds:
        k = torch.randn(len(rows), 2, q, 8, generator=g, dtype=dtype)
        v = torch.randn(len(rows), 2, q, 8, generator=g, dtype=dtype)
        step(stacked, k, v)
        for b, layer in enumerate(rows):
            step(layer, k[b:b + 1], v[b:b + 1])
            want_k, want_v = layer.codec.load(layer)
            n = want_k.shape[2]
            assert torch.equal(stacked.keys[b:b + 1, :, -n:], want_k), (q, b)
            assert torch.equal(stacked.values[b:b + 1, :, -n:], want_v), (q, b)
    assert stacked.rows_codec.n_k == [layer.codec.n_k for layer in rows]
    assert stacked.rows_codec.n_v == [layer.codec.n_v for layer in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_rows_of_a_stack_hold_what_each_store_gives_attention(bits, dtype):
    """Three KIVI rows of different lengths (one with filler slots: its heads kept different counts) stacked, then
    fed the same new keys and values as each alone: a few slots at once, a pass completing two key blocks, then one a
    step, values leaving the residual (the filler row's first key block, filler included, completes while
    decoding); then two rows leave the batch, as finished rows do, and the rest go on."""
    from kvbench.engine.storage.quantized import KiviRows

    g = torch.Generator().manual_seed(bits)
    rows = kivi_rows((13, 21, 30), bits, dtype, g, filler=True)
    feeds = [3, 20, 2] + [1] * 12  # the 20: two key blocks at once
    bytes_after = [layer.nbytes_after(sum(feeds)) for layer in rows]  # what each will hold once they are fed
    stacked = CompressedLayer()
    stacked.stack_rows(rows)
    assert isinstance(stacked.rows_codec, KiviRows) and stacked.codec is None and stacked.keys.dtype == dtype
    assert stacked.stored_length() == 30 and stacked.rows_codec.starts == [17, 23, 0]  # left-padded to the longest
    same_as_alone(stacked, rows, feeds, g, dtype)
    assert min(stacked.rows_codec.n_k) >= 3 * 8 and rows[1].codec.k_min.shape[2] == 10  # filler row: 40 keys
    assert [layer.nbytes() for layer in rows] == bytes_after  # the store's size rule, as `nbytes_after` counts it
    stacked.batch_select_indices(torch.tensor([2, 0]))  # rows that finished leave: the rest keep their own counts
    assert stacked.rows_codec.starts == [0, 17]
    same_as_alone(stacked, [rows[2], rows[0]], [1] * 10, g, dtype)


def test_kivi_rows_of_equal_lengths_and_a_stack_repeated():
    """Rows of one length (no filler at all: the stack's fast path, no validity mask) still quantize as alone, and
    so do rows of which only some have values leaving the residual; a one-row stack repeated (one row per option)
    gives every copy the row's own state."""
    g = torch.Generator().manual_seed(7)
    rows = kivi_rows((12, 12), 2, torch.float32, g)
    stacked = CompressedLayer()
    stacked.stack_rows(rows)
    assert stacked.all_valid and stacked.rows_codec.starts == [0, 0]
    same_as_alone(stacked, rows, [1] * 14, g, torch.float32)
    rows = kivi_rows((12, 5), 2, torch.float32, g)  # the shorter row's values stay in the residual for 3 more steps
    stacked = CompressedLayer()
    stacked.stack_rows(rows)
    same_as_alone(stacked, rows, [1] * 6, g, torch.float32)
    copies = [kivi_rows((10,), 2, torch.float32, torch.Generator().manual_seed(11))[0] for _ in range(4)]
    stacked = CompressedLayer()
    stacked.stack_rows(copies[:1])
    stacked.expand_batch(3)  # views of one row; each then takes its own tokens
    assert stacked.rows_codec.starts == [0] * 3 and stacked.rows_codec.n_k == [copies[0].codec.n_k] * 3
    same_as_alone(stacked, copies[1:], [2] + [1] * 12, g, torch.float32)


def test_lowrank_basis_and_error_match_numpy_svd():
    """A crafted 6 x 4 matrix with singular values 10, 5, 1, 0.1: rank 2 keeps the top two right
    singular vectors, and the reconstruction error is sqrt(1 + 0.01) (Eckart-Young)."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((6, 4)))
    V, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    X = U @ np.diag([10.0, 5.0, 1.0, 0.1]) @ V.T
    x = torch.tensor(X, dtype=torch.float64)[None, None]
    B = basis(x, None, 2)[0, 0].numpy()
    _, s, vt = np.linalg.svd(X)
    np.testing.assert_allclose(B @ B.T, vt[:2].T @ vt[:2], atol=1e-10)  # same subspace (signs may differ)
    err = np.linalg.norm(X - X @ B @ B.T)
    assert err == pytest.approx(math.sqrt(s[2] ** 2 + s[3] ** 2)) == pytest.approx(math.sqrt(1.01))


def test_lowrank_store_reconstructs_and_counts_bytes():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(1, 2, 20, 3, generator=g) @ torch.randn(1, 2, 3, 8, generator=g)  # rank 3 exactly
    codec = LowRank(0.375)  # rank round(0.375 * 8) = 3
    layer = layer_with(low, low.clone(), codec)
    assert codec.k_coords.shape == (1, 2, 20, 3) and codec.k_basis.shape == (1, 2, 8, 3)
    k, v = codec.load(layer)
    torch.testing.assert_close(k, low, atol=1e-4, rtol=1e-4)
    assert layer.nbytes() == lowrank_bytes(20, 2, 8, torch.float32, 0.375) == 2 * 2 * (20 * 3 + 8 * 3) * 4
    # generated tokens are projected on the prompt's basis (stored as 3 numbers each)
    keys, _ = step(layer, torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g))
    assert keys.shape[2] == 21 and codec.k_coords.shape[2] == 21 and codec.k_tail is None


def test_lowrank_basis_ignores_padding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 12, 4, generator=g)
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, :4] = False
    padded = x.clone()
    padded[:, :, :4] = 100.0
    a = basis(x[:, :, 4:], None, 2)
    b = basis(padded, valid[:, None], 2)
    torch.testing.assert_close(a @ a.transpose(-1, -2), b @ b.transpose(-1, -2), atol=1e-5, rtol=0)


# --- ragged ---------------------------------------------------------------------------------------

def test_ragged_stores_only_each_heads_own_tokens():
    """Head 0 keeps 2 tokens, head 1 keeps 4: 6 slots stored, not 2 x 4."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g)
    valid = torch.tensor([[[False, False, True, True], [True, True, True, True]]])
    layer = CompressedLayer()
    layer.update(k, v)
    layer.valid, layer.all_valid = valid, False
    layer.n_prompt = layer.seen
    layer.n_prefill_slots = 4
    layer.codec = codec = Ragged()
    layer.park()
    assert codec.k_packed.shape == (6, 8) and layer.nbytes() == 2 * 6 * 8 * 4
    keys, _ = step(layer, torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
    assert torch.equal(keys[valid.expand(1, 2, 4).nonzero(as_tuple=True)], k[valid])
    assert layer.nbytes() == 2 * (6 + 2) * 8 * 4  # one generated token per head, dense


def test_ragged_select_rows_by_hand():
    mask = torch.tensor([[[True, False], [True, True]], [[False, False], [False, True]]])  # row 0: 3, row 1: 1
    packed = torch.arange(4.0)[:, None]
    assert select_rows(packed, mask, torch.tensor([1])).flatten().tolist() == [3.0]
    assert select_rows(packed, mask, torch.tensor([1, 0])).flatten().tolist() == [3.0, 0.0, 1.0, 2.0]


# --- MiniCache -------------------------------------------------------------------------------------

def test_slerp_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    e, w = slerp(a, b, 0.5)
    assert w.item() == pytest.approx(math.pi / 2)
    assert e.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    e, _ = slerp(a, b, 0.6)  # 60% of the way from a to b along the arc
    assert e.tolist() == pytest.approx([math.cos(0.6 * math.pi / 2), math.sin(0.6 * math.pi / 2)])
    e, w = slerp(a, a, 0.3)
    assert w.item() == pytest.approx(0.0, abs=1e-3) and e.tolist() == pytest.approx([1.0, 0.0])


def merged_pair(xa, xb, t=0.6, gamma=0.05):
    pair = Pair(t, gamma)
    a = layer_with(xa, xa.clone(), Merged(pair, 0))
    b = layer_with(xb, xb.clone(), Merged(pair, 1))
    return pair, a, b


def angle(x, y):
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return torch.arccos(cos.clamp(-1, 1))


def test_minicache_restores_magnitudes_exactly_directions_within_the_threshold():
    g = torch.Generator().manual_seed(3)
    xa = torch.randn(1, 2, 40, 16, generator=g)
    xb = xa + 0.3 * torch.randn(1, 2, 40, 16, generator=g)  # mostly parallel ...
    xb[:, :, 7] = -xa[:, :, 7]  # ... but token 7 points the other way
    t, gamma = 0.6, 0.2
    pair, a, b = merged_pair(xa, xb, t, gamma)
    d = angle(xa, xb) / math.pi
    thr = d.max() - gamma * (d.max() - d.min())
    retained = pair.retained("k")[0]
    assert torch.equal(retained, (d >= thr)[0]) and bool(retained[:, 7].all())
    for layer, x, share in ((a, xa, t), (b, xb, 1 - t)):
        k, _ = layer.codec.load(layer)
        torch.testing.assert_close(k.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)  # magnitudes exact
        assert torch.equal(k[0][retained], x[0][retained])  # retained: the original vector
        err = angle(k, x)[0][~retained]  # merged: SLERP moved it by share * W, W below the threshold
        assert bool((err <= share * thr * math.pi + 1e-4).all())


def test_minicache_gamma_zero_merges_all_gamma_one_retains_all():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(1, 1, 10, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g)
    pair, a, b = merged_pair(xa, xb, gamma=0.0)
    assert not bool(pair.retained("k").any())
    # shared direction 10x8 + magnitudes 2x10, for keys and for values
    assert a.nbytes() + b.nbytes() == 2 * (10 * 8 + 2 * 10) * 4
    pair, a, b = merged_pair(xa, xb, gamma=1.0)
    assert bool(pair.retained("k").all())
    assert a.nbytes() + b.nbytes() == 2 * ((10 * 8 + 2 * 10) * 4 + 10 * (2 * 8 * 4 + 3 * 4))  # + vectors, indices
    assert torch.equal(a.codec.load(a)[0], xa) and torch.equal(b.codec.load(b)[0], xb)


def test_minicache_merges_generated_tokens_step_by_step():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(1, 1, 10, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g)
    pair, a, b = merged_pair(xa, xb, gamma=0.0)
    for _ in range(3):
        ka, _ = step(a, torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g))
        assert pair.pending["k"].shape[2] == 1  # layer a's new slot waits for layer b
        kb, _ = step(b, torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g))
        assert pair.pending["k"] is None and ka.shape == kb.shape
    assert pair.n == 13 and pair.dir["k"].shape == (1, 1, 13, 8)


def test_minicache_restores_retained_tokens_in_their_own_slots_after_decoding_steps():
    """Retained tokens of later merges (decoding) interleave with earlier ones in (row, head, slot) order:
    each must come back in its own slot, in every head and row, also after selecting rows."""
    g = torch.Generator().manual_seed(5)
    xa, xb = torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    pair, a, b = merged_pair(xa, xb, gamma=0.5)
    na, nb = [xa], [xb]
    for _ in range(3):
        ka, kb = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
        step(a, ka, ka)
        step(b, kb, kb)
        na.append(ka)
        nb.append(kb)
    full_a, full_b = torch.cat(na, dim=2), torch.cat(nb, dim=2)
    kept = pair.retained("k")
    assert int(kept[:, :, 6:].sum()) > 0  # decoding steps retained some tokens too
    for layer, full in ((a, full_a), (b, full_b)):
        k, _ = layer.codec.load(layer)
        assert torch.equal(k[kept], full[kept])
    a.batch_select_indices(torch.tensor([1]))
    b.batch_select_indices(torch.tensor([1]))
    k, _ = b.codec.load(b)
    assert torch.equal(k[0][kept[1]], full_b[1][kept[1]])
