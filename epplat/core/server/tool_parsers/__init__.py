"""Tool-call parsers (vLLM's ``--tool-call-parser NAME``), registered as plugins: a package can add
a format through the ``epplat_tool_parsers`` hook."""

from __future__ import annotations

import importlib

from epplat.hookspecs import Registration, hookimpl


def _lazy(module: str, cls: str):
    return lambda: getattr(importlib.import_module(f"epplat.core.server.tool_parsers.{module}"), cls)


@hookimpl
def epplat_tool_parsers():
    return [Registration("hermes", _lazy("hermes", "HermesToolParser"), help="<tool_call> JSON (Qwen2.5, Qwen3)"),
            Registration("llama3_json", _lazy("llama3_json", "Llama3JsonToolParser"),
                         help="bare JSON calls (Llama 3.1-3.3)"),
            Registration("mistral", _lazy("mistral", "MistralToolParser"), help="[TOOL_CALLS] (Mistral, Mixtral)"),
            Registration("deepseek_v3", _lazy("deepseek_v3", "DeepSeekV3ToolParser"),
                         help="<｜tool▁calls▁begin｜> (DeepSeek-V3, R1)")]
