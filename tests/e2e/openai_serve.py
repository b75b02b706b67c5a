"""The official `openai` package against `lathe serve`'s inference API: chat and text
completions, streamed and not, concurrent streams equal to their single-request output,
`n`, seeds, logprobs, stop strings, structured outputs (`response_format` with a JSON
schema, parsed into a pydantic model by the client), a fine-tuned model served as an
adapter over the base, OpenAI-shaped errors after which the server keeps serving, and
vLLM-named metrics.

Run by tests/e2e/service.rs with the venv scripts/setup.sh makes:
    python openai_serve.py BASE_URL TOKEN PROJECT BASE_MODEL FINE_TUNED_MODEL
"""

import json
import sys
import threading
import urllib.error
import urllib.request

import openai
from openai import OpenAI
from pydantic import BaseModel, Field
from typing import Literal

base, token, project, base_model, ft_model = sys.argv[1:6]
client = OpenAI(base_url=f"{base}/v1", api_key=token, project=project, max_retries=0)


def ask(question, **kw):
    args = dict(model=base_model, messages=[{"role": "system", "content": "You are a concise assistant."},
                                             {"role": "user", "content": question}],
                temperature=0, max_tokens=24)
    args.update(kw)
    return client.chat.completions.create(**args)


def streamed(question, **kw):
    chunks = list(ask(question, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, chunks
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0, chunks[-1]
    return text, finish[0], chunks[-1].usage


# One request, whole and streamed.
r = ask("What is the capital of France?")
assert r.object == "chat.completion" and r.id.startswith("chatcmpl"), r
c = r.choices[0]
assert c.message.role == "assistant" and "Paris" in c.message.content, c
assert c.finish_reason in ("stop", "length"), c
assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
text, finish, usage = streamed("What is the capital of France?")
assert (text, finish) == (c.message.content, c.finish_reason), (text, c)
assert usage.completion_tokens == r.usage.completion_tokens

# Concurrent streams each equal their single-request output.
questions = ["Name three primary colours.", "What is 12 times 12?", "Say hello in Spanish.", "Write a haiku about invoices."]
alone = {q: ask(q).choices[0].message.content for q in questions}
together, errors = {}, []


def run(q):
    try:
        together[q] = streamed(q)[0]
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(repr(e))


threads = [threading.Thread(target=run, args=(q,)) for q in questions]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
assert together == alone, (together, alone)

# n samples, reproducible by seed; the prompt counts once in the usage.
one = ask("Tell me a colour.", n=1, temperature=1.0, seed=7)
r = ask("Tell me a colour.", n=3, temperature=1.0, seed=7)
assert [ch.index for ch in r.choices] == [0, 1, 2], r
assert r.choices[0].message.content == one.choices[0].message.content
assert r.model_dump()["choices"] == ask("Tell me a colour.", n=3, temperature=1.0, seed=7).model_dump()["choices"]
assert r.usage.prompt_tokens == one.usage.prompt_tokens, (r.usage, one.usage)

# Logprobs: one entry per token, greedy picks the best.
r = ask("What is 2 + 2?", logprobs=True, top_logprobs=3, max_tokens=8)
lps = r.choices[0].logprobs.content
assert len(lps) == r.usage.completion_tokens, (len(lps), r.usage)
for lp in lps:
    assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token and lp.logprob <= 0, lp

# Stop strings end the text before them.
r = ask("List three fruits, one per line.", stop=["\n"], max_tokens=40)
assert "\n" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop", r

# Structured outputs: the client's own parse() turns the answer into a pydantic model,
# which validates it; streamed and whole agree; json_object gives an object.
class Line(BaseModel):
    description: str = Field(max_length=20)
    amount: int = Field(ge=0, le=1000)


class Invoice(BaseModel):
    number: str = Field(max_length=12)
    currency: Literal["EUR", "USD", "GBP"]
    paid: bool
    lines: list[Line] = Field(max_length=3)


note = "Invoice INV-0042 from ACME: 2 widgets for 12 EUR and shipping for 7 EUR. Already paid."
messages = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": f"Extract the invoice as JSON.\n\n{note}"}]
parsed = client.chat.completions.parse(model=base_model, messages=messages, response_format=Invoice, temperature=0, max_tokens=200)
choice = parsed.choices[0]
assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Invoice), choice
again = client.chat.completions.parse(model=base_model, messages=messages, response_format=Invoice, temperature=0.9, seed=3, n=4, max_tokens=200)
assert all(isinstance(ch.message.parsed, Invoice) for ch in again.choices), again
# By hand, as parse() sends it: no keys beyond the model's.
schema = Invoice.model_json_schema()
for obj in [schema, *schema.get("$defs", {}).values()]:
    obj["additionalProperties"] = False
fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema, "strict": True}}
text, finish, _ = streamed(f"Extract the invoice as JSON.\n\n{note}", response_format=fmt, max_tokens=200)
assert finish == "stop", text
assert Invoice.model_validate_json(text) == choice.message.parsed, (text, choice.message.parsed)
r = ask("What is the capital of France? Answer with a JSON object whose only key is \"capital\".",
        response_format={"type": "json_object"}, max_tokens=60)
assert "Paris" in json.loads(r.choices[0].message.content)["capital"], r

# Text completions, with echo and the legacy logprobs.
r = client.completions.create(model=base_model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
assert r.object == "text_completion" and r.choices[0].text, r
assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens, r
e = client.completions.create(model=base_model, prompt="The capital of France is", max_tokens=6, temperature=0, echo=True)
assert e.choices[0].text == "The capital of France is" + r.choices[0].text, (e, r)
parts = list(client.completions.create(model=base_model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
assert "".join(p.choices[0].text for p in parts) == r.choices[0].text, parts

# The fine-tuned model runs as its adapter over the base.
r = client.chat.completions.create(model=ft_model, messages=[{"role": "user", "content": "Invoice INV-1 from Acme, total 12.50 EUR"}],
                                   temperature=0, max_tokens=16)
assert r.model == ft_model and r.choices[0].message.content, r
text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
    model=ft_model, messages=[{"role": "user", "content": "Invoice INV-1 from Acme, total 12.50 EUR"}], temperature=0, max_tokens=16, stream=True)
    if ch.choices)
assert text == r.choices[0].message.content, (text, r)

# Errors have OpenAI's shape, and the server keeps serving.
try:
    ask("hi", model="no-such-model")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found" and e.param == "model", e.body
try:
    ask("hi", max_tokens=100000)
    raise SystemExit("a request past the context was accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded" and "maximum context length" in e.message, e.body
try:
    ask("hi", temperature=-1)
    raise SystemExit("a negative temperature was accepted")
except openai.BadRequestError as e:
    assert e.param == "temperature", e.body
for bad in [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
            {"type": "json_schema", "json_schema": {"name": "no spaces allowed", "schema": {"type": "object"}}},
            {"type": "xml"}]:
    try:
        ask("hi", response_format=bad)
        raise SystemExit(f"the response_format {bad} was accepted")
    except openai.BadRequestError as e:
        assert e.param == "response_format", e.body
req = urllib.request.Request(f"{base}/v1/chat/completions", data=b'{"model": "x", "messages": [', method="POST",
                             headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
try:
    urllib.request.urlopen(req)
    raise SystemExit("a malformed body was accepted")
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    assert e.code == 400 and "invalid request body" in body["error"]["message"], body
assert "Paris" in ask("What is the capital of France?").choices[0].message.content

# vLLM's metric names, for existing dashboards.
metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_count",
             "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
             "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total",
             "lathe:lora_adapter_loads_total"]:
    assert name in metrics, name
line = next(l for l in metrics.splitlines() if l.startswith(f'vllm:generation_tokens_total{{model_name="{base_model}"}}'))
assert int(line.split()[-1]) > 100, line
print(json.dumps({"ok": True}))
