"""A per-image cache of stage work, for evaluating one model at many exit thresholds.

What stage s computes (its layers, and its head when that runs) depends on the input and on
the exit decisions of the stages before it (which tokens left where), and on nothing else.
So the first stage (embedding, layers up to the first exit, first head) is the same at every
threshold; a search that changes only the last stage's threshold redoes only the last stage;
and two thresholds that retire the same tokens share everything after. The segmentor asks
the memo before running a stage (``DToPSegmentor.exit_mode(memo=...)``) with the key
``(input digest, stage, fingerprints of the earlier stages' exits, whether its head runs)``;
a hit hands back the stage's state as it was.

Entries are kept newest-used last and the oldest dropped past ``max_bytes``; a search
revisits the first stage of every image, so those entries stay warm.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Hashable, Optional

from torch import Tensor


def input_digest(inputs: Tensor) -> bytes:
    """A fingerprint of a batch of network inputs (shape, dtype and every value)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(inputs.shape), str(inputs.dtype))).encode())
    h.update(inputs.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


def mask_digest(mask: Tensor) -> bytes:
    """A fingerprint of an exit mask (which slots leave)."""
    return input_digest(mask)


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, k)) for k in value.__dataclass_fields__)
    return 0


class StageMemo:
    """Least-recently-used store of stage states, bounded by their tensors' size."""

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Optional[Any]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
