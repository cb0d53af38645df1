"""LiteLLM's "Billing with Lago" flows, run with the official OpenAI SDK and LangChain against a
running `tally proxy`, checking what each call wrote to the spend log."""

import openai
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

MESSAGES = [{"role": "user", "content": "this is a test request, write a short poem"}]
MOCK_TEXT = "Hello from the tally mock model!"


def sdk_call(client: openai.OpenAI, **kwargs) -> tuple[str, str]:
    """One chat call; returns (answer text, x-litellm-call-id)."""
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, **kwargs)
    completion = raw.parse()
    return completion.choices[0].message.content, raw.headers["x-litellm-call-id"]


def langchain_call(proxy, api_key: str, **kwargs) -> dict:
    """One LangChain call; returns the spend record it produced (the newest one)."""
    before = len(proxy.records())
    chat = ChatOpenAI(base_url=proxy.base_url, api_key=api_key, model="gpt-4o", temperature=0.1, **kwargs)
    answer = chat.invoke([HumanMessage(content="this is a test request, write a short poem")])
    assert answer.content == MOCK_TEXT
    records = proxy.records()
    assert len(records) == before + 1, "the record is written before the response returns"
    return records[-1]


def test_team_key_flow(proxy):
    key = proxy.generate_key({"team_id": "my-unique-id"})
    assert key["key"].startswith("sk-") and key["team_id"] == "my-unique-id"
    client = openai.OpenAI(api_key=key["key"], base_url=proxy.base_url)
    text, call_id = sdk_call(client)
    assert text == MOCK_TEXT
    record = proxy.record(call_id)
    assert record["team_id"] == "my-unique-id"
    assert record["key_hash"] == key["token"]
    assert record["status"] == "success"
    assert record["input_tokens"] > 0 and record["output_tokens"] > 0

    record = langchain_call(proxy, key["key"])
    assert record["team_id"] == "my-unique-id"
    assert record["user_id"] is None


def test_end_user_flow(proxy):
    client = openai.OpenAI(api_key=proxy.master_key, base_url=proxy.base_url)
    text, call_id = sdk_call(client, user="my_customer_id")
    assert text == MOCK_TEXT
    record = proxy.record(call_id)
    assert record["end_user_id"] == "my_customer_id"
    assert record["key_hash"] is None, "the master key carries no identity"

    record = langchain_call(proxy, proxy.master_key, extra_body={"user": "my_customer_id"})
    assert record["end_user_id"] == "my_customer_id"


def test_user_key_flow(proxy):
    key = proxy.generate_key({"user_id": "my-unique-id"})
    client = openai.OpenAI(api_key=key["key"], base_url=proxy.base_url)
    _, call_id = sdk_call(client)
    record = proxy.record(call_id)
    assert record["user_id"] == "my-unique-id"
    assert record["team_id"] is None
    record = langchain_call(proxy, key["key"])
    assert record["user_id"] == "my-unique-id"


def test_streaming_with_the_sdk(proxy):
    key = proxy.generate_key({"team_id": "streaming-team"})
    client = openai.OpenAI(api_key=key["key"], base_url=proxy.base_url)
    before = len(proxy.records())
    pieces = []
    usage = None
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, user="stream-customer",
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == MOCK_TEXT
    records = proxy.records()
    assert len(records) == before + 1
    record = records[-1]
    assert record["stream"] is True
    assert record["team_id"] == "streaming-team"
    assert record["end_user_id"] == "stream-customer"
    assert usage is not None
    assert (record["input_tokens"], record["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_bad_key_is_an_openai_authentication_error(proxy):
    client = openai.OpenAI(api_key="sk-not-a-key-0000000000000000", base_url=proxy.base_url, max_retries=0)
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.AuthenticationError as error:
        assert error.status_code == 401
    else:
        raise AssertionError("a bad key must be refused")
