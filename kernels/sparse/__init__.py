"""Sparse execution: the packed N:M form and the kernels that compute straight from it."""
