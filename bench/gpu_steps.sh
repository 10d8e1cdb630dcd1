# Sourced by the GPU step scripts (bench/gpu_smoke.sh, bench/gpu_eval_judge.sh): `step NAME CMD...` runs
# CMD, logs it to $WORK/NAME.log, appends "NAME<TAB>exit code<TAB>milliseconds" to $WORK/steps.tsv
# (bench/gpu_record.py reads it) and prints the log's tail. Optional settings:
#   STEP_LIMIT_S        a time limit per step (timeout; unset: none)
#   STEP_PREFECT_HOMES  set: each step gets its own PREFECT_HOME under $WORK
#   STEP_TAIL           log lines printed after a step (default 25)
step() {
  local name=$1; shift
  local t0 limit=()
  t0=$(date +%s%N)
  [ -n "${STEP_LIMIT_S:-}" ] && limit=(timeout "$STEP_LIMIT_S")
  (
    [ -n "${STEP_PREFECT_HOMES:-}" ] && export PREFECT_HOME="$WORK/prefect-$name"
    exec "${limit[@]}" "$@"
  ) > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >> "$WORK/steps.tsv"
  echo "# $name: exit $rc"; tail -n "${STEP_TAIL:-25}" "$WORK/$name.log"
}
