#!/bin/bash
# Wait up to $1 seconds while the run goes on, then show its tail and copy its run directory to $OUT/run.
for i in $(seq 1 $(( ${1:-500} / 10 ))); do sleep 10; pgrep -f "rlkv identify" > /dev/null || break; done
pgrep -f "rlkv identify" > /dev/null && echo RUNNING || echo STOPPED
tr '\r' '\n' < /tmp/run.log | grep -v '^\s*$' | tail -25
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
mkdir -p $OUT/run
for f in curriculum.json log.jsonl checkpoint.pt heads.json; do [ -f /tmp/run/$f ] && cp /tmp/run/$f $OUT/run/; done
# the earlier steps' heads (--heads-every) in one archive: a call returns at most 8 files
ls /tmp/run/heads_step*.json > /dev/null 2>&1 && tar czf $OUT/run/heads_steps.tgz -C /tmp/run $(cd /tmp/run && ls heads_step*.json)
tr '\r' '\n' < /tmp/run.log | grep -v '^\s*$' | tail -c 4000000 > $OUT/run/run.log
[ -f /tmp/compile_failure.log ] && tr '\r' '\n' < /tmp/compile_failure.log | tail -c 2000000 > $OUT/compile_failure.log
ls -la $OUT/run
if [ -d /tmp/alongside ]; then  # alongside.sh's queue, if it was started: one archive (a call returns at most 8 files)
  tail -3 /tmp/alongside/tests.log 2>/dev/null; ls /tmp/alongside
  tar czf $OUT/alongside.tgz -C /tmp alongside && ls -la $OUT/alongside.tgz
fi
