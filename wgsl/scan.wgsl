// Fused selective scan (Mamba-1 S6), token-major, for `batch` sequences:
//
//   dt   = softplus(delta + deltaBias)              (each optional)
//   h    = exp(dt·A)·h + dt·u·B[t]                  per state n, h in registers
//   y    = (C[t]·h + D·u) · silu(z)                 (D and z optional)
//
// Layouts: u, delta, z, y [batch, len, dim]; B, C [batch, len, N]; A [dim, N];
// state [batch, dim, N]. One thread per channel; B and C are staged per tile of
// TT tokens in workgroup memory, u, delta and z prefetched into registers.
//
// A long sequence is cut into nChunks chunks of chunkLen tokens so that even one
// sequence fills the GPU:
// - `chunk_state` (chunks 0..nChunks-2): each chunk's end state from a zero start
//   and its Σdt (the chunk's total decay is exp(A·Σdt));
// - `carry`: one thread per (sequence, channel, n) walks the chunks, turning hbuf
//   into each chunk's start state;
// - `output`: every chunk again from its start state, writing y and (last chunk)
//   the final state. With one chunk only `output` runs, starting from `state`.
//
// DSTATE (N), WG and TT are specialised per pipeline by the backend.
struct Params {
  len: u32,
  dim: u32,
  batch: u32,
  chunkLen: u32,
  nChunks: u32,
  flags: u32, // 1: D, 2: z, 4: deltaBias, 8: softplus
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read> delta: array<f32>;
@group(0) @binding(3) var<storage, read> A: array<f32>;
@group(0) @binding(4) var<storage, read> Bm: array<f32>;
@group(0) @binding(5) var<storage, read> Cm: array<f32>;
@group(0) @binding(6) var<storage, read> Dv: array<f32>;
@group(0) @binding(7) var<storage, read> z: array<f32>;
@group(0) @binding(8) var<storage, read> deltaBias: array<f32>;
@group(0) @binding(9) var<storage, read_write> y: array<f32>;
@group(0) @binding(10) var<storage, read_write> state: array<f32>;
@group(0) @binding(11) var<storage, read_write> hbuf: array<f32>; // [batch, nChunks, dim, N]
@group(0) @binding(12) var<storage, read_write> dtsum: array<f32>; // [batch, nChunks, dim]

const DSTATE: u32 = 16u;
const WG: u32 = 128u;
const TT: u32 = 16u;
const LOG2E: f32 = 1.4426950408889634;

var<workgroup> sB: array<f32, TT * DSTATE>;
var<workgroup> sC: array<f32, TT * DSTATE>;

fn softplus(v: f32) -> f32 {
  if (v > 20.0) {
    return v;
  }
  if (v < -15.0) {
    return exp(v);
  }
  return log(1.0 + exp(v));
}

fn stepSize(raw: f32, d: u32) -> f32 {
  var v = raw;
  if ((p.flags & 4u) != 0u) {
    v += deltaBias[d];
  }
  if ((p.flags & 8u) != 0u) {
    v = softplus(v);
  }
  return v;
}

@compute @workgroup_size(WG)
fn chunk_state(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let d = wg.x * WG + li;
  let c = wg.y;
  let b = wg.z;
  let inRange = d < p.dim;
  let dd = min(d, p.dim - 1u);
  let t0 = c * p.chunkLen;
  let t1 = min(t0 + p.chunkLen, p.len);
  let seq = b * p.len;
  var a2: array<f32, DSTATE>;
  var h: array<f32, DSTATE>;
  for (var n = 0u; n < DSTATE; n++) {
    a2[n] = A[dd * DSTATE + n] * LOG2E;
    h[n] = 0.0;
  }
  var dsum = 0.0;
  for (var tt = t0; tt < t1; tt += TT) {
    let count = min(TT, t1 - tt);
    for (var e = li; e < count * DSTATE; e += WG) {
      sB[e] = Bm[(seq + tt) * DSTATE + e];
    }
    var ut: array<f32, TT>;
    var dtt: array<f32, TT>;
    for (var k = 0u; k < TT; k++) {
      if (k < count) {
        let i = (seq + tt + k) * p.dim + dd;
        ut[k] = u[i];
        dtt[k] = delta[i];
      }
    }
    workgroupBarrier();
    for (var k = 0u; k < TT; k++) {
      if (k < count) {
        let dt = stepSize(dtt[k], dd);
        dsum += dt;
        let du = dt * ut[k];
        for (var n = 0u; n < DSTATE; n++) {
          h[n] = fma(exp2(dt * a2[n]), h[n], du * sB[k * DSTATE + n]);
        }
      }
    }
    workgroupBarrier();
  }
  if (inRange) {
    let base = ((b * p.nChunks + c) * p.dim + d);
    for (var n = 0u; n < DSTATE; n++) {
      hbuf[base * DSTATE + n] = h[n];
    }
    dtsum[base] = dsum;
  }
}

@compute @workgroup_size(256)
fn carry(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let g = (wg.y * nwg.x + wg.x) * 256u + li;
  if (g >= p.batch * p.dim * DSTATE) {
    return;
  }
  let n = g % DSTATE;
  let bd = g / DSTATE;
  let d = bd % p.dim;
  let b = bd / p.dim;
  let a2 = A[d * DSTATE + n] * LOG2E;
  var h = state[g];
  for (var c = 0u; c < p.nChunks; c++) {
    let base = (b * p.nChunks + c) * p.dim + d;
    let idx = base * DSTATE + n;
    if (c + 1u < p.nChunks) {
      let end = hbuf[idx];
      hbuf[idx] = h;
      h = fma(exp2(a2 * dtsum[base]), h, end);
    } else {
      hbuf[idx] = h;
    }
  }
}

@compute @workgroup_size(WG)
fn output(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let d = wg.x * WG + li;
  let c = wg.y;
  let b = wg.z;
  let inRange = d < p.dim;
  let dd = min(d, p.dim - 1u);
  let t0 = c * p.chunkLen;
  let t1 = min(t0 + p.chunkLen, p.len);
  let seq = b * p.len;
  let hasD = (p.flags & 1u) != 0u;
  let hasZ = (p.flags & 2u) != 0u;
  var a2: array<f32, DSTATE>;
  var h: array<f32, DSTATE>;
  let sBase = (b * p.dim + dd) * DSTATE;
  let hBase = ((b * p.nChunks + c) * p.dim + dd) * DSTATE;
  for (var n = 0u; n < DSTATE; n++) {
    a2[n] = A[dd * DSTATE + n] * LOG2E;
    if (p.nChunks == 1u) {
      h[n] = state[sBase + n];
    } else {
      h[n] = hbuf[hBase + n];
    }
  }
  var skip = 0.0;
  if (hasD) {
    skip = Dv[dd];
  }
  for (var tt = t0; tt < t1; tt += TT) {
    let count = min(TT, t1 - tt);
    for (var e = li; e < count * DSTATE; e += WG) {
      sB[e] = Bm[(seq + tt) * DSTATE + e];
      sC[e] = Cm[(seq + tt) * DSTATE + e];
    }
    var ut: array<f32, TT>;
    var dtt: array<f32, TT>;
    var zt: array<f32, TT>;
    for (var k = 0u; k < TT; k++) {
      if (k < count) {
        let i = (seq + tt + k) * p.dim + dd;
        ut[k] = u[i];
        dtt[k] = delta[i];
        if (hasZ) {
          zt[k] = z[i];
        }
      }
    }
    workgroupBarrier();
    for (var k = 0u; k < TT; k++) {
      if (k < count) {
        let dt = stepSize(dtt[k], dd);
        let du = dt * ut[k];
        var acc = 0.0;
        for (var n = 0u; n < DSTATE; n++) {
          h[n] = fma(exp2(dt * a2[n]), h[n], du * sB[k * DSTATE + n]);
          acc = fma(h[n], sC[k * DSTATE + n], acc);
        }
        acc = fma(skip, ut[k], acc);
        if (hasZ) {
          acc *= zt[k] / (1.0 + exp(-zt[k]));
        }
        if (inRange) {
          y[(seq + tt + k) * p.dim + d] = acc;
        }
      }
    }
    workgroupBarrier();
  }
  if (inRange && c + 1u == p.nChunks) {
    for (var n = 0u; n < DSTATE; n++) {
      state[sBase + n] = h[n];
    }
  }
}
