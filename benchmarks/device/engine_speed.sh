#!/bin/bash
# A GPU call without staging (issue 34), on the 1.5B's shape with random weights (.data/qwen15-shape: its config
# and tokenizer, benchmarks/README "Speed without the weights"): sampling's threshold kernels on CUDA against the
# sort, the engine's tests compiled on CUDA, 64 x 8,192-token outputs at 4 GiB (benchmarks/README's step 3,
# compiled, sparsity 0 and 0.5), then the sampling modes alone (step 4b). T1 / T2 / T3: seconds for the tests,
# the long generations and the sampling modes (0 skips the last two).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
RLKV_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q tests/test_engine.py -k "threshold or top_p or nucleus or filter" \
  > $OUT/tests_cuda_sampling.log 2>&1
echo "sampling tests rc=$?"; tail -5 $OUT/tests_cuda_sampling.log
timeout ${T1:-60} env RLKV_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_engine.py > $OUT/tests_cuda_engine.log 2>&1
echo "engine tests rc=$?"; tail -5 $OUT/tests_cuda_engine.log
if [ "${T2:-330}" -gt 0 ]; then
  timeout ${T2:-330} python3 benchmarks/long_generation.py --model .data/qwen15-shape --random-weights \
    --sparsities 0,0.5 --num-requests 64 --input-len 128 --output-len 8192 --ignore-eos --kv-budget 4GiB \
    --max-batch 256 --compile on --out $OUT/long_generation_qwen15_64x8192.json > $OUT/long_generation.log 2>&1
  echo "long_generation rc=$?"; grep -v "it/s\]" $OUT/long_generation.log | tail -12
fi
if [ "${T3:-120}" -gt 0 ]; then
  timeout ${T3:-120} python3 benchmarks/engine.py --model .data/qwen15-shape --random-weights --parts sampling \
    --out $OUT/engine_qwen15_sampling.json > $OUT/sampling.log 2>&1
  echo "sampling rc=$?"; tail -8 $OUT/sampling.log
fi
