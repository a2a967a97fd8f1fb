// Mamba-2's SSD scan (SsdArgs of src/backend.ts): per head h of group g, token t,
//   Δ = clamp(softplus(dt + dtBias[h]), dtMin, dtMax)
//   h = exp(Δ·A[h])·h + Δ·x[t, h, :] ⊗ B[t, g, :];   y[t, h, :] = h·C[t, g, :] + D[h]·x[t, h, :]
//
// Layouts: xBC [batch, len, W] with W = heads·headDim + 2·groups·dState, each
// token's x [heads, headDim], then B [groups, dState], then C [groups, dState];
// dt [batch, len, heads]; y [batch, len, heads·headDim]; state [rows,
// heads, headDim, dState], sequence b's in row slots[b] with flag 2, else row b.
//
// A prompt runs in the chunked ("SSD") form, three passes over chunks of
// CHUNK tokens (over segments of a long prompt in turn, which bounds the
// chunk states kept), with cs_t = Σ_{s<=t} Δ_s·A the log decay within a chunk:
//   chunk_state  per (chunk, head, sequence): the chunk's own state
//                S = Σ_s exp(cs_last - cs_s)·Δ_s · x_s ⊗ B_s, and cs and Δ;
//   carry        per state element: the inter-chunk recurrence, chunk by
//                chunk h_in(c) = h; h = exp(cs_last(c))·h + S(c), leaving each
//                chunk's incoming state in place of S and the last in the pool;
//   output       per (chunk, head, sequence): the decay-masked C·Bᵀ of the
//                chunk (a CHUNK × CHUNK tile in workgroup memory) times the
//                chunk's x (staged PT channels at a time), plus exp(cs_t)·C_t·h_in,
//                plus D·x.
// A decode step (len 1) is `step`: the recurrence itself, STEP_LANES threads per channel.

const CHUNK: u32 = 32u;
const WG: u32 = 256u;
const PT: u32 = 64u; // channels of x staged at a time by `output`
const STEP_WG: u32 = 256u;
const STEP_LANES: u32 = 16u; // threads per channel in `step`

struct Params {
  len: u32, // tokens of this call per sequence (a segment of them for the chunked passes)
  batch: u32,
  heads: u32,
  headDim: u32,
  groups: u32,
  dState: u32,
  nChunks: u32,
  flags: u32, // 1: D, 2: slots
  seqLen: u32, // tokens per sequence in xBC, dt and y
  start: u32, // the segment's first token in each sequence
  dtMin: f32,
  dtMax: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xBC: array<f32>;
@group(0) @binding(2) var<storage, read> dt: array<f32>;
@group(0) @binding(3) var<storage, read> dtBias: array<f32>;
@group(0) @binding(4) var<storage, read> A: array<f32>;
@group(0) @binding(5) var<storage, read> Dv: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;
@group(0) @binding(8) var<storage, read_write> state: array<f32>;
// [batch, nChunks, heads, headDim, dState]: each chunk's own state, then its incoming one.
@group(0) @binding(9) var<storage, read_write> chunkStates: array<f32>;
// [batch, heads, len]: cs and Δ of each token.
@group(0) @binding(10) var<storage, read_write> cs: array<f32>;
@group(0) @binding(11) var<storage, read_write> dl: array<f32>;

var<workgroup> csTile: array<f32, CHUNK>;
var<workgroup> weights: array<f32, CHUNK>;
var<workgroup> masked: array<f32, CHUNK * CHUNK>;
var<workgroup> xTile: array<f32, CHUNK * PT>;
var<workgroup> lanes: array<f32, STEP_WG>;

fn softplus(v: f32) -> f32 {
  if (v > 20.0) {
    return v;
  }
  if (v < -15.0) {
    return exp(v);
  }
  return log(1.0 + exp(v));
}

fn width() -> u32 {
  return p.heads * p.headDim + 2u * p.groups * p.dState;
}

// Δ of head h at token row `row` (of all batch·len).
fn delta(row: u32, h: u32) -> f32 {
  return clamp(softplus(dt[row * p.heads + h] + dtBias[h]), p.dtMin, p.dtMax);
}

fn stateRow(b: u32) -> u32 {
  if ((p.flags & 2u) != 0u) {
    return u32(slots[b]);
  }
  return b;
}

@compute @workgroup_size(WG)
fn chunk_state(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let h = wg.y;
  let b = wg.z;
  let t0 = c * CHUNK;
  let q = min(CHUNK, p.len - t0);
  let W = width();
  let P = p.headDim;
  let N = p.dState;
  let g = h / (p.heads / p.groups);
  if (li == 0u) {
    // The cumulative sum is sequential and short: one thread.
    var cum = 0.0;
    for (var s = 0u; s < q; s++) {
      let d = delta(b * p.seqLen + p.start + t0 + s, h);
      cum += d * A[h];
      csTile[s] = cum;
      weights[s] = d;
      let at = (b * p.heads + h) * p.len + t0 + s;
      cs[at] = cum;
      dl[at] = d;
    }
  }
  workgroupBarrier();
  let last = csTile[q - 1u];
  if (li < q) {
    weights[li] = exp(last - csTile[li]) * weights[li];
  }
  workgroupBarrier();
  let bCol = p.heads * P + g * N;
  let base = ((b * p.nChunks + c) * p.heads + h) * P * N;
  for (var e = li; e < P * N; e += WG) {
    let pc = e / N;
    let n = e % N;
    var acc = 0.0;
    for (var s = 0u; s < q; s++) {
      let row = (b * p.seqLen + p.start + t0 + s) * W;
      acc += weights[s] * xBC[row + h * P + pc] * xBC[row + bCol + n];
    }
    chunkStates[base + e] = acc;
  }
}

@compute @workgroup_size(WG)
fn carry(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * WG + li;
  let perHead = p.headDim * p.dState;
  let perSequence = p.heads * perHead;
  if (i >= p.batch * perSequence) {
    return;
  }
  let b = i / perSequence;
  let e = i % perSequence;
  let h = e / perHead;
  let at = stateRow(b) * perSequence + e;
  var hv = state[at];
  for (var c = 0u; c < p.nChunks; c++) {
    let k = ((b * p.nChunks + c) * p.heads + h) * perHead + e % perHead;
    let own = chunkStates[k];
    chunkStates[k] = hv;
    let lastT = min((c + 1u) * CHUNK, p.len) - 1u;
    hv = exp(cs[(b * p.heads + h) * p.len + lastT]) * hv + own;
  }
  state[at] = hv;
}

@compute @workgroup_size(WG)
fn output(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let h = wg.y;
  let b = wg.z;
  let t0 = c * CHUNK;
  let q = min(CHUNK, p.len - t0);
  let W = width();
  let P = p.headDim;
  let N = p.dState;
  let g = h / (p.heads / p.groups);
  let bCol = p.heads * P + g * N;
  let cCol = p.heads * P + (p.groups + g) * N;
  let first = b * p.seqLen + p.start + t0; // the chunk's first token row
  let decayAt = (b * p.heads + h) * p.len + t0;
  if (li < q) {
    csTile[li] = cs[decayAt + li];
    weights[li] = dl[decayAt + li];
  }
  workgroupBarrier();
  // The decay-masked C·Bᵀ: masked[t][s] = C_t·B_s · exp(cs_t - cs_s) · Δ_s for s <= t.
  for (var e = li; e < q * q; e += WG) {
    let t = e / q;
    let s = e % q;
    var m = 0.0;
    if (s <= t) {
      let ct = (first + t) * W + cCol;
      let bs = (first + s) * W + bCol;
      var cb = 0.0;
      for (var n = 0u; n < N; n++) {
        cb += xBC[ct + n] * xBC[bs + n];
      }
      m = cb * exp(csTile[t] - csTile[s]) * weights[s];
    }
    masked[t * CHUNK + s] = m;
  }
  let incoming = ((b * p.nChunks + c) * p.heads + h) * P * N;
  var skip = 0.0;
  if ((p.flags & 1u) != 0u) {
    skip = Dv[h];
  }
  for (var p0 = 0u; p0 < P; p0 += PT) {
    workgroupBarrier();
    for (var e = li; e < q * PT; e += WG) {
      let t = e / PT;
      let pp = e % PT;
      if (p0 + pp < P) {
        xTile[t * PT + pp] = xBC[(first + t) * W + h * P + p0 + pp];
      }
    }
    workgroupBarrier();
    for (var e = li; e < q * PT; e += WG) {
      let t = e / PT;
      let pp = e % PT;
      let pc = p0 + pp;
      if (pc < P) {
        var acc = 0.0;
        for (var s = 0u; s <= t; s++) {
          acc += masked[t * CHUNK + s] * xTile[s * PT + pp];
        }
        let ct = (first + t) * W + cCol;
        var carried = 0.0;
        for (var n = 0u; n < N; n++) {
          carried += xBC[ct + n] * chunkStates[incoming + pc * N + n];
        }
        acc += exp(csTile[t]) * carried + skip * xTile[t * PT + pp];
        y[(first + t) * (p.heads * P) + h * P + pc] = acc;
      }
    }
  }
}

// One token per sequence: STEP_LANES threads per channel (b, h, p), lane l
// taking states l, l + STEP_LANES, ..., so that a warp's loads of a state row
// are contiguous; the lanes' parts of h·C are summed in workgroup memory.
@compute @workgroup_size(STEP_WG)
fn step(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let P = p.headDim;
  let N = p.dState;
  let inner = p.heads * P;
  let lane = li % STEP_LANES;
  let i = (wg.y * nwg.x + wg.x) * (STEP_WG / STEP_LANES) + li / STEP_LANES;
  let valid = i < p.batch * inner;
  var acc = 0.0;
  var xv = 0.0;
  if (valid) {
    let b = i / inner;
    let channel = i % inner; // h·P + p
    let h = channel / P;
    let g = h / (p.heads / p.groups);
    let row = b * width();
    let d = delta(b, h);
    let decay = exp(d * A[h]);
    xv = xBC[row + channel];
    let base = (stateRow(b) * inner + channel) * N;
    let bCol = row + inner + g * N;
    let cCol = row + inner + (p.groups + g) * N;
    for (var n = lane; n < N; n += STEP_LANES) {
      let hv = decay * state[base + n] + d * xv * xBC[bCol + n];
      state[base + n] = hv;
      acc += hv * xBC[cCol + n];
    }
  }
  lanes[li] = acc;
  workgroupBarrier();
  for (var stride = STEP_LANES / 2u; stride > 0u; stride >>= 1u) {
    if (lane < stride) {
      lanes[li] += lanes[li + stride];
    }
    workgroupBarrier();
  }
  if (valid && lane == 0u) {
    var out = lanes[li];
    if ((p.flags & 1u) != 0u) {
      out += Dv[(i % inner) / P] * xv;
    }
    y[i] = out;
  }
}
