"""afd: Attention-FFN disaggregated serving for Mixture-of-Experts models (Step3 first)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afd.llm import LLM
    from afd.outputs import CompletionOutput, RequestOutput
    from afd.sampling_params import SamplingParams, StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_LAZY = {
    "LLM": "afd.llm",
    "SamplingParams": "afd.sampling_params",
    "StructuredOutputs": "afd.sampling_params",
    "RequestOutput": "afd.outputs",
    "CompletionOutput": "afd.outputs",
}


def __getattr__(name: str) -> Any:
    # imported on first use, so light commands (afd-plan) do not pay for torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'afd' has no attribute {name!r}")
