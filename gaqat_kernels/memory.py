"""What autograd keeps for backward, counted on any device: the activation memory a training step holds."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def saved_tensor_bytes(model: nn.Module, forward: Callable[[nn.Module], Tensor]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``forward(model)`` runs.

    Parameters are left out (they exist anyway); a storage saved by several nodes (a ReLU's output that is
    also the next layer's input) counts once. It counts tensors and times nothing, so CPU figures hold for
    the GPU too.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model)
    del out
    return sum(storages.values())
