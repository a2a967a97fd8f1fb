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
 * kernels multiply by. An F16 or BF16 file's matrices come as
 * {@link HalfMatrix} likewise (`Backend.uploadHalfMatrix`, else
 * {@link widenHalfMatrix}).
 *
 * ggml's layouts, each row whole blocks: Q8_0 and Q4_0 blocks of 32 weights
 * with an f16 scale d first, then Q8_0 (34 bytes) 32 int8 values q, the
 * weight d·q; Q4_0 (18 bytes) 16 bytes whose byte j has weight j's 4 bits u
 * in its low nibble and weight j + 16's in its high one, the weight
 * d·(u − 8). Q4_K (144 bytes) holds super-blocks of 256 weights in 8
 * sub-blocks of 32: f16 d and dmin, 12 bytes packing a 6-bit scale sc and a
 * 6-bit min m per sub-block, then 128 bytes of 4-bit values q (each 32 bytes:
 * sub-block 2i in the low nibbles, 2i + 1 in the high ones), the weight
 * d·sc·q − dmin·m.
 *
 * @module
 */

import { dequantize, GGML } from "./gguf.ts";
import { bf16ToF32, f16ToF32, widenHalves } from "./safetensors.ts";

/** A block format that {@link QuantizedMatrix} holds: ggml's Q8_0, Q4_0 or Q4_K. */
export type BlockType = "q8_0" | "q4_0" | "q4_k";

/** Weights per block of each format (a Q4_K super-block is 256). */
export const BLOCK_ELEMENTS: Readonly<Record<BlockType, number>> = {
  q8_0: 32,
  q4_0: 32,
  q4_k: 256,
};

/** Bytes per block of {@link BLOCK_ELEMENTS} weights in ggml's layout of each format. */
export const BLOCK_BYTES: Readonly<Record<BlockType, number>> = { q8_0: 34, q4_0: 18, q4_k: 144 };

/** Byte offsets in a block of its f16 scales: d, and Q4_K's dmin. */
const SCALE_OFFSETS: Readonly<Record<BlockType, readonly number[]>> = {
  q8_0: [0],
  q4_0: [0],
  q4_k: [0, 2],
};

/** ggml's type number of each format. */
const GGML_TYPE: Readonly<Record<BlockType, number>> = {
  q8_0: GGML.Q8_0,
  q4_0: GGML.Q4_0,
  q4_k: GGML.Q4_K,
};

/** A row-major matrix [rows, cols] held as quantized blocks. */
export interface QuantizedMatrix {
  /** The block format. */
  readonly type: BlockType;
  /** Output rows. */
  readonly rows: number;
  /** Elements per row, a multiple of the format's {@link BLOCK_ELEMENTS}. */
  readonly cols: number;
  /** `rows · cols / BLOCK_ELEMENTS[type]` blocks, row after row (a view of the file's bytes where possible). */
  readonly blocks: Uint8Array;
}

/** The 16-bit float formats of F16 and BF16 checkpoints, which {@link HalfMatrix} holds. */
export type HalfFormat = "f16" | "bf16";

/** 16-bit float bit patterns as a file stores them (a view of its bytes where possible). */
export interface Halves {
  /** The 16-bit format. */
  readonly format: HalfFormat;
  /** The bit patterns. */
  readonly halves: Uint16Array;
}

/** A row-major matrix [rows, cols] held as 16-bit floats, as an F16 or BF16 file stores it. */
export interface HalfMatrix extends Halves {
  /** Output rows. */
  readonly rows: number;
  /** Elements per row. */
  readonly cols: number;
}

/** A weight matrix as the loader hands it over: float32, kept as blocks, or kept 16-bit. */
export type HostMatrix = Float32Array | QuantizedMatrix | HalfMatrix;

/** Whether `matrix` is kept as blocks. */
export function isQuantized(matrix: HostMatrix): matrix is QuantizedMatrix {
  return !(matrix instanceof Float32Array) && "blocks" in matrix;
}

/** Whether `matrix` is kept 16-bit. */
export function isHalf(matrix: HostMatrix): matrix is HalfMatrix {
  return !(matrix instanceof Float32Array) && "halves" in matrix;
}

/**
 * A matrix of `format` values over `halves`, checked: exactly `rows · cols`
 * of them, every one finite (an f16 or bf16 whose exponent bits are all ones
 * is infinite or NaN).
 *
 * @throws {RangeError} Naming `what`, the value and its index.
 */
export function halfMatrix(
  format: HalfFormat,
  rows: number,
  cols: number,
  halves: Uint16Array,
  what: string,
): HalfMatrix {
  if (halves.length !== rows * cols) {
    throw new RangeError(`${what} needs ${rows * cols} 16-bit values, got ${halves.length}`);
  }
  const exponent = format === "f16" ? 0x7c00 : 0x7f80;
  for (let i = 0; i < halves.length; i++) {
    if ((halves[i] & exponent) !== exponent) continue;
    const value = format === "f16" ? f16ToF32(halves[i]) : bf16ToF32(halves[i]);
    throw new RangeError(`${what} holds ${value} at index ${i}; weights must be finite`);
  }
  return { format, rows, cols, halves };
}

/** The float32 values of a 16-bit matrix, row-major [rows, cols], exactly. */
export function widenHalfMatrix(matrix: HalfMatrix): Float32Array {
  return widenHalves(matrix.halves, matrix.format);
}

/**
 * A matrix of `type` blocks over `blocks`, checked: `cols` a multiple of the
 * format's block (32, or 256 for Q4_K), the bytes exactly the blocks' and
 * every scale (Q4_K's d and dmin) finite (a NaN or infinite scale would make
 * the whole block so).
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
  const elements = BLOCK_ELEMENTS[type];
  if (!(cols > 0 && cols % elements === 0)) {
    throw new RangeError(
      `${what} has rows of ${cols}, not a multiple of ${name}'s block of ${elements}`,
    );
  }
  const blockBytes = BLOCK_BYTES[type];
  const expected = rows * (cols / elements) * blockBytes;
  if (blocks.length !== expected) {
    throw new RangeError(`${what} needs ${expected} bytes of ${name} blocks, got ${blocks.length}`);
  }
  for (let at = 0; at < blocks.length; at += blockBytes) {
    for (const offset of SCALE_OFFSETS[type]) {
      // An f16 whose exponent bits are all ones is infinite or NaN.
      if ((blocks[at + offset + 1] & 0x7c) !== 0x7c) continue;
      const scale = f16ToF32(blocks[at + offset] | (blocks[at + offset + 1] << 8));
      throw new RangeError(
        `${what} holds a ${offset === 0 ? "scale" : "min scale"} of ${scale} in block ${
          at / blockBytes
        }; weights must be finite`,
      );
    }
  }
  return { type, rows, cols, blocks };
}

/**
 * The float32 values of a quantized matrix, row-major [rows, cols]: d·q,
 * d·(u − 8) or d·sc·q − dmin·m, exactly as ggml's (and gguf-py's)
 * dequantization gives them ({@link dequantize}).
 */
export function dequantizeMatrix(matrix: QuantizedMatrix): Float32Array {
  return dequantize(GGML_TYPE[matrix.type], matrix.blocks, matrix.rows * matrix.cols);
}
