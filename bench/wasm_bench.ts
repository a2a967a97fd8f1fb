/**
 * Speed of the wasm backend: the selective scan kernel on its own (elements
 * B·D·L per second, N = 16) against the JS reference, and end to end on a
 * mamba-130m-shaped random model (prefill of a 512-token prompt, decode of
 * 128 tokens) with 1 and 2 threads.
 *
 * `deno bench -A bench/wasm_bench.ts` (or through `deno task bench`). The
 * 130m model is read from `$MAMBA_BENCH_MODEL` (written by `deno task
 * make-random-model <dir>`), else written to a temp dir first. Each bench's
 * name says how much work one iteration does: rate = work / time per iteration.
 *
 * @module
 */

import type { Backend } from "../src/backend.ts";
import { JsBackend } from "../src/backends/js.ts";
import { WasmBackend } from "../src/backends/wasm.ts";
import { loadCheckpoint } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { Session } from "../src/session.ts";
import { benchModelDir, promptIds, uniformFloats } from "./make_random_model.ts";

const N = 16;

/** A scan of `batch` sequences of `len` tokens over `dim` channels, as one bench fn. */
function scanBench<Buf>(be: Backend<Buf>, batch: number, dim: number, len: number) {
  const up = (a: Float32Array) => be.upload(a);
  const args = {
    y: be.zeros(len * dim),
    u: up(uniformFloats(len * dim, -1, 1, 1)),
    delta: up(uniformFloats(len * dim, -3, 1, 2)),
    A: up(uniformFloats(dim * N, -16, -1, 3)),
    B: up(uniformFloats(len * N, -1, 1, 4)),
    C: up(uniformFloats(len * N, -1, 1, 5)),
    D: up(uniformFloats(dim, 0, 1, 6)),
    z: up(uniformFloats(len * dim, -2, 2, 7)),
    deltaBias: up(uniformFloats(dim, -4, -1, 8)),
    deltaSoftplus: true,
    len,
    dim,
    dState: N,
  };
  const states = Array.from({ length: batch }, () => be.zeros(dim * N));
  return async () => {
    for (const state of states) be.selectiveScan({ ...args, state });
    await be.read(args.y, 0, 1);
  };
}

const wasm1 = await WasmBackend.create({ threads: 1 });
const wasm2 = await WasmBackend.create({ threads: 2 });
const js = new JsBackend();

const SCAN_SHAPES: [number, number, number][] = [[1, 1536, 2048], [1, 1536, 16384], [
  8,
  1536,
  2048,
]];
for (const [batch, dim, len] of SCAN_SHAPES) {
  const elements = batch * dim * len;
  const group = `scan (${batch},${dim},${len}) = ${elements} elements`;
  // The reference takes seconds per iteration on the larger shapes: few runs.
  Deno.bench({
    name: `js reference: ${elements} elements`,
    group,
    baseline: true,
    n: 2,
    warmup: 0,
    fn: scanBench(js, batch, dim, len),
  });
  for (const [threads, backend] of [[1, wasm1], [2, wasm2]] as const) {
    Deno.bench({
      name: `wasm ${threads} thread(s): ${elements} elements`,
      group,
      n: 5,
      warmup: 1,
      fn: scanBench(backend, batch, dim, len),
    });
  }
}

const PREFILL = 512;
const DECODE = 128;
const checkpoint = await loadCheckpoint(await benchModelDir());
const vocab = checkpoint.config.vocabSize;
const prompt = promptIds(PREFILL, vocab);
for (const threads of [1, 2]) {
  const backend = threads === 1 ? wasm1 : wasm2;
  const model = new MambaModel(backend, checkpoint.config, checkpoint.weights);
  Deno.bench({
    name: `wasm ${threads} thread(s): prefill ${PREFILL} tokens`,
    group: "130m-shaped prefill",
    baseline: threads === 1,
    n: 3,
    warmup: 1,
    async fn() {
      const session = new Session(model);
      await session.prefill(prompt);
      session.dispose();
    },
  });
  Deno.bench({
    name: `wasm ${threads} thread(s): decode ${DECODE} tokens`,
    group: "130m-shaped decode",
    baseline: threads === 1,
    n: 3,
    warmup: 1,
    async fn(b) {
      const session = new Session(model);
      await session.prefill(prompt.subarray(0, 1));
      b.start();
      for (let i = 0; i < DECODE; i++) await session.step(prompt[i]);
      b.end();
      session.dispose();
    },
  });
}
