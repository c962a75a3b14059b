"""Sparse execution: the packed N:M form and the kernels that compute straight from it."""

# Kernels register themselves with packing.register_packed_kernel on import (none imports its toolchain yet).
from secateurs.kernels.sparse import triton_decode as triton_decode
