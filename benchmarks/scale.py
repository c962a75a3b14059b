"""Scale: prune models far larger than RAM through the real job (streamed weights, issue 11 item 5).

    python benchmarks/scale.py WORKDIR [--shape 7b|13b|both|tinyllama|tiny] [--blocks N] [--dtype bfloat16|float32]
                                       [--output FILE] [--keep]

For each shape the script

1. writes a random-weight model of that shape into ``WORKDIR`` *shard by shard* (one safetensors file per decoder
   block plus one for the rest, the standard ``model.safetensors.index.json``): it never holds more than one
   block, so a 26 GB model is generated on a 24 GB machine. Shapes are LLaMA-2's (Touvron et al. 2023, Table 1
   and the released configs): 7B hidden 4096 / MLP 11008 / 32 blocks / 32 heads; 13B hidden 5120 / MLP 13824 /
   40 blocks / 40 heads. The vocabulary is SmolLM2's (49,152 instead of 32,000) because SmolLM2's tokenizer,
   the offline asset, is the one saved with the model: +0.14 B parameters of embeddings and head on 7B;
2. runs ``secateurs.workers.pipeline.run_job`` on it in a fresh process (what ``secateurs prune`` does): 7B with
   SparseGPT 2:4 and 16 × 512 calibration tokens of c4, 13B with magnitude 2:4 (no calibration: that run tests
   streaming more bytes than RAM, not the solve); no evaluation, no speed step;
3. records the job's peak RSS (its report's: the ``VmHWM`` of that process, stage by stage; not ``ru_maxrss``,
   which a child started by fork and exec inherits from its parent, here the generator's own peak), the seconds of
   every block, the total; checks
   that every pruned weight of the output is 2:4 (reading the written shards tensor by tensor) and that the
   output loads with ``AutoModelForCausalLM.from_pretrained(..., device_map="meta")`` (transformers reads the
   index and every header and matches them to the config; no weight is materialized);
4. deletes the generated model and the output (``--keep`` keeps them), and writes one JSON per shape to
   ``benchmarks/results/scale-<shape>.json`` (or ``--output``) with the environment: CPU model and flags,
   core count, load average, torch / transformers versions, threads.

``--shape tinyllama --dtype float32`` is the issue's TinyLlama-shaped memory run (22 blocks of hidden 2048 / MLP
5632, SparseGPT with 8 × 256 calibration tokens, no evaluation). ``--blocks N`` builds the shape with only N decoder
blocks (a smoke run); ``--shape tiny`` is a toy shape for the test of this script. The JSON also holds the
projection of the per-block time to LLaMA-2-70B (see :func:`project_70b` and ``docs/engine.md``, "Scale").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, int]] = {
    # LLaMA-2 (arXiv 2307.09288, Table 1; the released config.json files). 70B only for the projection.
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    "70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "tinyllama": {  # TinyLlama-1.1B's shape (22 blocks, hidden 2048, MLP 5632, grouped-query attention 32/4)
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}
METHOD = {"7b": "sparsegpt", "13b": "magnitude", "tinyllama": "sparsegpt", "tiny": "sparsegpt"}
CALIBRATION = {"sparsegpt": (16, 512), "magnitude": (0, 0)}  # samples × tokens, by method
SHAPE_CALIBRATION = {"tinyllama": (8, 256)}  # the TinyLlama-shape memory run (fp32, --dtype float32)


def calibration_of(shape: str) -> tuple[int, int]:
    """Calibration samples × tokens for ``shape``: its own when it has one, else its method's."""
    return SHAPE_CALIBRATION.get(shape, CALIBRATION[METHOD[shape]])


def _config(shape: str, blocks: int | None, vocab: int, bos: int | None, eos: int | None) -> Any:
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape])
    if blocks is not None:
        dims["num_hidden_layers"] = blocks
    return LlamaConfig(
        **dims,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def generate(folder: Path, shape: str, blocks: int | None, dtype_name: str, tokenizer_dir: Path) -> dict[str, Any]:
    """A random-weight model of ``shape`` written shard by shard into ``folder`` (one block in memory at most)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.kernels.pruning.discovery import find_decoder_blocks
    from secateurs.workers.tensorfile import write_tensors

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _config(shape, blocks, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix, layers = find_decoder_blocks(skeleton)
    groups: list[list[tuple[str, Any]]] = [[]]  # the non-block tensors, then one group per block
    groups += [[] for _ in layers]
    for name, tensor in skeleton.state_dict().items():
        index = int(name[len(prefix) + 1 :].split(".")[0]) + 1 if name.startswith(prefix + ".") else 0
        groups[index].append((name, tensor))
    folder.mkdir(parents=True)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = []
        for name, meta in group:
            if name.endswith("norm.weight"):
                tensor = torch.ones(meta.shape, dtype=dtype)
            else:  # N(0, 0.02²), as LLaMA's initializer_range
                tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(dtype)
            tensors.append((name, tensor))
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        write_tensors(folder / file, tensors, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"bytes": total, "files": len(groups), "seconds": time.perf_counter() - started}


def _job(
    model: Path,
    output: Path,
    method: str,
    dtype_name: str,
    c4: Path | None,
    *,
    calibration: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The job in this process (``--run-job``): the real pipeline, peak RSS and per-block seconds."""
    from secateurs.app.schemas import JobSpec, ProgressEvent, TextSource
    from secateurs.workers.pipeline import quiet_libraries, run_job

    quiet_libraries()
    samples, seqlen = calibration or CALIBRATION[method]
    fields: dict[str, Any] = {"calibration": None}
    if samples:
        fields = {"calibration": TextSource(file=str(c4)), "calibration_samples": samples, "calibration_seqlen": seqlen}
    spec = JobSpec(
        model=str(model),
        method=method,
        pattern="2:4",
        evaluation=None,
        device="cpu",
        dtype=dtype_name,
        measure_speed=False,
        **fields,
    )
    blocks: list[float] = []

    def progress(event: ProgressEvent) -> None:
        if event.block is not None and event.seconds is not None:
            blocks.append(event.seconds)
            print(f"block {event.block}/{event.blocks}: {event.seconds:.1f} s", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = run_job(spec, progress, output_dir=output, overwrite=True)
    # The job process's own peak: its report's, the largest of its stages' VmHWM (each reset as the stage starts, so
    # this process's own VmHWM now covers only the last stage; None only where /proc cannot be read). ru_maxrss is not
    # that: Linux carries the parent's high-water mark into a child at exec (measured: a child of a process that had
    # touched 1.5 GB reported 1.48 GB of ru_maxrss and 13.6 MB of VmHWM), and this script's parent has just
    # generated the model. ru_maxrss only where VmHWM is unavailable.
    hwm = report.memory.peak_rss_bytes
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds_total": time.perf_counter() - started,
        "seconds_per_block": blocks,
        "peak_rss_bytes": hwm if hwm is not None else max_rss,
        "peak_rss_source": report.memory.peak_rss_source if hwm is not None else "ru_maxrss",
        "ru_maxrss_bytes": max_rss,
        "prune_seconds": report.timings.prune_seconds,
        "load_seconds": report.timings.load_seconds,
        "verified_by_job": report.sparsity.verified,
        "parameters": report.model.parameters,
        "blocks": report.model.decoder_blocks,
        "packed_written": bool(report.packed and report.packed.written),
    }


def check_output(output: Path) -> dict[str, Any]:
    """Every pruned weight of the written checkpoint is 2:4 (read one tensor at a time), and transformers loads
    the folder on the meta device (index, headers and config agree)."""
    import torch
    from transformers import AutoModelForCausalLM

    from secateurs.kernels.patterns import satisfies_nm
    from secateurs.workers.streaming import CheckpointFiles

    files = CheckpointFiles(output)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    checked = 0
    try:
        for name in files.names():
            if ".layers." in name and name.endswith(".weight") and any(p in name for p in projections):
                if not satisfies_nm(files.get(name).float(), 2, 4):
                    return {"two_four": False, "first_failure": name, "checked": checked}
                checked += 1
    finally:
        files.close()
    try:
        model = AutoModelForCausalLM.from_pretrained(output, device_map="meta")
    except (OSError, RuntimeError, ValueError) as exc:  # recorded in the JSON, not a crash of the whole run
        return {"two_four": True, "checked_weights": checked, "from_pretrained_meta": False, "error": str(exc)}
    loaded = sum(p.numel() for p in model.parameters())
    return {
        "two_four": True,
        "checked_weights": checked,
        "from_pretrained_meta": True,
        "parameters": loaded,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    } | {"torch": torch.__version__}


def _linears(dims: dict[str, int]) -> list[tuple[int, int, str]]:
    """(out, in, input group) of a LLaMA block's linears; layers of one group read the same input."""
    hidden, mlp = dims["hidden_size"], dims["intermediate_size"]
    kv = hidden // dims["num_attention_heads"] * dims["num_key_value_heads"]
    return [
        (hidden, hidden, "attn_in"),
        (kv, hidden, "attn_in"),
        (kv, hidden, "attn_in"),
        (hidden, hidden, "o_in"),
        (mlp, hidden, "mlp_in"),
        (mlp, hidden, "mlp_in"),
        (hidden, mlp, "down_in"),
    ]


def block_costs(dims: dict[str, int], tokens: int) -> dict[str, float]:
    """Operation counts of pruning one block with SparseGPT (Frantar & Alistarh 2023, §3.5 and Algorithm 1):
    ``bytes`` the block's weights (bf16); ``forward`` 2·T·Σ out·in (calibration forward); ``hessian`` 2·T·Σ in²
    over distinct inputs; ``factor`` Σ in³ over distinct inputs (Cholesky and inverse, O(in³));
    ``sweep`` Σ out·in² (the row updates of the OBS sweep, O(d_row·d_col²) per layer, §3.4)."""
    layers = _linears(dims)
    inputs = {group: inp for _out, inp, group in layers}
    return {
        "bytes": 2.0 * sum(out * inp for out, inp, _ in layers),
        "forward": 2.0 * tokens * sum(out * inp for out, inp, _ in layers),
        "hessian": 2.0 * tokens * sum(inp * inp for inp in inputs.values()),
        "factor": float(sum(inp**3 for inp in inputs.values())),
        "sweep": float(sum(out * inp * inp for out, inp, _ in layers)),
    }


def project_70b(shape: str, seconds_per_block: float, method: str, tokens: int) -> dict[str, Any]:
    """LLaMA-2-70B seconds per block from a measured shape's, by ratios of operation counts.

    Magnitude pruning reads, sorts and writes each weight once: its block time scales with the block's bytes.
    SparseGPT's block time is a sum of terms of different orders (:func:`block_costs`); without each term's
    measured share the projection brackets it: the low end scales the whole measured time by the calibration
    forward's FLOP ratio (linear in the weights), the high end by the larger ratio of the cubic terms (the
    factorizations Σ in³ and the sweep Σ out·in²), which dominate at these widths on CPU (issue 11: "the
    factorizations and the sweep, not the calibration forward, dominate"). The middle estimate is the
    geometric mean. 70B total = 80 blocks × that.
    """
    measured, target = block_costs(SHAPES[shape], tokens), block_costs(SHAPES["70b"], tokens)
    ratios = {key: target[key] / measured[key] for key in measured if measured[key]}
    blocks = SHAPES["70b"]["num_hidden_layers"]
    if method == "magnitude":
        per_block = seconds_per_block * ratios["bytes"]
        return {
            "method": method,
            "from": shape,
            "ratios": ratios,
            "seconds_per_block": per_block,
            "seconds_total": per_block * blocks,
            "how": "block time scaled by the ratio of block bytes",
        }
    low, high = seconds_per_block * ratios["forward"], seconds_per_block * max(ratios["sweep"], ratios["factor"])
    middle = math.sqrt(low * high)
    return {
        "method": method,
        "from": shape,
        "ratios": ratios,
        "seconds_per_block": {"low": low, "middle": middle, "high": high},
        "seconds_total": {"low": low * blocks, "middle": middle * blocks, "high": high * blocks},
        "how": "measured block time × 70B/measured ratio of the calibration forward's FLOPs (low) and of the "
        "larger of the factorizations' Σ in³ and the sweep's Σ out·in² (high); middle = geometric mean; "
        "total = 80 blocks",
    }


def environment() -> dict[str, Any]:
    import torch
    import transformers

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
        line = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni")
        flags = [f for f in wanted if f in line]
    except OSError:
        pass
    memory = 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        memory = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    code = ""
    with contextlib.suppress(OSError):
        describe = ["git", "describe", "--always", "--dirty"]
        code = subprocess.run(describe, check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "code": code or "unknown (not a git checkout)",
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def run_shape(shape: str, workdir: Path, args: argparse.Namespace, assets: Any) -> dict[str, Any]:
    model, output = workdir / f"model-{shape}", workdir / f"out-{shape}"
    method = METHOD[shape]
    result: dict[str, Any] = {
        "benchmark": "scale (benchmarks/scale.py)",
        "date": dt.date.today().isoformat(),
        "shape": shape,
        "dims": SHAPES[shape] | ({"num_hidden_layers": args.blocks} if args.blocks else {}),
        "vocab": "SmolLM2's tokenizer (49,152)",
        "dtype": args.dtype,
        "method": method,
        "pattern": "2:4",
        "calibration": {
            "text": "exllamav2 c4.utf8",
            "samples": calibration_of(shape)[0],
            "seqlen": calibration_of(shape)[1],
        },
        "environment": environment(),
    }
    try:
        result["generated"] = generate(model, shape, args.blocks, args.dtype, assets.smollm2)
        print(f"{shape}: generated {result['generated']['bytes'] / 1e9:.1f} GB", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-job",
            str(model),
            str(output),
            method,
            args.dtype,
            str(assets.c4),
            *map(str, calibration_of(shape)),
        ]
        job = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)
        if job.returncode != 0:
            result["error"] = f"the job exited with {job.returncode}"
            return result
        result["job"] = json.loads(job.stdout.strip().splitlines()[-1])
        result["check"] = check_output(output)
        per_block = result["job"]["seconds_per_block"]
        if per_block and shape in ("7b", "13b"):
            median = sorted(per_block)[len(per_block) // 2]
            tokens = calibration_of(shape)[0] * calibration_of(shape)[1]
            result["projection_70b"] = project_70b(shape, median, method, tokens) | {"measured_median_s": median}
        result["environment"]["load_average_after"] = os.getloadavg()
        return result
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(output, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--run-job":
        model, output, method, dtype_name, c4 = argv[1:6]
        calibration = (int(argv[6]), int(argv[7])) if len(argv) > 7 else None
        print(json.dumps(_job(Path(model), Path(output), method, dtype_name, Path(c4), calibration=calibration)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="where the generated model and the output go (deleted after)")
    parser.add_argument("--shape", choices=("7b", "13b", "both", "tinyllama", "tiny"), default="both")
    parser.add_argument("--blocks", type=int, default=None, help="only N decoder blocks (a smoke run)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (one shape) or folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and the output")
    args = parser.parse_args(argv)
    from secateurs.workers.assets import fetch_assets

    assets = fetch_assets(Path(os.environ.get("SECATEURS_CACHE_DIR") or ROOT / ".cache"))
    shapes = ["7b", "13b"] if args.shape == "both" else [args.shape]
    args.workdir.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        result = run_shape(shape, args.workdir, args, assets)
        suffix = f"-{args.blocks}blocks" if args.blocks else ""
        if args.output is not None and args.output.suffix == ".json" and len(shapes) == 1:
            path = args.output
        else:
            folder = args.output or ROOT / "benchmarks" / "results"
            path = folder / f"scale-{shape}{suffix}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps({"shape": shape, "output": str(path), "error": result.get("error")}))
        if "error" in result:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
