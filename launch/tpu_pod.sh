#!/usr/bin/env bash
# Start the same kimi_jax command on every worker of a Cloud TPU VM pod (one process per host).
#
#   launch/tpu_pod.sh --name=k15 --zone=us-east5-a [--create --accelerator=v5p-64] [--sync] \
#       -- python -m launch.train --config=configs/llama3_8b_pod.py --workdir=/mnt/runs/llama3_8b
#
# Steps (each printed, not run, with --dry_run):
#   --create   gcloud compute tpus tpu-vm create NAME (--accelerator, --version, --spot)
#   --sync     copy this checkout (tracked + untracked, not ignored files) to REPO_DIR on
#              every worker and `pip install -e .[tpu]` there
#   always     gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...: on each worker,
#              cd REPO_DIR, export the jax.distributed settings and run the command.
#
# jax.distributed settings, read by kimi_jax.distributed.initialize on every worker, from
# the TPU VM metadata server (single slice):
#   JAX_COORDINATOR_ADDRESS  worker 0's address (first of worker-network-endpoints):PORT
#   JAX_NUM_PROCESSES        number of workers (hosts) in the slice
#   JAX_PROCESS_ID           this worker's agent-worker-number
# --background runs the command under nohup (log: REPO_DIR/tpu_pod.log on each worker) so
# it survives the ssh session; otherwise every worker's output streams here.
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --name=NAME            TPU VM name (required)
  --zone=ZONE            zone (required)
  --project=PROJECT      gcloud project (default: gcloud's configured one)
  --create               create the TPU VM first
  --accelerator=TYPE     accelerator type for --create (default v5p-8)
  --version=RUNTIME      TPU software version for --create (default tpu-ubuntu2204-base)
  --spot                 create a spot TPU VM
  --sync                 copy this checkout to every worker and install it
  --repo_dir=DIR         checkout location on the workers (default ~/kimi_jax)
  --port=PORT            coordinator port (default 8482, as jax's TPU auto-detection)
  --background           nohup the command; log in REPO_DIR/tpu_pod.log on each worker
  --dry_run              print the commands instead of running them
  -- COMMAND...          what every worker runs, e.g. python -m launch.train --config=...
EOF
}

NAME="" ZONE="" PROJECT="" CREATE=0 ACCEL="v5p-8" VERSION="tpu-ubuntu2204-base" SPOT=0
SYNC=0 REPO_DIR="~/kimi_jax" PORT=8482 BACKGROUND=0 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --create) CREATE=1 ;;
    --accelerator=*) ACCEL="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --sync) SYNC=1 ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --background) BACKGROUND=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (commands go after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
CMD=("$@")
[[ -n "$NAME" ]] || { echo "tpu_pod.sh: --name is required" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "tpu_pod.sh: --zone is required" >&2; exit 2; }
[[ ${#CMD[@]} -gt 0 ]] || { echo "tpu_pod.sh: no command after --" >&2; exit 2; }
[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --port must be a number, got $PORT" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

run() {  # print the command (shell-quoted); run it unless --dry_run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY_RUN -eq 1 ]] || "$@"
}

if [[ $CREATE -eq 1 ]]; then
  create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL"
          --version="$VERSION")
  [[ $SPOT -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

if [[ $SYNC -eq 1 ]]; then
  root="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
  tarball="${TMPDIR:-/tmp}/kimi_jax_${NAME}.tgz"
  # Tracked and untracked-but-not-ignored files: what `git status` would show, no venvs.
  printf '+ (cd %q && git ls-files -co --exclude-standard | tar czf %q -T -)\n' "$root" "$tarball"
  if [[ $DRY_RUN -eq 0 ]]; then
    (cd "$root" && git ls-files -co --exclude-standard | tar czf "$tarball" -T -)
  fi
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:kimi_jax.tgz" "${WHERE[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="mkdir -p $REPO_DIR && \
tar xzf ~/kimi_jax.tgz -C $REPO_DIR && cd $REPO_DIR && python3 -m pip install -q -e '.[tpu]'"
fi

# Runs on each worker: the coordinator is worker 0; ids come from the metadata server
# (the same source jax's own Cloud TPU auto-detection reads).
quoted_cmd="$(printf ' %q' "${CMD[@]}")"
remote="set -e; cd $REPO_DIR
MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes
get() { curl -sf -H Metadata-Flavor:Google \"\$MD/\$1\"; }
endpoints=\$(get worker-network-endpoints); first=\${endpoints%%,*}
export JAX_COORDINATOR_ADDRESS=\${first##*:}:$PORT
export JAX_NUM_PROCESSES=\$(echo \"\$endpoints\" | tr , '\\n' | grep -c .)
export JAX_PROCESS_ID=\$(get agent-worker-number)
echo \"worker \$JAX_PROCESS_ID of \$JAX_NUM_PROCESSES, coordinator \$JAX_COORDINATOR_ADDRESS\""
if [[ $BACKGROUND -eq 1 ]]; then
  remote+="
nohup${quoted_cmd} > tpu_pod.log 2>&1 < /dev/null &
echo \"started pid \$! (log: $REPO_DIR/tpu_pod.log)\""
else
  remote+="
exec${quoted_cmd}"
fi
if [[ $DRY_RUN -eq 1 ]]; then  # the --command below, readable
  printf '%s\n' "# on every worker:" "$remote" | sed '2,$s/^/#   /'
fi
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$remote"
