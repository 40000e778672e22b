#!/usr/bin/env bash
# The one prepared GPU check, run on a lent CUDA machine through the device tool:
#   carry: .whl (pyzmq, structlog, transformers 5.24 wheels) and .gpu (SmolLM2's config + tokenizer)
# 0. the cost table (bench/gpu_cost_measure.py): eager and static backends, SmolLM2-135M, Qwen2.5-1.5B
#    and Llama-3-8B shapes, AR (1 token/session) and verify (5) at 1..64 sessions over a 512-token
#    prefix -> $OUT/gpu_cost_<card>.json (commit it as bench/results/), then the replay of a recorded
#    `sled bench` run: measured vs projected, then token trees: 5, 9 and 13 rows per session as chains
#    and as trees (the feature class's 8-token tree + lookup branch) -> $OUT/gpu_tree_cost_<card>.json
# 1. verifier timings (bench/gpu_verify.py): SLED verify (gamma+1 tokens) vs AR step, per batch size
# 2. `sled launch --gpus all`: one verifier per GPU registers with a broker
# 3. `sled demo --verify` with the verifier on CUDA: lossless against the target alone on CUDA
# Steps 1-3 run only with SLED_GPU_ALL=1 (device time is short: the cost table comes first).
set -u
OUT=${OUT:-/tmp/sled-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SLED_CACHE=/tmp/sled-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, zmq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
echo "== 0a. GPU cost table ($CARD)"
timeout ${SLED_COST_TIMEOUT:-420} python3 -m bench.gpu_cost_measure --out "$OUT/gpu_cost_$CARD.json" ${SLED_COST_ARGS:-} 2>&1 | tee "$OUT/gpu_cost.txt"
echo "== 0b. replay of a recorded run: measured vs projected"
RUN=$(ls bench/results/bench-default-quick-*.json 2>/dev/null | tail -n 1)
if [ -n "$RUN" ] && [ -s "$OUT/gpu_cost_$CARD.json" ]; then
  timeout ${SLED_REPLAY_TIMEOUT:-120} python3 -m bench.gpu_cost_measure --replay "$RUN" --method sled --level 16 \
    --shapes SmolLM2-135M --backends eager --table "$OUT/gpu_cost_$CARD.json" 2>&1 | tee "$OUT/gpu_replay.txt"
fi
echo "== 0c. token trees: a verify round of the same rows as chains and as trees (SmolLM2 shape)"
timeout ${SLED_TREE_TIMEOUT:-150} python3 -m bench.gpu_cost_measure --shapes SmolLM2-135M --sessions 1 4 16 32 \
  --tokens 5 9 13 --trees --out "$OUT/gpu_tree_cost_$CARD.json" 2>&1 | tee "$OUT/gpu_tree_cost.txt"
[ "${SLED_GPU_ALL:-0}" = 1 ] || exit 0

echo "== 1. verifier timings"
timeout 240 python3 -m bench.gpu_verify --dtype bfloat16 --rounds 8 2>&1 | tee "$OUT/gpu_verify.txt"

echo "== 2. sled launch --gpus all"
python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained(".gpu/smollm2-shape")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained("/tmp/smol-random")
AutoTokenizer.from_pretrained(".gpu/smollm2-shape").save_pretrained("/tmp/smol-random")
print("random-weight SmolLM2-shaped target saved")
PY
SET=(--set 'broker.frontend="tcp://127.0.0.1:6555"' --set 'broker.backend="tcp://127.0.0.1:6556"'
     --set 'verifier.target="/tmp/smol-random"' --set 'verifier.device="cuda"' --set 'verifier.threads=0'
     --set 'drafters.pi5.model="/tmp/smol-random"' --set 'drafters.pi5.client="tcp://127.0.0.1:6601"'
     --set 'drafters.ngram.client="tcp://127.0.0.1:6602"')
python3 -m pipeline "${SET[@]}" broker > "$OUT/broker.log" 2>&1 &
BROKER=$!
timeout 60 python3 -m pipeline "${SET[@]}" launch --gpus all > "$OUT/launch.log" 2>&1 &
LAUNCH=$!
sleep 30
python3 -c "
import asyncio, json
from pipeline.client import broker_stats
s = asyncio.run(broker_stats('tcp://127.0.0.1:6555'))
print('verifiers registered:', list(s['verifiers']))"
kill -TERM $LAUNCH; wait $LAUNCH; kill -TERM $BROKER; wait $BROKER
tail -n 15 "$OUT/launch.log"

echo "== 3. sled demo on CUDA, lossless check"
timeout 240 python3 -m pipeline "${SET[@]}" demo --drafters pi5,ngram --sessions 8 --max-new-tokens 48 --json --verify 2>"$OUT/demo.err" | tail -n 1 | tee "$OUT/demo.json"
tail -n 5 "$OUT/demo.err"
