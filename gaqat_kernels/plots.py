"""PNG plots of a training run (needs matplotlib): accuracy curves from ``log.jsonl`` and, for GAQAT/FQAT,
per-layer disorder and freezing over steps from ``conflict.jsonl``."""
from __future__ import annotations

import json
import os
from typing import List


def read_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file the training script wrote (``log.jsonl``, ``conflict.jsonl``); [] if absent."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(out: str) -> List[str]:
    """Write ``accuracy.png`` (and ``conflict.png`` when statistics were logged) into ``out``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    log = read_jsonl(os.path.join(out, "log.jsonl"))
    if log:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in log]
        ax.plot(steps, [r["val_acc"] for r in log], label="training-domain validation")
        ax.plot(steps, [r["test_acc"] for r in log], label="test domain")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
        path = os.path.join(out, "accuracy.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    stats = read_jsonl(os.path.join(out, "conflict.jsonl"))
    if stats:
        layers = list(dict.fromkeys(r["layer"] for r in stats))
        steps = sorted({r["step"] for r in stats})
        index = {s: i for i, s in enumerate(steps)}
        import numpy as np

        disorder = np.full((len(layers), len(steps)), np.nan)
        frozen = np.zeros((len(layers), len(steps)))
        for r in stats:
            i, j = layers.index(r["layer"]), index[r["step"]]
            disorder[i, j], frozen[i, j] = r["disorder"], float(r["frozen"])
        fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for i, name in enumerate(layers):
            a.plot(steps, disorder[i], lw=0.8, label=name)
        a.set_ylabel("disorder")
        if len(layers) <= 12:
            a.legend(fontsize=6, ncol=2)
        b.imshow(frozen, aspect="auto", interpolation="nearest", cmap="Greys",
                 extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
        b.set_yticks(range(len(layers)))
        b.set_yticklabels(layers, fontsize=6)
        b.set_xlabel("step")
        b.set_title("frozen (black)", fontsize=8)
        path = os.path.join(out, "conflict.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
