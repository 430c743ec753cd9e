"""``LSQQuantizer``: a learnable step size plus the LSQ op, with LSQ's data-driven initialisation."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels.reference import quant_bounds
from ..ops import lsq_fake_quant

_MIN_INIT_SCALE = 1e-8  # an all-zero first batch must not give a zero step size (x / 0)


class LSQQuantizer(nn.Module):
    """Fake-quantizes its input with a learned step size (Esser et al., LSQ, ICLR 2020).

    Args:
        bits: 2..8.
        signed: integer range ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]`` (activations after ReLU).
        channels: None for one scale (per-tensor); else the number of channels along ``axis``.
        axis: the channel dimension of the input for per-channel scales (weights: 0, output channels).
        backend: kernel backend passed to ``lsq_fake_quant``.

    The scale starts uninitialised and is set from the first input to ``2 * mean|x| / sqrt(qp)`` (per
    channel when per-channel). The choice is made on the device with ``torch.where`` on the
    ``initialized`` buffer, so it needs no host synchronisation, and a scale loaded from a state dict wins.
    """

    def __init__(self, bits: int, signed: bool, channels: Optional[int] = None, axis: int = 0, backend: str = "auto"):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits: expected an integer in 2..8, got {bits!r}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels: expected None or a positive int, got {channels!r}")
        self.bits, self.signed, self.axis, self.backend = bits, signed, axis, backend
        self.per_channel = channels is not None
        self.qn, self.qp = quant_bounds(bits, signed)
        self.scale = nn.Parameter(torch.ones(channels if self.per_channel else 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._init_pending = True  # host-side: the device-side choice has not run in this process yet

    def extra_repr(self) -> str:
        kind = f"per-channel(axis={self.axis}, {self.scale.numel()})" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {kind}, backend={self.backend!r}"

    @torch.no_grad()
    def _initialize_from(self, x: Tensor) -> None:
        xa = x.detach().abs().float()
        if self.per_channel:
            axis = self.axis % x.dim()
            mean = xa.mean(dim=[d for d in range(x.dim()) if d != axis])
        else:
            mean = xa.mean().reshape(1)
        init = (2.0 * mean / math.sqrt(self.qp)).clamp_min(_MIN_INIT_SCALE)
        self.scale.copy_(torch.where(self.initialized, self.scale, init))
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # one host read at load time: a loaded, initialised quantizer then needs no first-forward choice, whose
        # flag flip would cost a compiled model one recompile after its first step
        self._init_pending = self.initialized.is_meta or not bool(self.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if self._init_pending:
            self._initialize_from(x)
            self._init_pending = False
        return lsq_fake_quant(
            x, self.scale, bits=self.bits, signed=self.signed,
            axis=self.axis if self.per_channel else None, backend=self.backend,
        )
