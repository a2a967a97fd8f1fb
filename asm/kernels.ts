// AssemblyScript kernels of the "wasm" backend (src/backends/wasm.ts), built
// with SIMD by `deno task build` into src/generated/kernels_wasm.ts.
//
// Every pointer is a byte offset into the (imported, possibly shared) memory;
// every buffer holds f32 in the token-major layouts of src/backend.ts. A null
// optional buffer is passed as pointer 0 (the allocator never hands out 0).
// Kernels that split across threads take a range [from, to) of output columns
// or channels, so that each thread writes a disjoint part of the output.

// ---------------------------------------------------------------- math ----

// exp(x) for f32x4, Cephes-style: x = n·ln2 + r with |r| <= ln2/2, e^r by a
// degree-6 polynomial, 2^n put straight into the exponent bits. Inputs are
// clamped to [-87.3, 88.3] (results stay normal floats, no inf/NaN).
// Measured max relative error against f64 Math.exp, over 2^20 evenly spaced
// f32 inputs in [-87, 88]: 8.0e-8 (under one f32 ulp at 2^-23 = 1.19e-7);
// checked by tests/wasm_kernels_test.ts. Used by silu (the conv's output and
// the scan's z gate); the scan's own exp(dt·A) is the f64 pow2dWith below.

// The polynomial's constants, splatted, as mutable globals: V8 materializes a
// v128.const in about four instructions inside every loop iteration, while a
// global is one load that folds into the arithmetic. (setConstants, which
// nobody needs to call, keeps the optimizer from folding them back.)
let LOG2E = f32x4.splat(1.44269504088896341);
let MAGIC = f32x4.splat(12582912.0); // 1.5·2^23
let LN2_HI = f32x4.splat(0.693359375);
let LN2_LO = f32x4.splat(-2.12194440e-4);
let P0 = f32x4.splat(1.9875691500e-4);
let P1 = f32x4.splat(1.3981999507e-3);
let P2 = f32x4.splat(8.3334519073e-3);
let P3 = f32x4.splat(4.1665795894e-2);
let P4 = f32x4.splat(1.6666665459e-1);
let P5 = f32x4.splat(5.0000001201e-1);
let ONE = f32x4.splat(1);
let TWO = f32x4.splat(2);
let ZERO = f32x4.splat(0);
let LO = f32x4.splat(-87.3);
let HI = f32x4.splat(88.3);
let BIAS127 = i32x4.splat(127);

/** Re-initializes the math constants (there only to keep them globals). */
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
function exp4(x0: v128): v128 {
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
function softplus4(x: v128): v128 {
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
function silu4(x: v128): v128 {
  return f32x4.div(x, f32x4.add(exp4(f32x4.neg(x)), ONE));
}

// @ts-ignore: decorator
@inline
function hsum(v: v128): f32 {
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

// ---------------------------------------------------------------- scan ----

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

// Lane k of the result is the sum of the lanes of the k-th argument.
// @ts-ignore: decorator
@inline
function sums4(a: v128, b: v128, c: v128, d: v128): v128 {
  const ab = f32x4.add(v128.shuffle<f32>(a, b, 0, 2, 4, 6), v128.shuffle<f32>(a, b, 1, 3, 5, 7));
  const cd = f32x4.add(v128.shuffle<f32>(c, d, 0, 2, 4, 6), v128.shuffle<f32>(c, d, 1, 3, 5, 7));
  return f32x4.add(v128.shuffle<f32>(ab, cd, 0, 2, 4, 6), v128.shuffle<f32>(ab, cd, 1, 3, 5, 7));
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

// -------------------------------------------------------------- linear ----

// a·b + c per lane. The relaxed-SIMD build gives one fused multiply-add where
// the CPU has FMA (relaxed SIMD lets the engine choose, so the last bit may
// differ between machines), which doubles the matmul's arithmetic per
// instruction; the plain-SIMD build (asm/build.ts), for engines that reject
// relaxed SIMD, multiplies and adds. ASC_FEATURE_RELAXED_SIMD is a constant
// that the compiler folds, so each build holds only its own branch.
// @ts-ignore: decorator
@inline
function madd(a: v128, b: v128, c: v128): v128 {
  if (ASC_FEATURE_RELAXED_SIMD) return f32x4.relaxed_madd(a, b, c);
  return f32x4.add(f32x4.mul(a, b), c);
}

// GEMV (rows = 1): out[o] = x · w[o] + bias[o] for o in [o0, o1), one weight
// row at a time, 16 floats per step into four accumulators, so the weights
// stream strictly sequentially, which every thread reads once. Measured on
// 768 → 50280 (154 MB of weights, from DRAM), one thread: 31 GB/s this way;
// 15 GB/s with four rows at a time (4 × 4 floats per step, one x load shared)
// and 18 GB/s with four rows × 8 floats: interleaved streams defeat the
// hardware prefetcher more than the shared x loads save.
function gemv(out: usize, x: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
  const rowBytes = <usize>inDim << 2;
  const k16 = inDim & ~15;
  const k4 = inDim & ~3;
  for (let o = o0; o < o1; o++) {
    const w0 = w + <usize>o * rowBytes;
    let a0 = f32x4.splat(0);
    let a1 = f32x4.splat(0);
    let a2 = f32x4.splat(0);
    let a3 = f32x4.splat(0);
    let k = 0;
    for (; k < k16; k += 16) {
      const p = <usize>k << 2;
      a0 = madd(v128.load(x + p), v128.load(w0 + p), a0);
      a1 = madd(v128.load(x + p, 16), v128.load(w0 + p, 16), a1);
      a2 = madd(v128.load(x + p, 32), v128.load(w0 + p, 32), a2);
      a3 = madd(v128.load(x + p, 48), v128.load(w0 + p, 48), a3);
    }
    for (; k < k4; k += 4) {
      const p = <usize>k << 2;
      a0 = madd(v128.load(x + p), v128.load(w0 + p), a0);
    }
    let s0 = hsum(f32x4.add(f32x4.add(a0, a1), f32x4.add(a2, a3)));
    for (; k < inDim; k++) {
      const p = <usize>k << 2;
      s0 += load<f32>(x + p) * load<f32>(w0 + p);
    }
    if (bias) s0 += load<f32>(bias + (<usize>o << 2));
    store<f32>(out + (<usize>o << 2), s0);
  }
}

// Weight rows per tile of the dequantizing matmuls (linearBlocks,
// linearHalf): OB rows widened to f32 (OB·inDim·4 bytes: 192 KiB for inDim
// 768) stay in L2 while the f32 matmul runs over them.
const OB: i32 = 64;

// The f32 matmul (rows > 1) works on panels: PANEL_COLS weight rows, output
// columns, interleaved as [inDim][PANEL_COLS] (packPanel), then the bias's
// PANEL_COLS lanes. Its inner step takes two vectors of the panel and one
// input value per row, broadcast, into PANEL_ROWS × 2 accumulators: 12 of
// the 15 vector registers V8 allocates on x64 (with the two weight vectors
// and the broadcast, 15), so nothing spills, and each weight load serves six
// rows; 4×4 blocks of dot products over row-major weights, before, needed 21
// and spilled (docs/performance.md has both speeds). A panel is packed once
// per call and serves every row it covers, so the weights need no layout of
// their own. The plain-SIMD build's multiply and add need a register more
// per step, so it takes four rows (eight accumulators): six spilled there.
const PANEL_COLS: i32 = 8;
const PANEL_ROWS: i32 = ASC_FEATURE_RELAXED_SIMD ? 6 : 4;

/** Bytes of per-thread scratch the f32 matmul needs: one panel and its bias. */
export function panelBytes(inDim: i32): i32 {
  return ((inDim + 1) * PANEL_COLS * 4 + 63) & ~63;
}

// Packs weight rows [o, o + n) (n <= PANEL_COLS) of w [*, inDim] into
// `panel` as [inDim][PANEL_COLS], then their bias (zeros without one); lanes
// past n are zeros.
function packPanel(panel: usize, w: usize, bias: usize, inDim: i32, o: i32, n: i32): void {
  const rowBytes = <usize> inDim << 2;
  const w0 = w + <usize> o * rowBytes;
  let k = 0;
  if (n == PANEL_COLS) {
    // 4×4 transposes: four k of rows 0..3, then of rows 4..7.
    const k4 = inDim & ~3;
    for (; k < k4; k += 4) {
      const src = w0 + (<usize> k << 2);
      const dst = panel + (<usize> k << 5);
      transpose4(src, rowBytes, dst);
      transpose4(src + 4 * rowBytes, rowBytes, dst + 16);
    }
  }
  for (; k < inDim; k++) {
    for (let j = 0; j < PANEL_COLS; j++) {
      const value = j < n ? load<f32>(w0 + <usize> j * rowBytes + (<usize> k << 2)) : 0;
      store<f32>(panel + (<usize> k << 5) + (<usize> j << 2), value);
    }
  }
  const biasLanes = panel + (<usize> inDim << 5);
  for (let j = 0; j < PANEL_COLS; j++) {
    store<f32>(biasLanes + (<usize> j << 2), bias && j < n ? load<f32>(bias + (<usize> (o + j) << 2)) : 0);
  }
}

// Four floats of four rows (stride bytes apart) at src, transposed: float k
// of the rows as one vector at dst + 32·k.
// @ts-ignore: decorator
@inline
function transpose4(src: usize, stride: usize, dst: usize): void {
  const r0 = v128.load(src);
  const r1 = v128.load(src + stride);
  const r2 = v128.load(src + 2 * stride);
  const r3 = v128.load(src + 3 * stride);
  const t0 = v128.shuffle<f32>(r0, r1, 0, 4, 1, 5);
  const t1 = v128.shuffle<f32>(r0, r1, 2, 6, 3, 7);
  const t2 = v128.shuffle<f32>(r2, r3, 0, 4, 1, 5);
  const t3 = v128.shuffle<f32>(r2, r3, 2, 6, 3, 7);
  v128.store(dst, v128.shuffle<f32>(t0, t2, 0, 1, 4, 5));
  v128.store(dst, v128.shuffle<f32>(t0, t2, 2, 3, 6, 7), 32);
  v128.store(dst, v128.shuffle<f32>(t1, t3, 0, 1, 4, 5), 64);
  v128.store(dst, v128.shuffle<f32>(t1, t3, 2, 3, 6, 7), 96);
}

// One tile: out[r .. r + rows, o .. o + cols] from a packed panel, rows <=
// PANEL_ROWS and cols <= PANEL_COLS. Rows past the last are computed on the
// last row's input again and not stored, so one kernel serves every tile.
// @ts-ignore: decorator
@inline
function panelTile(
  out: usize,
  x: usize,
  panel: usize,
  inDim: i32,
  outDim: i32,
  r: i32,
  rows: i32,
  o: i32,
  cols: i32,
): void {
  const rowBytes = <usize> inDim << 2;
  const last = rows - 1;
  const x0 = x + <usize> r * rowBytes;
  const x1 = x0 + <usize> min(1, last) * rowBytes;
  const x2 = x0 + <usize> min(2, last) * rowBytes;
  const x3 = x0 + <usize> min(3, last) * rowBytes;
  const x4 = x0 + <usize> min(4, last) * rowBytes;
  const x5 = x0 + <usize> min(5, last) * rowBytes;
  let a00 = f32x4.splat(0), a01 = f32x4.splat(0);
  let a10 = f32x4.splat(0), a11 = f32x4.splat(0);
  let a20 = f32x4.splat(0), a21 = f32x4.splat(0);
  let a30 = f32x4.splat(0), a31 = f32x4.splat(0);
  let a40 = f32x4.splat(0), a41 = f32x4.splat(0);
  let a50 = f32x4.splat(0), a51 = f32x4.splat(0);
  let p = panel;
  for (let k: usize = 0; k < rowBytes; k += 4) {
    const w0 = v128.load(p);
    const w1 = v128.load(p, 16);
    let b = v128.load32_splat(x0 + k);
    a00 = madd(b, w0, a00);
    a01 = madd(b, w1, a01);
    b = v128.load32_splat(x1 + k);
    a10 = madd(b, w0, a10);
    a11 = madd(b, w1, a11);
    b = v128.load32_splat(x2 + k);
    a20 = madd(b, w0, a20);
    a21 = madd(b, w1, a21);
    b = v128.load32_splat(x3 + k);
    a30 = madd(b, w0, a30);
    a31 = madd(b, w1, a31);
    if (PANEL_ROWS > 4) {
      b = v128.load32_splat(x4 + k);
      a40 = madd(b, w0, a40);
      a41 = madd(b, w1, a41);
      b = v128.load32_splat(x5 + k);
      a50 = madd(b, w0, a50);
      a51 = madd(b, w1, a51);
    }
    p += 32;
  }
  // p is at the panel's bias lanes.
  const b0 = v128.load(p);
  const b1 = v128.load(p, 16);
  const outRow = <usize> outDim << 2;
  const op = out + <usize> r * outRow + (<usize> o << 2);
  storeTileRow(op, f32x4.add(a00, b0), f32x4.add(a01, b1), cols);
  if (rows > 1) storeTileRow(op + outRow, f32x4.add(a10, b0), f32x4.add(a11, b1), cols);
  if (rows > 2) storeTileRow(op + 2 * outRow, f32x4.add(a20, b0), f32x4.add(a21, b1), cols);
  if (rows > 3) storeTileRow(op + 3 * outRow, f32x4.add(a30, b0), f32x4.add(a31, b1), cols);
  if (rows > 4) storeTileRow(op + 4 * outRow, f32x4.add(a40, b0), f32x4.add(a41, b1), cols);
  if (rows > 5) storeTileRow(op + 5 * outRow, f32x4.add(a50, b0), f32x4.add(a51, b1), cols);
}

// The first `cols` (<= 8) of the eight floats lo, hi at op.
// @ts-ignore: decorator
@inline
function storeTileRow(op: usize, lo: v128, hi: v128, cols: i32): void {
  if (cols == PANEL_COLS) {
    v128.store(op, lo);
    v128.store(op, hi, 16);
    return;
  }
  if (cols > 0) store<f32>(op, f32x4.extract_lane(lo, 0));
  if (cols > 1) store<f32>(op, f32x4.extract_lane(lo, 1), 4);
  if (cols > 2) store<f32>(op, f32x4.extract_lane(lo, 2), 8);
  if (cols > 3) store<f32>(op, f32x4.extract_lane(lo, 3), 12);
  if (cols > 4) store<f32>(op, f32x4.extract_lane(hi, 0), 16);
  if (cols > 5) store<f32>(op, f32x4.extract_lane(hi, 1), 20);
  if (cols > 6) store<f32>(op, f32x4.extract_lane(hi, 2), 24);
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over rows [r0, r1) and
// output columns [o0, o1), a panel at a time through `panel` (panelBytes).
function matmul(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  r0: i32,
  r1: i32,
  panel: usize,
): void {
  for (let o = o0; o < o1; o += PANEL_COLS) {
    const cols = min(PANEL_COLS, o1 - o);
    packPanel(panel, w, bias, inDim, o, cols);
    for (let r = r0; r < r1; r += PANEL_ROWS) {
      panelTile(out, x, panel, inDim, outDim, r, min(PANEL_ROWS, r1 - r), o, cols);
    }
  }
}

// A batch of up to SMALL_BATCH rows (decode steps of a few concurrent
// streams) skips the panels: packing one costs about what a few rows'
// arithmetic on it does. Instead each weight row is read in place, one at a
// time in the order gemv streams them (interleaved rows defeat the
// prefetcher, see gemv), against every input row: dot products in two
// accumulators per row, each 8 floats of K loading two weight vectors and
// two of each input row. Past SMALL_BATCH rows the input rows' loads, two
// vectors per row for every weight row, cost more than the panels' packing
// (docs/performance.md has the speeds). The plain-SIMD build's multiply and
// add need a register more per row, so it takes four rows.
const SMALL_BATCH: i32 = ASC_FEATURE_RELAXED_SIMD ? 6 : 4;

// Column o of out (rows <= SMALL_BATCH, a constant where inlined): weight
// row o's dot products with every row of x, plus bias. Pointers past the
// last row repeat it, so that every load of the K tail stays inside x.
// @ts-ignore: decorator
@inline
function rowDots(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  inDim: i32,
  outDim: i32,
  rows: i32,
  o: i32,
): void {
  const rowBytes = <usize> inDim << 2;
  const last = rows - 1;
  const x0 = x;
  const x1 = x0 + <usize> min(1, last) * rowBytes;
  const x2 = x0 + <usize> min(2, last) * rowBytes;
  const x3 = x0 + <usize> min(3, last) * rowBytes;
  const x4 = x0 + <usize> min(4, last) * rowBytes;
  const x5 = x0 + <usize> min(5, last) * rowBytes;
  const w0 = w + <usize> o * rowBytes;
  let a0 = f32x4.splat(0), b0 = f32x4.splat(0);
  let a1 = f32x4.splat(0), b1 = f32x4.splat(0);
  let a2 = f32x4.splat(0), b2 = f32x4.splat(0);
  let a3 = f32x4.splat(0), b3 = f32x4.splat(0);
  let a4 = f32x4.splat(0), b4 = f32x4.splat(0);
  let a5 = f32x4.splat(0), b5 = f32x4.splat(0);
  const k8 = rowBytes & ~31;
  let k: usize = 0;
  for (; k < k8; k += 32) {
    const v = v128.load(w0 + k);
    const u = v128.load(w0 + k, 16);
    a0 = madd(v128.load(x0 + k), v, a0);
    b0 = madd(v128.load(x0 + k, 16), u, b0);
    if (rows > 1) {
      a1 = madd(v128.load(x1 + k), v, a1);
      b1 = madd(v128.load(x1 + k, 16), u, b1);
    }
    if (rows > 2) {
      a2 = madd(v128.load(x2 + k), v, a2);
      b2 = madd(v128.load(x2 + k, 16), u, b2);
    }
    if (rows > 3) {
      a3 = madd(v128.load(x3 + k), v, a3);
      b3 = madd(v128.load(x3 + k, 16), u, b3);
    }
    if (rows > 4) {
      a4 = madd(v128.load(x4 + k), v, a4);
      b4 = madd(v128.load(x4 + k, 16), u, b4);
    }
    if (rows > 5) {
      a5 = madd(v128.load(x5 + k), v, a5);
      b5 = madd(v128.load(x5 + k, 16), u, b5);
    }
  }
  if (k + 16 <= rowBytes) {
    const v = v128.load(w0 + k);
    a0 = madd(v128.load(x0 + k), v, a0);
    a1 = madd(v128.load(x1 + k), v, a1);
    a2 = madd(v128.load(x2 + k), v, a2);
    a3 = madd(v128.load(x3 + k), v, a3);
    a4 = madd(v128.load(x4 + k), v, a4);
    a5 = madd(v128.load(x5 + k), v, a5);
    k += 16;
  }
  // Lane i of lo: row i's dot product; lanes 0 and 1 of hi: rows 4 and 5's.
  let lo = sums4(f32x4.add(a0, b0), f32x4.add(a1, b1), f32x4.add(a2, b2), f32x4.add(a3, b3));
  let hi = sums4(f32x4.add(a4, b4), f32x4.add(a5, b5), a5, a5);
  for (; k < rowBytes; k += 4) {
    const wk = f32x4.splat(load<f32>(w0 + k));
    lo = madd(lanesAt(x0 + k, x1 + k, x2 + k, x3 + k), wk, lo);
    hi = madd(lanesAt(x4 + k, x5 + k, x5 + k, x5 + k), wk, hi);
  }
  if (bias) {
    const b = f32x4.splat(load<f32>(bias + (<usize> o << 2)));
    lo = f32x4.add(lo, b);
    hi = f32x4.add(hi, b);
  }
  const outRow = <usize> outDim << 2;
  const op = out + (<usize> o << 2);
  store<f32>(op, f32x4.extract_lane(lo, 0));
  if (rows > 1) store<f32>(op + outRow, f32x4.extract_lane(lo, 1));
  if (rows > 2) store<f32>(op + 2 * outRow, f32x4.extract_lane(lo, 2));
  if (rows > 3) store<f32>(op + 3 * outRow, f32x4.extract_lane(lo, 3));
  if (rows > 4) store<f32>(op + 4 * outRow, f32x4.extract_lane(hi, 0));
  if (rows > 5) store<f32>(op + 5 * outRow, f32x4.extract_lane(hi, 1));
}

// The floats at a, b, c and d as one vector.
// @ts-ignore: decorator
@inline
function lanesAt(a: usize, b: usize, c: usize, d: usize): v128 {
  let v = f32x4.replace_lane(f32x4.splat(load<f32>(a)), 1, load<f32>(b));
  v = f32x4.replace_lane(v, 2, load<f32>(c));
  return f32x4.replace_lane(v, 3, load<f32>(d));
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over output columns
// [o0, o1), for 2 <= rows <= SMALL_BATCH: a weight row at a time, the row
// count a constant in each copy of rowDots.
function smallMatmul(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
): void {
  for (let o = o0; o < o1; o++) {
    if (rows == 6) rowDots(out, x, w, bias, inDim, outDim, 6, o);
    else if (rows == 5) rowDots(out, x, w, bias, inDim, outDim, 5, o);
    else if (rows == 4) rowDots(out, x, w, bias, inDim, outDim, 4, o);
    else if (rows == 3) rowDots(out, x, w, bias, inDim, outDim, 3, o);
    else rowDots(out, x, w, bias, inDim, outDim, 2, o);
  }
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over output columns
// [o0, o1), rows > 1: pairs of weight rows for a few rows, else panels
// (through `panel`, panelBytes(inDim)).
function matmulRows(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  panel: usize,
): void {
  if (rows <= SMALL_BATCH) smallMatmul(out, x, w, bias, rows, inDim, outDim, o0, o1);
  else matmul(out, x, w, bias, inDim, outDim, o0, o1, 0, rows, panel);
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias, output columns [o0, o1),
// with `panel` scratch of panelBytes(inDim) for more than one row.
export function linear(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  panel: usize,
): void {
  if (rows == 1) gemv(out, x, w, bias, inDim, o0, o1);
  else matmulRows(out, x, w, bias, rows, inDim, outDim, o0, o1, panel);
}

// ------------------------------------------------------ Q8_0 weights ----

// Q8_0 weights (ggml's blocks of 32 int8 values q with a scale d; the weight
// is d·q) as src/backends/wasm.ts repacks them at upload: 40 bytes a block,
// the scale as an f32, −16 times the sum of the values as an i32 (for the
// relaxed GEMV's offset input, below), then the 32 values in order; and the
// rows in quads, block b of row 4g + r at 160·(g·blocks + b) + 40·r, so that
// the GEMV, which takes four rows per pass (sharing the input's loads), reads
// one sequential stream rather than four. A last partial quad is padded with
// zero rows, which the GEMV reads and does not store. Measured on the 130m decode
// shapes, one thread, one int16 term: four plain rows per pass took 2.2x the
// time of one row per pass, four interleaved rows 0.64x.
const Q8_BLOCK_BYTES: i32 = 40;
const Q8_QUAD_BYTES: i32 = 4 * Q8_BLOCK_BYTES;
// Where a repacked Q8_0 block's values start, after d and −16·Σ q.
const Q8_VALUES: i32 = 8;

// Block b of row o of a Q8_0 matrix at w of `blocks` blocks a row.
// @ts-ignore: decorator
@inline
function q8Block(w: usize, o: i32, b: i32, blocks: i32): usize {
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
let LOW_STEPS = f32x4.splat(32768); // 2^15; a global, as the constants above
let LOW_SCALE = f32x4.splat(1.0 / 32768);

// Rounds x [blocks·32] for gemvQ8: with s = max|x| / 32767 of each block,
// h = round(x / s) and l = round((x / s − h)·2^15) (|x / s − h| <= 1/2, and
// the difference is exact in f32), block b's 32 values of h at xq + 128·b,
// of l at xq + 128·b + 64, and s as an f32 at xq + 128·blocks + 4·b. An
// all-zero block gets s = 0; a NaN or infinite value gives s = NaN or inf,
// which the GEMV's products carry into its sums.
function quantizeQ8Input(xq: usize, x: usize, blocks: i32): void {
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
function q8Dot(
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
function gemvQ8(out: usize, xq: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
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
let Q7_OFFSET = f32x4.splat(1048576); // 2^20; a global, as the constants above
let DIGIT = i32x4.splat(127);
let DIGIT_SCALE = f32x4.splat(128);

// Rounds x [blocks·32] for gemvQ8Relaxed: block b's 32 digits a at
// xq + 128·b, b at xq + 128·b + 32, c at xq + 128·b + 64 (bytes, in order),
// and s as an f32 at xq + 128·blocks + 4·b, as quantizeQ8Input lays its
// terms out (so the scratch and the scales' place are the same). An all-zero
// or non-finite block gets digits (64, 0, 0), the value 0, times s = 0 or
// s = NaN or inf.
function quantizeQ7Input(xq: usize, x: usize, blocks: i32): void {
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
function gemvQ8Relaxed(
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
function storeQuad(
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

// Bytes of per-thread scratch linearBlocks needs: OB rows of dequantized
// weights for rows > 1; for one row, the rounded input of the Q8_0 and Q4_K
// GEMVs (4 + 1/8 bytes per value), the block sums of the Q4_K one (1/8 byte
// per value) and its quad's sub-block factors (128 bytes), in whole cache
// lines.
export function blocksScratchBytes(rows: i32, inDim: i32): i32 {
  return rows > 1 ? tileBytes(inDim) : (inDim * 4 + (inDim >> 2) + 128 + 63) & ~63;
}

// Bytes of OB weight rows widened to f32, then the f32 matmul's panel.
// @ts-ignore: decorator
@inline
function tileBytes(inDim: i32): i32 {
  return OB * inDim * 4 + panelBytes(inDim);
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
function dequantQ8(p: usize, dst: usize): void {
  const d = v128.load32_splat(p);
  dequantQ8Eighth(p, d, dst, 0);
  dequantQ8Eighth(p, d, dst, 1);
  dequantQ8Eighth(p, d, dst, 2);
  dequantQ8Eighth(p, d, dst, 3);
}

// ------------------------------------------------------ Q4_0 weights ----

// Q4_0 weights (ggml's blocks of 32 4-bit values u with a scale d; the
// weight is d·(u − 8)) as src/backends/wasm.ts repacks them at upload, 20
// bytes a block: the scale as an f32 times 2^-28, then 16 bytes read as four
// i32 lanes, lane j holding weight 4k + j as the signed nibble u − 8 at
// nibble k. Shifting nibble k into the top of its lane and masking the rest
// off gives (u − 8)·2^28, which converts to f32 exactly: the widening costs
// a shift and a mask instead of byte shuffles, and the 2^28 is paid back in
// the scale. The activations stay f32.
const Q4_BLOCK_BYTES: i32 = 20;
let TOP_NIBBLE = i32x4.splat(-268435456); // 0xf0000000; a global, as the constants above

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
function gemvQ4(out: usize, x: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
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
function dequantQ4(p: usize, dst: usize): void {
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

// ------------------------------------------------------ Q4_K weights ----

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
const Q4K_QUAD_BYTES: i32 = 4 * Q4K_BLOCK_BYTES;
// Where a super-block's values start, after d, dmin, the scales and the mins.
const Q4K_VALUES: i32 = 24;
let NIBBLE = i16x8.splat(15); // a global, as the constants above

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
function blockSums(dst: usize, x: usize, blocks: i32): void {
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
function gemvQ4K(
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
function dequantQ4K(p: usize, dst: usize): void {
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

// ------------------------------------------------- f16 and bf16 weights ----

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
let HALF_BITS = i32x4.splat(-1879056384); // 0x8fffe000; a global, as the constants above
let HALF_SCALE = f32x4.splat(5.192296858534828e33); // 2^112

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

// ----------------------------------------------------------- the rest ----

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
// L1 sets: 200 µs per call at 16 sequences of 1536 channels, against 58.)
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

// ------------------------------------------------------------ Mamba-2 ----

// Mamba-2's SSD (SsdArgs in src/backend.ts). Buffers: xBC [rows, W] with W =
// H·P + 2·G·N, each token's x [H, P], then B [G, N], then C [G, N]; dt [rows,
// H]; y [rows, H·P]; states [slots, H, P, N]. Work is split over units (b, h),
// sequence b's head h at b·H + h; a thread's units are consecutive.

// e^x and softplus of one float, through the vector versions.
// @ts-ignore: decorator
@inline
function exp1(x: f32): f32 {
  return f32x4.extract_lane(exp4(f32x4.splat(x)), 0);
}

// @ts-ignore: decorator
@inline
function silu1(x: f32): f32 {
  return f32x4.extract_lane(silu4(f32x4.splat(x)), 0);
}

// Δ of head h at the token whose dt row is at `dtRow`: clamp(softplus(dt + bias)).
// @ts-ignore: decorator
@inline
function ssdDelta(dtRow: usize, dtBias: usize, h: i32, dtMin: f32, dtMax: f32): f32 {
  const at = <usize>h << 2;
  const d = f32x4.extract_lane(softplus4(f32x4.splat(load<f32>(dtRow + at) + load<f32>(dtBias + at))), 0);
  return min(max(d, dtMin), dtMax);
}

// a · b over n floats.
// @ts-ignore: decorator
@inline
function dot(a: usize, b: usize, n: i32): f32 {
  let acc = f32x4.splat(0);
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    const o = <usize>i << 2;
    acc = madd(v128.load(a + o), v128.load(b + o), acc);
  }
  let sum = hsum(acc);
  for (; i < n; i++) {
    const o = <usize>i << 2;
    sum += load<f32>(a + o) * load<f32>(b + o);
  }
  return sum;
}

/** Bytes of scratch one thread's chunked SSD needs for chunks of Q tokens and heads of P channels. */
export function ssdScratchBytes(Q: i32, P: i32): i32 {
  return (3 * Q + Q * Q + Q * P) * 4;
}

// The chunked SSD scan (the "SSD" form of Dao & Gu, section 6) over units
// [u0, u1): for each chunk of Q tokens (fewer at the end) and head, with the
// cumulative log decay cs_t = Σ_{s<=t} Δ_s·A (within the chunk) and the state
// h0 [P, N] carried in from the chunks before,
//   y_t  = Σ_{s<=t} (C_t·B_s) · e^(cs_t - cs_s) · Δ_s · x_s    within the chunk
//        + e^(cs_t) · h0 · C_t                                  from the state
//        + D · x_t
//   h    = e^(cs_last) · h0 + Σ_s e^(cs_last - cs_s) · Δ_s · x_s ⊗ B_s
// The decay mask e^(cs_t - cs_s) only ever takes exponents <= 0. C_t·B_s [Q, Q]
// depends on the group only, so it is computed once per chunk for the
// consecutive heads of a group. The two products with h0 are register-blocked:
// four tokens' C against each row of h0, and sixteen states of a row against
// the chunk's B. `scratch` holds ssdScratchBytes(Q, P) bytes.
export function ssd(
  y: usize,
  xBC: usize,
  dt: usize,
  dtBias: usize,
  A: usize,
  D: usize,
  state: usize,
  slots: usize,
  len: i32,
  H: i32,
  P: i32,
  G: i32,
  N: i32,
  Q: i32,
  dtMin: f32,
  dtMax: f32,
  u0: i32,
  u1: i32,
  scratch: usize,
): void {
  const dInner = H * P;
  const rowBytes = <usize>(dInner + 2 * G * N) << 2;
  const nBytes = <usize>N << 2;
  const headsPerGroup = H / G;
  const cs = scratch; // [Q] cumulative log decay
  const dl = cs + (<usize>Q << 2); // [Q] Δ
  const wt = dl + (<usize>Q << 2); // [Q] one row of weights
  const CB = wt + (<usize>Q << 2); // [Q, Q] C_t·B_s, lower triangle
  const xw = CB + (<usize>(Q * Q) << 2); // [Q, P] x_s weighted for the chunk's state
  let u = u0;
  while (u < u1) {
    const b = u / H;
    const hStart = u - b * H;
    const hEnd = min(H, hStart + (u1 - u));
    const row = slots ? <i32>load<f32>(slots + (<usize>b << 2)) : b;
    for (let t0 = 0; t0 < len; t0 += Q) {
      const q = min(Q, len - t0);
      const first = <usize>(b * len + t0); // the chunk's first token row
      const x0 = xBC + first * rowBytes;
      let lastGroup = -1;
      for (let h = hStart; h < hEnd; h++) {
        const g = h / headsPerGroup;
        const bOff = <usize>(dInner + g * N) << 2;
        const cOff = <usize>(dInner + (G + g) * N) << 2;
        const xOff = <usize>(h * P) << 2;
        if (g != lastGroup) {
          lastGroup = g;
          for (let t = 0; t < q; t++) {
            const cRow = x0 + <usize>t * rowBytes + cOff;
            for (let s = 0; s <= t; s++) {
              store<f32>(CB + (<usize>(t * Q + s) << 2), dot(cRow, x0 + <usize>s * rowBytes + bOff, N));
            }
          }
        }
        const a = load<f32>(A + (<usize>h << 2));
        let cum: f32 = 0;
        for (let s = 0; s < q; s++) {
          const d = ssdDelta(dt + ((first + <usize>s) * <usize>H << 2), dtBias, h, dtMin, dtMax);
          store<f32>(dl + (<usize>s << 2), d);
          cum += d * a;
          store<f32>(cs + (<usize>s << 2), cum);
        }
        const hp = state + ((<usize>row * <usize>H + <usize>h) * <usize>(P * N) << 2);
        const skip: f32 = D ? load<f32>(D + (<usize>h << 2)) : 0;
        const skip4 = f32x4.splat(skip);
        const yHead = y + (first * <usize>dInner + <usize>(h * P) << 2);
        const yRowBytes = <usize>dInner << 2;
        // Within the chunk, and the skip: y_t = Σ_{s<=t} w_ts · x_s + D · x_t.
        for (let t = 0; t < q; t++) {
          const cst = load<f32>(cs + (<usize>t << 2));
          const cst4 = f32x4.splat(cst);
          const cbRow = CB + (<usize>(t * Q) << 2);
          let s = 0;
          for (; s + 4 <= t + 1; s += 4) {
            const o = <usize>s << 2;
            const mask = exp4(f32x4.sub(cst4, v128.load(cs + o)));
            v128.store(wt + o, f32x4.mul(f32x4.mul(v128.load(cbRow + o), mask), v128.load(dl + o)));
          }
          for (; s <= t; s++) {
            const o = <usize>s << 2;
            store<f32>(wt + o, load<f32>(cbRow + o) * exp1(cst - load<f32>(cs + o)) * load<f32>(dl + o));
          }
          const xt = x0 + <usize>t * rowBytes + xOff;
          const yRow = yHead + <usize>t * yRowBytes;
          let p = 0;
          for (; p + 4 <= P; p += 4) {
            const po = <usize>p << 2;
            let acc = f32x4.mul(skip4, v128.load(xt + po));
            for (let s2 = 0; s2 <= t; s2++) {
              const xs = x0 + <usize>s2 * rowBytes + xOff + po;
              acc = madd(f32x4.splat(load<f32>(wt + (<usize>s2 << 2))), v128.load(xs), acc);
            }
            v128.store(yRow + po, acc);
          }
          for (; p < P; p++) {
            const po = <usize>p << 2;
            let acc = skip * load<f32>(xt + po);
            for (let s2 = 0; s2 <= t; s2++) {
              acc += load<f32>(wt + (<usize>s2 << 2)) * load<f32>(x0 + <usize>s2 * rowBytes + xOff + po);
            }
            store<f32>(yRow + po, acc);
          }
        }
        // From the carried state: y_t += e^(cs_t) · h0 · C_t, four tokens at a time.
        let t = 0;
        for (; t + 4 <= q; t += 4) {
          const c0 = x0 + <usize>t * rowBytes + cOff;
          const c1 = c0 + rowBytes;
          const c2 = c1 + rowBytes;
          const c3 = c2 + rowBytes;
          const y0 = yHead + <usize>t * yRowBytes;
          const e0 = exp1(load<f32>(cs + (<usize>t << 2)));
          const e1 = exp1(load<f32>(cs + (<usize>(t + 1) << 2)));
          const e2 = exp1(load<f32>(cs + (<usize>(t + 2) << 2)));
          const e3 = exp1(load<f32>(cs + (<usize>(t + 3) << 2)));
          let p = 0;
          // Two rows of h0 against four tokens' C: eight sums in registers.
          for (; p + 2 <= P; p += 2) {
            const hq = hp + <usize>p * nBytes;
            let a0 = f32x4.splat(0);
            let a1 = f32x4.splat(0);
            let a2 = f32x4.splat(0);
            let a3 = f32x4.splat(0);
            let b0 = f32x4.splat(0);
            let b1 = f32x4.splat(0);
            let b2 = f32x4.splat(0);
            let b3 = f32x4.splat(0);
            let n = 0;
            for (; n + 4 <= N; n += 4) {
              const o = <usize>n << 2;
              const hv = v128.load(hq + o);
              const hw = v128.load(hq + nBytes + o);
              const v0 = v128.load(c0 + o);
              const v1 = v128.load(c1 + o);
              const v2 = v128.load(c2 + o);
              const v3 = v128.load(c3 + o);
              a0 = madd(v0, hv, a0);
              a1 = madd(v1, hv, a1);
              a2 = madd(v2, hv, a2);
              a3 = madd(v3, hv, a3);
              b0 = madd(v0, hw, b0);
              b1 = madd(v1, hw, b1);
              b2 = madd(v2, hw, b2);
              b3 = madd(v3, hw, b3);
            }
            let s0 = hsum(a0);
            let s1 = hsum(a1);
            let s2 = hsum(a2);
            let s3 = hsum(a3);
            let r0 = hsum(b0);
            let r1 = hsum(b1);
            let r2 = hsum(b2);
            let r3 = hsum(b3);
            for (; n < N; n++) {
              const o = <usize>n << 2;
              const hv = load<f32>(hq + o);
              const hw = load<f32>(hq + nBytes + o);
              const v0 = load<f32>(c0 + o);
              const v1 = load<f32>(c1 + o);
              const v2 = load<f32>(c2 + o);
              const v3 = load<f32>(c3 + o);
              s0 += v0 * hv;
              s1 += v1 * hv;
              s2 += v2 * hv;
              s3 += v3 * hv;
              r0 += v0 * hw;
              r1 += v1 * hw;
              r2 += v2 * hw;
              r3 += v3 * hw;
            }
            const po = <usize>p << 2;
            store<f32>(y0 + po, load<f32>(y0 + po) + e0 * s0);
            store<f32>(y0 + po, load<f32>(y0 + po, 4) + e0 * r0, 4);
            const y1 = y0 + yRowBytes;
            store<f32>(y1 + po, load<f32>(y1 + po) + e1 * s1);
            store<f32>(y1 + po, load<f32>(y1 + po, 4) + e1 * r1, 4);
            const y2 = y1 + yRowBytes;
            store<f32>(y2 + po, load<f32>(y2 + po) + e2 * s2);
            store<f32>(y2 + po, load<f32>(y2 + po, 4) + e2 * r2, 4);
            const y3 = y2 + yRowBytes;
            store<f32>(y3 + po, load<f32>(y3 + po) + e3 * s3);
            store<f32>(y3 + po, load<f32>(y3 + po, 4) + e3 * r3, 4);
          }
          for (; p < P; p++) {
            const po = <usize>p << 2;
            const hq = hp + <usize>p * nBytes;
            store<f32>(y0 + po, load<f32>(y0 + po) + e0 * dot(hq, c0, N));
            store<f32>(y0 + yRowBytes + po, load<f32>(y0 + yRowBytes + po) + e1 * dot(hq, c1, N));
            store<f32>(y0 + 2 * yRowBytes + po, load<f32>(y0 + 2 * yRowBytes + po) + e2 * dot(hq, c2, N));
            store<f32>(y0 + 3 * yRowBytes + po, load<f32>(y0 + 3 * yRowBytes + po) + e3 * dot(hq, c3, N));
          }
        }
        for (; t < q; t++) {
          const cRow = x0 + <usize>t * rowBytes + cOff;
          const yRow = yHead + <usize>t * yRowBytes;
          const e = exp1(load<f32>(cs + (<usize>t << 2)));
          for (let p = 0; p < P; p++) {
            const po = <usize>p << 2;
            store<f32>(yRow + po, load<f32>(yRow + po) + e * dot(hp + <usize>p * nBytes, cRow, N));
          }
        }
        // The state after the chunk: h = e^(cs_last) · h0 + Σ_s xw[s] ⊗ B_s,
        // with xw[s][p] = e^(cs_last - cs_s) · Δ_s · x_s[p].
        const csLast = load<f32>(cs + (<usize>(q - 1) << 2));
        const pBytes = <usize>P << 2;
        for (let s = 0; s < q; s++) {
          const w = exp1(csLast - load<f32>(cs + (<usize>s << 2))) * load<f32>(dl + (<usize>s << 2));
          const w4 = f32x4.splat(w);
          const xs = x0 + <usize>s * rowBytes + xOff;
          const out = xw + <usize>s * pBytes;
          let p = 0;
          for (; p + 4 <= P; p += 4) {
            const po = <usize>p << 2;
            v128.store(out + po, f32x4.mul(w4, v128.load(xs + po)));
          }
          for (; p < P; p++) {
            const po = <usize>p << 2;
            store<f32>(out + po, w * load<f32>(xs + po));
          }
        }
        const keepS = exp1(csLast);
        const keep = f32x4.splat(keepS);
        const b0Row = x0 + bOff;
        let p = 0;
        // Two rows of h, sixteen states each: eight sums in registers.
        for (; p + 2 <= P; p += 2) {
          const hq = hp + <usize>p * nBytes;
          const hr = hq + nBytes;
          const xp = xw + (<usize>p << 2);
          for (let n = 0; n + 16 <= N; n += 16) {
            const o = <usize>n << 2;
            let a0 = f32x4.mul(v128.load(hq + o), keep);
            let a1 = f32x4.mul(v128.load(hq + o, 16), keep);
            let a2 = f32x4.mul(v128.load(hq + o, 32), keep);
            let a3 = f32x4.mul(v128.load(hq + o, 48), keep);
            let b0 = f32x4.mul(v128.load(hr + o), keep);
            let b1 = f32x4.mul(v128.load(hr + o, 16), keep);
            let b2 = f32x4.mul(v128.load(hr + o, 32), keep);
            let b3 = f32x4.mul(v128.load(hr + o, 48), keep);
            for (let s = 0; s < q; s++) {
              const at = xp + <usize>s * pBytes;
              const coef = f32x4.splat(load<f32>(at));
              const coef2 = f32x4.splat(load<f32>(at, 4));
              const bs = b0Row + <usize>s * rowBytes + o;
              const v0 = v128.load(bs);
              const v1 = v128.load(bs, 16);
              const v2 = v128.load(bs, 32);
              const v3 = v128.load(bs, 48);
              a0 = madd(coef, v0, a0);
              a1 = madd(coef, v1, a1);
              a2 = madd(coef, v2, a2);
              a3 = madd(coef, v3, a3);
              b0 = madd(coef2, v0, b0);
              b1 = madd(coef2, v1, b1);
              b2 = madd(coef2, v2, b2);
              b3 = madd(coef2, v3, b3);
            }
            v128.store(hq + o, a0);
            v128.store(hq + o, a1, 16);
            v128.store(hq + o, a2, 32);
            v128.store(hq + o, a3, 48);
            v128.store(hr + o, b0);
            v128.store(hr + o, b1, 16);
            v128.store(hr + o, b2, 32);
            v128.store(hr + o, b3, 48);
          }
        }
        // The states left: single rows, and the last N % 16 of the paired ones.
        for (let pr = 0; pr < P; pr++) {
          const hq = hp + <usize>pr * nBytes;
          const xp = xw + (<usize>pr << 2);
          let n = pr < p ? N & ~15 : 0;
          for (; n + 4 <= N; n += 4) {
            const o = <usize>n << 2;
            let acc = f32x4.mul(v128.load(hq + o), keep);
            for (let s = 0; s < q; s++) {
              const coef = f32x4.splat(load<f32>(xp + <usize>s * pBytes));
              acc = madd(coef, v128.load(b0Row + <usize>s * rowBytes + o), acc);
            }
            v128.store(hq + o, acc);
          }
          for (; n < N; n++) {
            const o = <usize>n << 2;
            let acc = load<f32>(hq + o) * keepS;
            for (let s = 0; s < q; s++) {
              acc += load<f32>(xp + <usize>s * pBytes) * load<f32>(b0Row + <usize>s * rowBytes + o);
            }
            store<f32>(hq + o, acc);
          }
        }
      }
    }
    u += hEnd - hStart;
  }
}

// One token of each of `batch` sequences (len 1) over units [u0, u1): the
// recurrence itself, one pass over each state row,
//   h = e^(Δ·A) · h + Δ · x ⊗ B;  y = h · C + D · x.
export function ssdStep(
  y: usize,
  xBC: usize,
  dt: usize,
  dtBias: usize,
  A: usize,
  D: usize,
  state: usize,
  slots: usize,
  H: i32,
  P: i32,
  G: i32,
  N: i32,
  dtMin: f32,
  dtMax: f32,
  u0: i32,
  u1: i32,
): void {
  const dInner = H * P;
  const rowBytes = <usize>(dInner + 2 * G * N) << 2;
  const headsPerGroup = H / G;
  for (let u = u0; u < u1; u++) {
    const b = u / H;
    const h = u - b * H;
    const g = h / headsPerGroup;
    const row = slots ? <i32>load<f32>(slots + (<usize>b << 2)) : b;
    const xRow = xBC + <usize>b * rowBytes;
    const bRow = xRow + (<usize>(dInner + g * N) << 2);
    const cRow = xRow + (<usize>(dInner + (G + g) * N) << 2);
    const delta = ssdDelta(dt + (<usize>(b * H) << 2), dtBias, h, dtMin, dtMax);
    const decay = f32x4.splat(exp1(delta * load<f32>(A + (<usize>h << 2))));
    const skip: f32 = D ? load<f32>(D + (<usize>h << 2)) : 0;
    const hp = state + ((<usize>row * <usize>H + <usize>h) * <usize>(P * N) << 2);
    const yRow = y + (<usize>(b * dInner + h * P) << 2);
    for (let p = 0; p < P; p++) {
      const xp = load<f32>(xRow + (<usize>(h * P + p) << 2));
      const dx = f32x4.splat(delta * xp);
      const hq = hp + (<usize>(p * N) << 2);
      let acc = f32x4.splat(0);
      let n = 0;
      for (; n + 4 <= N; n += 4) {
        const o = <usize>n << 2;
        const next = madd(decay, v128.load(hq + o), f32x4.mul(dx, v128.load(bRow + o)));
        v128.store(hq + o, next);
        acc = madd(next, v128.load(cRow + o), acc);
      }
      let out = hsum(acc);
      for (; n < N; n++) {
        const o = <usize>n << 2;
        const next = f32x4.extract_lane(decay, 0) * load<f32>(hq + o) + delta * xp * load<f32>(bRow + o);
        store<f32>(hq + o, next);
        out += next * load<f32>(cRow + o);
      }
      store<f32>(yRow + (<usize>p << 2), out + skip * xp);
    }
  }
}

// mamba_ssm's gated RMSNorm over rows [r0, r1): per row g = x · silu(gate),
// each group of groupSize channels scaled by 1 / sqrt(mean(g²) + eps), then
// by weight. out may alias x.
export function gatedRmsNorm(
  out: usize,
  x: usize,
  gate: usize,
  weight: usize,
  dim: i32,
  groupSize: i32,
  eps: f32,
  r0: i32,
  r1: i32,
): void {
  for (let r = r0; r < r1; r++) {
    for (let c0 = 0; c0 < dim; c0 += groupSize) {
      const at = (<usize>r * <usize>dim + <usize>c0) << 2;
      let acc = f32x4.splat(0);
      let i = 0;
      for (; i + 4 <= groupSize; i += 4) {
        const o = at + (<usize>i << 2);
        const v = f32x4.mul(v128.load(x + o), silu4(v128.load(gate + o)));
        v128.store(out + o, v);
        acc = madd(v, v, acc);
      }
      let sum = hsum(acc);
      for (; i < groupSize; i++) {
        const o = at + (<usize>i << 2);
        const v = load<f32>(x + o) * silu1(load<f32>(gate + o));
        store<f32>(out + o, v);
        sum += v * v;
      }
      const scale = <f32>(1 / Math.sqrt(<f64>sum / <f64>groupSize + <f64>eps));
      const sv = f32x4.splat(scale);
      const wRow = weight + (<usize>c0 << 2);
      i = 0;
      for (; i + 4 <= groupSize; i += 4) {
        const o = <usize>i << 2;
        v128.store(out + at + o, f32x4.mul(f32x4.mul(v128.load(out + at + o), sv), v128.load(wRow + o)));
      }
      for (; i < groupSize; i++) {
        const o = <usize>i << 2;
        store<f32>(out + at + o, load<f32>(out + at + o) * scale * load<f32>(wRow + o));
      }
    }
  }
}

// --------------------------------------------------------- thread jobs ----

// A job for the worker threads, written by src/backends/wasm.ts into a control
// block of i32 words at `ctrl`: [0] generation, [1] done count, [2] op,
// [3..] arguments. Each of `parts` threads runs part `part`.
const OP_LINEAR = 1;
const OP_SCAN = 2;
const OP_SCAN_STEP = 3;
const OP_SSD = 4;
const OP_SSD_STEP = 5;
const OP_GATED_NORM = 6;
const OP_LINEAR_BLOCKS = 7;
const OP_LINEAR_HALF = 8;
const OP_CONV = 9;

// @ts-ignore: decorator
@inline
function arg(ctrl: usize, i: i32): i32 {
  return load<i32>(ctrl + (<usize> (3 + i) << 2));
}

// Threads' pieces of a per-thread scratch buffer start threadStride(bytes)
// apart: the bytes each needs, rounded up to 64 KiB. Laid back to back, one
// thread's last lines next to the next one's first, the two-thread prefill
// scan measured 9-16% slower (docs/performance.md).
export function threadStride(bytes: i32): i32 {
  return (bytes + 0xffff) & ~0xffff;
}

// The address of thread `part`'s piece of the scratch buffer at `base`.
// @ts-ignore: decorator
@inline
function partScratch(base: i32, part: i32, bytes: i32): i32 {
  return base + part * threadStride(bytes);
}

// The range of part `part` of `parts` over [0, n), in multiples of `align`.
// @ts-ignore: decorator
@inline
function splitStart(n: i32, part: i32, parts: i32, align: i32): i32 {
  const units = (n + align - 1) / align;
  return min(n, <i32> ((<i64> units * part) / parts) * align);
}

// Part `part` of the f32 matmul of OP_LINEAR (arguments out, x, w, bias,
// rows, inDim, outDim, panel scratch of panelBytes per thread). The work is
// split into units of one panel over a slice of the rows, panel by panel, so
// that each thread packs each of its panels once; rows are sliced only as
// much as it takes to give every thread about four units (x_proj's 80
// columns are ten panels: on 16 threads each would else get one or none).
function linearPart(ctrl: usize, rows: i32, outDim: i32, part: i32, parts: i32): void {
  const inDim = arg(ctrl, 5);
  const panels = (outDim + PANEL_COLS - 1) / PANEL_COLS;
  const tiles = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
  const slices = max(1, min(tiles, (4 * parts + panels - 1) / panels));
  const u0 = splitStart(panels * slices, part, parts, 1);
  const u1 = splitStart(panels * slices, part + 1, parts, 1);
  const panel = <usize> partScratch(arg(ctrl, 7), part, panelBytes(inDim));
  for (let u = u0; u < u1;) {
    const p = u / slices;
    const end = min(u1, (p + 1) * slices);
    const s0 = u - p * slices;
    const s1 = end - p * slices;
    matmul(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      inDim,
      outDim,
      p * PANEL_COLS,
      min(outDim, (p + 1) * PANEL_COLS),
      min(rows, splitStart(tiles, s0, slices, 1) * PANEL_ROWS),
      min(rows, splitStart(tiles, s1, slices, 1) * PANEL_ROWS),
      panel,
    );
    u = end;
  }
}

export function runJob(ctrl: usize, part: i32, parts: i32): void {
  const op = load<i32>(ctrl, 8);
  if (op == OP_LINEAR) {
    const rows = arg(ctrl, 4);
    const outDim = arg(ctrl, 6);
    if (rows == 1) {
      gemv(
        arg(ctrl, 0),
        arg(ctrl, 1),
        arg(ctrl, 2),
        arg(ctrl, 3),
        arg(ctrl, 5),
        splitStart(outDim, part, parts, 4),
        splitStart(outDim, part + 1, parts, 4),
      );
    } else if (rows <= SMALL_BATCH) {
      smallMatmul(
        arg(ctrl, 0),
        arg(ctrl, 1),
        arg(ctrl, 2),
        arg(ctrl, 3),
        rows,
        arg(ctrl, 5),
        outDim,
        splitStart(outDim, part, parts, 4),
        splitStart(outDim, part + 1, parts, 4),
      );
    } else {
      linearPart(ctrl, rows, outDim, part, parts);
    }
  } else if (op == OP_LINEAR_BLOCKS) {
    const outDim = arg(ctrl, 6);
    const align = arg(ctrl, 4) > 1 ? OB : 4;
    linearBlocks(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      outDim,
      splitStart(outDim, part, parts, align),
      splitStart(outDim, part + 1, parts, align),
      partScratch(arg(ctrl, 7), part, blocksScratchBytes(arg(ctrl, 4), arg(ctrl, 5))),
      arg(ctrl, 8),
    );
  } else if (op == OP_LINEAR_HALF) {
    const outDim = arg(ctrl, 6);
    const align = arg(ctrl, 4) > 1 ? OB : 4;
    linearHalf(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      outDim,
      splitStart(outDim, part, parts, align),
      splitStart(outDim, part + 1, parts, align),
      partScratch(arg(ctrl, 7), part, halfScratchBytes(arg(ctrl, 5))),
      arg(ctrl, 8),
    );
  } else if (op == OP_CONV) {
    const channels = arg(ctrl, 6);
    const kernel = arg(ctrl, 7);
    causalConv(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      channels,
      kernel,
      partScratch(arg(ctrl, 8), part, convScratchBytes(kernel)),
      splitStart(channels, part, parts, 16),
      splitStart(channels, part + 1, parts, 16),
    );
  } else if (op == OP_SCAN) {
    const dim = arg(ctrl, 12);
    scan(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      dim,
      arg(ctrl, 13),
      arg(ctrl, 14),
      arg(ctrl, 15),
      splitStart(dim, part, parts, 4),
      splitStart(dim, part + 1, parts, 4),
      partScratch(arg(ctrl, 16), part, scanScratchBytes(arg(ctrl, 13))),
    );
  } else if (op == OP_SCAN_STEP) {
    const units = arg(ctrl, 12) * arg(ctrl, 13);
    scanStep(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      arg(ctrl, 12),
      arg(ctrl, 13),
      arg(ctrl, 14),
      splitStart(units, part, parts, 4),
      splitStart(units, part + 1, parts, 4),
    );
  } else if (op == OP_SSD) {
    const units = arg(ctrl, 16);
    ssd(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      arg(ctrl, 12),
      arg(ctrl, 13),
      reinterpret<f32>(arg(ctrl, 14)),
      reinterpret<f32>(arg(ctrl, 15)),
      splitStart(units, part, parts, 1),
      splitStart(units, part + 1, parts, 1),
      partScratch(arg(ctrl, 17), part, ssdScratchBytes(arg(ctrl, 13), arg(ctrl, 10))),
    );
  } else if (op == OP_SSD_STEP) {
    const units = arg(ctrl, 14);
    ssdStep(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      reinterpret<f32>(arg(ctrl, 12)),
      reinterpret<f32>(arg(ctrl, 13)),
      splitStart(units, part, parts, 1),
      splitStart(units, part + 1, parts, 1),
    );
  } else if (op == OP_GATED_NORM) {
    const rows = arg(ctrl, 7);
    gatedRmsNorm(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      reinterpret<f32>(arg(ctrl, 6)),
      splitStart(rows, part, parts, 1),
      splitStart(rows, part + 1, parts, 1),
    );
  }
}

// The first byte past the module's own static data: the allocator starts here.
export function heapBase(): usize {
  return __heap_base;
}
