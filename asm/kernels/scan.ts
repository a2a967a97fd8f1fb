// Mamba-1's selective scan: a prompt in f64, a decode step in f32.
// asm/kernels.ts says what every kernel assumes.

import { LOG2E, MAGIC, ONE, madd, silu1, silu4, softplus4, sums4 } from "./math";

// The scan runs in f64. mamba_ssm's reference (and the fixtures in ../shared)
// is a float64 recurrence whose outputs cancel to near zero in places; keeping
// any of dt, exp(dt·A) or h in f32 (even with a correctly rounded exp) puts y
// off by up to 4e-4 relative there, measured. So dt, exp(dt·A) and the state
// are f64 inside a call; the state buffer between calls stays f32 (the Backend
// layout), and silu(z) stays f32 (its error is relative and tiny on y).

// 2^y for f64x2: y = n + f with n whole and |f| <= 1/2, 2^f = p(f) of
// degree 7, and n added to p's exponent bits. p is e^r's polynomial fitted
// (weighted least squares on the relative error at Chebyshev nodes) on
// r = f·ln2 in [-ln2/2, ln2/2], its coefficients times ln2^k: max relative
// error 6.0e-11, evaluated in f64 (an f32-accurate exp, 6e-8, is what breaks
// the scan fixtures, by 1.6x). y is clamped to [-1021, 1023], where 2^n·p
// stays a normal double, so adding n to the exponent bits is exact; the scan's
// decays, already in units of log2 (A is scaled by log2(e) once), need no
// multiply either side.
let D_MAGIC = f64x2.splat(6755399441055744.0); // 1.5·2^52: t = y + MAGIC holds n in its low bits
let D_LO = f64x2.splat(-1021);
let D_HI = f64x2.splat(1023);
let D_LOG2E = f64x2.splat(1.4426950408889634);
let D_ONE = f64x2.splat(1);
let D_TWO = f64x2.splat(2);
let D_ZERO = f64x2.splat(0);
let D_K1 = f64x2.splat(0.6931471805599453);
let D_K2 = f64x2.splat(0.24022651071361434);
let D_K3 = f64x2.splat(0.05550410699025128);
let D_K4 = f64x2.splat(0.009618037597154232);
let D_K5 = f64x2.splat(0.0013333712779035507);
let D_K6 = f64x2.splat(0.0001546689681705087);
let D_K7 = f64x2.splat(1.5241381308279067e-5);

/** Like setConstants, for the f64 constants. */
export function setConstants64(scale: f64): void {
  D_MAGIC = f64x2.splat(6755399441055744.0 * scale);
  D_LO = f64x2.splat(-1021 * scale);
  D_HI = f64x2.splat(1023 * scale);
  D_LOG2E = f64x2.splat(1.4426950408889634 * scale);
  D_ONE = f64x2.splat(scale);
  D_TWO = f64x2.splat(2 * scale);
  D_ZERO = f64x2.splat(0 * scale);
  D_K1 = f64x2.splat(0.6931471805599453 * scale);
  D_K2 = f64x2.splat(0.24022651071361434 * scale);
  D_K3 = f64x2.splat(0.05550410699025128 * scale);
  D_K4 = f64x2.splat(0.009618037597154232 * scale);
  D_K5 = f64x2.splat(0.0013333712779035507 * scale);
  D_K6 = f64x2.splat(0.0001546689681705087 * scale);
  D_K7 = f64x2.splat(1.5241381308279067e-5 * scale);
  S_1 = f64x2.splat(scale / 3);
  S_2 = f64x2.splat(scale / 5);
  S_3 = f64x2.splat(scale / 7);
  S_4 = f64x2.splat(scale / 9);
  S_5 = f64x2.splat(scale / 11);
  S_6 = f64x2.splat(scale / 13);
  S_7 = f64x2.splat(scale / 15);
  S_8 = f64x2.splat(scale / 17);
  S_9 = f64x2.splat(scale / 19);
  S_10 = f64x2.splat(scale / 21);
}

// a·b + c per f64 lane, as madd for f32.
// @ts-ignore: decorator
@inline
function madd64(a: v128, b: v128, c: v128): v128 {
  if (ASC_FEATURE_RELAXED_SIMD) return f64x2.relaxed_madd(a, b, c);
  return f64x2.add(f64x2.mul(a, b), c);
}

// e^x for f64x2.
// @ts-ignore: decorator
@inline
function exp2d(x: v128): v128 {
  return pow2dWith(f64x2.mul(x, D_LOG2E), D_LO, D_HI, D_MAGIC, D_ONE, D_K1, D_K2, D_K3, D_K4, D_K5, D_K6, D_K7);
}

// 2^y on constants passed in: a loop that copies the globals into locals
// first loads each once rather than once per iteration.
// @ts-ignore: decorator
@inline
function pow2dWith(
  y0: v128,
  lo: v128,
  hi: v128,
  magic: v128,
  one: v128,
  k1: v128,
  k2: v128,
  k3: v128,
  k4: v128,
  k5: v128,
  k6: v128,
  k7: v128,
): v128 {
  const y = f64x2.pmin(f64x2.pmax(y0, lo), hi);
  const t = f64x2.add(y, magic);
  const f = f64x2.sub(y, f64x2.sub(t, magic)); // exact
  let p = madd64(k7, f, k6);
  p = madd64(p, f, k5);
  p = madd64(p, f, k4);
  p = madd64(p, f, k3);
  p = madd64(p, f, k2);
  p = madd64(p, f, k1);
  p = madd64(p, f, one);
  return i64x2.add(p, i64x2.shl(t, 52));
}

// softplus in f64: max(x, 0) + log1p(e^-|x|), log1p(e) = 2·atanh(s) with
// s = e / (2 + e) <= 1/3, series to s^21/21 (truncation below 1.2e-12), its
// coefficients 1/(2k + 1) as globals (as splatted literals, V8 rebuilt each
// per call: the series then took longer than the exp) and evaluated by
// Estrin's scheme.
let S_1 = f64x2.splat(1.0 / 3);
let S_2 = f64x2.splat(1.0 / 5);
let S_3 = f64x2.splat(1.0 / 7);
let S_4 = f64x2.splat(1.0 / 9);
let S_5 = f64x2.splat(1.0 / 11);
let S_6 = f64x2.splat(1.0 / 13);
let S_7 = f64x2.splat(1.0 / 15);
let S_8 = f64x2.splat(1.0 / 17);
let S_9 = f64x2.splat(1.0 / 19);
let S_10 = f64x2.splat(1.0 / 21);

// @ts-ignore: decorator
@inline
function softplus2d(x: v128): v128 {
  const e = exp2d(f64x2.neg(f64x2.abs(x)));
  const s = f64x2.div(e, f64x2.add(e, D_TWO));
  const s2 = f64x2.mul(s, s);
  const s4 = f64x2.mul(s2, s2);
  const s8 = f64x2.mul(s4, s4);
  // Σ s2^k / (2k + 1), k = 0 .. 10, in pairs, then pairs of pairs.
  const p0 = madd64(s4, madd64(S_3, s2, S_2), madd64(S_1, s2, D_ONE));
  const p1 = madd64(s4, madd64(S_7, s2, S_6), madd64(S_5, s2, S_4));
  const p2 = madd64(s4, S_10, madd64(S_9, s2, S_8));
  const p = madd64(f64x2.mul(s8, s8), p2, madd64(s8, p1, p0));
  return f64x2.add(f64x2.pmax(x, D_ZERO), f64x2.mul(f64x2.mul(p, s), D_TWO));
}

// Exposed for the accuracy test of exp2d and softplus2d: out[i] (f64) = f(x[i])
// for f64 x[i], `which` 0 = exp, 1 = softplus; n even.
export function mathTest64(out: usize, x: usize, n: i32, which: i32): void {
  for (let i = 0; i < n; i += 2) {
    const p = <usize>i << 3;
    const v = v128.load(x + p);
    v128.store(out + p, which == 0 ? exp2d(v) : softplus2d(v));
  }
}

// Channels per tile of the prefill scan. For each tile the kernel walks the
// whole sequence; the tile's f64 state, rows of A and decays (3·TILE·N·8
// bytes: 48 KiB for N = 16) stay in L1/L2 throughout, its slices of
// u/delta/z/y (TILE·4 = 512 bytes per token each, whole cache lines) stream
// through once, and each token's B and C rows are widened once per tile, so
// fewer, wider tiles re-read less of B/C. The kernel is compute-bound (exp):
// 128 was as fast as any other width tried, and 32 and 64 were slower
// (docs/performance.md).
const TILE: i32 = 128;

/**
 * Bytes of f64 scratch one thread's scan needs for state size N: a tile's
 * state, A and decays ([N][TILE] each), its step sizes, their products with
 * u and its outputs ([TILE] each), then a token's rows of B and C.
 */
export function scanScratchBytes(N: i32): i32 {
  return (3 * TILE * N + 3 * TILE + 2 * N) * 8;
}

// n floats at src widened to f64 at dst.
function widen64(dst: usize, src: usize, n: i32): void {
  for (let i = 0; i < n; i++) store<f64>(dst + (<usize>i << 3), <f64>load<f32>(src + (<usize>i << 2)));
}

// Byte address of token t, channel d in a [len, dim] (ts = dim, cs = 1) or
// [dim, len] (ts = 1, cs = len) array of f32.
// @ts-ignore: decorator
@inline
function at(base: usize, t: i32, d: i32, ts: i32, cs: i32): usize {
  return base + ((<usize>t * <usize>ts + <usize>d * <usize>cs) << 2);
}

// Channels d .. d + 3 of token t, one load where they are adjacent.
// @ts-ignore: decorator
@inline
function load4(base: usize, t: i32, d: i32, ts: i32, cs: i32): v128 {
  const p = at(base, t, d, ts, cs);
  if (cs == 1) return v128.load(p);
  const step = <usize>cs << 2;
  return f32x4(load<f32>(p), load<f32>(p + step), load<f32>(p + 2 * step), load<f32>(p + 3 * step));
}

// Stores channels d .. d + 3 of token t, as load4 reads them.
// @ts-ignore: decorator
@inline
function store4(base: usize, t: i32, d: i32, ts: i32, cs: i32, v: v128): void {
  const p = at(base, t, d, ts, cs);
  if (cs == 1) {
    v128.store(p, v);
    return;
  }
  const step = <usize>cs << 2;
  store<f32>(p, f32x4.extract_lane(v, 0));
  store<f32>(p + step, f32x4.extract_lane(v, 1));
  store<f32>(p + 2 * step, f32x4.extract_lane(v, 2));
  store<f32>(p + 3 * step, f32x4.extract_lane(v, 3));
}

// The selective scan over channels [d0, d1), with `scratch` holding
// scanScratchBytes(N) bytes for this thread. See ScanArgs in src/backend.ts.
// u, delta, z and y are token-major [len, dim] (ts = dim, cs = 1) or, as
// mamba_ssm lays them out, channel-major [dim, len] (ts = 1, cs = len); the
// work per channel is the same, only their addresses differ.
//
// Each token runs four passes over the tile's channels, the paper's
// discretization then its recurrence: the step sizes dt and dt·u, every
// decay exp(dt·A), the states and C·h, then the outputs. The decays, most of
// the arithmetic, are one loop of independent exps. The tile holds states,
// A and decays state-major ([N][TILE]), so each vector spans two channels:
// a channel's C·h sums in its own lane, with no sum across lanes at the end.
export function scan(
  y: usize,
  u: usize,
  delta: usize,
  A: usize,
  B: usize,
  C: usize,
  D: usize,
  z: usize,
  bias: usize,
  softplus: i32,
  state: usize,
  len: i32,
  dim: i32,
  N: i32,
  ts: i32,
  cs: i32,
  d0: i32,
  d1: i32,
  scratch: usize,
): void {
  const nBytes = <usize>N << 2;
  const plane = <usize>TILE << 3; // bytes of one state's row [TILE] in the tile
  const tileA = scratch + <usize>N * plane;
  const decays = tileA + <usize>N * plane;
  const dts = decays + <usize>N * plane;
  const dtus = dts + plane;
  const ys = dtus + plane;
  const bRow = ys + plane;
  const cRow = bRow + (<usize>N << 3);
  for (let tile = d0; tile < d1; tile += TILE) {
    const channels = min(TILE, d1 - tile);
    // Whole groups of 8 channels; the padding's lanes are zeros and not stored.
    const padded = (channels + 7) & ~7;
    memory.fill(scratch, 0, <usize>(3 * N + 2) * plane);
    for (let c = 0; c < channels; c++) {
      const h = state + <usize>(tile + c) * nBytes;
      const a = A + <usize>(tile + c) * nBytes;
      for (let n = 0; n < N; n++) {
        const at = <usize>n * plane + (<usize>c << 3);
        store<f64>(scratch + at, <f64>load<f32>(h + (<usize>n << 2)));
        store<f64>(tileA + at, <f64>load<f32>(a + (<usize>n << 2)) * 1.4426950408889634);
      }
    }
    for (let t = 0; t < len; t++) {
      widen64(bRow, B + <usize>t * nBytes, N);
      widen64(cRow, C + <usize>t * nBytes, N);
      stepSizes(dts, dtus, delta, u, bias, softplus, t, tile, tile + channels, ts, cs);
      decay(decays, tileA, dts, padded, N, plane);
      update(ys, scratch, decays, dtus, bRow, cRow, padded, N, plane);
      let d = tile;
      const tileEnd = tile + channels;
      for (; d + 4 <= tileEnd; d += 4) {
        const i = <usize>(d - tile) << 3;
        let y01 = v128.load(ys + i);
        let y23 = v128.load(ys + i, 16);
        if (D) {
          const dv = v128.load(D + (<usize>d << 2));
          const uv = load4(u, t, d, ts, cs);
          y01 = madd64(f64x2.promote_low_f32x4(dv), f64x2.promote_low_f32x4(uv), y01);
          y23 = madd64(
            f64x2.promote_low_f32x4(v128.shuffle<f32>(dv, dv, 2, 3, 0, 1)),
            f64x2.promote_low_f32x4(v128.shuffle<f32>(uv, uv, 2, 3, 0, 1)),
            y23,
          );
        }
        const lo = f32x4.demote_f64x2_zero(y01);
        let out = v128.shuffle<f32>(lo, f32x4.demote_f64x2_zero(y23), 0, 1, 4, 5);
        if (z) out = f32x4.mul(out, silu4(load4(z, t, d, ts, cs)));
        store4(y, t, d, ts, cs, out);
      }
      // Channel tail (the tile's width not a multiple of 4): one at a time.
      for (; d < tileEnd; d++) {
        let out = load<f64>(ys + (<usize>(d - tile) << 3));
        if (D) out += <f64>load<f32>(D + (<usize>d << 2)) * <f64>load<f32>(at(u, t, d, ts, cs));
        let o32 = <f32>out;
        if (z) o32 *= silu1(load<f32>(at(z, t, d, ts, cs)));
        store<f32>(at(y, t, d, ts, cs), o32);
      }
    }
    for (let c = 0; c < channels; c++) {
      const h = state + <usize>(tile + c) * nBytes;
      for (let n = 0; n < N; n++) {
        store<f32>(h + (<usize>n << 2), <f32>load<f64>(scratch + <usize>n * plane + (<usize>c << 3)));
      }
    }
  }
}

// dt = softplus(delta + bias) (each optional) and dt·u at token t for
// channels [d0, d1), in f64 at dts and dtus from index 0.
// @ts-ignore: decorator
@inline
function stepSizes(
  dts: usize,
  dtus: usize,
  delta: usize,
  u: usize,
  bias: usize,
  softplus: i32,
  t: i32,
  d0: i32,
  d1: i32,
  ts: i32,
  cs: i32,
): void {
  let d = d0;
  for (; d + 4 <= d1; d += 4) {
    const dv = load4(delta, t, d, ts, cs);
    let dt0 = f64x2.promote_low_f32x4(dv);
    let dt1 = f64x2.promote_low_f32x4(v128.shuffle<f32>(dv, dv, 2, 3, 0, 1));
    if (bias) {
      const bv = v128.load(bias + (<usize>d << 2));
      dt0 = f64x2.add(dt0, f64x2.promote_low_f32x4(bv));
      dt1 = f64x2.add(dt1, f64x2.promote_low_f32x4(v128.shuffle<f32>(bv, bv, 2, 3, 0, 1)));
    }
    if (softplus) {
      dt0 = softplus2d(dt0);
      dt1 = softplus2d(dt1);
    }
    const uv = load4(u, t, d, ts, cs);
    const i = <usize>(d - d0) << 3;
    v128.store(dts + i, dt0);
    v128.store(dts + i, dt1, 16);
    v128.store(dtus + i, f64x2.mul(dt0, f64x2.promote_low_f32x4(uv)));
    v128.store(dtus + i, f64x2.mul(dt1, f64x2.promote_low_f32x4(v128.shuffle<f32>(uv, uv, 2, 3, 0, 1))), 16);
  }
  for (; d < d1; d++) {
    let dt = f64x2.splat(<f64>load<f32>(at(delta, t, d, ts, cs)));
    if (bias) dt = f64x2.add(dt, f64x2.splat(<f64>load<f32>(bias + (<usize>d << 2))));
    if (softplus) dt = softplus2d(dt);
    const i = <usize>(d - d0) << 3;
    store<f64>(dts + i, f64x2.extract_lane(dt, 0));
    store<f64>(dtus + i, f64x2.extract_lane(dt, 0) * <f64>load<f32>(at(u, t, d, ts, cs)));
  }
}

// decays[n][c] = exp(dts[c]·A[n][c]) = 2^(dts[c]·A2[n][c]) for channels
// [0, channels) (even) of every state n, rows `plane` bytes apart, A2 being
// A·log2(e): two channels per vector, each iteration independent.
// @ts-ignore: decorator
@inline
function decay(decays: usize, A2: usize, dts: usize, channels: i32, N: i32, plane: usize): void {
  const lo = D_LO, hi = D_HI, magic = D_MAGIC, one = D_ONE;
  const k1 = D_K1, k2 = D_K2, k3 = D_K3, k4 = D_K4, k5 = D_K5, k6 = D_K6, k7 = D_K7;
  const width = <usize>channels << 3;
  for (let n = 0; n < N; n++) {
    const row = <usize>n * plane;
    for (let o: usize = 0; o < width; o += 16) {
      const y = f64x2.mul(v128.load(dts + o), v128.load(A2 + row + o));
      v128.store(decays + row + o, pow2dWith(y, lo, hi, magic, one, k1, k2, k3, k4, k5, k6, k7));
    }
  }
}

// h[n][c] ← decays[n][c]·h[n][c] + dtus[c]·B[n] and ys[c] = Σ_n C[n]·h[n][c]
// for channels [0, channels) (a multiple of 8): eight channels at a time,
// four vectors whose sums are independent chains.
// @ts-ignore: decorator
@inline
function update(
  ys: usize,
  h: usize,
  decays: usize,
  dtus: usize,
  bRow: usize,
  cRow: usize,
  channels: i32,
  N: i32,
  plane: usize,
): void {
  const width = <usize>channels << 3;
  for (let o: usize = 0; o < width; o += 64) {
    const u0 = v128.load(dtus + o);
    const u1 = v128.load(dtus + o, 16);
    const u2 = v128.load(dtus + o, 32);
    const u3 = v128.load(dtus + o, 48);
    let s0 = D_ZERO, s1 = D_ZERO, s2 = D_ZERO, s3 = D_ZERO;
    for (let n = 0; n < N; n++) {
      const at = <usize>n * plane + o;
      const b = v128.load64_splat(bRow + (<usize>n << 3));
      const c = v128.load64_splat(cRow + (<usize>n << 3));
      const hp = h + at;
      const ep = decays + at;
      const h0 = madd64(v128.load(ep), v128.load(hp), f64x2.mul(u0, b));
      const h1 = madd64(v128.load(ep, 16), v128.load(hp, 16), f64x2.mul(u1, b));
      const h2 = madd64(v128.load(ep, 32), v128.load(hp, 32), f64x2.mul(u2, b));
      const h3 = madd64(v128.load(ep, 48), v128.load(hp, 48), f64x2.mul(u3, b));
      v128.store(hp, h0);
      v128.store(hp, h1, 16);
      v128.store(hp, h2, 32);
      v128.store(hp, h3, 48);
      s0 = madd64(h0, c, s0);
      s1 = madd64(h1, c, s1);
      s2 = madd64(h2, c, s2);
      s3 = madd64(h3, c, s3);
    }
    v128.store(ys + o, s0);
    v128.store(ys + o, s1, 16);
    v128.store(ys + o, s2, 32);
    v128.store(ys + o, s3, 48);
  }
}

// 2^y for f32x4 on constants passed in (see pow2dWith): y clamped to
// [-125, 127], 2^f of its fraction f in [-0.5, 0.5] by the degree-7
// polynomial of pow2dWith (truncation about 5e-9, under the f32 rounding),
// 2^n added straight to the exponent bits.
// @ts-ignore: decorator
@inline
function pow2With(
  y0: v128,
  lo: v128,
  hi: v128,
  magic: v128,
  one: v128,
  k1: v128,
  k2: v128,
  k3: v128,
  k4: v128,
  k5: v128,
  k6: v128,
  k7: v128,
): v128 {
  const y = f32x4.pmin(f32x4.pmax(y0, lo), hi);
  const t = f32x4.add(y, magic);
  const f = f32x4.sub(y, f32x4.sub(t, magic)); // exact
  let p = madd(k7, f, k6);
  p = madd(p, f, k5);
  p = madd(p, f, k4);
  p = madd(p, f, k3);
  p = madd(p, f, k2);
  p = madd(p, f, k1);
  p = madd(p, f, one);
  return i32x4.add(p, i32x4.shl(t, 23));
}

// The constants of pow2With for f32, globals as the others are.
let F_LO = f32x4.splat(-125);
let F_HI = f32x4.splat(127);
let F_K1 = f32x4.splat(<f32>0.6931471805599453);
let F_K2 = f32x4.splat(<f32>0.24022651071361434);
let F_K3 = f32x4.splat(<f32>0.05550410699025128);
let F_K4 = f32x4.splat(<f32>0.009618037597154232);
let F_K5 = f32x4.splat(<f32>0.0013333712779035507);
let F_K6 = f32x4.splat(<f32>0.0001546689681705087);
let F_K7 = f32x4.splat(<f32>1.5241381308279067e-5);

/** Like setConstants, for pow2With's f32 constants. */
export function setPow2Constants(scale: f32): void {
  F_LO = f32x4.splat(-125 * scale);
  F_HI = f32x4.splat(127 * scale);
  F_K1 = f32x4.splat(<f32>0.6931471805599453 * scale);
  F_K2 = f32x4.splat(<f32>0.24022651071361434 * scale);
  F_K3 = f32x4.splat(<f32>0.05550410699025128 * scale);
  F_K4 = f32x4.splat(<f32>0.009618037597154232 * scale);
  F_K5 = f32x4.splat(<f32>0.0013333712779035507 * scale);
  F_K6 = f32x4.splat(<f32>0.0001546689681705087 * scale);
  F_K7 = f32x4.splat(<f32>1.5241381308279067e-5 * scale);
}

// One decode step (a single token) of `batch` sequences, the state of
// sequence b being row slots[b] (a float) of the pool `state` [rows, dim, N]
// (row b where slots is 0). With one token there is no recurrence within the
// call for rounding to build up in (the f64 of `scan` is for long prompts):
// f32 runs four states per instruction. The decays are 2^(dt·log2(e)·A),
// with the exp's constants held in locals (a global is a load at every use).
// Covers the units [i0, i1) of batch·dim, a unit being channel d of sequence
// b at b·dim + d; dim, N, i0 and i1 are multiples of 4.
export function scanStep(
  y: usize,
  u: usize,
  delta: usize,
  A: usize,
  B: usize,
  C: usize,
  D: usize,
  z: usize,
  bias: usize,
  softplus: i32,
  state: usize,
  slots: usize,
  batch: i32,
  dim: i32,
  N: i32,
  i0: i32,
  i1: i32,
): void {
  const lo = F_LO, hi = F_HI, magic = MAGIC, one = ONE;
  const k1 = F_K1, k2 = F_K2, k3 = F_K3, k4 = F_K4, k5 = F_K5, k6 = F_K6, k7 = F_K7;
  const nBytes = <usize>N << 2;
  for (let i = i0; i < i1; i += 4) {
    const b = i / dim;
    const d = i - b * dim;
    const row = slots ? <i32>load<f32>(slots + (<usize>b << 2)) : b;
    const at = <usize>i << 2;
    const col = <usize>d << 2;
    let dt = v128.load(delta + at);
    if (bias) dt = f32x4.add(dt, v128.load(bias + col));
    if (softplus) dt = softplus4(dt);
    const uv = v128.load(u + at);
    const dtu = f32x4.mul(dt, uv);
    const dt2 = f32x4.mul(dt, LOG2E);
    const bRow = B + <usize>b * nBytes;
    const cRow = C + <usize>b * nBytes;
    // Channel c's states at h + c·nBytes, its A at a + c·nBytes.
    const h = state + (<usize>row * <usize>dim + <usize>d) * nBytes;
    const a = A + <usize>d * nBytes;
    let s0 = f32x4.splat(0), s1 = f32x4.splat(0), s2 = f32x4.splat(0), s3 = f32x4.splat(0);
    const dt20 = f32x4.splat(f32x4.extract_lane(dt2, 0)), dtu0 = f32x4.splat(f32x4.extract_lane(dtu, 0));
    const dt21 = f32x4.splat(f32x4.extract_lane(dt2, 1)), dtu1 = f32x4.splat(f32x4.extract_lane(dtu, 1));
    const dt22 = f32x4.splat(f32x4.extract_lane(dt2, 2)), dtu2 = f32x4.splat(f32x4.extract_lane(dtu, 2));
    const dt23 = f32x4.splat(f32x4.extract_lane(dt2, 3)), dtu3 = f32x4.splat(f32x4.extract_lane(dtu, 3));
    for (let o: usize = 0; o < nBytes; o += 16) {
      const bv = v128.load(bRow + o);
      const cv = v128.load(cRow + o);
      let p = h + o;
      let q = a + o;
      let e = pow2With(f32x4.mul(dt20, v128.load(q)), lo, hi, magic, one, k1, k2, k3, k4, k5, k6, k7);
      let hv = madd(e, v128.load(p), f32x4.mul(dtu0, bv));
      v128.store(p, hv);
      s0 = madd(hv, cv, s0);
      p += nBytes;
      q += nBytes;
      e = pow2With(f32x4.mul(dt21, v128.load(q)), lo, hi, magic, one, k1, k2, k3, k4, k5, k6, k7);
      hv = madd(e, v128.load(p), f32x4.mul(dtu1, bv));
      v128.store(p, hv);
      s1 = madd(hv, cv, s1);
      p += nBytes;
      q += nBytes;
      e = pow2With(f32x4.mul(dt22, v128.load(q)), lo, hi, magic, one, k1, k2, k3, k4, k5, k6, k7);
      hv = madd(e, v128.load(p), f32x4.mul(dtu2, bv));
      v128.store(p, hv);
      s2 = madd(hv, cv, s2);
      p += nBytes;
      q += nBytes;
      e = pow2With(f32x4.mul(dt23, v128.load(q)), lo, hi, magic, one, k1, k2, k3, k4, k5, k6, k7);
      hv = madd(e, v128.load(p), f32x4.mul(dtu3, bv));
      v128.store(p, hv);
      s3 = madd(hv, cv, s3);
    }
    let out = sums4(s0, s1, s2, s3);
    if (D) out = madd(v128.load(D + col), uv, out);
    if (z) out = f32x4.mul(out, silu4(v128.load(z + at)));
    v128.store(y + at, out);
  }
}
