/**
 * Row-wise kernels: gathers of rows from a table in any weight format
 * (embed.wgsl for host ids, copy_rows.wgsl between buffers), RMSNorm
 * (rmsnorm.wgsl, also of a residual that a matmul split over K adds to
 * first) and the residual add (add.wgsl).
 *
 * @module
 */

import type { AddArgs, CopyRowsArgs, EmbedArgs, RmsNormArgs } from "../../backend.ts";
import type {
  AddParams,
  CopyRowsParams,
  EmbedParams,
  RmsnormParams,
} from "../../generated/wgsl_params.ts";
import {
  bufferSource,
  byteSize,
  type GpuBuffer,
  isBlockFormat,
  type WeightFormat,
} from "./memory.ts";
import { grid, Program } from "./program.ts";
import type { GpuRuntime } from "./runtime.ts";

/**
 * Threads per row of rmsnorm.wgsl's entry points on rows of whole vec4s: each
 * holds two quads at most of a row up to 2048 wide (mamba-130m's 768 and
 * d_inner 1536), so that the row waits on memory once.
 */
const NORM_QUADS_WG = 256;
const rmsNormPrograms = {
  floats: new Program<RmsnormParams>("rmsnorm", "main", [0, 1, 2, 3]),
  quads: new Program<RmsnormParams>("rmsnorm", "main_quads", [0, 7, 8, 9], {
    WG: NORM_QUADS_WG,
  }),
};
const addProgram = new Program<AddParams>("add", "main", [0, 1, 2]);
const residualNormPrograms = new Map<string, Program<RmsnormParams>>();

/**
 * The gathers for a source in each format: they read it through the format's
 * weight prelude, as the linear kernels do.
 */
const embedPrograms = new Map<WeightFormat, Program<EmbedParams>>();
const copyRowsPrograms = new Map<WeightFormat, Program<CopyRowsParams>>();

/** The preludes that read a table stored in `format`. */
function weightPreludes(format: WeightFormat): string[] {
  return [...(isBlockFormat(format) ? ["blocks"] : []), `weight_${format}`];
}

function embedProgram(format: WeightFormat): Program<EmbedParams> {
  let program = embedPrograms.get(format);
  if (!program) {
    program = new Program("embed", "main", [0, 1, 2, 3], {}, weightPreludes(format));
    embedPrograms.set(format, program);
  }
  return program;
}

function copyRowsProgram(format: WeightFormat): Program<CopyRowsParams> {
  let program = copyRowsPrograms.get(format);
  if (!program) {
    program = new Program("copy_rows", "main", [0, 1, 2, 3, 4], {}, weightPreludes(format));
    copyRowsPrograms.set(format, program);
  }
  return program;
}

/** Backend.embed on `rt`: rows `ids` of `table` (each part of a split table its own). */
export function embed(rt: GpuRuntime, { out, table, ids, dim }: EmbedArgs<GpuBuffer>): void {
  if (ids.length === 0) return;
  rt.notCapturing("An embedding of host ids");
  const { pool } = rt.memory;
  for (const { part, firstRow } of table.pieces()) {
    // Each part looks up its own rows; the others are marked SKIP (all ones).
    const rows = table.parts.length === 0 ? table.length / dim : table.rowsPerPart;
    const local = ids.map((id) => id >= firstRow && id < firstRow + rows ? id - firstRow : -1);
    if (table.parts.length > 0 && local.every((id) => id < 0)) continue;
    const idBuffer = pool.acquire(byteSize(ids.length), true);
    rt.device.queue.writeBuffer(idBuffer, 0, bufferSource(local));
    rt.run(
      embedProgram(table.format),
      { dim, count: ids.length },
      { 1: idBuffer, 2: part.buffer, 3: out.buffer },
      grid(Math.ceil((ids.length * dim) / 256)),
    );
    pool.release(idBuffer);
  }
}

/** Backend.copyRows on `rt`. */
export function copyRows(rt: GpuRuntime, args: CopyRowsArgs<GpuBuffer>): void {
  const { dst, src, width, count, srcRows, dstRows, dstOffset = 0, srcOffset = 0 } = args;
  if (count === 0 || width === 0) return;
  if (src.parts.length === 0 && dst.buffer === src.buffer) {
    throw new RangeError("copyRows cannot copy within one buffer");
  }
  if (srcOffset !== 0 && src.parts.length > 0) {
    throw new RangeError("copyRows takes no offset into a matrix split over buffers");
  }
  const { absent } = rt.memory;
  const flags = (srcRows ? 1 : 0) | (dstRows ? 2 : 0);
  const dstCount = Math.floor((dst.length - dstOffset) / width);
  for (const { part, firstRow } of src.pieces()) {
    const partRows = Math.floor((part.length - (src.parts.length > 0 ? 0 : srcOffset)) / width);
    const params = {
      width,
      count,
      dstOffset,
      srcOffset,
      srcIndexOffset: srcRows?.offset ?? 0,
      dstIndexOffset: dstRows?.offset ?? 0,
      flags,
      srcRowStart: firstRow,
      srcRows: partRows,
      dstRows: dstCount,
    };
    const buffers = {
      1: dst.buffer,
      2: part.buffer,
      3: srcRows?.buf.buffer ?? absent,
      4: dstRows?.buf.buffer ?? absent,
    };
    rt.run(copyRowsProgram(src.format), params, buffers, grid(Math.ceil((count * width) / 256)));
  }
}

/** Backend.rmsNorm on `rt`. */
export function rmsNorm(rt: GpuRuntime, args: RmsNormArgs<GpuBuffer>): void {
  const { out, x, weight, rows, dim, eps } = args;
  const [input, done] = rt.unaliased(x, rows * dim, out);
  const params = { rows, dim, eps, hasBias: 0, accumulate: 0 };
  if (dim % 4 === 0) {
    const buffers = { 7: input, 8: weight.buffer, 9: out.buffer };
    rt.run(rmsNormPrograms.quads, params, buffers, grid(rows));
  } else {
    const buffers = { 1: input, 2: weight.buffer, 3: out.buffer };
    rt.run(rmsNormPrograms.floats, params, buffers, grid(rows));
  }
  done();
}

/** A product still in the partial sums of a matmul split over K, and its bias. */
export interface PartialProduct {
  /** [kParts, rows, dim]. */
  partial: GpuBuffer;
  kParts: number;
  bias: GpuBuffer | null;
}

/**
 * Backend.rmsNorm on `rt` of x after `product` is added to it (`accumulate`)
 * or stored in it: x gets the sum, `out` its norm.
 */
export function residualNorm(
  rt: GpuRuntime,
  { out, x, weight, rows, dim, eps }: RmsNormArgs<GpuBuffer>,
  { partial, kParts, bias }: PartialProduct,
  accumulate: boolean,
): void {
  const quads = dim % 4 === 0;
  const key = `${kParts}${quads ? " quads" : ""}`;
  let program = residualNormPrograms.get(key);
  if (!program) {
    program = quads
      ? new Program("rmsnorm", "residual_quads", [0, 8, 9, 10, 11, 12], {
        KPARTS: kParts,
        WG: NORM_QUADS_WG,
      })
      : new Program("rmsnorm", "residual", [0, 2, 3, 4, 5, 6], { KPARTS: kParts });
    residualNormPrograms.set(key, program);
  }
  const params = { rows, dim, eps, hasBias: bias ? 1 : 0, accumulate: accumulate ? 1 : 0 };
  const biasBuffer = bias?.buffer ?? rt.memory.absent;
  const buffers: Record<number, GPUBuffer> = quads
    ? { 8: weight.buffer, 9: out.buffer, 10: x.buffer, 11: partial.buffer, 12: biasBuffer }
    : { 2: weight.buffer, 3: out.buffer, 4: x.buffer, 5: partial.buffer, 6: biasBuffer };
  rt.run(program, params, buffers, grid(rows));
}

/** Backend.addInPlace on `rt`. */
export function addInPlace(rt: GpuRuntime, { acc, x, length }: AddArgs<GpuBuffer>): void {
  const [input, done] = rt.unaliased(x, length, acc);
  rt.run(addProgram, { n: length }, { 1: input, 2: acc.buffer }, grid(Math.ceil(length / 256)));
  done();
}
