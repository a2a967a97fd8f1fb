// The selective scan of scan.wgsl in double-float arithmetic, for results
// within 1e-4 of a float64 reference (mamba_ssm's selective_scan_ref run in
// float64; f32 alone gives up to 2e-3 there, see the backend's scanPrecision).
//
//   dt   = softplus(delta + deltaBias)              (each optional)
//   h    = exp(dt·A)·h + dt·u·B[t]                  per state n
//   y    = (C[t]·h + D·u) · silu(z)                 (D and z optional)
//
// Every intermediate is a pair (hi, lo) of f32s, a vec2, whose sum carries
// about 44 significant bits: Dekker's and Knuth's error-free transformations
// for sums and products, exp by argument reduction and a Taylor series,
// softplus by one Newton step from the f32 value. Inputs and outputs are f32.
//
// Layouts as scan.wgsl: u, delta, z, y [batch, len, dim]; B, C [batch, len,
// nState]; A [dim, nState]; state [rows, dim, nState] (sequence b's in row
// slots[b] with flag 32, else row b), read as the start state and written
// with the last one. One thread per (sequence, channel),
// the states' hi halves in `state` and their lo halves in `stateLo` while it
// runs: a reference mode, not a fast one.
struct Params {
  len: u32,
  dim: u32,
  batch: u32,
  flags: u32, // 1: D, 2: z, 4: deltaBias, 8: softplus, 32: slots
  nState: u32,
  // The tokens of this dispatch: start … start + count - 1. A long scan takes
  // several dispatches (llvmpipe ends an invocation's loops after 65,535
  // iterations in all); the states' lo halves carry over in stateLo.
  start: u32,
  count: u32,
  // Always 0, but the compiler cannot know it: see `exact`.
  zero: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read> delta: array<f32>;
@group(0) @binding(3) var<storage, read> A: array<f32>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read> C: array<f32>;
@group(0) @binding(6) var<storage, read> D: array<f32>;
@group(0) @binding(7) var<storage, read> z: array<f32>;
@group(0) @binding(8) var<storage, read> deltaBias: array<f32>;
@group(0) @binding(9) var<storage, read_write> y: array<f32>;
@group(0) @binding(10) var<storage, read_write> state: array<f32>;
@group(0) @binding(11) var<storage, read_write> stateLo: array<f32>;
@group(0) @binding(12) var<storage, read> slots: array<f32>;

// A value the compiler cannot see through. Shader compilers may reassociate
// f32 arithmetic (llvmpipe turns the error term of a two-sum into 0); passing
// every rounded intermediate through here keeps each operation as written.
fn exact(x: f32) -> f32 {
  return bitcast<f32>(bitcast<u32>(x) ^ params.zero);
}

// a + b exactly, as (rounded sum, its rounding error) (Knuth).
fn two_sum(a: f32, b: f32) -> vec2<f32> {
  let s = exact(a + b);
  let bPart = exact(s - a);
  let error = exact(exact(a - exact(s - bPart)) + exact(b - bPart));
  return vec2(s, error);
}

// a + b exactly where |a| ≥ |b| (Dekker).
fn quick_two_sum(a: f32, b: f32) -> vec2<f32> {
  let s = exact(a + b);
  return vec2(s, exact(b - exact(s - a)));
}

// a as hi + lo with 12 significant bits each, so that their products are exact.
fn split(a: f32) -> vec2<f32> {
  let scaled = exact(4097.0 * a);
  let hi = exact(scaled - exact(scaled - a));
  return vec2(hi, exact(a - hi));
}

// a · b exactly, as (rounded product, its rounding error) (Dekker; WGSL's fma
// need not be fused, and is not on llvmpipe).
fn two_prod(a: f32, b: f32) -> vec2<f32> {
  let p = exact(a * b);
  let x = split(a);
  let w = split(b);
  let error = exact(exact(exact(exact(x.x * w.x) - p) + exact(x.x * w.y)) + exact(x.y * w.x));
  return vec2(p, exact(error + exact(x.y * w.y)));
}

fn df_add(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
  var s = two_sum(a.x, b.x);
  let t = two_sum(a.y, b.y);
  s = quick_two_sum(s.x, exact(s.y + t.x));
  return quick_two_sum(s.x, exact(s.y + t.y));
}

fn df_sub(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
  return df_add(a, -b);
}

fn df_mul(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
  let p = two_prod(a.x, b.x);
  let cross = exact(exact(a.x * b.y) + exact(a.y * b.x));
  return quick_two_sum(p.x, exact(p.y + cross));
}

fn df_mul_f(a: vec2<f32>, b: f32) -> vec2<f32> {
  let p = two_prod(a.x, b);
  return quick_two_sum(p.x, exact(p.y + exact(a.y * b)));
}

// a / b: the f32 quotient corrected by one step on the exact remainder.
fn df_div(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
  let q = exact(a.x / b.x);
  let remainder = df_sub(a, df_mul_f(b, q));
  return quick_two_sum(q, exact(remainder.x / b.x));
}

const LN2 = vec2(0x1.62e43p-1f, -0x1.05c61p-29f);

// e^a: a = k·ln2 + r, e^r = (e^(r/16))^16 with a Taylor series of e^(r/16)
// (|r/16| < 0.022: seven terms leave an error below 2e-18). Written out
// without loops, which would count towards llvmpipe's limit (see `start`).
fn df_exp(a: vec2<f32>) -> vec2<f32> {
  if (a.x < -104.0) {
    return vec2(0.0); // below the smallest f32
  }
  let k = round(a.x * 1.442695);
  let r = df_sub(a, df_mul_f(LN2, k));
  let s = r * (1.0 / 16.0); // exact: a power of two
  // 1 + s(1 + s/2(1 + s/3(… (1 + s/7)))), from the inside out.
  var e = taylor_step(s, vec2(1.0, 0.0), 7.0);
  e = taylor_step(s, e, 6.0);
  e = taylor_step(s, e, 5.0);
  e = taylor_step(s, e, 4.0);
  e = taylor_step(s, e, 3.0);
  e = taylor_step(s, e, 2.0);
  e = taylor_step(s, e, 1.0);
  e = df_mul(e, e);
  e = df_mul(e, e);
  e = df_mul(e, e);
  e = df_mul(e, e);
  return vec2(ldexp(e.x, i32(k)), ldexp(e.y, i32(k)));
}

// 1 + s·inner/i.
fn taylor_step(s: vec2<f32>, inner: vec2<f32>, i: f32) -> vec2<f32> {
  return df_add(vec2(1.0, 0.0), df_div(df_mul(s, inner), vec2(i, 0.0)));
}

// softplus(x) = ln(1 + e^x) as PyTorch takes it (x itself above 20): from the
// f32 value s0, one Newton step on e^s = 1 + e^x, s = s0 + (1 + e^x)·e^-s0 - 1,
// squares s0's error.
fn df_softplus(x: vec2<f32>) -> vec2<f32> {
  if (x.x > 20.0) {
    return x;
  }
  let s0 = log(1.0 + exp(x.x));
  let ratio = df_mul(df_add(vec2(1.0, 0.0), df_exp(x)), df_exp(vec2(-s0, 0.0)));
  return df_add(vec2(s0, 0.0), df_sub(ratio, vec2(1.0, 0.0)));
}

// silu(v) = v / (1 + e^-v); below -88 it is within 1e-36 of 0.
fn df_silu(v: f32) -> vec2<f32> {
  if (v < -88.0) {
    return vec2(0.0);
  }
  return df_div(vec2(v, 0.0), df_add(vec2(1.0, 0.0), df_exp(vec2(-v, 0.0))));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let d = gid.x;
  let b = gid.z;
  let dim = params.dim;
  let len = params.len;
  let nState = params.nState;
  if (d >= dim) {
    return;
  }
  let states = (b * dim + d) * nState; // of stateLo
  var row = b;
  if ((params.flags & 32u) != 0u) {
    row = u32(slots[b]);
  }
  let held = (row * dim + d) * nState; // of state
  if (params.start == 0u) {
    for (var n = 0u; n < nState; n++) {
      stateLo[states + n] = 0.0;
    }
  }
  for (var t = params.start; t < params.start + params.count; t++) {
    let i = (b * len + t) * dim + d;
    var dt = vec2(delta[i], 0.0);
    if ((params.flags & 4u) != 0u) {
      dt = two_sum(delta[i], deltaBias[d]);
    }
    if ((params.flags & 8u) != 0u) {
      dt = df_softplus(dt);
    }
    let dtu = df_mul_f(dt, u[i]);
    let token = (b * len + t) * nState;
    var out = vec2(0.0);
    for (var n = 0u; n < nState; n++) {
      let decay = df_exp(df_mul_f(dt, A[d * nState + n]));
      let h = df_add(
        df_mul(decay, vec2(state[held + n], stateLo[states + n])),
        df_mul_f(dtu, B[token + n]),
      );
      state[held + n] = h.x;
      stateLo[states + n] = h.y;
      out = df_add(out, df_mul_f(h, C[token + n]));
    }
    if ((params.flags & 1u) != 0u) {
      out = df_add(out, two_prod(D[d], u[i]));
    }
    if ((params.flags & 2u) != 0u) {
      out = df_mul(out, df_silu(z[i]));
    }
    y[i] = out.x + out.y;
  }
}
