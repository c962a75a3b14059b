"""The engine on the real pretrained SmolLM2-135M (GUIDE §4), with few calibration samples to stay fast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from secateurs.app.schemas import JobSpec, TextSource
from secateurs.workers.assets import OfflineAssets
from secateurs.workers.pipeline import run_job

pytestmark = pytest.mark.slow


def _spec(assets: OfflineAssets, method: str, **changes: object) -> JobSpec:
    assert assets.wikitext2_test is not None
    fields: dict[str, object] = {
        "model": str(assets.smollm2),
        "method": method,
        "calibration": TextSource(file=str(assets.c4)),
        "calibration_samples": 16,
        "calibration_seqlen": 128,
        "evaluation": TextSource(file=str(assets.wikitext2_test)),
        "eval_seqlen": 256,
        "eval_windows": 6,
        "device": "cpu",
        "measure_speed": False,  # on by default (about a minute on SmolLM2); benchmarks/decode.py measures it
    }
    return JobSpec(**{**fields, **changes})  # type: ignore[arg-type]


def test_sparsegpt_on_smollm2_is_finite_verified_and_far_better_than_magnitude(
    assets: OfflineAssets, tmp_path: Path
) -> None:
    if assets.wikitext2_test is None:
        pytest.skip("../shared WikiText-2 not present")
    sparsegpt = run_job(_spec(assets, "sparsegpt"), output_dir=tmp_path / "sparsegpt")
    magnitude = run_job(_spec(assets, "magnitude"), output_dir=tmp_path / "magnitude")
    assert sparsegpt.sparsity.verified and magnitude.sparsity.verified
    assert sparsegpt.sparsity.layers_pruned == 30 * 7  # every linear of the 30 decoder blocks
    assert sparsegpt.model.decoder_blocks == 30
    dense, pruned = sparsegpt.perplexity.dense, sparsegpt.perplexity.pruned
    assert dense is not None and pruned is not None
    assert 10 < dense < 60  # dense SmolLM2 on WikiText-2 is ~30 with 512-token windows
    assert math.isfinite(pruned) and dense < pruned
    assert magnitude.perplexity.pruned is not None
    assert pruned < 0.5 * magnitude.perplexity.pruned  # P-CPU: 112 against 1668
    shared = {layer.name: layer.shares_input_with for layer in sparsegpt.layers}
    assert len(shared["model.layers.0.self_attn.q_proj"]) == 2  # q, k, v share one Hessian
    assert len(shared["model.layers.0.mlp.gate_proj"]) == 1  # gate and up share one Hessian
