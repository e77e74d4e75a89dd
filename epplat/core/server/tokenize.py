"""vLLM's /tokenize and /detokenize: a prompt (text, or chat messages through the chat template) to
token ids and back, with vLLM's request and response shapes, on the server's own tokenizer.

As in vLLM, neither checks the context length (`count` says how long a prompt is); the body
limit bounds them, and a long input is tokenized or decoded, and its answer written, in a
tokenizer worker (tokenizer_pool.py)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from epplat.core.server.protocol import APIError, ChatMessage, ChatTool, invalid


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    model: Optional[str] = None


class TokenizeCompletionRequest(_Request):
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: Optional[bool] = False


class TokenizeChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ChatTool]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: Optional[bool] = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict] = None

    @model_validator(mode="after")
    def _checks(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise invalid("continue_final_message",
                          "Cannot set both `continue_final_message` and `add_generation_prompt` to true.")
        return self


TokenizeRequest = Union[TokenizeChatRequest, TokenizeCompletionRequest]


def parse(cls, body) -> BaseModel:
    """The body as `cls` (for /tokenize, vLLM's union: a body with `messages` is a chat request), or a 400."""
    if cls is TokenizeRequest:
        cls = TokenizeChatRequest if isinstance(body, dict) and "messages" in body else TokenizeCompletionRequest
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(400, f"{field}: {err['msg']}" if field else err["msg"], field or None) from None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Request):
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(serving, req: TokenizeRequest) -> bytes:
    """TokenizeResponse's JSON. `serving` is the app's OpenAIServing (its model names, tokenizer pool
    and chat template rules)."""
    serving.check_model(req.model)
    if isinstance(req, TokenizeChatRequest):
        text = await serving.render_chat(req)
    else:
        text = req.prompt
    return await serving.pool.tokenize_body(text, req.add_special_tokens, bool(req.return_token_strs),
                                            serving.max_model_len)


async def detokenize(serving, req: DetokenizeRequest) -> bytes:
    """DetokenizeResponse's JSON."""
    serving.check_model(req.model)
    return await serving.pool.detokenize_body(req.tokens, serving.vocab_size)
