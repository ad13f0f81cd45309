"""A slotted KV cache for continuous batching: fixed rows ("slots"), shared write column.

Every slot writes its next key/value at the same column, so one batched forward per step serves
all slots (the usual left-padded layout). What a plain ``DynamicCache`` cannot do, this does:

- **refill**: a finished slot gets a new prompt's prefilled keys/values written in place,
  right-aligned at the current column, the columns before it masked out;
- **drop**: slots can be removed (the tail of a run, when no prompts are left to refill them);
- **no per-step copy**: keys/values live in preallocated buffers with spare columns, so a decode
  step writes one column instead of ``torch.cat``-ing the whole cache;
- **trim**: leading columns no live slot attends to are dropped from the attended window
  (an offset move), and the buffer is compacted only when its spare columns run out.

The model sees an ordinary ``transformers`` ``Cache`` whose layers return views of the window.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["SlotLayer", "SlotKVCache"]


class SlotLayer(DynamicLayer):
    """One decoder layer's keys/values in a buffer ``[slots, heads, capacity, head_dim]``.

    The attended window is columns ``[start, end)``; ``update`` writes at ``end``.
    """

    def __init__(self, owner: "SlotKVCache", like: torch.Tensor, values_like: torch.Tensor) -> None:
        super().__init__()
        self._owner = owner
        super().lazy_initialization(like, values_like)
        _, heads, _, dim = like.shape
        self.k_buf = like.new_zeros((owner.slots, heads, owner.capacity, dim))
        self.v_buf = values_like.new_zeros((owner.slots, values_like.shape[1], owner.capacity, values_like.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns at ``end`` and return the window (views, no copy)."""
        owner, n = self._owner, key_states.shape[-2]
        end = owner.end + n
        if end > self.k_buf.shape[-2]:
            raise RuntimeError("SlotKVCache: no free column (call reserve() before the forward)")
        self.k_buf[:, :, owner.end:end] = key_states
        self.v_buf[:, :, owner.end:end] = value_states
        self.keys = self.k_buf[:, :, owner.start:end]
        self.values = self.v_buf[:, :, owner.start:end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._owner.end - self._owner.start

    def rebuild(self, rows: torch.Tensor | None, src: slice, dst_start: int, capacity: int) -> None:
        """Copy columns ``src`` of the kept ``rows`` to ``dst_start`` of a buffer of ``capacity``."""
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            kept = old if rows is None else old.index_select(0, rows)
            new = torch.zeros(kept.shape[:2] + (capacity,) + kept.shape[3:], dtype=old.dtype, device=old.device)
            width = src.stop - src.start
            new[:, :, dst_start:dst_start + width] = kept[:, :, src]
            setattr(self, name, new)

    def write_rows(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, col: int) -> None:
        """Put ``keys``/``values`` ``[len(rows), heads, n, dim]`` at columns ``[col, col + n)``."""
        n = keys.shape[-2]
        self.k_buf[rows, :, col:col + n] = keys.to(self.k_buf.dtype)
        self.v_buf[rows, :, col:col + n] = values.to(self.v_buf.dtype)


class SlotKVCache(Cache):
    """``slots`` rows of KV cache with a shared write column and in-place row refill.

    ``capacity`` is the initial number of buffer columns; it grows (by at least ``spare``) when a
    window needs more. The layers are created by the first :meth:`write_prefill`.
    """

    def __init__(self, slots: int, capacity: int, spare: int = 256) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"slots and capacity must be positive, got {slots}, {capacity}")
        self.slots = slots
        self.capacity = capacity
        self.spare = spare
        self.start = 0
        self.end = 0
        super().__init__(layers=[])

    @property
    def width(self) -> int:
        """Columns in the attended window."""
        return self.end - self.start

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more columns at ``end`` (compacting or growing the buffers)."""
        if self.end + n <= self.capacity:
            return
        capacity = max(self.capacity, self.width + n + self.spare)
        self._relayout(None, capacity, shift_to=0)

    def trim(self, first_live_column: int) -> None:
        """Stop attending to the columns before ``first_live_column`` (window coordinates)."""
        if not 0 <= first_live_column <= self.width:
            raise ValueError(f"trim({first_live_column}) outside the window of {self.width} columns")
        self.start += first_live_column

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the slots ``rows`` (in that order)."""
        self._relayout(rows, self.capacity, shift_to=self.start)
        self.slots = len(rows)

    def write_prefill(self, rows: torch.Tensor, prefilled: Cache, width: int) -> None:
        """Place a prefilled batch (``len(rows)`` rows, ``width`` columns) right-aligned at ``end``.

        The new rows' earlier window columns keep stale values; the caller masks them out. The
        window is first widened on the left when it is narrower than ``width``.
        """
        if not self.layers:
            self.capacity = max(self.capacity, width + self.spare)
            self.layers = [SlotLayer(self, src.keys, src.values) for src in prefilled.layers]
            self.start = self.end = width
        if width > self.width:
            grow = width - self.width
            if grow > self.start:
                self._relayout(None, max(self.capacity, self.width + grow + self.spare), shift_to=grow)
            self.start -= grow
        col = self.end - width
        for layer, source in zip(self.layers, prefilled.layers):
            layer.write_rows(rows, source.keys, source.values, col)

    def _relayout(self, rows: torch.Tensor | None, capacity: int, shift_to: int) -> None:
        """Rebuild every layer's buffer: kept ``rows``, the window moved to column ``shift_to``."""
        window = slice(self.start, self.end)
        for layer in self.layers:
            layer.rebuild(rows, window, shift_to, capacity)
        self.capacity = capacity
        self.start, self.end = shift_to, shift_to + (window.stop - window.start)
