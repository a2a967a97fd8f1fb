// Q4_K weights: the GEMV over them and their dequantization.
// asm/kernels.ts says what every kernel assumes.

import { hsum, madd } from "./math";
import { LOW_SCALE, q8Dot, storeQuad } from "./q8_0";

// Q4_K weights (ggml's super-blocks of 256 weights in 8 sub-blocks of 32;
// sub-block j has a 6-bit scale sc_j and min m_j, the super-block f16 d and
// dmin, and the weight is d·sc_j·q − dmin·m_j for a 4-bit q) as
// src/backends/wasm.ts repacks them at upload, 152 bytes a super-block: d and
// dmin as f32, the 8 scales and then the 8 mins as bytes, then each
// sub-block's 32 values in 16 bytes read as eight u16 lanes, lane k holding
// value 8n + k at nibble n, so that a shift and a mask give eight values in
// order, already int16. The rows are in quads as Q8_0's: super-block b of row
// 4g + r at 608·(g·blocks + b) + 152·r.
const Q4K_BLOCK_BYTES: i32 = 152;
export const Q4K_QUAD_BYTES: i32 = 4 * Q4K_BLOCK_BYTES;
// Where a super-block's values start, after d, dmin, the scales and the mins.
const Q4K_VALUES: i32 = 24;
let NIBBLE = i16x8.splat(15); // a global, as math.ts explains

// Values 8n .. 8n + 7 of a repacked sub-block's 16 bytes `v`, as int16.
// @ts-ignore: decorator
@inline
function q4kEighth(v: v128, n: i32): v128 {
  if (n == 0) return v128.and(v, NIBBLE);
  if (n == 3) return i16x8.shr_u(v, 12);
  return v128.and(i16x8.shr_u(v, 4 * n), NIBBLE);
}

// Σ q·(h + l·2^-15) over the sub-block whose values are at p and the input
// terms h0..h3, l0..l3 of its 32 values (from quantizeQ8Input), in four f32
// lanes. The integer sums are exact: 32·15·32767 < 2^24.
// @ts-ignore: decorator
@inline
function q4kSubDot(
  p: usize, h0: v128, h1: v128, h2: v128, h3: v128, l0: v128, l1: v128, l2: v128, l3: v128,
): v128 {
  const v = v128.load(p);
  const w0 = q4kEighth(v, 0);
  const w1 = q4kEighth(v, 1);
  const w2 = q4kEighth(v, 2);
  const w3 = q4kEighth(v, 3);
  const high = q8Dot(w0, w1, w2, w3, h0, h1, h2, h3);
  return madd(q8Dot(w0, w1, w2, w3, l0, l1, l2, l3), LOW_SCALE, high);
}

// Bytes 0..3 (k 0) or 4..7 (k 1) of the 8 bytes widened in `b` (int16), as f32.
// @ts-ignore: decorator
@inline
function byteQuarter(b: v128, k: i32): v128 {
  return f32x4.convert_i32x4_s(k == 0 ? i32x4.extend_low_i16x8_u(b) : i32x4.extend_high_i16x8_u(b));
}

// For one row's super-block at p: stores its sub-blocks' factors d·sc_j·s_j
// (s_j the input's scales, s0 for sub-blocks 0–3, s1 for 4–7) as 8 f32 at c,
// and returns acc − dmin·Σ m_j·x_j, x_j the input's sums (x0, x1) of each
// sub-block.
// @ts-ignore: decorator
@inline
function q4kScales(p: usize, s0: v128, s1: v128, x0: v128, x1: v128, c: usize, acc: v128): v128 {
  const d = v128.load32_splat(p);
  const scalesMins = v128.load(p, 8);
  const scales = i16x8.extend_low_i8x16_u(scalesMins);
  const mins = i16x8.extend_high_i8x16_u(scalesMins);
  v128.store(c, f32x4.mul(byteQuarter(scales, 0), f32x4.mul(d, s0)));
  v128.store(c, f32x4.mul(byteQuarter(scales, 1), f32x4.mul(d, s1)), 16);
  const minSums = madd(byteQuarter(mins, 1), x1, f32x4.mul(byteQuarter(mins, 0), x0));
  return f32x4.sub(acc, f32x4.mul(minSums, v128.load32_splat(p, 4)));
}

// The sums of x's blocks of 32 values, as f32 at dst + 4·b: what the Q4_K
// GEMV multiplies the mins by (the rounded terms are for the products).
export function blockSums(dst: usize, x: usize, blocks: i32): void {
  for (let b = 0; b < blocks; b++) {
    const p = x + (<usize> b << 7);
    const a = f32x4.add(
      f32x4.add(v128.load(p), v128.load(p, 16)),
      f32x4.add(v128.load(p, 32), v128.load(p, 48)),
    );
    const c = f32x4.add(
      f32x4.add(v128.load(p, 64), v128.load(p, 80)),
      f32x4.add(v128.load(p, 96), v128.load(p, 112)),
    );
    store<f32>(dst + (<usize> b << 2), hsum(f32x4.add(a, c)));
  }
}

// GEMV (rows = 1) over Q4_K weights, as gemvQ8: out[o] = x · w[o] + bias[o]
// for o in [o0, o1), o0 a multiple of 4, with x rounded into xq by
// quantizeQ8Input and its block sums after the scales (blockSums). A quad of
// rows per pass: first each row's sub-block factors (into 128 bytes at c) and
// its mins' term, then the sub-blocks one by one, each input sub-block's
// terms loaded once for the four rows.
export function gemvQ4K(
  out: usize, xq: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32, c: usize,
): void {
  const blocks = inDim >> 8;
  const scales = xq + (<usize> inDim << 2);
  const sums = scales + (<usize> inDim >> 3);
  for (let o = o0; o < o1; o += 4) {
    let p = w + <usize> (o >> 2) * blocks * Q4K_QUAD_BYTES;
    let acc0 = f32x4.splat(0);
    let acc1 = f32x4.splat(0);
    let acc2 = f32x4.splat(0);
    let acc3 = f32x4.splat(0);
    for (let b = 0; b < blocks; b++) {
      const at = <usize> b << 5;
      const s0 = v128.load(scales + at);
      const s1 = v128.load(scales + at, 16);
      const x0 = v128.load(sums + at);
      const x1 = v128.load(sums + at, 16);
      acc0 = q4kScales(p, s0, s1, x0, x1, c, acc0);
      acc1 = q4kScales(p + 152, s0, s1, x0, x1, c + 32, acc1);
      acc2 = q4kScales(p + 304, s0, s1, x0, x1, c + 64, acc2);
      acc3 = q4kScales(p + 456, s0, s1, x0, x1, c + 96, acc3);
      let xb = xq + (<usize> b << 10);
      let v = p + Q4K_VALUES;
      for (let j = 0; j < 8; j++) {
        const h0 = v128.load(xb);
        const h1 = v128.load(xb, 16);
        const h2 = v128.load(xb, 32);
        const h3 = v128.load(xb, 48);
        const l0 = v128.load(xb, 64);
        const l1 = v128.load(xb, 80);
        const l2 = v128.load(xb, 96);
        const l3 = v128.load(xb, 112);
        const cj = c + (<usize> j << 2);
        acc0 = madd(q4kSubDot(v, h0, h1, h2, h3, l0, l1, l2, l3), v128.load32_splat(cj), acc0);
        acc1 = madd(q4kSubDot(v + 152, h0, h1, h2, h3, l0, l1, l2, l3), v128.load32_splat(cj, 32), acc1);
        acc2 = madd(q4kSubDot(v + 304, h0, h1, h2, h3, l0, l1, l2, l3), v128.load32_splat(cj, 64), acc2);
        acc3 = madd(q4kSubDot(v + 456, h0, h1, h2, h3, l0, l1, l2, l3), v128.load32_splat(cj, 96), acc3);
        xb += 128;
        v += 16;
      }
      p += Q4K_QUAD_BYTES;
    }
    storeQuad(out, bias, o, o1, acc0, acc1, acc2, acc3);
  }
}

// Writes one repacked Q4_K super-block's 256 weights to `dst` as f32: the
// products d·sc_j and dmin·m_j, then q times the first less the second, each
// rounded to f32 as dequantizeMatrix (and ggml) computes them.
export function dequantQ4K(p: usize, dst: usize): void {
  const d = load<f32>(p);
  const dmin = load<f32>(p, 4);
  for (let j = 0; j < 8; j++) {
    const scale = f32x4.splat(d * <f32> load<u8>(p + 8 + j));
    const min = f32x4.splat(dmin * <f32> load<u8>(p + 16 + j));
    const v = v128.load(p + Q4K_VALUES + (<usize> j << 4));
    const at = dst + (<usize> j << 7);
    for (let n = 0; n < 4; n++) {
      const q = v128.and(i16x8.shr_u(v, 4 * n), NIBBLE);
      const lo = f32x4.convert_i32x4_s(i32x4.extend_low_i16x8_u(q));
      const hi = f32x4.convert_i32x4_s(i32x4.extend_high_i16x8_u(q));
      v128.store(at + (<usize> n << 5), f32x4.sub(f32x4.mul(lo, scale), min));
      v128.store(at + (<usize> n << 5), f32x4.sub(f32x4.mul(hi, scale), min), 16);
    }
  }
}
