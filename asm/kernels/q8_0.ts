// Q8_0 weights: their repacked layout, the GEMVs over them and their
// dequantization.
// asm/kernels.ts says what every kernel assumes.

import { madd } from "./math";

// Q8_0 weights (ggml's blocks of 32 int8 values q with a scale d; the weight
// is d·q) as src/backends/wasm.ts repacks them at upload: 40 bytes a block,
// the scale as an f32, −16 times the sum of the values as an i32 (for the
// relaxed GEMV's offset input, below), then the 32 values in order; and the
// rows in quads, block b of row 4g + r at 160·(g·blocks + b) + 40·r, so that
// the GEMV, which takes four rows per pass (sharing the input's loads), reads
// one sequential stream rather than four. A last partial quad is padded with
// zero rows, which the GEMV reads and does not store. On the 130m decode shapes,
// four plain rows per pass were slower than one row per pass, four interleaved
// rows faster than either (docs/performance.md).
export const Q8_BLOCK_BYTES: i32 = 40;
export const Q8_QUAD_BYTES: i32 = 4 * Q8_BLOCK_BYTES;
// Where a repacked Q8_0 block's values start, after d and −16·Σ q.
const Q8_VALUES: i32 = 8;

// Block b of row o of a Q8_0 matrix at w of `blocks` blocks a row.
// @ts-ignore: decorator
@inline
export function q8Block(w: usize, o: i32, b: i32, blocks: i32): usize {
  return w + (<usize> (o >> 2) * blocks + b) * Q8_QUAD_BYTES + <usize> (o & 3) * Q8_BLOCK_BYTES;
}

// The GEMV takes integer dot products: v128.load8x8_s widens 8 weights to
// int16 as it loads them, and i32x4.dot_i16x8_s multiplies them by the input
// rounded to int16 and sums pairs in int32. One int16 term per input value
// is off by up to 2^-16 of its block's largest value, which moved the
// tiny-shakespeare logits by up to 1.2e-3 over 42 decode steps (the bar is
// 1e-3: the recurrent state carries the error on); so each value gets two
// terms, x ≈ s·(h + l·2^-15), whose error (2^-31 of the block's largest
// value) is below f32's own rounding. |h| <= 32767 and |l| <= 2^14 keep a
// block's sums of 32 products within int32 (32·128·32767 < 2^31).
const Q8_INPUT_STEPS: f32 = 32767;
export let LOW_STEPS = f32x4.splat(32768); // 2^15; a global, as math.ts explains
export let LOW_SCALE = f32x4.splat(1.0 / 32768);

// Rounds x [blocks·32] for gemvQ8: with s = max|x| / 32767 of each block,
// h = round(x / s) and l = round((x / s − h)·2^15) (|x / s − h| <= 1/2, and
// the difference is exact in f32), block b's 32 values of h at xq + 128·b,
// of l at xq + 128·b + 64, and s as an f32 at xq + 128·blocks + 4·b. An
// all-zero block gets s = 0; a NaN or infinite value gives s = NaN or inf,
// which the GEMV's products carry into its sums.
export function quantizeQ8Input(xq: usize, x: usize, blocks: i32): void {
  const scales = xq + (<usize> blocks << 7);
  for (let b = 0; b < blocks; b++) {
    const p = x + (<usize> b << 7);
    const q = xq + (<usize> b << 7);
    let m = f32x4.max(f32x4.abs(v128.load(p)), f32x4.abs(v128.load(p, 16)));
    m = f32x4.max(m, f32x4.max(f32x4.abs(v128.load(p, 32)), f32x4.abs(v128.load(p, 48))));
    m = f32x4.max(m, f32x4.max(f32x4.abs(v128.load(p, 64)), f32x4.abs(v128.load(p, 80))));
    m = f32x4.max(m, f32x4.max(f32x4.abs(v128.load(p, 96)), f32x4.abs(v128.load(p, 112))));
    m = f32x4.max(m, v128.shuffle<f32>(m, m, 2, 3, 0, 1));
    const max = f32x4.extract_lane(f32x4.max(m, v128.shuffle<f32>(m, m, 1, 0, 3, 2)), 0);
    store<f32>(scales + (<usize> b << 2), max / Q8_INPUT_STEPS);
    const inv = f32x4.splat(max > 0 && max < Infinity ? Q8_INPUT_STEPS / max : 0);
    for (let k = 0; k < 4; k++) {
      const t0 = f32x4.mul(v128.load(p + (<usize> k << 5)), inv);
      const t1 = f32x4.mul(v128.load(p + (<usize> k << 5), 16), inv);
      const h0 = f32x4.nearest(t0);
      const h1 = f32x4.nearest(t1);
      const l0 = f32x4.nearest(f32x4.mul(f32x4.sub(t0, h0), LOW_STEPS));
      const l1 = f32x4.nearest(f32x4.mul(f32x4.sub(t1, h1), LOW_STEPS));
      const at = q + (<usize> k << 4);
      v128.store(at, i16x8.narrow_i32x4_s(toInt(h0), toInt(h1)));
      v128.store(at, i16x8.narrow_i32x4_s(toInt(l0), toInt(l1)), 64);
    }
  }
}

// Whole f32 lanes (from f32x4.nearest, within int16's range) as i32.
// @ts-ignore: decorator
@inline
function toInt(v: v128): v128 {
  return i32x4.trunc_sat_f32x4_s(v);
}

// The int32 dot product (in four lanes) of 32 weights widened to int16 (w0..w3)
// with 32 int16 input terms (x0..x3), as f32 (exact to 2^24, then within 2^-24).
// @ts-ignore: decorator
@inline
export function q8Dot(
  w0: v128, w1: v128, w2: v128, w3: v128, x0: v128, x1: v128, x2: v128, x3: v128,
): v128 {
  const a = i32x4.add(i32x4.dot_i16x8_s(w0, x0), i32x4.dot_i16x8_s(w1, x1));
  const b = i32x4.add(i32x4.dot_i16x8_s(w2, x2), i32x4.dot_i16x8_s(w3, x3));
  return f32x4.convert_i32x4_s(i32x4.add(a, b));
}

// acc + the block at p times a rounded input block (terms h0..h3 and
// l0..l3, scale s): its weights widened once for both terms, the terms'
// sums joined in f32 and scaled once, by d·s.
// @ts-ignore: decorator
@inline
function q8Block4(
  p: usize, h0: v128, h1: v128, h2: v128, h3: v128,
  l0: v128, l1: v128, l2: v128, l3: v128, s: v128, acc: v128,
): v128 {
  const w0 = v128.load8x8_s(p, Q8_VALUES);
  const w1 = v128.load8x8_s(p, Q8_VALUES + 8);
  const w2 = v128.load8x8_s(p, Q8_VALUES + 16);
  const w3 = v128.load8x8_s(p, Q8_VALUES + 24);
  const high = q8Dot(w0, w1, w2, w3, h0, h1, h2, h3);
  const sum = madd(q8Dot(w0, w1, w2, w3, l0, l1, l2, l3), LOW_SCALE, high);
  return madd(sum, f32x4.mul(v128.load32_splat(p), s), acc);
}

// GEMV (rows = 1) over Q8_0 weights: out[o] = x · w[o] + bias[o] for o in
// [o0, o1), o0 a multiple of 4 (the threads' split is), with x already
// rounded into xq by quantizeQ8Input: a quad of rows per pass, sharing each
// input block's loads, four independent chains.
export function gemvQ8(out: usize, xq: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
  const blocks = inDim >> 5;
  const scales = xq + (<usize> blocks << 7);
  for (let o = o0; o < o1; o += 4) {
    let p = q8Block(w, o, 0, blocks);
    let acc0 = f32x4.splat(0);
    let acc1 = f32x4.splat(0);
    let acc2 = f32x4.splat(0);
    let acc3 = f32x4.splat(0);
    for (let b = 0; b < blocks; b++) {
      const xb = xq + (<usize> b << 7);
      const h0 = v128.load(xb);
      const h1 = v128.load(xb, 16);
      const h2 = v128.load(xb, 32);
      const h3 = v128.load(xb, 48);
      const l0 = v128.load(xb, 64);
      const l1 = v128.load(xb, 80);
      const l2 = v128.load(xb, 96);
      const l3 = v128.load(xb, 112);
      const s = v128.load32_splat(scales + (<usize> b << 2));
      acc0 = q8Block4(p, h0, h1, h2, h3, l0, l1, l2, l3, s, acc0);
      acc1 = q8Block4(p + Q8_BLOCK_BYTES, h0, h1, h2, h3, l0, l1, l2, l3, s, acc1);
      acc2 = q8Block4(p + 2 * Q8_BLOCK_BYTES, h0, h1, h2, h3, l0, l1, l2, l3, s, acc2);
      acc3 = q8Block4(p + 3 * Q8_BLOCK_BYTES, h0, h1, h2, h3, l0, l1, l2, l3, s, acc3);
      p += Q8_QUAD_BYTES;
    }
    storeQuad(out, bias, o, o1, acc0, acc1, acc2, acc3);
  }
}

// With relaxed SIMD the GEMV takes i32x4.relaxed_dot_i8x16_i7x16_add_s
// instead: 16 products of int8 weights by 7-bit input terms, summed into the
// four int32 lanes, per instruction (V8 lowers it to one vpdpbusd where the
// CPU has AVX-VNNI), against 8 products for dot_i16x8_s. The spec leaves a
// product to the engine (signed or unsigned) where the second operand has
// its top bit set, so the input terms must lie in [0, 127]: each value is
// rounded to v = round(x / s) + 2^20, with s = max|x| / (63·2^14) of its
// block, so v is in [2^14, 127·2^14], and split into three 7-bit digits,
// v = a·2^14 + b·2^7 + c. Then
// Σ w·x / s ≈ Σ w·v − 2^20·Σ w = ((Σ w·a − 64·Σ w)·2^7 + Σ w·b)·2^7 + Σ w·c,
// the parentheses in int32 (within 2^26) and the last step in f32. The
// rounding error, s / 2, is about 2^-21 of the block's largest value: 2^5
// below one int16 term's, well under the logits' 1e-3 bar, though not as
// far below as two int16 terms' (docs/performance.md has both). Pairs of
// products stay within int16 (2·128·127 < 2^15), so engines that sum pairs
// with saturation first (pmaddubsw) give the same sums.
const Q7_INPUT_STEPS: f32 = 63 * 16384;
let Q7_OFFSET = f32x4.splat(1048576); // 2^20; a global, as math.ts explains
let DIGIT = i32x4.splat(127);
let DIGIT_SCALE = f32x4.splat(128);

// Rounds x [blocks·32] for gemvQ8Relaxed: block b's 32 digits a at
// xq + 128·b, b at xq + 128·b + 32, c at xq + 128·b + 64 (bytes, in order),
// and s as an f32 at xq + 128·blocks + 4·b, as quantizeQ8Input lays its
// terms out (so the scratch and the scales' place are the same). An all-zero
// or non-finite block gets digits (64, 0, 0), the value 0, times s = 0 or
// s = NaN or inf.
export function quantizeQ7Input(xq: usize, x: usize, blocks: i32): void {
  const scales = xq + (<usize> blocks << 7);
  for (let b = 0; b < blocks; b++) {
    const p = x + (<usize> b << 7);
    const q = xq + (<usize> b << 7);
    let m = f32x4.max(f32x4.abs(v128.load(p)), f32x4.abs(v128.load(p, 16)));
    m = f32x4.max(m, f32x4.max(f32x4.abs(v128.load(p, 32)), f32x4.abs(v128.load(p, 48))));
    m = f32x4.max(m, f32x4.max(f32x4.abs(v128.load(p, 64)), f32x4.abs(v128.load(p, 80))));
    m = f32x4.max(m, f32x4.max(f32x4.abs(v128.load(p, 96)), f32x4.abs(v128.load(p, 112))));
    m = f32x4.max(m, v128.shuffle<f32>(m, m, 2, 3, 0, 1));
    const max = f32x4.extract_lane(f32x4.max(m, v128.shuffle<f32>(m, m, 1, 0, 3, 2)), 0);
    store<f32>(scales + (<usize> b << 2), max / Q7_INPUT_STEPS);
    const inv = f32x4.splat(max > 0 && max < Infinity ? Q7_INPUT_STEPS / max : 0);
    for (let k = 0; k < 2; k++) {
      const at = p + (<usize> k << 6);
      const v0 = q7Value(v128.load(at), inv);
      const v1 = q7Value(v128.load(at, 16), inv);
      const v2 = q7Value(v128.load(at, 32), inv);
      const v3 = q7Value(v128.load(at, 48), inv);
      const to = q + (<usize> k << 4);
      v128.store(to, digits(v0, v1, v2, v3, 14));
      v128.store(to, digits(v0, v1, v2, v3, 7), 32);
      v128.store(to, digits(v0, v1, v2, v3, 0), 64);
    }
  }
}

// round(x·inv) + 2^20 as i32 lanes. Unfused, so that every engine rounds
// alike; the sum's rounding (to 2^-4 or 2^-3 there) is far below the digit.
// @ts-ignore: decorator
@inline
function q7Value(x: v128, inv: v128): v128 {
  return i32x4.trunc_sat_f32x4_s(f32x4.nearest(f32x4.add(f32x4.mul(x, inv), Q7_OFFSET)));
}

// Bits shift .. shift + 6 of each i32 lane (the top digit's shift of 14
// leaves no higher bits to mask).
// @ts-ignore: decorator
@inline
function digit(v: v128, shift: i32): v128 {
  return shift == 14 ? i32x4.shr_u(v, 14) : v128.and(i32x4.shr_u(v, shift), DIGIT);
}

// The digits at `shift` of the sixteen values in v0..v3, in order, as bytes.
// @ts-ignore: decorator
@inline
function digits(v0: v128, v1: v128, v2: v128, v3: v128, shift: i32): v128 {
  return i8x16.narrow_i16x8_u(
    i16x8.narrow_i32x4_s(digit(v0, shift), digit(v1, shift)),
    i16x8.narrow_i32x4_s(digit(v2, shift), digit(v3, shift)),
  );
}

// Σ w·b over 32 weights (w0, w1) and 32 digits (b0, b1), onto the int32 lanes of acc.
// @ts-ignore: decorator
@inline
function dot7(w0: v128, w1: v128, b0: v128, b1: v128, acc: v128): v128 {
  const first = i32x4.relaxed_dot_i8x16_i7x16_add_s(w0, b0, acc);
  return i32x4.relaxed_dot_i8x16_i7x16_add_s(w1, b1, first);
}

// acc + the block at p times a rounded input block (digits a, b, c; scale s).
// @ts-ignore: decorator
@inline
function q8Block7(
  p: usize, a0: v128, a1: v128, b0: v128, b1: v128, c0: v128, c1: v128, s: v128, acc: v128,
): v128 {
  const w0 = v128.load(p, Q8_VALUES);
  const w1 = v128.load(p, Q8_VALUES + 16);
  const zero = i32x4.splat(0);
  // Σ w·a − 64·Σ w: the lanes start from the block's −16·Σ w, stored at upload.
  const high = dot7(w0, w1, a0, a1, v128.load32_splat(p, 4));
  const mid = dot7(w0, w1, b0, b1, i32x4.shl(high, 7));
  const low = f32x4.convert_i32x4_s(dot7(w0, w1, c0, c1, zero));
  const sum = madd(f32x4.convert_i32x4_s(mid), DIGIT_SCALE, low);
  return madd(sum, f32x4.mul(v128.load32_splat(p), s), acc);
}

// gemvQ8 on relaxed SIMD's int8 dot products, x rounded into xq by
// quantizeQ7Input.
export function gemvQ8Relaxed(
  out: usize, xq: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32,
): void {
  const blocks = inDim >> 5;
  const scales = xq + (<usize> blocks << 7);
  for (let o = o0; o < o1; o += 4) {
    let p = q8Block(w, o, 0, blocks);
    let acc0 = f32x4.splat(0);
    let acc1 = f32x4.splat(0);
    let acc2 = f32x4.splat(0);
    let acc3 = f32x4.splat(0);
    for (let b = 0; b < blocks; b++) {
      const xb = xq + (<usize> b << 7);
      const a0 = v128.load(xb);
      const a1 = v128.load(xb, 16);
      const b0 = v128.load(xb, 32);
      const b1 = v128.load(xb, 48);
      const c0 = v128.load(xb, 64);
      const c1 = v128.load(xb, 80);
      const s = v128.load32_splat(scales + (<usize> b << 2));
      acc0 = q8Block7(p, a0, a1, b0, b1, c0, c1, s, acc0);
      acc1 = q8Block7(p + Q8_BLOCK_BYTES, a0, a1, b0, b1, c0, c1, s, acc1);
      acc2 = q8Block7(p + 2 * Q8_BLOCK_BYTES, a0, a1, b0, b1, c0, c1, s, acc2);
      acc3 = q8Block7(p + 3 * Q8_BLOCK_BYTES, a0, a1, b0, b1, c0, c1, s, acc3);
      p += Q8_QUAD_BYTES;
    }
    storeQuad(out, bias, o, o1, acc0, acc1, acc2, acc3);
  }
}

// Stores the sums of the accumulators of rows o .. o + 3 (plus their bias)
// as out[o ..], those below o1: a quad's outputs, its padding rows left out.
// @ts-ignore: decorator
@inline
export function storeQuad(
  out: usize, bias: usize, o: i32, o1: i32, acc0: v128, acc1: v128, acc2: v128, acc3: v128,
): void {
  // The four sums side by side: pairwise adds of the accumulators' halves.
  const a01 = f32x4.add(
    v128.shuffle<f32>(acc0, acc1, 0, 1, 4, 5),
    v128.shuffle<f32>(acc0, acc1, 2, 3, 6, 7),
  );
  const a23 = f32x4.add(
    v128.shuffle<f32>(acc2, acc3, 0, 1, 4, 5),
    v128.shuffle<f32>(acc2, acc3, 2, 3, 6, 7),
  );
  let sums = f32x4.add(
    v128.shuffle<f32>(a01, a23, 0, 2, 4, 6),
    v128.shuffle<f32>(a01, a23, 1, 3, 5, 7),
  );
  // Rows o .. min(o + 4, o1) − 1, each from lane 0 of the rotating sums.
  const end = min(o + 4, o1);
  for (let r = o; r < end; r++) {
    const at = <usize> r << 2;
    let sum = f32x4.extract_lane(sums, 0);
    if (bias) sum += load<f32>(bias + at);
    store<f32>(out + at, sum);
    sums = v128.shuffle<f32>(sums, sums, 1, 2, 3, 0);
  }
}

// Values 8k .. 8k + 7 of the block at p, times d, as f32 at dst + 32k.
// @ts-ignore: decorator
@inline
function dequantQ8Eighth(p: usize, d: v128, dst: usize, k: i32): void {
  const v = v128.load8x8_s(p + Q8_VALUES + (<usize> k << 3));
  const at = dst + (<usize> k << 5);
  v128.store(at, f32x4.mul(f32x4.convert_i32x4_s(i32x4.extend_low_i16x8_s(v)), d));
  v128.store(at, f32x4.mul(f32x4.convert_i32x4_s(i32x4.extend_high_i16x8_s(v)), d), 16);
}

// Writes one repacked Q8_0 block's 32 weights to `dst` as f32: exactly d·q,
// as dequantizeMatrix gives it.
// @ts-ignore: decorator
@inline
export function dequantQ8(p: usize, dst: usize): void {
  const d = v128.load32_splat(p);
  dequantQ8Eighth(p, d, dst, 0);
  dequantQ8Eighth(p, d, dst, 1);
  dequantQ8Eighth(p, d, dst, 2);
  dequantQ8Eighth(p, d, dst, 3);
}
