"""LiteLLM's own cost of each case in tests/pricing/cases.json, for the oracle test.

    python oracle.py PRICES_JSON CASES_JSON   ->   {"<case name>": <cost in USD>, ...} on stdout

PRICES_JSON replaces LiteLLM's price map, so both sides price from the same table. Each case's
usage is read the way LiteLLM reads that provider's answer: `Usage(**usage)` for OpenAI-shaped
usage, Anthropic's and the Responses API's own transformations for theirs.
"""

import json
import os
import sys

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # never fetch prices from the network

import litellm  # noqa: E402
from litellm import EmbeddingResponse, ModelResponse, Usage  # noqa: E402
from litellm.llms.anthropic.chat.transformation import AnthropicConfig  # noqa: E402
from litellm.responses.utils import ResponseAPILoggingUtils  # noqa: E402


def usage_of(case):
    raw = case["usage"]
    shape = case["shape"]
    if shape == "anthropic":
        return AnthropicConfig().calculate_usage(usage_object=raw, reasoning_content=None)
    if shape == "responses":
        return ResponseAPILoggingUtils._transform_response_api_usage_to_chat_usage(raw)
    return Usage(**raw)


def cost(case):
    usage = usage_of(case)
    provider, model = case["provider"], case["model"]
    if case["shape"] == "embedding":
        response = EmbeddingResponse(model=model, usage=usage)
        return litellm.completion_cost(
            completion_response=response, model=model, custom_llm_provider=provider,
            call_type="embedding",
        )
    response = ModelResponse(model=model, usage=usage)
    return litellm.completion_cost(
        completion_response=response, model=model, custom_llm_provider=provider
    )


def main():
    prices_path, cases_path = sys.argv[1], sys.argv[2]
    with open(prices_path) as f:
        litellm.model_cost = json.load(f)
    with open(cases_path) as f:
        cases = json.load(f)
    json.dump({case["name"]: cost(case) for case in cases}, sys.stdout)


if __name__ == "__main__":
    main()
