/**
 * The causal depthwise convolution (conv.wgsl): a few tokens per sequence
 * (a decode step) in one sequential pass per channel; longer runs as all
 * outputs in parallel, then the state update. And a batch of decode steps'
 * conv on in_proj's product still in partial sums (`step_on_parts`), which
 * the linear kernels fold in.
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
/** The most taps of a conv. */
export const CONV_MAX_KERNEL = 9;

const CONV_PROGRAMS = {
  sequential: new Program<ConvParams>("conv", "sequential", [0, 1, 2, 3, 4, 5, 6]),
  outputs: new Program<ConvParams>("conv", "outputs", [0, 1, 2, 3, 4, 5, 6]),
  updateState: new Program<ConvParams>("conv", "update_state", [0, 1, 5, 6]),
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
    hasInBias: 0,
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
  const outputs = perSequence(grid(Math.ceil((len * channels) / 256)));
  rt.run(CONV_PROGRAMS.outputs, params, all, outputs);
  if (kernel > 1) {
    rt.run(CONV_PROGRAMS.updateState, params, all, perSequence(grid(Math.ceil(channels / 256))));
  }
}

const convStepPrograms = new Map<number, Program<ConvParams>>();

/**
 * A decode step's conv (`args.len` 1) whose input x is the first half of
 * in_proj's `product` [rows, 2 · channels], summed here: its second half goes
 * to `z`, and x stays unwritten.
 */
export function convStepOnParts(
  rt: GpuRuntime,
  args: ConvArgs<GpuBuffer>,
  product: PartialProduct,
  z: GpuBuffer,
): void {
  const { out, weight, bias, state, slots, channels, kernel, batch = 1 } = args;
  let program = convStepPrograms.get(product.kParts);
  if (!program) {
    const bindings = [0, 2, 3, 4, 5, 6, 7, 8, 9];
    program = new Program("conv", "step_on_parts", bindings, { KPARTS: product.kParts });
    convStepPrograms.set(product.kParts, program);
  }
  const { absent } = rt.memory;
  const params = {
    len: 1,
    channels,
    kernel,
    hasBias: bias ? 1 : 0,
    hasSlots: slots ? 1 : 0,
    hasInBias: product.bias ? 1 : 0,
  };
  const buffers = {
    2: weight.buffer,
    3: bias?.buffer ?? absent,
    4: out.buffer,
    5: state.buffer,
    6: slots?.buffer ?? absent,
    7: product.partial.buffer,
    8: z.buffer,
    9: product.bias?.buffer ?? absent,
  };
  // Sequence b of the batch is workgroup z = b, as in causalConv.
  const [gx, gy] = grid(Math.ceil(channels / 256));
  rt.run(program, params, buffers, [gx, gy, batch]);
}
