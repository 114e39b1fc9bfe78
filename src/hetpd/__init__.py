"""hetpd: heterogeneous prefill/decode LLM serving and planning."""

from hetpd.llm import LLM
from hetpd.outputs import CompletionOutput, RequestOutput
from hetpd.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
