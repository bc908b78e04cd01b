"""Layers whose storage and kernels vary with the weight format."""
