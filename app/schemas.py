"""Typed job descriptions shared by the CLI, the REST API and the workers.

A :class:`JobSpec` is validated once, where it enters (CLI flags, JSON body), and every later stage trusts it.
``extra="forbid"`` everywhere: a misspelt field is an error, never silently ignored.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from secateurs.app.errors import InvalidSpecError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _json_number(value: object) -> str:
    """A number as JSON (or Python) would have spelt it: NaN, Infinity, -Infinity, else its repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def error_message(error: ErrorDetails) -> str:
    """One validation problem in words: pydantic's message, with non-finite numbers named as such."""
    if error["type"] == "finite_number":
        return f"{_json_number(error.get('input'))} is not a finite number (NaN and ±Infinity are never accepted)"
    if error["type"] == "string_unicode":
        return "not valid Unicode text (a lone surrogate escape such as \\ud800 names no character)"
    return str(error["msg"]).removeprefix("Value error, ")


def describe_validation_error(exc: ValidationError, label: Callable[[str], str | None] | None = None) -> str:
    """One line per problem, naming the field as the user wrote it: its dotted path (a REST body's, a batch file's),
    or what ``label`` gives for that path (the CLI: the option that set it, e.g. ``--eval-windows``)."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        field = (label(field) if label is not None and field else None) or field
        message = error_message(error)
        lines.append(message if not field or message.startswith(field) else f"{field}: {message}")
    return "; ".join(lines)


_CONTROL_NAMES = {0: "NUL", 9: "TAB", 10: "LF, a newline", 13: "CR", 27: "ESC", 127: "DEL"}


def plain_text(value: str) -> str:
    """``value`` unchanged if it holds no control character (C0, DEL, C1) and no lone surrogate.

    No path, name or id needs one, and each breaks something downstream: a NUL every file-system call and every
    PostgreSQL text column, a lone surrogate every UTF-8 encoder, a newline the logs.
    """
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category in ("Cc", "Cs"):
            code = ord(char)
            name = _CONTROL_NAMES.get(code, "a lone surrogate" if category == "Cs" else "a control character")
            raise ValueError(
                f"contains U+{code:04X} ({name}) at character {index + 1}: paths, names and ids must be plain text"
            )
    return value


PlainStr = Annotated[str, AfterValidator(plain_text)]
"""A string with no control characters: every path, name and id of a job spec."""


class Method(StrEnum):
    """How weights are chosen and updated."""

    SPARSEGPT = "sparsegpt"  # Frantar & Alistarh 2023: OBS mask selection + error compensation
    WANDA = "wanda"  # Sun et al. 2023: |W| * ||X||, no update
    MAGNITUDE = "magnitude"  # |W|, no calibration


def parse_pattern(text: str) -> tuple[int, int] | float:
    """``"N:M"`` -> ``(N, M)``; a ratio like ``"0.5"`` -> ``0.5``.

    Convention (as in the papers and in NVIDIA's "2:4"): ``N:M`` means *at most N non-zeros in every group of M
    consecutive input weights*, so ``2:4`` keeps 2 and prunes 2. A ratio is the fraction of weights *pruned*.
    Raises :class:`InvalidSpecError` with what to write instead.
    """
    match = _NM.match(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise InvalidSpecError(
                f"pattern {text!r} is not a valid N:M pattern: N must satisfy 0 < N < M",
                hint="N is how many weights are kept in every group of M, e.g. 2:4 or 4:8",
            )
        return n, m
    try:
        ratio = float(text)
    except ValueError:
        raise InvalidSpecError(
            f"pattern {text!r} is neither N:M nor a ratio",
            hint="write N:M (e.g. 2:4) or the fraction of weights to prune (e.g. 0.5)",
        ) from None
    if not math.isfinite(ratio):
        raise InvalidSpecError(
            f"pattern {text!r} is not a finite number",
            hint="write N:M (e.g. 2:4) or the fraction of weights to prune (e.g. 0.5)",
        )
    if not 0.0 < ratio < 1.0:
        raise InvalidSpecError(
            f"pattern {text!r}: an unstructured sparsity ratio must lie strictly between 0 and 1",
            hint="e.g. 0.5 prunes half of every layer's weights; for 2:4 write 2:4",
        )
    return ratio


def _normalize_pattern(text: str) -> str:
    parsed = parse_pattern(text)
    return f"{parsed[0]}:{parsed[1]}" if isinstance(parsed, tuple) else repr(parsed)


PatternStr = Annotated[
    str,
    AfterValidator(plain_text),
    AfterValidator(_normalize_pattern),
    Field(description="'N:M' (keep at most N of every M consecutive weights, e.g. '2:4') or a ratio in (0, 1)."),
]

DeviceStr = Annotated[
    str,
    Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."),
]


class TextSource(BaseModel):
    """Where text comes from: a local file (read as exact UTF-8 bytes) or a Hugging Face dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: PlainStr | None = Field(
        default=None, min_length=1, max_length=4096, description="Path of a UTF-8 text file, read byte-exact."
    )
    dataset: PlainStr | None = Field(
        default=None, min_length=1, max_length=256, description="Hugging Face dataset name, e.g. 'Salesforce/wikitext'."
    )
    dataset_config: PlainStr | None = Field(
        default=None, max_length=256, description="Dataset configuration, e.g. 'wikitext-2-raw-v1'."
    )
    split: PlainStr = Field(default="test", min_length=1, max_length=256, description="Dataset split.")
    text_field: PlainStr = Field(default="text", min_length=1, max_length=256, description="Column holding the text.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.file is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'file' or 'dataset'")
        return self

    def describe(self) -> str:
        if self.file is not None:
            return self.file
        return f"{self.dataset}/{self.dataset_config or ''}:{self.split}"


class JobSpec(BaseModel):
    """One pruning job: which model, how to prune it, how to measure it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    model: PlainStr = Field(
        min_length=1,
        max_length=4096,
        description="Hugging Face hub id (org/name), a local folder with config.json and *.safetensors, "
        "or upload:<id> (service only).",
    )
    revision: PlainStr | None = Field(
        default=None, min_length=1, max_length=256, description="Hub revision (branch, tag or commit)."
    )
    method: Method = Method.SPARSEGPT
    pattern: PatternStr = "2:4"
    calibration: TextSource | None = Field(
        default=None, description="Calibration text; required by sparsegpt and wanda."
    )
    calibration_samples: int = Field(default=128, ge=1, le=65536)
    calibration_seqlen: int = Field(default=2048, ge=2, le=131072)
    calibration_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Samples per forward call. None: all at once, pruning inside a single pass per block "
        "(fastest; needs memory for the whole calibration batch's activations of one block). A number: "
        "chunked, two passes per block (dense statistics, then pruned outputs) in bounded memory.",
    )
    calibration_precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="Precision of the calibration forward's matrix products. fp32: strict. bf16: bf16 "
        "autocast for each block's calibration forward (faster on CPUs with AVX512-BF16/AMX and on GPUs), "
        "while Hessians, factorizations and the solve stay fp32; perplexity differs slightly.",
    )
    seed: int = Field(default=0, description="Seeds the choice of calibration windows.")
    evaluation: TextSource | None = Field(default=None, description="Perplexity text; None skips evaluation.")
    eval_seqlen: int = Field(default=2048, ge=2, le=131072)
    eval_windows: int | None = Field(default=None, ge=1, description="First K windows; None evaluates all.")
    eval_batch_size: int = Field(default=8, ge=1, le=4096)
    bos: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Put the tokenizer's BOS at the start of every calibration and evaluation window. "
        "'auto' does so when the tokenizer adds one by itself (e.g. Gemma).",
    )
    device: DeviceStr = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Compute and output dtype; 'auto' is float32 on CPU, bfloat16 on CUDA."
    )
    exclude: tuple[Annotated[PlainStr, Field(min_length=1, max_length=512)], ...] = Field(
        default=(),
        description="fnmatch patterns of linear-layer names to leave dense, e.g. '*.down_proj' or "
        "'model.layers.0.*'. Embeddings and lm_head are never pruned.",
    )
    blocksize: int = Field(default=128, ge=1, le=65536, description="SparseGPT lazy-update block size.")
    dampening: float = Field(default=0.01, gt=0, lt=10, description="λ as a fraction of mean(diag H).")
    refine_iterations: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="After the mask is chosen, re-solve each layer's kept weights by this many conjugate-"
        "gradient steps (sparsegpt and wanda): lower reconstruction error for extra time. 0: off; 20 gave "
        "perplexity 110.9 -> ~100 on SmolLM2-135M under P-CPU (docs/engine.md).",
    )
    measure_speed: bool | None = Field(
        default=None,
        description="Measure dense versus 2:4 sparse speed (per linear shape and end to end) after pruning; the "
        "report then leads with the greedy-decode speedup. None: on (a short sweep on CPU, about a minute for "
        "SmolLM2); false: off, and the report says 'not measured' with that reason.",
    )

    dense_cache: bool = Field(
        default=True,
        description="Reuse the dense perplexity an earlier job computed on the same model bytes, evaluation "
        "tokens, dtype and device type (and store this job's for later ones). false: always compute it.",
    )
    dense_target: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="sparsegpt, one pass: move each layer toward reproducing the dense model's outputs from "
        "the pruned model's inputs before its mask is chosen, by this fraction of the least-squares step "
        "(0: off). Corrects the error of earlier pruned blocks; about twice the prune time and ~0.5 GB more "
        "memory. 0.5 gave perplexity 110.9 -> ~99 on SmolLM2-135M under P-CPU (docs/engine.md).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.method is not Method.MAGNITUDE and self.calibration is None:
            raise ValueError(
                f"method {self.method.value!r} needs calibration text: give a calibration file or dataset "
                "(--calibration-file / --calibration-dataset on the command line)"
            )
        if self.method is Method.MAGNITUDE and self.refine_iterations:
            raise ValueError(
                "refine_iterations re-solves against calibration statistics, which magnitude pruning has none "
                "of: use method sparsegpt or wanda, or set refine_iterations to 0"
            )
        if self.dense_target and (self.method is not Method.SPARSEGPT or self.calibration_batch_size is not None):
            raise ValueError(
                "dense_target needs method sparsegpt with the whole calibration set in one pass: use method "
                "sparsegpt without calibration_batch_size (--calibration-batch-size), or set dense_target to 0"
            )
        parsed = parse_pattern(self.pattern)
        if isinstance(parsed, tuple) and self.method is Method.SPARSEGPT and self.blocksize % parsed[1]:
            raise ValueError(
                f"blocksize {self.blocksize} must be a multiple of M={parsed[1]} "
                f"(e.g. {parsed[1] * (128 // parsed[1])})"
            )
        return self

    @property
    def parsed_pattern(self) -> tuple[int, int] | float:
        return parse_pattern(self.pattern)


# --- What a job produces ----------------------------------------------------------------------------------


class Stage(StrEnum):
    LOAD = "load"
    CALIBRATE = "calibrate"
    EVALUATE_DENSE = "evaluate_dense"
    PRUNE = "prune"
    EVALUATE_PRUNED = "evaluate_pruned"
    MEASURE_SPEED = "measure_speed"
    SAVE = "save"
    DONE = "done"


class LayerReport(BaseModel):
    """One linear layer after pruning. ``error`` = ||(W − Ŵ)X||² / ||WX||² on its calibration inputs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: tuple[int, int] = Field(description="(out_features, in_features)")
    sparsity: float = Field(description="Fraction of exact zeros.")
    error: float | None = Field(description="Relative reconstruction error; null without calibration data.")
    shares_input_with: list[str] = Field(default_factory=list, description="Layers that reuse its Hessian.")
    dampening: float | None = Field(default=None, description="Dampening that factored its Hessian (SparseGPT).")
    skipped: str | None = Field(default=None, description="Why the layer was left dense, if it was.")


class ProgressEvent(BaseModel):
    """Emitted by the pipeline as it goes: one per stage change and one per pruned block."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage
    message: str
    block: int | None = Field(default=None, description="1-based index of the block just pruned.")
    blocks: int | None = None
    seconds: float | None = Field(default=None, description="Seconds the block (or stage) took.")
    layers: list[LayerReport] | None = None


class PerplexityProtocol(BaseModel):
    model_config = ConfigDict(extra="forbid")

    convention: str = Field(
        default="non-overlapping windows of the whole-text token stream, tail dropped, exp(mean NLL)",
    )
    text: str = Field(description="Where the text came from.")
    text_sha256: str
    text_tokens: int = Field(description="Tokens in the whole text (add_special_tokens=False).")
    window: int
    windows: int
    predicted_tokens: int
    bos: bool = Field(description="Whether every window started with the BOS token.")
    batch_size: int


class DenseCacheHit(BaseModel):
    """Where a dense perplexity read from the cache was computed (``secateurs.workers.dense_cache``)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="sha256 naming the entry: model bytes, evaluation tokens, protocol, dtype, device.")
    job_id: str | None = Field(default=None, description="The service job that computed it, when one did.")
    output: str | None = Field(default=None, description="The output folder of the run that computed it.")
    created_at: str = Field(description="When it was computed (ISO 8601, UTC).")
    seconds: float | None = Field(default=None, description="How long computing it took then.")
    batch_size: int | None = Field(default=None, description="The evaluation batch size then (not in the key).")

    def source(self) -> str:
        """``job <id>``, else the output folder, with when: who computed the figure, in words."""
        who = f"job {self.job_id}" if self.job_id else (self.output or "an earlier run")
        return f"{who}, {self.created_at}"


class PerplexityReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dense: float | None
    pruned: float | None
    protocol: PerplexityProtocol | None
    dense_cached: DenseCacheHit | None = Field(
        default=None,
        description="Set when the dense figure was read from the dense-perplexity cache instead of computed: "
        "which job (or output folder) computed it, and when. Null: computed by this job (or not at all).",
    )


class SparsityReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    method: Method
    verified: bool = Field(description="Every pruned layer satisfies the pattern (checked on the saved weights).")
    layers_pruned: int
    layers_skipped: int
    pruned_fraction: float = Field(description="Zeros / weights over the pruned layers.")
    model_fraction: float = Field(description="Zeros in pruned layers / all parameters of the model.")


class CalibrationReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None
    sha256: str | None
    samples: int
    seqlen: int
    seed: int
    text_tokens: int | None
    bos: bool
    batch_size: int | None
    precision: Literal["fp32", "bf16"] = "fp32"


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_seconds: float
    data_seconds: float
    eval_dense_seconds: float | None
    prune_seconds: float
    eval_pruned_seconds: float | None
    save_seconds: float
    total_seconds: float


class MemoryReport(BaseModel):
    """Peak memory of the job, measured (not estimated)."""

    model_config = ConfigDict(extra="forbid")

    peak_rss_bytes: int | None = Field(
        description="Peak resident memory of the process that ran the job, from the job's start (Linux VmHWM, reset"
        " when the job starts; null where /proc is not available)."
    )
    peak_rss_source: str = Field(description="How peak_rss_bytes was measured.")
    peak_device_bytes: int | None = Field(
        default=None,
        description="CUDA jobs: torch.cuda.max_memory_allocated over the job (peak of tensors on the GPU; the"
        " caching allocator may hold more). Null on CPU.",
    )
    peak_rss_by_stage: dict[Stage, int] | None = Field(
        default=None,
        description="Peak resident memory of each stage of the job (VmHWM reset as each stage starts): load (model"
        " and tokenizer), calibrate (texts read and tokenized), evaluate_dense, prune (the checkpoint and its packed"
        " copy written as the blocks are done), evaluate_pruned, measure_speed. peak_rss_bytes is the largest. Null"
        " where the peak cannot be reset.",
    )


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str
    revision: str | None
    architecture: str
    model_type: str
    parameters: int
    decoder_blocks: int
    dtype: str


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secateurs: str
    python: str
    torch: str
    transformers: str
    platform: str
    device: str
    device_name: str
    threads: int
    cuda: str | None
    cpu_capability: str | None = Field(
        default=None,
        description="The SIMD level of PyTorch's CPU kernels on this machine (torch.backends.cpu.get_cpu_capability():"
        " AVX2, AVX512, ...).",
    )
    cpu_products: dict[str, str] | None = Field(
        default=None,
        description="CPU jobs: which library computed the fp32 products of pruning and evaluation, measured on this"
        " machine at first use ('linear': the layers' forward; 'gram': the Hessians): 'oneDNN' or 'F.linear'.",
    )
    cpu_sweep: str | None = Field(
        default=None,
        description="CPU jobs: which implementation ran SparseGPT's N:M column sweep: the C++ one built on this"
        " machine, or the PyTorch reference (and why).",
    )


class PackedLayer(BaseModel):
    """One pruned linear's weight: bytes stored densely (zeros included) and packed (values + positions)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tensor name in the checkpoint.")
    shape: tuple[int, int] = Field(description="(out_features, in_features)")
    dense_bytes: int
    packed_bytes: int
    ratio: float = Field(description="packed_bytes / dense_bytes (2:4: 0.5625 in 16-bit, 0.53125 in fp32).")


class PackedReport(BaseModel):
    """The packed copy of the checkpoint (``packed/``: values + 2-bit positions per kept weight for 2:4)."""

    model_config = ConfigDict(extra="forbid")

    written: bool
    reason: str | None = Field(default=None, description="Why no packed copy was written.")
    path: str | None = Field(default=None, description="Folder, relative to the output folder.")
    format: str | None = None
    pattern: str | None = None
    index_bits: int | None = Field(default=None, description="Bits per stored position.")
    dtypes: list[str] = Field(default_factory=list)
    layers: list[PackedLayer] = Field(default_factory=list)
    layers_dense_bytes: int = 0
    layers_packed_bytes: int = 0
    layers_ratio: float | None = Field(default=None, description="Over the packed layers.")
    checkpoint_dense_bytes: int | None = Field(default=None, description="Every tensor of the plain checkpoint.")
    checkpoint_packed_bytes: int | None = Field(default=None, description="Every tensor of the packed file.")
    checkpoint_ratio: float | None = None
    file_bytes: int | None = Field(default=None, description="Size of the packed safetensors file.")
    seconds: float | None = None


class TimingStats(BaseModel):
    """``repetitions`` timed calls after ``warmup`` untimed ones; ``rotation`` distinct input copies in turn."""

    model_config = ConfigDict(extra="forbid")

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    warmup: int
    repetitions: int
    rotation: int
    timer: str = Field(description="'cuda_events' or 'perf_counter'.")


SpeedStatus = Literal["measured", "failed", "error", "unavailable", "skipped"]


class SpeedPathInfo(BaseModel):
    """A sparse execution path of the registry and whether it runs on this device."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    hardware: bool = Field(description="Runs on 2:4 sparse tensor cores.")
    available: bool
    reason: str | None


class SpeedPathResult(BaseModel):
    """One path at one point. ``failed``: its output did not match dense-with-zeros, so it was never timed."""

    model_config = ConfigDict(extra="forbid")

    path: str
    status: SpeedStatus
    reason: str | None = None
    timing: TimingStats | None = None
    speedup: float | None = Field(default=None, description="Dense median / this path's median.")
    fraction_of_limit: float | None = Field(default=None, description="speedup / physical_limit.")
    tokens_per_second: float | None = None
    kernels: list[str] | None = Field(
        default=None,
        description="End to end: what this path's packed layers ran on their last call (a kernel's name or "
        "'reference'), most layers first.",
    )


class LinearSpeed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: tuple[int, int] = Field(description="(out_features, in_features)")
    layers: int = Field(description="Pruned linears of the model with this shape.")
    tokens: int
    dense: TimingStats
    dense_tflops: float
    physical_limit: float = Field(description="Upper bound on the sparse speedup at this point.")
    limit_basis: str
    paths: list[SpeedPathResult]


class EndToEndSpeed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["prefill", "decode"]
    batch: int
    prompt_tokens: int
    new_tokens: int = Field(description="Decode steps timed (0 for prefill).")
    status: Literal["measured", "skipped"]
    reason: str | None = None
    dense: TimingStats | None = None
    dense_tokens_per_second: float | None = None
    physical_limit: float | None = None
    limit_basis: str | None = None
    paths: list[SpeedPathResult] = Field(default_factory=list)


class SpeedConditions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str
    device_name: str
    compute_capability: str | None
    cuda: str | None
    driver: str | None
    driver_cuda: str | None
    cusparselt: str | None
    torch: str
    threads: int
    sparse_hardware: bool = Field(description="The device has 2:4 sparse tensor cores.")
    sparse_hardware_note: str
    isa: str | None = Field(default=None, description="The CPU's vector instruction sets (CPU only).")
    load_average: list[float] | None = Field(
        default=None, description="1, 5 and 15-minute load average when the step began (others' work skews timings)."
    )


class SpeedReport(BaseModel):
    """Measured dense versus sparse speed; only measured figures, each with its conditions."""

    model_config = ConfigDict(extra="forbid")

    conditions: SpeedConditions
    dtype: str
    pattern: str
    runtime_mode: str = Field(description="Both sides run in this mode (e.g. 'eager').")
    settings: dict[str, Any]
    paths: list[SpeedPathInfo]
    linear: list[LinearSpeed]
    end_to_end: list[EndToEndSpeed]
    notes: list[str] = Field(default_factory=list)
    seconds: float | None = None


class DecodeSpeedup(BaseModel):
    """What a report leads with: the measured end-to-end greedy-decode speedup of the pruned model (its sparse
    path versus dense, same process, same threads, same dtype, both eager) and its conditions, or why it was not
    measured. Only measured figures; the full measurement is ``Report.speed``."""

    model_config = ConfigDict(extra="forbid")

    measured: bool
    reason: str | None = Field(default=None, description="Why there is no figure (when measured is false).")
    speedup: float | None = Field(default=None, description="Sparse tokens/s over dense tokens/s (medians).")
    dense_tokens_per_second: float | None = None
    sparse_tokens_per_second: float | None = None
    path: str | None = Field(default=None, description="The sparse path measured: the fastest that ran.")
    kernels: list[str] = Field(
        default_factory=list,
        description="What the packed layers ran on their last decode step (a kernel's name or 'reference').",
    )
    kernel_details: list[str] = Field(
        default_factory=list, description="Each kernel's own description (instruction set, threads, hand-over)."
    )
    batch: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = Field(default=None, description="Decode steps timed per repetition.")
    repetitions: int | None = None
    device: str | None = None
    device_name: str | None = None
    isa: str | None = Field(default=None, description="The CPU's vector instruction sets (CPU only).")
    threads: int | None = None
    dtype: str | None = None
    torch: str | None = None
    load_average: list[float] | None = Field(default=None, description="1, 5, 15-minute load average at the start.")

    def summary(self) -> str:
        """One line: the speedup with its conditions, or why there is none."""
        if not self.measured or self.speedup is None:
            return f"not measured: {self.reason or 'no reason recorded'}"
        ran = f" -> {', '.join(self.kernels)}" if self.kernels else ""
        where = (self.device_name or self.device or "?") + (f" ({self.isa})" if self.isa else "")
        return (
            f"{self.speedup:.2f}x dense (sparse {self.sparse_tokens_per_second or 0:.1f} vs dense "
            f"{self.dense_tokens_per_second or 0:.1f} tokens/s; greedy decode, batch {self.batch}, "
            f"{self.prompt_tokens} + {self.new_tokens} tokens, median of {self.repetitions}; path {self.path}{ran}; "
            f"{where}, {self.threads} threads, {self.dtype}"
            + (f", load average {self.load_average[0]:.1f}" if self.load_average else "")
            + ")"
        )


class Report(BaseModel):
    """``report.json``: what a job cost (perplexity) and what it did, with the conditions of every number."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal["secateurs.report/1"] = "secateurs.report/1"
    decode: DecodeSpeedup | None = Field(
        default=None,
        description="The measured greedy-decode speedup and its conditions, or why it was not measured (absent "
        "from reports written before it existed).",
    )
    created_at: str
    spec: JobSpec
    model: ModelInfo
    perplexity: PerplexityReport
    sparsity: SparsityReport
    layers: list[LayerReport]
    calibration: CalibrationReport
    timings: Timings
    memory: MemoryReport | None = Field(
        default=None, description="Peak memory of the job (absent from reports written before it existed)."
    )
    environment: Environment
    packed: PackedReport | None = Field(default=None, description="The packed N:M copy in packed/ and its size.")
    speed: SpeedReport | None = Field(
        default=None, description="Measured dense versus sparse speed; null when not measured (``decode.reason``)."
    )


class BenchSpread(BaseModel):
    """Median and spread of repeated measurements."""

    model_config = ConfigDict(extra="forbid")

    median: float
    q1: float
    q3: float
    min: float
    max: float


class BenchSide(BaseModel):
    """One of the two models ``secateurs bench`` runs."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="What was loaded: the HF folder (dense with zeros) or the packed folder.")
    load_seconds: float
    decode_tokens_per_second: BenchSpread = Field(description="Decode tokens/s over the batch, prefill excluded.")
    prefill_ms: BenchSpread = Field(description="From the generate call to the first generated token.")
    paths: dict[str, int] = Field(
        default_factory=dict,
        description="Packed model: what its PackedLinear layers ran on their last call (path -> layers).",
    )


class BenchConditions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str
    device_name: str
    isa: str | None = Field(description="The CPU's vector instruction sets (CPU only).")
    threads: int
    dtype: str
    torch: str
    transformers: str
    load_average: list[float] | None = Field(description="1, 5 and 15-minute load average before the runs.")
    prompt: str = Field(description="Where the prompt tokens came from: a fixed text and its tokenizer, or random ids.")
    batch: int
    prompt_tokens: int
    new_tokens: int = Field(description="Generated per row and run; decode is timed over new_tokens - 1 steps.")
    warmup: int
    repetitions: int
    timer: str


class BenchReport(BaseModel):
    """What ``secateurs bench`` measured: the same greedy generation through the dense and the packed model."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["secateurs.bench/1"] = "secateurs.bench/1"
    folder: str
    speedup: float = Field(description="Packed decode tokens/s over dense decode tokens/s (medians).")
    tokens_agree: bool = Field(description="Both models generated exactly the same tokens (first timed run).")
    matching_tokens: int = Field(description="Per row, generated tokens before its first difference, summed.")
    total_tokens: int
    first_difference: int | None = Field(description="Earliest generated position where some row differs.")
    dense: BenchSide
    packed: BenchSide
    conditions: BenchConditions
    kernel_details: list[str] = Field(default_factory=list, description="Each registered kernel's description.")
    notes: list[str] = Field(default_factory=list)


# --- The service: jobs as the REST API, the store and the batch CLI see them ---------------------------------


class JobState(StrEnum):
    """``queued → running → succeeded | failed | cancelled``; a dead worker's job goes back to ``queued``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobProgress(BaseModel):
    """Where a running job is: its stage, the block just pruned, and an ETA from the blocks' pace."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage | None = None
    message: str = ""
    block: int | None = Field(default=None, description="Blocks pruned so far.")
    blocks: int | None = Field(default=None, description="Decoder blocks in the model.")
    layers: list[str] = Field(default_factory=list, description="Layers of the block just pruned.")
    worst_layer_error: float | None = Field(default=None, description="Largest relative error in that block.")
    eta_seconds: float | None = Field(default=None, description="Seconds left for pruning, from the pace so far.")


class JobError(BaseModel):
    """Why a job failed: ``type`` is the error's code, ``hint`` what to change."""

    model_config = ConfigDict(extra="forbid")

    type: str
    message: str
    hint: str | None = None


class JobResult(BaseModel):
    """The headline of a succeeded job's report (the whole report is at ``/v1/jobs/{id}/report``)."""

    model_config = ConfigDict(extra="forbid")

    decode: DecodeSpeedup | None = Field(
        default=None, description="The measured greedy-decode speedup and its conditions, or why there is none."
    )
    perplexity_dense: float | None
    perplexity_pruned: float | None
    perplexity_dense_cached_from: str | None = Field(
        default=None,
        description="When the dense figure came from the dense-perplexity cache: who computed it (job id, or "
        "output folder) and when.",
    )
    sparsity_verified: bool
    pruned_fraction: float
    prune_seconds: float
    total_seconds: float
    device: str
    packed_ratio: float | None = Field(
        default=None, description="Packed checkpoint bytes / plain checkpoint bytes (packed/), when written."
    )


class Job(BaseModel):
    """A job as stored and served; the row in the job store is its source of truth."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="'job_' + time-ordered hex; sorts by creation.")
    object: Literal["job"] = "job"
    state: JobState
    spec: JobSpec
    attempts: int = Field(description="Times a worker claimed it (2 after a worker died mid-job).")
    max_attempts: int
    worker: str | None = Field(description="The worker that claimed it last (hostname:pid).")
    cancel_requested: bool
    progress: JobProgress | None
    result: JobResult | None
    error: JobError | None
    idempotency_key: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None


class JobPage(BaseModel):
    """One page of ``GET /v1/jobs``, newest first; pass ``next_after`` as ``after`` for the next page."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    next_after: str | None


class JobEvent(BaseModel):
    """One Server-Sent Event of ``GET /v1/jobs/{id}/events``: ``id`` is its sequence number in the job."""

    model_config = ConfigDict(extra="forbid")

    id: int
    job_id: str
    type: Literal["state", "progress"]
    state: JobState
    progress: JobProgress | None = None
    error: JobError | None = None
    created_at: str


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Relative to the job's output folder; GET .../artifacts/{path} downloads it.")
    size: int


class ArtifactList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = "list"
    data: list[Artifact]
    archive: str = Field(description="URL path of these files as one streamed .tar archive.")
    size: int = Field(default=0, description="Bytes of the listed files together.")
    parts: list[Literal["dense", "packed", "report"]] = Field(
        default_factory=list,
        description="The parts listed (dense: the HF checkpoint; packed: packed/; report: report.json); "
        "empty: the whole folder.",
    )


class Upload(BaseModel):
    """An uploaded model archive or text file; use ``upload:<id>`` as a job's model or text file."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Literal["model", "text"]
    size: int
    sha256: str
    created_at: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: ``{"error": {"type", "message", "hint"}}``."""

    model_config = ConfigDict(extra="forbid")

    error: JobError
