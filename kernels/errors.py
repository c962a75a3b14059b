"""Errors raised by the tensor code. Callers (``workers``) translate them to the project's error hierarchy."""

from __future__ import annotations


class KernelError(Exception):
    """Base class of every error the kernels raise on purpose."""


class PatternError(KernelError, ValueError):
    """A weight or a layer shape does not admit the requested sparsity pattern."""


class FactorizationError(KernelError, RuntimeError):
    """The dampened Hessian of a layer could not be factored even after raising the dampening."""

    def __init__(self, layers: list[str], dampening: float) -> None:
        names = ", ".join(layers)
        super().__init__(
            f"the Hessian of {names} is not positive definite even with dampening {dampening:g} of mean(diag H); "
            "its calibration inputs are degenerate (too few tokens, or the layer's inputs are constant)"
        )
        self.layers = layers
        self.dampening = dampening
