#!/usr/bin/env bash
# Issue 3 acceptance: with `sled up` running, the openai client streams a chat completion and curl
# gets the same text non-streamed; both equal to the target's own greedy decoding.
set -u
cd "${1:-$(dirname "$0")/..}"
.venv/bin/sled up > /tmp/sled-up.log 2>&1 &
UP=$!
for i in $(seq 1 120); do curl -sf localhost:8000/ready >/dev/null && break; sleep 2; done
curl -s localhost:8000/ready; echo
.venv/bin/python - <<'PY'
import json, subprocess
from openai import OpenAI
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.reference import greedy_reference
msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
stream = client.chat.completions.create(model="pi5", messages=msgs, temperature=0, max_tokens=40, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
body = json.dumps({"model": "ngram", "messages": msgs, "temperature": 0, "max_tokens": 40})
out = subprocess.run(["curl", "-s", "localhost:8000/v1/chat/completions", "-H", "content-type: application/json", "-d", body],
                     capture_output=True, text=True).stdout
curl_text = json.loads(out)["choices"][0]["message"]["content"]
tok = load_tokenizer("smollm2"); model = load_causal_lm("smollm2")
prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
ref = tok.decode(greedy_reference(model, list(prompt), 40, [tok.eos_token_id]), skip_special_tokens=True)
print("openai streamed:", repr(streamed))
print("curl:           ", repr(curl_text))
print("target alone:   ", repr(ref))
print("streamed == target:", streamed.strip() == ref.strip(), "| curl == target:", curl_text.strip() == ref.strip())
PY
curl -s localhost:8000/metrics | grep -E "^sled_(acceptance|batch_sessions_count|generated_tokens)" | head -8
.venv/bin/sled status
kill -INT $UP; wait $UP; echo "sled up exited $?"
