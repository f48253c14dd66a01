"""The official `openai` Python SDK against a running mlx-serving server,
unchanged: chat (whole and streamed), structured output through `parse`,
lists of prompts, peer extensions through `extra_body`, and the SDK's error
classes. Run by __test__/clients.test.ts: python3 openai_client.py BASE_URL."""

import sys

import openai
from pydantic import BaseModel

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "What is the capital of France?"}]

r = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
assert r.choices[0].message.content, r
assert r.system_fingerprint and r.system_fingerprint.startswith("fp_"), r.system_fingerprint
assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop", r.usage

chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == "", chunks[0]
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens, chunks[-1]


class City(BaseModel):
    name: str
    country: str


parsed = client.chat.completions.parse(model="default", messages=messages, max_tokens=64, temperature=0, response_format=City)
assert isinstance(parsed.choices[0].message.parsed, City), parsed

c = client.completions.create(model="default", prompt=["The sky is", "Water is"], n=2, max_tokens=4, temperature=0)
assert [x.index for x in c.choices] == [0, 1, 2, 3], c
assert c.choices[0].text == c.choices[1].text and c.choices[2].text == c.choices[3].text, c

ids = client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0, extra_body={"return_token_ids": True, "min_tokens": 6})
body = ids.model_dump()
assert len(body["prompt_token_ids"]) == ids.usage.prompt_tokens, body
assert len(body["choices"][0]["token_ids"]) == ids.usage.completion_tokens == 6, body

try:
    client.chat.completions.create(model="nope", messages=messages)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert e.body["type"] == "not_found_error", e.body
try:
    client.chat.completions.create(model="default", messages=messages, temperature=2.5)
    raise AssertionError("temperature 2.5 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

print(f"openai {openai.__version__}: ok")
