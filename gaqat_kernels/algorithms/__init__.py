"""Training algorithms: how each step uses the gradients.

``build_algorithm(name, model, ...)`` picks one by name: "erm" (also plain LSQ QAT), "sam", "sagm",
"gaqat", "fqat". All share ``TrainingAlgorithm``'s interface: ``step(closure) -> loss``.
"""
from typing import Dict

from torch import nn

from .base import ERM, SAMTraining, TrainingAlgorithm
from .conflict import DEFAULT_HYSTERESIS, DEFAULT_RULE, DEFAULT_THRESHOLD, STAT_NAMES, ConflictTracker
from .freezing import CONFLICT_SIGNALS, FQAT, FREEZE_MODES, GAQAT
from .graphed import CUDAGraphStep
from .sam import SAM
from .stats_log import ConflictLog

FREEZING_ARGUMENTS = ("decay", "flip_weight", "rule", "threshold", "hysteresis", "warmup_steps", "log_every", "backend",
                     "max_frozen_fraction", "freeze_mode", "conflict_signal")
ALGORITHMS: Dict[str, type] = {"erm": ERM, "sam": SAMTraining, "sagm": SAMTraining, "gaqat": GAQAT, "fqat": FQAT}


def build_algorithm(name: str, model: nn.Module, **kwargs) -> TrainingAlgorithm:
    """The algorithm ``name`` for ``model``; ``kwargs`` go to its constructor (and on to the optimizer).

    "sagm" is SAM with ``alpha`` (default 0.001 when not given). ERM ignores SAM's arguments, and the
    algorithms without freezing ignore the freezing arguments, so one set of arguments serves every name.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"name: unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    if name == "sagm":
        kwargs.setdefault("alpha", 0.001)
    if name == "erm":
        for key in ("rho", "adaptive", "alpha"):
            kwargs.pop(key, None)
    if name not in ("gaqat", "fqat"):
        for key in FREEZING_ARGUMENTS:
            kwargs.pop(key, None)
    return ALGORITHMS[name](model, **kwargs)


__all__ = ["SAM", "ERM", "SAMTraining", "GAQAT", "FQAT", "TrainingAlgorithm", "ConflictTracker", "ConflictLog",
           "STAT_NAMES", "ALGORITHMS", "build_algorithm", "CUDAGraphStep", "DEFAULT_RULE", "DEFAULT_THRESHOLD",
           "DEFAULT_HYSTERESIS", "FREEZE_MODES", "CONFLICT_SIGNALS"]
