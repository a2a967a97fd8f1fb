// Mamba-2's SSD scan (SsdArgs of src/backend.ts): per head h of group g, token t,
//   Δ = clamp(softplus(dt + dtBias[h]), dtMin, dtMax)
//   h = exp(Δ·A[h])·h + Δ·x[t, h, :] ⊗ B[t, g, :];   y[t, h, :] = h·C[t, g, :] + D[h]·x[t, h, :]
//
// Layouts: xBC [batch, len, W] with W = heads·headDim + 2·groups·dState, each
// token's x [heads, headDim], then B [groups, dState], then C [groups, dState];
// dt [batch, len, heads]; y [batch, len, heads·headDim]; state [rows,
// heads, headDim, dState], sequence b's in row slots[b] with flag 2, else row b.
//
// A prompt runs in the chunked ("SSD") form over chunks of CHUNK tokens (over
// segments of a long prompt in turn, which bounds the chunk states kept),
// with cs_t = Σ_{s<=t} Δ_s·A the log decay within a chunk, in five passes:
//   decay        per (sequence, head, chunk), a thread per token: Δ and cs;
//   chunk_cb     per (chunk, group, 64 × 64 tile): C·Bᵀ of the chunk, shared by
//                the group's heads;
//   chunk_state  per (chunk, head, 64 × 128 tile of the state): the chunk's own
//                state S = Σ_s exp(cs_last - cs_s)·Δ_s · x_s ⊗ B_s;
//   carry        per state element: the inter-chunk recurrence, chunk by
//                chunk h_in(c) = h; h = exp(cs_last(c))·h + S(c), leaving each
//                chunk's incoming state in place of S and the last in the pool;
//   output       per (chunk, head, 64 tokens × 64 channels): the decay-masked
//                C·Bᵀ times the chunk's x, plus exp(cs_t)·C_t·h_in, plus D·x.
// chunk_cb, chunk_state and output are products tiled in workgroup memory:
// slices of KS along the summed dimension, each thread a 4 × 4 (4 × 8 for the
// state) block of the tile in module-scope vec4s, read as vec4s, the KS steps
// of a slice written out (a loop that the driver does not unroll, or an array
// indexed in one, costs local memory and loop overhead: see matmul.wgsl).
// Slices staged k-fastest (coalesced along the summed dimension in xBC) use
// rows of ROW = 17 vec4s, so that the stores of a warp spread over the banks.
// A decode step (len 1) is `step`: the recurrence itself, STEP_LANES threads per channel;
// `step_vec4` where dState, heads·headDim and xBC's rows are whole vec4s.

const CHUNK: u32 = 64u; // tokens per chunk: a multiple of KS
const KS: u32 = 16u; // the summed dimension's slice staged at a time (the steps of *Slice)
const ROW: u32 = 17u; // vec4s per staged row of 64 values: 16, and one of padding
const WG: u32 = 256u;
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
// [batch, nChunks, groups, CHUNK, CHUNK]: C_t·B_s of each chunk, for s <= t.
@group(0) @binding(12) var<storage, read_write> cb: array<f32>;
// step_vec4's views of xBC and state (the same buffers as bindings 1 and 8).
@group(0) @binding(13) var<storage, read> xBC4: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> state4: array<vec4<f32>>;

// Slices of the two factors of a tiled product, KS rows of vec4s each: ROW
// vec4s (64 values and padding) per row, or 16 and 32 (64 and 128 values)
// for chunk_state's x and B.
var<workgroup> tileA: array<vec4<f32>, 272>;
var<workgroup> tileB: array<vec4<f32>, 512>;

// A thread's block of a tiled product: rows i of acc<i>, and for
// chunk_state's second 64 states, hi<i>.
var<private> acc0: vec4<f32>;
var<private> acc1: vec4<f32>;
var<private> acc2: vec4<f32>;
var<private> acc3: vec4<f32>;
var<private> hi0: vec4<f32>;
var<private> hi1: vec4<f32>;
var<private> hi2: vec4<f32>;
var<private> hi3: vec4<f32>;

fn clearBlock() {
  acc0 = vec4<f32>();
  acc1 = vec4<f32>();
  acc2 = vec4<f32>();
  acc3 = vec4<f32>();
  hi0 = vec4<f32>();
  hi1 = vec4<f32>();
  hi2 = vec4<f32>();
  hi3 = vec4<f32>();
}

// One step of a 4 × 4 block: column a of tileA's slice times row b of tileB's.
fn step4(a: u32, b: u32) {
  let av = tileA[a];
  let bv = tileB[b];
  acc0 += av.x * bv;
  acc1 += av.y * bv;
  acc2 += av.z * bv;
  acc3 += av.w * bv;
}

// A slice of KS steps of a 4 × 4 block, both factors in rows of ROW vec4s.
fn slice4(aCol: u32, bCol: u32) {
  step4(aCol, bCol);
  step4(ROW + aCol, ROW + bCol);
  step4(2u * ROW + aCol, 2u * ROW + bCol);
  step4(3u * ROW + aCol, 3u * ROW + bCol);
  step4(4u * ROW + aCol, 4u * ROW + bCol);
  step4(5u * ROW + aCol, 5u * ROW + bCol);
  step4(6u * ROW + aCol, 6u * ROW + bCol);
  step4(7u * ROW + aCol, 7u * ROW + bCol);
  step4(8u * ROW + aCol, 8u * ROW + bCol);
  step4(9u * ROW + aCol, 9u * ROW + bCol);
  step4(10u * ROW + aCol, 10u * ROW + bCol);
  step4(11u * ROW + aCol, 11u * ROW + bCol);
  step4(12u * ROW + aCol, 12u * ROW + bCol);
  step4(13u * ROW + aCol, 13u * ROW + bCol);
  step4(14u * ROW + aCol, 14u * ROW + bCol);
  step4(15u * ROW + aCol, 15u * ROW + bCol);
}

// One step of chunk_state's 4 × 8 block: x's rows of 16 vec4s, B's of 32.
fn step8(k: u32, pRow: u32, nCol: u32) {
  let xv = tileA[k * 16u + pRow];
  let lo = tileB[k * 32u + nCol];
  let up = tileB[k * 32u + 16u + nCol];
  acc0 += xv.x * lo;
  hi0 += xv.x * up;
  acc1 += xv.y * lo;
  hi1 += xv.y * up;
  acc2 += xv.z * lo;
  hi2 += xv.z * up;
  acc3 += xv.w * lo;
  hi3 += xv.w * up;
}

fn slice8(pRow: u32, nCol: u32) {
  step8(0u, pRow, nCol);
  step8(1u, pRow, nCol);
  step8(2u, pRow, nCol);
  step8(3u, pRow, nCol);
  step8(4u, pRow, nCol);
  step8(5u, pRow, nCol);
  step8(6u, pRow, nCol);
  step8(7u, pRow, nCol);
  step8(8u, pRow, nCol);
  step8(9u, pRow, nCol);
  step8(10u, pRow, nCol);
  step8(11u, pRow, nCol);
  step8(12u, pRow, nCol);
  step8(13u, pRow, nCol);
  step8(14u, pRow, nCol);
  step8(15u, pRow, nCol);
}
var<workgroup> chunkWeights: array<f32, CHUNK>;
var<workgroup> tileDecay: array<f32, 64>;
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

// The row of xBC of token t of the segment of sequence b.
fn tokenRow(b: u32, t: u32) -> u32 {
  return b * p.seqLen + p.start + t;
}

// Tokens of chunk c (the last may be partial).
fn chunkTokens(c: u32) -> u32 {
  return min(CHUNK, p.len - c * CHUNK);
}

// Where cs and Δ of token t of the segment of (b, h) are.
fn decayAt(b: u32, h: u32, t: u32) -> u32 {
  return (b * p.heads + h) * p.len + t;
}

// Grid: (nChunks, heads, batch), a thread per token of the chunk. cs is an
// inclusive prefix sum of Δ·A over the chunk, taken in workgroup memory in
// log2(CHUNK) rounds: one thread walking the chunk's tokens in turn waited on
// each token's load.
@compute @workgroup_size(256)
fn decay(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let h = wg.y;
  let b = wg.z;
  let t = c * CHUNK + li;
  let inChunk = li < chunkTokens(c);
  var d = 0.0;
  if (inChunk) {
    d = delta(tokenRow(b, t), h);
  }
  var cum = d * A[h];
  lanes[li] = cum;
  for (var offset = 1u; offset < CHUNK; offset <<= 1u) {
    workgroupBarrier();
    var before = 0.0;
    if (li >= offset) {
      before = lanes[li - offset];
    }
    workgroupBarrier();
    cum += before;
    lanes[li] = cum;
  }
  if (inChunk) {
    cs[decayAt(b, h, t)] = cum;
    dl[decayAt(b, h, t)] = d;
  }
}

// Grid: (nChunks, groups · tiles², batch), tiles = ⌈CHUNK / 64⌉.
@compute @workgroup_size(WG)
fn chunk_cb(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let b = wg.z;
  let tiles = (CHUNK + 63u) / 64u;
  let g = wg.y / (tiles * tiles);
  let tt = (wg.y / tiles) % tiles;
  let st = wg.y % tiles;
  if (st > tt) {
    return; // above the diagonal: never read
  }
  let q = chunkTokens(c);
  let W = width();
  let N = p.dState;
  let bCol = p.heads * p.headDim + g * N;
  let cCol = p.heads * p.headDim + (p.groups + g) * N;
  let first = c * CHUNK;
  let tRow = li / 16u; // this thread's tokens t: 4·tRow … + 3 of the tile
  let sCol = li % 16u; // and tokens s: 4·sCol … + 3
  clearBlock();
  for (var n0 = 0u; n0 < N; n0 += KS) {
    workgroupBarrier();
    // Stage C and B of 64 tokens × KS states, transposed: [k][token].
    for (var e = li; e < 64u * KS; e += WG) {
      let k = e % KS;
      let j = e / KS;
      var cv = 0.0;
      var bv = 0.0;
      let t = tt * 64u + j;
      let s = st * 64u + j;
      if (n0 + k < N) {
        if (t < q) {
          cv = xBC[tokenRow(b, first + t) * W + cCol + n0 + k];
        }
        if (s < q) {
          bv = xBC[tokenRow(b, first + s) * W + bCol + n0 + k];
        }
      }
      tileA[k * ROW + j / 4u][j % 4u] = cv;
      tileB[k * ROW + j / 4u][j % 4u] = bv;
    }
    workgroupBarrier();
    slice4(tRow, sCol);
  }
  let base = ((b * p.nChunks + c) * p.groups + g) * CHUNK * CHUNK;
  let rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {
    let t = tt * 64u + tRow * 4u + i;
    for (var j = 0u; j < 4u; j++) {
      let s = st * 64u + sCol * 4u + j;
      if (t < q && s < q) {
        cb[base + t * CHUNK + s] = rows[i][j];
      }
    }
  }
}

// Grid: (nChunks, heads · ⌈headDim / 64⌉ · ⌈dState / 128⌉, batch).
@compute @workgroup_size(WG)
fn chunk_state(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let b = wg.z;
  let P = p.headDim;
  let N = p.dState;
  let pTiles = (P + 63u) / 64u;
  let nTiles = (N + 127u) / 128u;
  let h = wg.y / (pTiles * nTiles);
  let p0 = ((wg.y / nTiles) % pTiles) * 64u;
  let n0 = (wg.y % nTiles) * 128u;
  let g = h / (p.heads / p.groups);
  let q = chunkTokens(c);
  let W = width();
  let t0 = c * CHUNK;
  if (li < q) {
    let last = cs[decayAt(b, h, t0 + q - 1u)];
    chunkWeights[li] = exp(last - cs[decayAt(b, h, t0 + li)]) * dl[decayAt(b, h, t0 + li)];
  }
  let bCol = p.heads * P + g * N;
  let pRow = li / 16u; // channels 4·pRow … + 3 of the tile
  let nCol = li % 16u; // states 4·nCol … + 3 and 64 + 4·nCol … + 3
  clearBlock();
  for (var s0 = 0u; s0 < q; s0 += KS) {
    workgroupBarrier();
    // The weighted x of KS tokens × 64 channels, and their B × 128 states: [k][…].
    for (var e = li; e < KS * 64u; e += WG) {
      let k = e / 64u;
      let j = e % 64u;
      var v = 0.0;
      if (s0 + k < q && p0 + j < P) {
        v = chunkWeights[s0 + k] * xBC[tokenRow(b, t0 + s0 + k) * W + h * P + p0 + j];
      }
      tileA[k * 16u + j / 4u][j % 4u] = v;
    }
    for (var e = li; e < KS * 128u; e += WG) {
      let k = e / 128u;
      let j = e % 128u;
      var v = 0.0;
      if (s0 + k < q && n0 + j < N) {
        v = xBC[tokenRow(b, t0 + s0 + k) * W + bCol + n0 + j];
      }
      tileB[k * 32u + j / 4u][j % 4u] = v;
    }
    workgroupBarrier();
    slice8(pRow, nCol);
  }
  let base = ((b * p.nChunks + c) * p.heads + h) * P * N;
  let los = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
  let his = array<vec4<f32>, 4>(hi0, hi1, hi2, hi3);
  for (var i = 0u; i < 4u; i++) {
    let pc = p0 + pRow * 4u + i;
    for (var j = 0u; j < 4u; j++) {
      let nLo = n0 + nCol * 4u + j;
      let nHi = nLo + 64u;
      if (pc < P && nLo < N) {
        chunkStates[base + pc * N + nLo] = los[i][j];
      }
      if (pc < P && nHi < N) {
        chunkStates[base + pc * N + nHi] = his[i][j];
      }
    }
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
    let lastT = c * CHUNK + chunkTokens(c) - 1u;
    hv = exp(cs[decayAt(b, h, lastT)]) * hv + own;
  }
  state[at] = hv;
}

// Grid: (nChunks, heads · ⌈headDim / 64⌉ · ⌈CHUNK / 64⌉, batch).
@compute @workgroup_size(WG)
fn output(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let b = wg.z;
  let P = p.headDim;
  let N = p.dState;
  let pTiles = (P + 63u) / 64u;
  let tTiles = (CHUNK + 63u) / 64u;
  let h = wg.y / (pTiles * tTiles);
  let p0 = ((wg.y / tTiles) % pTiles) * 64u;
  let tFirst = (wg.y % tTiles) * 64u; // the tile's first token in the chunk
  let g = h / (p.heads / p.groups);
  let q = chunkTokens(c);
  if (tFirst >= q) {
    return;
  }
  let W = width();
  let t0 = c * CHUNK;
  let cCol = p.heads * P + (p.groups + g) * N;
  let cbBase = ((b * p.nChunks + c) * p.groups + g) * CHUNK * CHUNK;
  let incoming = ((b * p.nChunks + c) * p.heads + h) * P * N;
  if (li < 64u) {
    var v = 0.0;
    if (tFirst + li < q) {
      v = cs[decayAt(b, h, t0 + tFirst + li)];
    }
    tileDecay[li] = v;
  }
  let tRow = li / 16u; // tokens tFirst + 4·tRow … + 3
  let pCol = li % 16u; // channels p0 + 4·pCol … + 3
  clearBlock();
  // Within the chunk: Σ_{s<=t} C_t·B_s · exp(cs_t - cs_s)·Δ_s · x_s, over the
  // tokens s up to the tile's last.
  let sEnd = min(q, tFirst + 64u);
  for (var s0 = 0u; s0 < sEnd; s0 += KS) {
    workgroupBarrier();
    for (var e = li; e < 64u * KS; e += WG) {
      let k = e % KS;
      let j = e / KS;
      let t = tFirst + j;
      let s = s0 + k;
      var m = 0.0;
      if (s <= t && t < q) {
        let csS = cs[decayAt(b, h, t0 + s)];
        m = cb[cbBase + t * CHUNK + s] * exp(tileDecay[j] - csS) * dl[decayAt(b, h, t0 + s)];
      }
      tileA[k * ROW + j / 4u][j % 4u] = m;
    }
    for (var e = li; e < KS * 64u; e += WG) {
      let k = e / 64u;
      let j = e % 64u;
      var v = 0.0;
      if (s0 + k < q && p0 + j < P) {
        v = xBC[tokenRow(b, t0 + s0 + k) * W + h * P + p0 + j];
      }
      tileB[k * ROW + j / 4u][j % 4u] = v;
    }
    workgroupBarrier();
    slice4(tRow, pCol);
  }
  // From the chunks before: exp(cs_t)·C_t · h_inᵀ, over the states.
  for (var n0 = 0u; n0 < N; n0 += KS) {
    workgroupBarrier();
    for (var e = li; e < 64u * KS; e += WG) {
      let k = e % KS;
      let j = e / KS;
      let t = tFirst + j;
      var v = 0.0;
      if (t < q && n0 + k < N) {
        v = exp(tileDecay[j]) * xBC[tokenRow(b, t0 + t) * W + cCol + n0 + k];
      }
      tileA[k * ROW + j / 4u][j % 4u] = v;
      var hv = 0.0;
      if (p0 + j < P && n0 + k < N) {
        hv = chunkStates[incoming + (p0 + j) * N + n0 + k];
      }
      tileB[k * ROW + j / 4u][j % 4u] = hv;
    }
    workgroupBarrier();
    slice4(tRow, pCol);
  }
  var skip = 0.0;
  if ((p.flags & 1u) != 0u) {
    skip = Dv[h];
  }
  let rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {
    let t = tFirst + tRow * 4u + i;
    if (t >= q) {
      break;
    }
    let row = tokenRow(b, t0 + t);
    for (var j = 0u; j < 4u; j++) {
      let pc = p0 + pCol * 4u + j;
      if (pc < P) {
        y[row * (p.heads * P) + h * P + pc] = rows[i][j] + skip * xBC[row * W + h * P + pc];
      }
    }
  }
}

// One token per sequence: STEP_LANES threads per channel (b, h, p), lane l
// taking states l, l + STEP_LANES, ..., so that a warp's loads of a state row
// are contiguous; the lanes' parts of h·C are summed in workgroup memory.

/** What a thread of `step` or `step_vec4` works on. */
struct StepTask {
  i: u32, // the channel, of all batch · heads · headDim
  lane: u32,
  valid: bool,
  decay: f32, // exp(Δ·A)
  xv: f32, // x
  dx: f32, // Δ·x
  base: u32, // the channel's first state in `state`
  bCol: u32, // its B's first element in xBC
  cCol: u32, // its C's
}

fn stepTask(wg: vec3u, nwg: vec3u, li: u32) -> StepTask {
  let inner = p.heads * p.headDim;
  let i = (wg.y * nwg.x + wg.x) * (STEP_WG / STEP_LANES) + li / STEP_LANES;
  var t = StepTask(i, li % STEP_LANES, i < p.batch * inner, 0.0, 0.0, 0.0, 0u, 0u, 0u);
  if (t.valid) {
    let b = i / inner;
    let channel = i % inner; // h·P + p
    let h = channel / p.headDim;
    let g = h / (p.heads / p.groups);
    let row = b * width();
    let d = delta(b, h);
    t.decay = exp(d * A[h]);
    t.xv = xBC[row + channel];
    t.dx = d * t.xv;
    t.base = (stateRow(b) * inner + channel) * p.dState;
    t.bCol = row + inner + g * p.dState;
    t.cCol = row + inner + (p.groups + g) * p.dState;
  }
  return t;
}

/**
 * y of the thread's channel: its lanes' parts of h·C (`part`) summed, plus
 * D·x. Every thread must call it (it reduces through workgroup memory).
 */
fn finishStep(li: u32, t: StepTask, part: f32) {
  lanes[li] = part;
  workgroupBarrier();
  for (var stride = STEP_LANES / 2u; stride > 0u; stride >>= 1u) {
    if (t.lane < stride) {
      lanes[li] += lanes[li + stride];
    }
    workgroupBarrier();
  }
  if (t.valid && t.lane == 0u) {
    var out = lanes[li];
    if ((p.flags & 1u) != 0u) {
      out += Dv[(t.i % (p.heads * p.headDim)) / p.headDim] * t.xv;
    }
    y[t.i] = out;
  }
}

@compute @workgroup_size(STEP_WG)
fn step(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let t = stepTask(wg, nwg, li);
  var acc = 0.0;
  if (t.valid) {
    for (var n = t.lane; n < p.dState; n += STEP_LANES) {
      let hv = t.decay * state[t.base + n] + t.dx * xBC[t.bCol + n];
      state[t.base + n] = hv;
      acc += hv * xBC[t.cCol + n];
    }
  }
  finishStep(li, t, acc);
}

// step over vec4s of state, B and C: each of a channel's STEP_LANES threads
// takes 4 consecutive states per load and two such loads at a time (a
// decode step's cost is reading and writing the states).
@compute @workgroup_size(STEP_WG)
fn step_vec4(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let t = stepTask(wg, nwg, li);
  let quads = p.dState / 4u;
  var acc = vec4<f32>(0.0);
  if (t.valid) {
    let base = t.base / 4u;
    let bCol = t.bCol / 4u;
    let cCol = t.cCol / 4u;
    var q = t.lane;
    for (; q + STEP_LANES < quads; q += 2u * STEP_LANES) {
      let q2 = q + STEP_LANES;
      let h0 = t.decay * state4[base + q] + t.dx * xBC4[bCol + q];
      let h1 = t.decay * state4[base + q2] + t.dx * xBC4[bCol + q2];
      state4[base + q] = h0;
      state4[base + q2] = h1;
      acc += h0 * xBC4[cCol + q] + h1 * xBC4[cCol + q2];
    }
    if (q < quads) {
      let h0 = t.decay * state4[base + q] + t.dx * xBC4[bCol + q];
      state4[base + q] = h0;
      acc += h0 * xBC4[cCol + q];
    }
  }
  finishStep(li, t, dot(acc, vec4<f32>(1.0)));
}
