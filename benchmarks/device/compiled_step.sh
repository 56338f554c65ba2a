#!/bin/bash
# A GPU call without staging (issue 34): the engine's tests compiled on CUDA, then the decode step at 256 x 4,096
# on the 1.5B's shape with random weights (.data/qwen15-shape: its config and tokenizer, benchmarks/README
# "Speed without the weights"), then the sampling modes alone. T1 / T2 / T3: seconds for each part (0 skips the
# decode step or the sampling modes).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
timeout ${T1:-280} env RLKV_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_engine.py > $OUT/tests_cuda_engine.log 2>&1
echo "tests rc=$?"; tail -25 $OUT/tests_cuda_engine.log
if [ "${T2:-250}" -gt 0 ]; then
  timeout ${T2:-250} python3 benchmarks/decode_limit.py --model .data/qwen15-shape --random-weights --batches 256 \
    --sparsities 0,0.5 --context 4096 --compile on,off --profile-tokens 4 \
    --out $OUT/decode_limit_qwen15_compiled_256x4096.json > $OUT/decode_limit.log 2>&1
  echo "decode_limit rc=$?"; tail -40 $OUT/decode_limit.log
fi
if [ "${T3:-120}" -gt 0 ]; then
  timeout ${T3:-120} python3 benchmarks/engine.py --model .data/qwen15-shape --random-weights --parts sampling \
    --out $OUT/engine_qwen15_sampling.json > $OUT/sampling.log 2>&1
  echo "sampling rc=$?"; tail -8 $OUT/sampling.log
fi
