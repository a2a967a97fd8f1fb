/**
 * The wasm backend's buffers: ranges of its `WebAssembly.Memory` holding
 * f32 values, or weight matrices kept as repacked quantized blocks or as
 * 16-bit values, and the layouts of those blocks.
 *
 * @module
 */

import { BLOCK_BYTES, BLOCK_ELEMENTS, type BlockType, type HalfFormat } from "../../quant.ts";
import { q4KScaleMin } from "../../gguf.ts";
import { f16ToF32 } from "../../safetensors.ts";

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
export const Q8_VALUES = 8;

/** Where a repacked Q4_K super-block's values start, after d, dmin, the scales and the mins. */
export const Q4K_VALUES = 24;

/** Bytes of one repacked row of `cols` weights. */
export const packedRowBytes = (type: BlockType, cols: number) =>
  (cols / BLOCK_ELEMENTS[type]) * PACKED_BYTES[type];

/**
 * Q8_0 and Q4_K rows are held in quads, their blocks interleaved (block b of
 * row 4g + r at quad g's start + (4·b + r)·blockBytes) so that the GEMV's four
 * rows per pass are one sequential stream; the last quad is padded with zero
 * rows. Quad g starts where row 4g would in a plain layout, so a view from a
 * row that is a multiple of 4 is a matrix of the same layout.
 */
export const QUAD = 4;

/** Whether a format's rows are held in quads (see {@link QUAD}). */
export const inQuads = (type: BlockType) => type !== "q4_0";

/** Byte offset of block `block` of row `row` in a repacked matrix of `cols` columns. */
export function blockOffset(type: BlockType, cols: number, row: number, block: number): number {
  const blockBytes = PACKED_BYTES[type];
  if (!inQuads(type)) return row * packedRowBytes(type, cols) + block * blockBytes;
  const quad = row - (row % QUAD);
  return quad * packedRowBytes(type, cols) + (block * QUAD + (row % QUAD)) * blockBytes;
}

/** Bytes a repacked matrix takes: rows in quads rounded up to whole quads. */
export const packedBytes = (type: BlockType, rows: number, cols: number) =>
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
export function packBlocks(
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

/**
 * A view of `length` floats of `buf` from `offset` (never released on its
 * own); of a quantized matrix, the rows `offset / cols` on, `length / cols` of
 * them (for Q8_0 and Q4_K, from a multiple of 4: see {@link QUAD}).
 */
export const view = (buf: WasmBuffer, offset: number, length: number): WasmBuffer =>
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

/** Throws unless [offset, offset + length) lies in `buf`, a buffer not yet released. */
export function checkRange(buf: WasmBuffer, offset: number, length: number): void {
  if (buf.ptr < 0) throw new Error("Buffer used after release");
  if (offset < 0 || length < 0 || offset + length > buf.length) {
    throw new RangeError(`Range [${offset}, ${offset + length}) outside a buffer of ${buf.length}`);
  }
}
