"""pdserve: a disaggregated prefill/decode LLM serving cluster built on vLLM."""

__version__ = "0.1.0"
