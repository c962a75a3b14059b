"""``secateurs.load`` on the packed form: PackedLinear models equal to the dense pruned model, built without a dense
copy of any pruned weight (RSS in a subprocess), dtype conversion of the packed values, generation, tied
embeddings, which path ran, the fallback to the HF folder, and every kind of bad input named clearly."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import secateurs
from secateurs.app.errors import DeviceError, InvalidSpecError, ModelSourceError
from secateurs.app.schemas import JobSpec
from secateurs.kernels.sparse.packing import (
    PackedLinear,
    iter_packed_linears,
    only_packed_kernels,
    packed_kernels,
    register_packed_kernel,
    unregister_packed_kernel,
)
from secateurs.workers.packed import MANIFEST_NAME, PACKED_DIR, PACKED_FILE
from secateurs.workers.pipeline import run_job
from secateurs.workers.runtime import paths_that_ran
from tests.models import save_pruned_2of4, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
Pruned = Callable[[str], Path]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Pruned:
    """``pruned(arch)``: a tiny fp32 model pruned 2:4 by magnitude (HF folder + packed/), made once per module."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            source = tiny_model_dir(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
            out = tmp_path_factory.mktemp(f"pruned-{arch}") / "out"
            spec = JobSpec(model=str(source), method="magnitude", device="cpu", measure_speed=False)
            run_job(spec, output_dir=out)
            made[arch] = out
        return made[arch]

    return make


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _dense(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights stored transposed, tied embeddings
def test_load_builds_packed_linears_equal_to_the_dense_pruned_model(arch: str, pruned: Pruned) -> None:
    out = pruned(arch)
    model = secateurs.load(out, device="cpu")
    layers = dict(iter_packed_linears(model))
    manifest = json.loads((out / PACKED_DIR / MANIFEST_NAME).read_text())
    assert set(layers) == {name.removesuffix(".weight") for name, r in manifest["tensors"].items() if r["packed"]}
    assert len(layers) == (2 * 7 if arch == "llama" else 2 * 4)
    assert not model.training and model.secateurs_source.packed_layers == len(layers)  # type: ignore[attr-defined]
    assert model.secateurs_source.verified and model.secateurs_source.dtype == "float32"  # type: ignore[attr-defined]
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _dense(out)(ids).logits)
        assert set(paths_that_ran(model)) <= {*packed_kernels(), "reference"}  # the fastest that took each call
        with only_packed_kernels():
            torch.testing.assert_close(model(ids).logits, _dense(out)(ids).logits)
    assert set(paths_that_ran(model)) == {"reference"}


def test_generate_works_and_tied_embeddings_stay_tied(pruned: Pruned) -> None:
    out = pruned("gpt2")
    model = secateurs.load(out, device="cpu")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embeddings.weight
    ids = torch.tensor([[5, 17, 33, 9, 60, 61]])
    with torch.no_grad():
        packed = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        dense = _dense(out).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(packed, dense) and packed.shape == (1, 14)


def test_bfloat16_converts_the_packed_values_without_densifying(pruned: Pruned) -> None:
    out = pruned("llama")
    model = secateurs.load(out, device="cpu", dtype="bfloat16")
    layers = [layer for _name, layer in iter_packed_linears(model)]
    assert layers and all(layer.values.dtype == torch.bfloat16 for layer in layers)
    assert all(layer.indices.dtype == torch.uint8 for layer in layers)
    assert not any(type(m) is torch.nn.Linear and m.in_features == 64 and m.out_features == 64 for m in model.modules())
    ids = torch.randint(4, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # converting kept values = converting the dense weight: the same numbers
        torch.testing.assert_close(model(ids).logits, _dense(out, torch.bfloat16)(ids).logits)


def test_the_loaded_model_says_which_path_each_layer_ran(pruned: Pruned, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def one_token(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor | None:
        if x.reshape(-1, x.shape[-1]).shape[0] != 1:
            return None  # declines prefill: the reference runs it
        calls.append(1)
        return F.linear(x, layer.dense_weight(), layer.bias)

    register_packed_kernel("fake_decode", one_token)
    try:
        with only_packed_kernels("fake_decode"):
            with caplog.at_level(logging.INFO, logger="secateurs"):
                model = secateurs.load(pruned("llama"), device="cpu")
            assert "1-token products run fake_decode" in caplog.text
            assert "reference path" not in caplog.text
            assert paths_that_ran(model) == {"not run": 14}  # the load's probe does not count as a call
            ids = torch.tensor([[5, 6, 7, 8]])
            with torch.no_grad():
                model(ids)
                assert paths_that_ran(model) == {"reference": 14}
                model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert paths_that_ran(model) == {"fake_decode": 14} and calls
    finally:
        unregister_packed_kernel("fake_decode")


def test_without_a_packed_copy_the_hf_folder_loads_and_a_log_line_says_so(
    pruned: Pruned, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    shutil.rmtree(folder / PACKED_DIR)
    with caplog.at_level(logging.WARNING, logger="secateurs"):
        model = secateurs.load(folder, device="cpu")
    assert "has no packed copy" in caplog.text and "dense-with-zeros" in caplog.text
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with pytest.raises(ModelSourceError, match="has no packed copy"):
        secateurs.load(folder, device="cpu", packed=True)
    dense = secateurs.load(pruned("llama"), device="cpu", packed=False)  # the dense form on request
    assert not any(isinstance(m, PackedLinear) for m in dense.modules())


def test_a_packed_folder_alone_loads(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama") / PACKED_DIR, tmp_path)  # e.g. a download of packed/ only
    model = secateurs.load(folder, device="cpu")
    assert len(dict(iter_packed_linears(model))) == 14


# --- Memory: the dense pruned weights never exist ------------------------------------------------------------

_RSS_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    import secateurs
    from secateurs.workers.runtime import load_pruned  # every import before the baseline
    from secateurs.workers.allocator import trim_heap

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=16))  # imports the modeling code
    from secateurs.kernels.sparse import cpu
    from secateurs.workers.cpu_kernel import configure_cpu_kernel
    configure_cpu_kernel()
    cpu.ensure()  # the CPU kernel's library (code, not model memory) loaded before the baseline too
    warm = secateurs.load(sys.argv[2], device="cpu")  # a tiny packed model: the loader's code pages, once
    del warm
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    model = secateurs.load(sys.argv[1], device="cpu")
    print(json.dumps({"peak": status("VmHWM") - base, "after": status("VmRSS") - base}))
    """
)


def test_loading_never_materializes_the_dense_pruned_weights(tmp_path: Path) -> None:
    """A ~100 MB fp32 model whose bytes are nearly all in pruned linears: loading its packed form (17/32 of
    those bytes) must add well under the dense checkpoint's size to the process, peak included. Generous (0.8x),
    but a dense copy of the pruned weights, even one at a time per layer, plus the packed ones exceeds it. A tiny
    packed model is loaded first, so that the loader's own code pages (tens of MB on some CPUs: oneDNN, hashing)
    are resident before the baseline and only model memory is counted."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=256,
        max_position_embeddings=64,
    )
    out, tiny = tmp_path / "out", tmp_path / "tiny"
    save_pruned_2of4(config, out)
    save_pruned_2of4(LlamaConfig(**{**config.to_dict(), "hidden_size": 64, "intermediate_size": 128}), tiny)
    dense_bytes = (out / "model.safetensors").stat().st_size
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(out), str(tiny)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert probe.returncode == 0, probe.stderr
    added = json.loads(probe.stdout.strip().splitlines()[-1])
    packed_bytes = (out / PACKED_DIR / PACKED_FILE).stat().st_size
    assert packed_bytes < 0.56 * dense_bytes  # the premise: nearly all bytes are in packed layers
    assert added["peak"] < 0.8 * dense_bytes, (added, dense_bytes, packed_bytes)
    assert added["after"] > 0.9 * packed_bytes, (added, packed_bytes)  # the model is really there


# --- Bad input -------------------------------------------------------------------------------------------------


def _manifest(folder: Path) -> dict[str, object]:
    return json.loads((folder / PACKED_DIR / MANIFEST_NAME).read_text())


def _first_packed(manifest: dict[str, object]) -> str:
    tensors = manifest["tensors"]
    assert isinstance(tensors, dict)
    return next(name for name, record in tensors.items() if record["packed"])


def _write_manifest(folder: Path, manifest: dict[str, object]) -> None:
    (folder / PACKED_DIR / MANIFEST_NAME).write_text(json.dumps(manifest))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / PACKED_DIR / PACKED_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))


def test_a_manifest_shape_that_does_not_match_the_tensors_names_the_tensor(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    manifest = _manifest(folder)
    name = _first_packed(manifest)
    manifest["tensors"][name]["shape"] = [64, 128]  # type: ignore[index]
    _write_manifest(folder, manifest)
    expected = (
        rf"packed tensor {name}::values is float32 \[\d+, \d+\]; a float32 \[64, 128\] weight .* needs .* \[64, 64\]"
    )
    with pytest.raises(ModelSourceError, match=expected):
        secateurs.load(folder, device="cpu")


def test_positions_out_of_order_name_the_tensor(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    name = _first_packed(_manifest(folder))

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name + "::indices"][3, 5] = 0  # four codes 0: positions 0, 0 in two groups, not increasing

    _edit_tensors(folder, corrupt)
    for verify in (True, False):  # positions are checked even without the sha256
        with pytest.raises(ModelSourceError, match=rf"packed tensor {name}: packed indices are corrupt"):
            secateurs.load(folder, device="cpu", verify=verify)


def test_a_value_changed_on_disk_fails_the_sha256(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("gpt2"), tmp_path)  # transposed Conv1D: the check rebuilds columns
    name = _first_packed(_manifest(folder))

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name + "::values"][7, 3] += 1.0

    _edit_tensors(folder, corrupt)
    with pytest.raises(ModelSourceError, match=rf"packed tensor {name} does not match the sha256"):
        secateurs.load(folder, device="cpu")
    assert len(dict(iter_packed_linears(secateurs.load(folder, device="cpu", verify=False)))) == 8


def test_a_dense_tensor_changed_on_disk_fails_the_sha256(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.norm.weight"][0] = 2.5

    _edit_tensors(folder, corrupt)
    with pytest.raises(ModelSourceError, match=r"tensor model\.norm\.weight does not match the sha256"):
        secateurs.load(folder, device="cpu")


def test_values_of_another_dtype_name_the_tensor(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    name = _first_packed(_manifest(folder))

    def retype(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name + "::values"] = tensors[name + "::values"].half()

    _edit_tensors(folder, retype)
    with pytest.raises(ModelSourceError, match=rf"packed tensor {name}::values is float16 .* needs float32"):
        secateurs.load(folder, device="cpu")


def test_missing_and_unlisted_tensors_are_named(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    name = _first_packed(_manifest(folder))
    _edit_tensors(folder, lambda tensors: tensors.pop(name + "::indices"))
    with pytest.raises(ModelSourceError, match=rf"the packed file has no {name}::indices"):
        secateurs.load(folder, device="cpu")
    folder = _copy(pruned("llama"), tmp_path / "second")
    _edit_tensors(folder, lambda tensors: tensors.update(stray=torch.zeros(2)))
    with pytest.raises(ModelSourceError, match="holds stray, which the manifest does not list"):
        secateurs.load(folder, device="cpu")


def test_a_truncated_packed_file_is_named(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    path = folder / PACKED_DIR / PACKED_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelSourceError, match=r"claims bytes .* which does not fit"):
        secateurs.load(folder, device="cpu")


def test_another_format_version_is_refused(pruned: Pruned, tmp_path: Path) -> None:
    folder = _copy(pruned("llama"), tmp_path)
    manifest = _manifest(folder)
    manifest["format"] = "secateurs.packed/99"
    _write_manifest(folder, manifest)
    with pytest.raises(ModelSourceError, match=r"format 'secateurs\.packed/99'; this secateurs reads"):
        secateurs.load(folder, device="cpu")


def test_positions_out_of_range_name_the_tensor() -> None:
    """With M = 3 a 2-bit position can be 3, past the group: refused, naming the tensor (2:4 cannot show this)."""
    from secateurs.kernels.sparse.packing import pack_nm
    from secateurs.workers.packed_model import _check_packed

    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 3.0, 4.0]])  # [1, 6]: 2:3 sparse
    packed = pack_nm(weight, 2, 3)
    record = {"shape": [1, 6], "dtype": "float32", "transposed": False}
    _check_packed("w.weight", record, packed, verify=False)
    packed.indices[0, 0] |= 0b11 << 2  # the second kept position of the first group: 3 >= M
    for verify in (False, True):
        with pytest.raises(ModelSourceError, match=r"packed tensor w\.weight: packed indices are corrupt: .* below M"):
            _check_packed("w.weight", {**record, "sha256": "0" * 64}, packed, verify=verify)


def test_a_device_that_is_not_there_and_a_dtype_the_runtime_does_not_take(pruned: Pruned) -> None:
    out = pruned("llama")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"device 'cuda' does not exist: this machine has no CUDA device"):
            secateurs.load(out, device="cuda")
    with pytest.raises(DeviceError, match="'tpu' is not a device name"):
        secateurs.load(out, device="tpu")
    for dtype in ("int8", torch.float64, "fp8"):
        with pytest.raises(InvalidSpecError, match=r"dtype .* is not supported") as caught:
            secateurs.load(out, device="cpu", dtype=dtype)
        assert "float32, bfloat16, float16" in caught.value.hint


def test_load_takes_the_cpu_kernel_settings(pruned: Pruned, monkeypatch: pytest.MonkeyPatch) -> None:
    """SECATEURS_CPU_ISA reaches the loaded model's CPU kernel, as it reaches a job's: a forced instruction set runs,
    one this CPU lacks is refused up front with the fix. (Until 2026-11-29 ``load`` and ``secateurs bench`` never
    read it: SECATEURS_CPU_ISA=amx on a CPU without AMX silently ran the best kernel the CPU had.)"""
    from secateurs.app.settings import get_settings
    from secateurs.kernels.sparse import cpu
    from secateurs.kernels.sparse.cpu import kernel
    from secateurs.workers.cpu_kernel import configure_cpu_kernel

    out = pruned("llama")
    try:
        monkeypatch.setenv("SECATEURS_CPU_ISA", "scalar")
        get_settings.cache_clear()
        secateurs.load(out, device="cpu")
        assert cpu.isa_in_use() == "scalar"
        runnable = kernel._module().isas_runnable()
        lacking = next((isa for isa in ("amx", "avx512bf16", "avx512", "avx2") if isa not in runnable), None)
        if lacking is not None:
            monkeypatch.setenv("SECATEURS_CPU_ISA", lacking)
            get_settings.cache_clear()
            with pytest.raises(DeviceError, match=f"the {lacking} CPU kernel was requested") as caught:
                secateurs.load(out, device="cpu")
            assert "SECATEURS_CPU_ISA=auto" in caught.value.hint
    finally:
        monkeypatch.delenv("SECATEURS_CPU_ISA")
        get_settings.cache_clear()
        configure_cpu_kernel()
        assert cpu.ensure() and cpu.isa_in_use() == kernel._module().isas_runnable()[-1]
