#!/usr/bin/env bash
# The project beside mamba_ssm on the GPU machine, in one device call (ratios count only within one call):
# every speed goal of issues 13 and 14 that mamba_ssm's scripts measure, for one or more builds of ours.
#   Here, once:   bash bench/gpu_peers.sh prepare [REF ...]
#     bundles the working tree as build "tree" and each git REF (a commit or branch) as a build of its
#     own, so that a change and its base run in the same call.
#   There (carry [".device"]):   bash bench/gpu_peers.sh [decode]
#     runs our builds in turn, then mamba_ssm's scripts, then (with `decode`, or ROUNDS=2) our builds
#     again in the other order, and prints one table of ratios per build (bench/peers.ts), then our
#     figures that have no peer: the edge server over HTTP at 16 and 64 streams, the first token at 64,
#     what `auto` picks. `decode` leaves out the prompts, the SSD scan alone, the server and `auto`.
#     Both sides' JSON stays in $OUT (or .device/out).
# A call's limit is 10 minutes and the peers take about 5 (their CUDA kernels build first): the whole run
# takes one round of ours by default, `decode` two (ROUNDS=1 or 2 overrides); keep to a few builds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  shift
  bash ../shared/device/prepare.sh
  rm -rf .device/peers .device/tokenizer .device/builds && cp -r ../shared/device/peers .device/peers
  mkdir -p .device/tokenizer .device/builds && cp ../shared/tokenizers/gpt-neox-20b/tokenizer*.json .device/tokenizer/
  root=$PWD
  bundle() { "$root/../shared/jsr/with-jsr.sh" deno bundle --platform deno -o "$2" "$1" >/dev/null; }
  bundle_build() { # $1: a checkout, $2: the build's name
    mkdir -p ".device/builds/$2"
    for bench in api_bench mamba2_bench; do
      (cd "$1" && bundle "bench/$bench.ts" "$root/.device/builds/$2/$bench.js")
    done
    (cd "$1" && bundle examples/edge/main.ts "$root/.device/builds/$2/edge.js")
  }
  bundle_build . tree
  for ref in "$@"; do
    checkout=$(mktemp -d)
    git worktree add --detach -q "$checkout" "$ref"
    bundle_build "$checkout" "${ref//\//_}"
    git worktree remove --force "$checkout"
  done
  bundle bench/peers.ts .device/peers.js
  bundle bench/make_random_model.ts .device/make_random_model.js
  echo "ready (builds: $(ls .device/builds | tr '\n' ' ')): run 'bash bench/gpu_peers.sh' on the GPU machine with carry [\".device\"]"
  exit 0
fi
out=${OUT:-.device/out}
mkdir -p "$out"
source .device/setup.sh
export TORCH_EXTENSIONS_DIR=$PWD/.device/torch-ext PYTHONUNBUFFERED=1
model=/tmp/mamba-130m-random
deno run -A .device/make_random_model.js "$model" >/dev/null && cp .device/tokenizer/tokenizer*.json "$model/"
if [ "${1:-}" = decode ]; then
  api_args="--streams=1,16,64,256 --prefill=0" m2_args="--no-ssd --prefill 0" rounds=${ROUNDS:-2}
else
  api_args="--streams=1,16,64,256 --prefill=2048 --http-streams=16,64 --auto" m2_args="" rounds=${ROUNDS:-1}
fi
ours() { # $1: round; the builds in name order, or reversed with "reverse"
  for build in $(ls .device/builds | sort ${2:+-r}); do
    echo "== $build, round $1" >&2
    MAMBA_EDGE_MAIN=".device/builds/$build/edge.js" timeout 200 deno run -A ".device/builds/$build/api_bench.js" --backend=webgpu --model="$model" $api_args \
      --tokens=128 --reps=2 --sampled > "$out/$build.api.$1.json" || echo "api_bench of $build failed" >&2
    timeout 150 deno run -A ".device/builds/$build/mamba2_bench.js" --backend webgpu --decode 128 \
      --streams 1,16,64 --repeats 2 $m2_args > "$out/$build.mamba2.$1.json" || echo "mamba2_bench of $build failed" >&2
  done
}
ours 1
peer() { timeout "$1" python3 ".device/peers/$2" "${@:3}" >&2 || echo "$2 failed" >&2; }
peer 300 gpu_e2e_anchor.py .device/peers/mamba_ssm "$out/mamba_ssm_e2e.json"
peer 150 gpu_batch_anchor.py .device/peers/mamba_ssm "$out/mamba_ssm_batch.json"
peer 150 gpu_mamba2.py .device/peers/mamba_ssm NONE "$out"
if [ "$rounds" -ge 2 ]; then ours 2 reverse; fi
deno run -A .device/peers.js --gpu-out="$out" | tee "$out/table.txt"
