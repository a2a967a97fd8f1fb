// Q4_0 weights: the GEMV over them and their dequantization.
// asm/kernels.ts says what every kernel assumes.

import { hsum, madd } from "./math";

// Q4_0 weights (ggml's blocks of 32 4-bit values u with a scale d; the
// weight is d·(u − 8)) as src/backends/wasm.ts repacks them at upload, 20
// bytes a block: the scale as an f32 times 2^-28, then 16 bytes read as four
// i32 lanes, lane j holding weight 4k + j as the signed nibble u − 8 at
// nibble k. Shifting nibble k into the top of its lane and masking the rest
// off gives (u − 8)·2^28, which converts to f32 exactly: the widening costs
// a shift and a mask instead of byte shuffles, and the 2^28 is paid back in
// the scale. The activations stay f32.
export const Q4_BLOCK_BYTES: i32 = 20;
export let TOP_NIBBLE = i32x4.splat(-268435456); // 0xf0000000; a global, as math.ts explains

// Weights 4k .. 4k + 3 of a repacked block, times 2^28, as f32.
// @ts-ignore: decorator
@inline
function q4Eighth(v: v128, k: i32): v128 {
  if (k == 0) return f32x4.convert_i32x4_s(i32x4.shl(v, 28));
  if (k == 7) return f32x4.convert_i32x4_s(v128.and(v, TOP_NIBBLE));
  return f32x4.convert_i32x4_s(v128.and(i32x4.shl(v, 28 - 4 * k), TOP_NIBBLE));
}

// x [32] · one repacked Q4_0 block's weights (times 2^28), two chains deep.
// @ts-ignore: decorator
@inline
function q4Dot(p: usize, x: usize): v128 {
  const v = v128.load(p, 4);
  let a = f32x4.mul(q4Eighth(v, 0), v128.load(x));
  let b = f32x4.mul(q4Eighth(v, 1), v128.load(x, 16));
  a = madd(q4Eighth(v, 2), v128.load(x, 32), a);
  b = madd(q4Eighth(v, 3), v128.load(x, 48), b);
  a = madd(q4Eighth(v, 4), v128.load(x, 64), a);
  b = madd(q4Eighth(v, 5), v128.load(x, 80), b);
  a = madd(q4Eighth(v, 6), v128.load(x, 96), a);
  b = madd(q4Eighth(v, 7), v128.load(x, 112), b);
  return f32x4.add(a, b);
}

// GEMV (rows = 1) over Q4_0 weights, as gemvQ8.
export function gemvQ4(out: usize, x: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
  const blocks = inDim >> 5;
  const rowBytes = <usize> blocks * Q4_BLOCK_BYTES;
  for (let o = o0; o < o1; o++) {
    let p = w + <usize> o * rowBytes;
    let acc0 = f32x4.splat(0);
    let acc1 = f32x4.splat(0);
    let xp = x;
    let b = 0;
    for (; b + 2 <= blocks; b += 2) {
      acc0 = madd(v128.load32_splat(p), q4Dot(p, xp), acc0);
      acc1 = madd(v128.load32_splat(p, 20), q4Dot(p + 20, xp + 128), acc1);
      p += 40;
      xp += 256;
    }
    if (b < blocks) acc0 = madd(v128.load32_splat(p), q4Dot(p, xp), acc0);
    let sum = hsum(f32x4.add(acc0, acc1));
    if (bias) sum += load<f32>(bias + (<usize> o << 2));
    store<f32>(out + (<usize> o << 2), sum);
  }
}

// Writes one repacked Q4_0 block's 32 weights to `dst` as f32: (u − 8)·2^28
// times d·2^-28, exactly d·(u − 8), as dequantizeMatrix gives it.
// @ts-ignore: decorator
@inline
export function dequantQ4(p: usize, dst: usize): void {
  const d = v128.load32_splat(p);
  const v = v128.load(p, 4);
  v128.store(dst, f32x4.mul(q4Eighth(v, 0), d));
  v128.store(dst, f32x4.mul(q4Eighth(v, 1), d), 16);
  v128.store(dst, f32x4.mul(q4Eighth(v, 2), d), 32);
  v128.store(dst, f32x4.mul(q4Eighth(v, 3), d), 48);
  v128.store(dst, f32x4.mul(q4Eighth(v, 4), d), 64);
  v128.store(dst, f32x4.mul(q4Eighth(v, 5), d), 80);
  v128.store(dst, f32x4.mul(q4Eighth(v, 6), d), 96);
  v128.store(dst, f32x4.mul(q4Eighth(v, 7), d), 112);
}
