"""Kernel implementations of the LSQ op; ``gaqat_kernels.backends`` chooses among them."""
