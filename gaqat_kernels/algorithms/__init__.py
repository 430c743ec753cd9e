"""Training algorithms: how each step uses the gradients (SAM so far; GAQAT and FQAT build on it)."""
from .sam import SAM

__all__ = ["SAM"]
