#!/bin/bash
# Beside the identification run (after identify_launch.sh, same machine): start, detached, the GPU work whose
# results do not depend on having the GPU alone (correctness and accuracy, not timings), one after the other:
# FP8's and the engine's tests on CUDA (issues 34, 37: every test model compiles with inductor, so they take long);
# then, once the identification ends with its heads, issue 32's accuracy table (the paper heads at
# results/eval_qwen15/'s settings) and the one-epoch heads' rows. (Issue 37's FP8 accuracy rows ran here in
# session 23: results/eval_qwen15_kv_fp8*/.) Logs and run directories go to /tmp/alongside; identify_poll.sh
# brings them back as $OUT/alongside.tgz; a session's unfinished evaluations, carried in .data/alongside/, resume.
mkdir -p /tmp/alongside
[ -d .data/alongside ] && cp -rn .data/alongside/eval_* /tmp/alongside/  # an earlier call's evaluations resume
mkdir -p /tmp/data && cp .data/heads_qwen15.json .data/data/* /tmp/data/ || exit 1
cat > /tmp/alongside/queue.sh <<'QUEUE'
export PYTHONPATH=/tmp/site:/tmp/src RLKV_DATA_DIR=/tmp/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /tmp/repo
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
tail -5 /tmp/alongside/tests.log 2>/dev/null; true  # (none yet: the call still succeeds)
