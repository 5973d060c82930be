# Sourced by scripts/quickstart.sh: steps that do not need each other's results run at once. `background NAME cmd...`
# starts the command (a program or a shell function) with one thread (OMP_NUM_THREADS=1) and its output in
# $JOBS_LOG_DIR/NAME.log; `await NAME...` waits for them in the order given, prints each log, and exits 1 naming every
# step that failed. Jobs still running when the script exits (an error elsewhere, Ctrl-C) are stopped.
declare -A JOBS=()
background() {
  local name="$1"; shift
  OMP_NUM_THREADS=1 "$@" > "$JOBS_LOG_DIR/$name.log" 2>&1 &
  JOBS[$name]=$!
}
await() {
  local failed="" name
  for name in "$@"; do
    wait "${JOBS[$name]}" || failed="$failed $name"
    unset "JOBS[$name]"
    cat "$JOBS_LOG_DIR/$name.log"
  done
  if [ -n "$failed" ]; then echo "${0##*/}: failed:$failed (output above; logs in $JOBS_LOG_DIR)" >&2; exit 1; fi
}
stop_jobs() {  # a shell-function step is a subshell: its running program is stopped with it
  local pid
  for pid in "${JOBS[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
}
trap stop_jobs EXIT
