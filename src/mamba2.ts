/**
 * The Mamba-2 block (Dao & Gu, "Transformers are SSMs", arXiv 2405.21060),
 * written against the {@link Backend} interface like the Mamba-1 block of
 * `model.ts`, whose embedding, final norm and head it shares.
 *
 * Glossary (code name — paper symbol — meaning), beyond `model.ts`'s:
 *
 * | code       | paper | meaning                                                     |
 * |------------|-------|-------------------------------------------------------------|
 * | `nHeads`   | H     | SSD heads; each has a scalar decay A[h] and its own Δ        |
 * | `headDim`  | P     | channels per head: dInner = H·P                              |
 * | `nGroups`  | G     | groups of heads sharing B and C (like grouped-query attention)|
 * | `dState`   | N     | state size per channel                                       |
 * | `convDim`  | —     | channels of the convolution: x, B and C, dInner + 2·G·N      |
 * | `dt`       | Δ     | [L, H] per-token, per-head step size, softplus(dt + dt_bias) |
 * | `A`        | A     | [H] negative: `-exp(A_log)`; exp(Δ·A) is a head's decay      |
 * | `x`        | X     | [L, H, P] the SSM's input                                    |
 * | `B`, `C`   | B, C  | [L, G, N] input and output projections of the state          |
 * | `D`        | D     | [H] skip connection                                          |
 * | `h`        | h     | [H, P, N] SSM state, carried in the state pool               |
 * | `z`        | —     | [L, dInner] gate of the norm                                 |
 *
 * One block, for the L tokens of a call (all buffers token-major):
 *
 * ```text
 * xn          = rmsNorm(hidden)                          [L, D]
 * z, xBC, dt  = in_proj(xn)                              [L, dInner], [L, convDim], [L, H]
 * xBC         = silu(causalConv(xBC) + convBias)         [L, convDim] = x [L, H, P] | B [L, G, N] | C [L, G, N]
 * y           = SSD(x, Δ, A, B, C) + D·x                 [L, H, P]  (Backend.ssdScan)
 *   where per token, head h of group g:  h = exp(Δ·A[h])·h + Δ·x[h] ⊗ B[g];  y[h] = h·C[g]
 * yn          = gatedRmsNorm(y, z)                       [L, dInner]: y·silu(z), normalised per group
 * hidden     += out_proj(yn)                             [L, D]
 * ```
 *
 * The gated RMSNorm follows mamba_ssm (`RMSNormGated` with `group_size =
 * dInner / G`): each of the G groups of dInner / G channels is normalised on
 * its own. transformers 5.17's `MambaRMSNormGated` normalises all of dInner at
 * once; the two agree only for G = 1 (Codestral Mamba has G = 8), and models
 * were trained with mamba_ssm's.
 *
 * @module
 */

import type { Backend } from "./backend.ts";
import { convChannels, type MambaConfig } from "./config.ts";

/**
 * One Mamba-2 block's weights. Shapes use the glossary above. The matrices
 * that only `linear` reads have type `M` (by default `T`): the loader may
 * hand them over as quantized blocks or 16-bit values.
 */
export interface Mamba2LayerWeights<T, M = T> {
  /** RMSNorm weight before the mixer [D]. */
  norm: T;
  /** in_proj weight [dInner + convDim + H, D]: rows producing z, then x, B, C, then dt. */
  inProj: M;
  /** in_proj bias, when `projBias`. */
  inProjBias: T | null;
  /** Depthwise conv weights [convDim, dConv]. */
  convWeight: T;
  /** Conv bias [convDim], when `convBias`. */
  convBias: T | null;
  /** Added to dt before softplus [H]. */
  dtBias: T;
  /** A = -exp(A_log) [H]. */
  A: T;
  /** Skip connection D [H]. */
  D: T;
  /** The gated RMSNorm's weight [dInner]. */
  gatedNorm: T;
  /** out_proj weight [D, dInner]. */
  outProj: M;
  /** out_proj bias [D], when `projBias`. */
  outProjBias: T | null;
}

/** Whether a layer's weights are a Mamba-2 block's. */
export function isMamba2Layer<T, M = T>(layer: object): layer is Mamba2LayerWeights<T, M> {
  return "gatedNorm" in layer;
}

/** Reads a checked tensor: its name, the shape the config implies and shapes also accepted. */
export type TensorReader = (
  name: string,
  shape: number[],
  alternatives?: number[][],
) => Float32Array;

/** Reads an optional tensor, present exactly when `wanted` (the config flag `flagName`). */
export type OptionalTensorReader = (
  name: string,
  shape: number[],
  wanted: boolean,
  flagName: string,
) => Float32Array | null;

/**
 * Reads and checks Mamba-2 block `prefix` (`backbone.layers.3.`): the same
 * tensor names in transformers' and state-spaces' checkpoints; llama.cpp's
 * GGUF files (named as transformers' by the loader) hold A itself as `A`
 * rather than `A_log`, A and D as [H, 1], and the gated norm's weight as [G,
 * dInner / G]. `matrix` reads in_proj and out_proj.
 */
export function readMamba2Layer<M>(
  prefix: string,
  config: MambaConfig,
  tensor: TensorReader,
  optional: OptionalTensorReader,
  matrix: (name: string, shape: [number, number]) => M,
  has: (name: string) => boolean,
): Mamba2LayerWeights<Float32Array, M> {
  const { dModel, dInner, dConv, mamba2 } = config;
  const heads = mamba2!.nHeads;
  const groups = mamba2!.nGroups;
  const convDim = convChannels(config);
  const inProjRows = dInner + convDim + heads;
  const p = `${prefix}mixer.`;
  const A = has(`${p}A`)
    ? tensor(`${p}A`, [heads], [[heads, 1]])
    : tensor(`${p}A_log`, [heads]).map((v) => -Math.exp(v));
  return {
    norm: tensor(`${prefix}norm.weight`, [dModel]),
    inProj: matrix(`${p}in_proj.weight`, [inProjRows, dModel]),
    inProjBias: optional(`${p}in_proj.bias`, [inProjRows], config.projBias, "use_bias"),
    // PyTorch stores the depthwise kernel as [convDim, 1, dConv].
    convWeight: tensor(`${p}conv1d.weight`, [convDim, 1, dConv], [[convDim, dConv]]),
    convBias: optional(`${p}conv1d.bias`, [convDim], config.convBias, "use_conv_bias"),
    dtBias: tensor(`${p}dt_bias`, [heads]),
    A,
    D: tensor(`${p}D`, [heads], [[heads, 1]]),
    gatedNorm: tensor(`${p}norm.weight`, [dInner], [[groups, dInner / groups]]),
    outProj: matrix(`${p}out_proj.weight`, [dModel, dInner]),
    outProjBias: optional(`${p}out_proj.bias`, [dModel], config.projBias, "use_bias"),
  };
}

/** The operations of one Mamba-2 block, in the order the model issues them. */
export const MAMBA2_OPS = ["norm", "in_proj", "conv", "ssd", "gated_norm", "out_proj"] as const;
/** One of {@link MAMBA2_OPS}. */
export type Mamba2Op = typeof MAMBA2_OPS[number];

/** The activations a Mamba-2 block reads and writes, token-major, L rows each. */
export interface Mamba2Buffers<Buf> {
  /** [L, D] residual stream: read by the norm, added to by out_proj. */
  hidden: Buf;
  /** [L, D] the normalised residual stream: in_proj's input. */
  normed: Buf;
  /** [L, dInner] in_proj's gate. */
  z: Buf;
  /** [L, convDim] in_proj's x, B and C: the convolution's input. */
  xBC: Buf;
  /** [L, H] in_proj's raw Δ. */
  dt: Buf;
  /** [L, convDim] the convolution's output: x, B and C of the SSD. */
  xBCConv: Buf;
  /** [L, dInner] the SSD's output. */
  y: Buf;
  /** [L, dInner] the gated norm's output, out_proj's input. */
  yNorm: Buf;
}

/** Floats per row of each of {@link allocMamba2Buffers}' buffers. */
export function mamba2RowWidths(config: MambaConfig): Record<string, number> {
  const convDim = convChannels(config);
  const { dInner } = config;
  return {
    z: dInner,
    xBC: convDim,
    dt: config.mamba2!.nHeads,
    xBCConv: convDim,
    y: dInner,
    yNorm: dInner,
  };
}

/** The Mamba-2 buffers of `rows` rows but `hidden` and `normed` (the model's), zeroed. */
export function allocMamba2Buffers<Buf>(
  be: Backend<Buf>,
  config: MambaConfig,
  rows: number,
): Omit<Mamba2Buffers<Buf>, "hidden" | "normed"> {
  const width = mamba2RowWidths(config);
  return {
    z: be.zeros(rows * width.z),
    xBC: be.scratch(rows * width.xBC), // only the conv reads it
    dt: be.zeros(rows * width.dt),
    xBCConv: be.zeros(rows * width.xBCConv),
    y: be.scratch(rows * width.y), // only the gated norm reads it
    yNorm: be.scratch(rows * width.yNorm), // only out_proj reads it
  };
}

/**
 * The sequences a block runs over: `batch` of `len` tokens each, carried in
 * conv [rows, dConv - 1, convDim] and ssm [rows, H, P, N]: sequence b in row
 * `slots[b]`, or in row b without slots.
 */
export interface Mamba2Sequences<Buf> {
  conv: Buf;
  ssm: Buf;
  slots?: Buf;
  len: number;
  batch: number;
}

/** Throws unless `backend` provides every operation a Mamba-2 block issues. */
export function checkMamba2Support(backend: Backend<unknown>): void {
  for (const op of ["ssdScan", "gatedRmsNorm"] as const) {
    if (!backend.supports(op)) {
      throw new Error(
        `The ${backend.name} backend cannot run Mamba-2 yet: it lacks the ${op} operation`,
      );
    }
  }
}

/**
 * Issues operation `op` of a Mamba-2 block with weights `w`; see the module
 * documentation for the math. The backend must pass {@link checkMamba2Support}.
 */
export function mamba2BlockOp<Buf>(
  be: Backend<Buf>,
  config: MambaConfig,
  op: Mamba2Op,
  w: Mamba2LayerWeights<Buf>,
  s: Mamba2Buffers<Buf>,
  { conv, ssm, slots, len, batch }: Mamba2Sequences<Buf>,
): void {
  const { dModel, dInner, dState, dConv, eps } = config;
  const { nHeads, headDim, nGroups, chunkSize, dtLimit } = config.mamba2!;
  const convDim = convChannels(config);
  const L = len * batch;
  switch (op) {
    case "norm": // xn = rmsNorm(hidden)
      return be.rmsNorm({ out: s.normed, x: s.hidden, weight: w.norm, rows: L, dim: dModel, eps });
    case "in_proj": // z, xBC, dt = in_proj(xn)
      return be.linearSplit({
        outs: [s.z, s.xBC, s.dt],
        widths: [dInner, convDim, nHeads],
        x: s.normed,
        weight: w.inProj,
        bias: w.inProjBias,
        rows: L,
        inDim: dModel,
      });
    case "conv": // xBC = silu(causalConv(xBC) + convBias)
      return be.causalConv({
        out: s.xBCConv,
        x: s.xBC,
        weight: w.convWeight,
        bias: w.convBias,
        state: conv,
        slots,
        len,
        channels: convDim,
        kernel: dConv,
        batch,
      });
    case "ssd": // y = SSD(x, Δ, A, B, C) + D·x
      return be.ssdScan!({
        y: s.y,
        xBC: s.xBCConv,
        dt: s.dt,
        dtBias: w.dtBias,
        dtLimit,
        A: w.A,
        D: w.D,
        state: ssm,
        slots,
        len,
        batch,
        heads: nHeads,
        headDim,
        groups: nGroups,
        dState,
        chunkSize,
      });
    case "gated_norm": // yn = rmsNorm per group(y · silu(z)) · weight
      return be.gatedRmsNorm!({
        out: s.yNorm,
        x: s.y,
        gate: s.z,
        weight: w.gatedNorm,
        rows: L,
        dim: dInner,
        groupSize: dInner / nGroups,
        eps,
      });
    case "out_proj": // hidden += out_proj(yn)
      return be.linear({
        out: s.hidden,
        x: s.yNorm,
        weight: w.outProj,
        bias: w.outProjBias,
        rows: L,
        inDim: dInner,
        outDim: dModel,
        accumulate: true,
      });
  }
}
