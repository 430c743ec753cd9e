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
    the short git commit of this project's checkout holding the package, else None (an installed copy, or no git).
    An installed copy inside some other repository (a virtual environment in a user's project) is not a checkout
    of this project: only a ``.git`` right beside the package counts."""
    if os.environ.get("GAQAT_COMMIT"):
        return os.environ["GAQAT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=root)
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
