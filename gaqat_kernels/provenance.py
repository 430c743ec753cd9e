"""Where a result came from: the code's commit, the library versions and the device, recorded beside the result
so that runs of one sweep made on different machines or commits can be told apart later."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Dict, Optional

import torch

from . import __version__


def commit_id() -> Optional[str]:
    """``GAQAT_COMMIT`` if set (a working tree copied to another machine may carry a stale ``.git`` or none), else
    the short git commit of the checkout holding this package, else None (an installed copy, or no git)."""
    if os.environ.get("GAQAT_COMMIT"):
        return os.environ["GAQAT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device) -> Dict[str, Optional[str]]:
    """Versions of this package, torch, Triton and Python, the commit and the device ``device`` names."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or device.type
    return {"gaqat_kernels": __version__, "commit": commit_id(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _version("triton"), "python": platform.python_version(),
            "device": name}
