"""OpenAI-compatible request bodies (the subset pdserve serves) and their conversion.

Unknown fields are ignored, as the OpenAI API and vLLM do; fields pdserve does not
implement (n > 1, logprobs, echo, tools) are refused with a clear 400 instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.errors import InvalidRequestError
from pdserve.sampling import OPTIONAL_SAMPLING_FIELDS
from pdserve.v1 import common_pb2 as cpb

# Integer ranges of the protobuf fields these values travel in (uint32, int32, int64).
UInt32 = Annotated[int, Field(ge=0, lt=2**32)]
Int32 = Annotated[int, Field(ge=-(2**31), lt=2**31)]
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1, lt=2**32)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Int32 | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[UInt32] | None = None
    ignore_eos: bool = False
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    min_tokens: UInt32 | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extension: return prompt and generated token ids next to the text.
    return_token_ids: bool = False

    def check_supported(self) -> None:
        if self.n != 1:
            raise InvalidRequestError("only n=1 is supported", param="n")
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequestError(
                f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters", param="stop"
            )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling(self, max_tokens: int) -> cpb.SamplingParams:
        msg = cpb.SamplingParams(
            max_tokens=max_tokens,
            stop=self.stop_list(),
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        for name in OPTIONAL_SAMPLING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        return msg

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.logprobs is not None:
            raise InvalidRequestError("logprobs are not supported yet", param="logprobs")
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported", param="suffix")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn]
    max_completion_tokens: Annotated[int, Field(ge=1, lt=2**32)] | None = None
    logprobs: bool = False
    tools: list[dict[str, object]] | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self.logprobs:
            raise InvalidRequestError("logprobs are not supported yet", param="logprobs")
        if self.tools:
            raise InvalidRequestError("tools are not supported", param="tools")

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]
