/**
 * Benchmarks of the "webgpu" backend, printed as one JSON object:
 *
 * - `scan`: the fused selective scan kernel (fp32, N = 16, with z, D, delta bias
 *   and softplus) over mamba_ssm's benchmark shapes: elements/s (batch·dim·len
 *   per second: the wall time of 2R runs minus that of R runs, over R, each the
 *   best of three, which leaves out the fixed latency of waiting for the GPU)
 *   and the bandwidth that implies (u, delta, z, y: 4 bytes per element; B, C:
 *   4 bytes per (batch, len, N)), against mamba_ssm's CUDA figures;
 * - `ops`: single operations at mamba-130m's shapes (a prefill chunk of 512 rows; one layer of a
 *   decode step for 1, 16 and 64 sequences), microseconds per call.
 *
 * The model end to end, through the public API, is `bench/api_bench.ts`'s.
 *
 * ```sh
 * deno run -A bench/webgpu_bench.ts                 # everything (needs a large GPU)
 * deno run -A bench/webgpu_bench.ts --quick         # small shapes, e.g. on llvmpipe
 * deno run -A bench/webgpu_bench.ts --only=scan --targets=65536,262144
 * deno run -A bench/webgpu_bench.ts --only=scan --chunk-lens=32,64   # fixed chunk lengths
 * ```
 *
 * On the GPU machine it runs bundled: `deno bundle --platform deno -o
 * .device/gpu_bench.js bench/webgpu_bench.ts` (see ../shared/device/README.md).
 *
 * @module
 */

import { type GpuBuffer, WebGpuBackend, type WebGpuOptions } from "../src/backends/webgpu/mod.ts";
import { uniformFloats } from "./make_random_model.ts";

/** mamba_ssm's CUDA selective scan, G elements/s, by "batch,dim,len". */
const CUDA_SCAN: Record<string, number> = {
  "1,1536,2048": 25.0,
  "1,1536,16384": 25.3,
  "8,1536,2048": 29.0,
  "1,5120,4096": 27.2,
  "16,2048,2048": 29.5,
  "1,1536,131072": 25.4,
};
const N = 16;

function flag(name: string): string | undefined {
  const arg = Deno.args.find((a) => a === `--${name}` || a.startsWith(`--${name}=`));
  return arg === undefined ? undefined : (arg.split("=")[1] ?? "");
}

/** A GPU buffer of `length` floats filled by tiling a random block (no host array that large). */
function gpuRandom(
  gpu: WebGpuBackend,
  length: number,
  lo: number,
  hi: number,
  seed: number,
): GpuBuffer {
  const block = Math.min(length, 1 << 20);
  const src = gpu.upload(uniformFloats(block, lo, hi, seed));
  const buf = gpu.zeros(length);
  for (let offset = 0; offset < length; offset += block) {
    gpu.copy({ dst: buf, dstOffset: offset, src, length: Math.min(block, length - offset) });
  }
  gpu.release(src);
  return buf;
}

/**
 * Seconds per call of `issue`, which issues work on `gpu` `count` times. Waiting
 * for the GPU costs Deno a fixed ~10 ms, so this times R and 2R calls and takes
 * the difference over R; each is the best of three, after R warm-up calls that
 * also bring the GPU's clocks up.
 */
async function secondsPerCall(
  gpu: WebGpuBackend,
  issue: (count: number) => void,
  reps: number,
): Promise<number> {
  const timed = async (count: number) => {
    const t0 = performance.now();
    issue(count);
    await gpu.sync();
    return performance.now() - t0;
  };
  await timed(reps);
  let once = Infinity;
  let twice = Infinity;
  for (let round = 0; round < 3; round++) {
    once = Math.min(once, await timed(reps));
    twice = Math.min(twice, await timed(2 * reps));
  }
  return (twice - once) / 1000 / reps;
}

async function benchScan(
  gpu: WebGpuBackend,
  batch: number,
  dim: number,
  len: number,
  reps: number,
) {
  const elems = batch * dim * len;
  const bufs = {
    u: gpuRandom(gpu, elems, -1, 1, 1),
    delta: gpuRandom(gpu, elems, -5, -2, 2), // softplus(delta + bias) ≈ 0.001 … 0.1
    z: gpuRandom(gpu, elems, -2, 2, 3),
    y: gpu.zeros(elems),
    B: gpuRandom(gpu, batch * len * N, -1, 1, 4),
    C: gpuRandom(gpu, batch * len * N, -1, 1, 5),
    A: gpu.upload(uniformFloats(dim * N, -16, -1, 6)),
    D: gpu.upload(uniformFloats(dim, 0.5, 1.5, 7)),
    deltaBias: gpu.upload(uniformFloats(dim, -0.5, 0.5, 8)),
    state: gpu.zeros(batch * dim * N),
  };
  const run = () =>
    gpu.selectiveScan({
      ...bufs,
      deltaSoftplus: true,
      len,
      dim,
      dState: N,
      batch,
    });
  const seconds = await secondsPerCall(gpu, (count) => {
    for (let i = 0; i < count; i++) {
      run();
      gpu.flush();
    }
  }, reps);
  const check = await gpu.read(bufs.y, elems - 4, 4);
  for (const b of Object.values(bufs)) gpu.release(b);
  const bytes = 4 * (4 * elems + 2 * batch * len * N);
  const gElems = elems / seconds / 1e9;
  const cuda = CUDA_SCAN[`${batch},${dim},${len}`];
  return {
    batch,
    dim,
    len,
    chunkLen: gpu.scanChunkLen(batch, dim, len),
    reps,
    ms: +(seconds * 1000).toFixed(3),
    gElemsPerS: +gElems.toFixed(2),
    gbPerS: +(bytes / seconds / 1e9).toFixed(1),
    cudaGElemsPerS: cuda ?? null,
    ratioVsCuda: cuda ? +(gElems / cuda).toFixed(3) : null,
    finite: check.every(Number.isFinite),
  };
}

/** Microseconds per call of single operations at mamba-130m's shapes (prefill chunk 512, decode 1). */
async function benchOps(gpu: WebGpuBackend) {
  const r = (n: number, seed: number) => gpuRandom(gpu, n, -1, 1, seed);
  const [L, D, E, V] = [512, 768, 1536, 50280];
  const x = r(L * E, 1);
  const w = r(E * D, 2);
  const lm = r(V * D, 3);
  const out = gpu.zeros(L * E);
  const logits = gpu.zeros(V);
  const st = gpu.zeros(E * N);
  const conv = gpu.zeros(3 * E);
  const small = r(16, 4);
  const B = r(L * N, 5);
  const A = gpu.upload(uniformFloats(E * N, -16, -1, 6));
  /** A scan of `batch` sequences of `len` tokens, their states in `state`. */
  const scan = (len: number, batch = 1, state = st) => () =>
    gpu.selectiveScan({
      y: out,
      u: x,
      delta: x,
      A,
      B,
      C: B,
      D: w,
      z: x,
      deltaBias: w,
      deltaSoftplus: true,
      state,
      len,
      dim: E,
      dState: N,
      batch,
    });
  /** `rows` rows of x times a weight [outDim, inDim]ᵀ (w unless given), into `into` (or out). */
  const product = (rows: number, inDim: number, outDim: number, weight = w, into = out) => () =>
    gpu.linear({ out: into, x, weight, rows, inDim, outDim });
  const cases: [string, number, () => void][] = [
    ["matmul 512x768->1536", 20, product(L, D, E)],
    ["matmul 512x1536->768", 20, product(L, E, D)],
    ["matmul 512x1536->16", 20, product(L, E, 16)],
    ["gemv 1x768->1536", 200, product(1, D, E)],
    ["gemv 1x1536->16", 200, product(1, E, 16)],
    ["gemv 1x768->50280", 50, product(1, D, V, lm, logits)],
    ["scan len 512 dim 1536", 20, scan(L)],
    ["scan len 1 dim 1536", 200, scan(1)],
    [
      "conv len 512",
      20,
      () =>
        gpu.causalConv({ out, x, weight: w, bias: w, state: conv, len: L, channels: E, kernel: 4 }),
    ],
    [
      "conv len 1",
      200,
      () =>
        gpu.causalConv({ out, x, weight: w, bias: w, state: conv, len: 1, channels: E, kernel: 4 }),
    ],
    ["rmsNorm 512x768", 20, () => gpu.rmsNorm({ out, x, weight: w, rows: L, dim: D, eps: 1e-5 })],
    ["add 512x768", 20, () => gpu.addInPlace({ acc: out, x, length: L * D })],
    ["add 16 (dispatch overhead)", 1000, () => gpu.addInPlace({ acc: out, x: small, length: 16 })],
  ];
  // A decode step's operations for `rows` sequences at once (the engine's batched round), one
  // layer's worth each, the conv and x_proj not folded into in_proj's GEMV past 16 rows.
  const inProj = r(2 * E * D, 7);
  const logitRows = gpu.zeros(64 * V);
  const states = gpu.zeros(64 * E * N);
  const convStates = gpu.zeros(64 * 3 * E);
  for (const rows of [1, 16, 64]) {
    const per = rows === 1 ? 200 : 50;
    cases.push(
      [
        `decode ${rows}: rmsNorm ${rows}x768`,
        per,
        () => gpu.rmsNorm({ out, x, weight: w, rows, dim: D, eps: 1e-5 }),
      ],
      [`decode ${rows}: in_proj ${rows}x768->3072`, per, product(rows, D, 2 * E, inProj)],
      [`decode ${rows}: conv step`, per, () =>
        gpu.causalConv({
          out,
          x,
          weight: w,
          bias: w,
          state: convStates,
          len: 1,
          channels: E,
          kernel: 4,
          batch: rows,
        })],
      [`decode ${rows}: x_proj ${rows}x1536->80`, per, product(rows, E, 80)],
      [`decode ${rows}: scan step`, per, scan(1, rows, states)],
      [
        `decode ${rows}: out_proj ${rows}x1536->768 (+=)`,
        per,
        () => gpu.linear({ out, x, weight: w, rows, inDim: E, outDim: D, accumulate: true }),
      ],
      [
        `decode ${rows}: lm_head ${rows}x768->50280`,
        rows === 1 ? 50 : 20,
        product(rows, D, V, lm, logitRows),
      ],
    );
  }
  const results: Record<string, number> = {};
  for (const [name, reps, fn] of cases) {
    const seconds = await secondsPerCall(gpu, (count) => {
      for (let i = 0; i < count; i++) fn();
    }, reps);
    results[name] = +(seconds * 1e6).toFixed(1);
  }
  const t0 = performance.now();
  for (let i = 0; i < 20; i++) await gpu.read(small, 0, 4);
  results["read 4 floats (submit + map round trip)"] = +(((performance.now() - t0) * 1000) / 20)
    .toFixed(1);
  const t1 = performance.now();
  for (let i = 0; i < 20; i++) {
    gpu.addInPlace({ acc: out, x: small, length: 16 });
    await gpu.sync();
  }
  results["dispatch + submit + onSubmittedWorkDone"] = +(((performance.now() - t1) * 1000) / 20)
    .toFixed(1);
  return results;
}

async function main(): Promise<void> {
  const quick = flag("quick") !== undefined;
  const only = flag("only");
  const reps = Number(flag("reps") ?? (quick ? 2 : 5));
  const numbers = (name: string) => (flag(name) ?? "").split(",").filter(Boolean).map(Number);
  const scanOptions: WebGpuOptions[] = [
    ...numbers("targets").map((scanTargetThreads) => ({ scanTargetThreads })),
    ...numbers("chunk-lens").map((scanChunkLen) => ({ scanChunkLen })),
  ];
  const report: Record<string, unknown> = {};
  const open = (options: WebGpuOptions = {}) =>
    WebGpuBackend.create({ powerPreference: "high-performance", ...options });

  if (only === undefined || only === "scan") {
    const shapes = quick
      ? [[1, 256, 512], [2, 96, 300]]
      : [[1, 1536, 2048], [1, 1536, 16384], [8, 1536, 2048], [1, 5120, 4096], [16, 2048, 2048], [
        1,
        1536,
        131072,
      ]];
    const scan: unknown[] = [];
    for (const options of scanOptions.length ? scanOptions : [{}]) {
      const gpu = await open(options);
      report.adapter = gpu.adapterInfo;
      for (const [batch, dim, len] of shapes) {
        const n = Math.min(400, Math.max(reps, Math.ceil(1e9 / (batch * dim * len))));
        const result = await benchScan(gpu, batch, dim, len, n);
        scan.push({ options, ...result });
        console.error(JSON.stringify(scan.at(-1)));
      }
      gpu.dispose();
    }
    report.scan = scan;
  }
  if (only === undefined || only === "ops") {
    const gpu = await open();
    report.opsMicroseconds = await benchOps(gpu);
    console.error(JSON.stringify(report.opsMicroseconds));
    gpu.dispose();
  }
  console.log(JSON.stringify(report, null, 2));
}

if (import.meta.main) await main();
