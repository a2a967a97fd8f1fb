/**
 * The causal depthwise convolution (conv.wgsl): a few tokens per sequence
 * (a decode step) in one sequential pass per channel; longer runs as all
 * outputs in parallel, then the state update, or in one pass of vec4s for
 * Mamba's kernel of 4 taps on channels in whole vec4s. And a batch of decode
 * steps' conv on in_proj's product still in partial sums (`step_on_parts`),
 * which the linear kernels fold in.
 *
 * @module
 */

import type { ConvArgs } from "../../backend.ts";
import type { ConvParams } from "../../generated/wgsl_params.ts";
import type { GpuBuffer } from "./memory.ts";
import { grid, Program } from "./program.ts";
import type { PartialProduct } from "./rows.ts";
import type { GpuRuntime } from "./runtime.ts";

const CONV_SEQUENTIAL_MAX_LEN = 4;
/** Tokens per thread of `outputs_quads` (conv.wgsl's QUAD_TOKENS). */
const CONV_QUAD_TOKENS = 8;
/** The most taps of a conv. */
export const CONV_MAX_KERNEL = 9;

/** conv.wgsl's parameters that only `step_on_parts` reads. */
const NOT_ON_PARTS = {
  hasInBias: 0,
  width: 0,
  xColumn: 0,
  zColumn: 0,
  zWidth: 0,
  wColumn: 0,
  wWidth: 0,
};

const CONV_PROGRAMS = {
  sequential: new Program<ConvParams>("conv", "sequential", [0, 1, 2, 3, 4, 5, 6]),
  outputs: new Program<ConvParams>("conv", "outputs", [0, 1, 2, 3, 4, 5, 6]),
  updateState: new Program<ConvParams>("conv", "update_state", [0, 1, 5, 6]),
  outputsQuads: new Program<ConvParams>("conv", "outputs_quads", [0, 3, 6, 11, 12, 13, 14]),
};

/** Backend.causalConv on `rt`. */
export function causalConv(
  rt: GpuRuntime,
  { out, x, weight, bias, state, slots, len, channels, kernel, batch = 1 }: ConvArgs<GpuBuffer>,
): void {
  if (kernel < 1 || kernel > CONV_MAX_KERNEL) {
    throw new RangeError(
      `causalConv supports kernels of 1 to ${CONV_MAX_KERNEL} taps, got ${kernel}`,
    );
  }
  const params = {
    len,
    channels,
    kernel,
    hasBias: bias ? 1 : 0,
    hasSlots: slots ? 1 : 0,
    ...NOT_ON_PARTS,
  };
  // Sequence b of a batch is workgroup z = b.
  const perSequence = ([gx, gy]: number[]): [number, number, number] => [gx, gy, batch];
  const all = {
    1: x.buffer,
    2: weight.buffer,
    3: bias?.buffer ?? rt.memory.absent,
    4: out.buffer,
    5: state.buffer,
    6: slots?.buffer ?? rt.memory.absent,
  };
  if (len <= CONV_SEQUENTIAL_MAX_LEN) {
    rt.run(CONV_PROGRAMS.sequential, params, all, perSequence(grid(Math.ceil(channels / 256))));
    return;
  }
  if (kernel === 4 && channels % 4 === 0) {
    // Mamba's kernel on channels in whole vec4s: one dispatch, each input loaded once.
    const threads = (channels / 4) * Math.ceil(len / CONV_QUAD_TOKENS);
    const quads = {
      3: all[3],
      6: all[6],
      11: x.buffer,
      12: weight.buffer,
      13: out.buffer,
      14: state.buffer,
    };
    rt.run(CONV_PROGRAMS.outputsQuads, params, quads, perSequence(grid(Math.ceil(threads / 256))));
    return;
  }
  const outputs = perSequence(grid(Math.ceil((len * channels) / 256)));
  rt.run(CONV_PROGRAMS.outputs, params, all, outputs);
  if (kernel > 1) {
    rt.run(CONV_PROGRAMS.updateState, params, all, perSequence(grid(Math.ceil(channels / 256))));
  }
}

const convStepPrograms = new Map<number, Program<ConvParams>>();

/** An output of in_proj's product that the conv step stores added up: its buffer and columns. */
export interface ProductColumns {
  out: GpuBuffer;
  column: number;
  width: number;
}

/**
 * A decode step's conv (`args.len` 1) whose input x is the columns from
 * `xColumn` of in_proj's `product` [rows, width], summed here, as are the
 * columns of the product's other outputs (`others`, at most two, each at
 * most `args.channels` wide), which are stored; x stays unwritten.
 */
export function convStepOnParts(
  rt: GpuRuntime,
  args: ConvArgs<GpuBuffer>,
  product: PartialProduct,
  { width, xColumn, others }: { width: number; xColumn: number; others: ProductColumns[] },
): void {
  const { out, weight, bias, state, slots, channels, kernel, batch = 1 } = args;
  if (others.length > 2 || others.some((other) => other.width > channels)) {
    throw new RangeError(
      `The conv step stores at most two other outputs of in_proj, none wider than its ${channels} channels`,
    );
  }
  let program = convStepPrograms.get(product.kParts);
  if (!program) {
    const bindings = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    program = new Program("conv", "step_on_parts", bindings, { KPARTS: product.kParts });
    convStepPrograms.set(product.kParts, program);
  }
  const { absent, unused } = rt.memory;
  const [z, w] = others;
  const params = {
    len: 1,
    channels,
    kernel,
    hasBias: bias ? 1 : 0,
    hasSlots: slots ? 1 : 0,
    hasInBias: product.bias ? 1 : 0,
    width,
    xColumn,
    zColumn: z?.column ?? 0,
    zWidth: z?.width ?? 0,
    wColumn: w?.column ?? 0,
    wWidth: w?.width ?? 0,
  };
  const buffers = {
    2: weight.buffer,
    3: bias?.buffer ?? absent,
    4: out.buffer,
    5: state.buffer,
    6: slots?.buffer ?? absent,
    7: product.partial.buffer,
    8: z?.out.buffer ?? unused[0],
    9: product.bias?.buffer ?? absent,
    10: w?.out.buffer ?? unused[1],
  };
  // Sequence b of the batch is workgroup z = b, as in causalConv.
  const [gx, gy] = grid(Math.ceil(channels / 256));
  rt.run(program, params, buffers, [gx, gy, batch]);
}
