"""A transformers `Cache` whose layers can evict: the storage half of the engine.

Each layer holds, besides keys and values (B, Hk, T, D), the *original index* of
every slot (`pos`, B x Hk x T) and whether the slot holds a real token (`valid`):
after eviction rows and heads keep different tokens, and rows of a batch may keep
different counts, so slots are right-aligned and unused ones marked invalid.
The attention function (`attention.py`) builds its mask from these, never from the
model's 2-D mask, whose columns no longer line up with an evicted cache.

`get_seq_length` reports the tokens *seen* (what transformers uses it for: the next
position), like `DynamicSlidingWindowLayer`; `get_mask_sizes` and `stored_length`
report what is held.

A layer may hold its keys and values in a compact form between forward passes (a
`kvbench.engine.storage.Codec`: quantized, low-rank, ragged per head, merged across layers). Then
`keys`/`values` are dense only inside the layer's own attention call: `update` loads them,
`park` (after attention and eviction) hands them back to the codec and drops them. Slot
bookkeeping (`pos`, `valid`) is always dense.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.engine.storage.quantized import Kivi, KiviRows
from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.engine.protocol import Compressor
    from kvbench.engine.segments import Segment
    from kvbench.engine.storage import Codec

# Set by KVCache.update, read by the attention function right after, for the same layer.
CURRENT: ContextVar[tuple[KVCache, int] | None] = ContextVar("kvbench_current_layer", default=None)


class CompressedLayer(DynamicLayer):
    """One layer's cache: keys/values plus slot positions and validity; evicts by gathering slots."""

    is_croppable = False

    def __init__(self, sliding_window: int | None = None):
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0  # positions processed (index space, padding included)
        self.pos: torch.Tensor | None = None  # (B, Hk, T) original index of each slot
        self.valid: torch.Tensor | None = None  # (B, 1 | Hk, T) slot holds a real token
        self.all_valid = True  # fast path: no padding, no filler slots
        self.n_prompt: int | None = None  # prompt length (index space), set at prefill
        self.n_prefill_slots = 0  # slots holding the (compressed) prompt; generated tokens follow
        self.prefill_kept: torch.Tensor | None = None  # (B, Hk) real tokens kept after prefill
        self.accumulated: torch.Tensor | None = None  # (B, Hk, T) attention received (H2O), if tracked
        self.captured: dict | None = None  # what scoring needs, when the cache captures (prefill.py)
        self.codec: Codec | None = None  # compact storage between forward passes; None: dense tensors
        self.rows_codec: KiviRows | None = None  # a stack of rows held by KIVI stores, dense (`stack_rows`)
        self.heads = self.k_dim = self.v_dim = 0  # shape of one slot, recorded at the first update
        self._buffers: dict[str, torch.Tensor] = {}  # growing storage that decoding appends into (`_append`)
        self.tail_filler: list[int] | None = None  # per row: filler slots among the generated (own decoding budgets)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # Recorded here: transformers 5.25's DynamicLayer no longer sets `dtype` (5.23's did).
        self.dtype, self.device = key_states.dtype, key_states.device
        self.heads, self.k_dim, self.v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]

    # --- transformers' layer API -------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, q, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32)
        new_pos = new_pos.expand(B, H, q)
        new_valid = torch.ones(B, 1 if self.valid is None else self.valid.shape[1], q,
                               dtype=torch.bool, device=key_states.device)
        if self.keys is not None and self.keys.numel() == 0:
            # Own copies: the model's tensors may be views into a larger one (Phi-3's fused qkv), which
            # would stay alive and make nbytes() undercount.
            self.keys, self.values = key_states.clone(), value_states.clone()
            self.pos, self.valid = new_pos, new_valid
        else:
            if self.keys is None:  # parked in a codec since the last pass: dense again, for this pass only
                self.keys, self.values = self.codec.load(self, key_states, value_states)
            else:
                self._append("keys", key_states)
                self._append("values", value_states)
            self._append("pos", new_pos)
            self._append("valid", new_valid)
            if self.accumulated is not None:
                self._append("accumulated", self.accumulated.new_zeros(B, H, q))
        self.seen += q
        return self.keys, self.values

    def _append(self, name: str, new: torch.Tensor) -> None:
        """Append `new` after the slots of tensor `name` (slots on dim 2), in place when it is a prefix of this
        layer's own buffer with room left. Decoding appends a token a step: concatenating would copy the whole
        cache every step (quadratic in the tokens generated), so the buffer has an eighth more room (8 slots
        at least; a bounded share, so memory measured compares with a plain cache's as the bytes do) and the
        cache is copied only when it is full. Anything that replaces the tensor (eviction, stacking, row
        selection, a view shared with another cache) leaves it no prefix of the buffer: the next append starts
        a new one, never writing through a tensor this layer does not own."""
        cur = getattr(self, name)
        T, q = cur.shape[2], new.shape[2]
        buf = self._buffers.get(name)
        # (A buffer made under inference mode cannot be written outside it, as a later generate under no_grad would.)
        if buf is None or T + q > buf.shape[2] or not _prefix_of(cur, buf) or \
                (buf.is_inference() and not torch.is_inference_mode_enabled()):
            shape = list(cur.shape)
            shape[2] = T + q + max(8, (T + q) // 8)
            buf = cur.new_empty(shape)
            buf[:, :, :T] = cur
            self._buffers[name] = buf
        buf[:, :, T:T + q] = new
        setattr(self, name, buf[:, :, :T + q])

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self.__init__(self.sliding_window)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a compressed cache does not support beam search; use greedy decoding")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a compressed cache does not support num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._buffers.clear()  # new tensors: the old buffer's memory goes now, not at the next append
        if self.codec is not None:
            self.codec.select(self, indices)
        if self.rows_codec is not None:
            self.rows_codec.select(indices)
        if self.tail_filler is not None:
            self.tail_filler = [self.tail_filler[i] for i in indices.tolist()]
        for name in ("keys", "values", "pos", "valid", "accumulated", "prefill_kept"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices])

    # --- kvbench ------------------------------------------------------------------
    def expand_batch(self, n: int) -> None:
        """Repeat a one-row cache `n` times as views (no copy); what is appended later is per row."""
        self._buffers.clear()
        if self.codec is not None:
            self.codec.expand(self, n)
        if self.rows_codec is not None:
            self.rows_codec.expand(n)
        for name in ("keys", "values", "pos", "valid", "prefill_kept"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.expand(n, *t.shape[1:]))
        if self.accumulated is not None:  # updated in place while decoding: a real copy
            self.accumulated = self.accumulated.expand(n, *self.accumulated.shape[1:]).clone()

    def share_state_of(self, src: CompressedLayer) -> None:
        """Start from `src`'s uncompressed prompt (a captured prefill). Tensors are shared, not copied: eviction
        gathers into new tensors and decoding concatenates into new ones, so `src` is never written through."""
        for name in ("keys", "values", "pos", "valid", "all_valid", "seen", "n_prompt", "is_initialized", "heads",
                     "k_dim", "v_dim"):
            setattr(self, name, getattr(src, name))
        if src.is_initialized:
            self.dtype, self.device = src.dtype, src.device

    def park(self) -> None:
        """End of this layer's pass: a codec takes the dense keys/values (they are dropped until the next pass)."""
        if self.codec is not None and self.keys is not None:
            frozen = self.n_prefill_slots if self.codec.prompt_only else self.stored_length()
            self.codec.store(self, frozen)
            self.keys = self.values = None  # the codec holds its own copies; dropping the dense ones saves the bytes
        elif self.rows_codec is not None and self.keys is not None:
            self.rows_codec.apply(self)

    def stored_length(self) -> int:
        return 0 if self.pos is None else self.pos.shape[-1]

    def mark_new_valid(self, new_valid: torch.Tensor) -> None:
        """Record which of the `q` newest slots are padding, from the model's 2-D mask (B, q)."""
        q = new_valid.shape[-1]
        if bool(new_valid.all()):
            return
        self.valid[..., -q:] = new_valid[:, None, :]
        self.all_valid = False

    def gather(self, idx: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep slots `idx` (B, Hk, K), new tensors in slot order; `valid` (B, Hk, K) marks filler slots."""
        kv_idx = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        if not bool(valid.all()):
            self.all_valid = False
        # Heads keep the same count in every row we build, so validity is usually shared across heads.
        shared = bool((valid == valid[:, :1]).all())
        self._buffers.clear()
        self.keys, self.values = self.keys.gather(2, kv_idx), self.values.gather(2, kv_idx)
        self.pos = self.pos.gather(2, idx.to(torch.int64))
        self.valid = valid[:, :1] if shared else valid
        if self.accumulated is not None:
            self.accumulated = self.accumulated.gather(2, idx)

    def keep_tail(self, idx: torch.Tensor, start: int, valid: torch.Tensor | None = None) -> None:
        """Keep slots `start + idx` (B, Hk, K) of the tail (generated tokens), in place; `valid` (B, 1, K): which
        kept slots hold real tokens (rows of one batch with their own budgets, `compress.on_decode`), else all.

        Slots before `start` and their validity are untouched; the kept part is written in
        place and the tensors narrowed, so evicting k generated tokens costs O(k), not O(cache).
        """
        end = start + idx.shape[-1]
        gidx = idx + start
        kv_idx = gidx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys[:, :, start:end] = self.keys.gather(2, kv_idx)
        self.values[:, :, start:end] = self.values.gather(2, kv_idx)
        self.pos[:, :, start:end] = self.pos.gather(2, gidx)
        self.keys, self.values, self.pos = self.keys[:, :, :end], self.values[:, :, :end], self.pos[:, :, :end]
        if valid is not None:  # (a slice of this layer's own append buffer: decoding appended to it)
            self.valid[..., start:end] = valid
            self.all_valid = False
        self.valid = self.valid[..., :end]
        if self.accumulated is not None:
            self.accumulated[:, :, start:end] = self.accumulated.gather(2, gidx)
            self.accumulated = self.accumulated[:, :, :end]

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the slots where `mask` (B, Hk, T) is True, in position order, right-aligned.

        Rows and heads may keep different counts: shorter ones get invalid filler slots
        on the left, as left padding would.
        """
        T = mask.shape[-1]
        K = int(mask.sum(-1).max())
        slot = torch.arange(T, device=mask.device).expand_as(mask)
        idx = torch.where(mask, slot, -1).sort(-1).values[..., T - K:]
        self.gather(idx.clamp(min=0), idx >= 0)

    def trim_to_window(self) -> None:
        """Sliding-window layers hold only the last `sliding_window - 1` slots, as transformers' do."""
        if self.sliding_window is None or self.stored_length() <= self.sliding_window - 1:
            return
        keep = self.sliding_window - 1
        self._buffers.clear()
        self.keys, self.values = self.keys[:, :, -keep:], self.values[:, :, -keep:]
        self.pos, self.valid = self.pos[:, :, -keep:], self.valid[:, :, -keep:]

    def stack_rows(self, rows: list[CompressedLayer]) -> None:
        """Become the one-row layers `rows` (any prompts, any kept slots) as rows of one batch: slots
        right-aligned, shorter rows padded on the left with invalid filler, as `keep` pads.

        Rows of different prompts have seen different counts: the batch's `seen` is the largest, and each
        row's positions are shifted by its difference, so a sliding window (which compares positions with
        `seen`) still sees what the row alone would. Rotary positions come from the caller's position ids."""
        T = max(r.stored_length() for r in rows)
        hv = max(r.valid.shape[1] for r in rows)
        seen = max(r.seen for r in rows)
        first = rows[0]
        ahead = {None if r.n_prompt is None else r.n_prompt - r.seen for r in rows}
        if len(ahead) != 1 or len({r.n_prefill_slots - r.stored_length() for r in rows}) != 1:
            raise KvbenchError("only caches at the same point (prompt fed, nothing generated) can be stacked")

        def left(t: torch.Tensor, n: int) -> torch.Tensor:  # n filler slots before t's (zeros / False)
            return t if n == 0 else torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2)

        for name in ("sliding_window", "is_sliding", "is_initialized", "heads", "k_dim", "v_dim", "dtype", "device"):
            setattr(self, name, getattr(first, name))
        self.seen = seen
        self._buffers.clear()
        self.n_prompt = None if first.n_prompt is None else seen + (first.n_prompt - first.seen)
        # Rows held by KIVI stores enter dense, as their stores give attention the slots (`KiviRows`).
        dense = [(r.keys, r.values) if r.codec is None else r.codec.load(r) for r in rows]
        self.keys = torch.cat([left(k, T - r.stored_length()) for (k, _), r in zip(dense, rows)])
        self.values = torch.cat([left(v, T - r.stored_length()) for (_, v), r in zip(dense, rows)])
        self.rows_codec = None
        if first.codec is not None:
            self.rows_codec = KiviRows.stack([r.codec for r in rows], [T - r.stored_length() for r in rows])
        self.pos = torch.cat([left(r.pos + (seen - r.seen), T - r.stored_length()) for r in rows])
        self.valid = torch.cat([left(r.valid.expand(-1, hv, -1), T - r.stored_length()) for r in rows])
        self.all_valid = all(r.all_valid and r.stored_length() == T for r in rows)
        self.n_prefill_slots = T + first.n_prefill_slots - first.stored_length()  # (tokens announced, unfed)
        self.prefill_kept = torch.cat([r.prefill_kept for r in rows])
        if first.accumulated is not None:  # attention received while decoding (H2O's budget): per slot
            self.accumulated = torch.cat([left(r.accumulated, T - r.stored_length()) for r in rows])

    def nbytes_after(self, fed: int) -> int:
        """`nbytes` once `fed` more slots are held (dense storage, or a KIVI store's rule): what a row of a stacked
        batch would hold had it been decoded alone (`KVCache.nbytes_after` counts the slots a decoding budget
        leaves)."""
        slots = self._held(self.stored_length(), fed)
        if isinstance(self.codec, Kivi) and not self.codec.prompt_only:  # a row that stacks (`KiviRows`)
            return self.pos.shape[0] * self.codec.bytes_for(slots, self.heads, self.k_dim, self.dtype)
        if self.codec is not None or self.keys is None:
            raise KvbenchError("nbytes_after needs a dense layer that only appends, or one held by KIVI")
        return self.keys.shape[0] * self.heads * slots * (self.k_dim + self.v_dim) * self.keys.element_size()

    def full_nbytes_after(self, fed: int) -> int:
        """`full_nbytes` once `fed` more tokens have entered."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return self.pos.shape[0] * self.heads * self._held(self.seen, fed) * (self.k_dim + self.v_dim) * size

    def _held(self, now: int, fed: int) -> int:
        # trim_to_window holds the last window - 1 (as full_nbytes counts them)
        return now + fed if self.sliding_window is None else min(now + fed, self.sliding_window - 1)

    def nbytes(self) -> int:
        """Bytes of the stored keys and values (the KV cache proper), from the tensors that hold them."""
        if self.codec is not None and self.keys is None:
            return self.codec.nbytes()
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def full_nbytes(self) -> int:
        """What a plain transformers layer holding the same sequence would hold."""
        return 0 if self.pos is None else self.full_nbytes_after(0)

    def kept_tokens(self) -> torch.Tensor:
        """Real tokens held now, per row and head: (B, Hk)."""
        return self.valid.expand(-1, self.pos.shape[1], -1).sum(-1)


def _prefix_of(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """`t` is `buf[:, :, :n]` for some n: the same storage, start and strides (an expanded or sliced view is not)."""
    return (t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.shape[:2] == buf.shape[:2]
            and t.shape[3:] == buf.shape[3:])


class KVCache(Cache):
    """The kvbench cache: one `CompressedLayer` per decoder layer, compressing as `method` says.

    Args:
        config: the model config (layer types and sliding windows are read from it).
        method: the compression method, or None to store everything.
        segments: per batch row, the prompt's labelled spans (indices into the row's real tokens).
        capture: when set, keep what scoring needs at prefill (see `prefill.py`):
            ``{"window": int, "accumulated": bool}``.
    """

    def __init__(self, config, method: Compressor | None = None,
                 segments: list[list[Segment]] | None = None, capture: dict | None = None):
        text = config.get_text_config(decoder=True)
        n = text.num_hidden_layers
        types = getattr(text, "layer_types", None) or ["full_attention"] * n
        window = getattr(text, "sliding_window", None)
        layers = [CompressedLayer(window if t == "sliding_attention" else None) for t in types[:n]]
        super().__init__(layers=layers)
        if method is not None:
            method.check_model(config)
        self.method = method
        self.segments = segments
        self.capture = capture
        self.n_layers = n
        self.scratch: dict = {}  # cross-layer state of the method while it compresses the prefill
        # A stack of rows of one decoding family with their own budgets: each row's method (None: `method` for all).
        self.row_methods: list[Compressor] | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if CURRENT.get() is not None and CURRENT.get()[0] is self:
            # The previous layer's update was never picked up by kvbench attention: the model
            # runs another attention function, and nothing would be compressed, silently.
            CURRENT.set(None)
            raise KvbenchError("the model does not use kvbench attention, so a KVCache cannot compress; load "
                               "it with kvbench.load_model or call kvbench.engine.attention.enable(model)")
        CURRENT.set((self, layer_idx))
        return self.layers[layer_idx].update(key_states, value_states)

    def extend_prompt(self, k: int = 1) -> None:
        """The next `k` tokens fed belong to the prompt: frozen with it, never decoding-compressed.

        Used when the prompt's last token enters after compression (see evaluation.session.SampleRun).
        """
        for layer in self.layers:
            layer.n_prompt += k
            layer.n_prefill_slots += k

    def settle_prompt(self) -> None:
        """After prompt tokens announced by `extend_prompt` were fed: nothing of the prompt is pending. (A sliding-
        window layer trimmed to its window while they entered holds fewer slots than were announced.)"""
        for layer in self.layers:
            if layer.n_prompt is not None and layer.n_prompt == layer.seen:
                layer.n_prefill_slots = layer.stored_length()

    def expand_batch(self, n: int) -> None:
        """Repeat a one-row cache `n` times as views (no copy), segments included: e.g. one row per option
        of a multiple-choice question, all continuing the same compressed prompt."""
        for layer in self.layers:
            layer.expand_batch(n)
        self.segments = (self.segments or [[]]) * n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.row_methods is not None:
            self.row_methods = [self.row_methods[i] for i in indices.tolist()]
        super().batch_select_indices(indices)

    def keep_row(self, row: int) -> None:
        """Keep batch row `row` alone (after `expand_batch`, the option chosen)."""
        device = next((layer.pos.device for layer in self.layers if layer.pos is not None), None)
        self.batch_select_indices(torch.tensor([row], device=device))
        self.segments = self.segments[:1]

    @classmethod
    def stack(cls, config, caches: list[KVCache]) -> KVCache:
        """One batch whose rows are the one-row caches `caches` (of one prompt or of several: e.g. several
        methods' compressions of several samples), to decode or score them together. The rows keep exactly their
        own slots (right-aligned, invalid filler on the left), so each row attends to what it would alone; the
        caller gives each row its own position ids. Caches whose method compresses generated tokens stack only
        with caches of the same `decoding_family` (the same method and settings but its budgets, `stack_key`): the
        batch then evicts as each would alone (each row its own budget and its own tokens, at the same steps; rows
        holding fewer than the longest hold filler, `compress.on_decode`). Caches held by KIVI over every
        token stack with the same KIVI configuration's: the batch holds them dense, quantized row by row as each
        store would (`KiviRows`); other storage codecs do not stack. The caches themselves are left as they are."""
        keys = set()
        for c in caches:
            problem = c.why_not_stackable()
            if problem:
                raise KvbenchError(problem)
            keys.add(c.stack_key())
        if len(keys) > 1:
            raise KvbenchError("caches that compress generated tokens stack only with the same method and decoding "
                               "settings' (budgets may differ); those held by KIVI only with the same configuration's")
        method = caches[0].method if caches[0].method is not None and caches[0].method.compresses_decoding else None
        out = cls(config, method, [row for c in caches for row in (c.segments or [[]])])
        if method is not None and any(c.method != method for c in caches):
            out.row_methods = [c.method for c in caches]
        for i, layer in enumerate(out.layers):
            layer.stack_rows([c.layers[i] for c in caches])
        return out

    def stack_key(self) -> object:
        """Caches with equal keys can be rows of one `stack`: any that only append, or those compressing generated
        tokens by one `decoding_family` (each row its own budget), or those held by one KIVI configuration (bits,
        group size, residual)."""
        m = self.method
        store = next((layer.codec for layer in self.layers if layer.codec is not None), None)
        if isinstance(store, Kivi):  # KIVI rows: with the same KIVI configuration's (others do not stack)
            return ("kivi", store.bits, store.G, store.R)
        return ("decoding", m.decoding_family) if m is not None and m.compresses_decoding else "append"

    def why_not_stackable(self) -> str | None:
        """Why this cache cannot be a row of `stack` (one line with the fix), or None when it can."""
        codecs = [layer.codec for layer in self.layers if layer.codec is not None]
        if any(not isinstance(c, Kivi) or c.prompt_only for c in codecs):
            return "a cache held by a storage codec other than KIVI over every token cannot be stacked; decode it alone"
        if any(layer.pos is not None and layer.pos.shape[0] != 1 for layer in self.layers):
            return "only one-row caches can be stacked"
        return None

    # --- statistics -----------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """What an uncompressed transformers cache of the same sequence would hold."""
        return sum(layer.full_nbytes() for layer in self.layers)

    def nbytes_after(self, fed: int) -> int:
        """`nbytes` once `fed` more tokens have entered, the first of them the prompt's tokens announced by
        `extend_prompt` and not fed yet (its last, unless the cache holds it already): what a row of a `stack` would
        hold had it been decoded alone. Generated tokens under a decoding budget
        count as `compress.on_decode` holds them (sliding-window layers are never compressed)."""
        m = self.method
        if m is None or not m.compresses_decoding:
            return sum(layer.nbytes_after(fed) for layer in self.layers)
        total = 0
        for layer in self.layers:
            prompt = min(fed, layer.n_prefill_slots - layer.stored_length())  # announced (`extend_prompt`), unfed
            held = fed if layer.sliding_window is not None else prompt + held_generated(m, fed - prompt)
            total += layer.nbytes_after(held)
        return total

    def full_nbytes_after(self, fed: int) -> int:
        return sum(layer.full_nbytes_after(fed) for layer in self.layers)

    def kept_after_prefill(self) -> list[list[float]]:
        """Real prompt tokens kept per layer, per row: the mean over KV heads (heads keep different
        counts under head-adaptive budgets, AdaKV; whole numbers otherwise)."""
        rows = []
        for layer in self.layers:
            kept = layer.prefill_kept
            mean = [] if kept is None else kept.float().mean(dim=1).tolist()
            rows.append([int(x) if x == int(x) else x for x in mean])
        return [list(r) for r in zip(*rows)] if rows and rows[0] else []


def held_generated(method: Compressor, n: int) -> int:
    """Generated tokens a layer holds after `n` entered under `method`'s decoding budget: each step appends one,
    and every `decoding_every` steps the tail is cut to `decoding_keep_count` when it holds more."""
    held = 0
    for step in range(1, n + 1):
        held += 1
        k = method.decoding_keep_count(step)
        if held > k and not step % method.decoding_every:
            held = k
    return held
