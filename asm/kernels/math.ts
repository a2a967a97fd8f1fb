// Vector math on SIMD lanes: exp, softplus and silu of f32x4, fused multiply-
// add, lane sums.
// asm/kernels.ts says what every kernel assumes.

import { LOW_SCALE, LOW_STEPS } from "./q8_0";
import { TOP_NIBBLE } from "./q4_0";
import { HALF_BITS, HALF_SCALE } from "./half";

// exp(x) for f32x4, Cephes-style: x = n·ln2 + r with |r| <= ln2/2, e^r by a
// degree-6 polynomial, 2^n put straight into the exponent bits. Inputs are
// clamped to [-87.3, 88.3] (results stay normal floats, no inf/NaN).
// Measured max relative error against f64 Math.exp, over 2^20 evenly spaced
// f32 inputs in [-87, 88]: 8.0e-8 (under one f32 ulp at 2^-23 = 1.19e-7);
// checked by tests/wasm_kernels_test.ts. Used by silu (the conv's output and
// the scan's z gate); the scan's own exp(dt·A) is the f64 pow2dWith of scan.ts.

// The polynomial's constants, splatted, as mutable globals: V8 materializes a
// v128.const in about four instructions inside every loop iteration, while a
// global is one load that folds into the arithmetic. (setConstants, which
// nobody needs to call, keeps the optimizer from folding them back.)
export let LOG2E = f32x4.splat(1.44269504088896341);
export let MAGIC = f32x4.splat(12582912.0); // 1.5·2^23
let LN2_HI = f32x4.splat(0.693359375);
let LN2_LO = f32x4.splat(-2.12194440e-4);
let P0 = f32x4.splat(1.9875691500e-4);
let P1 = f32x4.splat(1.3981999507e-3);
let P2 = f32x4.splat(8.3334519073e-3);
let P3 = f32x4.splat(4.1665795894e-2);
let P4 = f32x4.splat(1.6666665459e-1);
let P5 = f32x4.splat(5.0000001201e-1);
export let ONE = f32x4.splat(1);
let TWO = f32x4.splat(2);
let ZERO = f32x4.splat(0);
let LO = f32x4.splat(-87.3);
let HI = f32x4.splat(88.3);
let BIAS127 = i32x4.splat(127);

/** Re-initializes the constants held as globals, here and in the weight formats' files. */
export function setConstants(scale: f32): void {
  LOG2E = f32x4.splat(<f32>1.44269504088896341 * scale);
  MAGIC = f32x4.splat(<f32>12582912.0 * scale);
  LN2_HI = f32x4.splat(<f32>0.693359375 * scale);
  LN2_LO = f32x4.splat(<f32>-2.12194440e-4 * scale);
  P0 = f32x4.splat(<f32>1.9875691500e-4 * scale);
  P1 = f32x4.splat(<f32>1.3981999507e-3 * scale);
  P2 = f32x4.splat(<f32>8.3334519073e-3 * scale);
  P3 = f32x4.splat(<f32>4.1665795894e-2 * scale);
  P4 = f32x4.splat(<f32>1.6666665459e-1 * scale);
  P5 = f32x4.splat(<f32>5.0000001201e-1 * scale);
  ONE = f32x4.splat(scale);
  TWO = f32x4.splat(2 * scale);
  ZERO = f32x4.splat(0 * scale);
  LO = f32x4.splat(<f32>-87.3 * scale);
  HI = f32x4.splat(<f32>88.3 * scale);
  BIAS127 = i32x4.splat(<i32>(<f32>127 * scale));
  TOP_NIBBLE = i32x4.splat(<i32>(<f32>-268435456 * scale));
  LOW_STEPS = f32x4.splat(<f32>32768 * scale);
  LOW_SCALE = f32x4.splat(scale / 32768);
  HALF_BITS = i32x4.splat(<i32>(<f32>-1879056384 * scale));
  HALF_SCALE = f32x4.splat(<f32>5.192296858534828e33 * scale);
}

// @ts-ignore: decorator
@inline
export function exp4(x0: v128): v128 {
  // pmin/pmax are single instructions (min/max propagate NaN at a cost).
  const x1 = f32x4.pmin(f32x4.pmax(x0, LO), HI);
  // Round x·log2(e) to the nearest integer n by adding 1.5·2^23: n then sits in
  // t's low mantissa bits, and (bits(t) + 127) << 23 is 2^n's bit pattern (the
  // shift drops t's exponent), without a float-to-int conversion.
  const t = f32x4.add(f32x4.mul(x1, LOG2E), MAGIC);
  const n = f32x4.sub(t, MAGIC);
  const r = f32x4.sub(f32x4.sub(x1, f32x4.mul(n, LN2_HI)), f32x4.mul(n, LN2_LO));
  let p = f32x4.add(f32x4.mul(P0, r), P1);
  p = f32x4.add(f32x4.mul(p, r), P2);
  p = f32x4.add(f32x4.mul(p, r), P3);
  p = f32x4.add(f32x4.mul(p, r), P4);
  p = f32x4.add(f32x4.mul(p, r), P5);
  p = f32x4.add(f32x4.add(f32x4.mul(f32x4.mul(p, r), r), r), ONE);
  const scale = i32x4.shl(i32x4.add(t, BIAS127), 23);
  return f32x4.mul(p, scale);
}

// softplus(x) = max(x, 0) + log1p(e^-|x|), with log1p(e) for e in (0, 1] as
// 2·atanh(s) = 2(s + s³/3 + ... + s¹⁵/15), s = e / (2 + e) <= 1/3: the series
// truncation error is below 1.4e-9 relative, so the result is f32-accurate
// without the cancellation of log(1 + e). Matches PyTorch's softplus (which
// returns x above 20) to within rounding.
// @ts-ignore: decorator
@inline
export function softplus4(x: v128): v128 {
  const e = exp4(f32x4.neg(f32x4.abs(x)));
  const s = f32x4.div(e, f32x4.add(e, TWO));
  const s2 = f32x4.mul(s, s);
  let p = f32x4.add(f32x4.mul(s2, f32x4.splat(<f32> (1.0 / 15))), f32x4.splat(<f32> (1.0 / 13)));
  p = f32x4.add(f32x4.mul(p, s2), f32x4.splat(<f32> (1.0 / 11)));
  p = f32x4.add(f32x4.mul(p, s2), f32x4.splat(<f32> (1.0 / 9)));
  p = f32x4.add(f32x4.mul(p, s2), f32x4.splat(<f32> (1.0 / 7)));
  p = f32x4.add(f32x4.mul(p, s2), f32x4.splat(<f32> (1.0 / 5)));
  p = f32x4.add(f32x4.mul(p, s2), f32x4.splat(<f32> (1.0 / 3)));
  p = f32x4.add(f32x4.mul(p, s2), ONE);
  const log1p = f32x4.mul(f32x4.mul(p, s), TWO);
  return f32x4.add(f32x4.pmax(x, ZERO), log1p);
}

// silu(x) = x / (1 + e^-x).
// @ts-ignore: decorator
@inline
export function silu4(x: v128): v128 {
  return f32x4.div(x, f32x4.add(exp4(f32x4.neg(x)), ONE));
}

// @ts-ignore: decorator
@inline
export function hsum(v: v128): f32 {
  const s = f32x4.add(v, v128.shuffle<f32>(v, v, 2, 3, 0, 1));
  return f32x4.extract_lane(f32x4.add(s, v128.shuffle<f32>(s, s, 1, 0, 3, 2)), 0);
}

// Exposed for the accuracy test of exp4 and softplus4: out[i] = f(x[i]),
// `which` 0 = exp, 1 = softplus, 2 = silu; n a multiple of 4.
export function mathTest(out: usize, x: usize, n: i32, which: i32): void {
  for (let i = 0; i < n; i += 4) {
    const p = <usize> i << 2;
    const v = v128.load(x + p);
    v128.store(out + p, which == 0 ? exp4(v) : which == 1 ? softplus4(v) : silu4(v));
  }
}

// Lane k of the result is the sum of the lanes of the k-th argument.
// @ts-ignore: decorator
@inline
export function sums4(a: v128, b: v128, c: v128, d: v128): v128 {
  const ab = f32x4.add(v128.shuffle<f32>(a, b, 0, 2, 4, 6), v128.shuffle<f32>(a, b, 1, 3, 5, 7));
  const cd = f32x4.add(v128.shuffle<f32>(c, d, 0, 2, 4, 6), v128.shuffle<f32>(c, d, 1, 3, 5, 7));
  return f32x4.add(v128.shuffle<f32>(ab, cd, 0, 2, 4, 6), v128.shuffle<f32>(ab, cd, 1, 3, 5, 7));
}

// a·b + c per lane. The relaxed-SIMD build gives one fused multiply-add where
// the CPU has FMA (relaxed SIMD lets the engine choose, so the last bit may
// differ between machines), which doubles the matmul's arithmetic per
// instruction; the plain-SIMD build (asm/build.ts), for engines that reject
// relaxed SIMD, multiplies and adds. ASC_FEATURE_RELAXED_SIMD is a constant
// that the compiler folds, so each build holds only its own branch.
// @ts-ignore: decorator
@inline
export function madd(a: v128, b: v128, c: v128): v128 {
  if (ASC_FEATURE_RELAXED_SIMD) return f32x4.relaxed_madd(a, b, c);
  return f32x4.add(f32x4.mul(a, b), c);
}

// e^x and softplus of one float, through the vector versions.
// @ts-ignore: decorator
@inline
export function exp1(x: f32): f32 {
  return f32x4.extract_lane(exp4(f32x4.splat(x)), 0);
}

// @ts-ignore: decorator
@inline
export function silu1(x: f32): f32 {
  return f32x4.extract_lane(silu4(f32x4.splat(x)), 0);
}
