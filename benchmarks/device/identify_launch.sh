#!/bin/bash
# Assemble the staged 1.5B, install the wheels, freeze the code, start (or resume) an identification run.
# RUN (default /tmp/run: the paper run) is its directory on the device, .data/$(basename $RUN) what it resumes from
# (for a new run directory: only the paper run's curriculum, .data/run/curriculum.json); EXTRA, options added to the
# paper run's command (an ablation: RUN=/tmp/run_block1 EXTRA="--block 1 --steps 93").
RUN=${RUN:-/tmp/run}
mkdir -p /tmp/models /tmp/data $RUN
if [ ! -f /tmp/models/q15.gguf ]; then
  cat /tmp/stage/qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf.part* > /tmp/models/q15.gguf
  echo 'cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  /tmp/models/q15.gguf' | sha256sum -c || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/src && cp -r src /tmp/src && cp .data/data/* /tmp/data/
src=.data/$(basename $RUN)  # the committed run directory; a relaunch keeps what ran here
if [ -d $src ]; then cp -rn $src/* $RUN/; elif [ -f .data/run/curriculum.json ]; then cp -n .data/run/curriculum.json $RUN/; fi
export PYTHONPATH=/tmp/site:/tmp/src RLKV_DATA_DIR=/tmp/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # the training step beside the rollout engine's pool
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
start() {  # $1: RLKV_COMPILE for the rollouts' engine
  cd /tmp && RLKV_COMPILE=$1 setsid nohup python3 -m rlkv identify --model /tmp/models/q15.gguf \
    --task math_train+gsm8k_train --out $RUN --check-limit 0 --checkpoint-every 1 --heads-every 31 \
    --rollout-batch-size 256 $EXTRA > $RUN.log 2>&1 < /dev/null &
}
# until the rollouts' engine is built (the decode step compiled), or the run stops: if it stops compiled,
# it starts again eagerly (it resumes; no sample is lost)
compile=${RLKV_COMPILE:-1}
start $compile
for i in $(seq 1 45); do
  sleep 10
  grep -q "samples 1-\|samples 3-\|rlkv identify:" $RUN.log && break
  if ! pgrep -f "out $RUN " > /dev/null; then
    [ "$compile" = 0 ] && break
    echo "the run stopped with the compiled step: starting it eagerly (RLKV_COMPILE=0)"
    tr '\r' '\n' < $RUN.log | grep -E "Error|error" | tail -3
    cp $RUN.log /tmp/compile_failure.log  # the whole traceback: identify_poll.sh returns it
    compile=0 && start 0
  fi
done
tr '\r' '\n' < $RUN.log | grep -v '^\s*$' | tail -20
