#!/bin/bash
# One lease on a CUDA node: the device check in stages, each under its own time limit, so one stage
# failing or running long does not cost the others. Usage (from the repository root, on the node):
#   OUT=out bash bench/device_session.sh STAGE...      (stages: env, 1b, 1b-noplain, 1b-eager, 1b-quant, 8b, 8b-eager)
# Carried wheels (docs/device_check.md) in .whl/ are installed to /tmp/site first.
set -u
export PYTHONUNBUFFERED=1 OUT="${OUT:-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
stage() {  # name, seconds, device_check arguments
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  echo "=== $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" python3 -m bench.device_check "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "Warning" "$OUT/$name.log" | tail -n 40
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || fail=1
}
fail=0
for s in "$@"; do
  case $s in
    env) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
         python3 -c "import torch, pydantic, safetensors; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), 'pydantic', pydantic.__version__)" ;;
    1b) stage 1b 240 --sizes 1b --weights bf16 --streams 1,16,64 ;;
    1b-noplain) stage 1b-noplain 200 --sizes 1b --weights bf16 --streams 1,16,64 --plain off ;;
    1b-eager) stage 1b-eager 100 --sizes 1b --weights bf16 --streams 1,16,64 --no-compile ;;
    1b-quant) stage 1b-quant 100 --sizes 1b --weights int8,int4 --streams 1,16 --tokens 32 --no-compile ;;
    8b) stage 8b 300 --sizes 8b --weights bf16 --streams 1,16,64 ;;
    8b-eager) stage 8b-eager 150 --sizes 8b --weights bf16 --streams 1,16,64 --no-compile ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
exit $fail
