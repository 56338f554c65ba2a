#!/bin/bash
# Beside the identification run (after identify_launch.sh, same machine): start, detached, the GPU work whose
# results do not depend on having the GPU alone (correctness and accuracy, not timings), one after the other:
# issue 37's FP8 accuracy rows at a 10 GiB KV budget with centred keys (session 21's rows, without centres, are
# in results/archive/), which leaves the identification run (its pool: 0.4 of the free memory when it starts;
# then its training step) the rest of an 80 GB GPU: full and rlkv 0.5 at FP8, and rlkv 0.5 fp8-kept (compiled;
# an engine whose step fails to compile logs why and runs eagerly); then FP8's and the engine's tests on CUDA
# (issues 34, 37: every test model compiles with inductor, so they take long); then, once the identification ends
# with its heads, issue 32's accuracy table (the paper heads at results/eval_qwen15/'s settings). Logs and run directories go to
# /tmp/alongside; identify_poll.sh brings them back as $OUT/alongside.tgz.
mkdir -p /tmp/alongside
mkdir -p /tmp/data && cp .data/heads_qwen15.json .data/data/* /tmp/data/ || exit 1
cat > /tmp/alongside/queue.sh <<'QUEUE'
export PYTHONPATH=/tmp/site:/tmp/src RLKV_DATA_DIR=/tmp/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /tmp/repo
accuracy() {  # $1: kv dtype, $2: methods, $3: sparsities, $4: run directory under /tmp/alongside
  python3 -m rlkv eval --model /tmp/models/q15.gguf --task gsm8k,math500 --method $2 --sparsity $3 \
    --heads rlkv=/tmp/data/heads_qwen15.json --max-new-tokens 1024 --prefill compressed --kv-budget 10GiB \
    --kv-dtype $1 --data-dir /tmp/data --out /tmp/alongside/$4 > /tmp/alongside/$4.log 2>&1
}
accuracy fp8 full,rlkv 0.5 eval_qwen15_kv_fp8
accuracy fp8-kept rlkv 0.5 eval_qwen15_kv_fp8_kept
RLKV_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_precision.py tests/test_engine.py tests/test_logprobs.py \
  > /tmp/alongside/tests.log 2>&1
# issue 32's table, as soon as the identification writes its heads (the session it ends in): the paper recipe's
# heads beside the full cache at results/eval_qwen15/'s settings (its baselines' rows stand); resumable
while pgrep -f "rlkv identify" > /dev/null; do sleep 10; done
if [ -f /tmp/run/heads.json ]; then
  python3 -m rlkv eval --model /tmp/models/q15.gguf --task gsm8k,math500,aime24,mbpp --method full,rlkv \
    --sparsity 0.2,0.4,0.5,0.6,0.8 --heads rlkv=/tmp/run/heads.json --max-new-tokens 1024 --batch-size 512 \
    --match-bytes --data-dir /tmp/data --out /tmp/alongside/eval_qwen15_paper > /tmp/alongside/eval_qwen15_paper.log 2>&1
fi
# the ablation's first row: the same run's heads after one epoch (93 of 186 steps, kept by --heads-every 31) at 0.4 and
# 0.5 on GSM8K and MATH-500, in the session that reaches step 93 or any later one (resumable)
if [ -f /tmp/run/heads_step0093.json ]; then
  python3 -m rlkv eval --model /tmp/models/q15.gguf --task gsm8k,math500 --method rlkv --sparsity 0.4,0.5 \
    --heads rlkv=/tmp/run/heads_step0093.json --max-new-tokens 1024 --batch-size 512 --match-bytes \
    --data-dir /tmp/data --out /tmp/alongside/eval_qwen15_paper_step93 > /tmp/alongside/eval_qwen15_paper_step93.log 2>&1
fi
echo QUEUE DONE > /tmp/alongside/done
QUEUE
rm -rf /tmp/repo && mkdir -p /tmp/repo && cp -r tests benchmarks pyproject.toml /tmp/repo/ && ln -sfn /tmp/src /tmp/repo/src
cd /tmp && setsid nohup bash /tmp/alongside/queue.sh > /tmp/alongside/queue.log 2>&1 < /dev/null &
sleep 20
tail -5 /tmp/alongside/tests.log 2>/dev/null
