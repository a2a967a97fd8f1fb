/**
 * The selective scan on its own, in mamba_ssm's `selective_scan_fn` layouts,
 * running on any backend. The js and wasm scans carry float64 within a call;
 * the webgpu one computes in float32 unless given `scanPrecision:
 * "double-float"`, which meets a float64 reference as closely.
 *
 * @example
 * ```ts
 * import { selectiveScan } from "./scan.ts";
 * import { assertAlmostEquals, assertEquals } from "@std/assert";
 *
 * const [batch, dim, len, dState] = [1, 2, 3, 4];
 * const { y, lastState } = await selectiveScan({
 *   u: new Float32Array(batch * dim * len).fill(1),
 *   delta: new Float32Array(batch * dim * len).fill(0.1),
 *   A: new Float32Array(dim * dState).fill(-1),
 *   B: new Float32Array(batch * dState * len).fill(1),
 *   C: new Float32Array(batch * dState * len).fill(1),
 *   batch, dim, len, dState,
 * });
 * assertEquals([y.length, lastState.length], [6, 8]);
 * // First step from a zero state: h = delta * B * u = 0.1 in each of 4 states; y = C · h.
 * assertAlmostEquals(y[0], 0.4, 1e-6);
 * ```
 *
 * @module
 */

import type { Backend } from "./backend.ts";
import { type BackendName, type BackendOptions, createBackend } from "./backends/registry.ts";
import { checkPositiveInteger } from "./errors.ts";

/** Inputs in mamba_ssm's layouts. */
export interface SelectiveScanArgs {
  /** u [batch, dim, len]. */
  u: Float32Array;
  /** delta [batch, dim, len]. */
  delta: Float32Array;
  /** A [dim, dState]. */
  A: Float32Array;
  /** B [batch, dState, len]. */
  B: Float32Array;
  /** C [batch, dState, len]. */
  C: Float32Array;
  /** D [dim], optional. */
  D?: Float32Array;
  /** z [batch, dim, len], optional gate. */
  z?: Float32Array;
  /** deltaBias [dim], optional. */
  deltaBias?: Float32Array;
  /** Apply softplus to delta + deltaBias (default false, as in mamba_ssm). */
  deltaSoftplus?: boolean;
  /** Batch size. */
  batch: number;
  /** Channels. */
  dim: number;
  /** Sequence length. */
  len: number;
  /** State size N. */
  dState: number;
}

/** Outputs in mamba_ssm's layouts. */
export interface SelectiveScanResult {
  /** y [batch, dim, len]. */
  y: Float32Array;
  /** The state after the last token [batch, dim, dState]. */
  lastState: Float32Array;
}

/** Options of {@link selectiveScan}: the backend and the options it reads. */
export interface SelectiveScanOptions extends BackendOptions {
  /**
   * Backend name ("js", the default, is the reference), or a backend the
   * caller made (for example `model.model.backend`), which stays the caller's
   * to dispose.
   */
  backend?: BackendName | Backend<unknown>;
}

/**
 * Backends made for a name and its options, kept between calls so a loop of
 * scans does not build and tear down a backend (wasm threads, a GPU device)
 * each time; each is disposed after {@link IDLE_DISPOSE_MS} without a call.
 */
const scanBackends = new Map<string, ScanBackend>();

interface ScanBackend {
  backend: Promise<Backend<unknown>>;
  /** Calls running on it now. */
  users: number;
  timer?: ReturnType<typeof setTimeout>;
}
const IDLE_DISPOSE_MS = 1000;

async function withScanBackend<T>(
  name: BackendName,
  options: BackendOptions,
  run: (be: Backend<unknown>) => Promise<T>,
): Promise<T> {
  const key = JSON.stringify([name, options]);
  let entry = scanBackends.get(key);
  if (!entry) {
    entry = { backend: createBackend(name, options), users: 0 };
    scanBackends.set(key, entry);
    entry.backend.catch(() => scanBackends.delete(key));
  }
  clearTimeout(entry.timer);
  const held = entry;
  held.users++;
  try {
    return await run(await held.backend);
  } finally {
    if (--held.users === 0) disposeWhenIdle(key, held);
  }
}

function disposeWhenIdle(key: string, held: ScanBackend): void {
  held.timer = setTimeout(() => {
    scanBackends.delete(key);
    held.backend.then((be) => be.dispose(), () => {});
  }, IDLE_DISPOSE_MS);
  // The idle disposal alone keeps no program alive.
  Deno.unrefTimer(held.timer);
}

/** Tile edge of {@link transpose}: a tile's rows and columns both stay in the L1 cache. */
const TRANSPOSE_TILE = 32;

/**
 * Row-major [rows, cols] to [cols, rows], tile by tile: a plain double loop
 * writes with a stride of `rows` floats and misses the cache on every store.
 */
function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let r0 = 0; r0 < rows; r0 += TRANSPOSE_TILE) {
    const rEnd = Math.min(r0 + TRANSPOSE_TILE, rows);
    for (let c0 = 0; c0 < cols; c0 += TRANSPOSE_TILE) {
      const cEnd = Math.min(c0 + TRANSPOSE_TILE, cols);
      for (let r = r0; r < rEnd; r++) {
        for (let c = c0; c < cEnd; c++) out[c * rows + r] = src[r * cols + c];
      }
    }
  }
  return out;
}

function checkLength(name: string, array: Float32Array | undefined, expected: number): void {
  if (array !== undefined && array.length !== expected) {
    throw new RangeError(`${name} has ${array.length} elements, expected ${expected}`);
  }
}

/** Runs the selective scan over each batch entry from a zero state. */
export async function selectiveScan(
  args: SelectiveScanArgs,
  options: SelectiveScanOptions = {},
): Promise<SelectiveScanResult> {
  const { batch, dim, len, dState } = args;
  for (const [name, value] of Object.entries({ batch, dim, len, dState })) {
    checkPositiveInteger(name, value);
  }
  checkLength("u", args.u, batch * dim * len);
  checkLength("delta", args.delta, batch * dim * len);
  checkLength("z", args.z, batch * dim * len);
  checkLength("A", args.A, dim * dState);
  checkLength("B", args.B, batch * dState * len);
  checkLength("C", args.C, batch * dState * len);
  checkLength("D", args.D, dim);
  checkLength("deltaBias", args.deltaBias, dim);
  const { backend = "js", ...backendOptions } = options;
  if (typeof backend !== "string") return await scanOn(backend, args);
  return await withScanBackend(backend, backendOptions, (be) => scanOn(be, args));
}

async function scanOn<Buf>(
  be: Backend<Buf>,
  args: SelectiveScanArgs,
): Promise<SelectiveScanResult> {
  const { batch, dim, len, dState } = args;
  const y = new Float32Array(batch * dim * len);
  const lastState = new Float32Array(batch * dim * dState);
  const A = be.upload(args.A);
  const D = args.D ? be.upload(args.D) : null;
  const deltaBias = args.deltaBias ? be.upload(args.deltaBias) : null;
  // Where the backend reads mamba_ssm's [dim, len] layout itself, only B and
  // C ([dState, len], small) are transposed here; elsewhere u, delta, z and y too.
  const inPlace = be.supports("channelMajorScan");
  const out = be.zeros(len * dim);
  for (let b = 0; b < batch; b++) {
    const slice = (a: Float32Array, rows: number) =>
      a.subarray(b * rows * len, (b + 1) * rows * len);
    const tokenMajor = (a: Float32Array, rows: number) =>
      be.upload(transpose(slice(a, rows), rows, len));
    const perChannel = (a: Float32Array) => inPlace ? be.upload(slice(a, dim)) : tokenMajor(a, dim);
    const inputs = {
      u: perChannel(args.u),
      delta: perChannel(args.delta),
      B: tokenMajor(args.B, dState),
      C: tokenMajor(args.C, dState),
      z: args.z ? perChannel(args.z) : null,
    };
    const state = be.zeros(dim * dState);
    be.selectiveScan({
      y: out,
      ...inputs,
      A,
      D,
      deltaBias,
      deltaSoftplus: args.deltaSoftplus ?? false,
      state,
      len,
      dim,
      dState,
      channelMajor: inPlace,
    });
    const yb = await be.read(out);
    y.set(inPlace ? yb : transpose(yb, len, dim), b * dim * len);
    lastState.set(await be.read(state), b * dim * dState);
    // Each sequence's inputs go back before the next one's come.
    for (const buf of [...Object.values(inputs), state]) if (buf) be.release(buf);
  }
  // The backend is kept for the next call: nothing of this one stays in it.
  for (const buf of [A, D, deltaBias, out]) if (buf) be.release(buf);
  return { y, lastState };
}
