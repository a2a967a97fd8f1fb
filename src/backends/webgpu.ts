/**
 * The WebGPU backend: every operation is a WGSL compute kernel (see `wgsl/`,
 * embedded by `deno task build:wgsl`), weights and states stay on the GPU.
 *
 * Organisation, after tfjs-backend-webgpu: each kernel is a small
 * {@link Program} with a cache key (shader, entry point and the constants it is
 * specialised with) behind a pipeline cache; buffers come from a
 * {@link BufferPool}. Operations are recorded into one command encoder (inside
 * one compute pass where possible) and submitted when a result is read, so a
 * decode step is a single submission that reads back only the logits row.
 * Per-dispatch parameters go into a uniform arena written once per submission.
 * {@link WebGpuBackend.capture} records a decode step's launches once, with
 * their own uniform block, so that replaying them costs three calls each.
 *
 * The hot kernels (scan, matmul, gemv4, argmax) index no private array in a
 * loop: Naga emits every loop as a while-loop, which the NVIDIA compiler does
 * not unroll, so such an array lives in local memory. Their registers are
 * named vec4s instead. conv.wgsl and the scalar gemv.wgsl (inputs whose
 * width is not a multiple of 4) still use small arrays.
 *
 * @module
 */

import {
  type Backend,
  type ChooseArgs,
  type ConvArgs,
  type ConvStep,
  convStepAfter,
  type CopyRowsArgs,
  type GatedNormArgs,
  type OptionalOp,
  projectAfterConv,
  projectDelta,
  type Recording,
  type RowNorm,
  type ScanArgs,
  type SsdArgs,
} from "../backend.ts";
import { WGSL } from "../generated/wgsl.ts";
import { q4KScaleMin } from "../gguf.ts";
import {
  BLOCK_BYTES,
  BLOCK_ELEMENTS,
  type BlockType,
  type HalfFormat,
  type HalfMatrix,
  type QuantizedMatrix,
} from "../quant.ts";
import { bf16AsF16, f16ToF32 } from "../safetensors.ts";

/**
 * How a buffer holds its values: f32, or (a weight matrix) packed f16 or bf16
 * two per u32, or repacked quantized blocks (see {@link BLOCK_WORDS}).
 */
export type WeightFormat = "f32" | HalfFormat | BlockType;

/**
 * u32 words of a block as {@link WebGpuBackend.uploadQuantizedMatrix} repacks
 * it: ggml's f16 scales widened to f32, which keeps the values 4-byte aligned,
 * then the values (see weight_q8_0.wgsl, weight_q4_0.wgsl and
 * weight_q4_k.wgsl): 36 bytes for Q8_0's 34, 20 for Q4_0's 18, 152 for Q4_K's
 * 144 (its 6-bit scales and mins a byte each).
 */
const BLOCK_WORDS: Readonly<Record<BlockType, number>> = { q8_0: 9, q4_0: 5, q4_k: 38 };

/** Whether buffers of `format` hold quantized blocks. */
function isBlockFormat(format: WeightFormat): format is BlockType {
  return format !== "f32" && format !== "f16" && format !== "bf16";
}

/** linear_io.wgsl's `projFormat` of each format of an x_proj folded into gemv4 (gemv4_shares.wgsl). */
const PROJ_FORMATS: Readonly<Record<WeightFormat, number>> = {
  f32: 0,
  f16: 1,
  bf16: 2,
  q8_0: 3,
  q4_0: 4,
  q4_k: 5,
};

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
 * `matrix`'s blocks in the layout of {@link BLOCK_WORDS}, padded with zeros
 * to whole 16 bytes (the size of the buffers `upload` makes).
 */
function packBlocks(matrix: QuantizedMatrix): Uint32Array<ArrayBuffer> {
  const { type, blocks } = matrix;
  const blockBytes = BLOCK_BYTES[type];
  const count = blocks.length / blockBytes;
  const words = BLOCK_WORDS[type];
  const packed = new Uint32Array(Math.ceil((count * words) / 4) * 4);
  const floats = new Float32Array(packed.buffer);
  const bytes = new Uint8Array(packed.buffer);
  const scale = (at: number) => f16ToF32(blocks[at] | (blocks[at + 1] << 8));
  for (let block = 0; block < count; block++) {
    const from = block * blockBytes;
    const to = block * words;
    floats[to] = scale(from);
    if (type !== "q4_k") {
      bytes.set(blocks.subarray(from + 2, from + blockBytes), 4 * to + 4);
      continue;
    }
    floats[to + 1] = scale(from + 2);
    for (let sub = 0; sub < 8; sub++) {
      const [sc, min] = q4KScaleMin(blocks, from + 4, sub);
      bytes[4 * to + 8 + sub] = sc;
      bytes[4 * to + 16 + sub] = min;
    }
    bytes.set(blocks.subarray(from + 16, from + blockBytes), 4 * to + 24);
  }
  return packed;
}

/** A float32 buffer on the GPU, or a weight matrix in a packed format. */
export class GpuBuffer {
  readonly #buffer: GPUBuffer | null;

  constructor(
    /** The underlying buffer (possibly larger than `length` floats); null when split. */
    buffer: GPUBuffer | null,
    /** Number of values. */
    readonly length: number,
    /**
     * The format its values are held in: f32, or for a weight matrix, which
     * only `linear` reads (and `embed` and `copyRows` gather rows from),
     * packed 16-bit values or quantized blocks.
     */
    readonly format: WeightFormat = "f32",
    /**
     * A row-major matrix too large for one binding, split by rows: parts of
     * `rowsPerPart` rows (the last may hold fewer). Only `embed`, `embedFrom`
     * and `linear` (as its weight) read a split buffer.
     */
    readonly parts: readonly GpuBuffer[] = [],
    /** Rows per part of a split buffer. */
    readonly rowsPerPart = 0,
  ) {
    this.#buffer = buffer;
  }

  /** The underlying buffer; a split matrix has none. */
  get buffer(): GPUBuffer {
    if (!this.#buffer) {
      throw new Error(
        "This matrix is split over several GPU buffers: only embed and linear can read it",
      );
    }
    return this.#buffer;
  }

  /** Each part (itself when not split), with the index of its first row. */
  pieces(): { part: GpuBuffer; firstRow: number }[] {
    if (this.parts.length === 0) return [{ part: this, firstRow: 0 }];
    return this.parts.map((part, i) => ({ part, firstRow: i * this.rowsPerPart }));
  }
}

/** copyBufferToBuffer's arguments: source, its byte offset, destination, its byte offset, bytes. */
type BufferCopy = [GPUBuffer, number, GPUBuffer, number, number];

/** One kernel launch or buffer copy of a {@link GpuRecording}. */
type RecordedStep =
  | {
    pipeline: GPUComputePipeline;
    bindGroup: GPUBindGroup;
    /** The uniform block's dynamic offset: a typed array takes Deno's faster overload. */
    offsets: Uint32Array;
    groups: [number, number, number];
  }
  | { copy: BufferCopy };

/** Work recorded by {@link WebGpuBackend.capture}: ready-made launches and their own uniform block. */
export class GpuRecording implements Recording {
  constructor(
    readonly steps: readonly RecordedStep[],
    /** Holds every launch's parameters, written once. */
    readonly params: GPUBuffer | null,
  ) {}

  get dispatches(): number {
    return this.steps.filter((step) => !("copy" in step)).length;
  }
}

/** A launch seen while capturing, before its uniform block exists. */
interface PendingLaunch {
  program: Program;
  words: Uint32Array;
  storage: GPUBuffer[];
  groups: [number, number, number];
}

/** What {@link WebGpuBackend.capture} has seen so far. */
type CaptureLog = (PendingLaunch | { copy: BufferCopy })[];

/** Tuning knobs of {@link WebGpuBackend}; the defaults suit large GPUs. */
export interface WebGpuOptions {
  /** Tokens per scan chunk; by default chosen so that ~`scanTargetThreads` threads run. */
  scanChunkLen?: number;
  /** Threads (sequences × channels × chunks) the chunked scan aims for (default 131072). */
  scanTargetThreads?: number;
  /** Adapter preference passed to `requestAdapter`. */
  powerPreference?: GPUPowerPreference;
  /** An adapter already requested (by a capability check); `powerPreference` is then unused. */
  adapter?: GPUAdapter;
  /**
   * Bytes above which a matrix is split by rows, below the device's binding
   * limit (the default); lets tests exercise the splitting on any device.
   */
  splitMatricesOver?: number;
  /**
   * Bytes of chunk states a chunked SSD scan (Mamba-2) keeps at once; a
   * longer prompt runs in segments of whole chunks (default 64 MiB). Lets
   * tests exercise the segmenting at small sizes.
   */
  ssdStatesBytes?: number;
  /**
   * Arithmetic of the scan: "float32" (the default, fast) or "double-float"
   * (pairs of f32, about 44 significant bits, through a reference kernel many
   * times slower): f32 rounding leaves the scan up to 2e-3 (relative) from a
   * float64 one over 1024 tokens, double-float within 1e-4 like the js and wasm
   * backends, which carry float64.
   */
  scanPrecision?: ScanPrecision;
}

/** See {@link WebGpuOptions.scanPrecision}. */
export type ScanPrecision = "float32" | "double-float";

/** A short description of an adapter, for reports and cache keys. */
export function describeAdapter(adapter: GPUAdapter): string {
  const info = adapter.info;
  const name = info.description || [info.vendor, info.architecture, info.device].join(" ");
  return name.trim();
}

/** Raised when WebGPU is missing or refuses what the backend needs. */
export class WebGpuUnavailableError extends Error {
  override name = "WebGpuUnavailableError";
}

const STORAGE_USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const PARAM_SLOT = 256; // bytes per dispatch's uniform block (≥ minUniformBufferOffsetAlignment)
// Bytes per uniform arena buffer: large enough for a whole greedy batch (32
// tokens × 171 dispatches for mamba-130m), so each kernel's bind group, which
// names the arena buffer, stays the same from token to token and is reused.
const PARAM_CHUNK = 1 << 22;
const MAX_GROUPS = 65535;
const MAX_BIND_GROUPS = 4096; // cached bind groups before the cache is cleared
const GEMV_MAX_ROWS = 4;
// gemv4 takes up to this many rows in groups of 4, reading the weight once per
// group (mostly from L2 after the first): a small batch of decode steps. Past
// it the tiled matmul, split over K where its tiles are few, wins: on the H200
// a 130m-shaped step of 64 rows took 2.68 ms against gemv4's 3.59, of 32 rows
// 2.42 against 2.25 (docs/performance.md).
const GEMV4_MAX_ROWS = 32;
const SAMPLE_SLICE = 1024; // logits per workgroup of sample.wgsl's first stage
const SAMPLE_MAX_K = 64; // MAX_K of choose_rows.wgsl: rows keeping more take sample_wide.wgsl
// sample_wide.wgsl spreads each row over slices of at least this many ids,
// fewer where the rows alone make about WIDE_GROUPS workgroups per pass.
const WIDE_MIN_SLICE = 1024;
const WIDE_GROUPS = 1024;
const WIDE_ROW_WORDS = 531; // ROW_WORDS of sample_wide.wgsl: a row's state
const CONV_SEQUENTIAL_MAX_LEN = 4;
const CONV_MAX_KERNEL = 9;
const SCAN_WG = 128;
const SCAN_TILE = 32; // tokens staged at a time in scan.wgsl: a multiple of 4, at most SCAN_WG / 4
const SCAN_LANES = 16; // states per thread in scan.wgsl
// The shortest chunk the default chunking makes. Measured on an H200 at (1,
// 1536, 2048), where the thread target asks for shorter ones: chunks of 48
// tokens scanned 29.9 to 31.3 G elements/s (5 runs), of 64 27.8 to 29.9 (8),
// of 40 29.8 and 31.1.
const SCAN_MIN_CHUNK = 48;
const DOUBLE_FLOAT_SCAN_WG = 64; // @workgroup_size of scan_double_float.wgsl
// Threads per workgroup of a decode step's scan (four per channel): a step is
// one short pass, and smaller workgroups spread its loads over more SMs.
const SCAN_STEP_WG = 64;
// The same with x_proj folded in (see SCAN_PROGRAMS).
const SCAN_PROJECTED_STEP_WG = 256;

/** One kernel: a shader, its entry point, its specialisation and the bindings it uses. */
export class Program {
  /** Identifies the pipeline in the cache. */
  readonly key: string;
  /** Identifies the shader module: preludes, shader and constants. */
  readonly moduleKey: string;
  /** Identifies the bind group layout: shader, bindings and which are writable. */
  readonly layoutKey: string;
  /** The bindings the shader declares `read_write` (storage); the others of 1.. are read-only. */
  readonly writable: readonly number[];
  constructor(
    /** Key of the shader in {@link WGSL}. */
    readonly shader: string,
    /** Entry point. */
    readonly entry: string,
    /** Binding indices of group 0 that the entry point uses (0 is the uniform block). */
    readonly bindings: readonly number[],
    /** `const NAME: u32 = …u;` declarations replaced in the source. */
    readonly constants: Readonly<Record<string, number>> = {},
    /** Keys of WGSL modules prepended to the shader, in order (declarations it uses). */
    readonly preludes: readonly string[] = [],
  ) {
    this.moduleKey = `${[...preludes, shader].join("+")}:${JSON.stringify(constants)}`;
    this.key = `${this.moduleKey}:${entry}`;
    // The layout follows the declarations: a binding is writable where the
    // WGSL declares it `read_write`.
    const writable = [...this.source().matchAll(/@binding\((\d+)\)\s*var<storage,\s*read_write>/g)]
      .map((match) => Number(match[1]));
    this.writable = bindings.filter((binding) => writable.includes(binding));
    this.layoutKey = `${shader}:${bindings.join(",")}:${this.writable.join(",")}`;
  }

  /** The WGSL source with the prelude prepended and the constants substituted. */
  source(): string {
    let text = WGSL[this.shader];
    if (text === undefined) throw new Error(`No WGSL kernel named ${this.shader}`);
    for (const name of [...this.preludes].reverse()) {
      const prelude = WGSL[name];
      if (prelude === undefined) throw new Error(`No WGSL module named ${name}`);
      text = `${prelude}\n${text}`;
    }
    for (const [name, value] of Object.entries(this.constants)) {
      const pattern = new RegExp(`const ${name}: u32 = \\d+u;`);
      if (!pattern.test(text)) throw new Error(`${this.shader}.wgsl has no constant ${name}`);
      text = text.replace(pattern, `const ${name}: u32 = ${value}u;`);
    }
    return text;
  }
}

/**
 * The programs of the backend, made once: building one (and its keys) on every
 * dispatch would cost a decode step hundreds of allocations.
 */
const PROGRAMS = {
  argmax: new Program("argmax", "main", [0, 1, 2, 3, 5, 6], {}, ["choose_rows"]),
  penalize: new Program("penalize", "main", [0, 1, 3, 5, 6, 7], {}, ["choose_rows"]),
  sampleSlices: new Program("sample", "slices", [0, 1, 3, 6, 7], {}, ["choose_rows"]),
  sample: new Program("sample", "main", [0, 1, 2, 3, 4, 5, 6, 7], {}, ["choose_rows"]),
  rmsNorm: new Program("rmsnorm", "main", [0, 1, 2, 3]),
  add: new Program("add", "main", [0, 1, 2]),
  convSequential: new Program("conv", "sequential", [0, 1, 2, 3, 4, 5, 6]),
  convOutputs: new Program("conv", "outputs", [0, 1, 2, 3, 4, 5, 6]),
  convUpdateState: new Program("conv", "update_state", [0, 1, 5, 6]),
  projectSum: new Program("project_sum", "main", [0, 1, 4, 5, 6]),
};

const LINEAR_BINDINGS = [0, 1, 2, 3, 4, 5, 6];
const LINEAR_MAX_OUTPUTS = 3; // out, out2, out3 of linear_io.wgsl
const linearPrograms = new Map<string, Program>();

/**
 * The gathers (embed.wgsl, copy_rows.wgsl) for a source in each format: they
 * read it through the format's weight prelude, as the linear kernels do.
 */
const GATHER_PROGRAMS = new Map<string, Program>();

/** embed.wgsl (`copyRows` false) or copy_rows.wgsl reading a source of `format`. */
function gatherProgram(copyRows: boolean, format: WeightFormat): Program {
  const key = `${copyRows ? "copy_rows" : "embed"}:${format}`;
  let program = GATHER_PROGRAMS.get(key);
  if (!program) {
    const preludes = [...(isBlockFormat(format) ? ["blocks"] : []), `weight_${format}`];
    program = copyRows
      ? new Program("copy_rows", "main", [0, 1, 2, 3, 4], {}, preludes)
      : new Program("embed", "main", [0, 1, 2, 3], {}, preludes);
    GATHER_PROGRAMS.set(key, program);
  }
  return program;
}

/**
 * Widest output that the split-K `skinny` entry point of matmul.wgsl takes: on
 * an H100 it beats the tiled kernel 3 to 10 times up to 128 (x_proj's 16, 48, 80).
 */
const SKINNY_MAX_OUT = 128;

/**
 * Workgroups of the tiled matmul below which tiles get smaller and then K is
 * split over workgroups (two per SM of an H200's 132, about).
 */
const MATMUL_MIN_TILES = 256;
/**
 * Outputs from which a batch of up to 32 decode steps takes the tiled matmul
 * rather than gemv4 (lm_head's 50,280; not in_proj's 3,072, whose gemv4 folds
 * in the norm, the conv and x_proj).
 */
const WIDE_MATMUL_OUT = 16384;
/** The fewest slices of 8 k that a part of a matmul split over K takes. */
const MATMUL_MIN_PART_SLICES = 16;
const matmulSumPrograms = new Map<number, Program>();

/** The pass that adds up the partial sums of a matmul split over `kParts` workgroups. */
function matmulSumProgram(kParts: number): Program {
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
 * The linear kernel for `rows` rows of input, `outDim` outputs and a weight
 * stored in `format`; with `project`, the gemv4 that projects a decode
 * step's conv outputs (x_proj; see #foldsProjection).
 */
function linearProgram(
  rows: number,
  inDim: number,
  outDim: number,
  format: WeightFormat,
  project = false,
): Program {
  // vec4 loads need rows of whole vec4s; other widths take scalar loads.
  const vec4 = inDim % 4 === 0;
  let shader = "matmul", entry = "main", constants: Record<string, number> = {};
  if (vec4 && rows > GEMV_MAX_ROWS && rows <= 32 && outDim >= WIDE_MATMUL_OUT) {
    // A wide matrix (lm_head) for a batch of decode steps: gemv4's groups of 4
    // rows would read all of it once per group; 32×64 tiles read it once.
    constants = { TM: 32, TN: 64, KSPLIT: 2, KPARTS: 1, VEC4: 1 };
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
    constants = { LANES: blocks < 2048 ? 32 : 16 };
  } else if (rows <= 64 || Math.ceil(rows / 128) * Math.ceil(outDim / 64) < MATMUL_MIN_TILES) {
    // Too few 128×64 tiles to keep 132 SMs busy (512 × 1536, 2048 × 768), or
    // rows for half a 128-row tile at most (a batch of decode steps): 64×64
    // tiles with k split over two thread groups have 4 times the threads, and
    // where those are still too few, K is split over workgroups as well.
    const tiles = Math.ceil(rows / 64) * Math.ceil(outDim / 64);
    const kParts = Math.max(
      1,
      Math.min(
        Math.ceil(MATMUL_MIN_TILES / tiles),
        Math.floor(Math.ceil(inDim / 8) / MATMUL_MIN_PART_SLICES),
      ),
    );
    constants = { TM: 64, TN: 64, KSPLIT: 2, KPARTS: kParts, VEC4: vec4 ? 1 : 0 };
  } else {
    constants = { TM: 128, TN: 64, KSPLIT: 1, VEC4: vec4 ? 1 : 0 };
  }
  const key = `${shader}:${entry}:${JSON.stringify(constants)}${format}${project ? "p" : ""}`;
  let program = linearPrograms.get(key);
  if (!program) {
    // blocks.wgsl decodes quantized weights: this matrix's, or a folded projection's.
    const blocks = isBlockFormat(format) || project ? ["blocks"] : [];
    const preludes = ["linear_io", ...blocks, `weight_${format}`];
    let bindings = LINEAR_BINDINGS;
    if (shader === "gemv4") {
      // gemv4 also folds in a norm (7), a decode step's conv (8 to 10, 13) and x_proj (11, 12).
      preludes.push(project ? "gemv4_shares" : "gemv4_no_shares");
      bindings = [...LINEAR_BINDINGS, 7, 8, 9, 10, 13, ...(project ? [11, 12] : [])];
    } else if (shader === "matmul") {
      // Split over K, main writes partial sums (14) that matmulSum adds up.
      const split = (constants.KPARTS ?? 1) > 1;
      preludes.push(split ? "matmul_parts" : "matmul_whole");
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
 * The three passes of the chunked scan, and the decode step that computes
 * delta itself: from dt, or (stepProjected) from the shares of x_proj that
 * in_proj's GEMV left, which every workgroup adds up, so it takes fewer and
 * larger ones.
 */
const SCAN_PROGRAMS = (() => {
  const constants = { WG: SCAN_WG, TT: SCAN_TILE };
  // blocks.wgsl decodes a dt_proj kept as quantized blocks.
  const plain = ["blocks", "scan_no_shares"];
  // 16: the slots naming each sequence's state row in a pool.
  const step = [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 16];
  return {
    chunkState: new Program(
      "scan",
      "chunk_state",
      [0, 1, 2, 3, 4, 5, 7, 8, 11, 12],
      constants,
      plain,
    ),
    carry: new Program("scan", "carry", [0, 3, 10, 11, 12, 16], constants, plain),
    output: new Program(
      "scan",
      "output",
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16],
      constants,
      plain,
    ),
    step: new Program("scan", "step", step, { ...constants, WG: SCAN_STEP_WG }, plain),
    doubleFloat: new Program(
      "scan_double_float",
      "main",
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    ),
    stepProjected: new Program(
      "scan",
      "step",
      [...step, 15],
      { ...constants, WG: SCAN_PROJECTED_STEP_WG },
      ["blocks", "scan_shares"],
    ),
  };
})();

/** Tokens per chunk of ssd.wgsl's chunked scan (its CHUNK), whatever the model's chunk_size. */
const SSD_CHUNK = 32;
/** Threads per workgroup of ssd.wgsl's carry pass (its WG). */
const SSD_WG = 256;
/** Channels per workgroup of ssd.wgsl's step: STEP_WG threads, STEP_LANES per channel. */
const SSD_STEP_CHANNELS = 256 / 16;
/** Default of {@link WebGpuOptions.ssdStatesBytes}: within any device's binding size limit. */
const SSD_STATES_BYTES = 64 << 20;
/** The largest finite f32: Δ's clamp bounds go to the kernel as finite numbers. */
const F32_MAX = 3.4028234663852886e38;

/** The entry points of ssd.wgsl (see its header) and gated_rmsnorm.wgsl. */
const SSD_PROGRAMS = {
  chunkState: new Program("ssd", "chunk_state", [0, 1, 2, 3, 4, 9, 10, 11]),
  carry: new Program("ssd", "carry", [0, 6, 8, 9, 10]),
  output: new Program("ssd", "output", [0, 1, 5, 7, 9, 10, 11]),
  step: new Program("ssd", "step", [0, 1, 2, 3, 4, 5, 6, 7, 8]),
  gatedNorm: new Program("gated_rmsnorm", "main", [0, 1, 2, 3, 4]),
};

/** The flags of the scan kernels' params for what `args` holds (bit 16 is the step's own). */
function scanFlags(args: ScanArgs<GpuBuffer>): number {
  const { D, z, deltaBias, deltaSoftplus, slots } = args;
  return (D ? 1 : 0) | (z ? 2 : 0) | (deltaBias ? 4 : 0) | (deltaSoftplus ? 8 : 0) |
    (slots ? 32 : 0);
}

/** The widest projection (Σ widths) that gemv4 and the scan step fold in. */
const MAX_FUSED_PROJECTION = 256;

/** The entry points of sample_wide.wgsl, which {@link WideSampling} puts in order. */
const WIDE_PROGRAMS = (() => {
  const wide = (entry: string) =>
    new Program("sample_wide", entry, [0, 1, 2, 3, 4, 5, 6, 7], {}, ["choose_rows"]);
  return {
    begin: wide("begin"),
    extent: wide("extent"),
    histogram: wide("histogram"),
    settle: wide("settle"),
    totals: wide("totals"),
  };
})();

/** sample_wide.wgsl's searches (its p.search), in the order they run. */
const WIDE_SEARCHES = { topK: 0, topP: 1, draw: 2 };

/** One dispatch of sample_wide.wgsl's schedule: a program, its search and round, per slice or per row. */
interface WidePass {
  program: Program;
  search: number;
  round: number;
  perSlice: boolean;
}

/**
 * The schedule of sample_wide.wgsl for calls of `rows` rows of `vocab`
 * logits: how a row is sliced, and each dispatch's program, parameters and
 * workgroups.
 */
class WideSampling {
  /** Ids per slice (a workgroup's share of a row): a multiple of 256. */
  readonly sliceLength: number;
  /** Slices per row. */
  readonly slices: number;
  /** Bytes of an id below `vocab`: a search's rounds on the id, after 4 on the key. */
  readonly idDigits: number;
  /** Its dispatches, in order. */
  readonly passes: readonly WidePass[];

  constructor(readonly rows: number, readonly vocab: number) {
    // Enough workgroups to fill a large GPU where there are few rows, each
    // with enough ids that the histograms' merging stays a small part.
    const wanted = Math.ceil((rows * vocab) / WIDE_GROUPS);
    this.sliceLength = Math.max(WIDE_MIN_SLICE, Math.ceil(wanted / 256) * 256);
    this.slices = Math.ceil(vocab / this.sliceLength);
    let idDigits = 1;
    while (vocab > 256 ** idDigits) idDigits++;
    this.idDigits = idDigits;
    const { begin, extent, histogram, settle, totals } = WIDE_PROGRAMS;
    const passes: WidePass[] = [
      { program: begin, search: 0, round: 0, perSlice: false },
      { program: extent, search: 0, round: 0, perSlice: true },
    ];
    for (const search of [WIDE_SEARCHES.topK, WIDE_SEARCHES.topP, WIDE_SEARCHES.draw]) {
      if (search === WIDE_SEARCHES.topP) {
        passes.push({ program: totals, search, round: 0, perSlice: true });
      }
      for (let round = 0; round < 4 + idDigits; round++) {
        passes.push({ program: histogram, search, round, perSlice: true });
        passes.push({ program: settle, search, round, perSlice: false });
      }
    }
    this.passes = passes;
  }

  /** Words of scratch: each row's state, rows rounded up so that few sizes are kept. */
  get scratchLength(): number {
    return 2 ** Math.ceil(Math.log2(this.rows)) * WIDE_ROW_WORDS;
  }

  /** The parameters of a pass, after chooseTokens' (choose_rows.wgsl's Params). */
  params(common: readonly number[], pass: WidePass): number[] {
    return [...common, pass.search, pass.round, this.idDigits, this.sliceLength];
  }

  /** The workgroups of a pass: one per slice of each row, or one per row. */
  groups(pass: WidePass): [number, number, number] {
    return [pass.perSlice ? this.slices : 1, this.rows, 1];
  }
}

/**
 * Storage buffers by exact byte size. A buffer released while commands that use
 * it are still being recorded may be reused at once by recorded GPU work (which
 * runs in order), but not for a host write (`queue.writeBuffer` would overtake
 * the recorded commands): those wait for the next submission.
 */
export class BufferPool {
  readonly #device: GPUDevice;
  readonly #free = new Map<number, GPUBuffer[]>();
  readonly #recycled = new Map<number, GPUBuffer[]>();
  /** Buffers created so far. */
  created = 0;

  constructor(device: GPUDevice) {
    this.#device = device;
  }

  /** A buffer of `bytes`; `hostWrite` when the caller writes it with `queue.writeBuffer`. */
  acquire(bytes: number, hostWrite: boolean): GPUBuffer {
    const recycled = hostWrite ? undefined : this.#recycled.get(bytes);
    const buffer = recycled?.length ? recycled.pop() : this.#free.get(bytes)?.pop();
    if (buffer) return buffer;
    this.created++;
    return this.#device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
  }

  /** Takes a buffer back. */
  release(buffer: GPUBuffer): void {
    const list = this.#recycled.get(buffer.size);
    if (list) list.push(buffer);
    else this.#recycled.set(buffer.size, [buffer]);
  }

  /** After a submission every released buffer is safe for host writes too. */
  submitted(): void {
    for (const [size, list] of this.#recycled) {
      const free = this.#free.get(size);
      if (free) free.push(...list);
      else this.#free.set(size, list);
    }
    this.#recycled.clear();
  }
}

function byteSize(floats: number): number {
  return Math.max(16, Math.ceil((floats * 4) / 16) * 16);
}

/**
 * The array, typed as writeBuffer's `BufferSource`: WebGPU takes views of
 * shared memory too (its `AllowSharedBufferSource`), as Deno does, whose
 * types still say otherwise; the loader reads large weight files into
 * shared memory, which a copy here would double.
 */
function bufferSource<T extends Float32Array | Int32Array>(data: T): T & { buffer: ArrayBuffer } {
  return data as T & { buffer: ArrayBuffer };
}

/** Workgroup counts for `groups` one-dimensional groups, split over y beyond 65535. */
function grid(groups: number): [number, number, number] {
  const n = Math.max(1, groups);
  if (n <= MAX_GROUPS) return [n, 1, 1];
  const y = Math.ceil(n / MAX_GROUPS);
  return [Math.ceil(n / y), y, 1];
}

/**
 * x_proj folded into in_proj's GEMV leaves its result as `blocks` shares per
 * row in a scratch buffer. The decode step's scan adds them up itself; for
 * any other reader, the backend adds them into `outs` first (#settle).
 */
interface PendingProjection {
  outs: readonly GpuBuffer[];
  widths: readonly number[];
  rows: number;
  blocks: number;
  parts: GpuBuffer;
}

/** The WebGPU backend; see the module documentation. */
export class WebGpuBackend implements Backend<GpuBuffer> {
  readonly name = "webgpu";
  readonly queued = true;
  /**
   * A prompt's tokens per chunk: on an H100 the projections of 2048 rows run
   * twice as fast per row as those of 512 (more tiles than SMs).
   */
  readonly chunkTokens = 2048;
  /** The device; destroyed by {@link dispose}. */
  readonly device: GPUDevice;
  /** Description of the adapter, for reports. */
  readonly adapterInfo: string;
  /** Compute dispatches recorded so far (for benchmarks). */
  dispatches = 0;
  /** Submissions so far. */
  submissions = 0;

  readonly #options: WebGpuOptions;
  readonly #pool: BufferPool;
  readonly #modules = new Map<string, GPUShaderModule>();
  readonly #pipelines = new Map<string, GPUComputePipeline>();
  readonly #layouts = new Map<string, GPUBindGroupLayout>();
  readonly #bindGroups = new Map<string, GPUBindGroup>();
  readonly #ids = new WeakMap<GPUBuffer, number>();
  #nextId = 0;
  readonly #dummy: GPUBuffer; // stands for absent read-only inputs
  readonly #dummyOut: GPUBuffer; // stands for unused read-write scratch or outputs
  readonly #dummyOut2: GPUBuffer; // a second one: writable bindings must not alias
  readonly #dummyOut3: GPUBuffer; // and a third
  readonly #dummyOut4: GPUBuffer; // and a fourth
  readonly #offset = new Uint32Array(1); // a dispatch's uniform offset (typed: the faster overload)
  /** Scratch kept for the backend's life, by purpose and size: a recording may name it. */
  readonly #lasting = new Map<string, GpuBuffer>();
  #encoder: GPUCommandEncoder | null = null;
  #pass: GPUComputePassEncoder | null = null;
  readonly #paramBuffers: GPUBuffer[] = [];
  /** Host copies of the uniform arena chunks, as u32 and f32 views of the same bytes. */
  /** Unmapped MAP_READ buffers for {@link read}, by byte size. */
  readonly #staging = new Map<number, GPUBuffer[]>();
  readonly #paramWords: Uint32Array<ArrayBuffer>[] = [];
  readonly #paramFloats: Float32Array<ArrayBuffer>[] = [];
  #paramSlots = 0;
  /** Launches and copies of a {@link capture} in progress, else null. */
  #capturing: CaptureLog | null = null;
  /** A folded x_proj whose shares (gemv4's projParts) are not added up yet; see #settle. */
  #pendingProjection: PendingProjection | null = null;
  #error: unknown = null;
  #disposed = false;

  /** Wraps an existing device (the caller keeps no other use of it). */
  constructor(device: GPUDevice, adapterInfo = "", options: WebGpuOptions = {}) {
    this.device = device;
    this.adapterInfo = adapterInfo;
    this.#options = options;
    this.#pool = new BufferPool(device);
    this.#dummy = device.createBuffer({ size: 16, usage: STORAGE_USAGE });
    this.#dummyOut = device.createBuffer({ size: 16, usage: STORAGE_USAGE });
    this.#dummyOut2 = device.createBuffer({ size: 16, usage: STORAGE_USAGE });
    this.#dummyOut3 = device.createBuffer({ size: 16, usage: STORAGE_USAGE });
    this.#dummyOut4 = device.createBuffer({ size: 16, usage: STORAGE_USAGE });
    device.addEventListener("uncapturederror", (event) => {
      this.#error ??= (event as GPUUncapturedErrorEvent).error;
    });
  }

  /** Opens the default adapter with raised limits; fails clearly without WebGPU. */
  static async create(options: WebGpuOptions = {}): Promise<WebGpuBackend> {
    const alternatives = 'use backend "wasm" or "js" instead';
    const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
    if (!options.adapter && !gpu) {
      throw new WebGpuUnavailableError(
        `WebGPU is not available here (no navigator.gpu): ${alternatives}`,
      );
    }
    const adapter = options.adapter ??
      await gpu!.requestAdapter({ powerPreference: options.powerPreference });
    if (!adapter) {
      throw new WebGpuUnavailableError(`No WebGPU adapter was found: ${alternatives}`);
    }
    const limits = adapter.limits;
    const requiredLimits: Record<string, number> = {
      maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
      maxBufferSize: limits.maxBufferSize,
      maxStorageBuffersPerShaderStage: limits.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupStorageSize: limits.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: limits.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: limits.maxComputeWorkgroupSizeX,
    };
    if (limits.maxStorageBuffersPerShaderStage < 12) {
      throw new WebGpuUnavailableError(
        `The WebGPU adapter allows ${limits.maxStorageBuffersPerShaderStage} storage buffers ` +
          `per shader stage; the scan kernel needs 12: ${alternatives}`,
      );
    }
    let device: GPUDevice;
    try {
      device = await adapter.requestDevice({ requiredLimits });
    } catch (error) {
      throw new WebGpuUnavailableError(`The WebGPU device could not be opened: ${alternatives}`, {
        cause: error,
      });
    }
    return new WebGpuBackend(device, describeAdapter(adapter), options);
  }

  // ---- buffers ----------------------------------------------------------------------------

  /**
   * A buffer holding `data`; a row-major matrix with rows of `rowLength` that
   * is larger than one binding allows is split by rows.
   */
  upload(data: Float32Array, rowLength?: number): GpuBuffer {
    const bytes = byteSize(data.length);
    const split = this.#split(data, bytes, rowLength, (rows) => this.upload(rows), null);
    if (split) return split;
    this.#checkSize(bytes);
    // writeBuffer, not mappedAtCreation: mapping a large buffer costs seconds
    // per 100 MB in Deno on a real GPU. The new buffer has no recorded use yet,
    // so the write cannot overtake one.
    const buffer = this.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
    this.device.queue.writeBuffer(buffer, 0, bufferSource(data));
    return new GpuBuffer(buffer, data.length);
  }

  /** GPU memory cannot be lent to the host. */
  hostBytes(_byteLength: number): undefined {
    return undefined;
  }

  /**
   * Stores an F16 or BF16 matrix packed two values per u32: half the memory
   * and bandwidth of f32, same products. A BF16 matrix whose values are all
   * exact f16 goes up as f16, as `unpack2x16float` is one builtin where bf16
   * takes a shift and a mask. See {@link Backend.uploadHalfMatrix}.
   */
  uploadHalfMatrix(matrix: HalfMatrix): GpuBuffer {
    const { format, halves, cols } = matrix;
    const f16 = format === "bf16" ? bf16AsF16(halves) : null;
    return f16
      ? this.#uploadHalves(f16.subarray(0, halves.length), "f16", cols)
      : this.#uploadHalves(halves, format, cols);
  }

  /**
   * `halves` in `format` as a buffer; split by rows as {@link upload} splits,
   * every part in the same format (which `linear` reads the whole matrix in).
   */
  #uploadHalves(halves: Uint16Array, format: HalfFormat, rowLength?: number): GpuBuffer {
    const bytes = byteSize(Math.ceil(halves.length / 2));
    const split = this.#split(
      halves,
      bytes,
      rowLength,
      (rows) => this.#uploadHalves(rows, format),
      format,
    );
    if (split) return split;
    this.#checkSize(bytes);
    const buffer = this.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
    // Whole u32s: an odd count gets a zero after it.
    const padded = new Uint16Array(bytes / 2);
    padded.set(halves);
    this.device.queue.writeBuffer(buffer, 0, padded);
    return new GpuBuffer(buffer, halves.length, format);
  }

  /**
   * Keeps a Q8_0, Q4_0 or Q4_K matrix as its blocks, repacked with f32
   * scales (36 or 20 bytes per 32 weights, 152 per 256; see
   * {@link BLOCK_WORDS}), which `linear` multiplies by and `embed` and
   * `copyRows` gather from as the values `dequantizeMatrix` gives. A matrix
   * larger than one binding allows is split by rows, as {@link upload} splits.
   */
  uploadQuantizedMatrix(matrix: QuantizedMatrix): GpuBuffer {
    const { type, rows, cols, blocks } = matrix;
    const length = rows * cols;
    const rowBlocks = cols / BLOCK_ELEMENTS[type];
    const rowBytes = rowBlocks * BLOCK_WORDS[type] * 4;
    const limit = Math.min(this.#bindingLimit(), this.#options.splitMatricesOver ?? Infinity);
    const rowsPerPart = Math.floor((limit - 16) / rowBytes);
    if (rows * rowBytes > limit && rowsPerPart >= 1) {
      const parts: GpuBuffer[] = [];
      const blockRowBytes = rowBlocks * BLOCK_BYTES[type];
      for (let row = 0; row < rows; row += rowsPerPart) {
        const partRows = Math.min(rowsPerPart, rows - row);
        const first = row * blockRowBytes;
        const partBlocks = blocks.subarray(first, first + partRows * blockRowBytes);
        parts.push(this.uploadQuantizedMatrix({ type, rows: partRows, cols, blocks: partBlocks }));
      }
      return new GpuBuffer(null, length, type, parts, rowsPerPart);
    }
    const packed = packBlocks(matrix);
    this.#checkSize(packed.byteLength);
    const buffer = this.device.createBuffer({ size: packed.byteLength, usage: STORAGE_USAGE });
    this.device.queue.writeBuffer(buffer, 0, packed);
    return new GpuBuffer(buffer, length, type);
  }

  zeros(length: number): GpuBuffer {
    this.#notCapturing("Allocating a buffer");
    const bytes = byteSize(length);
    this.#checkSize(bytes);
    const buffer = this.#pool.acquire(bytes, false);
    this.#commandEncoder().clearBuffer(buffer);
    return new GpuBuffer(buffer, length);
  }

  write(buf: GpuBuffer, data: Float32Array, offset = 0): void {
    this.#notCapturing("A write from the host");
    this.#settle();
    if (offset + data.length > buf.length) throw new RangeError("write past the end of the buffer");
    this.flush(); // recorded work that uses `buf` must run before the write
    this.device.queue.writeBuffer(buf.buffer, offset * 4, bufferSource(data));
  }

  async read(buf: GpuBuffer, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    this.#notCapturing("A read to the host");
    if (offset < 0 || length < 0 || offset + length > buf.length) {
      throw new RangeError(
        `read of [${offset}, ${offset + length}) from a buffer of ${buf.length}`,
      );
    }
    this.#settle();
    // Staging buffers are kept by size: a decode step reads back every token.
    const bytes = Math.max(4, length * 4);
    const staging = this.#staging.get(bytes)?.pop() ?? this.device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    if (length > 0) {
      this.#commandEncoder().copyBufferToBuffer(buf.buffer, offset * 4, staging, 0, length * 4);
    }
    this.flush();
    try {
      await staging.mapAsync(GPUMapMode.READ);
    } catch (error) {
      staging.destroy();
      throw error;
    }
    const out = new Float32Array(staging.getMappedRange().slice(0, length * 4));
    staging.unmap();
    const free = this.#staging.get(bytes);
    if (free) free.push(staging);
    else this.#staging.set(bytes, [staging]);
    this.#throwIfFailed();
    return out;
  }

  copy(dst: GpuBuffer, dstOffset: number, src: GpuBuffer, srcOffset: number, length: number): void {
    if (length <= 0) return;
    if (dstOffset + length > dst.length || srcOffset + length > src.length) {
      throw new RangeError("copy past the end of a buffer");
    }
    this.#settle();
    if (this.#capturing) {
      if (dst.buffer === src.buffer) this.#notCapturing("A copy within one buffer");
      this.#capturing.push({
        copy: [src.buffer, srcOffset * 4, dst.buffer, dstOffset * 4, length * 4],
      });
      return;
    }
    const encoder = this.#commandEncoder();
    if (dst.buffer === src.buffer) {
      const tmp = this.#pool.acquire(byteSize(length), false);
      encoder.copyBufferToBuffer(src.buffer, srcOffset * 4, tmp, 0, length * 4);
      encoder.copyBufferToBuffer(tmp, 0, dst.buffer, dstOffset * 4, length * 4);
      this.#pool.release(tmp);
    } else {
      encoder.copyBufferToBuffer(src.buffer, srcOffset * 4, dst.buffer, dstOffset * 4, length * 4);
    }
  }

  release(buf: GpuBuffer): void {
    this.#settle(); // its shares may be meant for this buffer
    if (buf.parts.length > 0) buf.parts.forEach((part) => this.release(part));
    else this.#pool.release(buf.buffer);
  }

  /**
   * A matrix of `bytes` over the binding limit, uploaded by `uploadPart` in
   * parts of whole rows; null when it fits (or is not a matrix: then
   * #checkSize reports it).
   */
  #split<T extends Float32Array | Uint16Array>(
    data: T,
    bytes: number,
    rowLength: number | undefined,
    uploadPart: (rows: T) => GpuBuffer,
    half: HalfFormat | null,
  ): GpuBuffer | null {
    const limit = Math.min(this.#bindingLimit(), this.#options.splitMatricesOver ?? Infinity);
    if (bytes <= limit || !rowLength || data.length % rowLength !== 0) return null;
    const rowBytes = rowLength * (half ? 2 : 4);
    const rowsPerPart = Math.floor((limit - 16) / rowBytes);
    if (rowsPerPart < 1) return null;
    const parts: GpuBuffer[] = [];
    for (let start = 0; start < data.length; start += rowsPerPart * rowLength) {
      parts.push(uploadPart(data.subarray(start, start + rowsPerPart * rowLength) as T));
    }
    return new GpuBuffer(null, data.length, half ?? "f32", parts, rowsPerPart);
  }

  // ---- operations -------------------------------------------------------------------------

  embed(out: GpuBuffer, table: GpuBuffer, ids: Int32Array, dim: number): void {
    if (ids.length === 0) return;
    this.#notCapturing("An embedding of host ids");
    for (const { part, firstRow } of table.pieces()) {
      // Each part looks up its own rows; the others are marked SKIP (all ones).
      const rows = table.parts.length === 0 ? table.length / dim : table.rowsPerPart;
      const local = ids.map((id) => id >= firstRow && id < firstRow + rows ? id - firstRow : -1);
      if (table.parts.length > 0 && local.every((id) => id < 0)) continue;
      const idBuffer = this.#pool.acquire(byteSize(ids.length), true);
      this.device.queue.writeBuffer(idBuffer, 0, bufferSource(local));
      this.#run(
        gatherProgram(false, table.format),
        [dim, ids.length],
        [],
        { 1: idBuffer, 2: part.buffer, 3: out.buffer },
        grid(Math.ceil((ids.length * dim) / 256)),
      );
      this.#pool.release(idBuffer);
    }
  }

  copyRows(args: CopyRowsArgs<GpuBuffer>): void {
    const { dst, src, width, count, srcRows, dstRows, dstOffset = 0, srcOffset = 0 } = args;
    if (count === 0 || width === 0) return;
    if (src.parts.length === 0 && dst.buffer === src.buffer) {
      throw new RangeError("copyRows cannot copy within one buffer");
    }
    if (srcOffset !== 0 && src.parts.length > 0) {
      throw new RangeError("copyRows takes no offset into a matrix split over buffers");
    }
    const flags = (srcRows ? 1 : 0) | (dstRows ? 2 : 0);
    const dstCount = Math.floor((dst.length - dstOffset) / width);
    for (const { part, firstRow } of src.pieces()) {
      const partRows = Math.floor((part.length - (src.parts.length > 0 ? 0 : srcOffset)) / width);
      this.#run(
        gatherProgram(true, src.format),
        [
          width,
          count,
          dstOffset,
          srcOffset,
          srcRows?.offset ?? 0,
          dstRows?.offset ?? 0,
          flags,
          firstRow,
          partRows,
          dstCount,
        ],
        [],
        {
          1: dst.buffer,
          2: part.buffer,
          3: srcRows?.buf.buffer ?? this.#dummy,
          4: dstRows?.buf.buffer ?? this.#dummy,
        },
        grid(Math.ceil((count * width) / 256)),
      );
    }
  }

  /**
   * Penalizes the rows that have a repetition penalty (penalize.wgsl), then
   * picks: greedy rows take the argmax (argmax.wgsl), rows sampling among up
   * to SAMPLE_MAX_K candidates take sample.wgsl's radix select, and rows
   * sampling among more (a larger top-k, or none) sample_wide.wgsl's passes.
   */
  chooseTokens(args: ChooseArgs<GpuBuffer>): void {
    const { logits, rows, vocab, features, settings, randoms, history, slots, ids } = args;
    if (rows === 0) return;
    const slices = Math.ceil(vocab / SAMPLE_SLICE);
    const u32s = [
      rows,
      vocab,
      args.randomOffset,
      args.historyLength,
      args.step,
      args.idsOffset,
      slices,
    ];
    const common = { 3: settings.buffer, 6: slots.buffer };
    if (features.penalized) {
      // A bitmap of the ids seen per row; rows rounded up so that few sizes are kept.
      const seen = this.#lastingScratch(
        "seen",
        2 ** Math.ceil(Math.log2(rows)) * Math.ceil(vocab / 32),
      );
      this.#run(PROGRAMS.penalize, u32s, [], {
        ...common,
        1: logits.buffer,
        5: history.buffer,
        7: seen.buffer,
      }, [rows, 1, 1]);
    }
    const picked = { ...common, 1: logits.buffer, 2: ids.buffer, 5: history.buffer };
    if (features.greedy) this.#run(PROGRAMS.argmax, u32s, [], picked, [rows, 1, 1]);
    if (features.sampled) {
      // Each slice's top k, (key, id) pairs of two u32s; then each row's.
      const found = this.#lastingScratch("found", rows * slices * SAMPLE_MAX_K * 2);
      const bindings = { ...picked, 4: randoms.buffer, 7: found.buffer };
      this.#run(PROGRAMS.sampleSlices, u32s, [], bindings, [slices, rows, 1]);
      this.#run(PROGRAMS.sample, u32s, [], bindings, [rows, 1, 1]);
    }
    if (features.widestTopK > SAMPLE_MAX_K) {
      const wide = new WideSampling(rows, vocab);
      const scratch = this.#lastingScratch("wide", wide.scratchLength);
      const bindings = { ...picked, 4: randoms.buffer, 7: scratch.buffer };
      for (const pass of wide.passes) {
        this.#run(pass.program, wide.params(u32s, pass), [], bindings, wide.groups(pass));
      }
    }
  }

  rmsNorm(
    out: GpuBuffer,
    x: GpuBuffer,
    weight: GpuBuffer,
    rows: number,
    dim: number,
    eps: number,
  ): void {
    const [input, done] = this.#unaliased(x, rows * dim, out);
    this.#run(
      PROGRAMS.rmsNorm,
      [rows, dim],
      [eps],
      { 1: input, 2: weight.buffer, 3: out.buffer },
      grid(rows),
    );
    done();
  }

  linear(
    out: GpuBuffer,
    x: GpuBuffer,
    weight: GpuBuffer,
    bias: GpuBuffer | null,
    rows: number,
    inDim: number,
    outDim: number,
    accumulate = false,
  ): void {
    this.#linear([out], [outDim], x, weight, bias, rows, inDim, accumulate);
  }

  linearSplit(
    outs: readonly GpuBuffer[],
    widths: readonly number[],
    x: GpuBuffer,
    weight: GpuBuffer,
    bias: GpuBuffer | null,
    rows: number,
    inDim: number,
    norm?: RowNorm<GpuBuffer>,
    conv?: ConvStep<GpuBuffer>,
  ): void {
    if (outs.length > LINEAR_MAX_OUTPUTS) {
      throw new RangeError(`linearSplit takes up to ${LINEAR_MAX_OUTPUTS} outputs`);
    }
    this.#linear(outs, widths, x, weight, bias, rows, inDim, false, norm, conv);
  }

  /**
   * outs get consecutive column blocks of `widths`; a weight split by rows
   * runs one dispatch per part, each writing its columns wherever they go.
   * The GEMV applies a norm and a conv step itself; with the other kernels
   * they run as operations of their own.
   */
  #linear(
    outs: readonly GpuBuffer[],
    widths: readonly number[],
    x: GpuBuffer,
    weight: GpuBuffer,
    bias: GpuBuffer | null,
    rows: number,
    inDim: number,
    accumulate: boolean,
    norm?: RowNorm<GpuBuffer>,
    conv?: ConvStep<GpuBuffer>,
  ): void {
    const { total: outDim, split1, split2 } = columnSplits(widths);
    let program = linearProgram(rows, inDim, outDim, weight.format);
    const fusedNorm = norm && program.shader === "gemv4" ? norm : null;
    const fusedConv = conv && program.shader === "gemv4" ? conv : null;
    const project = fusedConv && this.#foldsProjection(program, weight, widths, fusedConv, rows)
      ? fusedConv.project!
      : null;
    if (project) program = linearProgram(rows, inDim, outDim, weight.format, true);
    if (norm && !fusedNorm) {
      const normed = this.#lastingScratch("normed", rows * inDim);
      this.rmsNorm(normed, x, norm.weight, rows, inDim, norm.eps);
      x = normed;
    }
    const [input, done] = this.#unaliased(x, rows * inDim, ...outs, ...(conv ? [conv.out] : []));
    const projWidth = project ? columnSplits(project.widths).total : 0;
    // Shares of x_proj: one per block of 256 / LANES conv outputs, per row.
    const blocks = project ? split1 / (256 / program.constants.LANES) : 0;
    const parts = project
      ? this.#lastingScratch("shares", rows * blocks * Math.ceil(projWidth / 4) * 4)
      : null;
    // A split weight computes its block of output columns per part.
    for (const { part, firstRow } of weight.pieces()) {
      const partDim = Math.min(part.length / inDim, outDim - firstRow);
      const bindings = {
        1: input,
        2: part.buffer,
        3: bias?.buffer ?? this.#dummy,
        4: (fusedConv?.out ?? outs[0]).buffer,
        5: outs[1]?.buffer ?? this.#dummyOut,
        6: outs[2]?.buffer ?? this.#dummyOut2,
        7: fusedNorm?.weight.buffer ?? this.#dummy,
        8: fusedConv?.weight.buffer ?? this.#dummy,
        9: fusedConv?.bias?.buffer ?? this.#dummy,
        10: fusedConv?.state.buffer ?? this.#dummyOut3,
        11: project?.weight.buffer ?? this.#dummy,
        12: parts?.buffer ?? this.#dummyOut4,
        13: fusedConv?.slots?.buffer ?? this.#dummy,
      };
      const params = [
        rows,
        inDim,
        partDim,
        bias ? 1 : 0,
        outDim,
        firstRow,
        split1,
        split2,
        accumulate ? 1 : 0,
        fusedNorm ? 1 : 0,
        fusedConv?.kernel ?? 0,
        fusedConv?.bias ? 1 : 0,
        projWidth,
        project ? PROJ_FORMATS[project.weight.format] : 0,
        fusedConv?.slots ? 1 : 0,
      ];
      const eps = [fusedNorm?.eps ?? 0];
      const kParts = program.constants.KPARTS ?? 1;
      if (kParts === 1) {
        this.#run(program, params, eps, bindings, linearGroups(program, rows, partDim));
        continue;
      }
      // Sizes rounded up to powers of 2, so few partial buffers are kept.
      const partial = this.#lastingScratch(
        "partial",
        2 ** Math.ceil(Math.log2(kParts * rows * partDim)),
      );
      const groups = linearGroups(program, rows, partDim);
      this.#run(program, params, eps, { ...bindings, 14: partial.buffer }, groups);
      const sumGroups = grid(Math.ceil((rows * partDim) / 256));
      this.#run(
        matmulSumProgram(kParts),
        params,
        eps,
        { ...bindings, 14: partial.buffer },
        sumGroups,
      );
    }
    done();
    if (conv && !fusedConv) convStepAfter(this, outs[0], rows, widths[0], conv);
    else if (conv && !project) projectAfterConv(this, rows, widths[0], conv);
    if (project && parts) {
      const { outs, widths } = project;
      this.#pendingProjection = { outs, widths, rows, blocks, parts };
    }
  }

  /**
   * Whether gemv4 `program` folds in the projection of `conv` for `rows`
   * rows: up to GEMV_MAX_ROWS (on the H100, batch-16 decoding measured no
   * faster with it: its 8-lane GEMV leaves 32 conv outputs to each
   * projectBlock thread), one unsplit weight each, up to three outputs of
   * MAX_FUSED_PROJECTION columns in all, and whole blocks of conv outputs a
   * multiple of 4 wide (projectBlock reads the weights four at a time,
   * 16-byte aligned; a quad never straddles two quantized blocks, as rows
   * and blocks of conv outputs are whole quads).
   */
  #foldsProjection(
    program: Program,
    weight: GpuBuffer,
    widths: readonly number[],
    conv: ConvStep<GpuBuffer>,
    rows: number,
  ): boolean {
    const project = conv.project;
    if (!project || rows > GEMV_MAX_ROWS) return false;
    if (weight.parts.length > 0 || project.weight.parts.length > 0) return false;
    const perGroup = 256 / program.constants.LANES;
    const width = columnSplits(project.widths).total;
    return project.outs.length <= LINEAR_MAX_OUTPUTS && width <= MAX_FUSED_PROJECTION &&
      perGroup % 4 === 0 && widths.length > 1 && widths[0] % perGroup === 0;
  }

  /**
   * Adds up the shares of a folded x_proj into its outputs, if any are
   * pending: before anything but the decode step's scan could read them, and
   * before the shares are overwritten.
   */
  #settle(): void {
    const pending = this.#pendingProjection;
    if (!pending) return;
    this.#pendingProjection = null;
    const { outs, widths, rows, blocks, parts } = pending;
    const { total: width, split1, split2 } = columnSplits(widths);
    const bindings = {
      1: parts.buffer,
      4: outs[0].buffer,
      5: outs[1]?.buffer ?? this.#dummyOut,
      6: outs[2]?.buffer ?? this.#dummyOut2,
    };
    const params = [rows, blocks, width, split1, split2];
    this.#run(PROGRAMS.projectSum, params, [], bindings, grid(Math.ceil((rows * width) / 64)));
  }

  /**
   * A buffer of `length` floats for `purpose` (normalised linear inputs, the
   * shares of a folded x_proj, the top-k of sampled slices, the ids a
   * penalty has seen, the state of wide sampling), one per purpose
   * and size for the backend's life: a recording may name it, so it must
   * not move.
   */
  #lastingScratch(
    purpose: "normed" | "shares" | "found" | "seen" | "wide" | "partial",
    length: number,
  ): GpuBuffer {
    const key = `${purpose}:${length}`;
    let buffer = this.#lasting.get(key);
    if (!buffer) {
      // Created directly (no clear to record): it is written before it is read.
      const bytes = byteSize(length);
      this.#checkSize(bytes);
      const gpuBuffer = this.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
      this.#lasting.set(key, buffer = new GpuBuffer(gpuBuffer, length));
    }
    return buffer;
  }

  addInPlace(acc: GpuBuffer, x: GpuBuffer, length: number): void {
    const [input, done] = this.#unaliased(x, length, acc);
    this.#run(
      PROGRAMS.add,
      [length],
      [],
      { 1: input, 2: acc.buffer },
      grid(Math.ceil(length / 256)),
    );
    done();
  }

  causalConv(
    { out, x, weight, bias, state, slots, len, channels, kernel, batch = 1 }: ConvArgs<GpuBuffer>,
  ): void {
    if (kernel < 1 || kernel > CONV_MAX_KERNEL) {
      throw new RangeError(
        `causalConv supports kernels of 1 to ${CONV_MAX_KERNEL} taps, got ${kernel}`,
      );
    }
    const params = [len, channels, kernel, bias ? 1 : 0, slots ? 1 : 0];
    // Sequence b of a batch is workgroup z = b.
    const perSequence = ([gx, gy]: number[]): [number, number, number] => [gx, gy, batch];
    const all = {
      1: x.buffer,
      2: weight.buffer,
      3: bias?.buffer ?? this.#dummy,
      4: out.buffer,
      5: state.buffer,
      6: slots?.buffer ?? this.#dummy,
    };
    if (len <= CONV_SEQUENTIAL_MAX_LEN) {
      this.#run(
        PROGRAMS.convSequential,
        params,
        [],
        all,
        perSequence(grid(Math.ceil(channels / 256))),
      );
      return;
    }
    this.#run(
      PROGRAMS.convOutputs,
      params,
      [],
      all,
      perSequence(grid(Math.ceil((len * channels) / 256))),
    );
    if (kernel > 1) {
      this.#run(
        PROGRAMS.convUpdateState,
        params,
        [],
        all,
        perSequence(grid(Math.ceil(channels / 256))),
      );
    }
  }

  supports(op: OptionalOp): boolean {
    return op !== "channelMajorScan";
  }

  /**
   * Mamba-2's SSD: a decode step as the recurrence, 16 threads per channel; a
   * prompt in chunks of {@link SSD_CHUNK} tokens, in three passes (see
   * wgsl/ssd.wgsl) over scratch buffers of the chunks' states.
   */
  ssdScan(args: SsdArgs<GpuBuffer>): void {
    const { y, xBC, dt, dtBias, dtLimit, A, D, state, slots, len, batch } = args;
    const { heads, headDim, groups, dState } = args;
    const flags = (D ? 1 : 0) | (slots ? 2 : 0);
    const f32s = [Math.max(dtLimit[0], -F32_MAX), Math.min(dtLimit[1], F32_MAX)];
    const buffers: Record<number, GPUBuffer> = {
      1: xBC.buffer,
      2: dt.buffer,
      3: dtBias.buffer,
      4: A.buffer,
      5: D?.buffer ?? this.#dummy,
      6: slots?.buffer ?? this.#dummy,
      7: y.buffer,
      8: state.buffer,
    };
    // ssd.wgsl's Params: len, batch, heads, headDim, groups, dState, nChunks, flags, seqLen, start.
    const sizes = [batch, heads, headDim, groups, dState];
    if (len === 1) {
      const u32s = [1, ...sizes, 1, flags, 1, 0];
      const groupsNeeded = Math.ceil((batch * heads * headDim) / SSD_STEP_CHANNELS);
      this.#run(SSD_PROGRAMS.step, u32s, f32s, buffers, grid(groupsNeeded));
      return;
    }
    this.#notCapturing("A chunked SSD scan");
    // Segments of whole chunks whose chunk states fit the budget.
    const budget = this.#options.ssdStatesBytes ?? SSD_STATES_BYTES;
    const chunkStateFloats = batch * heads * headDim * dState;
    const chunksPerSegment = Math.max(1, Math.floor(budget / 4 / chunkStateFloats));
    const segment = Math.min(len, chunksPerSegment * SSD_CHUNK);
    const scratch = [
      Math.ceil(segment / SSD_CHUNK) * chunkStateFloats,
      batch * heads * segment,
      batch * heads * segment,
    ].map((floats) => this.#pool.acquire(byteSize(floats), false));
    [buffers[9], buffers[10], buffers[11]] = scratch;
    const carryGroups = grid(Math.ceil(chunkStateFloats / SSD_WG));
    for (let start = 0; start < len; start += segment) {
      const segmentLen = Math.min(segment, len - start);
      const nChunks = Math.ceil(segmentLen / SSD_CHUNK);
      const u32s = [segmentLen, ...sizes, nChunks, flags, len, start];
      const perChunk: [number, number, number] = [nChunks, heads, batch];
      this.#run(SSD_PROGRAMS.chunkState, u32s, f32s, buffers, perChunk);
      this.#run(SSD_PROGRAMS.carry, u32s, f32s, buffers, carryGroups);
      this.#run(SSD_PROGRAMS.output, u32s, f32s, buffers, perChunk);
    }
    for (const buffer of scratch) this.#pool.release(buffer);
  }

  gatedRmsNorm(args: GatedNormArgs<GpuBuffer>): void {
    const { out, x, gate, weight, rows, dim, groupSize, eps } = args;
    const [input, done] = this.#unaliased(x, rows * dim, out);
    const [gateInput, gateDone] = this.#unaliased(gate, rows * dim, out);
    this.#run(
      SSD_PROGRAMS.gatedNorm,
      [rows, dim, groupSize],
      [eps],
      { 1: input, 2: gateInput, 3: weight.buffer, 4: out.buffer },
      grid(rows * (dim / groupSize)),
    );
    done();
    gateDone();
  }

  selectiveScan(scanArgs: ScanArgs<GpuBuffer>): void {
    if ((scanArgs.batch ?? 1) === 0 || scanArgs.len === 0) return;
    if (this.#options.scanPrecision === "double-float") {
      return this.#scanDoubleFloat(projectDelta(this, scanArgs));
    }
    // A decode step folds dt_proj into the scan; longer scans take it as a matmul.
    const projection = scanArgs.len === 1 && scanArgs.deltaProj?.weight.parts.length === 0
      ? scanArgs.deltaProj
      : undefined;
    const args = projection ? scanArgs : projectDelta(this, scanArgs);
    const { delta, B, C, len, dim, dState } = args;
    const batch = args.batch ?? 1;
    // dt, B and C as the shares of an x_proj that in_proj's GEMV folded in.
    const pending = this.#pendingProjection;
    const shares = projection && pending && pending.outs[0] === projection.dt &&
        pending.outs[1] === B && pending.outs[2] === C && pending.rows === batch &&
        pending.widths.join() === [projection.rank, dState, dState].join()
      ? pending
      : null;
    if (shares) this.#pendingProjection = null;
    const flags = scanFlags(args) | (projection ? SCAN_DT_FLAGS[projection.weight.format] : 0);
    // The kernels hold 16 states per thread; larger state sizes run group by group.
    const nGroups = Math.ceil(dState / SCAN_LANES);
    // What every pass binds; each program takes the ones it declares.
    const common = this.#scanBindings(args);
    if (projection) {
      const bindings = {
        ...common,
        13: projection.dt.buffer,
        14: projection.weight.buffer,
        15: shares?.parts.buffer ?? this.#dummy,
      };
      const program = shares ? SCAN_PROGRAMS.stepProjected : SCAN_PROGRAMS.step;
      const channelsPerGroup = program.constants.WG / 4; // four threads per channel
      const blocks = shares?.blocks ?? 0;
      for (let group = 0; group < nGroups; group++) {
        const params = [
          1,
          dim,
          batch,
          1,
          1,
          flags,
          dState,
          group,
          nGroups,
          projection.rank,
          blocks,
        ];
        const groups = Math.ceil(dim / channelsPerGroup);
        this.#run(program, params, [], bindings, [groups, 1, batch]);
      }
      return;
    }
    const chunkLen = this.scanChunkLen(batch, dim, len);
    const nChunks = Math.ceil(len / chunkLen);
    const channelGroups = Math.ceil(dim / SCAN_WG);
    if (nChunks > 1) this.#notCapturing("A scan over several chunks");
    const hbuf = nChunks > 1
      ? this.#pool.acquire(byteSize(batch * nChunks * dim * SCAN_LANES), false)
      : null;
    const dtsum = nChunks > 1 ? this.#pool.acquire(byteSize(batch * nChunks * dim), false) : null;
    const bindings = {
      ...common,
      2: delta.buffer,
      11: hbuf ?? this.#dummyOut,
      12: dtsum ?? this.#dummyOut,
    };
    for (let group = 0; group < nGroups; group++) {
      const params = [len, dim, batch, chunkLen, nChunks, flags, dState, group, nGroups, 0];
      if (nChunks > 1) {
        this.#run(
          SCAN_PROGRAMS.chunkState,
          params,
          [],
          bindings,
          [channelGroups, nChunks - 1, batch],
        );
        this.#run(
          SCAN_PROGRAMS.carry,
          params,
          [],
          bindings,
          grid(Math.ceil((batch * dim * 4) / 256)),
        );
      }
      this.#run(
        SCAN_PROGRAMS.output,
        params,
        [],
        bindings,
        [channelGroups, nChunks, batch],
      );
    }
    if (hbuf) this.#pool.release(hbuf);
    if (dtsum) this.#pool.release(dtsum);
  }

  /**
   * The scan in double-float arithmetic (scan_double_float.wgsl), one thread
   * per channel, in dispatches of at most 2^15 steps of one state per thread.
   */
  #scanDoubleFloat(args: ScanArgs<GpuBuffer>): void {
    const { delta, len, dim, dState } = args;
    const batch = args.batch ?? 1;
    const stateLo = this.#pool.acquire(byteSize(batch * dim * dState), false);
    const bindings = {
      ...this.#scanBindings(args),
      2: delta.buffer,
      11: stateLo,
      12: args.slots?.buffer ?? this.#dummy,
    };
    const tokensPerDispatch = Math.max(1, Math.floor(2 ** 15 / (dState + 1)));
    const flags = scanFlags(args);
    const zero = 0; // the kernel's `params.zero`
    const groups: [number, number, number] = [Math.ceil(dim / DOUBLE_FLOAT_SCAN_WG), 1, batch];
    for (let start = 0; start < len; start += tokensPerDispatch) {
      const count = Math.min(tokensPerDispatch, len - start);
      const params = [len, dim, batch, flags, dState, start, count, zero];
      this.#run(SCAN_PROGRAMS.doubleFloat, params, [], bindings, groups);
    }
    this.#pool.release(stateLo);
  }

  /** The bindings of every scan kernel: inputs 1 and 3 to 8 (a dummy for those absent), y, state and slots. */
  #scanBindings(args: ScanArgs<GpuBuffer>): Record<number, GPUBuffer> {
    return {
      16: args.slots?.buffer ?? this.#dummy,
      1: args.u.buffer,
      3: args.A.buffer,
      4: args.B.buffer,
      5: args.C.buffer,
      6: args.D?.buffer ?? this.#dummy,
      7: args.z?.buffer ?? this.#dummy,
      8: args.deltaBias?.buffer ?? this.#dummy,
      9: args.y.buffer,
      10: args.state.buffer,
    };
  }

  /** Tokens per chunk of the scan for this shape. */
  scanChunkLen(batch: number, dim: number, len: number): number {
    if (this.#options.scanChunkLen) return Math.min(len, Math.max(1, this.#options.scanChunkLen));
    const target = this.#options.scanTargetThreads ?? 131072;
    const channels = batch * Math.ceil(dim / SCAN_WG) * SCAN_WG;
    const chunks = Math.min(MAX_GROUPS, Math.max(1, Math.ceil(target / channels)));
    const chunkLen = Math.ceil(Math.ceil(len / chunks) / SCAN_TILE) * SCAN_TILE;
    return Math.min(len, Math.max(SCAN_MIN_CHUNK, chunkLen, Math.ceil(len / MAX_GROUPS)));
  }

  // ---- submission -------------------------------------------------------------------------

  /**
   * Submits the recorded work (no wait). Inside a {@link capture} it does
   * nothing: what is captured is submitted where it is replayed.
   */
  flush(): void {
    if (this.#capturing || !this.#encoder) return;
    if (this.#pass) {
      this.#pass.end();
      this.#pass = null;
    }
    const slotsPerChunk = PARAM_CHUNK / PARAM_SLOT;
    for (let i = 0; i * slotsPerChunk < this.#paramSlots; i++) {
      const used = Math.min(this.#paramSlots - i * slotsPerChunk, slotsPerChunk) * PARAM_SLOT;
      this.device.queue.writeBuffer(this.#paramBuffers[i], 0, this.#paramWords[i], 0, used / 4);
    }
    this.device.queue.submit([this.#encoder.finish()]);
    this.#encoder = null;
    this.#paramSlots = 0;
    this.submissions++;
    this.#pool.submitted();
  }

  /** Submits the recorded work and waits until the GPU has done it. */
  async sync(): Promise<void> {
    this.flush();
    await this.device.queue.onSubmittedWorkDone();
    this.#throwIfFailed();
  }

  /** Destroys the device and every buffer on it; the backend must not be used again. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    if (this.#pass) this.#pass.end();
    this.#pass = null;
    this.#encoder = null;
    this.device.destroy();
  }

  #bindingLimit(): number {
    return Math.min(
      this.device.limits.maxStorageBufferBindingSize,
      this.device.limits.maxBufferSize,
    );
  }

  #checkSize(bytes: number): void {
    const limit = this.#bindingLimit();
    if (bytes > limit) {
      throw new RangeError(
        `A buffer of ${bytes} bytes exceeds this WebGPU device's limit of ${limit} bytes ` +
          `(maxStorageBufferBindingSize): use backend "wasm" or "js" for this model`,
      );
    }
  }

  #throwIfFailed(): void {
    if (this.#error) {
      const error = this.#error as { message?: string };
      this.#error = null;
      throw new Error(`WebGPU error: ${error.message ?? String(error)}`);
    }
  }

  #commandEncoder(): GPUCommandEncoder {
    if (this.#disposed) throw new Error("The WebGPU backend was disposed");
    if (this.#pass) {
      this.#pass.end();
      this.#pass = null;
    }
    return this.#encoder ??= this.device.createCommandEncoder();
  }

  #computePass(): GPUComputePassEncoder {
    if (this.#pass) return this.#pass;
    const encoder = this.#commandEncoder();
    return this.#pass = encoder.beginComputePass();
  }

  /** `x`'s buffer, or a copy of its first `length` floats when `x` is also an output. */
  #unaliased(x: GpuBuffer, length: number, ...outputs: GpuBuffer[]): [GPUBuffer, () => void] {
    if (!outputs.some((o) => o.buffer === x.buffer)) return [x.buffer, () => {}];
    this.#notCapturing("An operation whose input is also its output");
    const tmp = this.#pool.acquire(byteSize(length), false);
    this.#commandEncoder().copyBufferToBuffer(x.buffer, 0, tmp, 0, length * 4);
    return [tmp, () => this.#pool.release(tmp)];
  }

  /**
   * The bind group layout of a program: its uniform block with a dynamic offset
   * (so that one bind group serves every dispatch on the same buffers), then
   * its storage buffers.
   */
  #layout(program: Program): GPUBindGroupLayout {
    const key = program.layoutKey;
    let layout = this.#layouts.get(key);
    if (!layout) {
      const writable = program.writable;
      layout = this.device.createBindGroupLayout({
        label: key,
        entries: program.bindings.map((binding) => ({
          binding,
          visibility: GPUShaderStage.COMPUTE,
          buffer: binding === 0
            ? { type: "uniform", hasDynamicOffset: true, minBindingSize: 0 }
            : { type: writable.includes(binding) ? "storage" : "read-only-storage" },
        })),
      });
      this.#layouts.set(key, layout);
    }
    return layout;
  }

  #pipeline(program: Program): GPUComputePipeline {
    let pipeline = this.#pipelines.get(program.key);
    if (!pipeline) {
      let module = this.#modules.get(program.moduleKey);
      if (!module) {
        module = this.device.createShaderModule({ label: program.shader, code: program.source() });
        this.#modules.set(program.moduleKey, module);
      }
      pipeline = this.device.createComputePipeline({
        label: program.key,
        layout: this.device.createPipelineLayout({ bindGroupLayouts: [this.#layout(program)] }),
        compute: { module, entryPoint: program.entry },
      });
      this.#pipelines.set(program.key, pipeline);
    }
    return pipeline;
  }

  /** A small number naming each buffer in bind group cache keys. */
  #id(buffer: GPUBuffer): number {
    let id = this.#ids.get(buffer);
    if (id === undefined) this.#ids.set(buffer, id = this.#nextId++);
    return id;
  }

  /** A uniform block holding `u32s` then `f32s`, valid for the current encoder. */
  #params(u32s: readonly number[], f32s: readonly number[]): { buffer: GPUBuffer; offset: number } {
    const slotsPerChunk = PARAM_CHUNK / PARAM_SLOT;
    const chunk = Math.floor(this.#paramSlots / slotsPerChunk);
    const slot = this.#paramSlots % slotsPerChunk;
    this.#paramSlots++;
    if (chunk === this.#paramBuffers.length) {
      this.#paramBuffers.push(this.device.createBuffer({
        size: PARAM_CHUNK,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      }));
      const data = new ArrayBuffer(PARAM_CHUNK);
      this.#paramWords.push(new Uint32Array(data));
      this.#paramFloats.push(new Float32Array(data));
    }
    const offset = slot * PARAM_SLOT;
    const word = offset / 4;
    const words = this.#paramWords[chunk];
    words.fill(0, word, word + PARAM_SLOT / 4);
    words.set(u32s, word);
    this.#paramFloats[chunk].set(f32s, word + u32s.length);
    return { buffer: this.#paramBuffers[chunk], offset };
  }

  #run(
    program: Program,
    u32s: readonly number[],
    f32s: readonly number[],
    buffers: Record<number, GPUBuffer>,
    groups: [number, number, number],
  ): void {
    this.#settle();
    if (groups.some((g) => g === 0)) return;
    if (groups.some((g) => g > MAX_GROUPS)) {
      throw new RangeError(`${program.key}: ${groups.join("×")} workgroups exceed ${MAX_GROUPS}`);
    }
    const storage = program.bindings.filter((b) => b !== 0).map((b) => buffers[b]);
    if (this.#capturing) {
      const words = new Uint32Array(PARAM_SLOT / 4);
      words.set(u32s);
      new Float32Array(words.buffer).set(f32s, u32s.length);
      this.#capturing.push({ program, words, storage, groups });
      return;
    }
    const pipeline = this.#pipeline(program);
    const pass = this.#computePass();
    const params = this.#params(u32s, f32s);
    pass.setPipeline(pipeline);
    this.#offset[0] = params.offset;
    pass.setBindGroup(0, this.#bindGroup(program, params.buffer, storage), this.#offset, 0, 1);
    pass.dispatchWorkgroups(...groups);
    this.dispatches++;
  }

  /** The bind group of `program` over a uniform arena buffer and its storage buffers, cached. */
  #bindGroup(program: Program, params: GPUBuffer, storage: GPUBuffer[]): GPUBindGroup {
    let key = `${program.layoutKey}|${this.#id(params)}`;
    for (const buffer of storage) key += `|${this.#id(buffer)}`;
    let bindGroup = this.#bindGroups.get(key);
    if (!bindGroup) {
      if (this.#bindGroups.size >= MAX_BIND_GROUPS) this.#bindGroups.clear();
      bindGroup = this.device.createBindGroup({
        layout: this.#layout(program),
        entries: program.bindings.map((binding, i) => ({
          binding,
          resource: binding === 0
            ? { buffer: params, offset: 0, size: PARAM_SLOT }
            : { buffer: storage[i - 1] },
        })),
      });
      this.#bindGroups.set(key, bindGroup);
    }
    return bindGroup;
  }

  // ---- recordings ---------------------------------------------------------------------------

  /**
   * Records the launches and copies `ops` issues without running them; see
   * {@link Backend.capture}. A replay then costs three calls per launch, with
   * no parameter packing, bind group lookup or uniform upload.
   */
  capture(ops: () => void): GpuRecording {
    if (this.#capturing) throw new Error("A capture is already in progress");
    this.#settle(); // work from before the capture is not part of it
    const log: CaptureLog = this.#capturing = [];
    try {
      ops();
      this.#settle(); // nor does a recording leave work for after it
    } finally {
      this.#capturing = null;
    }
    const launches = log.filter((entry): entry is PendingLaunch => !("copy" in entry));
    let params: GPUBuffer | null = null;
    if (launches.length > 0) {
      const words = new Uint32Array(launches.length * PARAM_SLOT / 4);
      launches.forEach((launch, i) => words.set(launch.words, i * PARAM_SLOT / 4));
      params = this.device.createBuffer({
        size: words.byteLength,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      });
      this.device.queue.writeBuffer(params, 0, words);
    }
    let slot = 0;
    const steps = log.map((entry): RecordedStep => {
      if ("copy" in entry) return entry;
      return {
        pipeline: this.#pipeline(entry.program),
        bindGroup: this.#bindGroup(entry.program, params!, entry.storage),
        offsets: Uint32Array.of(slot++ * PARAM_SLOT),
        groups: entry.groups,
      };
    });
    return new GpuRecording(steps, params);
  }

  replay(recording: GpuRecording): void {
    this.#settle();
    let pipeline: GPUComputePipeline | null = null;
    for (const step of recording.steps) {
      if ("copy" in step) {
        this.#commandEncoder().copyBufferToBuffer(...step.copy);
        pipeline = null;
        continue;
      }
      const pass = this.#computePass();
      if (step.pipeline !== pipeline) pass.setPipeline(pipeline = step.pipeline);
      pass.setBindGroup(0, step.bindGroup, step.offsets, 0, 1);
      pass.dispatchWorkgroups(...step.groups);
      this.dispatches++;
    }
  }

  releaseRecording(recording: GpuRecording): void {
    recording.params?.destroy();
  }

  /** Fails for what a recording cannot hold: host transfers and temporary buffers. */
  #notCapturing(what: string): void {
    if (this.#capturing) {
      throw new Error(`${what} cannot be recorded by capture()`);
    }
  }
}
