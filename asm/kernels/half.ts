// The linear layer over f16 and bf16 weights.
// asm/kernels.ts says what every kernel assumes.

import { hsum, madd } from "./math";
import { OB, matmulRows, tileBytes } from "./linear";

// 16-bit weights (an F16 or BF16 checkpoint kept 16-bit by
// src/backends/wasm.ts), 2 bytes each, rows back to back. The kernels take
// the format as a type argument, so that each compiles once per format with
// no branch in its loops (AssemblyScript has no constant generics, and
// isSigned<T>() is known at compile time): F16, a signed i16, for f16 bits;
// BF16, an unsigned u16, for bf16 bits.
type F16 = i16;
type BF16 = u16;

// WebAssembly SIMD has no f16 conversion, but for a finite f16 h,
// sign-extended to an i32 and shifted left by 13, the mask 0x8fffe000 keeps
// its sign in bit 31 and its exponent and mantissa in f32's low exponent and
// high mantissa bits: an f32 equal to h·2^-112 exactly, subnormals included,
// which a multiply by 2^112 makes h. Weights are checked finite at load, so
// no infinity or NaN reaches here. A bf16 is the top half of its f32: zero-
// extended and shifted left by 16, two instructions where f16 takes four.
export let HALF_BITS = i32x4.splat(-1879056384); // 0x8fffe000; a global, as math.ts explains
export let HALF_SCALE = f32x4.splat(5.192296858534828e33); // 2^112

// 16-bit values in the four i32 lanes of `wide` (as loaded, extended), as f32.
// @ts-ignore: decorator
@inline
function widenHalves<T>(wide: v128): v128 {
  if (isSigned<T>()) return f32x4.mul(v128.and(i32x4.shl(wide, 13), HALF_BITS), HALF_SCALE);
  return i32x4.shl(wide, 16);
}

// Halves 4k .. 4k + 3 of the 8 in `v` (k 0 or 1), as f32.
// @ts-ignore: decorator
@inline
function halfQuarter<T>(v: v128, k: i32): v128 {
  if (isSigned<T>()) {
    return widenHalves<T>(k == 0 ? i32x4.extend_low_i16x8_s(v) : i32x4.extend_high_i16x8_s(v));
  }
  return widenHalves<T>(k == 0 ? i32x4.extend_low_i16x8_u(v) : i32x4.extend_high_i16x8_u(v));
}

// The 16-bit value at p, as f32 (the tails).
// @ts-ignore: decorator
@inline
function halfAt<T>(p: usize): f32 {
  return f32x4.extract_lane(widenHalves<T>(i32x4.splat(<i32> load<T>(p))), 0);
}

// GEMV (rows = 1) over 16-bit weights, one weight row at a time as the f32
// GEMV (the prefetcher follows one stream best), 16 halves per step.
function gemvHalf<T>(out: usize, x: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
  const k16 = inDim & ~15;
  const k8 = inDim & ~7;
  for (let o = o0; o < o1; o++) {
    const w0 = w + (<usize> o * <usize> inDim << 1);
    let a0 = f32x4.splat(0);
    let a1 = f32x4.splat(0);
    let a2 = f32x4.splat(0);
    let a3 = f32x4.splat(0);
    let k = 0;
    for (; k < k16; k += 16) {
      const xp = x + (<usize> k << 2);
      const v0 = v128.load(w0 + (<usize> k << 1));
      const v1 = v128.load(w0 + (<usize> k << 1), 16);
      a0 = madd(halfQuarter<T>(v0, 0), v128.load(xp), a0);
      a1 = madd(halfQuarter<T>(v0, 1), v128.load(xp, 16), a1);
      a2 = madd(halfQuarter<T>(v1, 0), v128.load(xp, 32), a2);
      a3 = madd(halfQuarter<T>(v1, 1), v128.load(xp, 48), a3);
    }
    for (; k < k8; k += 8) {
      const xp = x + (<usize> k << 2);
      const v0 = v128.load(w0 + (<usize> k << 1));
      a0 = madd(halfQuarter<T>(v0, 0), v128.load(xp), a0);
      a1 = madd(halfQuarter<T>(v0, 1), v128.load(xp, 16), a1);
    }
    let sum = hsum(f32x4.add(f32x4.add(a0, a1), f32x4.add(a2, a3)));
    for (; k < inDim; k++) sum += halfAt<T>(w0 + (<usize> k << 1)) * load<f32>(x + (<usize> k << 2));
    if (bias) sum += load<f32>(bias + (<usize> o << 2));
    store<f32>(out + (<usize> o << 2), sum);
  }
}

// out [n] = the n 16-bit values at src in format T, as f32.
function widenRow<T>(out: usize, src: usize, n: i32): void {
  const k8 = n & ~7;
  let k = 0;
  for (; k < k8; k += 8) {
    const v = v128.load(src + (<usize> k << 1));
    v128.store(out + (<usize> k << 2), halfQuarter<T>(v, 0));
    v128.store(out + (<usize> k << 2), halfQuarter<T>(v, 1), 16);
  }
  for (; k < n; k++) store<f32>(out + (<usize> k << 2), halfAt<T>(src + (<usize> k << 1)));
}

// out [n] = the n 16-bit values at src (bf16 when `bf16` is nonzero, else
// f16), as f32: the rows embed and copyRows gather from a 16-bit table.
export function widenHalfRow(out: usize, src: usize, n: i32, bf16: i32): void {
  if (bf16) widenRow<BF16>(out, src, n);
  else widenRow<F16>(out, src, n);
}

// Bytes of per-thread scratch linearHalf needs: OB rows widened to f32, and
// the f32 matmul's panel.
export function halfScratchBytes(inDim: i32): i32 {
  return tileBytes(inDim);
}

// linearHalf in format T.
function linearHalfOf<T>(
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
): void {
  if (rows == 1) {
    gemvHalf<T>(out, x, w, bias, inDim, o0, o1);
    return;
  }
  const f32Row = <usize> inDim << 2;
  for (let ob = o0; ob < o1; ob += OB) {
    const obEnd = min(ob + OB, o1);
    for (let o = ob; o < obEnd; o++) {
      widenRow<T>(scratch + <usize> (o - ob) * f32Row, w + (<usize> o * <usize> inDim << 1), inDim);
    }
    // The tile, moved back by ob rows, as in linearBlocks.
    const panel = scratch + <usize> OB * f32Row;
    matmulRows(out, x, scratch - <usize> ob * f32Row, bias, rows, inDim, outDim, ob, obEnd, panel);
  }
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over 16-bit weights (bf16
// when `bf16` is nonzero, else f16), output columns [o0, o1). One row: the
// GEMV over the halves. More rows: each block of OB weight rows is widened
// once into `scratch` (in L2) and the f32 matmul runs over it, as
// linearBlocks does for quantized blocks.
export function linearHalf(
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
  bf16: i32,
): void {
  if (bf16) linearHalfOf<BF16>(out, x, w, bias, rows, inDim, outDim, o0, o1, scratch);
  else linearHalfOf<F16>(out, x, w, bias, rows, inDim, outDim, o0, o1, scratch);
}
