/**
 * Where a decode step's and a prefill's GPU time goes, kernel by kernel: the
 * WebGPU backend with `profile: true` times every dispatch with timestamp
 * queries, while the engine runs what `generate` runs (N new sessions, each a
 * 16-token prompt then `--tokens` greedy ids, or with `--sampled` top-k 40
 * sampled ones as `api_bench.ts` draws them) and `session.prefill`.
 *
 * ```sh
 * deno run -A bench/gpu_profile.ts --streams=1,64,256 --tokens=64 --prefill=2048
 * ```
 *
 * The model is `--model=DIR` or `$MAMBA_BENCH_MODEL`, else a mamba-130m-shaped
 * one with random F32 weights (with `--mamba2`, a mamba2-130m-shaped one). Each workload runs once to warm up (pipelines,
 * captured steps), then once timed. Per kernel (program key and grid) it
 * prints calls, GPU ms and µs per call, largest first, as JSON. The timed
 * passes slow the whole down; only the kernels' own times are meaningful.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { WebGpuBackend } from "../src/backends/webgpu/mod.ts";
import { benchModel, decodeStreams, prefillOnce } from "./gpu_workload.ts";

const flags = parseArgs(Deno.args, {
  string: ["model", "streams", "tokens", "prefill", "top"],
  boolean: ["mamba2", "sampled"],
  default: { streams: "1,64,256", tokens: "64", prefill: "2048", top: "12" },
});

const backend = await WebGpuBackend.create({ profile: true });
const { model, source } = await benchModel(backend, flags);
const tokens = Number(flags.tokens);

/** Kernel times of one timed run of `work` after a warm-up run, largest first. */
async function profile(work: () => Promise<unknown>, steps: number) {
  await work();
  await backend.kernelTimes(); // drops the warm-up's
  const start = performance.now();
  await work();
  const wallMs = performance.now() - start;
  const times = [...await backend.kernelTimes()].sort((a, b) => b[1].ns - a[1].ns);
  const totalNs = times.reduce((sum, [, t]) => sum + t.ns, 0);
  return {
    wallMs: Math.round(wallMs),
    gpuMs: +(totalNs / 1e6).toFixed(2),
    gpuUsPerStep: +(totalNs / 1e3 / steps).toFixed(1),
    kernels: times.slice(0, Number(flags.top)).map(([label, t]) => ({
      kernel: label,
      calls: t.calls,
      ms: +(t.ns / 1e6).toFixed(3),
      usPerCall: +(t.ns / 1e3 / t.calls).toFixed(2),
      share: +(t.ns / totalNs).toFixed(3),
    })),
  };
}

const result: Record<string, unknown> = { adapter: backend.adapterInfo, model: source };
for (const streams of flags.streams.split(",").filter(Boolean).map(Number)) {
  result[`decode ${streams} streams`] = await profile(
    () => decodeStreams(model, streams, tokens, flags.sampled),
    tokens,
  );
}
const prefillLength = Number(flags.prefill);
if (prefillLength > 0) {
  result[`prefill ${prefillLength}`] = await profile(() => prefillOnce(model, prefillLength), 1);
}
console.log(JSON.stringify(result, null, 2));
backend.dispose();
