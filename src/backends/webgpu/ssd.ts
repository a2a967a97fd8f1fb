/**
 * Mamba-2's operations: the SSD scan (ssd.wgsl; a decode step as the
 * recurrence, a prompt in chunks in five passes over scratch buffers of the
 * chunks' C·Bᵀ, C transposed and states, a long prompt in segments of whole chunks) and
 * the gated RMSNorm (gated_rmsnorm.wgsl).
 *
 * @module
 */

import type { GatedNormArgs, SsdArgs } from "../../backend.ts";
import type { GatedRmsnormParams, SsdParams } from "../../generated/wgsl_params.ts";
import { byteSize, type GpuBuffer } from "./memory.ts";
import { grid, Program } from "./program.ts";
import type { GpuRuntime } from "./runtime.ts";

/**
 * Tokens per chunk of ssd.wgsl's chunked scan by default, whatever the
 * model's chunk_size: chunks of 256 where a scan has that many
 * (sequence, head, chunk) workgroups in its products, else of 128. Long
 * scans run faster on the longer chunks (fewer chunk states, a shorter
 * carry); a prompt of 2048 tokens on 24 heads has 192 such workgroups, too
 * few to fill the GPU, and runs faster on the shorter ones (docs/mamba2.md,
 * on an H100).
 */
const SSD_LONG_CHUNK_GROUPS = 1024;

/** Tokens per chunk of a scan of `batch` sequences of `len` tokens on `heads` heads by default. */
export function defaultSsdChunk(batch: number, len: number, heads: number): 128 | 256 {
  return batch * heads * Math.ceil(len / 256) >= SSD_LONG_CHUNK_GROUPS ? 256 : 128;
}
/** Threads per workgroup of ssd.wgsl's carry pass (its WG). */
const SSD_WG = 256;
/** Channels per workgroup of ssd.wgsl's step: STEP_WG threads, STEP_LANES per channel. */
const SSD_STEP_CHANNELS = 256 / 16;
/** Default of `ssdStatesBytes`: within any device's binding size limit. */
const SSD_STATES_BYTES = 64 << 20;
/** The largest finite f32: Δ's clamp bounds go to the kernel as finite numbers. */
const F32_MAX = 3.4028234663852886e38;

/**
 * The entry points of ssd.wgsl (see its header) for chunks of `chunk` tokens,
 * the products reading xBC as vec4s where `vec4` (head_dim and d_state
 * multiples of 4).
 */
function ssdPrograms(chunk: number, vec4: boolean) {
  const ssd = (entry: string, bindings: number[]) =>
    new Program<SsdParams>("ssd", entry, bindings, { CHUNK: chunk, VEC4: vec4 ? 1 : 0 }, [
      "block8x8",
    ]);
  return {
    decay: ssd("decay", [0, 2, 3, 4, 10, 11]),
    chunkCb: ssd("chunk_cb", [0, 1, 12, 15]),
    chunkState: ssd("chunk_state", [0, 1, 9, 10, 11, 13]),
    carry: ssd("carry", [0, 6, 8, 9, 10]),
    output: ssd("output", [0, 1, 5, 7, 9, 10, 11, 12, 13, 15]),
    step: ssd("step", [0, 1, 2, 3, 4, 5, 6, 7, 8, 16]),
    stepVec4: ssd("step_vec4", [0, 1, 2, 3, 4, 5, 6, 7, 13, 14, 16]),
  };
}

const gatedNormProgram = new Program<GatedRmsnormParams>("gated_rmsnorm", "main", [0, 1, 2, 3, 4]);

/** How {@link SsdKernels} splits a prompt. */
export interface SsdOptions {
  /**
   * Tokens per chunk of a chunked SSD scan (Mamba-2): a multiple of 16 from
   * 16 to 256, whatever the model's `chunk_size`. By default 256 where a
   * scan has at least 1024 (sequence, head, chunk of 256) workgroups, else 128.
   */
  ssdChunkLen?: number;
  /**
   * Bytes of chunk states a chunked SSD scan keeps at once, and of each of
   * its other per-chunk scratch buffers (C·Bᵀ and C of every chunk); a longer
   * prompt runs in segments of whole chunks (default 64 MiB). Lets tests
   * exercise the segmenting at small sizes.
   */
  ssdStatesBytes?: number;
}

/** See the module documentation. */
export class SsdKernels {
  /** ssdPrograms(chunk, vec4) by `${chunk}:${vec4}`. */
  readonly #programs = new Map<string, ReturnType<typeof ssdPrograms>>();
  /** `ssdChunkLen`, if given. */
  readonly #chunk?: number;
  readonly #statesBytes: number;

  constructor(readonly rt: GpuRuntime, options: SsdOptions = {}) {
    const chunk = options.ssdChunkLen;
    if (
      chunk !== undefined &&
      !(Number.isInteger(chunk) && chunk % 16 === 0 && chunk >= 16 && chunk <= 256)
    ) {
      throw new RangeError(`ssdChunkLen must be a multiple of 16 from 16 to 256, got ${chunk}`);
    }
    this.#chunk = chunk;
    this.#statesBytes = options.ssdStatesBytes ?? SSD_STATES_BYTES;
  }

  /**
   * Backend.ssdScan; a decode step (len 1) with `gate` stores y times
   * silu(gate), the gate of the gated RMSNorm after it (see
   * LinearKernels.deferSsdStep).
   */
  ssdScan(args: SsdArgs<GpuBuffer>, gate: GpuBuffer | null = null): void {
    const { y, xBC, dt, dtBias, dtLimit, A, D, state, slots, len, batch } = args;
    const { heads, headDim, groups, dState } = args;
    const { rt } = this;
    const { absent, pool } = rt.memory;
    const buffers: Record<number, GPUBuffer> = {
      1: xBC.buffer,
      2: dt.buffer,
      3: dtBias.buffer,
      4: A.buffer,
      5: D?.buffer ?? absent,
      6: slots?.buffer ?? absent,
      7: y.buffer,
      8: state.buffer,
      16: gate?.buffer ?? absent,
    };
    const vec4 = headDim % 4 === 0 && dState % 4 === 0;
    // A decode step's kernels do not depend on the chunk length.
    const chunk = this.#chunk ?? (len === 1 ? 128 : defaultSsdChunk(batch, len, heads));
    const programs = this.#programsFor(chunk, vec4);
    const common = {
      batch,
      heads,
      headDim,
      groups,
      dState,
      flags: (D ? 1 : 0) | (slots ? 2 : 0) | (gate ? 4 : 0),
      dtMin: Math.max(dtLimit[0], -F32_MAX),
      dtMax: Math.min(dtLimit[1], F32_MAX),
    };
    if (len === 1) {
      const params = { ...common, len: 1, nChunks: 1, seqLen: 1, start: 0 };
      const groupsNeeded = Math.ceil((batch * heads * headDim) / SSD_STEP_CHANNELS);
      // Whole vec4s of states, of B and C in every row of xBC: the vec4 loads.
      if (vec4) {
        const views = { ...buffers, 13: xBC.buffer, 14: state.buffer };
        rt.run(programs.stepVec4, params, views, grid(groupsNeeded));
      } else {
        rt.run(programs.step, params, buffers, grid(groupsNeeded));
      }
      return;
    }
    rt.notCapturing("A chunked SSD scan");
    buffers[13] = xBC.buffer;
    // Segments of whole chunks whose scratch buffers each fit the budget (C·Bᵀ
    // outgrows the chunk states where groups·chunk is large next to
    // heads·head_dim·d_state / chunk); a chunk state's rows of head_dim are
    // padded to whole vec4s.
    const paddedHeadDim = Math.ceil(headDim / 4) * 4;
    const chunkStateFloats = batch * heads * paddedHeadDim * dState;
    const perChunkFloats = Math.max(
      chunkStateFloats,
      batch * heads * chunk, // cs and Δ
      batch * groups * chunk * Math.max(chunk, dState),
    );
    const chunksPerSegment = Math.max(1, Math.floor(this.#statesBytes / 4 / perChunkFloats));
    const segment = Math.min(len, chunksPerSegment * chunk);
    const segmentChunks = Math.ceil(segment / chunk);
    const scratch = [
      segmentChunks * chunkStateFloats,
      batch * heads * segment,
      batch * heads * segment,
      batch * segmentChunks * groups * chunk * chunk,
      batch * segmentChunks * groups * dState * chunk,
    ].map((floats) => pool.acquire(byteSize(floats), false));
    [buffers[9], buffers[10], buffers[11], buffers[12], buffers[15]] = scratch;
    const carryGroups = grid(Math.ceil(chunkStateFloats / SSD_WG));
    const tiles = (size: number, tile: number) => Math.ceil(size / tile);
    for (let start = 0; start < len; start += segment) {
      const segmentLen = Math.min(segment, len - start);
      const nChunks = Math.ceil(segmentLen / chunk);
      const params = { ...common, len: segmentLen, nChunks, seqLen: len, start };
      rt.run(programs.decay, params, buffers, [nChunks, heads, batch]);
      rt.run(programs.chunkCb, params, buffers, [nChunks, groups * tiles(chunk, 64) ** 2, batch]);
      const stateTiles = heads * tiles(dState, 128) * tiles(paddedHeadDim, 64);
      rt.run(programs.chunkState, params, buffers, [nChunks, stateTiles, batch]);
      rt.run(programs.carry, params, buffers, carryGroups);
      const outputTiles = heads * tiles(paddedHeadDim, 64) * tiles(chunk, 128);
      rt.run(programs.output, params, buffers, [nChunks, outputTiles, batch]);
    }
    for (const buffer of scratch) pool.release(buffer);
  }

  #programsFor(chunk: number, vec4: boolean): ReturnType<typeof ssdPrograms> {
    const key = `${chunk}:${vec4}`;
    let programs = this.#programs.get(key);
    if (!programs) {
      programs = ssdPrograms(chunk, vec4);
      this.#programs.set(key, programs);
    }
    return programs;
  }

  /** Backend.gatedRmsNorm. */
  gatedRmsNorm(args: GatedNormArgs<GpuBuffer>): void {
    const { out, x, gate, weight, rows, dim, groupSize, eps } = args;
    const { rt } = this;
    const [input, done] = rt.unaliased(x, rows * dim, out);
    const [gateInput, gateDone] = rt.unaliased(gate, rows * dim, out);
    rt.run(
      gatedNormProgram,
      { rows, dim, groupSize, eps },
      { 1: input, 2: gateInput, 3: weight.buffer, 4: out.buffer },
      grid(rows * (dim / groupSize)),
    );
    done();
    gateDone();
  }
}
