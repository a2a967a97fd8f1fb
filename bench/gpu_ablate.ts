/**
 * What each kernel costs where it runs. The engine's decode workload (N new
 * sessions at once, each a 16-id prompt then `--tokens` ids, greedy or with
 * `--sampled` drawn as `api_bench.ts` draws them) is timed with every kernel,
 * then with the kernels matching each `--skip` pattern left out
 * (`WebGpuBackend.skipKernels`), then with every kernel again. The time a
 * pattern saves is what its kernels cost in the step, their waits on memory
 * and on the kernels before them included, which kernels timed alone or one
 * per compute pass (`gpu_profile.ts`) do not show. The ids are wrong while
 * kernels are left out; only the times mean something.
 *
 * ```sh
 * deno run -A bench/gpu_ablate.ts --streams=1 --tokens=128 --reps=3 --sampled \
 *   --skip=gemv4_shares --skip=scan_shares --skip=.
 * ```
 *
 * With `--prefill=N` the workload is a prompt's instead: `--sessions` new
 * sessions' `session.prefill` of N ids each, in flight at once and awaited
 * together (as `api_bench.ts --prefill-sessions` times them), and the
 * savings are per prompt:
 *
 * ```sh
 * deno run -A bench/gpu_ablate.ts --prefill=2048 --sessions=5 --reps=3
 * ```
 *
 * A pattern is a regular expression over kernel names (program key and grid,
 * as `gpu_profile.ts` prints them); without `--skip` it runs a default set of
 * kernel families (with `--prefill`, those of a prompt's pass). The model is
 * as in `gpu_profile.ts` (`--model`, `--mamba2`). Prints one JSON line per
 * run: the pattern, the median wall ms of `--reps` runs, tok/s, the µs saved
 * per step (per prompt with `--prefill`) against the first run with every
 * kernel, and the dispatches left out per step (the prompt's included) or per
 * prompt.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { WebGpuBackend } from "../src/backends/webgpu/mod.ts";
import { median } from "./edge_load.ts";
import { benchModel, decodeStreams, prefillOnce } from "./gpu_workload.ts";

/**
 * Kernel families of a decode step, by the shaders in their program keys.
 * `matmul_whole` is the prelude of every matmul not split over K: lm_head's
 * tiles, and the skinny entry point too (x_proj; out_proj at 33 to 64 rows).
 */
const FAMILIES = [
  "gemv4_shares",
  "gemv4_no_shares",
  "matmul_parts|matmul_sum",
  "matmul_whole",
  "skinny",
  "scan",
  "ssd",
  "conv",
  "rmsnorm|residual",
  "argmax|sample|penalize",
  ".",
];
/**
 * Kernel families of a prompt's pass: the tiled matmuls not split over K
 * (in_proj, dt_proj), those split over K with their sums (out_proj), the
 * skinny one (x_proj), the scan's passes one by one, the conv and the norms.
 */
const PREFILL_FAMILIES = [
  "matmul_whole.*:main",
  "matmul_parts|matmul_sum",
  "skinny",
  "chunk_state",
  "carry",
  "scan.*:output",
  "ssd",
  "conv",
  "rmsnorm|residual",
  ".",
];

const flags = parseArgs(Deno.args, {
  string: ["model", "streams", "tokens", "reps", "skip", "prefill", "sessions"],
  boolean: ["mamba2", "sampled"],
  collect: ["skip"],
  default: { streams: "1", tokens: "128", reps: "3", prefill: "0", sessions: "5" },
});
const prefill = Number(flags.prefill);
const sessions = Number(flags.sessions);
const streams = Number(flags.streams);
const tokens = Number(flags.tokens);
// What the savings are per: a decode step, or a prompt of the prefill workload.
const units = prefill > 0 ? sessions : tokens;
const unit = prefill > 0 ? "Prompt" : "Step";
const idsPerRun = prefill > 0 ? sessions * prefill : streams * tokens;
const reps = Number(flags.reps);
const patterns = (flags.skip as string[]).length > 0
  ? flags.skip as string[]
  : prefill > 0
  ? PREFILL_FAMILIES
  : FAMILIES;

const backend = await WebGpuBackend.create();
const { model, source } = await benchModel(backend, flags);
console.log(JSON.stringify({
  adapter: backend.adapterInfo,
  model: source,
  ...(prefill > 0 ? { prefill, sessions } : { streams, tokens }),
}));

/** The workload once: decode steps of new streams, or prompts in flight. */
function workload(): Promise<unknown> {
  if (prefill > 0) {
    return Promise.all(Array.from({ length: sessions }, () => prefillOnce(model, prefill)));
  }
  return decodeStreams(model, streams, tokens, flags.sampled);
}

/** Median wall ms and dispatches per step (or prompt) of `reps` runs, kernels matching `pattern` left out. */
async function timed(pattern: string | null) {
  backend.skipKernels(pattern === null ? null : new RegExp(pattern));
  await workload(); // new recordings, clocks up
  const walls: number[] = [];
  const before = backend.dispatches;
  for (let i = 0; i < reps; i++) {
    const start = performance.now();
    await workload();
    walls.push(performance.now() - start);
  }
  backend.skipKernels(null);
  return {
    wallMs: median(walls),
    dispatchesPerUnit: (backend.dispatches - before) / reps / units,
  };
}

const all = await timed(null);
const report = (skip: string | null, run: { wallMs: number; dispatchesPerUnit: number }) =>
  console.log(JSON.stringify({
    skip,
    wallMs: +run.wallMs.toFixed(1),
    tokPerS: Math.round(idsPerRun / (run.wallMs / 1000)),
    [`savedUsPer${unit}`]: +((all.wallMs - run.wallMs) * 1000 / units).toFixed(1),
    [`skippedPer${unit}`]: +(all.dispatchesPerUnit - run.dispatchesPerUnit).toFixed(1),
  }));
report(null, all);
for (const pattern of patterns) report(pattern, await timed(pattern));
report(null, await timed(null));
backend.dispose();
