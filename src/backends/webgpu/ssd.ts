/**
 * Mamba-2's operations: the SSD scan (ssd.wgsl; a decode step as the
 * recurrence, a prompt in chunks in three passes over scratch buffers of the
 * chunks' states, a long prompt in segments of whole chunks) and the gated
 * RMSNorm (gated_rmsnorm.wgsl).
 *
 * @module
 */

import type { GatedNormArgs, SsdArgs } from "../../backend.ts";
import type { GatedRmsnormParams, SsdParams } from "../../generated/wgsl_params.ts";
import { byteSize, type GpuBuffer } from "./memory.ts";
import { grid, Program } from "./program.ts";
import type { GpuRuntime } from "./runtime.ts";

/** Tokens per chunk of ssd.wgsl's chunked scan (its CHUNK), whatever the model's chunk_size. */
const SSD_CHUNK = 32;
/** Threads per workgroup of ssd.wgsl's carry pass (its WG). */
const SSD_WG = 256;
/** Channels per workgroup of ssd.wgsl's step: STEP_WG threads, STEP_LANES per channel. */
const SSD_STEP_CHANNELS = 256 / 16;
/** Default of `ssdStatesBytes`: within any device's binding size limit. */
const SSD_STATES_BYTES = 64 << 20;
/** The largest finite f32: Δ's clamp bounds go to the kernel as finite numbers. */
const F32_MAX = 3.4028234663852886e38;

/** The entry points of ssd.wgsl (see its header) and gated_rmsnorm.wgsl. */
const SSD_PROGRAMS = {
  chunkState: new Program<SsdParams>("ssd", "chunk_state", [0, 1, 2, 3, 4, 9, 10, 11]),
  carry: new Program<SsdParams>("ssd", "carry", [0, 6, 8, 9, 10]),
  output: new Program<SsdParams>("ssd", "output", [0, 1, 5, 7, 9, 10, 11]),
  step: new Program<SsdParams>("ssd", "step", [0, 1, 2, 3, 4, 5, 6, 7, 8]),
  gatedNorm: new Program<GatedRmsnormParams>("gated_rmsnorm", "main", [0, 1, 2, 3, 4]),
};

/** See the module documentation. */
export class SsdKernels {
  constructor(
    readonly rt: GpuRuntime,
    /** Bytes of chunk states a chunked scan keeps at once (default 64 MiB). */
    readonly statesBytes = SSD_STATES_BYTES,
  ) {}

  /** Backend.ssdScan. */
  ssdScan(args: SsdArgs<GpuBuffer>): void {
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
    };
    const common = {
      batch,
      heads,
      headDim,
      groups,
      dState,
      flags: (D ? 1 : 0) | (slots ? 2 : 0),
      dtMin: Math.max(dtLimit[0], -F32_MAX),
      dtMax: Math.min(dtLimit[1], F32_MAX),
    };
    if (len === 1) {
      const params = { ...common, len: 1, nChunks: 1, seqLen: 1, start: 0 };
      const groupsNeeded = Math.ceil((batch * heads * headDim) / SSD_STEP_CHANNELS);
      rt.run(SSD_PROGRAMS.step, params, buffers, grid(groupsNeeded));
      return;
    }
    rt.notCapturing("A chunked SSD scan");
    // Segments of whole chunks whose chunk states fit the budget.
    const chunkStateFloats = batch * heads * headDim * dState;
    const chunksPerSegment = Math.max(1, Math.floor(this.statesBytes / 4 / chunkStateFloats));
    const segment = Math.min(len, chunksPerSegment * SSD_CHUNK);
    const scratch = [
      Math.ceil(segment / SSD_CHUNK) * chunkStateFloats,
      batch * heads * segment,
      batch * heads * segment,
    ].map((floats) => pool.acquire(byteSize(floats), false));
    [buffers[9], buffers[10], buffers[11]] = scratch;
    const carryGroups = grid(Math.ceil(chunkStateFloats / SSD_WG));
    for (let start = 0; start < len; start += segment) {
      const segmentLen = Math.min(segment, len - start);
      const nChunks = Math.ceil(segmentLen / SSD_CHUNK);
      const params = { ...common, len: segmentLen, nChunks, seqLen: len, start };
      const perChunk: [number, number, number] = [nChunks, heads, batch];
      rt.run(SSD_PROGRAMS.chunkState, params, buffers, perChunk);
      rt.run(SSD_PROGRAMS.carry, params, buffers, carryGroups);
      rt.run(SSD_PROGRAMS.output, params, buffers, perChunk);
    }
    for (const buffer of scratch) pool.release(buffer);
  }

  /** Backend.gatedRmsNorm. */
  gatedRmsNorm(args: GatedNormArgs<GpuBuffer>): void {
    const { out, x, gate, weight, rows, dim, groupSize, eps } = args;
    const { rt } = this;
    const [input, done] = rt.unaliased(x, rows * dim, out);
    const [gateInput, gateDone] = rt.unaliased(gate, rows * dim, out);
    rt.run(
      SSD_PROGRAMS.gatedNorm,
      { rows, dim, groupSize, eps },
      { 1: input, 2: gateInput, 3: weight.buffer, 4: out.buffer },
      grid(rows * (dim / groupSize)),
    );
    done();
    gateDone();
  }
}
