"""``quantize_model``: swap a model's Conv2d/Linear layers for their quantized versions, in place."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .modules import QuantConv2d, QuantLinear
from .quantizer import LSQQuantizer


@dataclass
class ConversionReport:
    """What ``quantize_model`` did: converted layer names with their settings, and skipped ones with why."""

    converted: List[Tuple[str, str]] = field(default_factory=list)  # (name, settings)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    unsigned: List[str] = field(default_factory=list)  # layers whose activation quantizer is unsigned

    def __str__(self) -> str:
        lines = [f"quantized {len(self.converted)} layers, kept {len(self.skipped)} in full precision"]
        lines += [f"  Q  {name}: {settings}" for name, settings in self.converted]
        lines += [f"  FP {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _forward_without_grad(model: nn.Module, example_inputs: Any) -> None:
    """One forward pass on a batch or a tuple/list of positional inputs."""
    with torch.no_grad():
        if isinstance(example_inputs, (tuple, list)):
            model(*example_inputs)
        else:
            model(example_inputs)


def _nonnegative_inputs(model: nn.Module, names: Sequence[str], example_inputs: Any) -> Dict[str, bool]:
    """Run one forward pass and record, per layer, whether every input element was >= 0."""
    modules = dict(model.named_modules())
    seen: Dict[str, bool] = {}
    hooks = []
    for name in names:
        def hook(_module, args, _name=name):
            nonneg = bool((args[0] >= 0).all())
            seen[_name] = seen.get(_name, True) and nonneg
        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        _forward_without_grad(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _convertible(model: nn.Module, skip: Sequence[str], keep_first_last: bool):
    """``(to_convert, skipped)``: the Conv2d/Linear layers quantize_model converts, and the others with why."""
    candidates = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    protected = {}
    if keep_first_last:
        convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
        if convs:
            protected[convs[0]] = "first conv layer (keep_first_last)"
        if linears:
            protected[linears[-1]] = "last linear layer (keep_first_last)"
    to_convert, skipped = [], []
    for name, module in candidates:
        if name in protected:
            skipped.append((name, protected[name]))
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            skipped.append((name, "matched skip"))
        else:
            to_convert.append((name, module))
    return to_convert, skipped


def find_unsigned_inputs(model: nn.Module, example_inputs: Any, *, skip: Sequence[str] = (),
                         keep_first_last: bool = True) -> List[str]:
    """Names of the layers ``quantize_model`` would convert whose inputs are all >= 0 on ``example_inputs``.

    One forward pass of the full-precision ``model`` (no gradients). Pass the result as ``unsigned_inputs``;
    deciding first lets several processes agree on one list (e.g. the intersection over ranks).
    """
    to_convert, _ = _convertible(model, skip, keep_first_last)
    seen = _nonnegative_inputs(model, [n for n, _ in to_convert], example_inputs)
    return [n for n, _ in to_convert if seen.get(n, False)]


def initialize_quantizers(model: nn.Module, example_inputs: Any,
                          combine: Optional[Callable[[List[torch.Tensor]], None]] = None) -> None:
    """Set every uninitialised LSQ step size from one forward pass over ``example_inputs``, now.

    Normally a quantizer initialises itself from its first training input; calling this first lets every
    rank of a distributed job start from the same step sizes: ``combine`` (e.g.
    ``DistributedContext.average_``) is applied to each new step size in place before the layer uses it,
    so the layers after it see the combined value, as one process with the whole batch would. Buffers
    other than the quantizers' (BatchNorm running statistics) are restored afterwards.
    """
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    quantizer_buffers = {id(b) for q in quantizers for b in q.buffers()}
    saved = [(b, b.clone()) for b in model.buffers() if id(b) not in quantizer_buffers]

    def initialize(quantizer, args):
        if quantizer._init_pending:
            quantizer._initialize_from(args[0])
            quantizer._init_pending = False
            if combine is not None:
                combine([quantizer.scale])

    hooks = [q.register_forward_pre_hook(initialize) for q in quantizers]
    try:
        _forward_without_grad(model, example_inputs)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    finally:
        for h in hooks:
            h.remove()


def quantize_model(
    model: nn.Module,
    w_bits: Optional[int] = 4,
    a_bits: Optional[int] = 4,
    *,
    skip: Sequence[str] = (),
    keep_first_last: bool = True,
    example_inputs: Any = None,
    unsigned_inputs: Optional[Sequence[str]] = None,
    backend: str = "auto",
    recompute_quantized_input: bool = True,
) -> ConversionReport:
    """Replace ``nn.Conv2d`` / ``nn.Linear`` layers of ``model`` by QuantConv2d / QuantLinear, in place.

    Args:
        w_bits, a_bits: bit widths of weights (per output channel, signed) and inputs (per tensor);
            None keeps that side in full precision (``a_bits=None`` is weight-only QAT, as in QT-DoG).
        skip: layer names or fnmatch patterns (``"layer4.*"``) to keep in full precision.
        keep_first_last: keep the first Conv2d and the last Linear (module order) in full precision, as the
            LSQ and GAQAT papers do.
        example_inputs: optional batch; one forward pass decides, per layer, whether its input is
            non-negative (after a ReLU), which makes that activation quantizer unsigned. Without it every
            activation quantizer is signed, which is always safe but wastes one bit after a ReLU.
        unsigned_inputs: layer names whose activation quantizers are unsigned, instead of deciding from
            ``example_inputs`` (``report.unsigned`` of an earlier conversion rebuilds the same model).
        recompute_quantized_input: eager training keeps each layer's float input and recomputes its quantized
            input in backward (about full precision's activation memory); False stores the quantized input
            instead (one activation per layer more, one forward kernel per layer less in backward).

    The quantized layers reuse the original weight and bias Parameter objects; the step sizes are new
    Parameters, so build the optimizer after calling this. Returns a ``ConversionReport``.
    """
    report = ConversionReport()
    to_convert, report.skipped = _convertible(model, skip, keep_first_last)
    nonneg = {}
    if unsigned_inputs is not None:
        nonneg = {name: True for name in unsigned_inputs}
    elif example_inputs is not None and a_bits:
        nonneg = _nonnegative_inputs(model, [n for n, _ in to_convert], example_inputs)
    for name, module in to_convert:
        a_signed = not nonneg.get(name, False)
        kwargs = dict(w_bits=w_bits, a_bits=a_bits, a_signed=a_signed, backend=backend)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        quantized = cls.from_float(module, **kwargs)
        quantized.recompute_quantized_input = recompute_quantized_input
        _set_submodule(model, name, quantized)
        act = f"A{a_bits}{'s' if a_signed else 'u'}" if a_bits else "A-fp"
        report.converted.append((name, f"{cls.__name__} W{w_bits or '-fp'} {act}"))
        if a_bits and not a_signed:
            report.unsigned.append(name)
    return report


def quantized_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every QuantConv2d / QuantLinear in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def layer_scales(module: nn.Module) -> List[nn.Parameter]:
    """A quantized layer's step-size Parameters: the weight quantizer's, then the activation quantizer's."""
    return [q.scale for q in (module.weight_quantizer, module.act_quantizer) if q is not None]
