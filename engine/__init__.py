"""pdcluster's shared engine core (no Ray, no gRPC): config, request, model, paged KV, scheduler, sampler."""
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.structured import StructuredOutput


def __getattr__(name):  # keep `import pdcluster.engine` light: torch loads only when LLM is used
    if name == "LLM":
        from pdcluster.engine.llm import LLM
        return LLM
    if name == "RequestOutput":
        from pdcluster.engine.llm import RequestOutput
        return RequestOutput
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "StructuredOutput"]
