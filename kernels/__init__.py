"""Triton kernels and their torch twins."""
