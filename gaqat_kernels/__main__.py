"""``python -m gaqat_kernels`` runs the training script (same as ``python -m gaqat_kernels.train``)."""
from .train import main

main()
