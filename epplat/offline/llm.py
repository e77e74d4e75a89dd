"""vLLM's ``LLM`` class: the engines of ``epplat serve`` (same flags, as keyword arguments, and the same
processes for every parallel layout) driven from Python, without an HTTP server.

The engine client runs in an event loop on a background thread; ``generate`` and ``chat`` block
until every request has finished and return vLLM-shaped RequestOutputs in the prompts' order."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import threading
import weakref
from typing import Optional, Sequence, Union

from epplat.offline.outputs import CompletionOutput, Logprob, RequestOutput
from epplat.offline.sampling_params import SamplingParams

PromptType = Union[str, dict, list]


def _serve_parser() -> argparse.ArgumentParser:
    from epplat import serve
    parser = argparse.ArgumentParser(prog="epplat")
    serve.add_cli(parser.add_subparsers(dest="command"))
    return parser


def serve_argv(model: str, kwargs: dict) -> list[str]:
    """`epplat serve` arguments for LLM(model, **kwargs): each keyword is the flag of that name
    (tensor_parallel_size=2 -> --tensor-parallel-size 2); TypeError names one that is not a flag."""
    parser = _serve_parser()
    serve_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    by_dest = {a.dest: a for a in serve_parser._actions if a.option_strings}
    argv = ["serve", model]
    for name, value in kwargs.items():
        action = by_dest.get(name)
        if action is None or name in ("help", "model_flag"):
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r} (not an `epplat serve` flag)")
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif action.nargs == 0:
            if bool(value) != bool(action.default):
                argv.append(action.option_strings[0])
        elif value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            argv += [action.option_strings[0], *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    return argv


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="epplat-llm-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class LLM:
    """LLM(model, tensor_parallel_size=..., data_parallel_size=..., enable_expert_parallel=..., ...)."""

    def __init__(self, model: str, **kwargs):
        from epplat.config import ConfigError
        from epplat.core.distributed.launcher import start_engines, stop_engines
        from epplat.core.engine.client import EngineClient
        from epplat.core.server.tokenizer import eos_token_ids, load_tokenizer
        from epplat.logs import setup_logging
        from epplat.serve import engine_config_from_args
        setup_logging()
        args = _serve_parser().parse_args(serve_argv(model, kwargs))
        cfg = engine_config_from_args(args)
        par = cfg.parallel
        if not par.single_node or par.headless:
            raise ConfigError("LLM runs every engine of its layout on this node (no multi-node or headless layouts)")
        self.tokenizer = load_tokenizer(cfg.model.model)
        self._ids = itertools.count()
        procs = start_engines(cfg)
        loop = _LoopThread()
        client = EngineClient(cfg, self.tokenizer, eos_token_ids(cfg.model.model, self.tokenizer),
                              engine_ranks=list(range(par.data_parallel_size)), procs=procs)
        self._finalizer = weakref.finalize(self, _shutdown, loop, client, procs, par.ipc_dir, stop_engines)
        self._loop, self._client = loop, client
        loop.run(client.start())

    def get_tokenizer(self):
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the engines (also done when the LLM is garbage-collected or the interpreter exits)."""
        self._finalizer()

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, {"prompt": str}, {"prompt_token_ids": [...]}, or a list of those."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = [self._prompt(p) for p in prompts]
        params = self._params_for(sampling_params, len(items))
        return self._loop.run(self._run_all(items, params))

    def chat(self, messages, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
             tools: Optional[list[dict]] = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, through the chat
        template (with the tools, when given)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                tools=tools,
                **({"continue_final_message": True} if continue_final_message else {}), **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _prompt(self, p: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(p, str):
            return p, self.tokenizer.encode(p)
        if isinstance(p, list):
            return None, list(p)
        if isinstance(p, dict) and ("prompt_token_ids" in p or "prompt" in p):
            ids = p.get("prompt_token_ids")
            return p.get("prompt"), list(ids) if ids is not None else self.tokenizer.encode(p["prompt"])
        raise TypeError(f"a prompt is a string, a list of token ids, or a dict with 'prompt' or "
                        f"'prompt_token_ids', not {type(p).__name__}")

    @staticmethod
    def _params_for(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling params for {n} prompts")
        return params

    async def _run_all(self, items, params) -> list[RequestOutput]:
        limit = self._client.max_model_len
        items = [(text, ids[-sp.truncate_prompt_tokens:] if sp.truncate_prompt_tokens else ids)
                 for (text, ids), sp in zip(items, params)]
        for sp in {id(p): p for p in params}.values():
            sp.check_vocab(self._client.vocab_size or len(self.tokenizer))
        for _, ids in items:
            if not ids or len(ids) >= limit:
                raise ValueError(f"a prompt of {len(ids)} tokens does not fit this model's context ({limit} tokens,"
                                 " one left for output)" if ids else "a prompt must not be empty")
        return list(await asyncio.gather(*(self._run(text, ids, sp) for (text, ids), sp in zip(items, params))))

    async def _run(self, text: Optional[str], ids: list[int], sp: SamplingParams) -> RequestOutput:
        rid = str(next(self._ids))
        room = self._client.max_model_len - len(ids)
        prompt_logprobs: list = []
        outs = await asyncio.gather(*(self._sample(f"{rid}-{j}", j, ids, sp.engine_params(j, room, self.tokenizer),
                                                   prompt_logprobs if j == 0 else [])
                                      for j in range(sp.n)))
        return RequestOutput(request_id=rid, prompt=text, prompt_token_ids=ids,
                             prompt_logprobs=[None] + prompt_logprobs if sp.prompt_logprobs is not None else None,
                             outputs=list(outs))

    async def _sample(self, rid: str, index: int, ids: list[int], params, prompt_logprobs: list) -> CompletionOutput:
        """One sample; the prompt's logprobs (vLLM's: {token id: Logprob}, the prompt token first) go
        into prompt_logprobs."""
        out = CompletionOutput(index=index, text="", token_ids=[], cumulative_logprob=None,
                               logprobs=[] if params.logprobs is not None else None)
        async for delta in self._client.generate(rid, ids, params):
            for entry in delta.prompt_logprobs or []:     # the prompt token's entry first, then the others
                d = {}
                for x in entry:
                    d.setdefault(x.token_id, Logprob(x.logprob, x.rank, self.tokenizer.decode([x.token_id])))
                prompt_logprobs.append(d)
            out.text += delta.text
            out.token_ids += delta.token_ids
            for entry in delta.logprobs or []:
                out.logprobs.append({x.token_id: Logprob(x.logprob, x.rank, self.tokenizer.decode([x.token_id]))
                                     for x in entry})
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + entry[0].logprob
            if delta.finish_reason is not None:
                out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
        return out


def _shutdown(loop: _LoopThread, client, procs, ipc_dir, stop_engines) -> None:
    try:
        loop.run(_close(client), timeout=5)
    finally:
        loop.stop()
        stop_engines(procs)
        if ipc_dir:
            shutil.rmtree(ipc_dir, ignore_errors=True)


async def _close(client) -> None:
    client.shutdown()
