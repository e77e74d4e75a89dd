"""Messages between the API server (frontend) and engine cores: msgspec structs, no pickle."""

from __future__ import annotations

from typing import Optional

import msgspec


class StructuredOutput(msgspec.Struct, array_like=True):
    """A constraint on the output (epplat.core.engine.structured_output): kind is json (spec: a JSON
    schema), json_object (spec unused), regex, or grammar (EBNF). any_whitespace: JSON may put any
    whitespace between its tokens (vLLM's default; its disable_any_whitespace turns it off)."""

    kind: str
    spec: str = ""
    any_whitespace: bool = True


class SamplingParams(msgspec.Struct, omit_defaults=True):
    """Per-request sampling settings, with OpenAI / vLLM meanings.

    temperature 0 means greedy. top_k <= 0 and top_p = 1 and min_p = 0 disable those
    filters. ``logprobs`` is the number of top alternatives to return per token
    (None: no logprobs). ``stop`` strings are matched in the frontend on detokenized
    text; ``stop_token_ids`` and EOS are matched in the engine.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    min_tokens: int = 0
    bad_words_token_ids: list[list[int]] = []
    allowed_token_ids: Optional[list[int]] = None
    structured_output: Optional[StructuredOutput] = None


class Resume(msgspec.Struct, array_like=True):
    """A running request moved off a departing DP rank (elastic EP scale-down): the output tokens it had
    and its seeded generator's state (torch's CPU generator state, raw bytes). The new rank recomputes their
    KV and continues as if nothing happened: max_tokens, min_tokens and the penalties count them as output."""

    output_token_ids: list[int]
    generator_state: Optional[bytes] = None


class EngineRequest(msgspec.Struct, tag="add"):
    """A new request for an engine core: tokens in, sampling settings; outputs go to client_index."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    client_index: int = 0
    kv_transfer_params: Optional[dict] = None    # for the KV connector (vLLM's request field)
    priority: int = 0                            # --scheduling-policy priority: lower runs first (vLLM's)
    resume: Optional[Resume] = None              # continues a request moved from another rank (elastic EP)


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class UtilityCall(msgspec.Struct, tag="utility"):
    """A call that is not a request (stats, health, profiling); answered by call_id."""

    call_id: int
    method: str
    args: list = []
    client_index: int = 0


EngineInput = EngineRequest | AbortRequests | UtilityCall


class Wake(msgspec.Struct, tag="wake"):
    """DP engines: start wave `wave` (every engine steps until none has work)."""

    wave: int
    dp_rank: int


wake_decoder = msgspec.msgpack.Decoder(Wake)


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    rank: int


class RequestTimes(msgspec.Struct, array_like=True):
    """One finished request's phases inside its engine, in seconds (vLLM's queue / prefill / decode
    times): queued until first scheduled, first scheduled until its first token, first token until last."""

    queue: float
    prefill: float
    decode: float


class EngineOutput(msgspec.Struct, array_like=True):
    """New tokens of one request after one engine step.

    logprobs, when asked, holds for each new token a list whose first entry is the
    sampled token and the rest the top alternatives. finish_reason is "stop",
    "length" or "abort" once the request is done.
    """

    request_id: str
    new_token_ids: list[int]
    logprobs: Optional[list[list[TokenLogprob]]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: Optional[dict] = None    # the KV connector's, on the finishing output
    times: Optional[RequestTimes] = None         # on the finishing output of a request that was scheduled
    # asked with prompt_logprobs: on its first output, one entry per prompt token after the first
    # (the prompt token, then the top alternatives), as ``logprobs``
    prompt_logprobs: Optional[list[list[TokenLogprob]]] = None


class EngineStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_requests_received: int = 0
    eplb_balancedness: float = -1.0     # EPLB: last measured mean/max tokens per EP rank, group-wide (-1: none)
    eplb_rebalances: int = 0
    prefix_cache_queries: int = 0       # prompt tokens looked up in the prefix cache since the engine started
    prefix_cache_hits: int = 0          # of which were found there
    num_prompt_tokens_computed: int = 0 # prompt tokens this engine computed (not cached, not received)
    spec_num_drafts: int = 0            # speculative decoding totals (vLLM's spec_decode_num_*)
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


class EngineOutputs(msgspec.Struct, tag="outputs"):
    """A step's outputs for one API server's requests, with the engine's load after it; an API server with
    none of them gets the load alone (no outputs) whenever it changed, as every API server routes on it."""

    engine_index: int
    outputs: list[EngineOutput]
    stats: Optional[EngineStats] = None


class UtilityResult(msgspec.Struct, tag="result"):
    call_id: int
    result: object = None
    error: Optional[str] = None


class EngineDead(msgspec.Struct, tag="dead"):
    engine_index: int
    reason: str


class EngineHeartbeat(msgspec.Struct, tag="beat"):
    """An engine's loop is alive (sent every second or so, busy or idle)."""

    engine_index: int


class EngineReady(msgspec.Struct, tag="ready"):
    engine_index: int
    max_model_len: int
    vocab_size: int
    num_blocks: int


EngineMessage = EngineOutputs | UtilityResult | EngineDead | EngineReady | EngineHeartbeat

encoder = msgspec.msgpack.Encoder()
input_decoder = msgspec.msgpack.Decoder(EngineInput)
message_decoder = msgspec.msgpack.Decoder(EngineMessage)
