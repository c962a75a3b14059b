"""Builders for tiny random-weight causal language models, one per supported architecture, and small shared helpers
of the tests (a random model of any config pruned 2:4 and packed, a small CPU job spec, broken model folders).

Every model has 2:4-friendly shapes (hidden 64, MLP 256, 4 heads, 2 KV heads where the architecture has GQA,
vocab 128, 64 positions), so every linear layer inside a decoder block has ``in_features % 4 == 0``.
:func:`tiny_model_dir` also writes a tiny offline tokenizer, so that ``AutoTokenizer.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained`` both work on the folder without any network access.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from secateurs.app.schemas import JobSpec, TextSource

HIDDEN = 64
INTERMEDIATE = 256
HEADS = 4
KV_HEADS = 2
VOCAB = 128
MAX_POSITIONS = 64

# Special token ids shared by every tiny model and the tiny tokenizer (the tokenizer reserves them first).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

_IDS: dict[str, Any] = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
_COMMON: dict[str, Any] = {"vocab_size": VOCAB, **_IDS}
_GQA: dict[str, Any] = {
    **_COMMON,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
}


def _llama(num_layers: int) -> PretrainedConfig:
    return LlamaConfig(**_GQA, num_hidden_layers=num_layers)


def _mistral(num_layers: int) -> PretrainedConfig:
    return MistralConfig(**_GQA, num_hidden_layers=num_layers, sliding_window=None)


def _qwen2(num_layers: int) -> PretrainedConfig:
    return Qwen2Config(**_GQA, num_hidden_layers=num_layers)


def _gemma3(num_layers: int) -> PretrainedConfig:
    # Alternate sliding and full attention so that both layer types (and both RoPE bases) are exercised;
    # Gemma3's own default pattern (5 sliding : 1 full) would make a 2-layer model all-sliding.
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return Gemma3TextConfig(
        **_GQA,
        num_hidden_layers=num_layers,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=layer_types,
    )


def _opt(num_layers: int) -> PretrainedConfig:
    return OPTConfig(
        **_COMMON,
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        word_embed_proj_dim=HIDDEN,
        num_attention_heads=HEADS,
        num_hidden_layers=num_layers,
        max_position_embeddings=MAX_POSITIONS,
    )


def _gpt2(num_layers: int) -> PretrainedConfig:
    # GPT-2 has no pad_token_id argument of its own; only bos/eos (default 50256, outside a 128 vocab).
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_layer=num_layers,
        n_positions=MAX_POSITIONS,
        **_IDS,
    )


def _gpt_neox(num_layers: int) -> PretrainedConfig:
    return GPTNeoXConfig(
        **_COMMON,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_hidden_layers=num_layers,
        max_position_embeddings=MAX_POSITIONS,
    )


_BUILDERS: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gemma3": _gemma3,
    "opt": _opt,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
}

ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
"""Architecture names accepted by :func:`tiny_model` (the ``model_type`` of each, except ``gemma3``,
whose text-only config has ``model_type == "gemma3_text"``)."""


def tiny_config(arch: str, *, num_layers: int = 2) -> PretrainedConfig:
    """The config of the tiny ``arch`` model (eager attention, fp32)."""
    try:
        builder = _BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    config = builder(num_layers)
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str, *, seed: int = 0, num_layers: int = 2, **overrides: Any) -> PreTrainedModel:
    """A random-weight fp32 causal LM of architecture ``arch`` in eval mode, reproducible from ``seed``.

    ``overrides`` change config fields, e.g. ``intermediate_size=250`` for a shape that breaks 2:4.
    """
    config = tiny_config(arch, num_layers=num_layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def random_model(config: PretrainedConfig, *, seed: int = 0) -> PreTrainedModel:
    """A random-weight fp32 causal LM built from any ``config`` (its default attention), reproducible from ``seed``."""
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def save_pruned_2of4(config: PretrainedConfig, out: Path, *, seed: int = 0) -> Path:
    """A :func:`random_model` of a LLaMA-style ``config`` with every block linear (``model.layers.*``) cut to 2:4 by
    magnitude, saved dense (safetensors) into ``out`` and packed into ``out/packed``; returns ``out``."""
    from secateurs.workers.packed import PACKED_DIR, write_packed

    model = random_model(config, seed=seed)
    targets: dict[str, bool] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                weight = module.weight.view(-1, 4)  # [out·in/4, 4]
                drop = weight.abs().argsort(dim=-1)[:, :2]  # the 2 smallest of every 4
                weight.scatter_(-1, drop, 0.0)
                targets[f"{name}.weight"] = False
    model.save_pretrained(out, safe_serialization=True)
    del model  # the memory tests save big models: the dense copy goes before packing
    write_packed(out, out / PACKED_DIR, targets, 2, 4)
    return out


def job_spec(model: Path, text: Path, **changes: Any) -> JobSpec:
    """A small CPU job on ``model``: calibrated and evaluated on ``text`` (4 calibration samples and 3 evaluation
    windows of 32 tokens), speed not measured (on by default; tested in test_speed.py); ``changes`` override."""
    base: dict[str, Any] = {
        "model": str(model),
        "calibration": TextSource(file=str(text)),
        "calibration_samples": 4,
        "calibration_seqlen": 32,
        "evaluation": TextSource(file=str(text)),
        "eval_seqlen": 32,
        "eval_windows": 3,
        "device": "cpu",
        "measure_speed": False,
    }
    return JobSpec(**{**base, **changes})


# Printable ASCII plus the usual whitespace: the tokenizer's alphabet, so ASCII text never maps to <unk>.
_ALPHABET = string.printable
_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "A model is pruned to two of every four weights, then the perplexity is measured again.\n"
    " the the the and and of of to to in in is is on on at at it it an an as as\n"
) * 4
# The pre-tokenizer regex of Qwen2Tokenizer. transformers 5 always re-creates a qwen2 model's tokenizer as
# ``Qwen2Tokenizer`` (whatever tokenizer_config.json says), which keeps the vocab and merges but rebuilds the
# normalizer, pre-tokenizer and decoder; using the very same pipeline here makes every architecture's
# ``AutoTokenizer`` produce identical ids for ASCII text.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB`` entries, trained in memory on a small string, fully offline.

    Its alphabet is printable ASCII (unknown bytes map to ``<unk>``); ids 0-3 are ``<pad> <s> </s> <unk>``,
    matching the tiny models' configs. It adds no special tokens to an encoding (like GPT-2 / SmolLM2).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False), byte_level]
    )
    backend.decoder = decoders.ByteLevel()
    alphabet = sorted({c for piece, _ in byte_level.pre_tokenize_str(_ALPHABET) for c in piece})
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    if backend.get_vocab_size() > VOCAB:
        raise AssertionError(f"tiny tokenizer has {backend.get_vocab_size()} tokens > {VOCAB}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )


def tiny_model_dir(arch: str, path: Path, seed: int = 0) -> Path:
    """Save the tiny ``arch`` model (safetensors) and the tiny tokenizer into ``path``; return ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, seed=seed).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The list of decoder blocks of any model built here."""
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"no decoder layers found in {type(model).__name__}")


def linear_in_features(module: torch.nn.Module) -> int | None:
    """``in_features`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``(in, out)``), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])
    return None


def bad_model_dir(tmp_path: Path, tiny: Path, kind: str) -> Path:
    """A broken copy of the tiny model folder ``tiny``: pickle, remote, encoder, odd, mismatch or shardless (an
    index naming two shards, neither of them there)."""
    folder = tmp_path / kind
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    config = json.loads((tiny / "config.json").read_text())
    if kind == "pickle":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif kind == "shardless":  # e.g. a download that fetched the index but none of the shards
        shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        weight_map = {"lm_head.weight": shards[1], "model.embed_tokens.weight": shards[0]}  # sorted by tensor name
        index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (folder / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    if kind == "remote":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    if kind == "encoder":
        config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    if kind == "odd":  # a real checkpoint whose down_proj reads 250 features: not a multiple of 4
        tiny_model("llama", intermediate_size=250).save_pretrained(folder)
    if kind == "mismatch":  # config says 250, weights are 256 wide
        config["intermediate_size"] = 250
        (folder / "config.json").write_text(json.dumps(config))
    return folder
