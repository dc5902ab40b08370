"""afd: Attention-FFN disaggregated serving for Mixture-of-Experts models (Step3 first)."""

from afd.llm import LLM
from afd.outputs import CompletionOutput, RequestOutput
from afd.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
