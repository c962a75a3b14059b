"""The offline assets (slow: real download + GGUF conversion) and the tiny test models (fast)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from secateurs.workers.assets import OfflineAssets, fetch_assets
from tests.models import ARCHITECTURES, decoder_layers, linear_in_features, tiny_model


@pytest.mark.slow
def test_assets_are_complete_and_cached(assets: OfflineAssets) -> None:
    config = AutoConfig.from_pretrained(assets.smollm2)
    assert config.model_type == "llama"
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in (assets.smollm2 / "config.json").read_text(encoding="utf-8")
    assert (assets.smollm2 / "model.safetensors").is_file()
    assert not list(assets.smollm2.glob("*.bin"))
    assert (assets.smollm2 / "tokenizer_config.json").is_file()

    for path in (assets.c4, assets.wiki, assets.tiny, assets.code):
        assert path.is_file(), path
        assert path.stat().st_size > 0, path
    assert assets.wikitext2_test is None or assets.wikitext2_test.is_file()

    cache = assets.smollm2.parents[1]
    start = time.perf_counter()
    again = fetch_assets(cache)
    assert time.perf_counter() - start < 5.0
    assert again == assets
    assert again.as_dict() == assets.as_dict()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_build_run_and_are_2_4_friendly(arch: str) -> None:
    model = tiny_model(arch, seed=0)
    assert not model.training
    assert model.dtype == torch.float32

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all()

    layers = decoder_layers(model)
    assert len(layers) == 2
    widths = {
        name: width for name, module in layers.named_modules() if (width := linear_in_features(module)) is not None
    }
    assert widths, f"no linear layers found in {arch} decoder blocks"
    assert all(w % 4 == 0 for w in widths.values()), widths


def test_tiny_models_are_reproducible() -> None:
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_dir_loads_offline(tiny_dir: Callable[..., Path], arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_dir(arch)
    assert (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert len(tokenizer) <= model.config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "The quick brown fox jumps over the lazy dog.\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.unk_token_id not in ids.tolist()[0]
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == model.config.vocab_size
