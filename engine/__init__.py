"""pdcluster's shared engine core (no Ray, no gRPC): config, request, model, paged KV, scheduler, sampler."""
from engine.sampling_params import SamplingParams


def __getattr__(name):  # keep `import engine` light: torch loads only when LLM is used
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "RequestOutput":
        from engine.llm import RequestOutput
        return RequestOutput
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput"]
