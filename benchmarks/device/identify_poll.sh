#!/bin/bash
# Wait up to $1 seconds while the run RUN (default /tmp/run, as identify_launch.sh) goes on, then show its tail and
# copy its run directory to $OUT/$(basename $RUN).
RUN=${RUN:-/tmp/run}
name=$(basename $RUN)
for i in $(seq 1 $(( ${1:-500} / 10 ))); do sleep 10; pgrep -f "out $RUN " > /dev/null || break; done
pgrep -f "out $RUN " > /dev/null && echo RUNNING || echo STOPPED
tr '\r' '\n' < $RUN.log | grep -v '^\s*$' | tail -25
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
mkdir -p $OUT/$name
for f in curriculum.json log.jsonl checkpoint.pt heads.json; do [ -f $RUN/$f ] && cp $RUN/$f $OUT/$name/; done
# the earlier steps' heads (--heads-every) in one archive: a call returns at most 8 files
ls $RUN/heads_step*.json > /dev/null 2>&1 && tar czf $OUT/$name/heads_steps.tgz -C $RUN $(cd $RUN && ls heads_step*.json)
tr '\r' '\n' < $RUN.log | grep -v '^\s*$' | tail -c 4000000 > $OUT/$name/run.log
[ -f /tmp/compile_failure.log ] && tr '\r' '\n' < /tmp/compile_failure.log | tail -c 2000000 > $OUT/compile_failure.log
ls -la $OUT/$name
if [ -d /tmp/alongside ]; then  # alongside.sh's queue, if it was started: one archive (a call returns at most 8 files)
  tail -3 /tmp/alongside/tests.log 2>/dev/null; ls /tmp/alongside
  tar czf $OUT/alongside.tgz -C /tmp alongside && ls -la $OUT/alongside.tgz
fi
