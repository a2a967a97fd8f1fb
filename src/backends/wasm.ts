/**
 * The WebAssembly SIMD backend: AssemblyScript kernels (asm/kernels/, built
 * into src/generated/kernels_wasm.ts) over buffers that are ranges of one
 * `WebAssembly.Memory`, optionally split across worker threads that share it.
 *
 * Threads: with `threads > 1` the memory is shared and `threads - 1` workers
 * instantiate the same module on it. The large operations (matmuls, GEMVs and
 * the scan) are split over output columns / channels; the main thread writes
 * the job into a control block in the shared memory, bumps a generation
 * counter and runs its own part, and workers, which spin briefly and then
 * `Atomics.wait` on that counter, run theirs and count themselves done. No
 * message is posted per operation. In Deno and Node the workers are
 * `node:worker_threads` workers, unref'd, so they never keep the process
 * alive; elsewhere they are module workers from a blob URL. {@link
 * WasmBackend.dispose} stops them at once.
 *
 * `threads: 1` uses no workers and no SharedArrayBuffer (edge runtimes).
 *
 * SIMD: the kernels are built twice, with relaxed SIMD and with plain SIMD
 * only. The backend runs the relaxed build where `WebAssembly.validate`
 * accepts a tiny module of the two relaxed instructions it uses, else the
 * plain one, so that runtimes without relaxed SIMD still get the backend;
 * {@link WasmBackendOptions.simd} forces either ({@link WasmBackend.simd}
 * says which runs).
 *
 * @module
 */

import {
  type AddArgs,
  type Backend,
  type ChooseArgs,
  type ConvArgs,
  convEachSequence,
  type CopyArgs,
  type CopyRowsArgs,
  type EmbedArgs,
  type GatedNormArgs,
  type LinearArgs,
  type LinearSplitArgs,
  type OptionalOp,
  type Recording,
  type RmsNormArgs,
  type ScanArgs,
  scanEachSequence,
  type SsdArgs,
  stateRows,
} from "../backend.ts";
import {
  KERNELS_PLAIN_SHARED_BASE64,
  KERNELS_PLAIN_SINGLE_BASE64,
  KERNELS_RELAXED_SHARED_BASE64,
  KERNELS_RELAXED_SINGLE_BASE64,
} from "../generated/kernels_wasm.ts";
import { PickScratch } from "../sampler.ts";
import {
  BLOCK_BYTES,
  BLOCK_ELEMENTS,
  type BlockType,
  type HalfFormat,
  type HalfMatrix,
  type QuantizedMatrix,
} from "../quant.ts";
import { q4KScaleMin } from "../gguf.ts";
import { f16ToF32 } from "../safetensors.ts";
import { chooseOnHost, HostRecording } from "./host.ts";

/** Options of the wasm backend. */
export interface WasmBackendOptions {
  /** Threads, the calling one included; default `navigator.hardwareConcurrency`. */
  threads?: number;
  /**
   * Whether the memory is a shared one (default: wherever SharedArrayBuffer
   * exists). Threads need it, and so does {@link WasmBackend.hostBytes}: a
   * shared memory grows without detaching the views the loader read weights
   * into, so they upload without a copy.
   */
  sharedMemory?: boolean;
  /**
   * Which build of the kernels runs (see {@link WasmSimd}); default
   * "relaxed" where the runtime validates relaxed SIMD, else "plain".
   */
  simd?: WasmSimd;
  /**
   * Whether the one-row GEMVs over Q8_0 blocks take relaxed SIMD's int8 dot
   * products (`i32x4.relaxed_dot_i8x16_i7x16_add_s`, default true) rather than
   * plain SIMD's int16 ones. Only the relaxed-SIMD build has them: the plain
   * one always takes the int16 GEMV. False keeps the int16 GEMV in the
   * relaxed build too, for engines that lower the int8 one slowly and for
   * tests.
   */
  relaxedDot?: boolean;
}

/**
 * The two builds of the same kernels: "relaxed" uses relaxed SIMD (fused
 * multiply-adds, whose last bit may differ between CPUs, and the Q8_0 GEMV's
 * int8 dot products); "plain" only fixed-width SIMD, multiplying and adding
 * separately, for runtimes that validate SIMD but not relaxed SIMD.
 */
export type WasmSimd = "relaxed" | "plain";

/** A buffer of the wasm backend: `length` floats at byte offset `ptr` of its memory. */
export class WasmBuffer {
  /** Byte offset in the module's memory (64-byte aligned; 4 for views of lent bytes). */
  ptr: number;
  /** Length in floats. */
  readonly length: number;
  /** Bytes reserved (the allocator's size class); 0 for a view of lent host bytes. */
  readonly bytes: number;

  constructor(ptr: number, length: number, bytes: number) {
    this.ptr = ptr;
    this.length = length;
    this.bytes = bytes;
  }
}

/**
 * Bytes of a block as the wasm backend holds it, repacked at upload from
 * ggml's layout (see asm/kernels/q8_0.ts, q4_0.ts and q4_k.ts): f32 scales, loaded with one
 * instruction, then the values. Q8_0: −16 times the sum of the values as an
 * i32 (the relaxed GEMV's offset input needs it), then the 32 int8 values in
 * order (40 bytes, against ggml's 34), which the GEMV multiplies as int8 or
 * widens to int16 as it loads them for integer dot products; Q4_0: the scale times 2^-28, then the 4-bit values as
 * four i32 lanes, lane j holding weight 4k + j at nibble k, as the signed
 * nibble u − 8 (20 bytes, against 18), so that a shift and a mask widen them
 * instead of byte shuffles. Q4_K (a super-block of 256): d and dmin as f32,
 * the 8 sub-blocks' 6-bit scales and then their mins a byte each, then each
 * sub-block's 32 values in 16 bytes as eight u16 lanes, lane k holding value
 * 8n + k at nibble n, which a shift and a mask give as int16 in order (152
 * bytes, against 144: 4.75 bits a weight).
 */
const PACKED_BYTES: Record<BlockType, number> = { q8_0: 40, q4_0: 20, q4_k: 152 };

/** Where a repacked Q8_0 block's values start, after d and −16 times their sum. */
const Q8_VALUES = 8;

/** Where a repacked Q4_K super-block's values start, after d, dmin, the scales and the mins. */
const Q4K_VALUES = 24;

/** Bytes of one repacked row of `cols` weights. */
const packedRowBytes = (type: BlockType, cols: number) =>
  (cols / BLOCK_ELEMENTS[type]) * PACKED_BYTES[type];

/**
 * Q8_0 and Q4_K rows are held in quads, their blocks interleaved (block b of
 * row 4g + r at quad g's start + (4·b + r)·blockBytes) so that the GEMV's four
 * rows per pass are one sequential stream; the last quad is padded with zero
 * rows. Quad g starts where row 4g would in a plain layout, so a view from a
 * row that is a multiple of 4 is a matrix of the same layout.
 */
const QUAD = 4;

/**
 * linearSplit runs one linear over every output when one of them is narrower
 * than this (x_proj's dt, B and C): each copied column costs about one
 * multiply-add in inDim, a call of its own costs a dispatch (docs/performance.md).
 */
const NARROW_OUTPUT = 64;

/** Whether a format's rows are held in quads (see {@link QUAD}). */
const inQuads = (type: BlockType) => type !== "q4_0";

/** Byte offset of block `block` of row `row` in a repacked matrix of `cols` columns. */
function blockOffset(type: BlockType, cols: number, row: number, block: number): number {
  const blockBytes = PACKED_BYTES[type];
  if (!inQuads(type)) return row * packedRowBytes(type, cols) + block * blockBytes;
  const quad = row - (row % QUAD);
  return quad * packedRowBytes(type, cols) + (block * QUAD + (row % QUAD)) * blockBytes;
}

/** Bytes a repacked matrix takes: rows in quads rounded up to whole quads. */
const packedBytes = (type: BlockType, rows: number, cols: number) =>
  (inQuads(type) ? Math.ceil(rows / QUAD) * QUAD : rows) * packedRowBytes(type, cols);

/**
 * A weight matrix [rows, cols] kept as repacked Q8_0, Q4_0 or Q4_K blocks in the
 * module's memory: `linear` runs the kernels of its type on it, `embed` and
 * `copyRows` dequantize the rows they gather. Its `length` counts the bytes
 * of its rows in floats.
 */
export class WasmQuantMatrix extends WasmBuffer {
  /** The block format. */
  readonly type: BlockType;
  /** Output rows. */
  readonly rows: number;
  /** Elements per row, a multiple of the format's block (32, or 256 for Q4_K). */
  readonly cols: number;

  constructor(type: BlockType, ptr: number, rows: number, cols: number, bytes: number) {
    super(ptr, (rows * packedRowBytes(type, cols)) / 4, bytes);
    this.type = type;
    this.rows = rows;
    this.cols = cols;
  }
}

/**
 * A weight matrix [rows, cols] of an F16 or BF16 checkpoint, kept 16-bit in
 * the module's memory, rows back to back: half the memory and half the bytes
 * a decode step streams. `linear` runs the 16-bit kernels on it (`linearHalf`
 * in asm/kernels/half.ts); `embed` and `copyRows` widen the rows they gather
 * (`widenHalfRow`). Its `length` counts its bytes in floats.
 */
export class WasmHalfMatrix extends WasmBuffer {
  /** Output rows. */
  readonly rows: number;
  /** Elements per row. */
  readonly cols: number;
  /** The 16-bit format of its values. */
  readonly format: HalfFormat;

  constructor(ptr: number, rows: number, cols: number, bytes: number, format: HalfFormat) {
    super(ptr, Math.ceil((rows * cols) / 2), bytes);
    this.rows = rows;
    this.cols = cols;
    this.format = format;
  }
}

/**
 * ggml's blocks of a [rows, cols] matrix of `type` into `out` (zeroed, of
 * {@link packedBytes}) in the kernels' layout (see {@link PACKED_BYTES} and
 * {@link QUAD}).
 */
function packBlocks(
  type: BlockType,
  rows: number,
  cols: number,
  blocks: Uint8Array,
  out: Uint8Array,
): void {
  const scales = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const from = BLOCK_BYTES[type];
  const perRow = cols / BLOCK_ELEMENTS[type];
  for (let row = 0, at = 0; row < rows; row++) {
    for (let block = 0; block < perRow; block++, at += from) {
      const put = blockOffset(type, cols, row, block);
      const d = f16ToF32(blocks[at] | (blocks[at + 1] << 8));
      if (type === "q8_0") {
        const values = new Int8Array(blocks.buffer, blocks.byteOffset + at + 2, from - 2);
        scales.setFloat32(put, d, true);
        scales.setInt32(put + 4, -16 * values.reduce((sum, q) => sum + q, 0), true);
        out.set(blocks.subarray(at + 2, at + from), put + Q8_VALUES);
        continue;
      }
      if (type === "q4_k") {
        scales.setFloat32(put, d, true);
        scales.setFloat32(put + 4, f16ToF32(blocks[at + 2] | (blocks[at + 3] << 8)), true);
        for (let sub = 0; sub < 8; sub++) {
          const [scale, min] = q4KScaleMin(blocks, at + 4, sub);
          out[put + 8 + sub] = scale;
          out[put + 16 + sub] = min;
          // ggml's sub-block 2i is the low nibbles of bytes 32i..32i + 31, 2i + 1 the high ones.
          const chunk = at + 16 + (sub >> 1) * 32, shift = (sub & 1) * 4;
          for (let e = 0; e < 32; e++) {
            const q = (blocks[chunk + e] >> shift) & 15;
            // Value e = 8n + k goes to u16 lane k, nibble n (little-endian: byte 2k + (n >> 1)).
            const n = e >> 3, k = e & 7;
            out[put + Q4K_VALUES + 16 * sub + 2 * k + (n >> 1)] |= q << (4 * (n & 1));
          }
        }
        continue;
      }
      scales.setFloat32(put, d * 2 ** -28, true);
      for (let e = 0; e < 32; e++) {
        const byte = blocks[at + 2 + (e & 15)];
        const u = e < 16 ? byte & 0x0f : byte >> 4;
        // u − 8 as a 4-bit two's complement is u ^ 8; weight e = 4k + j goes to lane j, nibble k.
        const k = e >> 2, j = e & 3;
        out[put + 4 + 4 * j + (k >> 1)] |= (u ^ 8) << (4 * (k & 1));
      }
    }
  }
}

/** What the wasm backend keeps a scratch buffer for. */
type ScratchPurpose = "linear" | "panel" | "conv" | "scan" | "ssd" | "dequant" | "split";

/**
 * A view of `length` floats of `buf` from `offset` (never released on its
 * own); of a quantized matrix, the rows `offset / cols` on, `length / cols` of
 * them (for Q8_0 and Q4_K, from a multiple of 4: see {@link QUAD}).
 */
const view = (buf: WasmBuffer, offset: number, length: number): WasmBuffer =>
  buf instanceof WasmQuantMatrix
    ? new WasmQuantMatrix(
      buf.type,
      buf.ptr + (offset / buf.cols) * packedRowBytes(buf.type, buf.cols),
      length / buf.cols,
      buf.cols,
      0,
    )
    : buf instanceof WasmHalfMatrix
    ? new WasmHalfMatrix(buf.ptr + offset * 2, length / buf.cols, buf.cols, 0, buf.format)
    : new WasmBuffer(buf.ptr + offset * 4, length, 0);

interface Kernels {
  scan(
    y: number,
    u: number,
    delta: number,
    A: number,
    B: number,
    C: number,
    D: number,
    z: number,
    bias: number,
    softplus: number,
    state: number,
    len: number,
    dim: number,
    dState: number,
    tokenStride: number,
    channelStride: number,
    d0: number,
    d1: number,
    scratch: number,
  ): void;
  scanScratchBytes(dState: number): number;
  scanStep(
    y: number,
    u: number,
    delta: number,
    A: number,
    B: number,
    C: number,
    D: number,
    z: number,
    bias: number,
    softplus: number,
    state: number,
    slots: number,
    batch: number,
    dim: number,
    dState: number,
    i0: number,
    i1: number,
  ): void;
  linear(
    out: number,
    x: number,
    w: number,
    bias: number,
    rows: number,
    inDim: number,
    outDim: number,
    o0: number,
    o1: number,
    panel: number,
  ): void;
  /** Bytes of the matmul's per-thread panel for rows of inDim. */
  panelBytes(inDim: number): number;
  /** Bytes of the conv's per-thread scratch for a kernel of `kernel` taps. */
  convScratchBytes(kernel: number): number;
  convStepScratchBytes(channels: number, kernel: number): number;
  rmsNorm(out: number, x: number, weight: number, rows: number, dim: number, eps: number): void;
  addInPlace(acc: number, x: number, n: number): void;
  convStep(
    out: number,
    x: number,
    weight: number,
    bias: number,
    states: number,
    slots: number,
    batch: number,
    channels: number,
    kernel: number,
    scratch: number,
  ): void;
  causalConv(
    out: number,
    x: number,
    weight: number,
    bias: number,
    state: number,
    len: number,
    channels: number,
    kernel: number,
    scratch: number,
    c0: number,
    c1: number,
  ): void;
  ssd(
    y: number,
    xBC: number,
    dt: number,
    dtBias: number,
    A: number,
    D: number,
    state: number,
    slots: number,
    len: number,
    heads: number,
    headDim: number,
    groups: number,
    dState: number,
    chunk: number,
    dtMin: number,
    dtMax: number,
    u0: number,
    u1: number,
    scratch: number,
  ): void;
  ssdScratchBytes(chunk: number, headDim: number): number;
  ssdStep(
    y: number,
    xBC: number,
    dt: number,
    dtBias: number,
    A: number,
    D: number,
    state: number,
    slots: number,
    heads: number,
    headDim: number,
    groups: number,
    dState: number,
    dtMin: number,
    dtMax: number,
    u0: number,
    u1: number,
  ): void;
  gatedRmsNorm(
    out: number,
    x: number,
    gate: number,
    weight: number,
    dim: number,
    groupSize: number,
    eps: number,
    r0: number,
    r1: number,
  ): void;
  linearBlocks(
    out: number,
    x: number,
    w: number,
    bias: number,
    rows: number,
    inDim: number,
    outDim: number,
    o0: number,
    o1: number,
    scratch: number,
    blockType: number,
  ): void;
  blocksScratchBytes(rows: number, inDim: number): number;
  linearHalf(
    out: number,
    x: number,
    w: number,
    bias: number,
    rows: number,
    inDim: number,
    outDim: number,
    o0: number,
    o1: number,
    scratch: number,
    bf16: number,
  ): void;
  halfScratchBytes(inDim: number): number;
  threadStride(bytes: number): number;
  widenHalfRow(out: number, src: number, n: number, bf16: number): void;
  runJob(ctrl: number, part: number, parts: number): void;
  mathTest(out: number, x: number, n: number, which: number): void;
  mathTest64(out: number, x: number, n: number, which: number): void;
  heapBase(): number;
}

// Control block (i32 words) shared with the workers; see runJob in asm/kernels/jobs.ts.
const GEN = 0;
const DONE = 1;
const OP = 2;
const ARGS = 3;
const ERROR = 31;
const CTRL_WORDS = 32;
const OP_LINEAR = 1;
const OP_SCAN = 2;
const OP_SCAN_STEP = 3;
const OP_SSD = 4;
const OP_SSD_STEP = 5;
const OP_GATED_NORM = 6;
const OP_LINEAR_BLOCKS = 7;
/** linearBlocks' flag in blockType for relaxed SIMD's int8 dot products (asm/kernels/blocks.ts). */
const RELAXED_DOT = 4;
const OP_LINEAR_HALF = 8;
const OP_CONV = 9;
const OP_EXIT = -1;

/** Below these sizes (multiply-adds) an operation runs on the calling thread only. */
const MIN_PARALLEL_LINEAR = 1 << 15;
const MIN_PARALLEL_SCAN = 1 << 13;

/**
 * The most tokens per chunk of the SSD scan here, whatever the model's
 * chunk_size: on a CPU, without matrix units to feed, longer chunks only
 * grow the quadratic within-chunk term (the result is the same recurrence).
 * 8 to 16 measured fastest (docs/mamba2.md).
 */
const SSD_CHUNK_MAX = 16;

/** A float's bits as an i32, for a float argument in the i32 control block. */
function floatBits(value: number): number {
  return new Int32Array(Float32Array.of(value).buffer)[0];
}

const PAGE = 65536;
/** 4 GiB: all a wasm32 memory can address. */
const MAX_PAGES = 65536;
/** Grow by at least this many pages (16 MiB) at a time. */
const MIN_GROW_PAGES = 256;
const ALIGN = 64;

/**
 * A module of one function `() -> v128` whose body, without locals, is
 * `code`: a probe for {@link WebAssembly.validate}.
 */
function probeModule(code: number[]): Uint8Array<ArrayBuffer> {
  const body = [0x00, ...code, 0x0b]; // no locals, the code, end
  // deno-fmt-ignore
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // "\0asm", version 1
    0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // types: () -> v128
    0x03, 0x02, 0x01, 0x00, // functions: one, of type 0
    0x0a, body.length + 2, 0x01, body.length, ...body, // code: one body
  ]);
}

/** i32.const 0, i8x16.splat: a zero v128 on the stack. */
const ZERO_V128 = [0x41, 0x00, 0xfd, 0x0f];

/** Validates only where WebAssembly SIMD is supported: i8x16.popcnt of a zero vector. */
const SIMD_PROBE = probeModule([...ZERO_V128, 0xfd, 0x62]);

/**
 * Validates only where relaxed SIMD is supported too: the two relaxed
 * instructions the kernels use, f32x4.relaxed_madd(0, 0,
 * i32x4.relaxed_dot_i8x16_i7x16_add_s(0, 0, 0)).
 */
const RELAXED_SIMD_PROBE = probeModule([
  ...ZERO_V128,
  ...ZERO_V128,
  ...ZERO_V128,
  ...ZERO_V128,
  ...ZERO_V128,
  ...[0xfd, 0x93, 0x02], // i32x4.relaxed_dot_i8x16_i7x16_add_s (0x113)
  ...[0xfd, 0x85, 0x02], // f32x4.relaxed_madd (0x105)
]);

function validates(probe: Uint8Array<ArrayBuffer>): boolean {
  try {
    return typeof WebAssembly === "object" && WebAssembly.validate(probe);
  } catch {
    return false;
  }
}

/** Whether this runtime supports WebAssembly SIMD (fixed-width, 128-bit). */
export function wasmSimdSupported(): boolean {
  return validates(SIMD_PROBE);
}

/**
 * Whether this runtime supports WebAssembly relaxed SIMD as well, so that the
 * wasm backend runs its relaxed-SIMD build (see {@link WasmSimd}).
 */
export function wasmRelaxedSimdSupported(): boolean {
  return validates(RELAXED_SIMD_PROBE);
}

function decodeBase64(text: string): Uint8Array<ArrayBuffer> {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** The generated modules, base64, by SIMD build and by memory. */
const KERNELS: Record<WasmSimd, { shared: string; single: string }> = {
  relaxed: { shared: KERNELS_RELAXED_SHARED_BASE64, single: KERNELS_RELAXED_SINGLE_BASE64 },
  plain: { shared: KERNELS_PLAIN_SHARED_BASE64, single: KERNELS_PLAIN_SINGLE_BASE64 },
};

let compiled = new Map<string, Promise<WebAssembly.Module>>();

function kernelModule(simd: WasmSimd, shared: boolean): Promise<WebAssembly.Module> {
  const memory = shared ? "shared" : "single";
  const key = `${simd} ${memory}`;
  let module = compiled.get(key);
  if (!module) {
    module = WebAssembly.compile(decodeBase64(KERNELS[simd][memory])).catch((error) => {
      compiled = new Map();
      throw error;
    });
    compiled.set(key, module);
  }
  return module;
}

/**
 * The worker's source: instantiates the kernels on the shared memory, then
 * loops on the control block. Written to run both as a web module worker and
 * as a `node:worker_threads` eval worker (CommonJS).
 */
const WORKER_SOURCE = `
"use strict";
const SPIN_MS = 2;
function start(data, post) {
  const { module, memory, ctrl, part, parts } = data;
  const kernels = new WebAssembly.Instance(module, { env: { memory } }).exports;
  const c = new Int32Array(memory.buffer, ctrl, ${CTRL_WORDS});
  let seen = Atomics.load(c, ${GEN});
  post("ready");
  for (;;) {
    let spins = 0;
    let since = 0;
    while (Atomics.load(c, ${GEN}) === seen) {
      if ((++spins & 1023) === 0) {
        const now = performance.now();
        if (since === 0) since = now;
        else if (now - since > SPIN_MS) Atomics.wait(c, ${GEN}, seen);
      }
    }
    seen = Atomics.load(c, ${GEN});
    if (Atomics.load(c, ${OP}) === ${OP_EXIT}) break;
    try {
      kernels.runJob(ctrl, part, parts);
    } catch (_) {
      Atomics.store(c, ${ERROR}, 1);
    }
    if (Atomics.add(c, ${DONE}, 1) === parts - 2) Atomics.notify(c, ${DONE});
  }
}
if (typeof require === "function") {
  const { parentPort } = require("node:worker_threads");
  parentPort.once("message", (data) => start(data, (m) => parentPort.postMessage(m)));
} else {
  self.onmessage = (event) => start(event.data, (m) => self.postMessage(m));
}
`;

/** What a worker handle must offer, whichever kind of worker it is. */
interface ThreadHandle {
  terminate(): void;
  unref?(): void;
}

interface NodeWorker {
  once(event: string, listener: (value: unknown) => void): void;
  postMessage(value: unknown): void;
  unref(): void;
  terminate(): unknown;
}

function isServerRuntime(): boolean {
  const g = globalThis as { Deno?: unknown; process?: { versions?: { node?: string } } };
  return g.Deno !== undefined || g.process?.versions?.node !== undefined;
}

async function startWorkers(
  module: WebAssembly.Module,
  memory: WebAssembly.Memory,
  ctrl: number,
  parts: number,
): Promise<ThreadHandle[]> {
  const message = (part: number) => ({ module, memory, ctrl, part, parts });
  const ready: Promise<unknown>[] = [];
  const handles: ThreadHandle[] = [];
  let url: string | undefined;
  if (isServerRuntime()) {
    // A computed specifier keeps bundlers for the web from resolving it.
    const specifier = ["node", "worker_threads"].join(":");
    const { Worker } = await import(specifier) as {
      Worker: new (source: string, options: { eval: boolean }) => NodeWorker;
    };
    for (let part = 1; part < parts; part++) {
      const worker = new Worker(WORKER_SOURCE, { eval: true });
      ready.push(
        new Promise((resolve, reject) => {
          worker.once("message", resolve);
          worker.once("error", reject);
        }),
      );
      worker.postMessage(message(part));
      // Unref'd once started (awaiting "ready" needs them referenced).
      handles.push({ terminate: () => void worker.terminate(), unref: () => worker.unref() });
    }
  } else {
    url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
    for (let part = 1; part < parts; part++) {
      const worker = new Worker(url, { type: "module" });
      ready.push(
        new Promise((resolve, reject) => {
          worker.onmessage = resolve;
          worker.onerror = reject;
        }),
      );
      worker.postMessage(message(part));
      handles.push(worker);
    }
  }
  try {
    await Promise.all(ready);
  } catch (error) {
    for (const handle of handles) handle.terminate();
    throw new Error(`A wasm backend worker failed to start: ${error}`);
  } finally {
    if (url) URL.revokeObjectURL(url);
  }
  for (const handle of handles) handle.unref?.();
  return handles;
}

/** Stops the workers of a backend that is disposed or garbage collected. */
function stopWorkers(ctrl: Int32Array, handles: ThreadHandle[]): void {
  Atomics.store(ctrl, OP, OP_EXIT);
  Atomics.add(ctrl, GEN, 1);
  Atomics.notify(ctrl, GEN);
  for (const handle of handles) handle.terminate();
}

const finalizer = new FinalizationRegistry<{ ctrl: Int32Array; handles: ThreadHandle[] }>(
  ({ ctrl, handles }) => stopWorkers(ctrl, handles),
);

/** Whether this thread may block in Atomics.wait (not a browser's main thread). */
function canBlock(ctrl: Int32Array): boolean {
  try {
    Atomics.wait(ctrl, ERROR, 12345, 0);
    return true;
  } catch {
    return false;
  }
}

/** The WebAssembly SIMD backend. Create it with {@link WasmBackend.create}. */
export class WasmBackend implements Backend<WasmBuffer> {
  readonly name = "wasm";
  /**
   * A prompt's tokens per chunk: the matmul runs as fast per row from 64
   * rows on, and other sequences' decoding waits at most one chunk.
   */
  readonly chunkTokens = 128;
  readonly queued = false;
  /** Threads that split the large operations, the calling one included. */
  readonly threads: number;
  /** The build of the kernels that runs (see {@link WasmBackendOptions.simd}). */
  readonly simd: WasmSimd;

  readonly #memory: WebAssembly.Memory;
  readonly #kernels: Kernels;
  #heap: Float32Array;
  #top: number;
  readonly #free = new Map<number, number[]>();
  /** The memory's buffer objects that {@link hostBytes} handed out views of. */
  readonly #lentBuffers = new Set<ArrayBufferLike>();
  #copiedBytes = 0;
  #ctrlPtr = 0;
  #ctrl: Int32Array | null = null;
  #workers: ThreadHandle[] = [];
  #canBlock = false;
  /** Scratch buffers that operations keep between calls, grown as needed. */
  readonly #scratchBuffers = new Map<ScratchPurpose, WasmBuffer>();
  #disposed = false;
  readonly #pickScratch = new PickScratch();
  /** Or'd into linearBlocks' blockType: the GEMVs' relaxed int8 dot products. */
  readonly #relaxedDot: number;

  private constructor(
    memory: WebAssembly.Memory,
    instance: WebAssembly.Instance,
    threads: number,
    simd: WasmSimd,
    relaxedDot: boolean,
  ) {
    this.#memory = memory;
    // The plain build ignores the flag; it is left out there all the same.
    this.#relaxedDot = relaxedDot && simd === "relaxed" ? RELAXED_DOT : 0;
    this.simd = simd;
    this.#kernels = instance.exports as unknown as Kernels;
    this.#heap = new Float32Array(memory.buffer);
    this.#top = Math.max(ALIGN, align(this.#kernels.heapBase()));
    this.threads = threads;
  }

  /** Compiles the kernels and starts `threads - 1` workers. */
  static async create(options: WasmBackendOptions = {}): Promise<WasmBackend> {
    if (!wasmSimdSupported()) {
      throw new Error(
        'The "wasm" backend needs WebAssembly SIMD, which this runtime lacks: use backend "js" ' +
          '(or "auto", which picks "js" here).',
      );
    }
    const threads = options.threads ?? defaultThreads();
    if (!Number.isInteger(threads) || threads < 1) {
      throw new RangeError(`threads must be a positive integer, got ${threads}`);
    }
    const shared = options.sharedMemory ?? typeof SharedArrayBuffer !== "undefined";
    if (threads > 1 && !shared) {
      throw new Error(
        typeof SharedArrayBuffer === "undefined"
          ? `threads: ${threads} needs SharedArrayBuffer, which this runtime lacks: use threads: 1`
          : `threads: ${threads} needs sharedMemory: true`,
      );
    }
    const simd = options.simd ?? (wasmRelaxedSimdSupported() ? "relaxed" : "plain");
    if (simd !== "relaxed" && simd !== "plain") {
      throw new RangeError(`simd must be "relaxed" or "plain", got ${JSON.stringify(simd)}`);
    }
    if (simd === "relaxed" && !wasmRelaxedSimdSupported()) {
      throw new Error(
        'simd: "relaxed" needs WebAssembly relaxed SIMD, which this runtime lacks: use simd: "plain"',
      );
    }
    const module = await kernelModule(simd, shared);
    const memory = new WebAssembly.Memory(
      shared ? { initial: 1, maximum: MAX_PAGES, shared: true } : { initial: 1 },
    );
    const instance = await WebAssembly.instantiate(module, { env: { memory } });
    const backend = new WasmBackend(
      memory,
      instance,
      threads,
      simd,
      options.relaxedDot ?? true,
    );
    if (threads > 1) await backend.#startThreads(module);
    return backend;
  }

  async #startThreads(module: WebAssembly.Module): Promise<void> {
    const block = this.#alloc(CTRL_WORDS);
    this.#heap.fill(0, block.ptr >>> 2, (block.ptr >>> 2) + CTRL_WORDS);
    this.#ctrlPtr = block.ptr;
    const ctrl = new Int32Array(this.#memory.buffer, block.ptr, CTRL_WORDS);
    this.#ctrl = ctrl;
    this.#canBlock = canBlock(ctrl);
    this.#workers = await startWorkers(module, this.#memory, block.ptr, this.threads);
    finalizer.register(this, { ctrl, handles: this.#workers }, this);
  }

  /** Stops the worker threads; the backend must not be used afterwards. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    if (this.#ctrl) {
      finalizer.unregister(this);
      stopWorkers(this.#ctrl, this.#workers);
      this.#workers = [];
      this.#ctrl = null; // Nothing may wait on the stopped workers.
    }
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  // ------------------------------------------------------------ memory ----

  #alloc(length: number): WasmBuffer {
    if (this.#disposed) throw new Error("The wasm backend was disposed");
    const bytes = align(Math.max(length, 1) * 4);
    const list = this.#free.get(bytes);
    const reused = list?.pop();
    if (reused !== undefined) return new WasmBuffer(reused, length, bytes);
    const ptr = this.#top;
    const end = ptr + bytes;
    const size = this.#memory.buffer.byteLength;
    if (end > size) {
      const needed = Math.ceil((end - size) / PAGE);
      const pages = size / PAGE;
      const grow = Math.min(Math.max(needed, MIN_GROW_PAGES, pages >>> 3), MAX_PAGES - pages);
      if (grow < needed) {
        throw new RangeError(
          `The wasm backend's memory is full (4 GiB, wasm32's limit): cannot allocate ${bytes} bytes`,
        );
      }
      this.#memory.grow(grow);
      this.#heap = new Float32Array(this.#memory.buffer);
    }
    this.#top = end;
    return new WasmBuffer(ptr, length, bytes);
  }

  /** The float view of memory; re-created after the memory grows. */
  #view(): Float32Array {
    if (this.#heap.buffer.byteLength !== this.#memory.buffer.byteLength) {
      this.#heap = new Float32Array(this.#memory.buffer);
    }
    return this.#heap;
  }

  /** Size of the module's memory in bytes (weights, states and scratch). */
  get memoryBytes(): number {
    return this.#memory.buffer.byteLength;
  }

  /**
   * Bytes {@link upload}, {@link uploadHalfMatrix} and {@link uploadQuantizedMatrix} have copied in so
   * far (the weights the memory holds); views of lent bytes cost none.
   */
  get copiedBytes(): number {
    return this.#copiedBytes;
  }

  /**
   * Lends `byteLength` bytes of the (shared) memory for a weight file; see
   * {@link Backend.hostBytes}. Undefined on an unshared memory, whose views a
   * later growth would detach.
   */
  hostBytes(byteLength: number): Uint8Array | undefined {
    if (!(this.#memory.buffer instanceof SharedArrayBuffer)) return undefined;
    const { ptr } = this.#alloc(Math.ceil(byteLength / 4));
    const buffer = this.#memory.buffer;
    this.#lentBuffers.add(buffer);
    return new Uint8Array(buffer, ptr, byteLength);
  }

  /**
   * Keeps an F16 or BF16 matrix 16-bit, for the 16-bit kernels of `linear`
   * (`linearHalf` in asm/kernels/half.ts) and the gathers of `embed` and
   * `copyRows`: half the memory and half the bytes a decode step streams of
   * f32. Values the loader read into {@link hostBytes} stay where they are.
   */
  uploadHalfMatrix(matrix: HalfMatrix): WasmHalfMatrix {
    const { format, rows, cols, halves } = matrix;
    if (this.#lentBuffers.has(halves.buffer)) {
      // Already in this memory: the lent bytes outlive every buffer made of them.
      return new WasmHalfMatrix(halves.byteOffset, rows, cols, 0, format);
    }
    const buf = this.#alloc(Math.ceil(halves.length / 2));
    new Uint16Array(this.#memory.buffer, buf.ptr, halves.length).set(halves);
    this.#copiedBytes += halves.byteLength;
    return new WasmHalfMatrix(buf.ptr, rows, cols, buf.bytes, format);
  }

  /**
   * Keeps a Q8_0, Q4_0 or Q4_K matrix as its blocks, repacked (40 or 20 bytes
   * per 32 weights, 152 per 256: five sixteenths, a sixth or a seventh of what
   * an f32 decode step streams), for the kernels of `linear`.
   */
  uploadQuantizedMatrix(matrix: QuantizedMatrix): WasmQuantMatrix {
    const { type, rows, cols } = matrix;
    const bytes = packedBytes(type, rows, cols);
    const buf = this.#alloc(bytes / 4);
    const out = new Uint8Array(this.#memory.buffer, buf.ptr, bytes);
    // Zeroed first: a reused buffer's old bytes would fill the padding rows and the nibbles.
    out.fill(0);
    packBlocks(type, rows, cols, matrix.blocks, out);
    // The blocks' bytes; the padding rows are not copied.
    this.#copiedBytes += rows * packedRowBytes(type, cols);
    return new WasmQuantMatrix(type, buf.ptr, rows, cols, buf.bytes);
  }

  upload(data: Float32Array): WasmBuffer {
    if (this.#lentBuffers.has(data.buffer)) {
      // Already in this memory: the lent bytes outlive every buffer made of them.
      return new WasmBuffer(data.byteOffset, data.length, 0);
    }
    const buf = this.#alloc(data.length);
    this.#view().set(data, buf.ptr >>> 2);
    this.#copiedBytes += data.byteLength;
    return buf;
  }

  zeros(length: number): WasmBuffer {
    const buf = this.#alloc(length);
    this.#view().fill(0, buf.ptr >>> 2, (buf.ptr >>> 2) + length);
    return buf;
  }

  scratch(length: number): WasmBuffer {
    return this.zeros(length);
  }

  write(buf: WasmBuffer, data: Float32Array, offset = 0): void {
    checkRange(buf, offset, data.length);
    this.#view().set(data, (buf.ptr >>> 2) + offset);
  }

  read(buf: WasmBuffer, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    checkRange(buf, offset, length);
    const start = (buf.ptr >>> 2) + offset;
    return Promise.resolve(this.#view().slice(start, start + length));
  }

  copy({ dst, dstOffset = 0, src, srcOffset = 0, length }: CopyArgs<WasmBuffer>): void {
    checkRange(dst, dstOffset, length);
    checkRange(src, srcOffset, length);
    const from = (src.ptr >>> 2) + srcOffset;
    this.#view().copyWithin((dst.ptr >>> 2) + dstOffset, from, from + length);
  }

  release(buf: WasmBuffer): void {
    if (buf.ptr < 0) throw new Error("Buffer released twice");
    if (buf.bytes === 0) {
      buf.ptr = -1;
      return;
    }
    let list = this.#free.get(buf.bytes);
    if (!list) this.#free.set(buf.bytes, list = []);
    list.push(buf.ptr);
    buf.ptr = -1;
  }

  capture(ops: () => void): HostRecording {
    return new HostRecording(ops);
  }

  replay(recording: Recording): void {
    (recording as HostRecording).ops();
  }

  releaseRecording(_recording: Recording): void {}

  flush(): void {}

  /** The floats of `buf`, as a view of the memory (valid until it grows). */
  #floats(buf: WasmBuffer): Float32Array {
    checkRange(buf, 0, buf.length);
    const start = buf.ptr >>> 2;
    return this.#view().subarray(start, start + buf.length);
  }

  // -------------------------------------------------------- operations ----

  embed({ out, table, ids, dim }: EmbedArgs<WasmBuffer>): void {
    if (table instanceof WasmQuantMatrix || table instanceof WasmHalfMatrix) {
      for (let t = 0; t < ids.length; t++) {
        const id = ids[t];
        if (!(id >= 0 && id < table.rows)) {
          throw new RangeError(`Token id ${id} outside [0, ${table.rows})`);
        }
        this.#widenRow(table, id, this.#floats(out).subarray(t * dim, (t + 1) * dim));
      }
      return;
    }
    const heap = this.#view();
    const base = table.ptr >>> 2;
    const rows = table.length / dim;
    for (let t = 0; t < ids.length; t++) {
      const id = ids[t];
      if (!(id >= 0 && id < rows)) throw new RangeError(`Token id ${id} outside [0, ${rows})`);
      heap.copyWithin((out.ptr >>> 2) + t * dim, base + id * dim, base + (id + 1) * dim);
    }
  }

  copyRows(args: CopyRowsArgs<WasmBuffer>): void {
    const { width, count, srcRows, dstRows, dstOffset = 0, srcOffset = 0 } = args;
    const dst = this.#floats(args.dst);
    const stored = args.src instanceof WasmQuantMatrix || args.src instanceof WasmHalfMatrix
      ? args.src
      : null;
    const src = stored ? null : this.#floats(args.src);
    const srcIndex = srcRows && this.#floats(srcRows.buf);
    const dstIndex = dstRows && this.#floats(dstRows.buf);
    const srcCount = stored ? stored.rows : Math.floor((src!.length - srcOffset) / width);
    const dstCount = Math.floor((dst.length - dstOffset) / width);
    const inside = (row: number, rows: number) => Number.isInteger(row) && row >= 0 && row < rows;
    for (let r = 0; r < count; r++) {
      const from = srcIndex ? srcIndex[srcRows!.offset + r] : r;
      const to = dstIndex ? dstIndex[dstRows!.offset + r] : r;
      if (!inside(from, srcCount) || !inside(to, dstCount)) continue;
      const target = dst.subarray(dstOffset + to * width, dstOffset + (to + 1) * width);
      if (stored) {
        this.#widenRow(stored, from, target);
        continue;
      }
      const at = srcOffset + from * width;
      target.set(src!.subarray(at, at + width));
    }
  }

  chooseTokens(args: ChooseArgs<WasmBuffer>): void {
    const views = {
      logits: this.#floats(args.logits),
      settings: this.#floats(args.settings),
      randoms: this.#floats(args.randoms),
      history: this.#floats(args.history),
      slots: this.#floats(args.slots),
      ids: this.#floats(args.ids),
    };
    chooseOnHost(args, views, this.#pickScratch);
  }

  rmsNorm({ out, x, weight, rows, dim, eps }: RmsNormArgs<WasmBuffer>): void {
    this.#kernels.rmsNorm(out.ptr, x.ptr, weight.ptr, rows, dim, eps);
  }

  linear(args: LinearArgs<WasmBuffer>): void {
    const { out, x, weight, bias, rows, inDim, outDim, accumulate = false } = args;
    if (accumulate) {
      // The kernel overwrites; sums go through scratch, then onto out.
      const sums = this.#scratch("linear", rows * outDim);
      this.linear({ out: sums, x, weight, bias, rows, inDim, outDim });
      this.#kernels.addInPlace(out.ptr, sums.ptr, rows * outDim);
      return;
    }
    const biasPtr = bias ? bias.ptr : 0;
    if (weight instanceof WasmQuantMatrix) {
      return this.#linearQuant(out, x, weight, biasPtr, rows, outDim);
    }
    if (weight instanceof WasmHalfMatrix) {
      return this.#linearHalf(out, x, weight, biasPtr, rows, outDim);
    }
    const parallel = this.#splitsLinear(rows, inDim, outDim);
    // Per thread: the matmul's panel of packed weight rows (rows > 1).
    const panel = rows > 1
      ? this.#threadScratch("panel", this.#kernels.panelBytes(inDim), parallel)
      : 0;
    const operands = [out.ptr, x.ptr, weight.ptr, biasPtr, rows, inDim, outDim] as const;
    if (parallel) return this.#parallel(OP_LINEAR, [...operands, panel]);
    this.#kernels.linear(...operands, 0, outDim, panel);
  }

  /** `linear` over quantized weights (`linearBlocks` in asm/kernels/blocks.ts), split as the f32 one. */
  #linearQuant(
    out: WasmBuffer,
    x: WasmBuffer,
    weight: WasmQuantMatrix,
    biasPtr: number,
    rows: number,
    outDim: number,
  ): void {
    const inDim = weight.cols;
    if (weight.rows !== outDim) {
      throw new RangeError(
        `A quantized matrix of ${weight.rows} rows cannot give ${outDim} outputs`,
      );
    }
    const parallel = this.#splitsLinear(rows, inDim, outDim);
    // Per thread: rows of dequantized weights for the matmul, or the GEMV's rounded input.
    const scratch = this.#threadScratch(
      "dequant",
      this.#kernels.blocksScratchBytes(rows, inDim),
      parallel,
    );
    const operands = [out.ptr, x.ptr, weight.ptr, biasPtr, rows, inDim, outDim] as const;
    // linearBlocks' blockType: 0 for Q8_0, 1 for Q4_0, 2 for Q4_K, with the dot products' flag.
    const blockType = { q8_0: 0, q4_0: 1, q4_k: 2 }[weight.type] | this.#relaxedDot;
    if (parallel) return this.#parallel(OP_LINEAR_BLOCKS, [...operands, scratch, blockType]);
    this.#kernels.linearBlocks(...operands, 0, outDim, scratch, blockType);
  }

  /** `linear` over f16 weights (`linearHalf` in asm/kernels/half.ts), split as the f32 one. */
  #linearHalf(
    out: WasmBuffer,
    x: WasmBuffer,
    weight: WasmHalfMatrix,
    biasPtr: number,
    rows: number,
    outDim: number,
  ): void {
    const inDim = weight.cols;
    if (weight.rows !== outDim) {
      throw new RangeError(
        `An ${weight.format} matrix of ${weight.rows} rows cannot give ${outDim} outputs`,
      );
    }
    const parallel = this.#splitsLinear(rows, inDim, outDim);
    // Per thread: a tile of weight rows widened to f32, where the matmul runs.
    const scratch = rows > 1
      ? this.#threadScratch("dequant", this.#kernels.halfScratchBytes(inDim), parallel)
      : 0;
    const operands = [out.ptr, x.ptr, weight.ptr, biasPtr, rows, inDim, outDim] as const;
    const bf16 = weight.format === "bf16" ? 1 : 0;
    if (parallel) return this.#parallel(OP_LINEAR_HALF, [...operands, scratch, bf16]);
    this.#kernels.linearHalf(...operands, 0, outDim, scratch, bf16);
  }

  linearSplit({ outs, widths, x, weight, bias, rows, inDim }: LinearSplitArgs<WasmBuffer>): void {
    const starts = widths.map((_, i) => widths.slice(0, i).reduce((a, b) => a + b, 0));
    // Runs of outputs that one linear computes together, then their columns copied out: a view
    // of rows in quads must start a quad, so then all of them; else adjacent narrow outputs, as
    // a narrow output alone is a call of its own that runs on one thread or splits a few
    // panels unevenly. A run of one output is written in place.
    const runs: number[][] = [];
    const misaligned = weight instanceof WasmQuantMatrix && inQuads(weight.type) &&
      starts.some((start) => start % QUAD !== 0);
    const narrow = (i: number) => widths[i] < NARROW_OUTPUT;
    widths.forEach((_, i) => {
      const last = runs.at(-1);
      if (last && (misaligned || (narrow(i) && narrow(last.at(-1)!)))) last.push(i);
      else runs.push([i]);
    });
    for (const run of runs) {
      const first = starts[run[0]];
      const outDim = run.reduce((sum, i) => sum + widths[i], 0);
      const rowsOf = (buf: WasmBuffer, width: number) => view(buf, first * width, outDim * width);
      const one = run.length === 1;
      const out = one ? outs[run[0]] : this.#scratch("split", rows * outDim);
      const biasRows = bias && rowsOf(bias, 1);
      this.linear({ out, x, weight: rowsOf(weight, inDim), bias: biasRows, rows, inDim, outDim });
      if (one) continue;
      const heap = this.#view();
      for (const i of run) {
        for (let r = 0; r < rows; r++) {
          const from = (out.ptr >>> 2) + r * outDim + starts[i] - first;
          heap.copyWithin((outs[i].ptr >>> 2) + r * widths[i], from, from + widths[i]);
        }
      }
    }
  }

  /** Row `row` of a stored matrix into `out` (its `cols` floats, in this memory), as f32. */
  #widenRow(matrix: WasmQuantMatrix | WasmHalfMatrix, row: number, out: Float32Array): void {
    if (matrix instanceof WasmQuantMatrix) {
      this.#dequantizeRow(matrix, row, out);
      return;
    }
    const { cols, format } = matrix;
    this.#kernels.widenHalfRow(
      out.byteOffset,
      matrix.ptr + 2 * row * cols,
      cols,
      format === "bf16" ? 1 : 0,
    );
  }

  /** Row `row` of a quantized matrix into `out` (its `cols` floats), as `dequantizeMatrix` gives it. */
  #dequantizeRow(matrix: WasmQuantMatrix, row: number, out: Float32Array): void {
    const { type, cols } = matrix;
    const { buffer } = this.#memory;
    const scales = new DataView(buffer, matrix.ptr);
    const bytes = new Uint8Array(buffer, matrix.ptr);
    const signed = new Int8Array(buffer, matrix.ptr);
    const elements = BLOCK_ELEMENTS[type];
    for (let block = 0; block < cols / elements; block++) {
      const at = blockOffset(type, cols, row, block);
      const base = block * elements;
      if (type === "q8_0") {
        const d = scales.getFloat32(at, true);
        for (let e = 0; e < elements; e++) out[base + e] = d * signed[at + Q8_VALUES + e];
        continue;
      }
      if (type === "q4_k") {
        const f = Math.fround;
        const d = scales.getFloat32(at, true), dmin = scales.getFloat32(at + 4, true);
        for (let sub = 0; sub < 8; sub++) {
          const dScale = f(d * bytes[at + 8 + sub]), dMin = f(dmin * bytes[at + 16 + sub]);
          for (let e = 0; e < 32; e++) {
            // Value e = 8n + k is nibble n of u16 lane k (see packBlocks).
            const n = e >> 3, k = e & 7;
            const q = (bytes[at + Q4K_VALUES + 16 * sub + 2 * k + (n >> 1)] >> (4 * (n & 1))) & 15;
            out[base + 32 * sub + e] = f(dScale * q) - dMin;
          }
        }
        continue;
      }
      const d = scales.getFloat32(at, true) * 2 ** 28;
      for (let e = 0; e < elements; e++) {
        // Weight e = 4k + j is nibble k of lane j, stored as u ^ 8 (see packBlocks).
        const k = e >> 2, j = e & 3;
        const nibble = (bytes[at + 4 + 4 * j + (k >> 1)] >> (4 * (k & 1))) & 15;
        out[base + e] = d * ((nibble ^ 8) - 8);
      }
    }
  }

  addInPlace({ acc, x, length }: AddArgs<WasmBuffer>): void {
    this.#kernels.addInPlace(acc.ptr, x.ptr, length);
  }

  causalConv(args: ConvArgs<WasmBuffer>): void {
    const batch = args.batch ?? 1;
    if (batch > 1 || args.slots) {
      const kept = (args.kernel - 1) * args.channels;
      const slots = args.slots && this.#floats(args.slots);
      const rows = stateRows(slots, batch, kept > 0 ? args.state.length / kept : Infinity);
      if (args.len === 1) {
        // A batch of decode steps: one kernel call, each group of channels' weights packed once.
        const { out, x, weight, bias, state, channels, kernel } = args;
        return this.#kernels.convStep(
          out.ptr,
          x.ptr,
          weight.ptr,
          bias ? bias.ptr : 0,
          state.ptr,
          args.slots ? args.slots.ptr : 0,
          batch,
          channels,
          kernel,
          this.#scratch("conv", this.#kernels.convStepScratchBytes(channels, kernel) / 4).ptr,
        );
      }
      return convEachSequence(args, view, rows, (one) => this.causalConv(one));
    }
    const { out, x, weight, bias, state, len, channels, kernel } = args;
    const parallel = this.#ctrl !== null && len * channels * kernel >= MIN_PARALLEL_LINEAR &&
      channels >= 32;
    // Per thread: a block of 16 channels' weights, transposed.
    const scratch = this.#threadScratch("conv", this.#kernels.convScratchBytes(kernel), parallel);
    const operands = [out.ptr, x.ptr, weight.ptr, bias ? bias.ptr : 0, state.ptr, len] as const;
    if (parallel) return this.#parallel(OP_CONV, [...operands, channels, kernel, scratch]);
    this.#kernels.causalConv(...operands, channels, kernel, scratch, 0, channels);
  }

  supports(_op: OptionalOp): boolean {
    return true;
  }

  /**
   * Mamba-2's SSD: one token per sequence as the recurrence (`ssdStep` in
   * asm/kernels/mamba2.ts), longer calls in chunks (`ssd`); threads split the
   * (sequence, head) pairs.
   */
  ssdScan(args: SsdArgs<WasmBuffer>): void {
    const { y, xBC, dt, dtBias, dtLimit, A, D, state, slots, len, batch } = args;
    const { heads, headDim, groups, dState } = args;
    const rows = state.length / (heads * headDim * dState);
    stateRows(slots && this.#floats(slots), batch, rows); // Checks the slots.
    const units = batch * heads;
    const operands = [
      y.ptr,
      xBC.ptr,
      dt.ptr,
      dtBias.ptr,
      A.ptr,
      D ? D.ptr : 0,
      state.ptr,
      slots ? slots.ptr : 0,
    ] as const;
    const work = units * len * headDim * dState;
    const parallel = this.#ctrl !== null && units >= 2 && work >= MIN_PARALLEL_SCAN;
    if (len === 1) {
      const sizes = [heads, headDim, groups, dState] as const;
      if (parallel) {
        const [lo, hi] = dtLimit.map(floatBits);
        return this.#parallel(OP_SSD_STEP, [...operands, ...sizes, lo, hi, units]);
      }
      return this.#kernels.ssdStep(...operands, ...sizes, dtLimit[0], dtLimit[1], 0, units);
    }
    const chunk = Math.min(args.chunkSize, SSD_CHUNK_MAX);
    const scratchBytes = this.#kernels.ssdScratchBytes(chunk, headDim);
    const scratch = this.#threadScratch("ssd", scratchBytes, parallel);
    const sizes = [len, heads, headDim, groups, dState, chunk] as const;
    if (parallel) {
      const [lo, hi] = dtLimit.map(floatBits);
      return this.#parallel(OP_SSD, [...operands, ...sizes, lo, hi, units, scratch]);
    }
    this.#kernels.ssd(...operands, ...sizes, dtLimit[0], dtLimit[1], 0, units, scratch);
  }

  gatedRmsNorm(args: GatedNormArgs<WasmBuffer>): void {
    const { out, x, gate, weight, rows, dim, groupSize, eps } = args;
    const operands = [out.ptr, x.ptr, gate.ptr, weight.ptr, dim, groupSize] as const;
    if (this.#ctrl && rows >= 2 && rows * dim >= MIN_PARALLEL_SCAN) {
      return this.#parallel(OP_GATED_NORM, [...operands, floatBits(eps), rows]);
    }
    this.#kernels.gatedRmsNorm(...operands, eps, 0, rows);
  }

  selectiveScan(args: ScanArgs<WasmBuffer>): void {
    const batch = args.batch ?? 1;
    if (args.len === 1 && args.dim % 4 === 0 && args.dState % 4 === 0) return this.#scanStep(args);
    if (batch > 1 || args.slots) {
      const slots = args.slots && this.#floats(args.slots);
      const rows = stateRows(slots, batch, args.state.length / (args.dim * args.dState));
      return scanEachSequence(args, view, rows, (one) => this.selectiveScan(one));
    }
    const { len, dim, dState } = args;
    const parallel = this.#ctrl !== null && len * dim * dState >= MIN_PARALLEL_SCAN && dim >= 8;
    // Per thread: the f64 state, A and decays of one tile.
    const scratch = this.#threadScratch("scan", this.#kernels.scanScratchBytes(dState), parallel);
    // u, delta, z and y: token-major [len, dim], or mamba_ssm's [dim, len].
    const [tokenStride, channelStride] = args.channelMajor ? [1, len] : [dim, 1];
    const ptrs = [...scanOperands(args), len, dim, dState, tokenStride, channelStride] as const;
    if (parallel) {
      this.#parallel(OP_SCAN, [...ptrs, scratch]);
    } else {
      this.#kernels.scan(...ptrs, 0, dim, scratch);
    }
  }

  /** A decode step of every sequence at once, in f32 (see `scanStep` in asm/kernels/scan.ts). */
  #scanStep(args: ScanArgs<WasmBuffer>): void {
    const { state, slots, dim, dState } = args;
    const batch = args.batch ?? 1;
    const rows = state.length / (dim * dState);
    stateRows(slots && this.#floats(slots), batch, rows); // Checks the slots.
    const ptrs = [...scanOperands(args), slots ? slots.ptr : 0, batch, dim, dState] as const;
    if (this.#ctrl && batch * dim * dState >= MIN_PARALLEL_SCAN) {
      this.#parallel(OP_SCAN_STEP, ptrs);
    } else {
      this.#kernels.scanStep(...ptrs, 0, batch * dim);
    }
  }

  /** Whether a linear of this size is split over the threads rather than run here alone. */
  #splitsLinear(rows: number, inDim: number, outDim: number): boolean {
    return this.#ctrl !== null && rows * inDim * outDim >= MIN_PARALLEL_LINEAR && outDim >= 8;
  }

  /**
   * The address of the scratch kept for `purpose`: `bytes` (a multiple of 4)
   * for each thread where the work is split (at the kernels' `threadStride`),
   * else for this one.
   */
  #threadScratch(purpose: ScratchPurpose, bytes: number, parallel: boolean): number {
    const floats = parallel ? this.#kernels.threadStride(bytes) / 4 * this.threads : bytes / 4;
    return this.#scratch(purpose, floats).ptr;
  }

  /** The scratch buffer kept for `purpose`, at least `length` floats. */
  #scratch(purpose: ScratchPurpose, length: number): WasmBuffer {
    let buffer = this.#scratchBuffers.get(purpose);
    if (!buffer || buffer.length < length) {
      if (buffer) this.release(buffer);
      this.#scratchBuffers.set(purpose, buffer = this.#alloc(length));
    }
    return buffer;
  }

  /** Runs a job on every thread: part 0 here, the others on the workers. */
  #parallel(op: number, args: readonly number[]): void {
    const c = this.#ctrl!;
    for (let i = 0; i < args.length; i++) c[ARGS + i] = args[i];
    c[OP] = op;
    Atomics.store(c, DONE, 0);
    Atomics.add(c, GEN, 1);
    Atomics.notify(c, GEN);
    const parts = this.threads;
    let failure: unknown;
    try {
      this.#kernels.runJob(this.#ctrlPtr, 0, parts);
    } catch (error) {
      failure = error;
    }
    // Wait for the workers: spin (they finish about when we do), then block.
    let spins = 0;
    for (;;) {
      const done = Atomics.load(c, DONE);
      if (done === parts - 1) break;
      if (++spins > 20000 && this.#canBlock) Atomics.wait(c, DONE, done, 1);
    }
    if (failure) throw failure;
    if (Atomics.exchange(c, ERROR, 0) !== 0) throw new Error("A wasm backend worker failed");
  }

  // ------------------------------------------------------------- tests ----

  /** Applies a kernel math function to `x` (length a multiple of 4): 0 exp, 1 softplus, 2 silu. */
  mathTest(x: Float32Array, which: 0 | 1 | 2): Float32Array {
    const input = this.upload(x);
    const out = this.zeros(x.length);
    this.#kernels.mathTest(out.ptr, input.ptr, x.length, which);
    const result = this.#view().slice(out.ptr >>> 2, (out.ptr >>> 2) + x.length);
    this.release(input);
    this.release(out);
    return result;
  }

  /** Applies the scan's f64 math to `x` (even length): 0 exp, 1 softplus. */
  mathTest64(x: Float64Array, which: 0 | 1): Float64Array {
    const input = this.#alloc(x.length * 2);
    const out = this.#alloc(x.length * 2);
    new Float64Array(this.#memory.buffer, input.ptr, x.length).set(x);
    this.#kernels.mathTest64(out.ptr, input.ptr, x.length, which);
    const result = new Float64Array(this.#memory.buffer, out.ptr, x.length).slice();
    this.release(input);
    this.release(out);
    return result;
  }
}

function align(bytes: number): number {
  return Math.ceil(bytes / ALIGN) * ALIGN;
}

/** Threads the backend uses unless told otherwise: `navigator.hardwareConcurrency`, else 1. */
export function defaultThreads(): number {
  const n = (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator
    ?.hardwareConcurrency;
  return typeof n === "number" && n >= 1 ? Math.floor(n) : 1;
}

function checkRange(buf: WasmBuffer, offset: number, length: number): void {
  if (buf.ptr < 0) throw new Error("Buffer used after release");
  if (offset < 0 || length < 0 || offset + length > buf.length) {
    throw new RangeError(`Range [${offset}, ${offset + length}) outside a buffer of ${buf.length}`);
  }
}

/**
 * The operands `scan` and `scanStep` of asm/kernels/scan.ts share, in their
 * order: buffers as pointers (0 for none), softplus as 0 or 1.
 */
function scanOperands(args: ScanArgs<WasmBuffer>) {
  const { y, u, delta, A, B, C, D, z, deltaBias, deltaSoftplus, state } = args;
  return [
    y.ptr,
    u.ptr,
    delta.ptr,
    A.ptr,
    B.ptr,
    C.ptr,
    D ? D.ptr : 0,
    z ? z.ptr : 0,
    deltaBias ? deltaBias.ptr : 0,
    deltaSoftplus ? 1 : 0,
    state.ptr,
  ] as const;
}
