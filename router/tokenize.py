"""Tokenization in the router: prompts and chat templates become token ids here.

The rules match vLLM's OpenAI server so that outputs are identical: completions are
tokenized with the tokenizer's special tokens (BOS), chat prompts are rendered with the
model's chat template and tokenized without adding special tokens again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve.errors import InvalidRequestError


class PromptTokenizer:
    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(model_path)
        self.vocab_size = len(self._tok)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self._tok.chat_template is None:
            raise InvalidRequestError("this model has no chat template; use /v1/completions")
        try:
            text = self._tok.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja errors: the template rejected these messages
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from e
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text as vLLM's incremental detokenizer renders it: the tokenizers library's own
        decoder, special tokens skipped, no clean-up of spaces (router/migration.py)."""
        text: str = self._tok.backend_tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text

    def check_token_ids(self, token_ids: Sequence[int]) -> list[int]:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids out of the vocabulary (size {self.vocab_size}): {bad[:5]}",
                param="prompt",
            )
        return list(token_ids)
