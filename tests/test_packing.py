"""The packed N:M format: bit-exact round trips, size accounting, refusals, the sparse module, and the packed/
folder that run_job writes and `secateurs unpack` turns back into the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from secateurs.app.schemas import JobSpec, Report
from secateurs.kernels import patterns
from secateurs.kernels.measure.speed import mismatch
from secateurs.kernels.patterns import nm_prune_mask
from secateurs.kernels.sparse import packing
from secateurs.kernels.sparse.packing import (
    KernelDescription,
    PackedLinear,
    PackedWeight,
    PackingError,
    describe_packed_kernels,
    iter_packed_linears,
    pack_bits,
    pack_nm,
    packed_nbytes,
    register_packed_kernel,
    unpack_bits,
    unpack_nm,
    unregister_packed_kernel,
)
from secateurs.workers.cli import cli
from secateurs.workers.packed import MANIFEST_NAME, PACKED_FILE, load_dense_model, load_sparse_model
from secateurs.workers.pipeline import run_job
from tests.conftest import TinyDir

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {2: torch.int16, 4: torch.int32}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bit equality (-0.0 != +0.0, NaN == NaN)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()])


def nm_weight(shape: tuple[int, int], n: int, m: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random N:M weight [out, in] with a few awkward groups: all zeros, fewer than N kept, a kept -0.0."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    weight = weight.masked_fill(nm_prune_mask(weight.abs(), n, m), 0.0).to(dtype)
    weight[0, :m] = 0.0  # a group with nothing kept
    weight[-1, m : 2 * m] = 0.0
    weight[-1, m] = 3.0  # fewer than N kept (N > 1)
    kept = int(weight[1].nonzero()[0])
    weight[1, kept] = -0.0  # a kept value that is negative zero
    return weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "n", "m"),
    [((8, 16), 2, 4), ((64, 256), 2, 4), ((192, 576), 2, 4), ((12, 20), 2, 4), ((16, 32), 1, 4), ((16, 64), 4, 8),
     ((8, 48), 1, 2), ((8, 64), 8, 16), ((8, 24), 3, 8)],
)  # fmt: skip
def test_pack_unpack_is_bit_exact(dtype: torch.dtype, shape: tuple[int, int], n: int, m: int) -> None:
    weight = nm_weight(shape, n, m, dtype)
    packed = pack_nm(weight, n, m)
    assert packed.values.dtype == dtype and packed.indices.dtype == torch.uint8
    assert packed.values.shape == (shape[0], shape[1] * n // m)
    assert torch.equal(bits(unpack_nm(packed)), bits(weight))


def test_the_same_weight_always_packs_to_the_same_bytes() -> None:
    weight = nm_weight((32, 64), 2, 4, torch.bfloat16)
    a, b = pack_nm(weight), pack_nm(weight.clone())
    assert torch.equal(bits(a.values), bits(b.values)) and torch.equal(a.indices, b.indices)


def test_packing_a_slice_of_rows_at_a_time_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing walks the rows in slices (temporaries of a slice, not of the weight): slices of 3 rows, the last one
    short, give the bytes of one pass, and a refusal found in a late slice still counts the whole weight."""
    weight = nm_weight((11, 64), 2, 4, torch.float32)
    whole = pack_nm(weight)
    monkeypatch.setattr(patterns, "_CHUNK_ELEMENTS", 3 * 64)
    sliced = pack_nm(weight)
    assert torch.equal(bits(sliced.values), bits(whole.values)) and torch.equal(sliced.indices, whole.indices)
    weight[6, 0:4] = 1.0  # found in the third slice (rows 6..8)
    weight[10, 60:64] = 1.0  # in the last one, never reached: still counted
    with pytest.raises(PackingError, match=r"2 of 176 groups .* row 6, columns 0\.\.3 hold 4"):
        pack_nm(weight)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 7, 8, 33])
def test_bit_packing_round_trips(width: int, k: int) -> None:
    codes = torch.randint(0, 1 << width, (5, k), dtype=torch.uint8)
    packed = pack_bits(codes, width)
    assert packed.shape == (5, -(-k * width // 8))
    assert torch.equal(unpack_bits(packed, width, k), codes)


@pytest.mark.parametrize(
    ("dtype", "ratio"), [(torch.float16, 0.5625), (torch.bfloat16, 0.5625), (torch.float32, 0.53125)]
)
def test_2_4_sizes(dtype: torch.dtype, ratio: float) -> None:
    """Half the values plus 2 bits per kept value: 9/16 of the dense bytes in 16-bit, 17/32 in fp32."""
    for shape in [(64, 256), (4096, 4096), (11008, 4096)]:
        assert packed_nbytes(shape, 2, 4, torch.empty((), dtype=dtype).element_size()) == ratio * shape[0] * shape[
            1
        ] * (torch.empty((), dtype=dtype).element_size())
    packed = pack_nm(nm_weight((64, 256), 2, 4, dtype), 2, 4)
    assert packed.nbytes == packed.values.nbytes + packed.indices.nbytes
    assert packed.nbytes / packed.dense_nbytes == ratio
    assert packed.indices.numel() == 64 * 256 // 8  # 2 bits for each of the 128 kept values per row


def test_a_weight_that_is_not_n_m_is_refused_with_its_name_and_the_rule() -> None:
    weight = nm_weight((8, 16), 2, 4, torch.float32)
    weight[3, 4:8] = 1.0
    with pytest.raises(PackingError) as info:
        pack_nm(weight, 2, 4, name="model.layers.0.mlp.up_proj.weight")
    message = str(info.value)
    assert "model.layers.0.mlp.up_proj.weight (8, 16) is not 2:4 sparse" in message
    assert "row 3, columns 4..7 hold 4" in message and "at most 2 non-zeros in every group of 4" in message


@pytest.mark.parametrize(
    ("weight", "n", "m", "message"),
    [
        (torch.zeros(8, 10), 2, 4, "10 input columns is not a multiple of M=4"),
        (torch.zeros(8, 64), 2, 32, "2 <= M <= 16"),
        (torch.zeros(16), 2, 4, "only 2-D [out, in] weights"),
        (torch.zeros(8, 16), 4, 4, "0 < N < M"),
    ],
)
def test_shapes_and_patterns_the_format_cannot_hold_are_refused(
    weight: torch.Tensor, n: int, m: int, message: str
) -> None:
    with pytest.raises(PackingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pack_nm(weight, n, m, name="w")


def test_negative_zero_in_a_pruned_position_is_refused_rather_than_changed() -> None:
    weight = torch.tensor([[1.0, 2.0, -0.0, 0.0]])
    with pytest.raises(PackingError, match=r"-0\.0 in pruned positions"):
        pack_nm(weight, 2, 4, name="w")


def test_corrupt_positions_are_detected() -> None:
    packed = pack_nm(nm_weight((4, 16), 2, 4, torch.float32))
    corrupt = PackedWeight(packed.values, torch.zeros_like(packed.indices), packed.shape, 2, 4)  # positions 0, 0
    with pytest.raises(PackingError, match="corrupt"):
        unpack_nm(corrupt)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_linear_computes_what_the_dense_layer_computes(dtype: torch.dtype) -> None:
    weight, bias = nm_weight((32, 64), 2, 4, dtype), torch.randn(32).to(dtype)
    layer = PackedLinear.from_dense(weight, bias)
    x = torch.randn(3, 5, 64).to(dtype)
    assert mismatch(layer(x), F.linear(x, weight, bias)) is None  # a CPU kernel: the same sums, in its order
    layer.use_kernels = False  # the reference forward: decompress, then the same F.linear, so bit for bit
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=0, atol=0)
    assert layer.values.numel() + layer.indices.numel() < weight.numel()  # it holds the packed form, not W


@pytest.mark.parametrize("tokens", [1, 40])
def test_packed_linear_names_its_width_when_the_input_does_not_fit(tokens: int) -> None:
    layer = PackedLinear.from_dense(nm_weight((8, 64), 2, 4, torch.float32))
    with pytest.raises(ValueError, match=r"in_features=64.*width 60|width 60.*in_features = 64"):
        layer(torch.randn(tokens, 60))
    with pytest.raises(ValueError, match=r"no last dimension \(shape \(\)\).*in_features = 64"):
        layer(torch.tensor(1.0))  # a 0-d input: named, not an IndexError from inside a kernel's checks


def test_packed_linear_offers_inputs_to_registered_kernels_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "_KERNELS", {})  # only this test's kernels (the CPU kernel registers on import)
    layer = PackedLinear.from_dense(nm_weight((8, 16), 2, 4, torch.float32))
    x = torch.randn(2, 16)
    seen: list[tuple[int, ...]] = []

    def declines(inp: torch.Tensor, module: PackedLinear) -> torch.Tensor | None:
        seen.append(tuple(inp.shape))
        return None

    def answers(inp: torch.Tensor, module: PackedLinear) -> torch.Tensor | None:
        return torch.full((inp.shape[0], module.out_features), 7.0)

    register_packed_kernel("declines", declines)
    try:
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight()))
        assert layer.last_path == "reference"
        register_packed_kernel("answers", answers, lambda: KernelDescription("answers", True, "sevens everywhere"))
        assert bool((layer(x) == 7.0).all())
        assert layer.last_path == "answers"
        described = {d.name: d for d in describe_packed_kernels()}
        assert described["answers"].detail == "sevens everywhere" and described["declines"].available
        layer.use_kernels = False
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight()))
        assert layer.last_path == "reference"
    finally:
        unregister_packed_kernel("declines")
        unregister_packed_kernel("answers")
    assert seen == [(2, 16), (2, 16)]


# --- The packed/ folder of a job ------------------------------------------------------------------------------


def _magnitude(model: Path, **changes: object) -> JobSpec:
    fields = {"model": str(model), "method": "magnitude", "device": "cpu", "dtype": "bfloat16", "measure_speed": False}
    return JobSpec(**{**fields, **changes})  # type: ignore[arg-type]


def _tensors_equal_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        for k in a
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_job_writes_packed_and_unpack_rebuilds_the_checkpoint_bit_for_bit(
    arch: str, tiny_dir: TinyDir, tmp_path: Path
) -> None:
    out, again = tmp_path / "out", tmp_path / "again"
    report = run_job(_magnitude(tiny_dir(arch)), output_dir=out)
    packed = report.packed
    assert packed is not None and packed.written and packed.path == "packed" and packed.pattern == "2:4"
    assert {p.name for p in (out / "packed").iterdir()} >= {PACKED_FILE, MANIFEST_NAME, "config.json", "tokenizer.json"}
    # Size accounting: every pruned layer at 9/16 of its bf16 bytes, totals that add up, stated in report.json.
    assert len(packed.layers) == report.sparsity.layers_pruned
    assert all(layer.ratio == 0.5625 and layer.packed_bytes * 16 == layer.dense_bytes * 9 for layer in packed.layers)
    assert packed.layers_packed_bytes == sum(layer.packed_bytes for layer in packed.layers)
    assert (
        packed.layers_ratio == 0.5625 and packed.checkpoint_ratio is not None and 0.5625 < packed.checkpoint_ratio < 1
    )
    assert Report.model_validate_json((out / "report.json").read_text()).packed == packed
    manifest = json.loads((out / "packed" / MANIFEST_NAME).read_text())
    assert manifest["format"] == "secateurs.packed/1" and manifest["pattern"] == "2:4" and manifest["index_bits"] == 2
    source = manifest["source"]["files"][0]
    assert source["name"] == "model.safetensors" and len(source["sha256"]) == 64
    assert manifest["tensors"][packed.layers[0].name]["packed"] is True

    result = CliRunner().invoke(cli, ["unpack", str(out / "packed"), "--output", str(again)])
    assert result.exit_code == 0, result.output
    assert _tensors_equal_bitwise(load_file(out / "model.safetensors"), load_file(again / "model.safetensors"))
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert "byte-identical" in result.output
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert AutoModelForCausalLM.from_pretrained(again) is not None


def test_both_loaders_give_the_pruned_model(tiny_dir: TinyDir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_job(_magnitude(tiny_dir("llama")), output_dir=out)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    dense, sparse = load_dense_model(out / "packed"), load_sparse_model(out / "packed")
    packed_names = {name for name, module in sparse.named_modules() if isinstance(module, PackedLinear)}
    assert len(packed_names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert not any(isinstance(m, PackedLinear) for m in dense.modules())
    ids = torch.randint(4, 128, (2, 24))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(dense(ids).logits, expected, rtol=0, atol=0)
        assert mismatch(sparse(ids).logits, expected) is None  # the packed kernels: the same sums, in their order
        for _, module in iter_packed_linears(sparse):
            module.use_kernels = False  # the reference forward decompresses: bit for bit
        torch.testing.assert_close(sparse(ids).logits, expected, rtol=0, atol=0)


def test_unstructured_jobs_say_why_no_packed_copy_exists(tiny_dir: TinyDir, tmp_path: Path) -> None:
    report = run_job(_magnitude(tiny_dir("llama"), pattern="0.5"), output_dir=tmp_path / "out")
    assert report.packed is not None and not report.packed.written
    assert "unstructured" in (report.packed.reason or "") and not (tmp_path / "out" / "packed").exists()


def test_unpack_refuses_damaged_or_foreign_folders(tiny_dir: TinyDir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_job(_magnitude(tiny_dir("llama")), output_dir=out)
    runner = CliRunner()
    result = runner.invoke(cli, ["unpack", str(out), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a packed secateurs folder" in " ".join(result.output.split())
    tensors = load_file(out / "packed" / PACKED_FILE)
    name = next(k for k in tensors if k.endswith("::values"))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 1
    save_file(tensors, str(out / "packed" / PACKED_FILE))
    result = runner.invoke(cli, ["unpack", str(out / "packed"), "--output", str(tmp_path / "y")])
    assert result.exit_code == 2 and "does not match the sha256" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "y").exists()
