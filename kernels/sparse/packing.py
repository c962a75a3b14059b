"""Packed N:M weights: the kept values plus their positions, and a linear layer that computes from them.

An N:M sparse weight (at most N non-zeros in every group of M consecutive inputs; NVIDIA's 2:4 "fine-grained
structured sparsity", Mishra et al. 2021, arXiv 2104.08378, §3) stored densely moves and multiplies its zeros.
The packed form keeps, for every group, exactly N values in the weight's own dtype and their positions inside
the group (``log2 M`` bits, rounded up to 1, 2 or 4 so that codes never straddle a byte):

* ``values``  [out, in·N/M]  the kept weights of each group, in ascending position order;
* ``indices`` [out, ⌈in·N/M · bits / 8⌉] uint8, ``8 / bits`` positions per byte, the first in the low bits;
  each row is padded to whole bytes.

For 2:4 that is half the values plus 2 bits per kept value: 9/16 = 0.5625 of the dense bytes in 16-bit,
17/32 = 0.53125 in fp32 (GUIDE §3 "Physical limits"). A group with fewer than N non-zeros keeps some zeros, so
the form holds every N:M-valid weight, and unpacking gives the dense tensor back bit for bit (the comparison is
on the raw bits: a kept ``-0.0`` stays ``-0.0``; a pruned position is always ``+0.0``).

:class:`PackedLinear` is the sparse module built from it. Its reference forward decompresses and calls
``F.linear``; :func:`register_packed_kernel` is where faster kernels (reading the packed bytes directly, which
wins in the memory-bound decode regime on any GPU or CPU) plug in. This module does no file I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.kernels.errors import PatternError
from secateurs.kernels.patterns import row_slices

MAX_M = 16  # positions fit in 4 bits

# Same-size integer views of each element width: non-zero is decided on the bits, so -0.0 counts as a value.
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PackingError(PatternError):
    """A weight cannot be packed with the requested pattern, or packed data is inconsistent."""


def index_bits(m: int) -> int:
    """Bits per stored position for groups of ``m``: ceil(log2 m) rounded up to 1, 2 or 4."""
    if not 2 <= m <= MAX_M:
        raise PackingError(f"the packed format stores N:M patterns with 2 <= M <= {MAX_M}, got M={m}")
    need = max(1, math.ceil(math.log2(m)))
    return next(b for b in (1, 2, 4) if b >= need)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, k] uint8 codes < 2**bits -> [rows, ceil(k·bits/8)] uint8, ``8 // bits`` codes per byte, first low."""
    per_byte = 8 // bits
    rows, k = codes.shape
    padded = -(-k // per_byte) * per_byte
    if padded != k:
        codes = F.pad(codes, (0, padded - k))  # [rows, padded]
    groups = codes.reshape(rows, padded // per_byte, per_byte).to(torch.uint8)  # [rows, bytes, per_byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # [per_byte]
    return torch.bitwise_left_shift(groups, shifts).sum(dim=-1, dtype=torch.uint8)  # [rows, bytes]


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: [rows, bytes] uint8 -> [rows, k] uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per_byte]
    codes = torch.bitwise_right_shift(packed.unsqueeze(-1), shifts) & ((1 << bits) - 1)  # [rows, bytes, per_byte]
    return codes.reshape(packed.shape[0], -1)[:, :k]  # [rows, k]


@dataclass(frozen=True)
class PackedWeight:
    """One N:M weight in packed form; ``shape`` is the dense ``(out, in)`` it stands for."""

    values: torch.Tensor  # [out, in·n/m], the weight's dtype
    indices: torch.Tensor  # [out, ceil(in·n/m · bits / 8)], uint8
    shape: tuple[int, int]
    n: int
    m: int

    @property
    def bits(self) -> int:
        return index_bits(self.m)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form (values + positions)."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.values.to(device), self.indices.to(device), self.shape, self.n, self.m)


def packed_shapes(shape: tuple[int, int], n: int, m: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``values`` and ``indices`` for a dense ``(out, in)`` weight."""
    out, inp = shape
    kept = inp // m * n
    return (out, kept), (out, -(-kept * index_bits(m) // 8))


def packed_nbytes(shape: tuple[int, int], n: int, m: int, element_size: int) -> int:
    """Bytes the packed form of a dense ``(out, in)`` weight takes (without building it)."""
    values, indices = packed_shapes(shape, n, m)
    return values[0] * values[1] * element_size + indices[0] * indices[1]


def _check_pattern(name: str, shape: tuple[int, ...], n: int, m: int) -> None:
    index_bits(m)  # checks M
    if not 0 < n < m:
        raise PackingError(f"{name}: N:M needs 0 < N < M, got {n}:{m}")
    if len(shape) != 2:
        raise PackingError(f"{name}: only 2-D [out, in] weights can be packed, got shape {tuple(shape)}")
    if shape[1] % m:
        raise PackingError(f"{name}: {shape[1]} input columns is not a multiple of M={m}; {n}:{m} cannot apply")


@functools.lru_cache(maxsize=32)
def _kept_table(n: int, m: int) -> torch.Tensor:
    """For every group bitmask (bit j set = position j non-zero), the n positions kept: [2**m, n] uint8.

    Non-zeros first, then the first zeros, each in position order, then sorted ascending; masks with more than n
    bits set are never looked up (refused before).
    """
    codes = torch.arange(1 << m, dtype=torch.int32)  # [2**m]
    nonzero = (codes.unsqueeze(-1) >> torch.arange(m, dtype=torch.int32)) & 1  # [2**m, m]
    key = (1 - nonzero) * m + torch.arange(m, dtype=torch.int32)  # unique per entry: non-zeros sort first
    kept = torch.topk(key, n, dim=-1, largest=False).indices.sort(dim=-1).values  # [2**m, n]
    return kept.to(torch.uint8)


@torch.no_grad()
def pack_nm(weight: torch.Tensor, n: int = 2, m: int = 4, *, name: str = "weight") -> PackedWeight:
    """Pack an N:M-valid dense weight [out, in]; raises :class:`PackingError` naming ``name`` otherwise.

    In every group the non-zero entries are kept; groups with fewer than N take their first zeros too, so
    the choice is deterministic. Kept positions are stored in ascending order.
    """
    _check_pattern(name, tuple(weight.shape), n, m)
    if weight.element_size() not in _BIT_VIEWS or weight.is_complex():
        raise PackingError(f"{name}: dtype {weight.dtype} cannot be packed (real dtypes of 1, 2, 4 or 8 bytes)")
    out, inp = weight.shape
    groups = inp // m
    dense = weight.detach().contiguous().reshape(out, groups, m)  # [out, g, m]
    bits = dense.view(_BIT_VIEWS[weight.element_size()])  # [out, g, m]: non-zero is decided on the bits
    place = torch.tensor([1 << j for j in range(m)], dtype=torch.int32, device=weight.device)  # [m]
    table = _kept_table(n, m).to(weight.device)  # [2**m, n]
    values_shape, indices_shape = packed_shapes((out, inp), n, m)
    values = torch.empty(values_shape, dtype=weight.dtype, device=weight.device)  # [out, g·n]
    indices = torch.empty(indices_shape, dtype=torch.uint8, device=weight.device)  # [out, bytes]
    bits_per_code = index_bits(m)
    # A slice of rows at a time: the per-group temporaries (int32 masks, int64 counts and gather indices) would
    # otherwise be 2-4x the weight's bytes at once (a 5632 x 2048 fp32 weight: ~150 MB on top of its 46 MB).
    for part in row_slices(out, inp):
        rows = part.stop - part.start
        nonzero = bits[part] != 0  # [rows, g, m]
        if bool((nonzero.sum(dim=-1) > n).any()):
            _refuse(name, weight, dense, (bits != 0).sum(dim=-1), n=n, m=m)  # the message counts the whole weight
        mask = (nonzero.to(torch.int32) * place).sum(dim=-1, dtype=torch.int32)  # [rows, g], bit j = position j
        kept = table.index_select(0, mask.reshape(-1)).reshape(rows, groups, n)  # [rows, g, n] uint8
        values[part] = torch.gather(dense[part], -1, kept.long()).reshape(rows, groups * n)  # [rows, g·n]
        indices[part] = pack_bits(kept.reshape(rows, groups * n), bits_per_code)  # [rows, bytes]
    return PackedWeight(values, indices, (int(out), int(inp)), n, m)


def _refuse(name: str, weight: torch.Tensor, dense: torch.Tensor, count: torch.Tensor, *, n: int, m: int) -> None:
    bad = count > n  # [out, g]
    row, group = (int(i) for i in bad.nonzero()[0])
    by_value = (dense != 0).sum(dim=-1)  # [out, g]
    if bool((by_value[bad] <= n).all()):
        raise PackingError(
            f"{name} has -0.0 in pruned positions (first at row {row}, columns {group * m}..{group * m + m - 1}); "
            f"the packed format stores pruned positions as +0.0, so the round trip would not be bit-exact: "
            f"write pruned entries as +0.0 (weight.masked_fill_(weight == 0, 0))"
        )
    raise PackingError(
        f"{name} {tuple(weight.shape)} is not {n}:{m} sparse: {int(bad.sum())} of {bad.numel()} groups of {m} "
        f"consecutive input weights hold more than {n} non-zeros (first: row {row}, columns "
        f"{group * m}..{group * m + m - 1} hold {int(count[row, group])}); packing requires at most {n} non-zeros "
        f"in every group of {m} along the input dimension"
    )


def positions(packed: PackedWeight, *, check: bool = True) -> torch.Tensor:
    """The kept positions inside each group: [out, in/m, n] int64; ``check``: shapes, and positions strictly
    increasing and below m (a corrupt file must not scatter values to the wrong place)."""
    out, inp = packed.shape
    groups = inp // packed.m
    k = groups * packed.n
    values_shape, indices_shape = packed_shapes(packed.shape, packed.n, packed.m)
    if check and (tuple(packed.values.shape) != values_shape or tuple(packed.indices.shape) != indices_shape):
        raise PackingError(
            f"packed data of a {packed.shape} weight must have values {values_shape} and indices "
            f"{indices_shape}, got {tuple(packed.values.shape)} and {tuple(packed.indices.shape)}"
        )
    if check and packed.indices.dtype != torch.uint8:
        raise PackingError(f"packed indices must be uint8, got {packed.indices.dtype}")
    pos = unpack_bits(packed.indices, packed.bits, k).reshape(out, groups, packed.n).long()  # [out, g, n]
    if not check:
        return pos
    if bool((pos >= packed.m).any()) or (packed.n > 1 and bool((pos[..., 1:] <= pos[..., :-1]).any())):
        raise PackingError("packed indices are corrupt: positions must be strictly increasing and below M")
    return pos


@torch.no_grad()
def unpack_nm(packed: PackedWeight, *, check: bool = True) -> torch.Tensor:
    """The dense weight [out, in] the packed form stands for (bit-exact inverse of :func:`pack_nm`).

    ``check=False`` skips validating the positions (for modules that validated once when built).
    """
    out, inp = packed.shape
    groups = inp // packed.m
    pos = positions(packed, check=check)  # [out, g, n]
    dense = torch.zeros(out, groups, packed.m, dtype=packed.dtype, device=packed.values.device)  # [out, g, m]
    dense.scatter_(-1, pos, packed.values.reshape(out, groups, packed.n))
    return dense.reshape(out, inp)  # [out, in]


# --- The sparse module ---------------------------------------------------------------------------------------

# A fast kernel: (x [..., in], layer) -> y [..., out], or None to decline (shape, dtype, device or token count it
# does not take; the next kernel, and finally the reference forward, get the call).
PackedKernel = Callable[[torch.Tensor, "PackedLinear"], torch.Tensor | None]
REFERENCE_PATH = "reference"


@dataclass(frozen=True)
class KernelDescription:
    """What a registered kernel says of itself, for reports: ``detail`` names the conditions it runs under
    (instruction set, threads, hand-over token count) or, when ``available`` is False, why it cannot run."""

    name: str
    available: bool
    detail: str


@dataclass(frozen=True)
class _Registered:
    kernel: PackedKernel
    describe: Callable[[], KernelDescription] | None


_KERNELS: dict[str, _Registered] = {}
# Bumped by every change of the registry (and by kernels whose configuration changes): a layer's fast call (see
# bind_fast_call) is tried only under the version it was bound in.
_VERSION = [0]
_FAST = "_fast_call"  # a layer's fast call, in its __dict__: (version, call, kernel name)

# A kernel's call bound to one layer: x -> y, or None when x is not like the call it was bound from.
FastCall = Callable[[torch.Tensor], torch.Tensor | None]


def invalidate_fast_calls() -> None:
    """Every layer's fast call stops being tried (each is re-bound, or not, by its next full dispatch)."""
    _VERSION[0] += 1


def bind_fast_call(layer: PackedLinear, name: str, call: FastCall) -> None:
    """Let the kernel ``name``, while computing a call of ``layer``, leave ``call`` for the calls that follow.

    :class:`PackedLinear` tries ``call(x)`` before its dispatch over the registry until it returns None (then the
    dispatch runs, and may bind again). It exists for decode: a small layer's product takes tens of microseconds,
    and the dispatch's checks and lookups, made cold (a model's layers are touched once per step), cost ~10 µs of
    them. ``call`` must itself decline (return None) every input its kernel would decline, or would treat
    differently than the call it was bound from (dtype, token count, grad, thread count); the registry's version,
    the layer's tensors (``_apply``, attribute assignment) and ``use_kernels`` are checked here.
    """
    layer.__dict__[_FAST] = (_VERSION[0], call, name)


def register_packed_kernel(
    name: str, kernel: PackedKernel, describe: Callable[[], KernelDescription] | None = None
) -> None:
    """Add a kernel that :class:`PackedLinear` tries, in registration order, before its reference forward.

    ``describe`` (optional) tells reports what the kernel runs on, or why it cannot run here.
    """
    _KERNELS[name] = _Registered(kernel, describe)
    invalidate_fast_calls()


def unregister_packed_kernel(name: str) -> None:
    _KERNELS.pop(name, None)
    invalidate_fast_calls()


def packed_kernels() -> Mapping[str, PackedKernel]:
    return {name: entry.kernel for name, entry in _KERNELS.items()}


@contextmanager
def only_packed_kernels(*names: str) -> Iterator[None]:
    """Inside it, :class:`PackedLinear` tries only the registered kernels named (none: the reference forward
    runs every call); the registry is restored on exit. For comparisons and tests that need one known path."""
    saved = dict(_KERNELS)
    unknown = set(names) - saved.keys()
    if unknown:
        raise KeyError(f"no packed kernel registered as {', '.join(sorted(unknown))}; registered: {', '.join(saved)}")
    _KERNELS.clear()
    _KERNELS.update({name: entry for name, entry in saved.items() if name in names})
    invalidate_fast_calls()
    try:
        yield
    finally:
        _KERNELS.clear()
        _KERNELS.update(saved)
        invalidate_fast_calls()


def describe_packed_kernels() -> list[KernelDescription]:
    """Every registered kernel's own description (registration order)."""
    return [
        entry.describe() if entry.describe else KernelDescription(name, True, "no description")
        for name, entry in _KERNELS.items()
    ]


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W held packed (``values`` and ``indices`` buffers; see the module docstring).

    ``forward`` offers the input to every registered kernel (:func:`register_packed_kernel`) and falls back to
    the reference: decompress W, then ``F.linear``; a kernel's call bound to the layer (:func:`bind_fast_call`) is
    tried before that dispatch. ``use_kernels=False`` forces the reference. ``last_path``
    names what computed the latest call (a kernel's name, or ``"reference"``), so reports say what really ran.
    """

    values: torch.Tensor
    indices: torch.Tensor

    def __init__(
        self, packed: PackedWeight, bias: torch.Tensor | None = None, *, use_kernels: bool = True, check: bool = True
    ) -> None:
        super().__init__()
        if check:  # validates shapes and positions once, up front (``check=False``: the caller did)
            positions(packed)
        self.out_features, self.in_features = packed.shape
        self.n, self.m = packed.n, packed.m
        self.use_kernels = use_kernels
        self.last_path: str | None = None  # set by every forward
        self.register_buffer("values", packed.values)
        self.register_buffer("indices", packed.indices)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, n: int = 2, m: int = 4, *, name: str = "weight"
    ) -> PackedLinear:
        """From an N:M dense-with-zeros weight [out, in] (refused with :class:`PackingError` otherwise)."""
        return cls(pack_nm(weight, n, m, name=name), bias)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.values, self.indices, (self.out_features, self.in_features), self.n, self.m)

    def dense_weight(self) -> torch.Tensor:
        return unpack_nm(self.packed, check=False)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        # last_path is a plain attribute: set through __dict__, since nn.Module.__setattr__ costs microseconds, too
        # much on every call of a decode step
        if self.use_kernels:
            fast = self.__dict__.get(_FAST)  # the last kernel's bound call (bind_fast_call)
            if fast is not None and fast[0] == _VERSION[0]:
                y = fast[1](x)
                if y is not None:
                    self.__dict__["last_path"] = fast[2]
                    return y
            for name, entry in _KERNELS.items():
                y = entry.kernel(x, self)
                if y is not None:
                    self.__dict__["last_path"] = name
                    return y
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # here, not before the kernels: they check their own
            width = f"width {x.shape[-1]}" if x.dim() else "no last dimension"
            raise ValueError(
                f"PackedLinear({self.extra_repr()}) got an input of {width} (shape {tuple(x.shape)}): "
                f"the last dimension must be in_features = {self.in_features}"
            )
        self.__dict__["last_path"] = REFERENCE_PATH
        return F.linear(x, self.dense_weight(), self.bias)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PackedLinear:
        self.__dict__.pop(_FAST, None)  # .to(), .half(), ...: new tensors, which the bound call does not hold
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop(_FAST, None)  # a copy (deepcopy, pickle) must not call through the original's tensors
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("values", "indices", "bias"):
            self.__dict__.pop(_FAST, None)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
            f"bias={self.bias is not None}"
        )


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_with_packed_(model: nn.Module, packed: Mapping[str, PackedWeight], *, check: bool = True) -> list[str]:
    """Swap each named linear module (``nn.Linear`` or GPT-2 ``Conv1D``) for a :class:`PackedLinear`.

    ``packed`` maps module names to their weights as [out, in] (a ``Conv1D``'s transposed weight). The module's
    bias is kept. Returns the names replaced; raises :class:`PackingError` for a name that is not a linear of
    matching shape, or (``check``) for positions out of range.
    """
    from transformers.pytorch_utils import Conv1D

    for name, weight in packed.items():
        parent, child = _parent(model, name)
        module = getattr(parent, child, None)
        if not isinstance(module, nn.Linear | Conv1D):
            raise PackingError(f"{name} is not a linear layer of the model (found {type(module).__name__})")
        out, inp = (
            (module.weight.shape[1], module.weight.shape[0]) if isinstance(module, Conv1D) else module.weight.shape
        )
        if (out, inp) != weight.shape:
            raise PackingError(f"{name}: packed weight is {weight.shape} (out, in), the model's layer {(out, inp)}")
        bias = module.bias if isinstance(module.bias, torch.Tensor) else None
        setattr(parent, child, PackedLinear(weight, bias, check=check))
    return list(packed)


def iter_packed_linears(model: nn.Module) -> Iterator[tuple[str, PackedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            yield name, module
