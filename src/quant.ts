/**
 * Weight matrices kept in a quantized block format instead of float32, so a
 * quantized GGUF model takes the memory (and, on a backend with kernels for
 * it, the bandwidth) of its blocks rather than of widened floats.
 *
 * Only the matrices that `linear` reads (in_proj, x_proj, dt_proj, out_proj,
 * lm_head) and the embedding, which the model gathers by rows, take this
 * form; vectors, norms, A, D, the convolution and the state stay float32.
 * A backend keeps the blocks where it has kernels for them
 * (`Backend.uploadQuantizedMatrix`); elsewhere the model uploads
 * {@link dequantizeMatrix}'s float32 values, which are exactly the values the
 * kernels multiply by.
 *
 * ggml's layouts, each row `cols / 32` blocks of 32 weights with an f16
 * scale d first: Q8_0 (34 bytes) then holds 32 int8 values q, the weight
 * d·q; Q4_0 (18 bytes) holds 16 bytes whose byte j has weight j's 4 bits u
 * in its low nibble and weight j + 16's in its high one, the weight d·(u − 8).
 *
 * @module
 */

import { f16ToF32 } from "./safetensors.ts";

/** Elements per block, in both formats. */
export const QUANT_BLOCK = 32;

/** A block format that {@link QuantizedMatrix} holds: ggml's Q8_0 or Q4_0. */
export type BlockType = "q8_0" | "q4_0";

/** Bytes per block of {@link QUANT_BLOCK} weights in ggml's layout of each format. */
export const BLOCK_BYTES: Readonly<Record<BlockType, number>> = { q8_0: 34, q4_0: 18 };

/** A row-major matrix [rows, cols] held as quantized blocks. */
export interface QuantizedMatrix {
  /** The block format. */
  readonly type: BlockType;
  /** Output rows. */
  readonly rows: number;
  /** Elements per row, a multiple of {@link QUANT_BLOCK}. */
  readonly cols: number;
  /** `rows · cols / 32` blocks, row after row (a view of the file's bytes where possible). */
  readonly blocks: Uint8Array;
}

/** A weight matrix as the loader hands it over: float32, or kept as blocks. */
export type HostMatrix = Float32Array | QuantizedMatrix;

/** Whether `matrix` is kept as blocks. */
export function isQuantized(matrix: HostMatrix): matrix is QuantizedMatrix {
  return !(matrix instanceof Float32Array);
}

/**
 * A matrix of `type` blocks over `blocks`, checked: `cols` a multiple of 32,
 * the bytes exactly the blocks' and every scale finite (a NaN or infinite
 * scale would make the whole block so).
 *
 * @throws {RangeError} Naming `what` and the problem.
 */
export function quantizedMatrix(
  type: BlockType,
  rows: number,
  cols: number,
  blocks: Uint8Array,
  what: string,
): QuantizedMatrix {
  const name = type.toUpperCase();
  if (!(cols > 0 && cols % QUANT_BLOCK === 0)) {
    throw new RangeError(`${what} has rows of ${cols}, not a multiple of ${name}'s block of 32`);
  }
  const blockBytes = BLOCK_BYTES[type];
  const expected = rows * (cols / QUANT_BLOCK) * blockBytes;
  if (blocks.length !== expected) {
    throw new RangeError(`${what} needs ${expected} bytes of ${name} blocks, got ${blocks.length}`);
  }
  for (let at = 0; at < blocks.length; at += blockBytes) {
    // An f16 whose exponent bits are all ones is infinite or NaN.
    if ((blocks[at + 1] & 0x7c) === 0x7c) {
      throw new RangeError(
        `${what} holds a scale of ${f16ToF32(blocks[at] | (blocks[at + 1] << 8))} in block ${
          at / blockBytes
        }; weights must be finite`,
      );
    }
  }
  return { type, rows, cols, blocks };
}

/** The float32 values of a quantized matrix, row-major [rows, cols]: d·q, or d·(u − 8). */
export function dequantizeMatrix(matrix: QuantizedMatrix): Float32Array {
  const { blocks, type } = matrix;
  const out = new Float32Array(matrix.rows * matrix.cols);
  const blockBytes = BLOCK_BYTES[type];
  const signed = new Int8Array(blocks.buffer, blocks.byteOffset, blocks.byteLength);
  for (let block = 0, at = 0; at < blocks.length; block++, at += blockBytes) {
    const d = f16ToF32(blocks[at] | (blocks[at + 1] << 8));
    const base = block * QUANT_BLOCK;
    if (type === "q8_0") {
      for (let j = 0; j < QUANT_BLOCK; j++) out[base + j] = d * signed[at + 2 + j];
      continue;
    }
    for (let j = 0; j < QUANT_BLOCK / 2; j++) {
      const byte = blocks[at + 2 + j];
      out[base + j] = d * ((byte & 0x0f) - 8);
      out[base + j + 16] = d * ((byte >> 4) - 8);
    }
  }
  return out;
}
