/**
 * What the "webgpu" backend alone does, against the reference JsBackend: its
 * fusions (the norm, the conv step and x_proj folded into a GEMV, dt_proj
 * into the scan step), the double-float scan, quantized blocks, matrices
 * split past the binding limit, recordings, and transfers. The operations
 * every backend shares are in the kernel table of `ops_test.ts`. Runs on any
 * WebGPU adapter (llvmpipe in CI); skipped where there is none.
 */

import { assert, assertEquals, assertRejects } from "@std/assert";
import { JsBackend } from "../src/backends/js.ts";
import { type GpuBuffer, WebGpuBackend, type WeightFormat } from "../src/backends/webgpu/mod.ts";
import { BufferPool, pooledBytes } from "../src/backends/webgpu/memory.ts";
import { loadCheckpoint } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, SafetensorsFile } from "../src/safetensors.ts";
import { BLOCK_ELEMENTS, type BlockType, dequantizeMatrix, type HalfFormat } from "../src/quant.ts";
import { Session } from "../src/session.ts";
import { xorshiftUniforms } from "../bench/make_random_model.ts";
import {
  halfMatrixOf,
  maxAbsDiff,
  maxRelDiff,
  quantizedOf,
  scaledError,
  SHARED,
} from "./helpers.ts";

const adapter = await navigator.gpu?.requestAdapter();
const ignore = adapter === null || adapter === undefined;

/** Deterministic values in [-scale, scale) (the benches' xorshift stream), so failures reproduce. */
function random(seed: number): (scale?: number) => number {
  const next = xorshiftUniforms(seed);
  return (scale = 1) => next(1, -scale, scale)[0];
}

function fill(n: number, rand: (s?: number) => number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => rand(scale));
}

/**
 * `v` rounded to `format` (unchanged for null). A bf16 copy's first value is
 * 2^-30, below f16's range, so that the matrix is not all exact f16, which
 * uploadHalfMatrix would keep as f16.
 */
function exactIn(v: Float32Array, format: HalfFormat | null): Float32Array {
  if (format === "f16") return v.map((x) => f16ToF32(f32ToF16(x)));
  if (format === null) return v;
  const rounded = v.map((x) => bf16ToF32(f32ToBf16(x)));
  rounded[0] = 2 ** -30;
  return rounded;
}

async function withGpu(
  fn: (gpu: WebGpuBackend) => Promise<void>,
  options = {},
): Promise<void> {
  const gpu = await WebGpuBackend.create(options);
  try {
    await fn(gpu);
  } finally {
    gpu.dispose();
  }
}

/**
 * Float32 sums on the GPU against float64 ones: each |got - want| must stay
 * within `tolerance` × (|want| + rms(want)), so that values which cancel to
 * near zero are measured against the size of what was summed.
 */
function close(got: Float32Array, want: Float32Array, tolerance: number, what: string): void {
  assertEquals(got.length, want.length, `${what}: length`);
  const worst = scaledError(got, want);
  assert(
    worst <= tolerance,
    `${what}: max scaled diff ${worst} (max relative ${maxRelDiff(got, want)})`,
  );
}

/** The bundled tiny-shakespeare model on `gpu`, and its expected outputs. */
async function tinyShakespeare(gpu: WebGpuBackend) {
  const dir = `${SHARED}/models/tiny-shakespeare`;
  const { config, weights } = await loadCheckpoint(dir);
  const expected = SafetensorsFile.parse(
    await Deno.readFile(`${dir}/expected.safetensors`),
    "expected.safetensors",
  );
  return { config, model: new MambaModel(gpu, config, weights), expected };
}

/**
 * The tiny-shakespeare model on `gpu` against its expected outputs: the
 * teacher-forced logits of prompt 0 within `tolerance`, then `steps` greedy
 * ids after its prompt (default: all of the expected ones).
 */
async function matchesTinyShakespeare(
  gpu: WebGpuBackend,
  tolerance: number,
  steps?: number,
): Promise<void> {
  const { model, expected } = await tinyShakespeare(gpu);
  const ids = expected.int32("prompt0_greedy_ids");
  const prompt = expected.int32("prompt0_ids");
  const logits = await model.forward(model.pool.acquire(), ids);
  const diff = maxAbsDiff(logits, expected.float32("prompt0_logits"));
  assert(diff <= tolerance, `logits: max abs diff ${diff}`);
  const wanted = ids.subarray(prompt.length, steps && prompt.length + steps);
  const session = new Session(model);
  await session.prefill(prompt);
  const { ids: generated } = await session.greedy(wanted.length);
  assertEquals(generated, [...wanted]);
}

const js = new JsBackend();

Deno.test({
  name: "webgpu: copy within a buffer, write and read ranges; a read past the end is refused",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(1);
      const acc = fill(1001, rand);
      const gAcc = gpu.upload(acc);
      const dst = gpu.zeros(10);
      const before = acc.slice();
      gpu.copy({ dst, dstOffset: 3, src: gAcc, srcOffset: 5, length: 4 });
      gpu.copy({ dst: gAcc, src: gAcc, srcOffset: 2, length: 6 }); // same buffer
      js.copy({ dst: acc, src: acc, srcOffset: 2, length: 6 });
      assertEquals(await gpu.read(dst), Float32Array.of(0, 0, 0, ...before.slice(5, 9), 0, 0, 0));
      assertEquals(await gpu.read(gAcc, 0, 12), acc.slice(0, 12));
      gpu.write(dst, Float32Array.of(1, 2), 8);
      assertEquals(await gpu.read(dst, 6), Float32Array.of(before[8], 0, 1, 2));
      assertEquals(await gpu.read(dst, 4, 0), new Float32Array(0));
      await assertRejects(() => gpu.read(dst, 5, 6), RangeError);
    }),
});

interface ScanCase {
  len: number;
  dim: number;
  dState: number;
  optional: boolean;
  softplus: boolean;
}

async function checkScan(
  gpu: WebGpuBackend,
  c: ScanCase,
  seed: number,
  batch = 1,
  tolerance = 1e-4,
): Promise<void> {
  const rand = random(seed);
  const { len, dim, dState } = c;
  const A = Float32Array.from({ length: dim * dState }, () => -Math.exp(rand(1.5)));
  const D = c.optional ? fill(dim, rand) : null;
  const deltaBias = c.optional ? fill(dim, rand, 0.5) : null;
  const seqs = Array.from({ length: batch }, () => ({
    u: fill(len * dim, rand),
    delta: Float32Array.from(
      { length: len * dim },
      () => c.softplus ? rand(2) - 1 : Math.abs(rand(0.2)),
    ),
    B: fill(len * dState, rand),
    C: fill(len * dState, rand),
    z: c.optional ? fill(len * dim, rand, 2) : null,
    state: fill(dim * dState, rand),
  }));
  const wantY: Float32Array[] = [];
  const wantState: Float32Array[] = [];
  for (const s of seqs) {
    const y = new Float32Array(len * dim);
    const state = s.state.slice();
    js.selectiveScan({
      ...s,
      y,
      A,
      D,
      deltaBias,
      deltaSoftplus: c.softplus,
      state,
      len,
      dim,
      dState,
    });
    wantY.push(y);
    wantState.push(state);
  }
  const cat = (arrays: (Float32Array | null)[]) => {
    if (arrays[0] === null) return null;
    const out = new Float32Array(arrays.reduce((n, a) => n + a!.length, 0));
    arrays.reduce((offset, a) => (out.set(a!, offset), offset + a!.length), 0);
    return gpu.upload(out);
  };
  const y = gpu.zeros(batch * len * dim);
  const state = cat(seqs.map((s) => s.state)) as GpuBuffer;
  gpu.selectiveScan({
    y,
    u: cat(seqs.map((s) => s.u))!,
    delta: cat(seqs.map((s) => s.delta))!,
    A: gpu.upload(A),
    B: cat(seqs.map((s) => s.B))!,
    C: cat(seqs.map((s) => s.C))!,
    D: D && gpu.upload(D),
    z: cat(seqs.map((s) => s.z)),
    deltaBias: deltaBias && gpu.upload(deltaBias),
    deltaSoftplus: c.softplus,
    state,
    len,
    dim,
    dState,
    batch,
  });
  const gotY = await gpu.read(y);
  const gotState = await gpu.read(state);
  const what = `scan ${JSON.stringify(c)} batch ${batch} chunk ${
    gpu.scanChunkLen(batch, dim, len)
  }`;
  for (let b = 0; b < batch; b++) {
    const yOf = gotY.subarray(b * len * dim, (b + 1) * len * dim);
    close(yOf, wantY[b], tolerance, `${what}: y[${b}]`);
    close(
      gotState.subarray(b * dim * dState, (b + 1) * dim * dState),
      wantState[b],
      tolerance,
      `${what}: state[${b}]`,
    );
  }
}

Deno.test({
  name: "webgpu: selective scan with the default chunking, and decode steps carry the state",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      // The default aims at many threads: 200 tokens of 48 channels become several chunks.
      assert(gpu.scanChunkLen(1, 48, 200) < 200);
      await checkScan(gpu, { len: 200, dim: 48, dState: 16, optional: true, softplus: true }, 20);
      await checkScan(gpu, { len: 1, dim: 1536, dState: 16, optional: true, softplus: true }, 21);
    }),
});

Deno.test({
  name:
    "webgpu: the double-float scan against js's float64 within 1e-6: len 1 to 300, N 5, 16 and 255 (several dispatches), batches, optional inputs absent",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const cases: [ScanCase, number][] = [
        [{ len: 1, dim: 3, dState: 5, optional: true, softplus: true }, 1],
        [{ len: 70, dim: 65, dState: 16, optional: true, softplus: true }, 2],
        [{ len: 33, dim: 7, dState: 16, optional: false, softplus: false }, 1],
        // 2^15 / 256 = 128 tokens per dispatch: three dispatches.
        [{ len: 300, dim: 2, dState: 255, optional: true, softplus: true }, 1],
      ];
      let seed = 60;
      for (const [c, batch] of cases) await checkScan(gpu, c, seed++, batch, 1e-6);
    }, { scanPrecision: "double-float" }),
});

Deno.test({
  name:
    "webgpu: the tiny-shakespeare model with double-float scans: logits within 1e-4 of expected, the first greedy ids equal",
  ignore,
  fn: () =>
    // Six decode steps (each about half a second on llvmpipe): x_proj's shares
    // folded into in_proj's GEMV are added up before this scan reads them.
    withGpu((gpu) => matchesTinyShakespeare(gpu, 1e-4, 6), { scanPrecision: "double-float" }),
});

/**
 * A decode step's scan with dt_proj folded in, against js's scan after
 * js's projection by `weight` (the float values the GPU matrix holds):
 * y and the state within 1e-5, in one dispatch per group of 16 states.
 */
async function foldedDtProjMatches(
  gpu: WebGpuBackend,
  rand: () => number,
  shape: { dim: number; rank: number; dState: number; batch: number },
  weight: Float32Array,
  gpuWeight: GpuBuffer,
  what: string,
): Promise<void> {
  const { dim, rank, dState, batch } = shape;
  const dt = fill(batch * rank, rand);
  const state = fill(batch * dim * dState, rand);
  const plain = {
    A: fill(dim * dState, rand).map((v) => -1 - 4 * Math.abs(v)),
    B: fill(batch * dState, rand),
    C: fill(batch * dState, rand),
    D: fill(dim, rand),
    z: fill(batch * dim, rand),
    u: fill(batch * dim, rand),
    deltaBias: fill(dim, rand),
    deltaSoftplus: true,
    len: 1,
    dim,
    dState,
    batch,
  };
  // The reference projects delta first, then scans.
  const wantDelta = new Float32Array(batch * dim);
  js.linear({ out: wantDelta, x: dt, weight, rows: batch, inDim: rank, outDim: dim });
  const wantY = new Float32Array(batch * dim);
  const wantState = state.slice();
  js.selectiveScan({ ...plain, y: wantY, delta: wantDelta, state: wantState });
  const dtBuffer = gpu.upload(dt);
  // Into scratch, dt_proj folds into the step (delta left unwritten); into
  // any other buffer it runs first.
  for (const delta of [gpu.scratch(batch * dim), gpu.zeros(batch * dim)]) {
    const y = gpu.zeros(batch * dim);
    const gotState = gpu.upload(state.slice());
    const before = gpu.dispatches;
    gpu.linear({
      out: delta,
      x: dtBuffer,
      weight: gpuWeight,
      rows: batch,
      inDim: rank,
      outDim: dim,
    });
    gpu.selectiveScan({
      ...plain,
      A: gpu.upload(plain.A),
      B: gpu.upload(plain.B),
      C: gpu.upload(plain.C),
      D: gpu.upload(plain.D),
      z: gpu.upload(plain.z),
      u: gpu.upload(plain.u),
      deltaBias: gpu.upload(plain.deltaBias),
      y,
      delta,
      state: gotState,
    });
    const groups = Math.ceil(dState / 16);
    const where = `${what}, delta in ${delta.transient ? "scratch" : "a plain buffer"}`;
    const dispatches = delta.transient ? groups : groups + 1;
    assertEquals(gpu.dispatches - before, dispatches, `${where}: one scan dispatch per group`);
    if (!delta.transient) close(await gpu.read(delta), wantDelta, 1e-5, `${where}: delta`);
    close(await gpu.read(y), wantY, 1e-5, `${where}: y`);
    close(await gpu.read(gotState), wantState, 1e-5, `${where}: state`);
  }
}

Deno.test({
  name:
    "webgpu: a decode step's scan with dt_proj folded in: f32, f16 and bf16 weights, ranks 5 to 200, N 7 to 40 (states as vec4s or not; with f32, ranks and N multiples of 4, every input as vec4s), batches 1 to 3",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(40);
      const dim = 130;
      // Ranks past 64 take the step's loop over dt_proj; N past 16 runs in groups of 16.
      const shapes = [
        [48, 16, 1],
        [5, 20, 3],
        [23, 16, 2],
        [48, 16, 3],
        [23, 7, 2],
        [100, 32, 2],
        [200, 40, 1],
      ];
      for (const [rank, dState, batch] of shapes) {
        for (const half of [null, "f16", "bf16"] as const) {
          const weight = exactIn(fill(dim * rank, rand, 0.3), half);
          const gpuWeight = half
            ? gpu.uploadHalfMatrix(halfMatrixOf(weight, half, rank))
            : gpu.upload(weight, rank);
          await foldedDtProjMatches(
            gpu,
            rand,
            { dim, rank, dState, batch },
            weight,
            gpuWeight,
            `step rank ${rank} N ${dState} batch ${batch} ${half ?? "f32"}`,
          );
        }
      }
    }),
});

Deno.test({
  name: "webgpu: matrices past the binding limit are split by rows for embed and linear",
  ignore,
  fn: () =>
    // Split past 1 KiB: a 37×24 f32 table (3552 bytes) becomes parts of 10 rows.
    withGpu(async (gpu) => {
      const rand = random(5);
      const [rows, dim] = [37, 24];
      const table = fill(rows * dim, rand);
      const halfTable = exactIn(table, "f16");
      // Only the first row is not all exact f16: every part is bf16 still.
      const bf16Table = exactIn(table, "bf16");
      for (
        const [label, values, buffer] of [
          ["f32", table, gpu.upload(table, dim)],
          ["f16", halfTable, gpu.uploadHalfMatrix(halfMatrixOf(halfTable, "f16", dim))],
          ["bf16", bf16Table, gpu.uploadHalfMatrix(halfMatrixOf(bf16Table, "bf16", dim))],
        ] as const
      ) {
        assert(buffer.parts.length > 1, `${label}: expected a split, got ${buffer.parts.length}`);
        for (const { part } of buffer.pieces()) {
          assertEquals(part.format, label, `${label}: a part's format`);
        }
        if (label === "f32") {
          const ids = Int32Array.of(0, 36, 9, 10, 19, 20, 35);
          const want = new Float32Array(ids.length * dim);
          js.embed({ out: want, table, ids, dim });
          const out = gpu.zeros(ids.length * dim);
          gpu.embed({ out, table: buffer, ids, dim });
          close(await gpu.read(out), want, 0, "embed over parts");
        }
        for (const batch of [1, 3, 70]) {
          const x = fill(batch * dim, rand);
          const bias = fill(rows, rand);
          await linearMatchesJs(
            gpu,
            buffer,
            values,
            { x, bias, rows: batch, inDim: dim, outDim: rows },
            `linear ${label} over parts, ${batch} rows`,
          );
        }
      }
      // Over 64 outputs the tiled matmul runs per part, writing at column offsets.
      const [wide, narrow, batch] = [70, 8, 9];
      const w = fill(wide * narrow, rand);
      const halfW = w.map((v) => f16ToF32(f32ToF16(v)));
      const x = fill(batch * narrow, rand);
      const bias = fill(wide, rand);
      for (
        const [label, values, buffer] of [
          ["f32", w, gpu.upload(w, narrow)],
          ["f16", halfW, gpu.uploadHalfMatrix(halfMatrixOf(halfW, "f16", narrow))],
        ] as const
      ) {
        assert(buffer.parts.length > 1, `${label}: expected a split, got ${buffer.parts.length}`);
        await linearMatchesJs(
          gpu,
          buffer,
          values,
          { x, bias, rows: batch, inDim: narrow, outDim: wide },
          `linear ${label} over parts, ${wide} outputs`,
        );
      }
    }, { splitMatricesOver: 1024 }),
});

/**
 * Asserts that webgpu's `linear` over `weight` matches js's over `values`
 * (the same matrix as floats) within 1e-4, with the same input and bias.
 */
async function linearMatchesJs(
  gpu: WebGpuBackend,
  weight: GpuBuffer,
  values: Float32Array,
  { x, bias, rows, inDim, outDim }: {
    x: Float32Array;
    bias: Float32Array;
    rows: number;
    inDim: number;
    outDim: number;
  },
  what: string,
): Promise<void> {
  const want = new Float32Array(rows * outDim);
  js.linear({ out: want, x, weight: values, bias, rows, inDim, outDim });
  const out = gpu.zeros(rows * outDim);
  gpu.linear({ out, x: gpu.upload(x), weight, bias: gpu.upload(bias), rows, inDim, outDim });
  close(await gpu.read(out), want, 1e-4, what);
}

/** Asserts that `got` holds exactly `want`'s values. */
function sameValues(got: Float32Array, want: Float32Array, what: string): void {
  assertEquals(got.length, want.length, `${what}: length`);
  const wrong = want.findIndex((v, i) => got[i] !== v);
  assert(wrong < 0, `${what}: element ${wrong} is ${got[wrong]}, not ${want[wrong]}`);
}

Deno.test({
  name:
    "webgpu: a q8_0 matrix past the binding limit is split by rows for embed, copyRows and linear",
  ignore,
  fn: () =>
    // Split past 4 KiB: 37 rows of 256 (8 blocks, 288 bytes) become parts of 14 rows.
    withGpu(async (gpu) => {
      const rand = random(13);
      const [rows, dim] = [37, 256];
      const matrix = quantizedOf("q8_0", rows, dim, fill(rows * dim, rand));
      const values = dequantizeMatrix(matrix);
      const buffer = gpu.uploadQuantizedMatrix(matrix);
      assertEquals(buffer.parts.length, 3, "parts");
      for (const { part } of buffer.pieces()) assertEquals(part.format, "q8_0", "a part's format");
      const ids = Int32Array.of(0, 36, 13, 14, 27, 28, 35);
      const want = new Float32Array(ids.length * dim);
      js.embed({ out: want, table: values, ids, dim });
      const out = gpu.zeros(ids.length * dim);
      gpu.embed({ out, table: buffer, ids, dim });
      sameValues(await gpu.read(out), want, "embed over parts");
      const copied = gpu.zeros(ids.length * dim);
      const srcRows = { buf: gpu.upload(Float32Array.from(ids)), offset: 0 };
      gpu.copyRows({ dst: copied, src: buffer, width: dim, count: ids.length, srcRows });
      sameValues(await gpu.read(copied), want, "copyRows over parts");
      for (const batch of [1, 3, 70]) {
        const x = fill(batch * dim, rand);
        const bias = fill(rows, rand);
        const wantOut = new Float32Array(batch * rows);
        js.linear({ out: wantOut, x, weight: values, bias, rows: batch, inDim: dim, outDim: rows });
        const product = gpu.zeros(batch * rows);
        gpu.linear({
          out: product,
          x: gpu.upload(x),
          weight: buffer,
          bias: gpu.upload(bias),
          rows: batch,
          inDim: dim,
          outDim: rows,
        });
        close(await gpu.read(product), wantOut, 1e-5, `linear over parts, ${batch} rows`);
      }
    }, { splitMatricesOver: 4096 }),
});

Deno.test({
  name: "webgpu: views of shared memory (where large weight files are read) upload unchanged",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const [vocab, dim] = [300, 64];
      const table = new Float32Array(new SharedArrayBuffer((vocab * dim + 5) * 4), 12, vocab * dim);
      table.set(fill(vocab * dim, random(7)));
      assertEquals(await gpu.read(gpu.upload(table)), table.slice());
      // As rows: split into parts of 16 KiB, each a view into the shared memory.
      const ids = Int32Array.of(0, 299, 150, 7, 64);
      const want = new Float32Array(ids.length * dim);
      js.embed({ out: want, table, ids, dim });
      const out = gpu.zeros(ids.length * dim);
      gpu.embed({ out, table: gpu.upload(table, dim), ids, dim });
      assertEquals(await gpu.read(out), want);
      const written = gpu.zeros(100);
      gpu.write(written, table.subarray(1000, 1050), 30);
      assertEquals(await gpu.read(written, 30, 50), table.slice(1000, 1050));
    }, { splitMatricesOver: 16 << 10 }),
});

Deno.test({
  name: "webgpu: the tiny-shakespeare model with every large matrix split still matches expected",
  ignore,
  fn: () => withGpu((gpu) => matchesTinyShakespeare(gpu, 1e-3), { splitMatricesOver: 64 << 10 }),
});

/** A GEMV of one row (x [1, 24], weight [10, 24], drawn from `seed`) and two zeroed outputs of it. */
function smallGemv(gpu: WebGpuBackend, seed: number) {
  const rand = random(seed);
  const [rows, inDim, outDim] = [1, 24, 10];
  const x = gpu.upload(fill(rows * inDim, rand));
  const weight = gpu.upload(fill(outDim * inDim, rand));
  return { rows, inDim, outDim, x, weight, acc: gpu.zeros(outDim), out: gpu.zeros(outDim) };
}

Deno.test({
  name: "webgpu: a captured recording replays the same work; host transfers cannot be captured",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const { rows, inDim, outDim, x, weight, acc, out } = smallGemv(gpu, 40);
      // acc += weight · x, twice: the replay sees the buffers' values at its turn.
      const recording = gpu.capture(() => {
        gpu.linear({ out, x, weight, rows, inDim, outDim });
        gpu.addInPlace({ acc, x: out, length: outDim });
        gpu.copy({ dst: out, src: acc, length: outDim });
      });
      assertEquals(recording.dispatches, 2);
      assertEquals(Array.from(await gpu.read(acc)), new Array(outDim).fill(0), "nothing ran");
      gpu.replay(recording);
      gpu.replay(recording);
      const once = new Float32Array(outDim);
      js.linear({
        out: once,
        x: await gpu.read(x),
        weight: await gpu.read(weight),
        rows,
        inDim,
        outDim,
      });
      close(await gpu.read(acc), once.map((v) => 2 * v), 1e-6, "acc after two replays");
      close(await gpu.read(out), once.map((v) => 2 * v), 1e-6, "copied acc");
      gpu.releaseRecording(recording);

      const refused = (ops: () => void, what: string) => {
        let error: Error | undefined;
        try {
          gpu.capture(ops);
        } catch (e) {
          error = e as Error;
        }
        assert(error?.message.includes("cannot be recorded"), `${what}: ${error?.message}`);
      };
      refused(() => gpu.write(acc, new Float32Array(1)), "write");
      refused(() => gpu.zeros(4), "zeros");
      refused(() => gpu.embed({ out, table: weight, ids: Int32Array.of(1), dim: inDim }), "embed");
      refused(() => gpu.addInPlace({ acc, x: acc, length: outDim }), "aliased add");
      let read: Promise<Float32Array> | undefined;
      gpu.releaseRecording(gpu.capture(() => read = gpu.read(acc)));
      await assertRejects(() => read!, Error, "cannot be recorded");
      // A failed capture leaves the backend usable.
      gpu.addInPlace({ acc, x: out, length: outDim });
      close(await gpu.read(acc), once.map((v) => 4 * v), 1e-6, "after refusals");
    }),
});

Deno.test({
  name:
    "webgpu: a read takes its floats from its staging buffer once the map is in place, before Deno's mapAsync resolves; readSubmitted waits for it",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const acc = gpu.upload(Float32Array.of(1, 2, 3, 4, 5));
      const ones = gpu.upload(new Float32Array(5).fill(1));
      const before = gpu.earlyReads;
      // Reads of one size back to back: each staging buffer is away until its
      // mapping resolves, so new ones are made, and read early from the first.
      const seen: number[][] = [];
      for (let i = 0; i < 6; i++) {
        gpu.addInPlace({ acc, x: ones, length: 5 });
        seen.push(Array.from(await gpu.read(acc, 1, 3)));
      }
      assertEquals(seen, [3, 4, 5, 6, 7, 8].map((v) => [v, v + 1, v + 2]));
      await new Promise((resolve) => setTimeout(resolve, 50)); // the mappings resolve
      assertEquals(Array.from(await gpu.read(acc)), [7, 8, 9, 10, 11]);
      assertEquals(
        Array.from(await gpu.read(acc, 1, 3)),
        [8, 9, 10],
        "a staging buffer used again",
      );
      assertEquals(Array.from(await gpu.read(acc, 5, 0)), []);
      // On this Deno every read is early (where a runtime's mapAsync did not
      // poll the device before it returns, they would wait for the promise).
      assertEquals(gpu.earlyReads - before, 9);
      // readSubmitted, the engine's read while its next round runs, waits for the promise.
      gpu.addInPlace({ acc, x: ones, length: 5 });
      gpu.flush();
      assertEquals(Array.from(await gpu.readSubmitted(acc, 0, 2)), [8, 9]);
      assertEquals(gpu.earlyReads - before, 9);
    }),
});

Deno.test({
  name:
    "webgpu: skipKernels leaves out the matching kernels, issued directly or replayed, until it is cleared",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const { rows, inDim, outDim, x, weight, acc, out } = smallGemv(gpu, 41);
      const expected = new Float32Array(outDim);
      js.linear({
        out: expected,
        x: await gpu.read(x),
        weight: await gpu.read(weight),
        rows,
        inDim,
        outDim,
      });
      const recording = gpu.capture(() => {
        gpu.linear({ out, x, weight, rows, inDim, outDim });
        gpu.addInPlace({ acc, x: out, length: outDim });
      });
      const zeros = new Array(outDim).fill(0);

      // The GEMV is left out: out stays 0, and so does what the add adds to acc.
      gpu.skipKernels(/gemv/g); // a global flag does not make the match depend on the last one
      const dispatches = gpu.dispatches;
      gpu.linear({ out, x, weight, rows, inDim, outDim });
      gpu.linear({ out, x, weight, rows, inDim, outDim });
      gpu.replay(recording);
      assertEquals(gpu.dispatches - dispatches, 1, "only the replayed add is dispatched");
      assertEquals(Array.from(await gpu.read(out)), zeros, "out, the GEMV left out");
      assertEquals(Array.from(await gpu.read(acc)), zeros, "acc plus an out of zeros");

      // Cleared: both run again, directly and replayed.
      gpu.skipKernels(null);
      gpu.replay(recording);
      close(await gpu.read(out), expected, 1e-6, "out after clearing");
      close(await gpu.read(acc), expected, 1e-6, "acc after clearing");
      gpu.releaseRecording(recording);
    }),
});

Deno.test({
  name:
    "webgpu: bench/gpu_ablate.ts reports each pattern's kernels left out, and none for a pattern that matches none",
  ignore,
  async fn() {
    const output = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "bench/gpu_ablate.ts",
        `--model=${SHARED}/models/tiny-shakespeare`,
        "--streams=2",
        "--tokens=4",
        "--reps=1",
        "--skip=gemv4",
        "--skip=no kernel is named this",
      ],
      cwd: new URL("..", import.meta.url).pathname,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(300_000),
    }).output();
    const decoder = new TextDecoder();
    assertEquals(output.code, 0, decoder.decode(output.stderr));
    const lines = decoder.decode(output.stdout).trim().split("\n").map((line) => JSON.parse(line));
    assertEquals(lines[0].streams, 2);
    const runs = lines.slice(1);
    assertEquals(runs.map((run) => run.skip), [null, "gemv4", "no kernel is named this", null]);
    assert(runs[1].skippedPerStep > 0, `gemv4 left out ${runs[1].skippedPerStep} per step`);
    assertEquals(runs[2].skippedPerStep, 0);
    assertEquals(runs[3].skippedPerStep, 0, "every kernel runs again at the end");
    for (const run of runs) assert(run.wallMs > 0 && run.tokPerS > 0, JSON.stringify(run));
  },
});

Deno.test({
  name: "webgpu: released recordings' uniform blocks are taken again, and live ones keep theirs",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const ones = gpu.upload(new Float32Array(8).fill(1));
      const acc = gpu.zeros(8);
      /** A recording of one launch: acc[0, length) += 1. */
      const add = (length: number) => gpu.capture(() => gpu.addInPlace({ acc, x: ones, length }));
      // Recordings share uniform buffers of 4,096 launches: these fill one and start another.
      const first = Array.from({ length: 5000 }, () => add(1));
      const live = first.pop()!;
      for (const recording of first) gpu.releaseRecording(recording);
      // These fill the second buffer, then take the first one's slots again.
      const later = Array.from({ length: 4000 }, (_, i) => add(2 + i % 6));
      gpu.replay(live);
      gpu.replay(later[0]);
      gpu.replay(later[3999]);
      assertEquals(Array.from(await gpu.read(acc)), [3, 2, 1, 1, 1, 0, 0, 0]);
      for (const recording of [live, ...later]) gpu.releaseRecording(recording);
    }),
});

Deno.test({
  name:
    "webgpu: rmsNorm into scratch then linearSplit: the GEMV folds the norm in; scalar GEMV, matmul and a plain buffer run it first",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(60);
      // [rows, inDim, widths, dispatches]: GEMV (one row; row groups) in one dispatch,
      // scalar GEMV (inDim % 4 != 0) and tiled matmul after the norm's own.
      const cases: [number, number, number[], number][] = [
        [1, 64, [40, 24], 1],
        [6, 48, [30, 10, 7], 1],
        [2, 37, [20, 9], 2],
        [40, 36, [50, 30], 2],
      ];
      for (const [rows, inDim, widths, dispatches] of cases) {
        const outDim = widths.reduce((a, b) => a + b, 0);
        const x = fill(rows * inDim, rand, 3);
        const w = fill(outDim * inDim, rand);
        const bias = fill(outDim, rand);
        const normWeight = fill(inDim, rand);
        const eps = 1e-5;
        const wantNormed = new Float32Array(rows * inDim);
        js.rmsNorm({ out: wantNormed, x, weight: normWeight, rows, dim: inDim, eps });
        const parts = widths.map((width) => new Float32Array(rows * width));
        js.linearSplit({ outs: parts, widths, x: wantNormed, weight: w, bias, rows, inDim });
        const gx = gpu.upload(x);
        const [weight, gpuBias, gpuNorm] = [
          gpu.upload(w),
          gpu.upload(bias),
          gpu.upload(normWeight),
        ];
        for (const normed of [gpu.scratch(rows * inDim), gpu.zeros(rows * inDim)]) {
          const outs = widths.map((width) => gpu.zeros(rows * width));
          const before = gpu.dispatches;
          gpu.rmsNorm({ out: normed, x: gx, weight: gpuNorm, rows, dim: inDim, eps });
          gpu.linearSplit({ outs, widths, x: normed, weight, bias: gpuBias, rows, inDim });
          gpu.flush();
          const what = `normed linear ${rows}×${inDim}→${widths}, ${
            normed.transient ? "scratch" : "a plain buffer"
          }`;
          const want = normed.transient ? dispatches : 2;
          assertEquals(gpu.dispatches - before, want, `${what}: dispatches`);
          for (const [i, part] of parts.entries()) {
            close(await gpu.read(outs[i]), part, 1e-4, `${what} output ${i}`);
          }
          if (!normed.transient) {
            close(await gpu.read(normed), wantNormed, 1e-5, `${what}: the norm's output`);
          }
          close(await gpu.read(gx), x, 0, "x is unchanged");
        }
      }
    }),
});

Deno.test({
  name:
    "webgpu: a decode step's scan with a quantized dt_proj folded in: q8_0, q4_0 and q4_k, ranks 32, 64 and 256",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(41);
      const dim = 130;
      const cases: [BlockType, number, number, number][] = [
        ["q8_0", 32, 16, 1],
        ["q8_0", 64, 20, 3],
        ["q4_0", 32, 16, 2],
        ["q4_0", 64, 16, 1],
        ["q4_k", 256, 16, 2],
      ];
      for (const [type, rank, dState, batch] of cases) {
        const matrix = quantizedOf(type, dim, rank, fill(dim * rank, rand, 0.3));
        await foldedDtProjMatches(
          gpu,
          rand,
          { dim, rank, dState, batch },
          dequantizeMatrix(matrix),
          gpu.uploadQuantizedMatrix(matrix),
          `step ${type} rank ${rank} N ${dState} batch ${batch}`,
        );
      }
    }),
});

Deno.test({
  name:
    "webgpu: a matmul split over K leaves its partial sums to the norm of its output (the residual) or to the conv step of one of its outputs; any other reader gets them added up, against js",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(70);
      // 40 rows of 256 k: a batch of decode steps, whose matmuls split K in two.
      const rows = 40, inDim = 256, eps = 1e-5;

      // out_proj: hidden += y · weightᵀ + bias, then the next layer's norm of hidden (wider
      // than 128, which the skinny matmul would take whole), on rows of whole vec4s or not, of
      // two vec4s per thread of the norm and of more; K of 400, 768 and 1152 splits into 4, 8
      // and 12 parts, which the norm adds up four and eight at a time.
      const y = fill(rows * inDim, rand);
      const outProjShapes = [
        [136, inDim],
        [134, inDim],
        [1100, inDim],
        [2200, inDim],
        [136, 400],
        [136, 768],
        [1100, 1152],
      ];
      for (const [dim, k] of outProjShapes) {
        const x = k === inDim ? y : fill(rows * k, rand);
        const outProj = fill(dim * k, rand, 0.1);
        const hidden = fill(rows * dim, rand);
        const normWeight = fill(dim, rand);
        for (const bias of [null, fill(dim, rand)]) {
          const wantHidden = hidden.slice();
          const product = new Float32Array(rows * dim);
          js.linear({ out: product, x, weight: outProj, bias, rows, inDim: k, outDim: dim });
          wantHidden.forEach((v, i) => wantHidden[i] = v + product[i]);
          const wantNormed = new Float32Array(rows * dim);
          js.rmsNorm({ out: wantNormed, x: wantHidden, weight: normWeight, rows, dim, eps });
          for (const normNext of [true, false]) {
            const what = `out_proj ${k} to ${dim} ${bias ? "with" : "without"} bias, ${
              normNext ? "then the norm" : "then a read"
            }`;
            const got = gpu.upload(hidden);
            const normed = gpu.scratch(rows * dim);
            const before = gpu.dispatches;
            gpu.linear({
              out: got,
              x: gpu.upload(x),
              weight: gpu.upload(outProj, k),
              bias: bias && gpu.upload(bias),
              rows,
              inDim: k,
              outDim: dim,
              accumulate: true,
            });
            if (normNext) {
              gpu.rmsNorm({ out: normed, x: got, weight: gpu.upload(normWeight), rows, dim, eps });
              gpu.flush();
              // The matmul, then the sums, the residual and the norm in one.
              assertEquals(gpu.dispatches - before, 2, `${what}: dispatches`);
              close(await gpu.read(normed), wantNormed, 1e-5, `${what}: the norm's output`);
            }
            close(await gpu.read(got), wantHidden, 1e-5, `${what}: the residual`);
          }
        }
      }

      // A plain product is held back for a scan to fold in, and run when something else comes:
      // here a read, before which its sums must be added up too (lm_head's case).
      {
        const dim = 136;
        const outProj = fill(dim * inDim, rand, 0.1);
        const product = new Float32Array(rows * dim);
        js.linear({ out: product, x: y, weight: outProj, rows, inDim, outDim: dim });
        const got = gpu.zeros(rows * dim);
        const weight = gpu.upload(outProj, inDim);
        gpu.linear({ out: got, x: gpu.upload(y), weight, rows, inDim, outDim: dim });
        close(await gpu.read(got), product, 1e-5, "a plain product, then a read");
      }

      // in_proj with a bias, then the conv step of x for sequences in slots of a pool (two
      // workgroups of channels), then x_proj: the conv adds up the sums, x_proj reads its output.
      const channels = 300, kernel = 4, widths = [8, 16, 16], poolSlots = rows + 3;
      const normed = fill(rows * inDim, rand);
      const inProj = fill(2 * channels * inDim, rand, 0.1);
      const inBias = fill(2 * channels, rand);
      const xProj = fill(40 * channels, rand, 0.1);
      const convWeight = fill(channels * kernel, rand);
      const convBias = fill(channels, rand);
      const state = fill(poolSlots * (kernel - 1) * channels, rand);
      // Sequence b in slot poolSlots - 1 - b: the pool's last rows, backwards.
      const slots = Float32Array.from({ length: rows }, (_, b) => poolSlots - 1 - b);
      const conv = { len: 1, channels, kernel, batch: rows };
      // js's conv step of `x` on the pool's slots, from `state`: its output and new state.
      const wantConv = (x: Float32Array) => {
        const wanted = { xc: new Float32Array(rows * channels), state: state.slice() };
        js.causalConv({
          ...conv,
          out: wanted.xc,
          x,
          weight: convWeight,
          bias: convBias,
          state: wanted.state,
          slots,
        });
        return wanted;
      };
      // js's Mamba-1 in_proj [x | z] of `k` inputs, then the conv step of x.
      const wantInProjConv = (x: Float32Array, weight: Float32Array, k: number) => {
        const [xOut, z] = [new Float32Array(rows * channels), new Float32Array(rows * channels)];
        js.linearSplit({
          outs: [xOut, z],
          widths: [channels, channels],
          x,
          weight,
          bias: inBias,
          rows,
          inDim: k,
        });
        return { x: xOut, z, ...wantConv(xOut) };
      };
      const want = {
        ...wantInProjConv(normed, inProj, inDim),
        outs: widths.map((width) => new Float32Array(rows * width)),
      };
      js.linearSplit({ outs: want.outs, widths, x: want.xc, weight: xProj, rows, inDim: channels });
      const got = {
        x: gpu.scratch(rows * channels),
        z: gpu.zeros(rows * channels),
        xc: gpu.zeros(rows * channels),
        state: gpu.upload(state),
        outs: widths.map((width) => gpu.zeros(rows * width)),
      };
      // Mamba-1's in_proj [x | z] of `k` inputs on the device, its matmul split over K.
      const inProjOnGpu = (
        x: GpuBuffer,
        z: GpuBuffer,
        input = normed,
        weight = inProj,
        k = inDim,
      ) =>
        gpu.linearSplit({
          outs: [x, z],
          widths: [channels, channels],
          x: gpu.upload(input),
          weight: gpu.upload(weight, k),
          bias: gpu.upload(inBias),
          rows,
          inDim: k,
        });
      // The device's conv step of `x` into `out`, on the pool's slots of `convState`.
      const convOnGpu = (x: GpuBuffer, out: GpuBuffer, convState: GpuBuffer) =>
        gpu.causalConv({
          ...conv,
          out,
          x,
          weight: gpu.upload(convWeight),
          bias: gpu.upload(convBias),
          state: convState,
          slots: gpu.upload(slots),
        });
      const before = gpu.dispatches;
      inProjOnGpu(got.x, got.z);
      convOnGpu(got.x, got.xc, got.state);
      gpu.linearSplit({
        outs: got.outs,
        widths,
        x: got.xc,
        weight: gpu.upload(xProj, channels),
        rows,
        inDim: channels,
      });
      gpu.flush();
      // The matmul, the conv step with its sums, then x_proj.
      assertEquals(gpu.dispatches - before, 3, "in_proj, conv, x_proj: dispatches");
      close(await gpu.read(got.z), want.z, 1e-5, "in_proj's z");
      close(await gpu.read(got.xc), want.xc, 1e-5, "conv out");
      close(await gpu.read(got.state), want.state, 1e-5, "conv state");
      for (let i = 0; i < widths.length; i++) {
        close(await gpu.read(got.outs[i]), want.outs[i], 1e-4, `x_proj output ${i}`);
      }

      // Mamba-2's in_proj, [z | xBC | dt] with a bias, then the conv step of xBC (its second
      // output, the widest): the conv adds up xBC's sums and stores z's and dt's.
      {
        const zWidth = 200, dtWidth = 8;
        const splits = [zWidth, channels, dtWidth];
        const total = zWidth + channels + dtWidth;
        const inProj2 = fill(total * inDim, rand, 0.1);
        const inBias2 = fill(total, rand);
        const [wantZ, wantXbc, wantDt] = splits.map((width) => new Float32Array(rows * width));
        js.linearSplit({
          outs: [wantZ, wantXbc, wantDt],
          widths: splits,
          x: normed,
          weight: inProj2,
          bias: inBias2,
          rows,
          inDim,
        });
        const want2 = { z: wantZ, dt: wantDt, ...wantConv(wantXbc) };
        const got2 = {
          z: gpu.zeros(rows * zWidth),
          xbc: gpu.scratch(rows * channels),
          dt: gpu.zeros(rows * dtWidth),
          xc: gpu.zeros(rows * channels),
          state: gpu.upload(state),
        };
        const start = gpu.dispatches;
        gpu.linearSplit({
          outs: [got2.z, got2.xbc, got2.dt],
          widths: splits,
          x: gpu.upload(normed),
          weight: gpu.upload(inProj2, inDim),
          bias: gpu.upload(inBias2),
          rows,
          inDim,
        });
        convOnGpu(got2.xbc, got2.xc, got2.state);
        gpu.flush();
        assertEquals(gpu.dispatches - start, 2, "Mamba-2's in_proj and conv: dispatches");
        close(await gpu.read(got2.z), want2.z, 1e-5, "Mamba-2's z");
        close(await gpu.read(got2.dt), want2.dt, 1e-5, "Mamba-2's dt");
        close(await gpu.read(got2.xc), want2.xc, 1e-5, "Mamba-2's conv out");
        close(await gpu.read(got2.state), want2.state, 1e-5, "Mamba-2's conv state");
      }

      // A conv of 3 taps, no bias, rows in order: the step's general loop rather than the
      // taps of 4 loaded ahead.
      {
        const conv3 = { len: 1, channels, kernel: 3, batch: rows, bias: null };
        const weight3 = fill(channels * 3, rand);
        const state3 = fill(rows * 2 * channels, rand);
        const want3 = { xc: new Float32Array(rows * channels), state: state3.slice() };
        js.causalConv({ ...conv3, out: want3.xc, x: want.x, weight: weight3, state: want3.state });
        const got3 = { x: gpu.scratch(rows * channels), xc: gpu.zeros(rows * channels) };
        const gotState3 = gpu.upload(state3);
        const start = gpu.dispatches;
        inProjOnGpu(got3.x, gpu.zeros(rows * channels));
        gpu.causalConv({
          ...conv3,
          out: got3.xc,
          x: got3.x,
          weight: gpu.upload(weight3),
          state: gotState3,
        });
        gpu.flush();
        assertEquals(gpu.dispatches - start, 2, "in_proj and a conv of 3 taps: dispatches");
        close(await gpu.read(got3.xc), want3.xc, 1e-5, "the conv of 3 taps' out");
        close(await gpu.read(gotState3), want3.state, 1e-5, "the conv of 3 taps' state");
      }

      // K of 400 and 768: in_proj splits into 4 and 8 parts, which the conv step adds up four
      // at a time.
      for (const k of [400, 768]) {
        const normedK = fill(rows * k, rand);
        const inProjK = fill(2 * channels * k, rand, 0.1);
        const wantK = wantInProjConv(normedK, inProjK, k);
        const gotK = {
          x: gpu.scratch(rows * channels),
          z: gpu.zeros(rows * channels),
          xc: gpu.zeros(rows * channels),
          state: gpu.upload(state),
        };
        const start = gpu.dispatches;
        inProjOnGpu(gotK.x, gotK.z, normedK, inProjK, k);
        convOnGpu(gotK.x, gotK.xc, gotK.state);
        gpu.flush();
        assertEquals(gpu.dispatches - start, 2, `in_proj of K ${k} and the conv: dispatches`);
        close(await gpu.read(gotK.z), wantK.z, 1e-5, `in_proj of K ${k}: z`);
        close(await gpu.read(gotK.xc), wantK.xc, 1e-5, `in_proj of K ${k}: conv out`);
        close(await gpu.read(gotK.state), wantK.state, 1e-5, `in_proj of K ${k}: conv state`);
      }
    }),
});

Deno.test({
  name:
    "webgpu: rmsNorm, linearSplit and a decode step's conv of its first output: one GEMV over scratch, or each on its own, against js",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(50);
      // [rows (sequences), inDim, widths, kernel, bias, f16 weight, dispatches]
      const cases: [number, number, number[], number, boolean, boolean, number][] = [
        [1, 48, [37, 20], 4, true, false, 1],
        [3, 48, [37, 20], 4, true, true, 1],
        [6, 32, [40], 2, false, false, 1],
        // Past the GEMV's 32 rows: the norm, the matmul, then the conv.
        [40, 32, [24, 8], 4, true, false, 3],
      ];
      for (const [rows, inDim, widths, kernel, withBias, half, dispatches] of cases) {
        const outDim = widths.reduce((a, b) => a + b, 0);
        const channels = widths[0];
        const x = fill(rows * inDim, rand);
        let w = fill(outDim * inDim, rand, 0.3);
        if (half) w = w.map((v) => f16ToF32(f32ToF16(v)));
        const bias = fill(outDim, rand);
        const convWeight = fill(channels * kernel, rand);
        const convBias = withBias ? fill(channels, rand) : null;
        const state = fill(rows * (kernel - 1) * channels, rand);
        const normWeight = fill(inDim, rand);
        const eps = 1e-5;
        const conv = { len: 1, channels, kernel, batch: rows };

        const wantNormed = new Float32Array(rows * inDim);
        js.rmsNorm({ out: wantNormed, x, weight: normWeight, rows, dim: inDim, eps });
        const wantOuts = widths.map((width) => new Float32Array(rows * width));
        js.linearSplit({ outs: wantOuts, widths, x: wantNormed, weight: w, bias, rows, inDim });
        const wantConv = new Float32Array(rows * channels);
        const wantState = state.slice();
        js.causalConv({
          ...conv,
          out: wantConv,
          x: wantOuts[0],
          weight: convWeight,
          bias: convBias,
          state: wantState,
        });

        const uploads = {
          x: gpu.upload(x),
          w: half ? gpu.uploadHalfMatrix(halfMatrixOf(w, "f16", inDim)) : gpu.upload(w, inDim),
          bias: gpu.upload(bias),
          norm: gpu.upload(normWeight),
          conv: gpu.upload(convWeight),
          convBias: convBias && gpu.upload(convBias),
        };
        // The norm's output and in_proj's first output as scratch (the model's), then plain.
        for (const scratch of [true, false]) {
          const buffer = (length: number) => scratch ? gpu.scratch(length) : gpu.zeros(length);
          const outs = widths.map((width, i) =>
            i === 0 ? buffer(rows * width) : gpu.zeros(rows * width)
          );
          const normed = buffer(rows * inDim);
          const out = gpu.zeros(rows * channels);
          const gotState = gpu.upload(state.slice());
          const before = gpu.dispatches;
          gpu.rmsNorm({ out: normed, x: uploads.x, weight: uploads.norm, rows, dim: inDim, eps });
          gpu.linearSplit({
            outs,
            widths,
            x: normed,
            weight: uploads.w,
            bias: uploads.bias,
            rows,
            inDim,
          });
          gpu.causalConv({
            ...conv,
            out,
            x: outs[0],
            weight: uploads.conv,
            bias: uploads.convBias,
            state: gotState,
          });
          gpu.flush();
          const what = `conv step after ${rows}×${inDim}→${widths}, kernel ${kernel}, ${
            scratch ? "scratch" : "plain buffers"
          }`;
          assertEquals(gpu.dispatches - before, scratch ? dispatches : 3, `${what}: dispatches`);
          close(await gpu.read(out), wantConv, 1e-4, `${what}: conv out`);
          close(await gpu.read(gotState), wantState, 1e-6, `${what}: conv state`);
          for (let i = scratch ? 1 : 0; i < widths.length; i++) {
            close(await gpu.read(outs[i]), wantOuts[i], 1e-4, `${what}: output ${i}`);
          }
          if (!scratch) {
            close(await gpu.read(normed), wantNormed, 1e-5, `${what}: the norm's output`);
          }
        }
      }
    }),
});

Deno.test({
  name:
    "webgpu: in_proj's GEMV with x_proj folded in: the decode step's scan adds up its shares, other readers get them added first, against js",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const rand = random(60);
      const inDim = 64;
      const kernel = 4;
      // [rows, channels, rank, N, weights' format]: 8, 4 and 32 conv outputs per workgroup
      // (32, 64 and 8 GEMV lanes), one and two groups of 16 states. A block format holds the
      // matrices whose rows are whole blocks, as a GGUF file does (Q4_K: x_proj alone), the
      // others stay f32.
      const cases: [number, number, number, number, WeightFormat][] = [
        [1, 520, 48, 16, "f32"],
        [3, 512, 5, 20, "f16"],
        [3, 512, 5, 20, "bf16"],
        [4, 264, 23, 16, "f32"],
        [2, 264, 23, 7, "f32"], // N not a multiple of 4: the step loads states one by one
        [1, 4096, 16, 16, "f16"],
        [1, 4096, 16, 16, "bf16"],
        [1, 512, 32, 16, "q8_0"],
        [3, 512, 32, 20, "q4_0"],
        [2, 512, 16, 16, "q4_k"],
        [1, 4096, 16, 16, "q8_0"],
      ];
      for (const [rows, channels, rank, dState, format] of cases) {
        const widths = [rank, dState, dState];
        const projWidth = rank + 2 * dState;
        // A matrix [·, rowLength] of `v` as `format` keeps it: its values, and its upload.
        const kept = (v: Float32Array, rowLength: number) => {
          if (format === "f32" || format === "f16" || format === "bf16") {
            const values = exactIn(v, format === "f32" ? null : format);
            const upload = () =>
              format === "f32"
                ? gpu.upload(values, rowLength)
                : gpu.uploadHalfMatrix(halfMatrixOf(values, format, rowLength));
            return { values, upload };
          }
          if (rowLength % BLOCK_ELEMENTS[format] !== 0) {
            return {
              values: v,
              upload: () => gpu.upload(v),
            };
          }
          const blocks = quantizedOf(format, v.length / rowLength, rowLength, v);
          return {
            values: dequantizeMatrix(blocks),
            upload: () => gpu.uploadQuantizedMatrix(blocks),
          };
        };
        const x = fill(rows * inDim, rand);
        const inProjKept = kept(fill(2 * channels * inDim, rand, 0.3), inDim);
        const xProjKept = kept(fill(projWidth * channels, rand, 0.1), channels);
        const dtProjKept = kept(fill(channels * rank, rand, 0.3), rank);
        const [inProj, xProj, dtProj] = [inProjKept, xProjKept, dtProjKept].map((m) => m.values);
        const convWeight = fill(channels * kernel, rand);
        const convBias = fill(channels, rand);
        const convState = fill(rows * (kernel - 1) * channels, rand);
        const normWeight = fill(inDim, rand);
        const A = fill(channels * dState, rand).map((v) => -1 - 4 * Math.abs(v));
        const D = fill(channels, rand);
        const deltaBias = fill(channels, rand);
        const ssm = fill(rows * channels * dState, rand);

        // The reference: in_proj with the conv step, x_proj after it, then the scan.
        const want = {
          x: new Float32Array(rows * channels),
          z: new Float32Array(rows * channels),
          xc: new Float32Array(rows * channels),
          outs: widths.map((width) => new Float32Array(rows * width)),
          conv: convState.slice(),
          y: new Float32Array(rows * channels),
          ssm: ssm.slice(),
        };
        const wantNormed = new Float32Array(rows * inDim);
        js.rmsNorm({ out: wantNormed, x, weight: normWeight, rows, dim: inDim, eps: 1e-5 });
        js.linearSplit({
          outs: [want.x, want.z],
          widths: [channels, channels],
          x: wantNormed,
          weight: inProj,
          rows,
          inDim,
        });
        const conv = { len: 1, channels, kernel, batch: rows };
        js.causalConv({
          ...conv,
          out: want.xc,
          x: want.x,
          weight: convWeight,
          bias: convBias,
          state: want.conv,
        });
        js.linearSplit({
          outs: want.outs,
          widths,
          x: want.xc,
          weight: xProj,
          rows,
          inDim: channels,
        });
        const plain = { deltaSoftplus: true, len: 1, dim: channels, dState, batch: rows };
        const wantDelta = new Float32Array(rows * channels);
        js.linear({
          out: wantDelta,
          x: want.outs[0],
          weight: dtProj,
          rows,
          inDim: rank,
          outDim: channels,
        });
        js.selectiveScan({
          ...plain,
          y: want.y,
          u: want.xc,
          delta: wantDelta,
          A,
          B: want.outs[1],
          C: want.outs[2],
          D,
          z: want.z,
          deltaBias,
          state: want.ssm,
        });

        const weights = {
          inProj: inProjKept.upload(),
          xProj: xProjKept.upload(),
          dtProj: dtProjKept.upload(),
          norm: gpu.upload(normWeight),
          conv: gpu.upload(convWeight),
          convBias: gpu.upload(convBias),
        };
        const what = `${rows} rows, ${channels} channels, rank ${rank}, N ${dState}, ${format}`;
        // The norm, in_proj, the conv step and x_proj, then `reader` with what they wrote.
        const inProjStep = (
          reader: (got: {
            normed: GpuBuffer;
            x: GpuBuffer;
            z: GpuBuffer;
            xc: GpuBuffer;
            outs: GpuBuffer[];
            conv: GpuBuffer;
          }) => Promise<void>,
        ) => {
          // What only the next operation reads is scratch, as the model's is.
          const got = {
            normed: gpu.scratch(rows * inDim),
            x: gpu.scratch(rows * channels),
            z: gpu.zeros(rows * channels),
            xc: gpu.zeros(rows * channels),
            outs: widths.map((width) => gpu.scratch(rows * width)),
            conv: gpu.upload(convState.slice()),
          };
          const input = gpu.upload(x);
          const before = gpu.dispatches;
          gpu.rmsNorm({
            out: got.normed,
            x: input,
            weight: weights.norm,
            rows,
            dim: inDim,
            eps: 1e-5,
          });
          gpu.linearSplit({
            outs: [got.x, got.z],
            widths: [channels, channels],
            x: got.normed,
            weight: weights.inProj,
            rows,
            inDim,
          });
          gpu.causalConv({
            ...conv,
            out: got.xc,
            x: got.x,
            weight: weights.conv,
            bias: weights.convBias,
            state: got.conv,
          });
          gpu.linearSplit({
            outs: got.outs,
            widths,
            x: got.xc,
            weight: weights.xProj,
            rows,
            inDim: channels,
          });
          assertEquals(gpu.dispatches - before, 1, `${what}: one GEMV for the four`);
          return reader(got);
        };

        // The decode step's scan takes the shares as they are, and dt_proj.
        await inProjStep(async (got) => {
          const y = gpu.zeros(rows * channels);
          const state = gpu.upload(ssm.slice());
          const delta = gpu.scratch(rows * channels);
          const before = gpu.dispatches;
          gpu.linear({
            out: delta,
            x: got.outs[0],
            weight: weights.dtProj,
            rows,
            inDim: rank,
            outDim: channels,
          });
          gpu.selectiveScan({
            ...plain,
            y,
            u: got.xc,
            delta,
            A: gpu.upload(A),
            B: got.outs[1],
            C: got.outs[2],
            D: gpu.upload(D),
            z: got.z,
            deltaBias: gpu.upload(deltaBias),
            state,
          });
          assertEquals(
            gpu.dispatches - before,
            Math.ceil(dState / 16),
            `${what}: one scan dispatch per group, no other`,
          );
          close(await gpu.read(got.xc), want.xc, 1e-4, `${what}: conv out`);
          close(await gpu.read(got.conv), want.conv, 1e-6, `${what}: conv state`);
          close(await gpu.read(y), want.y, 1e-4, `${what}: y`);
          close(await gpu.read(state), want.ssm, 1e-4, `${what}: state`);
          close(await gpu.read(got.z), want.z, 1e-4, `${what}: in_proj's z`);
        });

        // Anything else reads dt, B and C with the shares added up.
        await inProjStep(async (got) => {
          for (let i = 0; i < widths.length; i++) {
            close(await gpu.read(got.outs[i]), want.outs[i], 1e-4, `${what}: x_proj output ${i}`);
          }
        });
      }
    }),
});

Deno.test({
  name:
    "webgpu: profile times every kernel, replayed ones too, and still computes; without it kernelTimes refuses",
  ignore,
  fn: async () => {
    await withGpu(async (gpu) => {
      const rand = random(7);
      const [rows, inDim, outDim] = [3, 64, 40];
      const x = fill(rows * inDim, rand);
      const w = fill(outDim * inDim, rand);
      const out = gpu.zeros(rows * outDim);
      const xb = gpu.upload(x);
      const wb = gpu.upload(w);
      gpu.linear({ out, x: xb, weight: wb, rows, inDim, outDim });
      const ones = gpu.upload(new Float32Array(outDim).fill(1));
      const normed = gpu.zeros(rows * outDim);
      const recording = gpu.capture(() =>
        gpu.rmsNorm({ out: normed, x: out, weight: ones, rows, dim: outDim, eps: 1e-5 })
      );
      gpu.replay(recording);
      gpu.replay(recording);
      const got = await gpu.read(normed);
      const times = await gpu.kernelTimes();
      const calls = [...times.values()].reduce((sum, t) => sum + t.calls, 0);
      assertEquals(calls, gpu.dispatches, "one timing per dispatch");
      const norms = [...times].filter(([kernel]) => kernel.startsWith("rmsnorm"));
      assertEquals(norms.map(([, t]) => t.calls), [2], "the replayed norm, twice");
      for (const [kernel, t] of times) assert(t.ns >= 0 && Number.isFinite(t.ns), kernel);
      assertEquals((await gpu.kernelTimes()).size, 0, "times are taken once");
      // linear, then the norm, on the host.
      const want = new Float32Array(rows * outDim);
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < outDim; c++) {
          let sum = 0;
          for (let k = 0; k < inDim; k++) sum += x[r * inDim + k] * w[c * inDim + k];
          want[r * outDim + c] = sum;
        }
        const row = want.subarray(r * outDim, (r + 1) * outDim);
        const rms = Math.sqrt(row.reduce((s, v) => s + v * v, 0) / outDim + 1e-5);
        row.forEach((v, i) => row[i] = v / rms);
      }
      close(got, want, 1e-4, "the work itself");
      gpu.releaseRecording(recording);
    }, { profile: true });
    await withGpu(async (gpu) => {
      await assertRejects(() => gpu.kernelTimes(), Error, "profile: true");
    });
  },
});

Deno.test({
  name:
    "webgpu: a decode step's SSD step, gated RMSNorm of one group and GEMV (Mamba-2's out_proj) in two dispatches where y and the norm are scratch; otherwise as issued",
  ignore,
  fn: () =>
    withGpu(async (gpu) => {
      const js = new JsBackend();
      const rand = random(11);
      const [heads, headDim, dState, outDim] = [4, 16, 8, 50];
      const dim = heads * headDim;
      for (const [rows, groups] of [[1, 1], [3, 1], [16, 1], [40, 1], [1, 2]]) {
        const what = `${rows} rows, ${groups} groups`;
        const width = dim + 2 * groups * dState;
        const host = {
          xBC: fill(rows * width, rand),
          dt: fill(rows * heads, rand),
          dtBias: fill(heads, rand),
          A: fill(heads, rand).map((v) => -1 - Math.abs(v)),
          D: fill(heads, rand),
          state: fill(rows * dim * dState, rand),
        };
        const dtLimit: [number, number] = [0, Infinity];
        const sizes = {
          dtLimit,
          len: 1,
          batch: rows,
          heads,
          headDim,
          groups,
          dState,
          chunkSize: 256,
        };
        const gate = fill(rows * dim, rand, 2);
        const weight = fill(dim, rand);
        const w = fill(outDim * dim, rand, 0.2);
        const hidden = fill(rows * outDim, rand);
        const norm = { rows, dim, groupSize: dim / groups, eps: 1e-5 };

        const y = new Float32Array(rows * dim);
        js.ssdScan({ ...sizes, ...host, state: host.state.slice(), y });
        const wantNormed = new Float32Array(rows * dim);
        js.gatedRmsNorm({ ...norm, out: wantNormed, x: y, gate, weight });
        const want = hidden.slice();
        js.linear({
          out: want,
          x: wantNormed,
          weight: w,
          rows,
          inDim: dim,
          outDim,
          accumulate: true,
        });

        const wb = gpu.upload(w);
        const [gateBuf, weightBuf] = [gpu.upload(gate), gpu.upload(weight)];
        for (const scratch of [true, false]) {
          const where = `${what}, ${scratch ? "scratch" : "plain buffers"}`;
          const args = {
            ...sizes,
            xBC: gpu.upload(host.xBC),
            dt: gpu.upload(host.dt),
            dtBias: gpu.upload(host.dtBias),
            A: gpu.upload(host.A),
            D: gpu.upload(host.D),
            state: gpu.upload(host.state),
            y: scratch ? gpu.scratch(rows * dim) : gpu.zeros(rows * dim),
          };
          const out = scratch ? gpu.scratch(rows * dim) : gpu.zeros(rows * dim);
          const normArgs = { ...norm, out, x: args.y, gate: gateBuf, weight: weightBuf };
          const got = gpu.upload(hidden);
          const before = gpu.dispatches;
          gpu.ssdScan(args);
          gpu.gatedRmsNorm(normArgs);
          gpu.linear({ out: got, x: out, weight: wb, rows, inDim: dim, outDim, accumulate: true });
          await gpu.sync();
          const folds = scratch && groups === 1 && rows <= 32;
          assertEquals(gpu.dispatches - before, folds ? 2 : 3, `${where}: dispatches`);
          close(await gpu.read(got), want, 1e-4, `${where}: out_proj`);
          if (!scratch) {
            close(await gpu.read(args.y), y, 1e-5, `${where}: y`);
            close(await gpu.read(out), wantNormed, 1e-5, `${where}: the norm`);
          }

          // Any other reader gets the step and the norm run first.
          gpu.ssdScan({ ...args, state: gpu.upload(host.state) });
          gpu.gatedRmsNorm(normArgs);
          close(await gpu.read(out), wantNormed, 1e-5, `${where}: the norm read back`);
          gpu.ssdScan({ ...args, state: gpu.upload(host.state) });
          close(await gpu.read(args.y), y, 1e-5, `${where}: a step read back`);
        }
      }
    }),
});

Deno.test("webgpu: pooled buffers from a MiB take their size class, at most a quarter more, within the limit", () => {
  const MiB = 2 ** 20;
  assertEquals(pooledBytes(1000, Infinity), 1000, "exact below a MiB");
  assertEquals(pooledBytes(MiB, Infinity), MiB);
  assertEquals(pooledBytes(MiB + 16, Infinity), 1.25 * MiB);
  assertEquals(pooledBytes(5 * MiB + 16, Infinity), 6 * MiB);
  assertEquals(pooledBytes(5 * MiB + 16, 5.5 * MiB), 5.5 * MiB, "the class is cut at the limit");
  assertEquals(pooledBytes(6 * MiB, 5 * MiB), 6 * MiB, "never less than asked");
  for (let bytes = MiB; bytes < 64 * MiB; bytes = Math.ceil(bytes * 1.07 / 16) * 16) {
    const pooled = pooledBytes(bytes, Infinity);
    assert(pooled >= bytes && pooled <= 1.25 * bytes, `${bytes} bytes took ${pooled}`);
  }
});

Deno.test({
  name: "webgpu: buffers of nearby sizes from a MiB share one pooled buffer",
  ignore,
  fn: async () => {
    const device = await adapter!.requestDevice();
    try {
      const pool = new BufferPool(device, Infinity);
      // Activations of prompts of 200 to 211 rows: one class, one buffer.
      for (let rows = 200; rows < 212; rows++) {
        const buffer = pool.acquire(rows * 1536 * 4, false);
        assert(buffer.size >= rows * 1536 * 4);
        pool.release(buffer);
        pool.submitted();
      }
      assertEquals(pool.created, 1);
      // Below a MiB sizes stay exact: each its own buffer.
      for (const bytes of [1000, 1008]) pool.release(pool.acquire(bytes, false));
      assertEquals(pool.created, 3);
    } finally {
      device.destroy();
    }
  },
});
