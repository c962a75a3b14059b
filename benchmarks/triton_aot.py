"""Compile the Triton 2:4 decode kernel for a GPU architecture on a machine WITHOUT a GPU, and report what the
compiler made of it: registers, spills, shared memory, and the width of every global load in the PTX.

    python benchmarks/triton_aot.py                      # sm_90 (H100/H200), every token tile, bf16
    python benchmarks/triton_aot.py --arch 80 --dtype fp16 --tokens 1 --block-n 8 --block-kh 256 --warps 8

What costs no device time (METHOD.md "Read what costs no device time"): a configuration that spills, or whose
value loads are not 16 bytes wide, can be dropped before a GPU session. It uses Triton's own ahead-of-time path
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) and the ptxas/cuobjdump that Triton's
wheel ships. The specialization mirrors what the JIT does for typical calls: pointers and sizes divisible by 16,
and the unit stride of x (1 for one token, the token axis otherwise) folded into the kernel.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compile_kernel(
    *,
    arch: int = 90,
    dtype: str = "bf16",
    tokens: int = 1,
    style: str | None = None,
    block_n: int | None = None,
    block_kh: int | None = None,
    split_k: int = 1,
    warps: int | None = None,
    stages: int | None = None,
    bias: bool = False,
    even: bool = True,
    prefetch: bool = False,
    ptx_out: Path | None = None,
) -> dict[str, Any]:
    """Compile one specialization and return its resource use and global-load widths (``dtype``: bf16/fp16).

    Unset options come from the configuration table (``style`` None: the table's style for this token tile).
    """
    import dataclasses

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from secateurs.kernels.sparse.triton_decode import (
        _BYTES_TABLE,
        _kernel,
        _select_kernel,
        _words_kernel,
        block_m,
        table,
    )

    base = table()[block_m(tokens)]
    if style is not None and style != base.style:  # another style's defaults: the bytes table's, or the 16-token
        base = table()[16] if style == "tiles" else _BYTES_TABLE[block_m(tokens)]  # entry's blocks for tiles
        base = dataclasses.replace(base, style=style, block_kh=max(16, base.block_kh))
    config = dataclasses.replace(
        base,
        block_n=block_n or base.block_n,
        block_kh=block_kh or base.block_kh,
        split_k=split_k,
        num_warps=warps or base.num_warps,
        num_stages=stages or base.num_stages,
        prefetch=prefetch,
    )
    tile = max(16, block_m(tokens)) if config.style == "tiles" and tokens > 1 else block_m(tokens)
    if config.style == "select":  # one token: x as int64 quads, values as int32 pairs
        if tile != 1:
            raise ValueError("the select style computes one token")
        kernel = _select_kernel()
        signature = {name: "i32" for name in kernel.arg_names}
        signature.update(
            {"x_ptr": "*i64", "pairs_ptr": "*i32", "words_ptr": "*i32", "bias_ptr": f"*{dtype}",
             "out_ptr": f"*{dtype}" if split_k == 1 else "*fp32"}
        )  # fmt: skip
        constants: dict[str, Any] = {
            "HAS_BIAS": bias, "SPLIT_K": split_k, "EVEN": even, "PREFETCH": config.prefetch,
            "BF16": dtype == "bf16", "BLOCK_N": config.block_n, "BLOCK_W": config.block_kh // 16,
        }  # fmt: skip
    else:
        kernel = _kernel() if config.style == "bytes" else _words_kernel()
        codes = "indices_ptr" if config.style == "bytes" else "words_ptr"
        signature = {name: "i32" for name in kernel.arg_names}
        signature.update(
            {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", codes: "*u8" if config.style == "bytes" else "*i32",
             "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}" if split_k == 1 else "*fp32"}
        )  # fmt: skip
        constants = {
            "HAS_BIAS": bias, "SPLIT_K": split_k, "BLOCK_M": tile, "BLOCK_N": config.block_n,
            # the JIT folds an integer argument equal to 1 into the kernel: x's unit stride
            "stride_xk" if tile == 1 else "stride_xm": 1,
        }  # fmt: skip
        if config.style == "bytes":
            constants["BLOCK_KH"] = config.block_kh
        else:
            constants.update(
                BLOCK_W=config.block_kh // 16,
                EVEN=even,
                EXPAND=config.style == "tiles",
                PREFETCH=config.prefetch,
            )
    names = list(kernel.arg_names)
    for name in constants:
        signature[name] = "constexpr"
    # The JIT marks pointer and integer arguments divisible by 16 (LLaMA-size layers: all of them but M).
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name in names
        if signature[name] != "constexpr" and name != "M"
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    ptx = compiled.asm["ptx"]
    if ptx_out is not None:
        ptx_out.write_text(ptx)
    loads: dict[str, int] = {}
    for kind in re.findall(r"ld\.global(?:\.[A-Za-z0-9_:]+)*", ptx):
        loads[kind] = loads.get(kind, 0) + 1
    result: dict[str, Any] = {
        "triton": triton.__version__,
        "arch": f"sm_{arch}",
        "dtype": dtype,
        "tokens_tile": tile,
        "config": str(config),
        "even": even if config.style != "bytes" else None,
        "bias": bias,
        "shared_bytes": compiled.metadata.shared,
        "global_loads": loads,
        "shared_memory_ops": len(re.findall(r"(?:ld|st)\.shared", ptx)),
        "mma": len(re.findall(r"\b(?:mma|wgmma)\.", ptx)),
    }
    result.update(_resource_usage(compiled.asm["cubin"]))
    return result


def _resource_usage(cubin: bytes) -> dict[str, Any]:
    """REG / STACK / LOCAL / SHARED from ``cuobjdump --dump-resource-usage`` (the one Triton's wheel carries)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {"resource_usage": "cuobjdump not found in the Triton wheel"}
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        done = subprocess.run(
            [str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True, check=False
        )
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", done.stdout))
    return {
        "registers": int(found["REG"]) if "REG" in found else None,
        "stack_bytes": int(found.get("STACK", 0)),
        "local_bytes": int(found.get("LOCAL", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--style", default=None, choices=["bytes", "words", "select", "tiles"], help="default: the table's"
    )
    parser.add_argument("--block-n", type=int, default=None)
    parser.add_argument("--block-kh", type=int, default=None)
    parser.add_argument("--split-k", type=int, default=1)
    parser.add_argument("--warps", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--ptx", type=Path, default=None, help="write the PTX here (the last token count's)")
    parser.add_argument("--prefetch", action="store_true", help="words/select/tiles: load the next chunk ahead")
    args = parser.parse_args()
    for tokens in args.tokens:
        result = compile_kernel(
            arch=args.arch,
            dtype=args.dtype,
            tokens=tokens,
            style=args.style,
            block_n=args.block_n,
            block_kh=args.block_kh,
            split_k=args.split_k,
            warps=args.warps,
            stages=args.stages,
            bias=args.bias,
            prefetch=args.prefetch,
            ptx_out=args.ptx,
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
