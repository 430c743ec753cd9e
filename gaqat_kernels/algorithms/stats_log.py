"""``ConflictLog``: per-layer conflict statistics and freeze decisions, fetched without stalling training.

Every ``every`` steps the latest statistics are copied into pinned host memory on the current stream
(``non_blocking``) and a CUDA event is recorded; ``poll()`` turns the copies whose event has completed into
records, and ``records()`` waits for the rest. Training never waits on a copy.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .conflict import STAT_NAMES


class ConflictLog:
    """Collects ``{"step", "layer", <STAT_NAMES>..., "frozen"}`` records for ``layer_names``.

    Args:
        layer_names: one name per tracked segment.
        every: record every ``every``-th step (0 disables recording).
    """

    def __init__(self, layer_names: Sequence[str], every: int = 0):
        if not (isinstance(every, int) and every >= 0):
            raise ValueError(f"every: expected a non-negative int, got {every!r}")
        self.layer_names = list(layer_names)
        self.every = every
        self._pending: List[Tuple[int, Tensor, Tensor, Optional[torch.cuda.Event]]] = []
        self._records: List[Dict] = []

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def record(self, step: int, stats: Tensor, frozen: Tensor) -> None:
        """Start copying this step's ``stats`` (S, 7) and ``frozen`` (S,) to the host; returns at once."""
        if stats.is_cuda:
            host_stats = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host_frozen = torch.empty(frozen.shape, dtype=frozen.dtype, pin_memory=True)
            host_stats.copy_(stats, non_blocking=True)
            host_frozen.copy_(frozen, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host_stats, host_frozen, event = stats.clone(), frozen.clone(), None
        self._pending.append((step, host_stats, host_frozen, event))
        self.poll()

    def poll(self) -> None:
        """Move the copies that have arrived into the records (never blocks)."""
        while self._pending and (self._pending[0][3] is None or self._pending[0][3].query()):
            self._convert(*self._pending.pop(0)[:3])

    def _convert(self, step: int, stats: Tensor, frozen: Tensor) -> None:
        for k, name in enumerate(self.layer_names):
            row = {"step": step, "layer": name}
            row.update({key: float(v) for key, v in zip(STAT_NAMES, stats[k].tolist())})
            row["frozen"] = bool(frozen[k])
            self._records.append(row)

    def records(self) -> List[Dict]:
        """All records so far, waiting for copies still in flight."""
        for step, stats, frozen, event in self._pending:
            if event is not None:
                event.synchronize()
            self._convert(step, stats, frozen)
        self._pending.clear()
        return list(self._records)

    def write_jsonl(self, path: str) -> List[Dict]:
        """Append every record as one JSON line to ``path`` and forget them; returns the records written."""
        rows = self.records()
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        self._records.clear()
        return rows
