"""benchmarks/scale.py: the smoke path on a toy shape (generate shard by shard, the real job, the checks), and
the 70B projection's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scale import SHAPES, block_costs, main, project_70b
from secateurs.workers.assets import OfflineAssets
from tests.conftest import cache_dir


def test_the_smoke_run_prunes_a_generated_model_and_cleans_up(
    assets: OfflineAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECATEURS_CACHE_DIR", str(cache_dir()))
    work, output = tmp_path / "work", tmp_path / "scale.json"
    assert main([str(work), "--shape", "tiny", "--blocks", "2", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["generated"]["files"] == 3  # the non-block tensors, then one file per block
    assert result["job"]["blocks"] == 2 and len(result["job"]["seconds_per_block"]) == 2
    assert result["job"]["peak_rss_bytes"] > 0 and result["job"]["verified_by_job"]
    assert result["check"]["two_four"] and result["check"]["checked_weights"] == 14
    assert result["check"]["from_pretrained_meta"]
    assert {"cpu", "cpu_flags", "threads", "torch", "transformers"} <= set(result["environment"])
    assert list(work.iterdir()) == []  # the generated model and the output are deleted


def test_the_70b_projection_scales_by_operation_counts() -> None:
    seven, seventy = block_costs(SHAPES["7b"], 8192), block_costs(SHAPES["70b"], 8192)
    # LLaMA-2 block weights: 7B 4·4096² + 3·4096·11008; 70B 2·8192² + 2·1024·8192 + 3·8192·28672 (GQA, 8 KV heads)
    assert seven["bytes"] == 2 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert seventy["bytes"] == 2 * (2 * 8192**2 + 2 * 1024 * 8192 + 3 * 8192 * 28672)
    magnitude = project_70b("13b", 10.0, "magnitude", 0)
    assert magnitude["seconds_total"] == pytest.approx(80 * magnitude["seconds_per_block"])
    sparsegpt = project_70b("7b", 100.0, "sparsegpt", 8192)
    low, middle, high = (sparsegpt["seconds_per_block"][k] for k in ("low", "middle", "high"))
    assert 100.0 < low < middle < high
    assert low == pytest.approx(100.0 * seventy["forward"] / seven["forward"])
