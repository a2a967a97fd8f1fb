/**
 * Mamba-2's operations (ssdScan, gatedRmsNorm) on every backend that
 * supports them, at odd sizes, against the js backend's plain recurrence
 * (itself checked against ../shared/fixtures/mamba2 by mamba2_test.ts): one
 * token and several chunks, lengths that are not a multiple of the chunk,
 * head and state sizes that are not multiples of 4, batches on pool slots,
 * carried states and Δ limits.
 */

import { assert, assertEquals, assertRejects } from "@std/assert";
import type { Backend, SsdArgs } from "../src/backend.ts";
import { JsBackend } from "../src/backends/js.ts";
import { type BackendName, type BackendOptions, createBackend } from "../src/backends/registry.ts";
import { WebGpuBackend, type WebGpuOptions } from "../src/backends/webgpu/mod.ts";
import { defaultSsdChunk } from "../src/backends/webgpu/ssd.ts";
import { maxAbsDiff, maxRelDiff } from "./helpers.ts";

const adapter = await navigator.gpu?.requestAdapter();

/** The backends that run Mamba-2, each with its options. */
const BACKENDS: { label: string; name: BackendName; options?: BackendOptions; ignore?: boolean }[] =
  [
    { label: "wasm 1 thread", name: "wasm", options: { threads: 1 } },
    { label: "wasm 2 threads", name: "wasm", options: { threads: 2 } },
    { label: "webgpu", name: "webgpu", ignore: !adapter },
  ];

/** A deterministic generator of floats in [lo, hi) (mulberry32). */
function random(seed: number): (lo: number, hi: number) => number {
  let a = seed >>> 0;
  return (lo, hi) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return lo + (hi - lo) * (((t ^ (t >>> 14)) >>> 0) / 4294967296);
  };
}

interface SsdCase {
  name: string;
  batch: number;
  len: number;
  heads: number;
  headDim: number;
  groups: number;
  dState: number;
  chunkSize: number;
  dtLimit?: [number, number];
  /** The pool's rows; sequence b's state is row slots[b] when given. */
  slots?: number[];
}

const CASES: SsdCase[] = [
  {
    name: "one token",
    batch: 1,
    len: 1,
    heads: 4,
    headDim: 5,
    groups: 2,
    dState: 7,
    chunkSize: 16,
  },
  {
    name: "one chunk, partial",
    batch: 1,
    len: 11,
    heads: 2,
    headDim: 8,
    groups: 1,
    dState: 16,
    chunkSize: 16,
  },
  {
    name: "several chunks, L not a multiple, odd sizes, two sequences",
    batch: 2,
    len: 37,
    heads: 6,
    headDim: 7,
    groups: 3,
    dState: 9,
    chunkSize: 8,
  },
  {
    name: "Δ limits, chunk of 1",
    batch: 1,
    len: 9,
    heads: 4,
    headDim: 4,
    groups: 4,
    dState: 4,
    chunkSize: 1,
    dtLimit: [0.05, 0.3],
  },
  {
    name: "a decode step of three sequences on pool slots",
    batch: 3,
    len: 1,
    heads: 8,
    headDim: 16,
    groups: 2,
    dState: 32,
    chunkSize: 256,
    slots: [4, 0, 2],
  },
  {
    name:
      "a decode step of 65 sequences, N 136: the GPU's vec4 loads, more than a channel has threads",
    batch: 65,
    len: 1,
    heads: 4,
    headDim: 12,
    groups: 2,
    dState: 136,
    chunkSize: 256,
    slots: Array.from({ length: 65 }, (_, b) => (7 * b) % 65),
  },
  {
    name: "head_dim and N past one tile of the GPU's products (72, 136)",
    batch: 1,
    len: 150,
    heads: 2,
    headDim: 72,
    groups: 2,
    dState: 136,
    chunkSize: 256,
  },
  {
    name: "prefill on pool slots, head_dim 64, N 128, long chunks",
    batch: 2,
    len: 150,
    heads: 4,
    headDim: 64,
    groups: 1,
    dState: 128,
    chunkSize: 256,
    slots: [1, 3],
  },
  {
    name: "a decode step at odd sizes: the GPU's scalar loads",
    batch: 2,
    len: 1,
    heads: 3,
    headDim: 5,
    groups: 3,
    dState: 7,
    chunkSize: 256,
  },
];

/** Host arrays of a case: inputs drawn at random, the state nonzero (a carried one). */
function hostArgs(c: SsdCase, seed: number) {
  const rand = random(seed);
  const rows = c.batch * c.len;
  const width = c.heads * c.headDim + 2 * c.groups * c.dState;
  const fill = (length: number, lo: number, hi: number) =>
    Float32Array.from({ length }, () => rand(lo, hi));
  const stateRows = c.slots ? Math.max(...c.slots) + 1 : c.batch;
  return {
    xBC: fill(rows * width, -1, 1),
    dt: fill(rows * c.heads, -4, 1),
    dtBias: fill(c.heads, -1, 0.5),
    A: fill(c.heads, -2, -0.05),
    D: fill(c.heads, -1, 1),
    state: fill(stateRows * c.heads * c.headDim * c.dState, -0.5, 0.5),
    slots: c.slots ? Float32Array.from(c.slots) : undefined,
    y: new Float32Array(rows * c.heads * c.headDim),
  };
}

/** Runs a case's ssdScan on `be`; returns y and the states. */
async function runSsd<Buf>(
  be: Backend<Buf>,
  c: SsdCase,
  host: ReturnType<typeof hostArgs>,
): Promise<{ y: Float32Array; state: Float32Array }> {
  const up = (a: Float32Array) => be.upload(a.slice());
  const args: SsdArgs<Buf> = {
    y: up(host.y),
    xBC: up(host.xBC),
    dt: up(host.dt),
    dtBias: up(host.dtBias),
    dtLimit: c.dtLimit ?? [0, Infinity],
    A: up(host.A),
    D: up(host.D),
    state: up(host.state),
    slots: host.slots && up(host.slots),
    len: c.len,
    batch: c.batch,
    heads: c.heads,
    headDim: c.headDim,
    groups: c.groups,
    dState: c.dState,
    chunkSize: c.chunkSize,
  };
  be.ssdScan!(args);
  return { y: await be.read(args.y), state: await be.read(args.state) };
}

Deno.test({
  name: "[webgpu] the chunked SSD at every chunk length, and in segments that carry the state",
  ignore: !adapter,
  async fn(t) {
    // Two sequences of 37 tokens, odd sizes; one of 150 past one tile.
    for (const c of [CASES[2], CASES[6]]) {
      const host = hostArgs(c, 3);
      const want = await runSsd(new JsBackend(), c, host);
      const check = async (what: string, options: WebGpuOptions) => {
        const be = await WebGpuBackend.create(options);
        const got = await runSsd(be, c, host);
        be.dispose();
        const yDiff = scaledDiff(got.y, want.y);
        const stateDiff = scaledDiff(got.state, want.state);
        assert(yDiff <= 1e-5, `${c.name}, ${what}: y ${yDiff}`);
        assert(stateDiff <= 1e-5, `${c.name}, ${what}: state ${stateDiff}`);
      };
      await t.step(c.name, async () => {
        for (const ssdChunkLen of [16, 64, 128, 256]) {
          await check(`chunks of ${ssdChunkLen}`, { ssdChunkLen });
        }
        // Room for one chunk's states: every chunk is a segment of its own.
        const chunkStateBytes = c.batch * c.heads * c.headDim * c.dState * 4;
        await check("segments", { ssdChunkLen: 16, ssdStatesBytes: chunkStateBytes });
        // Room for two chunks' C·Bᵀ, larger here than their states.
        const cbBytes = c.batch * c.groups * 16 * 16 * 4;
        if (cbBytes > chunkStateBytes) {
          await check("segments bound by C·Bᵀ", { ssdChunkLen: 16, ssdStatesBytes: 2 * cbBytes });
        }
      });
    }
    await assertRejects(
      () => WebGpuBackend.create({ ssdChunkLen: 24 }),
      RangeError,
      "ssdChunkLen must be a multiple of 16",
    );
  },
});

Deno.test("webgpu SSD: long scans take chunks of 256, a 2048-token prompt on 24 heads chunks of 128", () => {
  // (batch, len, heads): issue 14's shapes, where 256 measured faster on an H100, and the prompt
  // of the mamba2-130m prefill, where 128 did (docs/mamba2.md).
  assertEquals(defaultSsdChunk(1, 2048, 24), 128);
  assertEquals(defaultSsdChunk(1, 16384, 24), 256);
  assertEquals(defaultSsdChunk(8, 2048, 24), 256);
  assertEquals(defaultSsdChunk(1, 4096, 80), 256);
  assertEquals(defaultSsdChunk(1, 150, 4), 128);
});

/** max |a - b| / max |b|. */
function scaledDiff(a: Float32Array, b: Float32Array): number {
  return maxAbsDiff(a, b) / b.reduce((max, v) => Math.max(max, Math.abs(v)), 0);
}

for (const { label, name, options, ignore } of BACKENDS) {
  Deno.test({
    name: `[${label}] ssdScan at odd sizes agrees with the js recurrence`,
    ignore,
    async fn(t) {
      const be = await createBackend(name, options);
      assert(be.supports("ssdScan"));
      for (const [i, c] of CASES.entries()) {
        await t.step(c.name, async () => {
          const host = hostArgs(c, 1 + i);
          const want = await runSsd(new JsBackend(), c, host);
          const got = await runSsd(be, c, host);
          // Outputs are sums of many terms of both signs: the error is
          // measured against the largest output, as f32 rounding scales.
          const yDiff = scaledDiff(got.y, want.y);
          const stateDiff = scaledDiff(got.state, want.state);
          assert(yDiff <= 1e-5, `y: max diff ${yDiff} of the largest |y|`);
          assert(stateDiff <= 1e-5, `state: max diff ${stateDiff} of the largest |h|`);
        });
      }
      be.dispose();
    },
  });

  Deno.test({
    name: `[${label}] gatedRmsNorm per group agrees with the js reference`,
    ignore,
    async fn() {
      const be = await createBackend(name, options);
      const rand = random(7);
      for (const [rows, dim, groupSize] of [[1, 12, 12], [5, 30, 6], [3, 128, 64], [40, 64, 16]]) {
        const fill = (length: number) => Float32Array.from({ length }, () => rand(-2, 2));
        const x = fill(rows * dim);
        const gate = fill(rows * dim);
        const weight = fill(dim);
        const run = async <Buf>(b: Backend<Buf>) => {
          const out = b.zeros(rows * dim);
          b.gatedRmsNorm!({
            out,
            x: b.upload(x.slice()),
            gate: b.upload(gate.slice()),
            weight: b.upload(weight.slice()),
            rows,
            dim,
            groupSize,
            eps: 1e-5,
          });
          return await b.read(out);
        };
        const diff = maxRelDiff(await run(be), await run(new JsBackend()));
        assert(diff <= 1e-5, `${rows}×${dim} in groups of ${groupSize}: max relative diff ${diff}`);
      }
      be.dispose();
    },
  });
}
