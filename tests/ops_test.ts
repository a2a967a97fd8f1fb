/**
 * The backends' operations against reference arithmetic, one table over
 * every backend (after llama.cpp's test-backend-ops):
 *
 * - the decode engine's operations: `copyRows` against plain indexing,
 *   `chooseTokens` against `pickToken` (the sampler's own code, fed the same
 *   random numbers and history), and conv and scan on slots of a state pool
 *   against the reference backend run sequence by sequence without slots;
 * - the kernel table (`KERNEL_CASES` × `KERNEL_CONFIGS`): linear over f32,
 *   f16, bf16 and Q8_0/Q4_0/Q4_K weights, linearSplit and accumulation, the
 *   gathers from every format, causalConv (steps, batches), selectiveScan
 *   across chunk ends, rmsNorm, addInPlace, embed and copy, on odd sizes at
 *   every kernel's edges, on wasm (1 to 3 threads, both SIMD builds, both dot
 *   products) and webgpu (default, short scan chunks, matrices split over
 *   buffers), each against the js backend.
 *
 * WebGPU runs where an adapter exists (llvmpipe in CI). Mamba-2's operations
 * are in `ssd_test.ts`; what one backend alone does (which build runs where,
 * fusions, recordings, how blocks are held) in `wasm_kernels_test.ts` and
 * `webgpu_kernels_test.ts`.
 */

import { assert, assertEquals, assertRejects } from "@std/assert";
import {
  type Backend,
  SAMPLING_SETTINGS,
  samplingFeatures,
  samplingSettings,
} from "../src/backend.ts";
import { JsBackend } from "../src/backends/js.ts";
import { WasmBackend } from "../src/backends/wasm.ts";
import { WebGpuBackend, type WebGpuOptions } from "../src/backends/webgpu/mod.ts";
import { BLOCK_ELEMENTS, dequantizeMatrix, type HalfFormat } from "../src/quant.ts";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "../src/safetensors.ts";
import { pickToken, type SamplingOptions, validateSamplingOptions } from "../src/sampler.ts";
import { xorshiftUniforms } from "../bench/make_random_model.ts";
import { halfMatrixOf, maxAbsDiff, quantizedOf, scaledError } from "./helpers.ts";

const adapter = await navigator.gpu?.requestAdapter();

/** Each backend under test, made fresh per test. */
const BACKENDS: { name: string; create: () => Promise<Backend>; ignore?: boolean }[] = [
  { name: "js", create: () => Promise.resolve(new JsBackend()) },
  { name: "wasm", create: () => WasmBackend.create({ threads: 1 }) as Promise<Backend> },
  {
    name: "webgpu",
    // Matrices over 1 KiB are split by rows, so that copyRows reads over parts.
    create: () => WebGpuBackend.create({ splitMatricesOver: 1024 }) as Promise<Backend>,
    ignore: !adapter,
  },
];

/** Deterministic values in [-scale, scale), so failures reproduce. */
function filler(seed: number): (n: number, scale?: number) => Float32Array {
  const next = xorshiftUniforms(seed);
  return (n, scale = 1) => next(n, -scale, scale);
}

function opTest<Buf>(name: string, fn: (be: Backend<Buf>) => Promise<void>): void {
  for (const backend of BACKENDS) {
    Deno.test({
      name: `[${backend.name}] ${name}`,
      ignore: backend.ignore,
      fn: async () => {
        const be = await backend.create() as Backend<Buf>;
        try {
          await fn(be);
        } finally {
          be.dispose();
        }
      },
    });
  }
}

opTest(
  "readSubmitted reads what submitted work left; work issued since runs at the next flush",
  async (be) => {
    const [acc, ones] = [be.zeros(6), be.zeros(6)];
    be.write(acc, Float32Array.of(1, 2, 3, 4, 5, 6));
    be.write(ones, new Float32Array(6).fill(1));
    be.flush();
    be.addInPlace({ acc, x: ones, length: 6 });
    // A device queue still holds the add, unsubmitted; the host backends have run it.
    const expected = be.queued ? [1, 2, 3, 4, 5, 6] : [2, 3, 4, 5, 6, 7];
    assertEquals([...await be.readSubmitted(acc, 1, 4)], expected.slice(1, 5));
    be.flush();
    assertEquals([...await be.read(acc)], [2, 3, 4, 5, 6, 7]);
    assertEquals([...await be.readSubmitted(acc, 6, 0)], []);
    await assertRejects(() => be.readSubmitted(acc, 4, 3), RangeError);
  },
);

opTest(
  "copyRows gathers and scatters by index, with offsets; bad rows copy nothing",
  async (be) => {
    const fill = filler(1);
    const [rows, width] = [37, 24];
    const table = fill(rows * width);
    const src = be.upload(table, width); // split into parts on webgpu
    // A gather from the table (over its parts), with ids that copy nothing: -1, past the end, 2.5.
    const ids = [0, 36, 9, -1, 10, 19, 37, 20, 2.5, 35];
    const index = be.upload(Float32Array.from([7, 7, ...ids]));
    const out = be.upload(new Float32Array((ids.length + 1) * width).fill(-7));
    be.copyRows({
      dst: out,
      dstOffset: width,
      src,
      width,
      count: ids.length,
      srcRows: { buf: index, offset: 2 },
    });
    const want = new Float32Array((ids.length + 1) * width).fill(-7);
    ids.forEach((id, r) => {
      if (Number.isInteger(id) && id >= 0 && id < rows) {
        want.set(table.subarray(id * width, (id + 1) * width), (r + 1) * width);
      }
    });
    assertEquals(await be.read(out), want);

    // A scatter of rows 2.. of a small buffer into rows named by an index, one float wide.
    const values = Float32Array.of(0, 0, 10, 11, 12, 13);
    const dst = be.upload(new Float32Array(8).fill(-1));
    const slots = be.upload(Float32Array.of(5, 0, 8, 3));
    be.copyRows({
      dst,
      src: be.upload(values),
      srcOffset: 2,
      width: 1,
      count: 4,
      dstRows: { buf: slots, offset: 0 },
    });
    assertEquals(await be.read(dst), Float32Array.of(11, -1, -1, 13, -1, 10, -1, -1));
  },
);

/** One row of a chooseTokens case: options, the sequence's ids so far, its limit. */
interface ChooseRow {
  options: SamplingOptions;
  history: number[];
  limit: number;
}

/** The relative nudge under which a row's pick must hold: the device's f32 arithmetic errs by less. */
const NUDGE = 1e-6;

/**
 * A random number for a row whose pick pickToken keeps with it, topP and
 * minP each nudged by NUDGE either way: `u`, or else the first such one of
 * u + 0.382, u + 0.764, … (mod 1). A draw or cut so close to the boundary
 * between two ids that f32 arithmetic may cross it is no test.
 */
function steadyRandom(
  logits: Float32Array,
  row: ChooseRow,
  options: Required<SamplingOptions>,
  u: number,
): number {
  const pick = (o: Required<SamplingOptions>, x: number) =>
    pickToken(logits, row.history, row.limit, o, () => x);
  const { topP, minP } = options;
  for (let tries = 0; tries < 20; tries++) {
    const x = Math.fround(u);
    const id = pick(options, x);
    // A top-p of 1 is off (and walks in id order): it stays 1, and one below stays below.
    const steady = [1 - NUDGE, 1 + NUDGE].every((scale) =>
      pick(options, Math.min(x * scale, 1 - 2 ** -24)) === id &&
      pick({ ...options, topP: topP < 1 ? Math.min(topP * scale, (1 + topP) / 2) : 1 }, x) === id &&
      pick({ ...options, minP: Math.min(minP * scale, 1) }, x) === id
    );
    if (steady) return x;
    u = (u + 0.382) % 1;
  }
  throw new Error(`No random number picks steadily for ${JSON.stringify(row.options)}`);
}

/** `n` random numbers spread over [0, 1): steps of the golden ratio. */
function spreadRandoms(n: number): Float32Array {
  return Float32Array.from({ length: n }, (_, r) => ((r + 1) * 0.6180339887) % 1);
}

/**
 * Runs chooseTokens over `rows` of `logits` [rows, vocab] and checks each
 * pick against pickToken's with the same random number, and the history ring
 * after it; returns the picks. Row r draws with steadyRandom from
 * randoms[r].
 */
async function chooseAsPickToken<Buf>(
  be: Backend<Buf>,
  vocab: number,
  rows: ChooseRow[],
  logits: Float32Array,
  randoms: Float32Array,
): Promise<number[]> {
  const options = rows.map((row) => validateSamplingOptions({ ...row.options, seed: 0 }));
  const rowLogits = (r: number) => logits.subarray(r * vocab, (r + 1) * vocab);
  const steady = Float32Array.from(
    rows,
    (row, r) =>
      options[r].temperature > 0
        ? steadyRandom(rowLogits(r), row, options[r], randoms[r])
        : randoms[r],
  );

  // The ring: row r's sequence in slot slotOf[r], its id at position p at p %
  // historyLength (the last historyLength of them). The call picks at step 2
  // after the position its settings name: right after the history.
  const historyLength = 16;
  const slotOf = rows.map((_, r) => (r * 4) % rows.length);
  const step = 2;
  const ring = new Float32Array(rows.length * historyLength).fill(-5);
  const settings = new Float32Array(rows.length * SAMPLING_SETTINGS);
  rows.forEach((row, r) => {
    row.history.forEach((id, p) => {
      if (p >= row.history.length - historyLength) {
        ring[slotOf[r] * historyLength + p % historyLength] = id;
      }
    });
    const position = row.history.length - step;
    settings.set(samplingSettings(options[r], position, row.limit), r * SAMPLING_SETTINGS);
  });
  const want = rows.map((row, r) =>
    pickToken(rowLogits(r), row.history, row.limit, options[r], () => steady[r])
  );
  const ids = be.upload(new Float32Array(2 + rows.length));
  const history = be.upload(ring.slice());
  be.chooseTokens({
    logits: be.upload(logits.slice()),
    rows: rows.length,
    vocab,
    settings: be.upload(settings),
    features: samplingFeatures(rows.map((row, r) => ({ ...options[r], limit: row.limit }))),
    randoms: be.upload(Float32Array.from([0, ...steady])),
    randomOffset: 1,
    history,
    historyLength,
    slots: be.upload(Float32Array.from(slotOf)),
    step,
    ids,
    idsOffset: 2,
  });
  assertEquals(Array.from((await be.read(ids)).subarray(2)), want);
  // Each pick lands in its sequence's ring at its position; nothing else changes.
  const wantRing = ring.slice();
  rows.forEach((row, r) => {
    if (want[r] >= 0) {
      wantRing[slotOf[r] * historyLength + row.history.length % historyLength] = want[r];
    }
  });
  assertEquals(await be.read(history), wantRing);
  return want;
}

opTest("chooseTokens picks what pickToken picks, each row with its own options", async (be) => {
  const fill = filler(2);
  const vocab = 3000; // three slices of webgpu's first sampling stage
  const rows: ChooseRow[] = [
    // Greedy: a tie (the lower id wins), NaN, a larger logit past the limit.
    { options: { temperature: 0 }, history: [], limit: 2997 },
    // Greedy where no logit can be picked.
    { options: { temperature: 0 }, history: [1, 2], limit: vocab },
    { options: { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05 }, history: [], limit: vocab },
    { options: { temperature: 1, topK: 1, topP: 1, minP: 0 }, history: [3], limit: vocab },
    { options: { temperature: 1.5, topK: 64, topP: 1, minP: 0 }, history: [], limit: 2500 },
    { options: { temperature: 0.3, topK: 5, topP: 0.5, minP: 0.2 }, history: [], limit: vocab },
    // Repetition penalties: a window with repeats, the whole history, on a greedy row.
    {
      options: { temperature: 1, topK: 20, topP: 1, minP: 0.1, repetitionPenalty: 1.3 },
      history: [5, 9, 5, 40, 9, 77, 77, 300],
      limit: vocab,
    },
    {
      options: { temperature: 0, repetitionPenalty: 0.7, repeatLastN: -1 },
      history: [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 1500, 1501],
      limit: vocab,
    },
    // A history longer than the ring, which keeps its last ids, wrapped around.
    {
      options: { temperature: 0.9, topK: 40, repetitionPenalty: 1.5, repeatLastN: 3 },
      history: Array.from({ length: 20 }, (_, i) => 100 + i),
      limit: vocab,
    },
    // A limit of at most 64 ids, which top-k does not cut: the draw walks in id order.
    { options: { temperature: 1, topK: 0, topP: 1, minP: 0.3 }, history: [], limit: 50 },
    { options: { temperature: 0.7, topK: 40, topP: 1, minP: 0 }, history: [], limit: 30 },
  ];
  const logits = fill(rows.length * vocab, 4);
  const at = (r: number, id: number) => r * vocab + id;
  logits[at(0, 1234)] = 7;
  logits[at(0, 2321)] = 7;
  logits[at(0, 100)] = NaN;
  logits[at(0, 2998)] = 9;
  logits.fill(-Infinity, at(1, 0), at(2, 0));
  logits[at(1, 1)] = NaN;
  // Ten equal logits across a slice boundary: top-k may cut through them.
  logits.fill(5, at(2, 1020), at(2, 1030));
  // The penalized ids hold the largest logits, so that the penalty decides.
  for (const [r, row] of rows.entries()) {
    if ((row.options.repetitionPenalty ?? 1) === 1) continue;
    for (const id of row.history) logits[at(r, id)] = 5 + fill(1)[0];
  }
  logits[at(6, 2000)] = 4.9;
  logits[at(7, 2000)] = -4.9;
  // A -Infinity and a NaN among the few ids of a short row.
  logits[at(9, 3)] = -Infinity;
  logits[at(9, 7)] = NaN;
  const randoms = xorshiftUniforms(3)(rows.length, 0, 1);

  const want = await chooseAsPickToken(be, vocab, rows, logits, randoms);
  assertEquals(want[1], -1, "no candidate");
  assertEquals(want[0], 1234, "the lower id of a tie");
});

opTest(
  "chooseTokens samples the whole vocabulary and top-k above 64 as pickToken does",
  async (be) => {
    const fill = filler(5);
    const vocab = 3000;
    const rows: ChooseRow[] = [
      // No top-k: the draw walks the whole row in id order, with and without min-p.
      { options: { temperature: 1, topK: 0, topP: 1, minP: 0 }, history: [], limit: vocab },
      { options: { temperature: 1.3, topK: 0, topP: 1, minP: 0.2 }, history: [], limit: vocab },
      // No top-k with top-p: sorted order over the whole row.
      { options: { temperature: 0.7, topK: 0, topP: 0.9, minP: 0 }, history: [], limit: vocab },
      // Top-k above 64, with and without top-p and min-p.
      { options: { temperature: 1.2, topK: 100, topP: 1, minP: 0 }, history: [], limit: vocab },
      {
        options: { temperature: 0.8, topK: 1000, topP: 0.95, minP: 0.05 },
        history: [],
        limit: vocab,
      },
      // A top-k not below the limit cuts nothing: id order again, over a limit below vocab.
      { options: { temperature: 1, topK: 5000, topP: 1, minP: 0 }, history: [], limit: 2500 },
      // Mixed in: a greedy row and one with a top-k within 64.
      { options: { temperature: 0 }, history: [], limit: vocab },
      {
        options: { temperature: 0.9, topK: 40, topP: 0.95, minP: 0.05 },
        history: [],
        limit: vocab,
      },
      // A repetition penalty on the largest logits decides a top-p.
      {
        options: { temperature: 1, topK: 0, topP: 0.8, minP: 0, repetitionPenalty: 1.5 },
        history: [10, 2500, 10, 1999, 7],
        limit: vocab,
      },
      // Ties: 300 equal top logits across slices, cut by top-k, then by top-p.
      { options: { temperature: 1, topK: 150, topP: 1, minP: 0 }, history: [], limit: vocab },
      { options: { temperature: 1, topK: 0, topP: 0.5, minP: 0 }, history: [], limit: vocab },
      // Mostly -Infinity and NaN; then all of them (no candidate).
      { options: { temperature: 0.6, topK: 0, topP: 0.95, minP: 0.01 }, history: [], limit: vocab },
      { options: { temperature: 1, topK: 0, topP: 1, minP: 0 }, history: [], limit: vocab },
      // +Infinity: the infinite logits share all the weight.
      { options: { temperature: 1, topK: 0, topP: 1, minP: 0 }, history: [], limit: vocab },
      // A low temperature: most weights underflow.
      { options: { temperature: 0.05, topK: 500, topP: 0.99, minP: 0 }, history: [], limit: vocab },
    ];
    const logits = fill(rows.length * vocab, 8);
    const at = (r: number, id: number) => r * vocab + id;
    // Larger logits past the limit are never picked.
    logits.fill(20, at(5, 2500), at(6, 0));
    for (const id of rows[8].history) logits[at(8, id)] = 9 + fill(1)[0];
    for (const r of [9, 10]) {
      for (let id = 500; id < 3000; id += 8) logits[at(r, id)] = 8.5;
    }
    logits.fill(-Infinity, at(11, 0), at(11, 2900));
    for (let id = 1; id < 2900; id += 3) logits[at(11, id)] = NaN;
    logits[at(11, 2000)] = 1;
    logits.fill(-Infinity, at(12, 0), at(13, 0));
    for (let id = 0; id < vocab; id += 2) logits[at(12, id)] = NaN;
    logits[at(13, 700)] = Infinity;
    logits[at(13, 2200)] = Infinity;
    const randoms = spreadRandoms(rows.length);

    const want = await chooseAsPickToken(be, vocab, rows, logits, randoms);
    assertEquals(want[12], -1, "no candidate");
    assert([700, 2200].includes(want[13]), "an infinite logit");
    assert(want[5] < 2500, "below the limit");
  },
);

opTest("chooseTokens samples rows of 200, 50,280 and 70,000 ids as pickToken does", async (be) => {
  // Ids of one, two and three bytes: the wide search's rounds over the id.
  const cases: [number, SamplingOptions[]][] = [
    [200, [
      { temperature: 1, topK: 0, topP: 1, minP: 0 },
      { temperature: 0.9, topK: 100, topP: 0.9, minP: 0 },
      { temperature: 1.1, topK: 0, topP: 0.7, minP: 0.1 },
    ]],
    [50280, [
      { temperature: 0.8, topK: 0, topP: 1, minP: 0 },
      { temperature: 0.8, topK: 0, topP: 0.95, minP: 0.05 },
      { temperature: 1, topK: 2000, topP: 0.9, minP: 0 },
    ]],
    [70000, [{ temperature: 0.8, topK: 0, topP: 0.9, minP: 0 }]],
  ];
  for (const [vocab, options] of cases) {
    // A limit just below the vocabulary on the second row, as a tokenizer's padding leaves.
    const rows = options.map((o, r) => ({ options: o, history: [], limit: vocab - (r % 2) * 3 }));
    const logits = filler(vocab)(rows.length * vocab, 10);
    await chooseAsPickToken(be, vocab, rows, logits, spreadRandoms(rows.length));
  }
});

opTest("chooseTokens picks greedily over rows of 70,000 ids as pickToken does", async (be) => {
  const vocab = 70000;
  // Two equal maxima far apart (the lower id wins); the maximum at the last id below a limit;
  // NaN and +Infinity; a row whose only numbers lie past its limit; a limit of one id. (Five
  // rows: chooseAsPickToken's slots collide for a multiple of four.)
  const rows = [vocab, vocab - 3, vocab, 5000, 1].map((limit) => ({
    options: { temperature: 0 },
    history: [],
    limit,
  }));
  const logits = filler(11)(rows.length * vocab, 10);
  const at = (r: number, id: number) => r * vocab + id;
  logits[at(0, 4200)] = 20; // past the first 4,096 ids: a thread of webgpu's argmax reads it later
  logits[at(0, 69000)] = 20;
  logits[at(1, vocab - 4)] = 20;
  logits[at(1, vocab - 1)] = 30;
  logits[at(2, 5)] = NaN;
  logits[at(2, 40000)] = Infinity;
  logits.fill(-Infinity, at(3, 0), at(3, 5000));
  logits[at(3, 5000)] = 1;
  const want = await chooseAsPickToken(be, vocab, rows, logits, spreadRandoms(rows.length));
  assertEquals(want, [4200, vocab - 4, 40000, -1, 0]);
});

opTest("conv and scan on pool slots match each sequence run alone", async (be) => {
  // Mamba's kernel of 4, and 2, where the state is one row.
  for (const kernel of [4, 2]) await poolSlotsCase(be, kernel);
});

async function poolSlotsCase(be: Backend<unknown>, kernel: number): Promise<void> {
  const js = new JsBackend();
  const fill = filler(4);
  const [channels, dState, len] = [37, 16, 5];
  const slots = [4, 1, 6];
  const poolRows = 8;
  const kept = (kernel - 1) * channels;
  const weight = fill(channels * kernel);
  const bias = fill(channels);
  const convPool = fill(poolRows * kept);
  const ssmPool = fill(poolRows * channels * dState);
  const A = fill(channels * dState).map((v) => -Math.abs(v) - 0.1);
  const D = fill(channels);
  const deltaBias = fill(channels);
  const gConv = be.upload(convPool.slice());
  const gSsm = be.upload(ssmPool.slice());
  const gSlots = be.upload(Float32Array.from(slots));
  // A prompt of `len` tokens, then one step: each runs as a batch on the slots.
  for (const steps of [len, 1]) {
    const batch = slots.length;
    const x = fill(batch * steps * channels);
    const u = fill(batch * steps * channels);
    const delta = fill(batch * steps * channels);
    const z = fill(batch * steps * channels);
    const B = fill(batch * steps * dState);
    const C = fill(batch * steps * dState);
    const wantConv = new Float32Array(batch * steps * channels);
    const wantY = new Float32Array(batch * steps * channels);
    slots.forEach((slot, b) => {
      const tokens = (a: Float32Array, width: number) =>
        a.subarray(b * steps * width, (b + 1) * steps * width);
      js.causalConv({
        out: tokens(wantConv, channels),
        x: tokens(x, channels),
        weight,
        bias,
        state: convPool.subarray(slot * kept, (slot + 1) * kept),
        len: steps,
        channels,
        kernel,
      });
      js.selectiveScan({
        y: tokens(wantY, channels),
        u: tokens(u, channels),
        delta: tokens(delta, channels).slice(),
        A,
        B: tokens(B, dState),
        C: tokens(C, dState),
        D,
        z: tokens(z, channels),
        deltaBias,
        deltaSoftplus: true,
        state: ssmPool.subarray(slot * channels * dState, (slot + 1) * channels * dState),
        len: steps,
        dim: channels,
        dState,
      });
    });
    const out = be.zeros(batch * steps * channels);
    be.causalConv({
      out,
      x: be.upload(x),
      weight: be.upload(weight),
      bias: be.upload(bias),
      state: gConv,
      slots: gSlots,
      len: steps,
      channels,
      kernel,
      batch,
    });
    const y = be.zeros(batch * steps * channels);
    be.selectiveScan({
      y,
      u: be.upload(u),
      delta: be.upload(delta.slice()),
      A: be.upload(A),
      B: be.upload(B),
      C: be.upload(C),
      D: be.upload(D),
      z: be.upload(z),
      deltaBias: be.upload(deltaBias),
      deltaSoftplus: true,
      state: gSsm,
      slots: gSlots,
      len: steps,
      dim: channels,
      dState,
      batch,
    });
    const what = `kernel ${kernel}, ${steps} token${steps > 1 ? "s" : ""}`;
    const within = (got: Float32Array, want: Float32Array, tolerance: number, part: string) => {
      const diff = maxAbsDiff(got, want);
      assert(diff <= tolerance, `${what}, ${part}: max abs diff ${diff}`);
    };
    within(await be.read(out), wantConv, 1e-5, "conv out");
    within(await be.read(y), wantY, 2e-4, "y");
    // The slots' states moved on; every other row of the pools is untouched.
    within(await be.read(gConv), convPool, 1e-6, "conv pool");
    within(await be.read(gSsm), ssmPool, 2e-4, "ssm pool");
  }
}

// ---- The kernel table: every case on every backend configuration, against js ----------------

/**
 * A backend configuration of the kernel table: the backend and the options
 * that steer its kernels (threads and SIMD build on wasm; scan chunks and
 * splitting on webgpu), and how much float32 rounding its sums may add
 * (a multiple of each case's tolerance): 1 for wasm's, 10 for the GPU's,
 * which sums in other orders.
 */
interface KernelConfig {
  label: string;
  create: () => Promise<Backend>;
  slack: number;
  ignore?: boolean;
}

const KERNEL_CONFIGS: KernelConfig[] = [
  ...(["relaxed", "plain"] as const).flatMap((simd) =>
    [1, 2, 3].map((threads) => ({
      label: `wasm ${threads}t ${simd}`,
      create: () => WasmBackend.create({ threads, simd }) as Promise<Backend>,
      slack: 1,
    }))
  ),
  // The relaxed build's GEMV over blocks on int16 dot products, as the plain build's.
  {
    label: "wasm 2t relaxed int16 dots",
    create: () =>
      WasmBackend.create({ threads: 2, simd: "relaxed", relaxedDot: false }) as Promise<Backend>,
    slack: 1,
  },
  ...[
    ["webgpu", {}],
    // Scan chunks of 16: chunk boundaries at len 15, 16, 17 and several chunks.
    ["webgpu scan chunks of 16", { scanChunkLen: 16 }],
    // Longer than the scan's 32-token tile and not a multiple of its 4-token step.
    ["webgpu scan chunks of 45", { scanChunkLen: 45 }],
    // Matrices over 4 KiB split by rows: linear and embed read over parts.
    ["webgpu split", { splitMatricesOver: 4096 }],
  ].map(([label, options]) => ({
    label: label as string,
    create: () => WebGpuBackend.create(options as WebGpuOptions) as Promise<Backend>,
    slack: 10,
    ignore: !adapter,
  })),
];

/**
 * One case of the kernel table: `run` draws its inputs from `fill` (the same
 * stream on every backend), issues operations and reads its outputs back;
 * each output must stay within `tolerance` × slack of the js backend's,
 * measured by `scaledError` (tests/helpers.ts).
 */
interface KernelCase {
  name: string;
  tolerance: number;
  run<Buf>(be: Backend<Buf>, fill: (n: number, scale?: number) => Float32Array): Promise<
    Float32Array[]
  >;
}

/** A matrix of `values` [rows, cols] as `format` keeps it where the backend does, else f32. */
function matrixIn<Buf>(
  be: Backend<Buf>,
  values: Float32Array,
  cols: number,
  format: "f32" | HalfFormat,
): Buf {
  if (format === "f32") return be.upload(values, cols);
  return be.uploadHalfMatrix(halfMatrixOf(values, format, cols)) ?? be.upload(values, cols);
}

/**
 * `v` rounded to `format`, with the values its widening must keep: for f16,
 * subnormals and -0; for bf16, -0 and values far below and above f16's range
 * (so a bf16 matrix is not all exact f16, which webgpu would keep as f16).
 */
function roundedTo(v: Float32Array, format: "f32" | HalfFormat): Float32Array {
  if (format === "f32") return v;
  if (format === "f16") {
    return v.map((x, i) => i % 97 === 0 ? 3e-6 * x : i % 89 === 0 ? -0 : x)
      .map((x) => f16ToF32(f32ToF16(x)));
  }
  return v.map((x, i) => i % 97 === 0 ? 1e-30 * x : i % 83 === 1 ? 1e20 * x : i % 89 === 0 ? -0 : x)
    .map((x) => bf16ToF32(f32ToBf16(x)));
}

/** linear's shapes [rows, inDim, outDim]: each kernel's edges (see linear.ts and asm/kernels/linear.ts). */
const LINEAR_SHAPES = [
  [1, 1, 1],
  [1, 5, 3],
  [1, 7, 5],
  [1, 768, 100],
  [1, 768, 1536],
  [1, 1537, 67],
  // GEMV lanes per output by outputs × row groups: 8 past 8192, 32 past 1024, else 64.
  [1, 16, 8200],
  [2, 8, 9],
  [2, 33, 9],
  [3, 40, 1500],
  [3, 64, 45],
  [3, 37, 45],
  [4, 33, 70],
  [5, 37, 45],
  [5, 130, 71],
  [7, 48, 1536],
  [13, 769, 131],
  // wasm: up to 6 rows (4 without relaxed SIMD) take one weight row at a time, more take panels.
  [6, 37, 11],
  // GEMV in groups of 4 rows, the last one full or not.
  [16, 64, 50],
  [13, 40, 33],
  [70, 17, 129],
  [130, 96, 16],
  // Tiled: sizes around the tiles, inDim not a multiple of 8 (or of 4: scalar loads).
  [129, 36, 130],
  [18, 12, 165],
  [129, 12, 8200],
  [129, 13, 8200],
  // A batch of decode steps over a wide matrix (lm_head): 32×64 and 64×128 tiles.
  [20, 40, 16400],
  [5, 36, 16400],
  [64, 40, 16400],
  [40, 36, 16390],
  [64, 256, 200],
  // Split over K for outDim ≤ 128: rows and outDim not multiples of 4.
  [17, 36, 45],
  [67, 52, 128],
  [260, 8, 127],
  // A batch of 33 to 64 rows through a narrow matrix with a long K (out_proj): skinny too.
  [37, 1028, 130],
  // Few tiles and a long K: split over workgroups, summed after.
  [9, 521, 136],
  [130, 400, 136],
  // Half enough 128×64 tiles: two workgroups per tile over K (vec4 loads, then scalar ones).
  [129, 260, 4100],
  [130, 258, 4097],
];

/** Scan cases: len, dim, N, optional inputs and softplus, sequences. */
const SCAN_CASES: [number, number, number, boolean, number][] = [
  ...[5, 8, 16, 20].flatMap((dState) =>
    [1, 15, 16, 17, 53].map((len): [number, number, number, boolean, number] => [
      len,
      dState === 8 ? 130 : 37,
      dState,
      true,
      1,
    ])
  ),
  [33, 21, 16, false, 1],
  [31, 40, 8, true, 3],
  [1, 40, 5, false, 2],
  [37, 24, 36, true, 2],
  [147, 21, 16, true, 1],
  [43, 37, 20, true, 2],
  [97, 37, 16, true, 1],
  [1, 1536, 16, true, 1],
  [3, 1000, 16, false, 1],
  [9, 70, 1, true, 1],
  [1, 3, 7, false, 1],
];

const KERNEL_CASES: KernelCase[] = [
  ...(["f32", "f16", "bf16"] as const).map((format): KernelCase => ({
    name: `linear over ${format} weights: GEMV, skinny, tiled and split-K, odd sizes, bias or none`,
    tolerance: 1e-5,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      for (const [rows, inDim, outDim] of LINEAR_SHAPES) {
        for (const withBias of [false, true]) {
          const x = be.upload(fill(rows * inDim));
          const w = matrixIn(be, roundedTo(fill(outDim * inDim), format), inDim, format);
          const bias = withBias ? be.upload(fill(outDim)) : null;
          const out = be.zeros(rows * outDim);
          be.linear({ out, x, weight: w, bias, rows, inDim, outDim });
          outs.push(await be.read(out));
        }
      }
      return outs;
    },
  })),
  ...(["q8_0", "q4_0", "q4_k"] as const).map((type): KernelCase => ({
    name: `linear over ${type} blocks: GEMV, skinny, tiled and split-K; linearSplit`,
    tolerance: 1e-5,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      // Blocks of 32 (or super-blocks of 256), 1 to 48 of them per row; the
      // GEMV of 1 to 16 rows and its groups of 4, skinny outputs, tiles.
      const per = BLOCK_ELEMENTS[type];
      const shapes = [
        [1, per, 1],
        [1, 2 * per, 5],
        [1, 768, 1537],
        [1, 1536, 67],
        [2, per, 9],
        [3, 2 * per, 131],
        [5, 768, 71],
        [16, 256, 33],
        [13, 512, 70],
        [37, 1536, 131],
        [40, 256, 45],
        [70, 256, 200],
        [9, 512, 136],
        [129, 256, 8200],
      ];
      for (const [rows, inDim, outDim] of shapes) {
        const matrix = quantizedOf(type, outDim, inDim, fill(outDim * inDim));
        const w = be.uploadQuantizedMatrix(matrix) ?? be.upload(dequantizeMatrix(matrix), inDim);
        const x = be.upload(fill(rows * inDim));
        for (const withBias of [false, true]) {
          const bias = withBias ? be.upload(fill(outDim)) : null;
          const out = be.zeros(rows * outDim);
          be.linear({ out, x, weight: w, bias, rows, inDim, outDim });
          outs.push(await be.read(out));
        }
        if (outDim < 9) continue;
        // Split outputs (in_proj's x and z, x_proj's dt, B and C): each its rows of the blocks.
        const widths = [outDim - 7, 4, 3];
        const parts = widths.map((width) => be.zeros(rows * width));
        be.linearSplit({
          outs: parts,
          widths,
          x,
          weight: w,
          bias: be.upload(fill(outDim)),
          rows,
          inDim,
        });
        for (const part of parts) outs.push(await be.read(part));
      }
      return outs;
    },
  })),
  {
    name: "embed and copyRows gather f16, bf16, q8_0, q4_0 and q4_k rows as their values, exactly",
    tolerance: 0,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      const formats = ["f16", "bf16", "q8_0", "q4_0", "q4_k"] as const;
      for (const format of formats) {
        // Rows of 13 (a tail) and 64 for 16-bit values; whole blocks otherwise.
        const dims = format === "f16" || format === "bf16"
          ? [13, 64]
          : [Math.max(64, BLOCK_ELEMENTS[format])];
        for (const dim of dims) {
          const vocab = 37;
          const values = fill(vocab * dim);
          const table = format === "f16" || format === "bf16"
            ? matrixIn(be, roundedTo(values, format), dim, format)
            : (() => {
              const matrix = quantizedOf(format, vocab, dim, values);
              return be.uploadQuantizedMatrix(matrix) ?? be.upload(dequantizeMatrix(matrix), dim);
            })();
          const ids = [0, vocab - 1, 5, 5, 17, 9];
          const embedded = be.zeros(ids.length * dim);
          be.embed({ out: embedded, table, ids: Int32Array.from(ids), dim });
          // By ids on the device (a decode step's), one past the table, into rows 1.. of dst.
          const copied = be.upload(new Float32Array((ids.length + 2) * dim).fill(-7));
          be.copyRows({
            dst: copied,
            dstOffset: dim,
            src: table,
            width: dim,
            count: ids.length + 1,
            srcRows: { buf: be.upload(Float32Array.from([...ids, vocab])), offset: 0 },
          });
          outs.push(await be.read(embedded), await be.read(copied));
        }
      }
      return outs;
    },
  },
  {
    name: "linearSplit writes column blocks to several outputs; linear accumulates",
    tolerance: 1e-5,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      const cases: [number, number, number[]][] = [
        [10, 36, [45, 20, 13]],
        [17, 36, [45, 20, 13]],
        [70, 17, [100, 60]],
        [129, 36, [130, 70]],
        [9, 261, [100, 60]],
        [1, 768, [1536, 1536]],
        // Wide and narrow outputs in turn (adjacent narrow ones run as one), and x_proj's shape.
        [3, 100, [70, 20, 13]],
        [3, 100, [20, 13, 90]],
        [16, 1536, [48, 16, 16]],
      ];
      for (const [rows, inDim, widths] of cases) {
        const outDim = widths.reduce((a, b) => a + b, 0);
        const x = be.upload(fill(rows * inDim));
        const w = be.upload(fill(outDim * inDim), inDim);
        const bias = be.upload(fill(outDim));
        const parts = widths.map((width) => be.zeros(rows * width));
        be.linearSplit({ outs: parts, widths, x, weight: w, bias, rows, inDim });
        for (const part of parts) outs.push(await be.read(part));
        const acc = be.upload(fill(rows * outDim));
        be.linear({ out: acc, x, weight: w, bias, rows, inDim, outDim, accumulate: true });
        outs.push(await be.read(acc));
      }
      return outs;
    },
  },
  {
    name: "causalConv: prompts, short runs and single steps carry the state; kernels 1 to 4",
    tolerance: 1e-5,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      for (const kernel of [1, 3, 4]) {
        for (const channels of [5, 13, 300, 1001, 1536]) {
          const weight = be.upload(fill(channels * kernel));
          const bias = kernel === 3 ? null : be.upload(fill(channels));
          const state = be.upload(fill(Math.max(1, (kernel - 1) * channels)));
          for (const len of [9, 2, 1, 1, 7, 21]) {
            const out = be.zeros(len * channels);
            const x = be.upload(fill(len * channels));
            be.causalConv({ out, x, weight, bias, state, len, channels, kernel });
            outs.push(await be.read(out));
            if (kernel > 1) outs.push(await be.read(state));
          }
        }
      }
      return outs;
    },
  },
  {
    name:
      "causalConv of a batch: each sequence with its own state, on pool slots too; kernels 1 and 4",
    tolerance: 1e-5,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      const [batch, kernel] = [3, 4];
      // 40 channels are whole vec4s, 37 are not.
      for (const channels of [37, 40]) {
        const weight = be.upload(fill(channels * kernel));
        const bias = be.upload(fill(channels));
        const state = be.upload(fill(batch * (kernel - 1) * channels));
        for (const len of [6, 2, 1, 19]) {
          const out = be.zeros(batch * len * channels);
          const x = be.upload(fill(batch * len * channels));
          be.causalConv({ out, x, weight, bias, state, len, channels, kernel, batch });
          outs.push(await be.read(out), await be.read(state));
        }
        // Two sequences whose states are rows 2 and 0 of the three: steps, then prompts.
        const slots = be.upload(Float32Array.of(2, 0));
        for (const len of [1, 1, 3, 11]) {
          const out = be.zeros(2 * len * channels);
          const x = be.upload(fill(2 * len * channels));
          be.causalConv({ out, x, weight, bias, state, slots, len, channels, kernel, batch: 2 });
          outs.push(await be.read(out), await be.read(state));
        }
      }
      const channels = 37;
      const bias = be.upload(fill(channels));
      // One tap: no state at all.
      const out = be.zeros(batch * channels);
      const x = be.upload(fill(batch * channels));
      const one = be.upload(fill(channels));
      be.causalConv({
        out,
        x,
        weight: one,
        bias,
        state: be.zeros(0),
        len: 1,
        channels,
        kernel: 1,
        batch,
      });
      outs.push(await be.read(out));
      return outs;
    },
  },
  {
    name: "selectiveScan: len 1 to 147 across chunk ends, N 1 to 36, batches, optional inputs",
    tolerance: 1e-4,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      for (const [len, dim, dState, optional, batch] of SCAN_CASES) {
        const A = fill(dim * dState).map((v) => -Math.exp(1.5 * v));
        const y = be.zeros(batch * len * dim);
        const state = be.upload(fill(batch * dim * dState));
        const delta = fill(batch * len * dim).map((v) => optional ? v : Math.abs(0.2 * v));
        be.selectiveScan({
          y,
          u: be.upload(fill(batch * len * dim)),
          delta: be.upload(delta),
          A: be.upload(A),
          B: be.upload(fill(batch * len * dState)),
          C: be.upload(fill(batch * len * dState)),
          D: optional ? be.upload(fill(dim)) : null,
          z: optional ? be.upload(fill(batch * len * dim, 2)) : null,
          deltaBias: optional ? be.upload(fill(dim, 0.5)) : null,
          deltaSoftplus: optional,
          state,
          len,
          dim,
          dState,
          batch,
        });
        outs.push(await be.read(y), await be.read(state));
      }
      return outs;
    },
  },
  {
    name: "rmsNorm (also in place), addInPlace, embed (over a split table), copy",
    tolerance: 1e-5,
    async run(be, fill) {
      const outs: Float32Array[] = [];
      for (
        const [rows, dim] of [[1, 7], [3, 7], [5, 1], [5, 300], [3, 768], [1, 768], [2, 1100], [
          2,
          2200,
        ]]
      ) {
        const x = be.upload(fill(rows * dim, 3));
        const w = be.upload(fill(dim));
        const out = be.zeros(rows * dim);
        be.rmsNorm({ out, x, weight: w, rows, dim, eps: 1e-5 });
        be.rmsNorm({ out: x, x, weight: w, rows, dim, eps: 1e-5 });
        outs.push(await be.read(out), await be.read(x));
      }
      const acc = be.upload(fill(1027));
      be.addInPlace({ acc, x: be.upload(fill(1027)), length: 1026 });
      // 7,372 bytes: split in two on "webgpu split".
      const [vocab, dim] = [97, 19];
      const table = be.upload(fill(vocab * dim), dim);
      const embedded = be.zeros(5 * dim);
      be.embed({ out: embedded, table, ids: Int32Array.of(3, 0, 96, 3, 57), dim });
      be.copy({ dst: acc, dstOffset: 5, src: embedded, srcOffset: 2, length: 11 });
      be.copy({ dst: acc, src: acc, srcOffset: 2, length: 6 }); // within one buffer
      outs.push(await be.read(acc), await be.read(embedded));
      return outs;
    },
  },
];

for (const config of KERNEL_CONFIGS) {
  for (const c of KERNEL_CASES) {
    Deno.test({
      name: `[${config.label}] ${c.name}`,
      ignore: config.ignore,
      async fn() {
        const be = await config.create();
        try {
          const seed = KERNEL_CASES.indexOf(c) + 1;
          const want = await c.run(new JsBackend(), filler(seed));
          const got = await c.run(be, filler(seed));
          assertEquals(got.length, want.length);
          for (const [i, output] of got.entries()) {
            const error = scaledError(output, want[i]);
            assert(
              error <= c.tolerance * config.slack,
              `output ${i}: scaled error ${error} over ${c.tolerance * config.slack}`,
            );
          }
        } finally {
          be.dispose();
        }
      },
    });
  }
}
