#!/usr/bin/env bash
# One bcr_jax job on a Cloud TPU VM: a single host (v5e-8) or a multi-host pod slice (v5e-16, v4-32, ...).
#
# Creates the VM (--create) or reuses it, copies this checkout to every worker and installs it there, starts the same
# `python3 -m bcr_jax.main ...` on all workers at once (multi-controller JAX: one process per host, joined by
# jax.distributed, which reads the slice's topology from the TPU metadata server), then streams worker 0's log
# until the job ends and exits with its status. The job runs detached (nohup): a dropped connection does not stop
# it; run the script again with --attach to stream the log again. See launch/README.md.
#
#   launch/tpu_pod.sh --name bcr --zone us-west4-a --create -- \
#       --config configs/justrl_1p5b_bcr.py --config.model.hf_path=/home/me/JustRL-DeepSeek-1.5B \
#       --config.workdir=gs://my-bucket/runs/justrl_1p5b_bcr     # or a local runs/... on a single host
#
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --name NAME          TPU VM name (required)
  --zone ZONE          Cloud zone, e.g. us-west4-a (required)
  --project PROJECT    Cloud project (default: the one gcloud is configured with)
  --accelerator TYPE   accelerator type for --create (default v5litepod-8, i.e. v5e-8)
  --version VERSION    TPU software version for --create (default v2-alpha-tpuv5-lite, for v5e)
  --create             create the VM if it does not exist yet (without it, the VM must exist)
  --spot               create it as a Spot VM (cheaper, may be preempted)
  --skip-install       reuse the code and packages already on the workers
  --setup-only         create / reuse the VM and install the code, start no job (nothing after --)
  --attach             only stream worker 0's log of the running (or last) job
  --dry-run            print the commands instead of running them
  -h, --help           this text
Everything after -- is passed to `python3 -m bcr_jax.main` on every worker (it must include --config).
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# A word as bash reads it back: as is when safe, else single-quoted ('\'' for a quote inside).
quote() {
  local word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      printf '%s' "$word"
    else
      printf "'%s'" "${word//\'/\'\\\'\'}"
    fi
    printf ' '
  done
}

run() {  # the command, printed (--dry-run) or run
  if [[ $dry_run == 1 ]]; then
    local line
    line=$(quote "$@")
    echo "${line% }"
  else
    "$@"
  fi
}

name="" zone="" project="" accelerator="v5litepod-8" version="v2-alpha-tpuv5-lite"
create=0 spot=0 skip_install=0 setup_only=0 attach=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --accelerator) accelerator=${2:?--accelerator needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --setup-only) setup_only=1; shift ;;
    --attach) attach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
main_args=("$@")
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
if [[ $setup_only == 1 ]]; then
  [[ ${#main_args[@]} -eq 0 ]] || die "--setup-only starts no job: drop the arguments after --"
elif [[ $attach == 0 ]]; then
  [[ ${#main_args[@]} -gt 0 ]] || die "give the job after --, e.g. -- --config configs/justrl_1p5b_bcr.py"
  has_config=0
  for arg in "${main_args[@]}"; do [[ $arg == --config || $arg == --config=* ]] && has_config=1; done
  [[ $has_config == 1 ]] || die "the job after -- needs --config configs/<name>.py"
fi

scope=(--zone "$zone")
if [[ -n $project ]]; then scope+=(--project "$project"); fi
tpu=(gcloud compute tpus tpu-vm)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive=bcr_jax_src.tar.gz
# shellcheck disable=SC2016  # $HOME is expanded on the workers, not here
log='$HOME/bcr_jax_run.log' pid='$HOME/bcr_jax_run.pid' rc='$HOME/bcr_jax_run.rc'

if [[ $attach == 0 ]]; then
  # 1. The VM: reuse it, or create it.
  if [[ $dry_run == 1 ]]; then
    run "${tpu[@]}" describe "$name" "${scope[@]}"
    if [[ $create == 1 ]]; then echo "# if it does not exist:"; fi
  fi
  if [[ $dry_run == 1 ]] || ! "${tpu[@]}" describe "$name" "${scope[@]}" > /dev/null 2>&1; then
    if [[ $create == 1 ]]; then
      create_args=(create "$name" "${scope[@]}" --accelerator-type "$accelerator" --version "$version")
      if [[ $spot == 1 ]]; then create_args+=(--spot); fi
      run "${tpu[@]}" "${create_args[@]}"
    elif [[ $dry_run == 0 ]]; then
      die "TPU VM $name does not exist in $zone; pass --create to create it"
    fi
  fi

  # 2. The code on every worker: this checkout's files (tracked and new ones, not ignored ones), then the package.
  if [[ $skip_install == 0 ]]; then
    local_archive=${TMPDIR:-/tmp}/$archive
    if [[ $dry_run == 1 ]]; then
      echo "# pack this checkout: git ls-files --cached --others --exclude-standard | tar -czf $local_archive"
    else
      (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$local_archive")
    fi
    run "${tpu[@]}" scp "$local_archive" "$name:$archive" --worker=all "${scope[@]}"
    install="mkdir -p bcr_jax && tar -xzf $archive -C bcr_jax && cd bcr_jax && python3 -m pip install -q -e \".[tpu]\""
    run "${tpu[@]}" ssh "$name" --worker=all "${scope[@]}" --command "$install"
  fi
  if [[ $setup_only == 1 ]]; then exit 0; fi

  # 3. The same job on every worker, detached (SIGHUP ignored, as nohup does, so it outlives the ssh session; its
  # exit status is kept in $rc). distributed.initialize=on: the workers find each other through the TPU metadata
  # server (jax.distributed.initialize() without arguments); on a single host it is one process.
  job="python3 -m bcr_jax.main $(quote "${main_args[@]}")"
  if [[ " ${main_args[*]} " != *" --config.distributed.initialize"* ]]; then
    job+="--config.distributed.initialize=on"
  fi
  job=${job% }
  start="if [ -s $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then"
  start+=" echo \"a bcr_jax job is already running\" >&2; exit 1; fi"
  start+="; cd bcr_jax && rm -f $rc && (trap \"\" HUP; $job; echo \$? > $rc) > $log 2>&1 < /dev/null & echo \$! > $pid"
  run "${tpu[@]}" ssh "$name" --worker=all "${scope[@]}" --command "$start"
fi

# 4. Worker 0's log until the job ends; its exit status is the script's.
stream="tail -n +1 --pid=\"\$(cat $pid)\" -F $log; exit \"\$(cat $rc 2>/dev/null || echo 1)\""
run "${tpu[@]}" ssh "$name" --worker=0 "${scope[@]}" --command "$stream"
