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
import { PickScratch } from "../sampler.ts";
import { BLOCK_ELEMENTS, type HalfMatrix, type QuantizedMatrix } from "../quant.ts";
import { chooseOnHost, HostRecording } from "./host.ts";
import {
  blockOffset,
  checkRange,
  inQuads,
  packBlocks,
  packedBytes,
  packedRowBytes,
  Q4K_VALUES,
  Q8_VALUES,
  QUAD,
  view,
  WasmBuffer,
  WasmHalfMatrix,
  WasmQuantMatrix,
} from "./wasm/memory.ts";
import {
  kernelModule,
  type Kernels,
  wasmRelaxedSimdSupported,
  type WasmSimd,
  wasmSimdSupported,
} from "./wasm/module.ts";
import {
  ARGS,
  canBlock,
  CTRL_WORDS,
  DONE,
  ERROR,
  finalizer,
  GEN,
  OP,
  OP_CONV,
  OP_GATED_NORM,
  OP_LINEAR,
  OP_LINEAR_BLOCKS,
  OP_LINEAR_HALF,
  OP_SCAN,
  OP_SCAN_STEP,
  OP_SSD,
  OP_SSD_STEP,
  startWorkers,
  stopWorkers,
  type ThreadHandle,
} from "./wasm/threads.ts";
import { checkPositiveInteger } from "../errors.ts";

export { WasmBuffer, WasmHalfMatrix, WasmQuantMatrix } from "./wasm/memory.ts";
export { wasmRelaxedSimdSupported, type WasmSimd, wasmSimdSupported } from "./wasm/module.ts";

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
 * linearSplit runs one linear over every output when one of them is narrower
 * than this (x_proj's dt, B and C): each copied column costs about one
 * multiply-add in inDim, a call of its own costs a dispatch (docs/performance.md).
 */
const NARROW_OUTPUT = 64;

/** What the wasm backend keeps a scratch buffer for. */
type ScratchPurpose = "linear" | "panel" | "conv" | "scan" | "ssd" | "dequant" | "split";

/** linearBlocks' flag in blockType for relaxed SIMD's int8 dot products (asm/kernels/blocks.ts). */
const RELAXED_DOT = 4;

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

/** The WebAssembly SIMD backend. Create it with {@link WasmBackend.create}. */
export class WasmBackend implements Backend<WasmBuffer> {
  readonly name = "wasm";
  /**
   * A prompt's tokens per chunk: the matmul runs as fast per row from 64
   * rows on, and other sequences' decoding waits at most one chunk.
   */
  readonly chunkTokens = 128;
  /** As chunkTokens: five prompts of 512 ids in one chunk ran no faster (docs/performance.md). */
  readonly idleChunkTokens = 128;
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
    const threads = checkPositiveInteger("threads", options.threads ?? defaultThreads());
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

  /** Operations here complete when they return: everything issued is submitted. */
  readSubmitted(buf: WasmBuffer, offset?: number, length?: number): Promise<Float32Array> {
    return this.read(buf, offset, length);
  }

  // deno-lint-ignore require-await -- async so that a bad range rejects, as on the other backends.
  async read(buf: WasmBuffer, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    checkRange(buf, offset, length);
    const start = (buf.ptr >>> 2) + offset;
    return this.#view().slice(start, start + length);
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
