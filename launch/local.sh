#!/usr/bin/env bash
# Train on this machine with all its devices (one process), or on N simulated CPU devices.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] CONFIG [key=value ...]

Train on this machine: one process driving all its local devices (GPUs, a TPU VM's chips,
or the CPU). CONFIG is a YAML file (e.g. configs/tiny.yaml); key=value pairs override its
fields (data.json_path=..., output_dir=..., train.max_steps=...).

Options:
  --cpu-devices N  Run on the CPU, split into N simulated devices
                   (XLA_FLAGS=--xla_force_host_platform_device_count=N), e.g. to try a
                   data/fsdp/tensor mesh without accelerators. Env: SQLLAVA_CPU_DEVICES.
  --dry-run        Print the command that would run, one line, and run nothing.
  -h, --help       Show this help.

Environment:
  XLA_FLAGS        Kept; with --cpu-devices the device count is put in front, so a flag of
                   your own still wins.

Examples:
  launch/local.sh configs/tiny.yaml output_dir=runs/tiny
  launch/local.sh --cpu-devices 8 configs/tiny.yaml mesh.fsdp=4 mesh.tensor=2
  launch/local.sh --dry-run --cpu-devices 8 configs/tiny.yaml
EOF
}

die() {
  printf 'local.sh: error: %s\n' "$1" >&2
  printf "Run 'launch/local.sh --help' for usage.\n" >&2
  exit 2
}

# Quotes one word for the shell: as is when safe, else in single quotes, so a printed
# command can be pasted back as it is.
shell_quote() {
  local word="$1"
  if [[ "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

print_cmd() {
  local words=() word
  for word in "$@"; do
    words+=("$(shell_quote "${word}")")
  done
  local IFS=' '
  printf '%s\n' "${words[*]}"
}

main() {
  local dry_run=0 cpu_devices="${SQLLAVA_CPU_DEVICES:-}"
  while (($#)); do
    case "$1" in
      --cpu-devices) (($# >= 2)) || die "--cpu-devices needs a number"
        cpu_devices="$2"; shift 2 ;;
      --cpu-devices=*) cpu_devices="${1#*=}"; shift ;;
      --dry-run) dry_run=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      -*) die "unknown option '$1'" ;;
      *) break ;;
    esac
  done
  (($#)) || die "missing CONFIG (a YAML file such as configs/tiny.yaml)"
  if [[ -n "${cpu_devices}" && ! "${cpu_devices}" =~ ^[1-9][0-9]*$ ]]; then
    die "--cpu-devices must be a positive integer, got '${cpu_devices}'"
  fi

  local cmd=(sqllava-jax train "$@")
  if [[ -n "${cpu_devices}" ]]; then
    # JAX_PLATFORMS=cpu: on a GPU machine the simulated devices would otherwise sit unused
    # beside the real ones, and the mesh would be built from the GPUs.
    local xla_flags="--xla_force_host_platform_device_count=${cpu_devices}"
    xla_flags="${xla_flags}${XLA_FLAGS:+ ${XLA_FLAGS}}"
    cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags}" "${cmd[@]}")
  fi
  if ((dry_run)); then
    print_cmd "${cmd[@]}"
    return 0
  fi
  command -v sqllava-jax >/dev/null ||
    die "sqllava-jax is not on PATH; activate the environment where you ran: pip install -e ."
  exec "${cmd[@]}"
}

main "$@"
