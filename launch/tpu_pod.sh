#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create or reuse it, ship the code, install, and start
# `sqllava-jax train` on every worker at once (each worker is one JAX process; the start-up
# code calls jax.distributed.initialize(), which reads the slice layout from TPU metadata).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] CONFIG [key=value ...]

Create (or reuse) a Cloud TPU VM slice, copy or pull this code onto every worker, install
it (pip install -e '.[tpu]'), and run `sqllava-jax train CONFIG key=value ...` on all
workers at once (gcloud ... ssh --worker=all). Checkpoints go to a GCS bucket that every
worker writes to, and the data can be read from one too (data.tfds_dir=gs://...,
data.image_folder=gs://...): orbax and Grain open gs:// paths through etils.epath.
CONFIG is a path inside the repository (e.g. configs/sqllava_7b.yaml).

Required:
  --name NAME          TPU VM (node) name.                          Env: TPU_NAME
  --zone ZONE          e.g. us-central2-b.                          Env: TPU_ZONE
  --bucket gs://B      Sets output_dir=gs://B/runs/RUN_NAME.        Env: SQLLAVA_BUCKET
                       Or pass output_dir=gs://... among the overrides instead.
  --project PROJECT    Optional; default: gcloud's configured one.  Env: TPU_PROJECT

Slice (used when it has to be created):
  --accelerator TYPE   Default: v4-32.                              Env: TPU_ACCELERATOR
  --version VERSION    TPU software version. Default: tpu-ubuntu2204-base (v4);
                       v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                       v2-alpha-tpuv6e (v6e).                       Env: TPU_RUNTIME_VERSION
  --spot               Spot capacity (cheaper, may be preempted).   Env: TPU_SPOT=1
  --queued             Create through a queued resource and wait until it is ACTIVE
                       (the way to get large or spot slices).       Env: TPU_QUEUED=1

Code:
  --code copy|git      copy: pack this checkout (tracked and untracked, not ignored files,
                       uncommitted changes included) and scp it to every worker.
                       git: clone or pull --repo at --ref on every worker (the workers need
                       read access). Default: copy.                 Env: SQLLAVA_CODE
  --repo URL           Default: this checkout's 'origin' remote.    Env: SQLLAVA_REPO
  --ref REF            Branch, tag or commit; must be pushed. Default: this checkout's
                       current commit.                              Env: SQLLAVA_REF
  --remote-dir DIR     Where the code lives on the workers, relative to the home
                       directory. Default: sqllava-jax.             Env: SQLLAVA_REMOTE_DIR
  --skip-code          Keep the code already on the workers.
  --skip-install       Keep the installed package (re-runs after a copy of pure Python
                       changes need no install: it is an editable install).

Run:
  --run-name RUN       Names output_dir under --bucket and the --detach log.
                       Default: NAME-YYYYmmdd-HHMMSS.               Env: SQLLAVA_RUN_NAME
  --env KEY=VALUE      Set a variable for the training processes (repeatable), e.g.
                       --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
  --detach             Start training under nohup and return; each worker logs to
                       ~/sqllava-jax-RUN.log. Without it the command runs in the
                       foreground and stops if this ssh session ends.
  --dry-run            Print the commands, one per line ('#' lines are comments), run
                       nothing.
  -h, --help           Show this help.

Examples:
  # Stage 2 on a v4-32 (4 workers): data and checkpoints on GCS.
  launch/tpu_pod.sh --name sqllava-v4 --zone us-central2-b --bucket gs://my-bucket \
      configs/sqllava_7b_stage2.yaml data.tfds_dir=gs://my-bucket/tfds

  # Spot v5e-64 through a queued resource; code pulled from the pushed main branch.
  launch/tpu_pod.sh --name sq-v5e --zone us-west4-a --accelerator v5litepod-64 \
      --version v2-alpha-tpuv5-lite --spot --queued --code git --ref main \
      configs/sqllava_7b_stage1.yaml output_dir=gs://my-bucket/runs/stage1

  # See what would run.
  launch/tpu_pod.sh --dry-run --name t --zone us-central2-b --bucket gs://b configs/tiny.yaml

Delete the slice when done: gcloud compute tpus tpu-vm delete NAME --zone ZONE
(with --queued: gcloud compute tpus queued-resources delete NAME --zone ZONE --force).
EOF
}

die() {
  printf 'tpu_pod.sh: error: %s\n' "$1" >&2
  printf "Run 'launch/tpu_pod.sh --help' for usage.\n" >&2
  exit 2
}

fail() {
  printf 'tpu_pod.sh: error: %s\n' "$1" >&2
  exit 1
}

# Quotes one word for the shell: as is when safe, else in single quotes (only the value of
# a --flag=value or KEY=value word), so a printed command can be pasted back as it is.
shell_quote() {
  local word="$1" prefix=""
  if [[ "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${word}"
    return
  fi
  if [[ "${word}" =~ ^(-*[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  printf "%s'%s'" "${prefix}" "${word//\'/\'\\\'\'}"
}

join_quoted() {
  local words=() word
  for word in "$@"; do
    words+=("$(shell_quote "${word}")")
  done
  local IFS=' '
  printf '%s' "${words[*]}"
}

# Runs a command, or with --dry-run prints it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")"
  else
    "$@"
  fi
}

# A comment in the dry-run listing; a progress line otherwise.
note() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$1"
  else
    printf 'tpu_pod.sh: %s\n' "$1" >&2
  fi
}

parse_args() {
  NAME="${TPU_NAME:-}"
  ZONE="${TPU_ZONE:-}"
  PROJECT="${TPU_PROJECT:-}"
  ACCELERATOR="${TPU_ACCELERATOR:-v4-32}"
  RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}"
  SPOT="${TPU_SPOT:-0}"
  QUEUED="${TPU_QUEUED:-0}"
  CODE="${SQLLAVA_CODE:-copy}"
  REPO="${SQLLAVA_REPO:-}"
  REF="${SQLLAVA_REF:-}"
  REMOTE_DIR="${SQLLAVA_REMOTE_DIR:-sqllava-jax}"
  BUCKET="${SQLLAVA_BUCKET:-}"
  RUN_NAME="${SQLLAVA_RUN_NAME:-}"
  SKIP_CODE=0
  SKIP_INSTALL=0
  DETACH=0
  DRY_RUN=0
  WORKER_ENV=()
  while (($#)); do
    case "$1" in
      --name | --zone | --project | --accelerator | --version | --code | --repo | --ref | \
        --remote-dir | --bucket | --run-name | --env)
        (($# >= 2)) || die "$1 needs a value"
        set_option "$1" "$2"
        shift 2 ;;
      --*=*) set_option "${1%%=*}" "${1#*=}"; shift ;;
      --spot) SPOT=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --skip-code) SKIP_CODE=1; shift ;;
      --skip-install) SKIP_INSTALL=1; shift ;;
      --detach) DETACH=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      -*) die "unknown option '$1'" ;;
      *) break ;;
    esac
  done
  TRAIN_ARGS=("$@")
}

set_option() {
  case "$1" in
    --name) NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --accelerator) ACCELERATOR="$2" ;;
    --version) RUNTIME_VERSION="$2" ;;
    --code) CODE="$2" ;;
    --repo) REPO="$2" ;;
    --ref) REF="$2" ;;
    --remote-dir) REMOTE_DIR="$2" ;;
    --bucket) BUCKET="$2" ;;
    --run-name) RUN_NAME="$2" ;;
    --env)
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$2'"
      WORKER_ENV+=("$2") ;;
    *) die "unknown option '$1'" ;;
  esac
}

check_args() {
  [[ -n "${NAME}" ]] ||
    die "missing --name NAME (or TPU_NAME): the TPU VM slice to create or reuse"
  [[ -n "${ZONE}" ]] || die "missing --zone ZONE (or TPU_ZONE), e.g. us-central2-b"
  ((${#TRAIN_ARGS[@]})) ||
    die "missing CONFIG (a YAML file in the repository, e.g. configs/tiny.yaml)"
  [[ "${CODE}" == copy || "${CODE}" == git ]] || die "--code must be copy or git, got '${CODE}'"
  [[ -z "${BUCKET}" || "${BUCKET}" == gs://* ]] ||
    die "--bucket must be a gs:// URL, got '${BUCKET}'"
  local arg output_dir=""
  for arg in "${TRAIN_ARGS[@]:1}"; do
    [[ "${arg}" == output_dir=* ]] && output_dir="${arg#output_dir=}"
  done
  # Every worker saves its shards of each checkpoint into the same directory, so a path on
  # a worker's own disk would leave each checkpoint split across machines.
  if [[ -n "${output_dir}" ]]; then
    [[ "${output_dir}" == gs://* ]] || die "output_dir=${output_dir} is not on GCS; all workers
must write checkpoints to one place: pass output_dir=gs://BUCKET/PATH or --bucket gs://BUCKET"
  elif [[ -n "${BUCKET}" ]]; then
    RUN_NAME="${RUN_NAME:-${NAME}-$(date +%Y%m%d-%H%M%S)}"
    TRAIN_ARGS+=("output_dir=${BUCKET%/}/runs/${RUN_NAME}")
  else
    die "missing --bucket gs://BUCKET (or SQLLAVA_BUCKET, or an output_dir=gs://... override):
checkpoints from all workers must go to one GCS directory"
  fi
  RUN_NAME="${RUN_NAME:-${NAME}-$(date +%Y%m%d-%H%M%S)}"
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if ! ((SKIP_CODE)); then
    check_code_source
  fi
}

# Checked before any slice is created, so a mistake here costs nothing.
check_code_source() {
  if [[ "${CODE}" == copy ]]; then
    git -C "${ROOT}" rev-parse --git-dir >/dev/null 2>&1 ||
      die "--code copy packs a git checkout and ${ROOT} is not one; use --code git"
    return
  fi
  # --code git defaults: this checkout's origin remote and current commit.
  if [[ -z "${REPO}" ]]; then
    REPO="$(git -C "${ROOT}" remote get-url origin 2>/dev/null)" ||
      die "--code git needs --repo URL (or SQLLAVA_REPO): this checkout has no 'origin' remote"
  fi
  if [[ -z "${REF}" ]]; then
    REF="$(git -C "${ROOT}" rev-parse HEAD 2>/dev/null)" ||
      die "--code git needs --ref REF (or SQLLAVA_REF): a pushed branch, tag or commit"
  fi
}

ensure_slice() {
  if ((QUEUED)); then
    ensure_queued_slice
    return
  fi
  local describe=("${TPU_VM[@]}" describe "${NAME}" "${GCLOUD_FLAGS[@]}" "--format=value(state)")
  local create=("${TPU_VM[@]}" create "${NAME}" "${GCLOUD_FLAGS[@]}"
    "--accelerator-type=${ACCELERATOR}" "--version=${RUNTIME_VERSION}")
  ((SPOT)) && create+=(--spot)
  if ((DRY_RUN)); then
    run "${describe[@]}"
    note "only if describe finds no slice:"
    run "${create[@]}"
    return
  fi
  local state
  if state="$("${describe[@]}" 2>/dev/null)"; then
    [[ "${state}" == READY ]] || fail "slice ${NAME} exists but is ${state}, not READY; wait, or
delete it: gcloud compute tpus tpu-vm delete ${NAME} --zone ${ZONE}"
    note "reusing slice ${NAME} (READY)"
    return
  fi
  note "creating slice ${NAME} (${ACCELERATOR})"
  run "${create[@]}"
}

ensure_queued_slice() {
  local queued=(gcloud compute tpus queued-resources)
  local describe=("${queued[@]}" describe "${NAME}" "${GCLOUD_FLAGS[@]}"
    "--format=value(state.state)")
  local create=("${queued[@]}" create "${NAME}" "--node-id=${NAME}" "${GCLOUD_FLAGS[@]}"
    "--accelerator-type=${ACCELERATOR}" "--runtime-version=${RUNTIME_VERSION}")
  ((SPOT)) && create+=(--spot)
  local poll_s="${TPU_QUEUE_POLL_S:-60}"
  if ((DRY_RUN)); then
    run "${describe[@]}"
    note "only if describe finds no queued resource:"
    run "${create[@]}"
    note "repeated every ${poll_s} s until it prints ACTIVE:"
    run "${describe[@]}"
    return
  fi
  local state
  if ! state="$("${describe[@]}" 2>/dev/null)"; then
    note "queueing slice ${NAME} (${ACCELERATOR})"
    run "${create[@]}"
    state="$("${describe[@]}")"
  fi
  while [[ "${state}" != ACTIVE ]]; do
    case "${state}" in
      FAILED | SUSPENDED | SUSPENDING) fail "queued resource ${NAME} is ${state}; see:
gcloud compute tpus queued-resources describe ${NAME} --zone ${ZONE}" ;;
    esac
    note "queued resource ${NAME} is ${state:-unknown}; checking again in ${poll_s} s"
    sleep "${poll_s}"
    state="$("${describe[@]}")"
  done
}

on_all_workers() {
  run "${TPU_VM[@]}" ssh "${NAME}" --worker=all "${GCLOUD_FLAGS[@]}" "--command=$1"
}

copy_code() {
  local root="${ROOT}" tarball remote_tar="sqllava-jax-${NAME}.tar.gz"
  tarball="${TMPDIR:-/tmp}/${remote_tar}"
  note "pack this checkout: tracked and untracked files, not ignored ones (no venvs, no runs)"
  local list=(git -C "${root}" ls-files -z --cached --others --exclude-standard)
  local pack=(tar -czf "${tarball}" -C "${root}" --null -T -)
  if ((DRY_RUN)); then
    printf '%s | %s\n' "$(join_quoted "${list[@]}")" "$(join_quoted "${pack[@]}")"
  else
    "${list[@]}" | "${pack[@]}"
  fi
  run "${TPU_VM[@]}" scp "${tarball}" "${NAME}:${remote_tar}" --worker=all "${GCLOUD_FLAGS[@]}"
  # Unpacked over the old copy: files deleted here stay there (harmless for a re-run;
  # pick a fresh --remote-dir to start clean).
  local dir
  dir="$(shell_quote "${REMOTE_DIR}")"
  on_all_workers "mkdir -p ${dir} && tar -xzf ${remote_tar} -C ${dir} && rm -f ${remote_tar}"
  run rm -f "${tarball}"
}

pull_code() {
  local dir repo ref
  dir="$(shell_quote "${REMOTE_DIR}")"
  repo="$(shell_quote "${REPO}")"
  ref="$(shell_quote "${REF}")"
  # fetch + checkout FETCH_HEAD works for a branch, a tag and a commit alike.
  on_all_workers "test -d ${dir}/.git || git clone --quiet ${repo} ${dir}; \
git -C ${dir} fetch --quiet origin ${ref} && git -C ${dir} checkout --quiet --force FETCH_HEAD"
}

install() {
  # TPU VM images have no virtual environment: pip installs into ~/.local (user site).
  on_all_workers "cd $(shell_quote "${REMOTE_DIR}") && python3 -m pip install --quiet -e \".[tpu]\""
}

train() {
  # PATH: a user-site install puts the sqllava-jax script in ~/.local/bin, which
  # non-interactive ssh sessions do not have on PATH.
  local cmd nohup="" log="sqllava-jax-${RUN_NAME}.log"
  ((DETACH)) && nohup="nohup "
  cmd="cd $(shell_quote "${REMOTE_DIR}") && ${nohup}env \"PATH=\$HOME/.local/bin:\$PATH\""
  if ((${#WORKER_ENV[@]})); then
    cmd+=" $(join_quoted "${WORKER_ENV[@]}")"
  fi
  cmd+=" sqllava-jax train $(join_quoted "${TRAIN_ARGS[@]}")"
  if ((DETACH)); then
    # All three streams redirected, or ssh would wait for the background job to close them.
    cmd+=" > $(shell_quote "${log}") 2>&1 < /dev/null &"
    on_all_workers "${cmd}"
    note "training started; follow worker 0 with:"
    note "$(join_quoted "${TPU_VM[@]}" ssh "${NAME}" --worker=0 "${GCLOUD_FLAGS[@]}" \
      "--command=tail -f ${log}")"
  else
    on_all_workers "${cmd}"
  fi
}

main() {
  parse_args "$@"
  check_args
  TPU_VM=(gcloud compute tpus tpu-vm)
  GCLOUD_FLAGS=("--zone=${ZONE}")
  [[ -n "${PROJECT}" ]] && GCLOUD_FLAGS+=("--project=${PROJECT}")
  ensure_slice
  if ! ((SKIP_CODE)); then
    if [[ "${CODE}" == copy ]]; then copy_code; else pull_code; fi
  fi
  ((SKIP_INSTALL)) || install
  train
}

main "$@"
