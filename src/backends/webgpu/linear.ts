/**
 * The linear kernels (matmul.wgsl, gemv.wgsl, gemv4.wgsl, matmul_sum.wgsl,
 * project_sum.wgsl): which kernel and tiles a product of `rows` rows takes,
 * its grid and bindings, and what a decode step's GEMV folds in: the RMSNorm
 * of its input, the conv step of its first output and the x_proj of the
 * conv's outputs, whose shares the scan step adds up itself
 * ({@link LinearKernels.takeShares}) or {@link LinearKernels.settle} adds
 * up for any other reader; a decode step's SSD step, held back so that
 * the gated RMSNorm of one group after it folds its gate into it and its
 * norm into the GEMV that reads it (Mamba-2's out_proj;
 * {@link LinearKernels.deferSsdStep}); and a product that a decode step's
 * scan folds in (dt_proj, {@link LinearKernels.product}). A matmul split over
 * K leaves its partial sums for the next kernel to add up where that kernel
 * can: a norm of its output (out_proj's residual, then the next layer's norm),
 * or a decode step's conv of one of its outputs (in_proj's x or xBC).
 *
 * @module
 */

import type {
  ConvArgs,
  GatedNormArgs,
  LinearArgs,
  LinearSplitArgs,
  RmsNormArgs,
} from "../../backend.ts";
import type { LinearIoParams, ProjectSumParams } from "../../generated/wgsl_params.ts";
import { type GpuBuffer, isBlockFormat, type WeightFormat } from "./memory.ts";
import { CONV_MAX_KERNEL, convStepOnParts } from "./conv.ts";
import { grid, Program } from "./program.ts";
import { type PartialProduct, residualNorm, rmsNorm } from "./rows.ts";
import type { GpuRuntime } from "./runtime.ts";

/** Rows up to which a product is a GEMV (gemv.wgsl for inputs whose width is not a multiple of 4). */
const GEMV_MAX_ROWS = 4;
// gemv4 takes up to this many rows in groups of 4, reading the weight once per
// group (mostly from L2 after the first): a small batch of decode steps. Past
// it the tiled matmul, split over K where its tiles are few, wins: a 130m-shaped
// step of 64 rows ran faster on it than on gemv4, one of 32 rows slower
// (docs/performance.md).
const GEMV4_MAX_ROWS = 32;
const LINEAR_BINDINGS = [0, 1, 2, 3, 4, 5, 6];
/** out, out2, out3 of linear_io.wgsl. */
export const LINEAR_MAX_OUTPUTS = 3;
/**
 * Widest output that the split-K `skinny` entry point of matmul.wgsl takes: up
 * to 128 columns (x_proj's 16, 48, 80) it beat the tiled kernel on an H100,
 * whose few tiles each run a long k loop (docs/performance.md).
 */
const SKINNY_MAX_OUT = 128;
/** Threads that the skinny matmul aims for: a workgroup of 256 per SM of an H100, about. */
const SKINNY_THREADS = 256 * 132;
/**
 * 128×64 tiles of the tiled matmul (two per SM of an H200's 132, about) below
 * which it takes 64×64 tiles instead; MATMUL_SPLIT_WAVE says how far those
 * split K.
 */
const MATMUL_MIN_TILES = 256;
/**
 * Workgroups of 64×64 tiles that an H100 or H200 runs at once, about three per
 * SM. A matmul split over K takes as many parts as fill this one wave: a
 * second wave costs about as much as the first, so fewer, longer parts are
 * slower and more parts are no faster (in_proj at 64 rows, out_proj at 256;
 * docs/performance.md).
 */
const MATMUL_SPLIT_WAVE = 384;
/** The fewest slices of 16 k that a part of 64×64 tiles split over K takes. */
const SPLIT_MIN_PART_SLICES = 6;
/**
 * Outputs from which a batch of up to 32 decode steps takes the tiled matmul
 * rather than gemv4 (lm_head's 50,280; not in_proj's 3,072, whose gemv4 folds
 * in the norm, the conv and x_proj).
 */
const WIDE_MATMUL_OUT = 16384;
/**
 * A batch of 33 to 64 decode steps through a narrow matrix with a long K
 * (out_proj, 1536 → 768) takes skinny with 16 lanes, up to these outputs and
 * from these inputs: 64×64 tiles would be a dozen, split over K a dozen
 * times and summed after, where skinny's 4×4 blocks read the weight once per
 * 4 rows, mostly from L2; 64 streams ran faster with it on an H100
 * (docs/performance.md).
 */
const SKINNY_BATCH_MAX_OUT = 1024;
const SKINNY_BATCH_MIN_IN = 1024;
/** The fewest slices of 8 k that each half of a 128×64 tile split over K takes. */
const MATMUL_MIN_PART_SLICES = 16;
/** The widest projection (Σ widths) that gemv4 folds in. */
const MAX_FUSED_PROJECTION = 256;

/** linear_io.wgsl's `projFormat` of each format of an x_proj folded into gemv4 (gemv4_shares.wgsl). */
const PROJ_FORMATS: Readonly<Record<WeightFormat, number>> = {
  f32: 0,
  f16: 1,
  bf16: 2,
  q8_0: 3,
  q4_0: 4,
  q4_k: 5,
};

const linearPrograms = new Map<string, Program<LinearIoParams>>();
const matmulSumPrograms = new Map<number, Program<LinearIoParams>>();
const projectSumProgram = new Program<ProjectSumParams>("project_sum", "main", [0, 1, 4, 5, 6]);

/** The pass that adds up the partial sums of a matmul split over `kParts` workgroups. */
function matmulSumProgram(kParts: number): Program<LinearIoParams> {
  let program = matmulSumPrograms.get(kParts);
  if (!program) {
    program = new Program("matmul_sum", "main", [0, 3, 4, 5, 6, 14], { KPARTS: kParts }, [
      "linear_io",
    ]);
    matmulSumPrograms.set(kParts, program);
  }
  return program;
}

/**
 * Threads that share one output of gemv4, for `units` (outputs × groups of
 * rows) in all. Measured on the H100 at mamba-130m's shapes: many units
 * (lm_head; in_proj for 16 rows) run best on 8 lanes, which leave more outputs
 * to each workgroup and shorter reductions, few on more lanes, which split
 * each long row over more threads: out_proj's 768 at one row on 64, x_proj's 80
 * on 256 (a workgroup per output).
 */
function gemvLanes(units: number): number {
  return units >= 8192 ? 8 : units <= 256 ? 256 : units <= 1024 ? 64 : 32;
}

/**
 * Threads per 4×4 block of out in skinny, 16 to 128: enough that the blocks
 * fill about SKINNY_THREADS threads. x_proj at 64 rows is 320 blocks, which 32
 * lanes put on 40 workgroups for an H100's 132 SMs.
 */
function skinnyLanes(blocks: number): number {
  let lanes = 16;
  while (lanes < 128 && blocks * lanes < SKINNY_THREADS) lanes *= 2;
  return lanes;
}

/**
 * The linear kernel for `rows` rows of input, `outDim` outputs and a weight
 * stored in `format`; with `project`, the gemv4 that projects a
 * decode step's conv outputs (x_proj; see LinearKernels' foldsProjection).
 */
function linearProgram(
  rows: number,
  inDim: number,
  outDim: number,
  format: WeightFormat,
  project = false,
): Program<LinearIoParams> {
  // vec4 loads need rows of whole vec4s; other widths take scalar loads.
  const vec4 = inDim % 4 === 0;
  let shader = "matmul", entry = "main", constants: Record<string, number> = {};
  const wideTiles = Math.ceil(rows / 128) * Math.ceil(outDim / 64);
  if (vec4 && rows > GEMV_MAX_ROWS && rows <= 64 && outDim >= WIDE_MATMUL_OUT) {
    // A wide matrix (lm_head) for a batch of decode steps: gemv4's groups of 4
    // rows would read all of it once per group; 32×64 tiles read it once. At
    // 33 to 64 rows, 64×128 tiles read x half as often as 64×64 ones, which
    // made 48 and 64 streams faster on an H100 (docs/performance.md).
    constants = rows <= 32
      ? { TM: 32, TN: 64, KSPLIT: 2, KPARTS: 1, VEC4: 1 }
      : { TM: 64, TN: 128, KSPLIT: 1, KPARTS: 1, VEC4: 1 };
  } else if (rows <= GEMV_MAX_ROWS || (vec4 && rows <= GEMV4_MAX_ROWS)) {
    shader = vec4 ? "gemv4" : "gemv";
    if (vec4) {
      const groupRows = Math.min(rows, GEMV_MAX_ROWS);
      constants = { ROWS: groupRows, LANES: gemvLanes(outDim * Math.ceil(rows / groupRows)) };
    }
  } else if (vec4 && outDim <= SKINNY_MAX_OUT) {
    // More threads per 4×4 block of out when there are few blocks.
    const blocks = Math.ceil(rows / 4) * Math.ceil(outDim / 4);
    entry = "skinny";
    constants = { LANES: skinnyLanes(blocks) };
  } else if (
    vec4 && rows <= 64 && outDim <= SKINNY_BATCH_MAX_OUT && inDim >= SKINNY_BATCH_MIN_IN
  ) {
    entry = "skinny";
    constants = { LANES: 16 };
  } else if (
    rows > 64 && wideTiles >= MATMUL_MIN_TILES / 2 && wideTiles < MATMUL_MIN_TILES &&
    Math.ceil(inDim / 8) >= 2 * MATMUL_MIN_PART_SLICES
  ) {
    // Half enough 128×64 tiles (a prompt's out_proj, 2048 × 768): two
    // workgroups per tile, each half of K, beat 64×64 tiles on the H100
    // (docs/performance.md).
    constants = { TM: 128, TN: 64, KSPLIT: 1, KPARTS: 2, VEC4: vec4 ? 1 : 0 };
  } else if (rows <= 64 || wideTiles < MATMUL_MIN_TILES) {
    // Too few 128×64 tiles to keep 132 SMs busy (512 × 1536, 2048 × 768), or
    // rows for half a 128-row tile at most (a batch of decode steps): 64×64
    // tiles with k split over two thread groups have 4 times the threads, and
    // where those still leave a wave unfilled, K is split over workgroups as
    // well. Each group takes 8 k of a slice of 16 between barriers, half as
    // many barriers as slices of 8 need; 64 and 256 streams ran faster that
    // way on an H100 (docs/performance.md).
    const tiles = Math.ceil(rows / 64) * Math.ceil(outDim / 64);
    const kParts = Math.max(
      1,
      Math.min(
        Math.floor(MATMUL_SPLIT_WAVE / tiles),
        Math.floor(Math.ceil(inDim / 16) / SPLIT_MIN_PART_SLICES),
      ),
    );
    constants = { TM: 64, TN: 64, KSPLIT: 2, KPARTS: kParts, VEC4: vec4 ? 1 : 0, BK: 16 };
  } else {
    constants = { TM: 128, TN: 64, KSPLIT: 1, VEC4: vec4 ? 1 : 0 };
  }
  const key = `${shader}:${entry}:${JSON.stringify(constants)}${format}${project ? "project" : ""}`;
  let program = linearPrograms.get(key);
  if (!program) {
    // blocks.wgsl decodes quantized weights: this matrix's, or a folded projection's.
    const blocks = isBlockFormat(format) || project ? ["blocks"] : [];
    const preludes = ["linear_io", ...blocks, `weight_${format}`];
    let bindings = LINEAR_BINDINGS;
    if (shader === "gemv4") {
      // gemv4 also folds in a norm (7), a decode step's conv (8 to 10, 13) and
      // x_proj (11, 12).
      preludes.push(project ? "gemv4_shares" : "gemv4_no_shares");
      bindings = [...LINEAR_BINDINGS, 7, 8, 9, 10, 13, ...(project ? [11, 12] : [])];
    } else if (shader === "matmul") {
      // Split over K, main writes partial sums (14) that matmulSum adds up.
      const split = (constants.KPARTS ?? 1) > 1;
      preludes.push("block8x8", split ? "matmul_parts" : "matmul_whole");
      if (split) bindings = [...LINEAR_BINDINGS, 14];
    }
    program = new Program(shader, entry, bindings, constants, preludes);
    linearPrograms.set(key, program);
  }
  return program;
}

/**
 * The columns of a product split over up to three outputs of `widths`: all of
 * them, and where the second and third outputs start (linear_io.wgsl's
 * split1 and split2; `total` where there is no such output).
 */
function columnSplits(
  widths: readonly number[],
): { total: number; split1: number; split2: number } {
  const total = widths.reduce((sum, width) => sum + width, 0);
  return {
    total,
    split1: widths.length > 1 ? widths[0] : total,
    split2: widths.length > 2 ? widths[0] + widths[1] : total,
  };
}

/** The workgroup grid of a linear program for `rows` rows and `outDim` outputs. */
function linearGroups(program: Program, rows: number, outDim: number): [number, number, number] {
  const { TM, TN, LANES, ROWS } = program.constants;
  if (program.shader === "gemv4") {
    // 256 / LANES outputs per workgroup, for each group of ROWS rows.
    return grid(Math.ceil(outDim / (256 / LANES)) * Math.ceil(rows / ROWS));
  }
  if (program.shader !== "matmul") return grid(Math.ceil(outDim / 8));
  if (program.entry === "skinny") {
    // 4×4 blocks of out, 256 / LANES per workgroup.
    return grid(Math.ceil((Math.ceil(rows / 4) * Math.ceil(outDim / 4) * LANES) / 256));
  }
  return [Math.ceil(outDim / TN), Math.ceil(rows / TM), program.constants.KPARTS ?? 1];
}

/**
 * x_proj folded into in_proj's GEMV leaves its result as `blocks` shares per
 * row in a scratch buffer. The decode step's scan adds them up itself; for
 * any other reader, they are added up into `outs` first (settle).
 */
export interface PendingShares {
  outs: readonly GpuBuffer[];
  widths: readonly number[];
  rows: number;
  blocks: number;
  parts: GpuBuffer;
}

/**
 * A decode step's SSD step held back: its output y (rows × dim), and how to
 * run it, storing y times silu(gate) where a gate is given.
 */
interface PendingSsdStep {
  y: GpuBuffer;
  rows: number;
  dim: number;
  run: (gate: GpuBuffer | null) => void;
}

/** The arguments of one linear: Backend.linearSplit's, and whether outs accumulate the product. */
interface LinearCall extends LinearSplitArgs<GpuBuffer> {
  accumulate: boolean;
}

/**
 * A GEMV held back (a decode step's in_proj), for the conv step of its
 * first output and that conv's projection to fold in.
 */
interface PendingGemv extends LinearCall {
  norm: RmsNormArgs<GpuBuffer> | null;
  conv: ConvArgs<GpuBuffer> | null;
}

/** A projection of a folded conv step's outputs (x_proj), folded in too. */
interface FoldedProjection {
  weight: GpuBuffer;
  outs: readonly GpuBuffer[];
  widths: readonly number[];
}

/** A matmul split over K whose partial sums are not added up yet, and how to add them up on their own. */
interface PendingSum {
  call: LinearCall;
  product: PartialProduct;
  run: () => void;
}

/** What one dispatch of {@link LinearKernels} folds in. */
interface Folds {
  /** A norm of x, its output written too. */
  norm?: RmsNormArgs<GpuBuffer> | null;
  /** A conv step of the first output (whose values are written too). */
  conv?: ConvArgs<GpuBuffer> | null;
  /** x_proj of the conv's outputs, left as shares. */
  project?: FoldedProjection | null;
}

/**
 * A plain product out [rows, outDim] = x [rows, inDim] · weightᵀ held back:
 * a decode step's scan folds it in (dt_proj), computing delta itself.
 */
export interface PendingProduct {
  out: GpuBuffer;
  x: GpuBuffer;
  weight: GpuBuffer;
  rows: number;
  inDim: number;
  outDim: number;
}

/**
 * See the module documentation. What is held back is issued later, in the
 * order it came, either inside the kernel that reads it or on its own before
 * any other work ({@link settle}). An operation folds into the next one only
 * where its output is scratch (`GpuBuffer.transient`): the fused kernel
 * leaves that output unwritten.
 */
export class LinearKernels {
  /** A folded x_proj whose shares (gemv4's projParts) are not added up yet. */
  #pending: PendingShares | null = null;
  /** A decode step's SSD step, whose gated RMSNorm may fold its gate into it. */
  #pendingSsdStep: PendingSsdStep | null = null;
  /** An RMSNorm that the next GEMV reading its output may fold in. */
  #pendingNorm: RmsNormArgs<GpuBuffer> | null = null;
  /** A GEMV that the conv step of its first output may fold into. */
  #pendingGemv: PendingGemv | null = null;
  /** A product without bias that the next scan may fold in (see {@link LinearKernels.product}). */
  #pendingProduct: PendingProduct | null = null;
  /** A matmul's partial sums that the next norm or conv step may add up. */
  #pendingSum: PendingSum | null = null;
  /** Whether {@link settle} is running what was held back. */
  #settling = false;

  constructor(readonly rt: GpuRuntime) {}

  /**
   * Backend.rmsNorm: adds up a held-back matmul's partial sums into its
   * input first where they are its input's; else held back where a GEMV may
   * fold it in (rows of whole vec4s, up to GEMV4_MAX_ROWS rows, not in
   * place).
   */
  rmsNorm(args: RmsNormArgs<GpuBuffer>): void {
    const sum = this.#pendingSum;
    if (sum && sumFoldsIntoNorm(sum.call, args)) {
      this.#pendingSum = null;
      return residualNorm(this.rt, args, sum.product, sum.call.accumulate);
    }
    this.settle(); // whatever was held back runs first
    const { out, x, rows, dim } = args;
    if (dim % 4 !== 0 || rows > GEMV4_MAX_ROWS || out === x) return rmsNorm(this.rt, args);
    this.#pendingNorm = args;
  }

  /**
   * Backend.linearSplit: outs get consecutive column blocks of `widths`; a
   * weight split by rows runs one dispatch per part, each writing its
   * columns wherever they go. A GEMV folds in a held-back norm of x, and is
   * held back itself (unless it accumulates), for a conv step of its first
   * output and then the conv's projection to fold in.
   */
  linear(call: LinearCall): void {
    const { outs, widths, x, weight, rows, inDim, accumulate } = call;
    if (outs.length > LINEAR_MAX_OUTPUTS) {
      throw new RangeError(`linearSplit takes up to ${LINEAR_MAX_OUTPUTS} outputs`);
    }
    const held = this.#pendingGemv;
    if (held?.conv && this.#foldsProjection(held, call)) {
      this.#pendingGemv = null;
      return this.#runGemv(held, { weight, outs, widths });
    }
    const program = linearProgram(rows, inDim, columnSplits(widths).total, weight.format);
    const gemv4 = program.shader === "gemv4";
    const norm = gemv4 ? this.#takeNorm(x, rows, inDim, outs) : null;
    if (gemv4 && !accumulate) {
      this.settle(); // what came before the norm, if anything
      // A copy: the conv step that folds in is set on it, not on the caller's object.
      this.#pendingGemv = { ...call, norm, conv: null };
      return;
    }
    this.#dispatch(call, { norm });
  }

  /**
   * Backend.causalConv: a decode step's conv of a held-back GEMV's first
   * output folds into it; anything else runs (`run`) after what is held.
   */
  causalConv(args: ConvArgs<GpuBuffer>, run: () => void): void {
    const sum = this.#pendingSum;
    if (sum && convStepFoldsSum(sum.call, args)) {
      this.#pendingSum = null;
      return convStepOnParts(this.rt, args, sum.product, productLayout(sum.call, args.x));
    }
    const held = this.#pendingGemv;
    const { x, len, channels, batch = 1 } = args;
    if (
      held && !held.conv && len === 1 && x === held.outs[0] && x.transient &&
      batch === held.rows && channels === held.widths[0] && !held.outs.includes(args.out)
    ) {
      held.conv = args;
      return;
    }
    run();
  }

  /** Dispatches a held-back GEMV with what folded into it. */
  #runGemv(held: PendingGemv, project: FoldedProjection | null): void {
    this.#dispatch(held, { norm: held.norm, conv: held.conv, project });
  }

  /** The linear kernels for `folds`, dispatched now. */
  #dispatch(call: LinearCall, { norm, conv, project }: Folds): void {
    const { outs, widths, weight, bias, rows, inDim, accumulate } = call;
    const { rt } = this;
    const { absent, unused } = rt.memory;
    const { total: outDim, split1, split2 } = columnSplits(widths);
    const program = linearProgram(rows, inDim, outDim, weight.format, !!project);
    const normWeight = norm?.weight ?? null;
    // A folded norm's input is the GEMV's (its output is left unwritten).
    const x = norm?.x ?? call.x;
    const [input, done] = rt.unaliased(x, rows * inDim, ...outs, ...(conv ? [conv.out] : []));
    const projWidth = project ? columnSplits(project.widths).total : 0;
    // Shares of x_proj: one per block of 256 / LANES conv outputs, per row.
    const blocks = project ? split1 / (256 / program.constants.LANES) : 0;
    const parts = project
      ? rt.memory.lasting("shares", rows * blocks * Math.ceil(projWidth / 4) * 4)
      : null;
    // A split weight computes its block of output columns per part.
    for (const { part, firstRow } of weight.pieces()) {
      const partDim = Math.min(part.length / inDim, outDim - firstRow);
      const bindings = {
        1: input,
        2: part.buffer,
        3: bias?.buffer ?? absent,
        4: (conv?.out ?? outs[0]).buffer,
        5: outs[1]?.buffer ?? unused[0],
        6: outs[2]?.buffer ?? unused[1],
        7: normWeight?.buffer ?? absent,
        8: conv?.weight.buffer ?? absent,
        9: conv?.bias?.buffer ?? absent,
        10: conv?.state.buffer ?? unused[2],
        11: project?.weight.buffer ?? absent,
        12: parts?.buffer ?? unused[3],
        13: conv?.slots?.buffer ?? absent,
      };
      const params: LinearIoParams = {
        rows,
        inDim,
        outDim: partDim,
        hasBias: bias ? 1 : 0,
        outStride: outDim,
        colOffset: firstRow,
        split1,
        split2,
        accumulate: accumulate ? 1 : 0,
        hasNorm: normWeight ? 1 : 0,
        convKernel: conv?.kernel ?? 0,
        convHasBias: conv?.bias ? 1 : 0,
        projWidth,
        projFormat: project ? PROJ_FORMATS[project.weight.format] : 0,
        convSlots: conv?.slots ? 1 : 0,
        normEps: norm?.eps ?? 0,
      };
      const kParts = program.constants.KPARTS ?? 1;
      if (kParts === 1) {
        rt.run(program, params, bindings, linearGroups(program, rows, partDim));
        continue;
      }
      // Sizes rounded up to powers of 2, so few partial buffers are kept.
      const partial = rt.memory.lasting(
        "partial",
        2 ** Math.ceil(Math.log2(kParts * rows * partDim)),
      );
      const withPartial = { ...bindings, 14: partial.buffer };
      rt.run(program, params, withPartial, linearGroups(program, rows, partDim));
      const sumGroups = grid(Math.ceil((rows * partDim) / 256));
      const run = () => rt.run(matmulSumProgram(kParts), params, withPartial, sumGroups);
      // Settling runs everything held back now, this product too.
      if (weight.parts.length > 0 || this.#settling) {
        run();
        continue;
      }
      // Held back: the next norm or conv step may add the sums up itself.
      this.#pendingSum = { call, product: { partial, kParts, bias: bias ?? null }, run };
    }
    done();
    if (project && parts) {
      const { outs, widths } = project;
      this.#pending = { outs, widths, rows, blocks, parts };
    }
  }

  /**
   * Backend.linear: a product without bias or accumulation, of an unsplit
   * weight, is held back, as a decode step's scan folds it in (dt_proj,
   * {@link takeProduct}); anything else that runs first runs it on its own.
   */
  product(args: LinearArgs<GpuBuffer>): void {
    const { out, x, weight, bias, rows, inDim, outDim, accumulate = false } = args;
    // A product of a held-back norm's output takes the GEMV that folds it in.
    const normed = this.#pendingNorm?.out === x;
    if (bias || accumulate || weight.parts.length > 0 || normed) {
      const outs = [out], widths = [outDim];
      return this.linear({ outs, widths, x, weight, bias, rows, inDim, accumulate });
    }
    // What came before runs first, but for x_proj's shares: the scan that
    // takes this product takes them too.
    this.settle(true);
    this.#pendingProduct = { out, x, weight, rows, inDim, outDim };
  }

  /** The held-back product whose output is `out` (rows × outDim), taken; else null. */
  takeProduct(out: GpuBuffer, rows: number): PendingProduct | null {
    const pending = this.#pendingProduct;
    if (!pending || pending.out !== out || !out.transient || pending.rows !== rows) return null;
    this.#pendingProduct = null;
    return pending;
  }

  /**
   * The shares of a folded x_proj, taken from the pending work, if they are
   * those of `outs` with `widths` for `rows` rows; else null (and whatever is
   * pending stays so).
   */
  takeShares(
    outs: readonly GpuBuffer[],
    widths: readonly number[],
    rows: number,
  ): PendingShares | null {
    const pending = this.#pending;
    const matches = pending !== null && pending.rows === rows &&
      pending.outs.length === outs.length && pending.outs.every((out, i) => out === outs[i]) &&
      pending.widths.join() === widths.join();
    if (!matches) return null;
    this.#pending = null;
    return pending;
  }

  /**
   * Holds back a decode step's SSD step whose output is scratch, for the
   * gated RMSNorm after it ({@link gatedRmsNorm}); anything else runs it first.
   */
  deferSsdStep(step: PendingSsdStep): void {
    if (!step.y.transient) return step.run(null);
    this.settle(); // whatever was pending runs first
    this.#pendingSsdStep = step;
  }

  /**
   * Backend.gatedRmsNorm (`run` runs it on its own). Of one group, after a
   * held-back SSD step that writes its input, it splits in two: the step
   * stores y · silu(gate), and a plain RMSNorm of that follows, which the
   * next GEMV may fold in as it folds the norm before in_proj. That saves
   * the gated norm's dispatch at up to GEMV4_MAX_ROWS rows.
   */
  gatedRmsNorm(args: GatedNormArgs<GpuBuffer>, run: () => void): void {
    const { out, x, gate, weight, rows, dim, groupSize, eps } = args;
    const step = this.#pendingSsdStep;
    if (!step || step.y !== x || step.rows !== rows || step.dim !== dim || groupSize !== dim) {
      return run();
    }
    this.#pendingSsdStep = null;
    step.run(gate);
    this.rmsNorm({ out, x, weight, rows, dim, eps });
  }

  /** The held-back norm whose output is `x` (rows × dim), taken, unless it is one of `outs`; else null. */
  #takeNorm(
    x: GpuBuffer,
    rows: number,
    dim: number,
    outs: readonly GpuBuffer[],
  ): RmsNormArgs<GpuBuffer> | null {
    const norm = this.#pendingNorm;
    if (!norm || norm.out !== x || !x.transient || norm.rows !== rows || norm.dim !== dim) {
      return null;
    }
    if (outs.includes(norm.out) || outs.includes(norm.x)) return null;
    this.#pendingNorm = null;
    return norm;
  }

  /**
   * Runs what is held back, in the order it was issued: an SSD step, the
   * norms, the GEMV with what folded into it, the adding up of a folded
   * x_proj's shares into its outputs (unless `keepShares`), and a product;
   * before anything but the kernel folding them in could read their
   * outputs, and before the shares are overwritten.
   */
  settle(keepShares = false): void {
    // The work run here calls back (the runtime's beforeWork): everything is
    // taken first, so that it runs once and in order.
    if (this.#settling) return;
    const ssdStep = this.#pendingSsdStep;
    const norm = this.#pendingNorm;
    const gemv = this.#pendingGemv;
    const shares = keepShares ? null : this.#pending;
    const product = this.#pendingProduct;
    const sum = this.#pendingSum;
    this.#pendingSsdStep = null;
    this.#pendingNorm =
      this.#pendingGemv =
      this.#pendingProduct =
        null;
    this.#pendingSum = null;
    if (shares) this.#pending = null;
    this.#settling = true;
    try {
      ssdStep?.run(null);
      sum?.run();
      if (norm) rmsNorm(this.rt, norm);
      if (gemv) this.#runGemv(gemv, null);
      if (shares) this.#sumShares(shares);
      if (product) {
        const { out, x, weight, rows, inDim, outDim } = product;
        const call = { outs: [out], widths: [outDim], bias: null, accumulate: false };
        this.#dispatch({ ...call, x, weight, rows, inDim }, {});
      }
    } finally {
      this.#settling = false;
    }
  }

  /** Adds up the shares of a folded x_proj into its outputs (project_sum.wgsl). */
  #sumShares({ outs, widths, rows, blocks, parts }: PendingShares): void {
    const { total: width, split1, split2 } = columnSplits(widths);
    const { unused } = this.rt.memory;
    const bindings = {
      1: parts.buffer,
      4: outs[0].buffer,
      5: outs[1]?.buffer ?? unused[0],
      6: outs[2]?.buffer ?? unused[1],
    };
    const params = { rows, blocks, width, split1, split2 };
    this.rt.run(projectSumProgram, params, bindings, grid(Math.ceil((rows * width) / 64)));
  }

  /**
   * Whether the held-back GEMV `held` (with a conv step) folds in `call`, the
   * projection of the conv's outputs x by `weight` into `widths` for `rows`
   * rows: up to GEMV_MAX_ROWS (on the H100, batch-16 decoding measured no
   * faster with it: its 8-lane GEMV leaves 32 conv outputs to each
   * projectBlock thread), no bias, one unsplit weight each, up to three
   * outputs of MAX_FUSED_PROJECTION columns in all, and whole blocks of conv
   * outputs a multiple of 4 wide (projectBlock reads the weights four at a
   * time, 16-byte aligned; a quad never straddles two quantized blocks, as
   * rows and blocks of conv outputs are whole quads).
   */
  #foldsProjection(held: PendingGemv, call: LinearCall): boolean {
    const { x, weight, outs, widths, bias, rows, accumulate } = call;
    if (x !== held.conv?.out || bias || accumulate || rows !== held.rows) return false;
    // The scan that takes the shares leaves the outputs unwritten.
    if (!outs.every((out) => out.transient)) return false;
    if (rows > GEMV_MAX_ROWS || held.weight.parts.length > 0 || weight.parts.length > 0) {
      return false;
    }
    const { total: outDim } = columnSplits(held.widths);
    const program = linearProgram(rows, held.inDim, outDim, held.weight.format, true);
    const perGroup = 256 / program.constants.LANES;
    return widths.length <= LINEAR_MAX_OUTPUTS &&
      columnSplits(widths).total <= MAX_FUSED_PROJECTION && perGroup % 4 === 0 &&
      held.widths.length > 1 && held.widths[0] % perGroup === 0;
  }
}

/**
 * Whether a norm (`norm`) of a held-back matmul's output (`call`, split over
 * K) adds its partial sums up itself: one output, the norm's input, in full.
 */
function sumFoldsIntoNorm(call: LinearCall, norm: RmsNormArgs<GpuBuffer>): boolean {
  const { x, out, rows, dim } = norm;
  return call.outs.length === 1 && call.outs[0] === x && out !== x && rows === call.rows &&
    dim === call.widths[0];
}

/**
 * Whether a conv (`conv`) is a decode step's on an output of a held-back
 * matmul (`call`, in_proj split over K) that is scratch, with no output wider
 * than the conv (Mamba-1's x and z; Mamba-2's z, xBC and dt): conv.wgsl's
 * step_on_parts then adds up the sums, the conv's input's and the others'.
 */
function convStepFoldsSum(call: LinearCall, conv: ConvArgs<GpuBuffer>): boolean {
  const { x, out, state, len, channels, kernel, batch = 1 } = conv;
  const { outs, widths } = call;
  const at = outs.indexOf(x);
  return len === 1 && kernel >= 1 && kernel <= CONV_MAX_KERNEL && batch === call.rows &&
    !call.accumulate && at >= 0 && x.transient && widths[at] === channels &&
    widths.every((width) => width <= channels) && !outs.includes(out) && !outs.includes(state);
}

/** Where x and the other outputs of `call` sit in its product's columns (convStepOnParts). */
function productLayout(call: LinearCall, x: GpuBuffer) {
  const { total, split1, split2 } = columnSplits(call.widths);
  const columns = [0, split1, split2]; // where outs[0], [1] and [2] start
  const at = call.outs.indexOf(x);
  return {
    width: total,
    xColumn: columns[at],
    others: call.outs.flatMap((out, i) =>
      i === at ? [] : [{ out, column: columns[i], width: call.widths[i] }]
    ),
  };
}
