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
import { loadCheckpoint } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { Sampler } from "../src/sampler.ts";
import { Session } from "../src/session.ts";
import {
  benchModelDir,
  MAMBA2_130M_CONFIG,
  promptIds,
  randomMamba2Weights,
  SAMPLED_OPTIONS,
} from "./make_random_model.ts";

const flags = parseArgs(Deno.args, {
  string: ["model", "streams", "tokens", "prefill", "top"],
  boolean: ["mamba2", "sampled"],
  default: { streams: "1,64,256", tokens: "64", prefill: "2048", top: "12" },
});

const backend = await WebGpuBackend.create({ profile: true });
let model: MambaModel<unknown>;
let source = "random mamba2-130m";
if (flags.mamba2) {
  model = new MambaModel(backend, MAMBA2_130M_CONFIG, randomMamba2Weights(MAMBA2_130M_CONFIG));
} else {
  source = flags.model ?? await benchModelDir();
  const checkpoint = await loadCheckpoint(source);
  model = new MambaModel(backend, checkpoint.config, checkpoint.weights);
}
const vocab = model.config.vocabSize;
const tokens = Number(flags.tokens);

/** `streams` new sessions at once, each a 16-id prompt then `tokens` greedy (or sampled) ids. */
function decode(streams: number): Promise<unknown> {
  return Promise.all(Array.from({ length: streams }, (_, i) => {
    const session = new Session(model);
    return session.decode({
      prompt: promptIds(16, vocab).map((id) => (id + i) % vocab),
      sampler: new Sampler(flags.sampled ? { ...SAMPLED_OPTIONS, seed: i } : { temperature: 0 }),
      maxTokens: tokens,
    }).finally(() => session.dispose());
  }));
}

async function prefill(length: number): Promise<void> {
  const session = new Session(model);
  await session.prefill(promptIds(length, vocab));
  session.dispose();
}

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
  result[`decode ${streams} streams`] = await profile(() => decode(streams), tokens);
}
const prefillLength = Number(flags.prefill);
if (prefillLength > 0) {
  result[`prefill ${prefillLength}`] = await profile(() => prefill(prefillLength), 1);
}
console.log(JSON.stringify(result, null, 2));
backend.dispose();
