"""OpenAI wire formats as vLLM's server has them: request and response models (pydantic v2) and error bodies."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from epplat.connectors.base import check_kv_transfer_params

_INT64 = 2**63 - 1


# -- errors ---------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error for the client: an OpenAI error body with this HTTP status."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "BadRequestError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> ErrorResponse:
        kind = self.TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status))


def error_response(exc: BaseException) -> JSONResponse:
    """Any exception as an OpenAI-style JSON error: an APIError keeps its status, anything else is a 500."""
    if not isinstance(exc, APIError):
        exc = APIError(500, "Internal server error.")   # its text is logged, never sent
    return JSONResponse(exc.body().model_dump(), status_code=exc.status)


def invalid(param: Optional[str], message: str) -> PydanticCustomError:
    """A validation error (HTTP 400) that names the offending request field."""
    return PydanticCustomError("invalid_request", message, {"param": param})


# -- requests -------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


# Fields vLLM accepts that change what is generated and that epplat does not implement: a
# value other than "off" (None / false / 0 / empty) gets a 400 rather than being ignored.
_UNSUPPORTED = ("use_beam_search", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "prompt_embeds", "logprob_token_ids", "functions",
                "suffix")


class _SamplingRequest(BaseModel):
    """Fields common to completions and chat completions; unknown fields are ignored, as in vLLM."""

    # JSON has no Infinity / NaN; strict: "16" is not a number, nor 1 a boolean (what the schema says)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    best_of: Optional[int] = None
    seed: Optional[int] = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    logit_bias: Optional[dict[str, float]] = None
    min_tokens: int = Field(default=0, ge=0)
    bad_words: Optional[list[str]] = None
    allowed_token_ids: Optional[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = None
    prompt_logprobs: Optional[int] = Field(default=None, ge=0)    # at most --max-logprobs (serving.py)
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=-1)
    return_tokens_as_token_ids: Optional[bool] = None
    priority: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: Optional[str] = None
    response_format: Optional[dict] = None
    structured_outputs: Optional[dict] = None      # vLLM's: exactly one of json, regex, choice, grammar, json_object
    kv_transfer_params: Optional[dict] = None      # for the KV connector (prefill/decode disaggregation)

    @field_validator("kv_transfer_params")
    @classmethod
    def _kv_params(cls, v):
        try:
            return check_kv_transfer_params(v)
        except ValueError as e:
            raise invalid("kv_transfer_params", str(e)) from None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        if v is not None and not all(k.lstrip("-").isdigit() for k in v):
            raise invalid("logit_bias", "logit_bias keys must be token ids")
        return v

    @model_validator(mode="after")
    def _supported(self):
        for name in _UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, False, 0, "", [], {}):
                raise invalid(name, f"{name} is not supported")
        if self.best_of not in (None, 1, self.n):
            raise invalid("best_of", "best_of other than n is not supported")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "Stream options can only be defined when `stream=True`.")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


def _is_token_ids(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(type(t) is int and t >= 0 for t in x)


_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    prompt: Union[_Text, Annotated[list[_Text], Field(min_length=1)], _TokenIds,
                  Annotated[list[_TokenIds], Field(min_length=1)]]
    max_tokens: Optional[int] = Field(default=16, ge=1)   # vLLM's default; null: the rest of the context
    logprobs: Optional[int] = Field(default=None, ge=0)
    echo: bool = False
    add_special_tokens: bool = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        ok = ((isinstance(v, str) and v != "") or _is_token_ids(v) or
              (isinstance(v, list) and len(v) > 0 and (all(isinstance(p, str) and p != "" for p in v) or
                                                        all(_is_token_ids(p) for p in v))))
        if not ok:
            raise invalid("prompt", "prompt must be a non-empty string, list of strings, list of token ids "
                                    "or list of lists of token ids")
        return v

    @model_validator(mode="after")
    def _echo(self):
        if self.echo and self.logprobs is not None:
            raise invalid("echo", "echo together with logprobs is not supported (it needs prompt logprobs)")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")   # name, tool_call_id, ... reach the chat template as given
    role: str = Field(min_length=1)
    content: Optional[Union[str, list[dict]]] = None


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = True
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0)
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None    # vLLM's: a caller's own template (--trust-request-chat-template)
    chat_template_kwargs: Optional[dict] = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.echo:
            raise invalid("echo", "echo is not supported for chat completions")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.")
        if self.add_generation_prompt and self.continue_final_message:
            raise invalid("continue_final_message",
                          "Cannot set both `continue_final_message` and `add_generation_prompt` to true.")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise invalid("tool_choice", "When using `tool_choice`, `tools` must be set.")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools}:
            raise invalid("tool_choice", f"Tool '{self.tool_choice.function.name}' has not been passed in `tools`.")
        return self

    @property
    def tool_mode(self) -> str:
        """none, auto, required or named (vLLM's default: auto when tools are given)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def output_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[Optional[float]] = []
    tokens: list[str] = []
    top_logprobs: list[Optional[dict[str, float]]] = []


class PromptLogprob(BaseModel):
    """vLLM's Logprob, as prompt_logprobs carry it (one dict per prompt token, keyed by token id)."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


PromptLogprobs = list[Optional[dict[int, PromptLogprob]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponseChoice(CompletionChoice):
    """A non-streamed choice: with the prompt's logprobs when asked (prompt_logprobs)."""

    prompt_logprobs: Optional[PromptLogprobs] = None


class _Chunk(BaseModel):
    """A streamed chunk: `usage` appears only when set (the last chunk, or every one with continuous stats)."""

    @model_serializer(mode="wrap")
    def _drop_unset_usage(self, handler):
        data = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    kv_transfer_params: Optional[dict] = None      # the KV connector's (null without one), as vLLM's


class CompletionStreamResponse(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = []


class ChatLogProbs(BaseModel):
    content: Optional[list[ChatLogProbsContent]] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    reasoning_content: Optional[str] = None     # with --reasoning-parser
    content: Optional[str] = None
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[PromptLogprobs] = None
    kv_transfer_params: Optional[dict] = None


class _SetFieldsOnly(BaseModel):
    """Serialized with only the fields that are set (not None), as vLLM streams deltas."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_SetFieldsOnly):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(_SetFieldsOnly):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(_SetFieldsOnly):
    """The first delta of a choice has the role, the others content, reasoning_content or tool calls."""

    role: Optional[str] = None
    reasoning_content: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionStreamResponse(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "epplat"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
