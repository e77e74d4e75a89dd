"""A request inside an engine core: its tokens, progress, blocks and stop rules."""

from __future__ import annotations

import enum
import time
from typing import Optional

import torch

from epplat.core.engine.draws import draw_kind
from epplat.core.engine.logits_rules import has_rules
from epplat.core.engine.protocol import EngineRequest, RequestTimes, Resume, SamplingParams, TokenLogprob
from epplat.core.engine.structured_output import accept


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    def __init__(self, req: EngineRequest):
        self.request_id = req.request_id
        self.params: SamplingParams = req.params
        self.prompt_len = len(req.prompt_token_ids)
        self.token_ids: list[int] = list(req.prompt_token_ids)
        self.eos_token_ids = set(req.eos_token_ids)
        self.num_computed = 0          # tokens whose K/V are in the cache or written by a launched step
        self.num_pending = 0           # tokens sampled by launched steps not yet completed (async scheduling)
        self.block_table: list[int] = []
        self.spec_token_ids: list[int] = []  # draft tokens to verify in the next step (speculative decoding)
        self.block_names: list[bytes] = []  # prefix-cache names of its full blocks (see block_manager)
        self.num_named_blocks = 0           # blocks of block_table named in the prefix cache
        self.num_cached_tokens = 0          # prompt tokens found in the prefix cache when it was admitted
        self.num_external_tokens = 0        # prompt tokens a KV connector loads from elsewhere
        self.kv_transfer_params: Optional[dict] = req.kv_transfer_params   # from the API request
        self.kv_transfer_out: Optional[dict] = None   # the connector's, for the response
        self.status = Status.WAITING
        self.in_flight = False       # in a launched step not yet completed (pipeline parallel): not scheduled
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[int] = None
        self.arrival = req.arrival_time or time.time()
        self.queued_ts = time.monotonic()             # when this engine got it (its phases, for the metrics)
        self.scheduled_ts: Optional[float] = None     # first scheduled
        self.first_token_ts: Optional[float] = None
        self.last_token_ts: Optional[float] = None
        self.priority = req.priority
        self.has_rules = has_rules(self.params)       # logits rules to apply before sampling
        self.draw = draw_kind(self.params)            # how the sampler draws its tokens (epplat.core.engine.draws)
        self.prompt_logprobs: list[list[TokenLogprob]] = []   # asked with prompt_logprobs: those computed so far
        self.prompt_logprobs_sent = False
        self.grammar = None      # structured output: its xgrammar matcher (set by the engine core)
        self.generator: Optional[torch.Generator] = None
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if req.resume is not None:          # moved from another rank: its output so far, its generator's state
            self.token_ids += req.resume.output_token_ids
            self.prompt_logprobs_sent = True
            if self.generator is not None and req.resume.generator_state is not None:
                self.generator.set_state(torch.frombuffer(bytearray(req.resume.generator_state), dtype=torch.uint8))

    @property
    def movable(self) -> bool:
        """Whether it can continue on another rank (``hand_off``): not one whose grammar matcher's state or
        KV transfer would have to move with it."""
        return (self.params.structured_output is None and self.kv_transfer_params is None
                and not self.in_flight and self.status is not Status.FINISHED)

    def hand_off(self, client_index: int) -> EngineRequest:
        """This request as another rank takes it over: the prompt, the output so far, the generator's state."""
        state = None if self.generator is None else self.generator.get_state().numpy().tobytes()
        return EngineRequest(self.request_id, self.token_ids[:self.prompt_len], self.params,
                             sorted(self.eos_token_ids), self.arrival, client_index, None, self.priority, Resume(self.output_ids, state))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known(self) -> int:
        """Its tokens, counting those sampled on the device and not yet seen here (async scheduling)."""
        return len(self.token_ids) + self.num_pending

    def done_after_pending(self, max_model_len: int) -> bool:
        """Whether its pending tokens reach max_tokens or the model length (no step to schedule after them)."""
        return self.num_pending > 0 and (self.num_output + self.num_pending >= self.params.max_tokens
                                         or self.num_known >= max_model_len)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def times(self) -> Optional[RequestTimes]:
        """Its phases so far (None when it was never scheduled or produced no token)."""
        if self.scheduled_ts is None or self.first_token_ts is None:
            return None
        return RequestTimes(self.scheduled_ts - self.queued_ts, self.first_token_ts - self.scheduled_ts,
                            self.last_token_ts - self.first_token_ts)

    def append(self, token: int, max_model_len: int) -> None:
        """Add a sampled token and decide whether the request is done."""
        self.token_ids.append(token)
        self.last_token_ts = time.monotonic()
        if self.first_token_ts is None:
            self.first_token_ts = self.last_token_ts
        p = self.params
        if self.grammar is not None and accept(self, token):
            self.finish_reason = "stop"          # the grammar has ended (on a stop token)
        elif not p.ignore_eos and token in self.eos_token_ids:
            self.finish_reason = "stop"
        elif token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif self.num_output >= p.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
