// Mamba-2's SSD (a prompt in chunks, a decode step) and its gated RMSNorm.
// asm/kernels.ts says what every kernel assumes.

import { exp1, exp4, hsum, madd, silu1, silu4, softplus4 } from "./math";

// Mamba-2's SSD (SsdArgs in src/backend.ts). Buffers: xBC [rows, W] with W =
// H·P + 2·G·N, each token's x [H, P], then B [G, N], then C [G, N]; dt [rows,
// H]; y [rows, H·P]; states [slots, H, P, N]. Work is split over units (b, h),
// sequence b's head h at b·H + h; a thread's units are consecutive.

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
