"""Anthropic's Messages API and OpenAI's Responses API through `tally proxy`, with the official
`anthropic` and `openai` SDKs, against a loopback upstream speaking each wire format: every billed
call is in the spend log once, with its usage (cache classes included)."""

import json
import urllib.request

import anthropic
import openai
import pytest

from conftest import run_proxy
from fake_upstream import ANSWER, Upstream

ANTHROPIC_KEY = "sk-ant-upstream-key"
OPENAI_KEY = "sk-openai-upstream-key"
AZURE_KEY = "azure-upstream-key"


def config(base: str) -> str:
    return f"""
model_list:
  - model_name: claude-sonnet-4-5
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: {base}
      api_key: {ANTHROPIC_KEY}
  - model_name: gpt-4.1
    litellm_params:
      model: openai/gpt-4.1
      api_base: {base}/v1
      api_key: {OPENAI_KEY}
  - model_name: azure-gpt
    litellm_params:
      model: azure/my-gpt41
      api_base: {base}
      api_key: {AZURE_KEY}
      api_version: "2025-03-01-preview"
    model_info:
      base_model: azure/gpt-4.1
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def agents(upstream, tmp_path_factory):
    yield from run_proxy(config(upstream.base_url), tmp_path_factory.mktemp("tally-agents"))


@pytest.fixture(scope="module")
def key(agents):
    return agents.generate_key({"team_id": "agents-team"})


def new_records(proxy, before: int) -> list[dict]:
    return proxy.records()[before:]


def anthropic_client(proxy, key) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key["key"], base_url=proxy.base_url, max_retries=0)


def assert_anthropic_usage(record: dict):
    assert record["call_type"] == "anthropic_messages"
    # Anthropic's input_tokens leaves the cache out; the record counts the whole prompt.
    assert record["input_tokens"] == 21 + 100 + 2000
    assert record["output_tokens"] == 9
    assert record["cache_read_input_tokens"] == 2000
    assert record["cache_creation_input_tokens"] == 100
    assert record["upstream_model"] == "claude-sonnet-4-5-20250929"
    assert record["usage_estimated"] is False
    assert record["status"] == "success"
    assert record["response_cost"] > 0


def test_anthropic_sdk_create_is_billed_once_with_cache_usage(agents, upstream, key):
    client = anthropic_client(agents, key)
    before = len(agents.records())
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        metadata={"user_id": "customer-7"},
        extra_headers={"anthropic-version": "2023-06-01"},
    )
    message = raw.parse()
    assert message.content[0].text == ANSWER
    record = agents.record(raw.headers["x-litellm-call-id"])
    assert len(new_records(agents, before)) == 1
    assert_anthropic_usage(record)
    assert record["end_user_id"] == "customer-7"
    assert record["team_id"] == "agents-team" and record["stream"] is False
    sent = upstream.last("/v1/messages")
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY, "the deployment's key, never the tally key"
    assert "authorization" not in sent["headers"]
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["model"] == "claude-sonnet-4-5"
    assert sent["body"]["metadata"] == {"user_id": "customer-7"}


def test_anthropic_sdk_stream_is_billed_before_message_stop(agents, upstream, key):
    client = anthropic_client(agents, key)
    before = len(agents.records())
    seen_before_stop = None
    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31", "x-litellm-end-user-id": "customer-8"},
    ) as stream:
        for event in stream:
            if event.type == "message_stop":
                seen_before_stop = len(new_records(agents, before))
        final = stream.get_final_message()
    assert "".join(b.text for b in final.content) == ANSWER
    assert final.usage.output_tokens == 9
    assert seen_before_stop == 1, "the record is written before message_stop reaches the client"
    records = new_records(agents, before)
    assert len(records) == 1
    assert_anthropic_usage(records[0])
    assert records[0]["stream"] is True and records[0]["end_user_id"] == "customer-8"
    sent = upstream.last("/v1/messages")
    assert sent["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"


def test_anthropic_count_tokens_is_relayed_not_billed(agents, upstream, key):
    client = anthropic_client(agents, key)
    before = len(agents.records())
    count = client.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens == 42
    assert new_records(agents, before) == []
    sent = upstream.last("/v1/messages/count_tokens")
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY
    # A client that names no version gets Anthropic's default one (and the route answers without /v1).
    request = urllib.request.Request(
        agents.base_url + "/messages/count_tokens?beta=true",
        data=json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response) == {"input_tokens": 42}
    assert upstream.last("/v1/messages/count_tokens")["headers"]["anthropic-version"] == "2023-06-01"
    assert new_records(agents, before) == []


def test_messages_to_a_non_anthropic_model_is_a_400_in_anthropic_shape(agents, key):
    client = anthropic_client(agents, key)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="gpt-4.1", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    body = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert '"gpt-4.1"' in body["error"]["message"] and "anthropic/" in body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(api_key="sk-nope", base_url=agents.base_url, max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["error"]["type"] == "authentication_error"


def assert_responses_usage(record: dict):
    assert record["call_type"] == "responses"
    assert record["input_tokens"] == 1500 and record["output_tokens"] == 40
    assert record["cache_read_input_tokens"] == 1024
    assert record["reasoning_tokens"] == 16
    assert record["status"] == "success" and record["usage_estimated"] is False
    assert record["response_cost"] > 0


@pytest.mark.parametrize("model", ["gpt-4.1", "azure-gpt"])
def test_openai_sdk_responses_create_is_billed(agents, upstream, key, model):
    client = openai.OpenAI(api_key=key["key"], base_url=agents.base_url, max_retries=0)
    before = len(agents.records())
    raw = client.responses.with_raw_response.create(model=model, input="hi", user="customer-9")
    response = raw.parse()
    assert response.output_text == ANSWER
    record = agents.record(raw.headers["x-litellm-call-id"])
    assert len(new_records(agents, before)) == 1
    assert_responses_usage(record)
    assert record["end_user_id"] == "customer-9" and record["model"] == model
    if model == "azure-gpt":
        sent = upstream.last("/openai/responses")
        assert sent["path"] == "/openai/responses?api-version=2025-03-01-preview"
        assert sent["headers"]["api-key"] == AZURE_KEY
        assert sent["body"]["model"] == "my-gpt41"
    else:
        sent = upstream.last("/v1/responses")
        assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
        assert sent["body"]["model"] == "gpt-4.1"


def test_openai_sdk_responses_stream_is_billed_before_completed(agents, key):
    client = openai.OpenAI(api_key=key["key"], base_url=agents.base_url, max_retries=0)
    before = len(agents.records())
    text = ""
    seen_before_completed = None
    last = None
    for event in client.responses.create(
        model="gpt-4.1", input="hi", stream=True, extra_body={"safety_identifier": "customer-10"}
    ):
        last = event.type
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            seen_before_completed = len(new_records(agents, before))
            assert event.response.usage.input_tokens == 1500
    assert last == "response.completed"
    assert text.strip() == ANSWER
    assert seen_before_completed == 1
    records = new_records(agents, before)
    assert len(records) == 1
    assert_responses_usage(records[0])
    assert records[0]["stream"] is True and records[0]["end_user_id"] == "customer-10"


@pytest.mark.parametrize("model", [None, "azure-gpt"])
def test_stored_responses_are_fetched_and_deleted_unbilled(agents, upstream, key, model):
    client = openai.OpenAI(api_key=key["key"], base_url=agents.base_url, max_retries=0)
    before = len(agents.records())
    query = {"model": model} if model else None
    response = client.responses.retrieve("resp_abc123", extra_query=query)
    assert response.id == "resp_abc123" and response.output_text == ANSWER
    client.responses.delete("resp_abc123", extra_query=query)
    assert new_records(agents, before) == []
    get, delete = [r for r in upstream.requests if r.get("method") in ("GET", "DELETE")][-2:]
    assert (get["method"], delete["method"]) == ("GET", "DELETE")
    if model:
        assert get["path"] == "/openai/responses/resp_abc123?api-version=2025-03-01-preview"
        assert delete["headers"]["api-key"] == AZURE_KEY
    else:
        # No ?model=: the first deployment that answers the Responses API (gpt-4.1, openai/).
        assert get["path"] == "/v1/responses/resp_abc123"
        assert delete["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_openai_chat_to_an_anthropic_model_is_translated_and_billed(agents, upstream, key):
    client = openai.OpenAI(api_key=key["key"], base_url=agents.base_url, max_retries=0)
    before = len(agents.records())
    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        user="customer-11",
        stop=["END"],
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 2121 and completion.usage.completion_tokens == 9
    record = agents.record(raw.headers["x-litellm-call-id"])
    assert record["call_type"] == "chat_completion" and record["end_user_id"] == "customer-11"
    assert (record["input_tokens"], record["cache_read_input_tokens"], record["cache_creation_input_tokens"]) == (2121, 2000, 100)
    sent = upstream.last("/v1/messages")
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    body = sent["body"]
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert body["max_tokens"] == 4096 and body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "customer-11"}

    # A tool call, whole.
    completion = client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    sent = upstream.last("/v1/messages")["body"]
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert sent["tools"][0]["input_schema"] == WEATHER_TOOL["function"]["parameters"]
    assert len(new_records(agents, before)) == 2


def test_openai_chat_stream_to_an_anthropic_model_with_a_tool_call(agents, key):
    client = openai.OpenAI(api_key=key["key"], base_url=agents.base_url, max_retries=0)
    before = len(agents.records())
    text, arguments, name, finish, usage = "", "", None, None, None
    for chunk in client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                name = call.function.name or name
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert text == ANSWER
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    assert usage.prompt_tokens == 2121 and usage.completion_tokens == 9
    records = new_records(agents, before)
    assert len(records) == 1
    assert records[0]["call_type"] == "chat_completion" and records[0]["stream"] is True
    assert (records[0]["input_tokens"], records[0]["output_tokens"], records[0]["cache_read_input_tokens"]) == (2121, 9, 2000)
    assert records[0]["usage_estimated"] is False
