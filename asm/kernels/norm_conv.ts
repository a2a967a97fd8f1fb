// RMSNorm, the residual add and the causal conv (a prompt, and a batch of
// decode steps).
// asm/kernels.ts says what every kernel assumes.

import { hsum, silu1, silu4 } from "./math";

// out [rows, dim] = x / sqrt(mean(x²) + eps) * weight; out may alias x.
export function rmsNorm(out: usize, x: usize, weight: usize, rows: i32, dim: i32, eps: f32): void {
  const d4 = dim & ~3;
  for (let r = 0; r < rows; r++) {
    const xr = x + <usize> r * (<usize> dim << 2);
    const or = out + <usize> r * (<usize> dim << 2);
    let acc = f32x4.splat(0);
    let i = 0;
    for (; i < d4; i += 4) {
      const v = v128.load(xr + (<usize> i << 2));
      acc = f32x4.add(acc, f32x4.mul(v, v));
    }
    let sum = <f64> hsum(acc);
    for (; i < dim; i++) {
      const v = <f64> load<f32>(xr + (<usize> i << 2));
      sum += v * v;
    }
    const scale = <f32> (1 / Math.sqrt(sum / <f64> dim + <f64> eps));
    const sv = f32x4.splat(scale);
    i = 0;
    for (; i < d4; i += 4) {
      const p = <usize> i << 2;
      v128.store(or + p, f32x4.mul(f32x4.mul(v128.load(xr + p), sv), v128.load(weight + p)));
    }
    for (; i < dim; i++) {
      const p = <usize> i << 2;
      store<f32>(or + p, load<f32>(xr + p) * scale * load<f32>(weight + p));
    }
  }
}

// acc[i] += x[i] for n floats.
export function addInPlace(acc: usize, x: usize, n: i32): void {
  const n4 = n & ~3;
  let i = 0;
  for (; i < n4; i += 4) {
    const p = <usize> i << 2;
    v128.store(acc + p, f32x4.add(v128.load(acc + p), v128.load(x + p)));
  }
  for (; i < n; i++) {
    const p = <usize> i << 2;
    store<f32>(acc + p, load<f32>(acc + p) + load<f32>(x + p));
  }
}

// Input of the convolution at token p (p < 0 reaches into the state) for 4 channels.
// @ts-ignore: decorator
@inline
function convInput(
  x: usize,
  state: usize,
  p: i32,
  history: i32,
  rowBytes: usize,
  col: usize,
): usize {
  return p >= 0 ? x + <usize> p * rowBytes + col : state + <usize> (history + p) * rowBytes + col;
}

// Channels c .. c + 3's conv weights ([channels, kernel]) into `scratch` as
// [kernel][4], so that each tap is one vector load. Mamba's kernel of 4 is a
// 4×4 transpose in registers (a decode step packs every group of channels).
// @ts-ignore: decorator
@inline
function packConvWeights(weight: usize, c: i32, kernel: i32, scratch: usize): void {
  if (kernel == 4) {
    const w = weight + (<usize> c << 4);
    const r0 = v128.load(w), r1 = v128.load(w, 16), r2 = v128.load(w, 32), r3 = v128.load(w, 48);
    const t0 = v128.shuffle<f32>(r0, r1, 0, 4, 1, 5), t1 = v128.shuffle<f32>(r2, r3, 0, 4, 1, 5);
    const t2 = v128.shuffle<f32>(r0, r1, 2, 6, 3, 7), t3 = v128.shuffle<f32>(r2, r3, 2, 6, 3, 7);
    v128.store(scratch, v128.shuffle<f32>(t0, t1, 0, 1, 4, 5));
    v128.store(scratch, v128.shuffle<f32>(t0, t1, 2, 3, 6, 7), 16);
    v128.store(scratch, v128.shuffle<f32>(t2, t3, 0, 1, 4, 5), 32);
    v128.store(scratch, v128.shuffle<f32>(t2, t3, 2, 3, 6, 7), 48);
    return;
  }
  for (let k = 0; k < kernel; k++) {
    for (let j = 0; j < 4; j++) {
      store<f32>(
        scratch + (<usize> (k * 4 + j) << 2),
        load<f32>(weight + (<usize> ((c + j) * kernel + k) << 2)),
      );
    }
  }
}

/** Bytes of per-thread scratch causalConv needs: a block of 16 channels' weights. */
export function convScratchBytes(kernel: i32): i32 {
  return kernel * 16 * 4;
}

// Causal depthwise conv with SiLU over channels [c0, c1) (c0 a multiple of
// 16, as the threads' split is), then those channels' state update. Blocks of
// 16 channels walk the tokens, so each token's row is read a whole cache line
// at a time (4 channels alone used a quarter of each line they fetched);
// `scratch` holds convScratchBytes(kernel), the block's weights transposed to
// [4][kernel][4], so each tap is one vector load.
export function causalConv(
  out: usize,
  x: usize,
  weight: usize,
  bias: usize,
  state: usize,
  len: i32,
  channels: i32,
  kernel: i32,
  scratch: usize,
  c0: i32,
  c1: i32,
): void {
  const history = kernel - 1;
  const rowBytes = <usize> channels << 2;
  const groupBytes = <usize> kernel << 4;
  let c = c0;
  for (; c + 16 <= c1; c += 16) {
    const col = <usize> c << 2;
    for (let g = 0; g < 4; g++) packConvWeights(weight, c + 4 * g, kernel, scratch + <usize> g * groupBytes);
    const b0 = bias ? v128.load(bias + col) : f32x4.splat(0);
    const b1 = bias ? v128.load(bias + col, 16) : f32x4.splat(0);
    const b2 = bias ? v128.load(bias + col, 32) : f32x4.splat(0);
    const b3 = bias ? v128.load(bias + col, 48) : f32x4.splat(0);
    for (let t = 0; t < len; t++) {
      let s0 = b0, s1 = b1, s2 = b2, s3 = b3;
      for (let k = 0; k < kernel; k++) {
        const xp = convInput(x, state, t - history + k, history, rowBytes, col);
        const w = scratch + (<usize> k << 4);
        s0 = f32x4.add(s0, f32x4.mul(v128.load(w), v128.load(xp)));
        s1 = f32x4.add(s1, f32x4.mul(v128.load(w + groupBytes), v128.load(xp, 16)));
        s2 = f32x4.add(s2, f32x4.mul(v128.load(w + 2 * groupBytes), v128.load(xp, 32)));
        s3 = f32x4.add(s3, f32x4.mul(v128.load(w + 3 * groupBytes), v128.load(xp, 48)));
      }
      const op = out + <usize> t * rowBytes + col;
      v128.store(op, silu4(s0));
      v128.store(op, silu4(s1), 16);
      v128.store(op, silu4(s2), 32);
      v128.store(op, silu4(s3), 48);
    }
  }
  for (; c + 4 <= c1; c += 4) {
    const col = <usize> c << 2;
    packConvWeights(weight, c, kernel, scratch);
    const b = bias ? v128.load(bias + col) : f32x4.splat(0);
    for (let t = 0; t < len; t++) {
      let sum = b;
      for (let k = 0; k < kernel; k++) {
        const xp = convInput(x, state, t - history + k, history, rowBytes, col);
        sum = f32x4.add(sum, f32x4.mul(v128.load(scratch + (<usize> k << 4)), v128.load(xp)));
      }
      v128.store(out + <usize> t * rowBytes + col, silu4(sum));
    }
  }
  for (; c < c1; c++) {
    const col = <usize> c << 2;
    for (let t = 0; t < len; t++) {
      let sum: f32 = bias ? load<f32>(bias + col) : 0;
      for (let k = 0; k < kernel; k++) {
        const xp = convInput(x, state, t - history + k, history, rowBytes, col);
        sum += load<f32>(weight + (<usize> (c * kernel + k) << 2)) * load<f32>(xp);
      }
      store<f32>(out + <usize> t * rowBytes + col, silu1(sum));
    }
  }
  // New state: the last `history` inputs of these channels. Ascending j reads
  // rows at or after the one it writes, so the update can run in place.
  const from = <usize> c0 << 2;
  const bytes = <usize> (c1 - c0) << 2;
  for (let j = 0; j < history; j++) {
    const p = len - history + j;
    const dst = state + <usize> j * rowBytes + from;
    const src = (p >= 0 ? x + <usize> p * rowBytes : state + <usize> (history + p) * rowBytes) + from;
    if (src != dst) memory.copy(dst, src, bytes);
  }
}

// Where sequence b's conv state starts: row slots[b] of `states` (slots an f32
// array), or row b without slots.
// @ts-ignore: decorator
@inline
function convStateAt(states: usize, slots: usize, b: i32, stateBytes: usize): usize {
  const row = slots ? <usize> (<i32> load<f32>(slots + (<usize> b << 2))) : <usize> b;
  return states + row * stateBytes;
}

// causalConv at one token for each of `batch` sequences (a batch of decode
// steps), sequence b's input and output in row b of x and out, its state in
// row slots[b] of `states` ([rows, kernel - 1, channels]; slots an f32 array,
// or 0 for row b). `scratch` holds convStepScratchBytes: every group of 4
// channels' weights, packed once per call. Then each sequence walks its own
// state rows front to back; sums run in causalConv's order. (Walking channels
// outside and sequences inside touched 3·batch rows per group of 4 channels,
// rows whose addresses are a multiple of 2 KiB apart, so they fought over two
// L1 sets: over three times as slow, docs/performance.md.)
export function convStep(
  out: usize,
  x: usize,
  weight: usize,
  bias: usize,
  states: usize,
  slots: usize,
  batch: i32,
  channels: i32,
  kernel: i32,
  scratch: usize,
): void {
  const history = kernel - 1;
  const rowBytes = <usize> channels << 2;
  const stateBytes = <usize> history * rowBytes;
  const groupBytes = <usize> kernel << 4;
  const c4 = channels & ~3;
  for (let c = 0; c < c4; c += 4) {
    packConvWeights(weight, c, kernel, scratch + <usize> (c >> 2) * groupBytes);
  }
  for (let b = 0; b < batch; b++) {
    const held = convStateAt(states, slots, b, stateBytes);
    const xRow = x + <usize> b * rowBytes;
    const outRow = out + <usize> b * rowBytes;
    for (let c = 0; c < c4; c += 4) {
      const col = <usize> c << 2;
      const w = scratch + <usize> (c >> 2) * groupBytes;
      const xv = v128.load(xRow + col);
      let sum = bias ? v128.load(bias + col) : f32x4.splat(0);
      // Tap k reads state row k, then that row takes the next one (or x).
      for (let k = 0; k < history; k++) {
        const h = held + <usize> k * rowBytes + col;
        sum = f32x4.add(sum, f32x4.mul(v128.load(w + (<usize> k << 4)), v128.load(h)));
        v128.store(h, k + 1 < history ? v128.load(h + rowBytes) : xv);
      }
      sum = f32x4.add(sum, f32x4.mul(v128.load(w + (<usize> history << 4)), xv));
      v128.store(outRow + col, silu4(sum));
    }
    for (let c = c4; c < channels; c++) {
      const col = <usize> c << 2;
      const xv = load<f32>(xRow + col);
      let sum: f32 = bias ? load<f32>(bias + col) : 0;
      for (let k = 0; k < history; k++) {
        const h = held + <usize> k * rowBytes + col;
        sum += load<f32>(weight + (<usize> (c * kernel + k) << 2)) * load<f32>(h);
        store<f32>(h, k + 1 < history ? load<f32>(h + rowBytes) : xv);
      }
      sum += load<f32>(weight + (<usize> (c * kernel + history) << 2)) * xv;
      store<f32>(outRow + col, silu1(sum));
    }
  }
}

/** Bytes of scratch convStep needs: every channel's weights, packed. */
export function convStepScratchBytes(channels: i32, kernel: i32): i32 {
  return (channels >> 2) * kernel * 16;
}
