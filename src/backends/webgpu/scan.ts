/**
 * Mamba-1's selective scan (scan.wgsl, scan_double_float.wgsl): a prompt in
 * the chunked form (each chunk's own state, the carry between chunks, then
 * the outputs), a decode step that folds dt_proj in (and, after a GEMV that
 * folded x_proj in, adds up x_proj's shares itself), and the double-float
 * reference kernel.
 *
 * @module
 */

import type { ScanArgs } from "../../backend.ts";
import type { ScanDoubleFloatParams, ScanParams } from "../../generated/wgsl_params.ts";
import type { LinearKernels } from "./linear.ts";
import { byteSize, type GpuBuffer, type WeightFormat } from "./memory.ts";
import { grid, MAX_GROUPS, Program } from "./program.ts";
import type { GpuRuntime } from "./runtime.ts";

const SCAN_WG = 128;
const SCAN_TILE = 32; // tokens staged at a time in scan.wgsl: a multiple of 4, at most SCAN_WG / 4
const SCAN_LANES = 16; // states per thread in scan.wgsl
// The shortest chunk the default chunking makes: at (1, 1536, 2048), where the
// thread target asks for shorter ones, chunks of 48 tokens scanned faster than
// chunks of 64 on an H200, and chunks of 40 no faster (docs/performance.md).
const SCAN_MIN_CHUNK = 48;
const DOUBLE_FLOAT_SCAN_WG = 64; // @workgroup_size of scan_double_float.wgsl
// Threads per workgroup of a decode step's scan (four per channel): a step is
// one short pass, and smaller workgroups spread its loads over more SMs.
const SCAN_STEP_WG = 64;
// The same with x_proj folded in (see SCAN_PROGRAMS).
const SCAN_PROJECTED_STEP_WG = 256;

/** scan.wgsl's flag for dt_proj's weight format (0 for f32). */
const SCAN_DT_FLAGS: Readonly<Record<WeightFormat, number>> = {
  f32: 0,
  f16: 16,
  bf16: 64,
  q8_0: 128,
  q4_0: 256,
  q4_k: 512,
};

/**
 * The three passes of the chunked scan, and the decode step that computes
 * delta itself: from dt, or (projected) from the shares of x_proj that
 * in_proj's GEMV left, which every workgroup adds up, so it takes fewer and
 * larger ones; each with states one float at a time or as vec4s.
 */
const SCAN_PROGRAMS = (() => {
  const constants = { WG: SCAN_WG, TT: SCAN_TILE };
  // blocks.wgsl decodes a dt_proj kept as quantized blocks.
  const plain = ["blocks", "scan_no_shares"];
  // 16: the slots naming each sequence's state row in a pool.
  const step = [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 16];
  // step_vec4 reaches the states through binding 17, a vec4 view of 10's buffer.
  const stepVec4 = [...step.filter((binding) => binding !== 10), 17];
  // step_quads reaches A, B, C, dt and dt_proj (3, 4, 5, 13, 14) through vec4 views 18 to 22.
  const stepQuads = [0, 1, 6, 7, 8, 9, 16, 17, 18, 19, 20, 21, 22];
  const scan = (
    entry: string,
    bindings: number[],
    specialised: Record<string, number>,
    preludes: string[],
  ) => new Program<ScanParams>("scan", entry, bindings, specialised, preludes);
  // A decode step's entry point reading delta's dt and dt_proj, or (projected) x_proj's shares.
  const steps = (entry: string, bindings: number[]) => ({
    plain: scan(entry, bindings, { ...constants, WG: SCAN_STEP_WG }, plain),
    projected: scan(
      entry,
      [...bindings, 15],
      { ...constants, WG: SCAN_PROJECTED_STEP_WG },
      ["blocks", "scan_shares"],
    ),
  });
  return {
    chunkState: scan("chunk_state", [0, 1, 2, 3, 4, 5, 7, 8, 11, 12], constants, plain),
    carry: scan("carry", [0, 3, 10, 11, 12, 16], constants, plain),
    output: scan("output", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16], constants, plain),
    step: steps("step", step),
    stepVec4: steps("step_vec4", stepVec4),
    stepQuads: scan("step_quads", stepQuads, { ...constants, WG: SCAN_STEP_WG }, plain),
    doubleFloat: new Program<ScanDoubleFloatParams>(
      "scan_double_float",
      "main",
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    ),
  };
})();

/** The flags of the scan kernels' params for what `args` holds (bit 16 is the step's own). */
function scanFlags(args: ScanArgs<GpuBuffer>): number {
  const { D, z, deltaBias, deltaSoftplus, slots } = args;
  return (D ? 1 : 0) | (z ? 2 : 0) | (deltaBias ? 4 : 0) | (deltaSoftplus ? 8 : 0) |
    (slots ? 32 : 0);
}

/** How the chunked scan splits a prompt and what a scan computes in. */
export interface ScanOptions {
  /** Tokens per scan chunk; by default chosen so that ~`scanTargetThreads` threads run. */
  scanChunkLen?: number;
  /** Threads (sequences × channels × chunks) the chunked scan aims for (default 131072). */
  scanTargetThreads?: number;
  /**
   * Arithmetic of the scan: "float32" (the default, fast) or "double-float"
   * (pairs of f32, about 44 significant bits, through a reference kernel many
   * times slower): f32 rounding leaves the scan up to 2e-3 (relative) from a
   * float64 one over 1024 tokens, double-float within 1e-4 like the js and wasm
   * backends, which carry float64.
   */
  scanPrecision?: ScanPrecision;
}

/** See {@link ScanOptions.scanPrecision}. */
export type ScanPrecision = "float32" | "double-float";

/** See the module documentation. */
export class ScanKernels {
  constructor(
    readonly rt: GpuRuntime,
    readonly linear: LinearKernels,
    readonly options: ScanOptions,
  ) {}

  /** Backend.selectiveScan. */
  selectiveScan(args: ScanArgs<GpuBuffer>): void {
    if ((args.batch ?? 1) === 0 || args.len === 0) return;
    const { rt } = this;
    if (this.options.scanPrecision === "double-float") return this.#scanDoubleFloat(args);
    const { delta, B, C, len, dim, dState } = args;
    const batch = args.batch ?? 1;
    // A decode step computes delta itself from dt and dt_proj, where the
    // product that makes it is held back and delta is scratch; longer scans
    // read it, the product run first.
    const product = len === 1 ? this.linear.takeProduct(delta, batch) : null;
    const projection = product && { dt: product.x, weight: product.weight, rank: product.inDim };
    // dt, B and C as the shares of an x_proj that in_proj's GEMV folded in.
    const shares = projection
      ? this.linear.takeShares([projection.dt, B, C], [projection.rank, dState, dState], batch)
      : null;
    const flags = scanFlags(args) | (projection ? SCAN_DT_FLAGS[projection.weight.format] : 0);
    // The kernels hold 16 states per thread; larger state sizes run group by group.
    const nGroups = Math.ceil(dState / SCAN_LANES);
    // What every pass binds; each program takes the ones it declares.
    const common = this.#scanBindings(args);
    const sizes = { dim, batch, flags, nState: dState, nGroups };
    if (projection) {
      const bindings = {
        ...common,
        13: projection.dt.buffer,
        14: projection.weight.buffer,
        15: shares?.parts.buffer ?? rt.memory.absent,
        17: args.state.buffer,
        18: args.A.buffer,
        19: args.B.buffer,
        20: args.C.buffer,
        21: projection.dt.buffer,
        22: projection.weight.buffer,
      };
      // States in whole vec4s load and store as such (step_vec4); where the
      // rows of dt and of an f32 dt_proj are whole vec4s too, so do A, B, C,
      // dt and dt_proj (step_quads).
      const vec4 = dState % 4 === 0;
      const quads = vec4 && projection.weight.format === "f32" && projection.rank % 4 === 0;
      const programs = vec4 ? SCAN_PROGRAMS.stepVec4 : SCAN_PROGRAMS.step;
      let program = programs.plain;
      if (shares) program = programs.projected;
      else if (quads) program = SCAN_PROGRAMS.stepQuads;
      const channelsPerGroup = program.constants.WG / 4; // four threads per channel
      const blocks = shares?.blocks ?? 0;
      for (let group = 0; group < nGroups; group++) {
        const params = {
          ...sizes,
          len: 1,
          chunkLen: 1,
          nChunks: 1,
          group,
          rank: projection.rank,
          blocks,
        };
        rt.run(program, params, bindings, [Math.ceil(dim / channelsPerGroup), 1, batch]);
      }
      return;
    }
    const chunkLen = this.scanChunkLen(batch, dim, len);
    const nChunks = Math.ceil(len / chunkLen);
    const channelGroups = Math.ceil(dim / SCAN_WG);
    if (nChunks > 1) rt.notCapturing("A scan over several chunks");
    const { pool } = rt.memory;
    const hbuf = nChunks > 1
      ? pool.acquire(byteSize(batch * nChunks * dim * SCAN_LANES), false)
      : null;
    const dtsum = nChunks > 1 ? pool.acquire(byteSize(batch * nChunks * dim), false) : null;
    const bindings = {
      ...common,
      2: delta.buffer,
      11: hbuf ?? rt.memory.unused[0],
      12: dtsum ?? rt.memory.unused[0],
    };
    for (let group = 0; group < nGroups; group++) {
      const params = { ...sizes, len, chunkLen, nChunks, group, rank: 0, blocks: 0 };
      if (nChunks > 1) {
        rt.run(SCAN_PROGRAMS.chunkState, params, bindings, [channelGroups, nChunks - 1, batch]);
        rt.run(SCAN_PROGRAMS.carry, params, bindings, grid(Math.ceil((batch * dim * 4) / 256)));
      }
      rt.run(SCAN_PROGRAMS.output, params, bindings, [channelGroups, nChunks, batch]);
    }
    if (hbuf) pool.release(hbuf);
    if (dtsum) pool.release(dtsum);
  }

  /** Tokens per chunk of the scan for this shape. */
  scanChunkLen(batch: number, dim: number, len: number): number {
    const { scanChunkLen, scanTargetThreads = 131072 } = this.options;
    if (scanChunkLen) return Math.min(len, Math.max(1, scanChunkLen));
    const channels = batch * Math.ceil(dim / SCAN_WG) * SCAN_WG;
    const chunks = Math.min(MAX_GROUPS, Math.max(1, Math.ceil(scanTargetThreads / channels)));
    const chunkLen = Math.ceil(Math.ceil(len / chunks) / SCAN_TILE) * SCAN_TILE;
    return Math.min(len, Math.max(SCAN_MIN_CHUNK, chunkLen, Math.ceil(len / MAX_GROUPS)));
  }

  /**
   * The scan in double-float arithmetic (scan_double_float.wgsl), one thread
   * per channel, in dispatches of at most 2^15 steps of one state per thread.
   */
  #scanDoubleFloat(args: ScanArgs<GpuBuffer>): void {
    const { delta, len, dim, dState } = args;
    const { rt } = this;
    const batch = args.batch ?? 1;
    const stateLo = rt.memory.pool.acquire(byteSize(batch * dim * dState), false);
    const bindings = {
      ...this.#scanBindings(args),
      2: delta.buffer,
      11: stateLo,
      12: args.slots?.buffer ?? rt.memory.absent,
    };
    const tokensPerDispatch = Math.max(1, Math.floor(2 ** 15 / (dState + 1)));
    const flags = scanFlags(args);
    const groups: [number, number, number] = [Math.ceil(dim / DOUBLE_FLOAT_SCAN_WG), 1, batch];
    for (let start = 0; start < len; start += tokensPerDispatch) {
      const count = Math.min(tokensPerDispatch, len - start);
      const params = { len, dim, batch, flags, nState: dState, start, count, zero: 0 };
      rt.run(SCAN_PROGRAMS.doubleFloat, params, bindings, groups);
    }
    rt.memory.pool.release(stateLo);
  }

  /** The bindings of every scan kernel: inputs 1 and 3 to 8 (a placeholder for those absent), y, state and slots. */
  #scanBindings(args: ScanArgs<GpuBuffer>): Record<number, GPUBuffer> {
    const { absent } = this.rt.memory;
    return {
      16: args.slots?.buffer ?? absent,
      1: args.u.buffer,
      3: args.A.buffer,
      4: args.B.buffer,
      5: args.C.buffer,
      6: args.D?.buffer ?? absent,
      7: args.z?.buffer ?? absent,
      8: args.deltaBias?.buffer ?? absent,
      9: args.y.buffer,
      10: args.state.buffer,
    };
  }
}
