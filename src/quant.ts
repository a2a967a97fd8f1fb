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
 * Q8_0 (ggml's layout): each row is `cols / 32` blocks of 34 bytes, an f16
 * scale d then 32 int8 values q; the weight is d·q.
 *
 * @module
 */

import { f16ToF32 } from "./safetensors.ts";

/** Elements per Q8_0 block. */
export const Q8_0_BLOCK = 32;
/** Bytes per Q8_0 block: an f16 scale and 32 int8 values. */
export const Q8_0_BYTES = 34;

/** A row-major matrix [rows, cols] held as quantized blocks. */
export interface QuantizedMatrix {
  /** The block format; only Q8_0 is kept so far. */
  readonly type: "q8_0";
  /** Output rows. */
  readonly rows: number;
  /** Elements per row, a multiple of {@link Q8_0_BLOCK}. */
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

/** Bytes of one row of Q8_0 blocks with `cols` elements. */
function q8RowBytes(cols: number): number {
  return (cols / Q8_0_BLOCK) * Q8_0_BYTES;
}

/**
 * A Q8_0 matrix over `blocks`, checked: `cols` a multiple of 32, the bytes
 * exactly the blocks' and every scale finite (a NaN or infinite scale would
 * make the whole block so).
 *
 * @throws {RangeError} Naming `what` and the problem.
 */
export function q8_0Matrix(
  rows: number,
  cols: number,
  blocks: Uint8Array,
  what: string,
): QuantizedMatrix {
  if (!(cols > 0 && cols % Q8_0_BLOCK === 0)) {
    throw new RangeError(`${what} has rows of ${cols}, not a multiple of Q8_0's block of 32`);
  }
  const expected = rows * q8RowBytes(cols);
  if (blocks.length !== expected) {
    throw new RangeError(`${what} needs ${expected} bytes of Q8_0 blocks, got ${blocks.length}`);
  }
  for (let at = 0; at < blocks.length; at += Q8_0_BYTES) {
    // An f16 whose exponent bits are all ones is infinite or NaN.
    if ((blocks[at + 1] & 0x7c) === 0x7c) {
      throw new RangeError(
        `${what} holds a scale of ${f16ToF32(blocks[at] | (blocks[at + 1] << 8))} in block ${
          at / Q8_0_BYTES
        }; weights must be finite`,
      );
    }
  }
  return { type: "q8_0", rows, cols, blocks };
}

/** The float32 values d·q of a quantized matrix, row-major [rows, cols]. */
export function dequantizeMatrix(matrix: QuantizedMatrix): Float32Array {
  const { blocks } = matrix;
  const out = new Float32Array(matrix.rows * matrix.cols);
  const signed = new Int8Array(blocks.buffer, blocks.byteOffset, blocks.byteLength);
  for (let block = 0, at = 0; at < blocks.length; block++, at += Q8_0_BYTES) {
    const d = f16ToF32(blocks[at] | (blocks[at + 1] << 8));
    const base = block * Q8_0_BLOCK;
    for (let j = 0; j < Q8_0_BLOCK; j++) out[base + j] = d * signed[at + 2 + j];
  }
  return out;
}
