/**
 * Benchmarks of the "webgpu" backend, printed as one JSON object:
 *
 * - `scan`: the fused selective scan kernel (fp32, N = 16, with z, D, delta bias
 *   and softplus) over mamba_ssm's benchmark shapes: elements/s (batch·dim·len
 *   per second: the wall time of 2R runs minus that of R runs, over R, each the
 *   best of three, which leaves out the fixed latency of waiting for the GPU)
 *   and the bandwidth that implies (u, delta, z, y: 4 bytes per element; B, C:
 *   4 bytes per (batch, len, N)), against mamba_ssm's CUDA figures;
 * - `model`: a mamba-130m-shaped model with random F32 weights built in memory:
 *   prefill tok/s for 2048 tokens (with the read-back of the last logits, and
 *   on the device alone), decode tok/s over 128 steps at batch 1 and
 *   compute dispatches per decoded token, against mamba_ssm's 88,000 and 900 tok/s;
 *   greedy decoding and top-k sampling (also with a repetition penalty) on
 *   the device (one read-back per 32 tokens); and 16
 *   sequences decoded together (against 8,900 tok/s), sampled on the host
 *   (logits read back every step) and greedily on the device.
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

import { type GpuBuffer, WebGpuBackend, type WebGpuOptions } from "../src/backends/webgpu.ts";
import type { MambaConfig } from "../src/config.ts";
import { type DecodedChunk, MambaModel } from "../src/model.ts";
import type { LayerWeights, MambaWeights } from "../src/weights.ts";
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
const CUDA_PREFILL_TOKS = 88_000;
const CUDA_DECODE_TOKS = 900;
const CUDA_DECODE_BATCH16_TOKS = 8_900;
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
    gpu.copy(buf, offset, src, 0, Math.min(block, length - offset));
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

/** mamba-130m's shape (or a small one), with random F32 weights. */
export function randomModel(
  quick: boolean,
): { config: MambaConfig; weights: MambaWeights<Float32Array> } {
  const dModel = quick ? 64 : 768;
  const nLayer = quick ? 2 : 24;
  const vocabSize = quick ? 1000 : 50280;
  const dInner = 2 * dModel;
  const dtRank = Math.ceil(dModel / 16);
  const config: MambaConfig = {
    dModel,
    nLayer,
    dState: N,
    dConv: 4,
    expand: 2,
    dInner,
    dtRank,
    vocabSize,
    eps: 1e-5,
    projBias: false,
    convBias: true,
    tieEmbeddings: true,
  };
  let seed = 100;
  const w = (n: number, scale: number) => uniformFloats(n, -scale, scale, seed++);
  const layers: LayerWeights<Float32Array>[] = [];
  for (let l = 0; l < nLayer; l++) {
    const A = new Float32Array(dInner * N);
    for (let i = 0; i < A.length; i++) A[i] = -((i % N) + 1);
    layers.push({
      norm: new Float32Array(dModel).fill(1),
      inProj: w(2 * dInner * dModel, 1 / Math.sqrt(dModel)),
      inProjBias: null,
      convWeight: w(dInner * 4, 0.5),
      convBias: w(dInner, 0.1),
      xProj: w((dtRank + 2 * N) * dInner, 1 / Math.sqrt(dInner)),
      dtProj: w(dInner * dtRank, 1 / Math.sqrt(dtRank)),
      dtProjBias: uniformFloats(dInner, -6, -2.5, seed++),
      A,
      D: new Float32Array(dInner).fill(1),
      outProj: w(dModel * dInner, 1 / Math.sqrt(dInner) / nLayer),
      outProjBias: null,
    });
  }
  const embedding = w(vocabSize * dModel, 1);
  return {
    config,
    weights: { embedding, layers, normF: new Float32Array(dModel).fill(1), lmHead: embedding },
  };
}

async function benchModel(gpu: WebGpuBackend, quick: boolean) {
  const { config, weights } = randomModel(quick);
  const model = new MambaModel(gpu, config, weights);
  const promptLen = quick ? 256 : 2048;
  const steps = quick ? 16 : 128;
  const ids = Int32Array.from(uniformFloats(promptLen, 0, config.vocabSize, 9), Math.floor);

  // Warm-up: compiles every pipeline of the prefill and of decode.
  let state = model.newState();
  await model.run(state, ids, "last");
  await model.run(state, Int32Array.of(1), "last");
  model.releaseState(state);

  const pendingPrefills: Promise<void>[] = [];
  const prefillMs: number[] = [];
  for (let rep = 0; rep < 5; rep++) {
    state = model.newState();
    await gpu.sync();
    const t0 = performance.now();
    await model.run(state, ids, "last");
    prefillMs.push(performance.now() - t0);
    if (rep < 4) model.releaseState(state);
  }
  const bestPrefill = Math.min(...prefillMs);
  // Prefill on the device alone: prompts issued back to back, each on its own
  // state, their logits read back together; the difference of 2R and R
  // prompts leaves out Deno's fixed wait for a read-back.
  const prefillSeconds = await secondsPerCall(gpu, (count) => {
    const states = Array.from({ length: count }, () => model.newState());
    pendingPrefills.push(
      Promise.all(states.map((s) => model.run(s, ids, "last"))).then(() =>
        states.forEach((s) => model.releaseState(s))
      ),
    );
  }, 3);
  await Promise.all(pendingPrefills);

  let token = 1;
  const d0 = gpu.dispatches;
  const s0 = gpu.submissions;
  const t0 = performance.now();
  for (let i = 0; i < steps; i++) {
    const logits = await model.run(state, Int32Array.of(token), "last");
    token = logits.indexOf(Math.max(...logits.subarray(0, 50))); // cheap, data-dependent
  }
  const decodeS = (performance.now() - t0) / 1000;
  const prefillToks = promptLen / (bestPrefill / 1000);
  const decodeToks = steps / decodeS;
  const dispatchesPerToken = (gpu.dispatches - d0) / steps;
  const submissionsPerToken = (gpu.submissions - s0) / steps;

  // Greedy decoding on the device (what generate() does at temperature 0):
  // argmax and embedding stay on the GPU, one read-back per batch of 32.
  const batch = 32;
  await model.decodeGreedy(state, 1, batch, config.vocabSize); // compiles argmax and embedFrom
  // The host records a token between two submissions; when that takes as long
  // as a token does, the host, not the GPU, sets the pace.
  const flushes: number[] = [];
  const flush = gpu.flush.bind(gpu);
  gpu.flush = () => {
    flushes.push(performance.now());
    flush();
  };
  const greedyMs = await msInCalls(
    steps,
    batch,
    (count) => model.decodeGreedy(state, token, count, config.vocabSize),
  );
  gpu.flush = flush;
  const greedyToks = steps / (greedyMs / 1000);
  // Sampling on the device with llama.cpp's defaults (top-k 40, top-p 0.95,
  // min-p 0.05, temperature 0.8), as generate() does when it can.
  const sampling = { topK: 40, topP: 0.95, minP: 0.05, temperature: 0.8 };
  const uniforms = uniformFloats(batch, 0, 1, 10);
  await model.decodeSampledBatch([state], [token], batch, config.vocabSize, sampling, uniforms);
  const sampledMs = await msInCalls(
    steps,
    batch,
    (count) =>
      model.decodeSampledBatch([state], [token], count, config.vocabSize, sampling, uniforms),
  );
  const sampledToks = steps / (sampledMs / 1000);
  // The same with a repetition penalty of 1.1 over the last 64 ids.
  const penalty = { penalty: 1.1, window: 64, histories: [Array.from(ids.subarray(-64))] };
  const penalizedMs = await msInCalls(
    steps,
    batch,
    (count) =>
      model.decodeSampledBatch(
        [state],
        [token],
        count,
        config.vocabSize,
        sampling,
        uniforms,
        penalty,
      ),
  );
  const penalizedToks = steps / (penalizedMs / 1000);
  // The same decodes streamed, as generate() runs them: one call, read back
  // 32 ids at a time, each read while the device already runs the next 32.
  const chunks = Array.from(
    { length: Math.ceil(steps / batch) },
    (_, i) => Math.min(batch, steps - i * batch),
  );
  const streamedGreedyToks = await tokensPerSecond(
    steps,
    () => model.streamGreedyBatch([state], [token], chunks, config.vocabSize),
  );
  const streamedUniforms = uniformFloats(steps, 0, 1, 11);
  const streamedSampledToks = await tokensPerSecond(
    steps,
    () =>
      model.streamSampledBatch(
        [state],
        [token],
        chunks,
        config.vocabSize,
        sampling,
        streamedUniforms,
      ),
  );
  const gaps = flushes.slice(1).map((t, i) => t - flushes[i]).sort((a, b) => a - b);
  const hostMsPerToken = gaps[Math.floor(gaps.length / 2)];
  // Batched decode: 16 sequences stepped together (what the edge server's
  // batcher does), logits of every row read back each step.
  const batchSize = 16;
  const batchSteps = quick ? 4 : 32;
  const states = Array.from({ length: batchSize }, () => model.newState());
  for (const s of states) await model.run(s, ids.subarray(0, 16), "last");
  let batchIds = Int32Array.from({ length: batchSize }, (_, i) => i + 1);
  await model.stepBatch(states, batchIds); // compiles the batch's pipelines
  const b0 = performance.now();
  for (let i = 0; i < batchSteps; i++) {
    const logits = await model.stepBatch(states, batchIds);
    batchIds = batchIds.map((_, row) => {
      const head = logits.subarray(row * config.vocabSize, row * config.vocabSize + 50);
      return head.indexOf(Math.max(...head));
    });
  }
  const batchToks = (batchSize * batchSteps) / ((performance.now() - b0) / 1000);
  // The same 16 decoded greedily on the device, one read-back per 32 steps.
  let firsts = Array.from(batchIds);
  await model.decodeGreedyBatch(states, firsts, 2, config.vocabSize); // compiles
  const batchGreedyMs = await msInCalls(steps, batch, async (count) => {
    const results = await model.decodeGreedyBatch(states, firsts, count, config.vocabSize);
    firsts = results.map((r) => r.logits.indexOf(Math.max(...r.logits.subarray(0, 50))));
  });
  const batchGreedyToks = (batchSize * steps) / (batchGreedyMs / 1000);
  const streamedBatchToks = await tokensPerSecond(
    batchSize * steps,
    () => model.streamGreedyBatch(states, firsts, chunks, config.vocabSize),
  );
  states.forEach((s) => model.releaseState(s));
  return {
    config: {
      dModel: config.dModel,
      nLayer: config.nLayer,
      vocab: config.vocabSize,
      dState: N,
      dConv: 4,
      dtRank: config.dtRank,
    },
    prefillTokens: promptLen,
    prefillMs: prefillMs.map((m) => +m.toFixed(1)),
    prefillTokPerS: Math.round(prefillToks),
    prefillRatioVsCuda: quick ? null : +(prefillToks / CUDA_PREFILL_TOKS).toFixed(3),
    prefillOnDeviceTokPerS: Math.round(promptLen / prefillSeconds),
    prefillOnDeviceRatioVsCuda: quick
      ? null
      : +(promptLen / prefillSeconds / CUDA_PREFILL_TOKS).toFixed(3),
    decodeSteps: steps,
    decodeTokPerS: +decodeToks.toFixed(1),
    decodeMsPerToken: +((decodeS * 1000) / steps).toFixed(3),
    decodeRatioVsCuda: quick ? null : +(decodeToks / CUDA_DECODE_TOKS).toFixed(3),
    dispatchesPerDecodeToken: dispatchesPerToken,
    submissionsPerDecodeToken: submissionsPerToken,
    greedyOnDeviceBatch: batch,
    greedyOnDeviceTokPerS: +greedyToks.toFixed(1),
    greedyOnDeviceRatioVsCuda: quick ? null : +(greedyToks / CUDA_DECODE_TOKS).toFixed(3),
    greedyOnDeviceMsPerToken: +(greedyMs / steps).toFixed(3),
    greedyHostMsPerToken: +hostMsPerToken.toFixed(3),
    sampledOnDeviceTokPerS: +sampledToks.toFixed(1),
    sampledOnDeviceRatioVsCuda: quick ? null : +(sampledToks / CUDA_DECODE_TOKS).toFixed(3),
    sampledWithPenaltyOnDeviceTokPerS: +penalizedToks.toFixed(1),
    greedyStreamedTokPerS: +streamedGreedyToks.toFixed(1),
    greedyStreamedRatioVsCuda: quick ? null : +(streamedGreedyToks / CUDA_DECODE_TOKS).toFixed(3),
    sampledStreamedTokPerS: +streamedSampledToks.toFixed(1),
    sampledStreamedRatioVsCuda: quick ? null : +(streamedSampledToks / CUDA_DECODE_TOKS).toFixed(3),
    batchDecodeSequences: batchSize,
    batchDecodeTokPerS: +batchToks.toFixed(1),
    batchDecodeRatioVsCuda: quick ? null : +(batchToks / CUDA_DECODE_BATCH16_TOKS).toFixed(3),
    batchGreedyOnDeviceTokPerS: +batchGreedyToks.toFixed(1),
    batchGreedyOnDeviceRatioVsCuda: quick
      ? null
      : +(batchGreedyToks / CUDA_DECODE_BATCH16_TOKS).toFixed(3),
    batchGreedyStreamedTokPerS: +streamedBatchToks.toFixed(1),
    batchGreedyStreamedRatioVsCuda: quick
      ? null
      : +(streamedBatchToks / CUDA_DECODE_BATCH16_TOKS).toFixed(3),
  };
}

/**
 * Milliseconds to decode `steps` tokens in calls of up to `batch`, each
 * awaited (its read-back included) before the next is issued.
 */
async function msInCalls(
  steps: number,
  batch: number,
  call: (count: number) => Promise<unknown>,
): Promise<number> {
  const t0 = performance.now();
  for (let done = 0; done < steps; done += batch) await call(Math.min(batch, steps - done));
  return performance.now() - t0;
}

/**
 * Tokens per second of a streamed device decode of `tokens` tokens in all:
 * one warm-up run, then the best of three.
 */
async function tokensPerSecond(
  tokens: number,
  decode: () => AsyncGenerator<DecodedChunk, void, undefined>,
): Promise<number> {
  let best = Infinity;
  for (let run = 0; run < 4; run++) {
    const t0 = performance.now();
    for await (const _ of decode()) {
      // Each chunk's ids arrive here as generate() would hand them on.
    }
    if (run > 0) best = Math.min(best, performance.now() - t0);
  }
  return tokens / (best / 1000);
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
  const scan = (len: number) => () =>
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
      state: st,
      len,
      dim: E,
      dState: N,
    });
  const cases: [string, number, () => void][] = [
    ["matmul 512x768->1536", 20, () => gpu.linear(out, x, w, null, L, D, E)],
    ["matmul 512x1536->768", 20, () => gpu.linear(out, x, w, null, L, E, D)],
    ["matmul 512x1536->16", 20, () => gpu.linear(out, x, w, null, L, E, 16)],
    ["gemv 1x768->1536", 200, () => gpu.linear(out, x, w, null, 1, D, E)],
    ["gemv 1x1536->16", 200, () => gpu.linear(out, x, w, null, 1, E, 16)],
    ["gemv 1x768->50280", 50, () => gpu.linear(logits, x, lm, null, 1, D, V)],
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
    ["rmsNorm 512x768", 20, () => gpu.rmsNorm(out, x, w, L, D, 1e-5)],
    ["add 512x768", 20, () => gpu.addInPlace(out, x, L * D)],
    ["add 16 (dispatch overhead)", 1000, () => gpu.addInPlace(out, small, 16)],
  ];
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
    gpu.addInPlace(out, small, 16);
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
  if (only === undefined || only === "model") {
    const gpu = await open();
    report.adapter = gpu.adapterInfo;
    report.model = await benchModel(gpu, quick);
    console.error(JSON.stringify(report.model));
    gpu.dispose();
  }
  console.log(JSON.stringify(report, null, 2));
}

if (import.meta.main) await main();
