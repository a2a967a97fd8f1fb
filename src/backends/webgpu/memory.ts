/**
 * GPU memory of the WebGPU backend: {@link GpuBuffer} (a float32 buffer, or a
 * weight matrix packed as 16-bit values or quantized blocks, split by rows
 * where one binding cannot hold it), the {@link BufferPool} of scratch
 * buffers, and {@link GpuMemory}, which uploads weights and keeps the
 * buffers that live as long as the backend.
 *
 * @module
 */

import { q4KScaleMin } from "../../gguf.ts";
import {
  BLOCK_BYTES,
  BLOCK_ELEMENTS,
  type BlockType,
  type HalfFormat,
  type HalfMatrix,
  type QuantizedMatrix,
} from "../../quant.ts";
import { bf16AsF16, f16ToF32 } from "../../safetensors.ts";

/**
 * How a buffer holds its values: f32, or (a weight matrix) packed f16 or bf16
 * two per u32, or repacked quantized blocks (see {@link BLOCK_WORDS}).
 */
export type WeightFormat = "f32" | HalfFormat | BlockType;

/**
 * u32 words of a block as {@link GpuMemory.uploadQuantizedMatrix} repacks
 * it: ggml's f16 scales widened to f32, which keeps the values 4-byte aligned,
 * then the values (see weight_q8_0.wgsl, weight_q4_0.wgsl and
 * weight_q4_k.wgsl): 36 bytes for Q8_0's 34, 20 for Q4_0's 18, 152 for Q4_K's
 * 144 (its 6-bit scales and mins a byte each).
 */
const BLOCK_WORDS: Readonly<Record<BlockType, number>> = { q8_0: 9, q4_0: 5, q4_k: 38 };

/** Whether buffers of `format` hold quantized blocks. */
export function isBlockFormat(format: WeightFormat): format is BlockType {
  return format !== "f32" && format !== "f16" && format !== "bf16";
}

/** The usage of every storage buffer: bound to kernels, copied from and to. */
export const STORAGE_USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC |
  GPUBufferUsage.COPY_DST;

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
  /**
   * Whether the buffer holds an intermediate result that only the next
   * operation reads (Backend.scratch): an operation writing it may then fold
   * into that reader and leave it unwritten.
   */
  transient = false;

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
     * `rowsPerPart` rows (the last may hold fewer). Only `embed`, `copyRows`
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

/**
 * Bytes from which the pool rounds a buffer up to its size class, a quarter of
 * its power of two. The pool keeps what it is given back for the backend's
 * life, and a prompt's chunk of each length takes activations of another
 * size: without classes each length would keep buffers of its own. Below it
 * (a decode step's buffers) sizes are few, and stay exact.
 */
const SIZE_CLASSES_FROM = 2 ** 20;

/**
 * The bytes of the buffer that the pool gives for `bytes`: the size class
 * (at most a quarter more) from {@link SIZE_CLASSES_FROM} on, within `limit`.
 */
export function pooledBytes(bytes: number, limit: number): number {
  if (bytes < SIZE_CLASSES_FROM) return bytes;
  const step = 2 ** (Math.floor(Math.log2(bytes)) - 2);
  return Math.max(bytes, Math.min(Math.ceil(bytes / step) * step, limit));
}

/**
 * Storage buffers by size: exact below a MiB, size classes above
 * ({@link pooledBytes}). A buffer released while commands that use it are
 * still being recorded may be reused at once by recorded GPU work (which runs
 * in order), but not for a host write (`queue.writeBuffer` would overtake the
 * recorded commands): those wait for the next submission.
 */
export class BufferPool {
  readonly #device: GPUDevice;
  readonly #free = new Map<number, GPUBuffer[]>();
  readonly #recycled = new Map<number, GPUBuffer[]>();
  /** Buffers created so far. */
  created = 0;

  constructor(
    device: GPUDevice,
    /** The largest buffer one binding takes, which no size class exceeds. */
    readonly bindingLimit: number,
  ) {
    this.#device = device;
  }

  /** A buffer of `requested` bytes or more; `hostWrite` when the caller writes it with `queue.writeBuffer`. */
  acquire(requested: number, hostWrite: boolean): GPUBuffer {
    const bytes = pooledBytes(requested, this.bindingLimit);
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

/** Bytes of a buffer of `floats` values: whole 16 bytes, at least 16. */
export function byteSize(floats: number): number {
  return Math.max(16, Math.ceil((floats * 4) / 16) * 16);
}

/**
 * The array, typed as writeBuffer's `BufferSource`: WebGPU takes views of
 * shared memory too (its `AllowSharedBufferSource`), as Deno does, whose
 * types still say otherwise; the loader reads large weight files into
 * shared memory, which a copy here would double.
 */
export function bufferSource<T extends Float32Array | Int32Array>(
  data: T,
): T & { buffer: ArrayBuffer } {
  return data as T & { buffer: ArrayBuffer };
}

/** What scratch kept for the backend's life holds; see {@link GpuMemory.lasting}. */
export type LastingPurpose = "normed" | "shares" | "found" | "seen" | "wide" | "partial";

/**
 * The device's memory as the backend uses it: uploads of weights (split by
 * rows over the binding limit), the pool of scratch buffers, scratch that
 * lasts, and small placeholder buffers bound where a kernel's input or output
 * is absent.
 */
export class GpuMemory {
  /** Scratch buffers that come and go. */
  readonly pool: BufferPool;
  /** Stands for absent read-only inputs. */
  readonly absent: GPUBuffer;
  /** Stand for unused read-write scratch or outputs: four, as writable bindings must not alias. */
  readonly unused: readonly [GPUBuffer, GPUBuffer, GPUBuffer, GPUBuffer];
  readonly #lasting = new Map<string, GpuBuffer>();

  constructor(
    readonly device: GPUDevice,
    /** Bytes above which a matrix is split by rows, below the binding limit. */
    readonly splitMatricesOver = Infinity,
  ) {
    this.pool = new BufferPool(device, this.bindingLimit);
    const small = () => device.createBuffer({ size: 16, usage: STORAGE_USAGE });
    this.absent = small();
    this.unused = [small(), small(), small(), small()];
  }

  /** The largest buffer one binding takes. */
  get bindingLimit(): number {
    return Math.min(
      this.device.limits.maxStorageBufferBindingSize,
      this.device.limits.maxBufferSize,
    );
  }

  /** Throws, naming the limit, for a buffer larger than one binding takes. */
  checkSize(bytes: number): void {
    const limit = this.bindingLimit;
    if (bytes > limit) {
      throw new RangeError(
        `A buffer of ${bytes} bytes exceeds this WebGPU device's limit of ${limit} bytes ` +
          `(maxStorageBufferBindingSize): use backend "wasm" or "js" for this model`,
      );
    }
  }

  /**
   * A buffer holding `data`; a row-major matrix with rows of `rowLength` that
   * is larger than one binding allows is split by rows.
   */
  upload(data: Float32Array, rowLength?: number): GpuBuffer {
    const bytes = byteSize(data.length);
    const split = this.#split(data, bytes, rowLength, (rows) => this.upload(rows), null);
    if (split) return split;
    this.checkSize(bytes);
    // writeBuffer, not mappedAtCreation: mapping a large buffer costs seconds
    // per 100 MB in Deno on a real GPU. The new buffer has no recorded use yet,
    // so the write cannot overtake one.
    const buffer = this.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
    this.device.queue.writeBuffer(buffer, 0, bufferSource(data));
    return new GpuBuffer(buffer, data.length);
  }

  /**
   * Stores an F16 or BF16 matrix packed two values per u32: half the memory
   * and bandwidth of f32, same products. A BF16 matrix whose values are all
   * exact f16 goes up as f16, as `unpack2x16float` is one builtin where bf16
   * takes a shift and a mask.
   */
  uploadHalfMatrix(matrix: HalfMatrix): GpuBuffer {
    const { format, halves, cols } = matrix;
    const f16 = format === "bf16" ? bf16AsF16(halves) : null;
    return f16
      ? this.#uploadHalves(f16.subarray(0, halves.length), "f16", cols)
      : this.#uploadHalves(halves, format, cols);
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
    const limit = Math.min(this.bindingLimit, this.splitMatricesOver);
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
    this.checkSize(packed.byteLength);
    const buffer = this.device.createBuffer({ size: packed.byteLength, usage: STORAGE_USAGE });
    this.device.queue.writeBuffer(buffer, 0, packed);
    return new GpuBuffer(buffer, length, type);
  }

  /**
   * A buffer of `length` floats for `purpose` (normalised linear inputs, the
   * shares of a folded x_proj, the top-k of sampled slices, the ids a
   * penalty has seen, the state of wide sampling, a split matmul's partial
   * sums), one per purpose and size for the backend's life: a recording may
   * name it, so it must not move.
   */
  lasting(purpose: LastingPurpose, length: number): GpuBuffer {
    const key = `${purpose}:${length}`;
    let buffer = this.#lasting.get(key);
    if (!buffer) {
      // Created directly (no clear to record): it is written before it is read.
      const bytes = byteSize(length);
      this.checkSize(bytes);
      const gpuBuffer = this.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
      this.#lasting.set(key, buffer = new GpuBuffer(gpuBuffer, length));
    }
    return buffer;
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
    this.checkSize(bytes);
    const buffer = this.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
    // Whole u32s: an odd count gets a zero after it.
    const padded = new Uint16Array(bytes / 2);
    padded.set(halves);
    this.device.queue.writeBuffer(buffer, 0, padded);
    return new GpuBuffer(buffer, halves.length, format);
  }

  /**
   * A matrix of `bytes` over the binding limit, uploaded by `uploadPart` in
   * parts of whole rows; null when it fits (or is not a matrix: then
   * checkSize reports it).
   */
  #split<T extends Float32Array | Uint16Array>(
    data: T,
    bytes: number,
    rowLength: number | undefined,
    uploadPart: (rows: T) => GpuBuffer,
    half: HalfFormat | null,
  ): GpuBuffer | null {
    const limit = Math.min(this.bindingLimit, this.splitMatricesOver);
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
}
