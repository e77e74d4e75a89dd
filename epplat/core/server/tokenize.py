"""vLLM's /tokenize and /detokenize: a prompt (text, or chat messages through the chat template) to
token ids and back, with vLLM's request and response shapes, on the server's own tokenizer."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from epplat.core.server.protocol import APIError, ChatMessage, ChatTool, invalid

_NO_LIMIT = 1 << 62     # vLLM tokenizes prompts of any length here (the count says how long they are)


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


async def tokenize(serving, req: TokenizeRequest) -> TokenizeResponse:
    """`serving` is the app's OpenAIServing (its model names, tokenizer pool and chat template rules)."""
    serving.check_model(req.model)
    if isinstance(req, TokenizeChatRequest):
        text = await serving.render_chat(req)
    else:
        text = req.prompt
    _, ids = await serving.pool.encode(text, req.add_special_tokens, _NO_LIMIT)
    strs = serving.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids, token_strs=strs)


def detokenize(serving, req: DetokenizeRequest) -> DetokenizeResponse:
    serving.check_model(req.model)
    bad = [t for t in req.tokens if not 0 <= t < serving.vocab_size]
    if bad:
        raise APIError(400, f"Token id {bad[0]} is out of vocabulary (size {serving.vocab_size}).", "tokens")
    return DetokenizeResponse(prompt=serving.tok.decode(req.tokens))
