// linearBlocks: the linear layer over any block format (Q8_0, Q4_0, Q4_K).
// asm/kernels.ts says what every kernel assumes.

import { OB, matmulRows, tileBytes } from "./linear";
import {
  Q8_BLOCK_BYTES, Q8_QUAD_BYTES, dequantQ8, gemvQ8, gemvQ8Relaxed, q8Block,
  quantizeQ7Input, quantizeQ8Input,
} from "./q8_0";
import { Q4_BLOCK_BYTES, dequantQ4, gemvQ4 } from "./q4_0";
import { Q4K_QUAD_BYTES, blockSums, dequantQ4K, gemvQ4K } from "./q4_k";

// The one-row GEMV over Q8_0 blocks, x rounded into `scratch`: on relaxed
// SIMD's int8 dot products where asked (relaxedDot) and this is the
// relaxed-SIMD build, else on int16 ones. The plain-SIMD build compiles only
// the int16 path (ASC_FEATURE_RELAXED_SIMD folds), so it ignores relaxedDot.
// @ts-ignore: decorator
@inline
function gemvQ8Row(
  out: usize, x: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32, scratch: usize,
  relaxedDot: bool,
): void {
  if (ASC_FEATURE_RELAXED_SIMD) {
    if (relaxedDot) {
      quantizeQ7Input(scratch, x, inDim >> 5);
      gemvQ8Relaxed(out, scratch, w, bias, inDim, o0, o1);
      return;
    }
  }
  quantizeQ8Input(scratch, x, inDim >> 5);
  gemvQ8(out, scratch, w, bias, inDim, o0, o1);
}

// `blockType` of linearBlocks, as src/backends/wasm.ts passes it.
const BLOCKS_Q8: i32 = 0;
const BLOCKS_Q4K: i32 = 2;
// Or'd into blockType: the one-row GEMVs take relaxed SIMD's int8 dot
// products (gemvQ8Relaxed) rather than int16 ones.
const RELAXED_DOT: i32 = 4;

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over repacked Q8_0
// (blockType 0), Q4_0 (1) or Q4_K (2) weights, output columns [o0, o1). One
// row: the GEMV over the blocks (Q8_0's and Q4_K's on x rounded to int16
// terms into `scratch`, by each thread for itself: inDim values against its
// share of outDim·inDim weights). More rows: each block of OB weight rows is
// dequantized once into `scratch` (blocksScratchBytes, in L2) and the f32
// matmul runs over it, so the widening is paid once per weight rather than
// once per row of x.
export function linearBlocks(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  scratch: usize,
  blockType: i32,
): void {
  const relaxed = (blockType & RELAXED_DOT) != 0;
  blockType &= ~RELAXED_DOT;
  const q8 = blockType == BLOCKS_Q8;
  const q4k = blockType == BLOCKS_Q4K;
  if (rows == 1) {
    if (q8) gemvQ8Row(out, x, w, bias, inDim, o0, o1, scratch, relaxed);
    else if (q4k) {
      quantizeQ8Input(scratch, x, inDim >> 5);
      const sums = scratch + (<usize> inDim << 2) + (<usize> inDim >> 3);
      blockSums(sums, x, inDim >> 5);
      gemvQ4K(out, scratch, w, bias, inDim, o0, o1, sums + (<usize> inDim >> 3));
    } else gemvQ4(out, x, w, bias, inDim, o0, o1);
    return;
  }
  const blocks = inDim >> 5;
  const q4Row = <usize> blocks * Q4_BLOCK_BYTES;
  const f32Row = <usize> inDim << 2;
  for (let ob = o0; ob < o1; ob += OB) {
    const obEnd = min(ob + OB, o1);
    if (q8) {
      // A quad at a time, its blocks in the order they lie (ob and OB are
      // multiples of 4, so a last partial quad's padding rows still land in
      // the tile).
      for (let o = ob; o < obEnd; o += 4) {
        let p = q8Block(w, o, 0, blocks);
        let dst = scratch + <usize> (o - ob) * f32Row;
        for (let b = 0; b < blocks; b++) {
          dequantQ8(p, dst);
          dequantQ8(p + Q8_BLOCK_BYTES, dst + f32Row);
          dequantQ8(p + 2 * Q8_BLOCK_BYTES, dst + 2 * f32Row);
          dequantQ8(p + 3 * Q8_BLOCK_BYTES, dst + 3 * f32Row);
          p += Q8_QUAD_BYTES;
          dst += 128;
        }
      }
    } else if (q4k) {
      // As Q8_0's: a quad at a time, its super-blocks in the order they lie.
      const superBlocks = inDim >> 8;
      for (let o = ob; o < obEnd; o += 4) {
        let p = w + <usize> (o >> 2) * superBlocks * Q4K_QUAD_BYTES;
        let dst = scratch + <usize> (o - ob) * f32Row;
        for (let b = 0; b < superBlocks; b++) {
          dequantQ4K(p, dst);
          dequantQ4K(p + 152, dst + f32Row);
          dequantQ4K(p + 304, dst + 2 * f32Row);
          dequantQ4K(p + 456, dst + 3 * f32Row);
          p += Q4K_QUAD_BYTES;
          dst += 1024;
        }
      }
    } else {
      let dst = scratch;
      for (let o = ob; o < obEnd; o++) {
        let p = w + <usize> o * q4Row;
        for (let b = 0; b < blocks; b++) {
          dequantQ4(p, dst);
          p += Q4_BLOCK_BYTES;
          dst += 128;
        }
      }
    }
    // The f32 kernel addresses weight row o at w + o·f32Row: the tile, moved
    // back by ob rows (wrapping u32 arithmetic lands on the tile again).
    const panel = scratch + <usize> OB * f32Row;
    matmulRows(out, x, scratch - <usize> ob * f32Row, bias, rows, inDim, outDim, ob, obEnd, panel);
  }
}

// Bytes of per-thread scratch linearBlocks needs: OB rows of dequantized
// weights for rows > 1; for one row, the rounded input of the Q8_0 and Q4_K
// GEMVs (4 + 1/8 bytes per value), the block sums of the Q4_K one (1/8 byte
// per value) and its quad's sub-block factors (128 bytes), in whole cache
// lines.
export function blocksScratchBytes(rows: i32, inDim: i32): i32 {
  return rows > 1 ? tileBytes(inDim) : (inDim * 4 + (inDim >> 2) + 128 + 63) & ~63;
}
