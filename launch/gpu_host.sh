#!/usr/bin/env bash
# One bcr_jax job on one multi-GPU host (e.g. 8x H100), from this checkout.
#
# By default one process drives every GPU of the host (JAX's usual setup on one machine: the mesh spans all local
# devices, no jax.distributed needed). --processes K starts K processes instead, each driving its own GPUs
# (config.distributed.local_device_ids) and joined through a coordinator on 127.0.0.1 — the multi-process layout
# of a multi-host job, on one host; each process then also grades its own share of every step's responses.
# Process 0's output is streamed; the others log to --log-dir. If one process fails, the others are stopped.
#
#   launch/gpu_host.sh --install -- --config configs/justrl_1p5b_bcr.py \
#       --config.model.hf_path=$HOME/JustRL-DeepSeek-1.5B --config.workdir=runs/justrl_1p5b_bcr
#
# --dry-run prints the commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --install            create the virtual environment (--venv) if needed and pip install this checkout with .[gpu]
  --setup-only         only --install, start no job (nothing after --)
  --venv DIR           virtual environment to run in (default .venv in the checkout; without it and without
                       --install: the python3 on PATH)
  --processes K        processes to start (default 1: one process drives all GPUs)
  --gpus N             GPUs on the host (default: nvidia-smi -L); with --processes, K must divide N
  --port PORT          coordinator port for --processes > 1 (default 8476)
  --log-dir DIR        where processes 1..K-1 log (default logs/, in the checkout)
  --stop-grace S       when stopping the processes, seconds between SIGTERM and SIGKILL (default 10)
  --dry-run            print the commands instead of running them
  -h, --help           this text
Everything after -- is passed to `python -m bcr_jax.main` (it must include --config).
EOF
}

die() { echo "gpu_host.sh: $*" >&2; exit 2; }

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

show() { local line; line=$(quote "$@"); echo "${line% }"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
install=0 setup_only=0 venv="" processes=1 gpus="" port=8476 log_dir="$repo/logs" dry_run=0 stop_grace_s=10
while [[ $# -gt 0 ]]; do
  case $1 in
    --install) install=1; shift ;;
    --setup-only) setup_only=1; install=1; shift ;;
    --venv) venv=${2:?--venv needs a value}; shift 2 ;;
    --processes) processes=${2:?--processes needs a value}; shift 2 ;;
    --gpus) gpus=${2:?--gpus needs a value}; shift 2 ;;
    --port) port=${2:?--port needs a value}; shift 2 ;;
    --log-dir) log_dir=${2:?--log-dir needs a value}; shift 2 ;;
    --stop-grace) stop_grace_s=${2:?--stop-grace needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
main_args=("$@")
if [[ $setup_only == 1 ]]; then
  [[ ${#main_args[@]} -eq 0 ]] || die "--setup-only starts no job: drop the arguments after --"
else
  [[ ${#main_args[@]} -gt 0 ]] || die "give the job after --, e.g. -- --config configs/justrl_1p5b_bcr.py"
  has_config=0
  for arg in "${main_args[@]}"; do [[ $arg == --config || $arg == --config=* ]] && has_config=1; done
  [[ $has_config == 1 ]] || die "the job after -- needs --config configs/<name>.py"
fi
[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes: expected a positive integer, got $processes"
[[ $stop_grace_s =~ ^[0-9]+$ ]] || die "--stop-grace: expected whole seconds, got $stop_grace_s"

if [[ $install == 1 && -z $venv ]]; then venv="$repo/.venv"; fi
python=python3
if [[ -n $venv ]]; then python="$venv/bin/python"; fi

# 1. The environment.
if [[ $install == 1 ]]; then
  if [[ $dry_run == 1 ]]; then
    show python3 -m venv "$venv"
    show "$python" -m pip install -q -e "${repo}[gpu]"
  else
    [[ -x $python ]] || python3 -m venv "$venv"
    "$python" -m pip install -q -e "${repo}[gpu]"
  fi
fi

if [[ $setup_only == 1 ]]; then exit 0; fi

cd "$repo"
if [[ $dry_run == 1 ]]; then show cd "$repo"; fi
job=("$python" -m bcr_jax.main "${main_args[@]}")

# 2a. One process, every GPU.
if [[ $processes == 1 ]]; then
  if [[ $dry_run == 1 ]]; then show "${job[@]}"; exit 0; fi
  exec "${job[@]}"
fi

# 2b. K processes, N/K GPUs each.
if [[ -z $gpus ]]; then
  command -v nvidia-smi > /dev/null || die "--gpus: nvidia-smi not found; say how many GPUs the host has"
  gpus=$(nvidia-smi -L | grep -c '^GPU ')
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus: expected a positive integer, got $gpus"
(( gpus % processes == 0 )) || die "--processes $processes does not divide the $gpus GPUs"
per_process=$(( gpus / processes ))

pids=()
# On exit, failure or Ctrl-C: no process is left behind, nor its grading workers (its process group). The script
# returns only once every group is gone: SIGTERM first, SIGKILL for what is still there after a grace period
# (--stop-grace: a signal is only a request, and a process may be finishing a checkpoint write).
stop_all() {
  local p tick
  (( ${#pids[@]} > 0 )) || return 0
  for p in "${pids[@]}"; do kill -TERM -- -"$p" 2>/dev/null || true; done
  for (( tick = 0; tick < stop_grace_s * 10; tick++ )); do
    groups_alive || return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL -- -"$p" 2>/dev/null || true; done
  for (( tick = 0; tick < 50; tick++ )); do groups_alive || return 0; sleep 0.1; done
  echo "gpu_host.sh: processes still present after SIGKILL in groups ${pids[*]}" >&2
}
groups_alive() {  # any process left in any of our groups (bash reaps its own children, so zombies do not linger)
  local p
  for p in "${pids[@]}"; do kill -0 -- -"$p" 2>/dev/null && return 0; done
  return 1
}
trap stop_all EXIT
trap 'exit 130' INT TERM
set -m  # each background process leads a process group of its own, for stop_all

if [[ $dry_run == 0 ]]; then mkdir -p "$log_dir"; fi
for (( i = 0; i < processes; i++ )); do
  ids=""
  for (( d = i * per_process; d < (i + 1) * per_process; d++ )); do ids+="$d,"; done
  if (( per_process > 1 )); then ids=${ids%,}; fi  # (0,1,2,3) but (5,): a tuple either way
  command_line=("${job[@]}" "--config.distributed.coordinator_address=127.0.0.1:$port"
                "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$i"
                "--config.distributed.local_device_ids=($ids)")
  if [[ $i == 0 ]]; then
    if [[ $dry_run == 1 ]]; then echo "$(quote "${command_line[@]}")&"; continue; fi
    "${command_line[@]}" &
  else
    log="$log_dir/process_$i.log"
    if [[ $dry_run == 1 ]]; then echo "$(quote "${command_line[@]}")> $(quote "$log")2>&1 &"; continue; fi
    "${command_line[@]}" > "$log" 2>&1 &
  fi
  pids+=("$!")
done
if [[ $dry_run == 1 ]]; then echo "wait  # for all $processes; the first failure stops the others"; exit 0; fi

# The first process to fail stops the job (the others would wait for it at their next collective): its status is
# the script's, and the EXIT trap stops the rest.
for (( left = processes; left > 0; left-- )); do
  status=0
  wait -n || status=$?
  if (( status != 0 )); then
    echo "gpu_host.sh: a process exited with status $status; stopping the others (logs in $log_dir)" >&2
    exit "$status"
  fi
done
