#!/bin/bash
# Beside the identification run (after identify_launch.sh, same machine): start, detached, the GPU work whose
# results do not depend on having the GPU alone (correctness and accuracy, not timings), one after the other:
# the engine's and FP8's tests on CUDA (issues 34, 37), n samples on one prompt (issue 35), and the FP8 accuracy
# rows (issue 37) at a 10 GiB KV budget, which leaves the identification run (its pool: 0.4 of the free memory
# when it starts; then its training step) the rest of an 80 GB GPU. Logs and JSON go to
# /tmp/alongside; identify_poll.sh brings them back as $OUT/alongside.tgz.
mkdir -p /tmp/alongside
mkdir -p /tmp/data && cp .data/heads_qwen15.json .data/data/* /tmp/data/ || exit 1
cat > /tmp/alongside/queue.sh <<'QUEUE'
export PYTHONPATH=/tmp/site:/tmp/src RLKV_DATA_DIR=/tmp/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /tmp/repo
RLKV_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_engine.py tests/test_precision.py tests/test_logprobs.py \
  > /tmp/alongside/tests.log 2>&1 || { echo "tests failed: the rest runs eagerly (RLKV_COMPILE=0)" >> /tmp/alongside/tests.log; export RLKV_COMPILE=0; }
python3 benchmarks/shared_prompt.py --model /tmp/models/q15.gguf --heads /tmp/data/heads_qwen15.json \
  --sparsities 0,0.5 --n 8 --prompt-tokens 1024 --max-tokens 8192 --kv-budget 10GiB \
  --out /tmp/alongside/shared_prompt_qwen15_n8x8192.json > /tmp/alongside/shared_prompt.log 2>&1
for dtype in bf16 fp8; do
  python3 -m rlkv eval --model /tmp/models/q15.gguf --task gsm8k,math500 --method full,rlkv --sparsity 0.5 \
    --heads rlkv=/tmp/data/heads_qwen15.json --max-new-tokens 1024 --prefill compressed --kv-budget 10GiB \
    --kv-dtype $dtype --data-dir /tmp/data --out /tmp/alongside/eval_qwen15_kv_$dtype > /tmp/alongside/eval_$dtype.log 2>&1
done
echo QUEUE DONE > /tmp/alongside/done
QUEUE
rm -rf /tmp/repo && mkdir -p /tmp/repo && cp -r tests benchmarks pyproject.toml /tmp/repo/ && ln -sfn /tmp/src /tmp/repo/src
cd /tmp && setsid nohup bash /tmp/alongside/queue.sh > /tmp/alongside/queue.log 2>&1 < /dev/null &
sleep 20
tail -5 /tmp/alongside/tests.log 2>/dev/null
