#!/usr/bin/env bash
# The project beside mamba_ssm on the GPU machine, in one device call (ratios count only within one call).
#   Here, once:   bash bench/gpu_peers.sh prepare
#   There (carry [".device"]):   bash bench/gpu_peers.sh
# prints one table of ratios (bench/peers.ts) and leaves both sides' JSON in $OUT (or .device/out).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  bash ../shared/device/prepare.sh
  rm -rf .device/peers .device/tokenizer && cp -r ../shared/device/peers .device/peers
  mkdir -p .device/tokenizer && cp ../shared/tokenizers/gpt-neox-20b/tokenizer*.json .device/tokenizer/
  ../shared/jsr/with-jsr.sh deno bundle --platform deno -o .device/api_bench.js bench/api_bench.ts
  ../shared/jsr/with-jsr.sh deno bundle --platform deno -o .device/peers.js bench/peers.ts
  echo "ready: run 'bash bench/gpu_peers.sh' on the GPU machine with carry [\".device\"]"
  exit 0
fi
out=${OUT:-.device/out}
mkdir -p "$out"
source .device/setup.sh
export TORCH_EXTENSIONS_DIR=$PWD/.device/torch-ext PYTHONUNBUFFERED=1
python3 .device/peers/gpu_e2e_anchor.py .device/peers/mamba_ssm "$out/mamba_ssm.json" >&2
deno run -A .device/api_bench.js --backend=webgpu --streams=1,16 --sampled=false --prefill=2048 \
  --tokens=128 --reps=3 --tokenizer=.device/tokenizer > "$out/ours.json"
deno run -A .device/peers.js --mamba-ssm="$out/mamba_ssm.json" --ours="$out/ours.json" | tee "$out/table.txt"
