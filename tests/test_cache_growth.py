"""Decoding appends into a growing buffer (`CompressedLayer._append`): the same tensors concatenation gives,
copied only when the buffer is full, and never written through a tensor the layer does not own."""

from __future__ import annotations

import torch

from kvbench.engine.cache import CompressedLayer


def _kv(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, T, 4, generator=g), torch.randn(B, 2, T, 4, generator=g)


def test_appends_equal_concatenation_and_copy_rarely():
    layer = CompressedLayer()
    k, v = _kv(1, 100, 0)
    layer.update(k, v)
    ref_k, ref_v, buf, copies = k, v, None, 0
    for step in range(200):
        nk, nv = _kv(1, 1, step + 1)
        before = layer.keys
        keys, _ = layer.update(nk, nv)
        ref_k, ref_v = torch.cat([ref_k, nk], 2), torch.cat([ref_v, nv], 2)
        if layer._buffers["keys"] is buf:  # no copy: the last step's storage, one slot longer
            assert keys.data_ptr() == before.data_ptr() and keys.shape[2] == before.shape[2] + 1
        else:
            copies, buf = copies + 1, layer._buffers["keys"]
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
    assert layer.pos[0, 0].tolist() == list(range(300)) and bool(layer.valid.all())
    # An eighth more room each time: from 101 to 300 slots that is 9 buffers (a concatenation: 200).
    assert copies == 9 and buf.shape[2] == 300


def test_a_shared_prompt_is_never_written_through():
    src = CompressedLayer()
    k, v = _kv(1, 10, 0)
    src.update(k, v)
    src_keys = src.keys.clone()
    a, b = CompressedLayer(), CompressedLayer()
    a.share_state_of(src)
    b.share_state_of(src)
    ka, _ = _kv(1, 1, 1)
    kb, _ = _kv(1, 1, 2)
    a.update(ka, ka)
    b.update(kb, kb)
    assert torch.equal(src.keys, src_keys) and src.keys.shape[2] == 10
    assert torch.equal(a.keys[:, :, -1:], ka) and torch.equal(b.keys[:, :, -1:], kb)
    assert torch.equal(a.keys[:, :, :10], src_keys) and torch.equal(b.keys[:, :, :10], src_keys)


def test_expanded_rows_get_their_own_tokens():
    layer = CompressedLayer()
    k, v = _kv(1, 6, 0)
    layer.update(k, v)
    layer.prefill_kept = torch.full((1, 2), 6)
    layer.expand_batch(3)
    new, _ = _kv(3, 1, 5)
    layer.update(new, new)
    for r in range(3):
        assert torch.equal(layer.keys[r, :, :6], k[0]) and torch.equal(layer.keys[r, :, 6], new[r, :, 0])


def test_an_evicted_tail_is_overwritten_by_the_next_token():
    layer = CompressedLayer()
    k, v = _kv(1, 5, 0)
    layer.update(k, v)
    for step in range(4):
        nk, _ = _kv(1, 1, step + 1)
        layer.update(nk, nk)
    # keep generated slots 1 and 3 of the four after the prompt (slots 5..8)
    layer.keep_tail(torch.tensor([[[1, 3], [1, 3]]]), 5)
    last, _ = _kv(1, 1, 9)
    layer.update(last, last)
    assert layer.pos[0, 0].tolist() == [0, 1, 2, 3, 4, 6, 8, 9]
    assert torch.equal(layer.keys[:, :, -1:], last)
    assert torch.equal(layer.keys[:, :, 5], _kv(1, 1, 2)[0][:, :, 0])


def test_a_buffer_made_in_inference_mode_takes_appends_outside_it():
    layer = CompressedLayer()
    k, _ = _kv(1, 4, 0)
    with torch.inference_mode():
        layer.update(k, k)
        a, _ = _kv(1, 1, 1)
        layer.update(a, a)  # the buffer: an inference tensor
    b, _ = _kv(1, 1, 2)
    with torch.no_grad():  # e.g. transformers' generate continuing the same cache
        layer.update(b, b)
    assert torch.equal(layer.keys, torch.cat([k, a, b], 2)) and layer.pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
