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
//                the group's heads, and C transposed;
//   chunk_state  per (chunk, head, 128 states × 64 channels): the chunk's own
//                state S = Σ_s exp(cs_last - cs_s)·Δ_s · x_s ⊗ B_s;
//   carry        per state element: the inter-chunk recurrence, chunk by
//                chunk h_in(c) = h; h = exp(cs_last(c))·h + S(c), leaving each
//                chunk's incoming state in place of S and the last in the pool;
//   output       per (chunk, head, 128 tokens × 64 channels): exp(cs_t)·C_t·h_in,
//                plus the decay-masked C·Bᵀ times the chunk's x, plus D·x.
// chunk_cb, chunk_state and output are products tiled in workgroup memory,
// each thread's block of the tile in module-scope vec4s, read as vec4s, the
// steps of a slice written out (a loop that the driver does not unroll, or an
// array indexed in one, costs local memory and loop overhead: see
// matmul.wgsl). chunk_cb takes 4 × 4 blocks over slices of KS; its slices,
// staged k-fastest (coalesced along the summed dimension in xBC), use rows of
// ROW = 17 vec4s, so that the stores of a warp spread over the banks.
// chunk_state and output take 8 × 8 blocks (see above chunk_state).
// A decode step (len 1) is `step`: the recurrence itself, STEP_LANES threads per channel;
// `step_vec4` where dState, heads·headDim and xBC's rows are whole vec4s.

const CHUNK: u32 = 64u; // tokens per chunk: a multiple of KS
const KS: u32 = 16u; // the summed dimension's slice staged at a time (the steps of *Slice)
const ROW: u32 = 17u; // vec4s per staged row of 64 values: 16, and one of padding
const WG: u32 = 256u;
const VEC4: u32 = 0u; // 1 when headDim and dState are multiples of 4: xBC read as vec4s
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
  flags: u32, // 1: D, 2: slots, 4: gate (a decode step's y times silu(gate))
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
// [batch, nChunks, heads, dState, P4] (P4: headDim rounded up to a multiple of
// 4, the padding 0): each chunk's own state, transposed, then its incoming one.
@group(0) @binding(9) var<storage, read_write> chunkStates: array<vec4<f32>>;
// [batch, heads, len]: cs and Δ of each token.
@group(0) @binding(10) var<storage, read_write> cs: array<f32>;
@group(0) @binding(11) var<storage, read_write> dl: array<f32>;
// [batch, nChunks, groups, CHUNK (s), CHUNK (t)]: C_t·B_s of each chunk, for
// s <= t (only tiles on or below the diagonal are written).
@group(0) @binding(12) var<storage, read_write> cb: array<vec4<f32>>;
// [batch, nChunks, groups, dState, CHUNK]: each chunk's C, transposed (0 past its tokens).
@group(0) @binding(15) var<storage, read_write> ct: array<vec4<f32>>;
// step_vec4's views of xBC and state (the same buffers as bindings 1 and 8).
@group(0) @binding(13) var<storage, read> xBC4: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> state4: array<vec4<f32>>;
// With flag 4, a decode step's gate z [batch, heads·headDim]: y is stored
// times silu(z), the first half of the gated RMSNorm after it.
@group(0) @binding(16) var<storage, read> gate: array<f32>;

// chunk_cb's slices of C and B, KS rows of ROW vec4s (64 values and padding).
var<workgroup> tileA: array<vec4<f32>, 272>;
var<workgroup> tileB: array<vec4<f32>, 272>;

// chunk_cb's 4 × 4 block of C·Bᵀ: rows i of acc<i>.
var<private> acc0: vec4<f32>;
var<private> acc1: vec4<f32>;
var<private> acc2: vec4<f32>;
var<private> acc3: vec4<f32>;

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
    // One tile per 64 tokens t writes their C transposed, for output: a
    // thread per vec4 of the staged slice, KS rows of 16.
    let k = li / 16u;
    let t = tt * 64u + 4u * (li % 16u);
    if (st == 0u && k < KS && n0 + k < N && t < CHUNK) {
      ct[((((b * p.nChunks + c) * p.groups + g) * N + n0 + k) * CHUNK + t) / 4u] = tileA[k * ROW + li % 16u];
    }
    slice4(tRow, sCol);
  }
  let base = ((b * p.nChunks + c) * p.groups + g) * CHUNK * CHUNK;
  let rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {
    let t = tt * 64u + tRow * 4u + i;
    for (var j = 0u; j < 4u; j++) {
      let s = st * 64u + sCol * 4u + j;
      if (t < q && s < q) {
        let at = base + s * CHUNK + t;
        cb[at / 4u][at % 4u] = rows[i][j];
      }
    }
  }
}

// chunk_state and output: products of 128 × 64 tiles on the scheme of
// matmul.wgsl's main. Each of 128 threads takes an 8 × 8 block of the tile
// (block8x8.wgsl, prepended by the backend):
// rows 4·ty … + 3 and 64 + 4·ty … + 3, columns 4·tx … + 3 and 32 + 4·tx … + 3,
// with ty = li / 8, tx = li % 8. Slices of BK along the summed dimension are
// staged k-major (slab rows of 128 and 64 values) in two buffers: the next
// slice is fetched into registers before the current one is used and stored
// after it, so one barrier per slice suffices and the fetch hides behind the
// math. Their operands are laid out so that most of the staging is a copy of
// vec4s: the chunk states as [n][p] (rows of P4 = headDim rounded up to a
// multiple of 4), C·Bᵀ as [s][t].

const BK: u32 = 8u; // the summed dimension's slice staged at a time (the steps of slice8x8)
const TILE_THREADS: u32 = 128u;

// [2][BK][128] and [2][BK][64] floats: the two staged slices of each factor.
var<workgroup> slabA: array<vec4<f32>, 512>;
var<workgroup> slabB: array<vec4<f32>, 256>;
// cs and Δ of the chunk's tokens (output), or their weights in the chunk's state (chunk_state).
var<workgroup> chunkCs: array<f32, CHUNK>;
var<workgroup> chunkDl: array<f32, CHUNK>;

// One k of an 8 × 8 block (block8x8.wgsl): slab rows at vec4 a of slabA and b of slabB.
fn step8x8(a: u32, b: u32) {
  outer8x8(slabA[a], slabA[a + 16u], slabB[b], slabB[b + 8u]);
}

// The BK steps of buffer buf for thread (ty, tx).
fn slice8x8(buf: u32, ty: u32, tx: u32) {
  let a = buf * BK * 32u + ty;
  let b = buf * BK * 16u + tx;
  step8x8(a, b);
  step8x8(a + 32u, b + 16u);
  step8x8(a + 64u, b + 32u);
  step8x8(a + 96u, b + 48u);
  step8x8(a + 128u, b + 64u);
  step8x8(a + 160u, b + 80u);
  step8x8(a + 192u, b + 96u);
  step8x8(a + 224u, b + 112u);
}

// Row i (0..7) of the thread's block: its 8 values, first 4 columns then last 4.
fn blockRow(i: u32) -> array<vec4<f32>, 2> {
  switch (i) {
    case 0u: { return array(acc0a, acc0b); }
    case 1u: { return array(acc1a, acc1b); }
    case 2u: { return array(acc2a, acc2b); }
    case 3u: { return array(acc3a, acc3b); }
    case 4u: { return array(acc4a, acc4b); }
    case 5u: { return array(acc5a, acc5b); }
    case 6u: { return array(acc6a, acc6b); }
    default: { return array(acc7a, acc7b); }
  }
}

// Row i of the block is row rowOf(ty, i) of the tile; column j is colOf(tx, j).
fn rowOf(ty: u32, i: u32) -> u32 {
  return select(4u * ty + i, 60u + 4u * ty + i, i >= 4u);
}

fn colOf(tx: u32, j: u32) -> u32 {
  return select(4u * tx + j, 28u + 4u * tx + j, j >= 4u);
}

// headDim rounded up to whole vec4s: the chunk states' row length.
fn paddedHeadDim() -> u32 {
  return (p.headDim + 3u) / 4u * 4u;
}

// xBC[row, col … col + 3], the lanes from `valid` on 0 (vec4 loads where
// VEC4: headDim and dState multiples of 4, so every such run is aligned).
fn xBC4At(row: u32, col: u32, valid: u32) -> vec4<f32> {
  if (valid == 0u) {
    return vec4<f32>(0.0);
  }
  let i = row * width() + col;
  if (VEC4 == 1u) {
    return xBC4[i / 4u];
  }
  var v = vec4<f32>(0.0);
  for (var l = 0u; l < min(valid, 4u); l++) {
    v[l] = xBC[i + l];
  }
  return v;
}

// Grid: (nChunks, heads · ⌈dState / 128⌉ · ⌈headDim / 64⌉, batch). The chunk's
// own state Sᵀ[n, p] = Σ_s B_s[n] · w_s·x_s[p], w_s = exp(cs_last - cs_s)·Δ_s:
// rows n of B (a slice is BK tokens' B, 32 vec4s each), columns p of w·x.
@compute @workgroup_size(TILE_THREADS)
fn chunk_state(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let b = wg.z;
  let P = p.headDim;
  let N = p.dState;
  let P4 = paddedHeadDim();
  let pTiles = (P4 + 63u) / 64u;
  let nTiles = (N + 127u) / 128u;
  let h = wg.y / (nTiles * pTiles);
  let n0 = ((wg.y / pTiles) % nTiles) * 128u;
  let p0 = (wg.y % pTiles) * 64u;
  let g = h / (p.heads / p.groups);
  let q = chunkTokens(c);
  let t0 = c * CHUNK;
  let bCol = p.heads * P + g * N;
  let last = cs[decayAt(b, h, t0 + q - 1u)];
  for (var s = li; s < q; s += TILE_THREADS) {
    chunkCs[s] = exp(last - cs[decayAt(b, h, t0 + s)]) * dl[decayAt(b, h, t0 + s)];
  }
  // Thread li fetches B's vec4s li and li + 128 of a slice (token k = e / 32,
  // states 4·(e % 32) …) and w·x's vec4 li (token li / 16, channels 4·(li % 16) …).
  let bN = n0 + 4u * (li % 32u);
  let xK = li / 16u;
  let xP = p0 + 4u * (li % 16u);
  let bValid = select(0u, N - bN, bN < N);
  let xValid = select(0u, P - xP, xP < P);
  var fa0: vec4<f32>;
  var fa1: vec4<f32>;
  var fb: vec4<f32>;
  workgroupBarrier();
  let slices = (q + BK - 1u) / BK;
  for (var i = 0u; i <= slices; i++) {
    // Iteration i fetches slice i, stores it in buffer i % 2 and uses slice i - 1.
    if (i < slices) {
      let s0 = i * BK;
      let ka = s0 + li / 32u;
      let kb = ka + 4u;
      fa0 = xBC4At(tokenRow(b, t0 + ka), bCol + bN, select(0u, bValid, ka < q));
      fa1 = xBC4At(tokenRow(b, t0 + kb), bCol + bN, select(0u, bValid, kb < q));
      fb = xBC4At(tokenRow(b, t0 + s0 + xK), h * P + xP, select(0u, xValid, s0 + xK < q));
    }
    if (i > 0u) {
      slice8x8((i - 1u) % 2u, li / 8u, li % 8u);
    }
    if (i < slices) {
      let buf = i % 2u;
      slabA[buf * BK * 32u + li] = fa0;
      slabA[buf * BK * 32u + 128u + li] = fa1;
      let s = i * BK + xK;
      slabB[buf * BK * 16u + li] = fb * select(0.0, chunkCs[min(s, CHUNK - 1u)], s < q);
    }
    workgroupBarrier();
  }
  let base = ((b * p.nChunks + c) * p.heads + h) * N * P4 / 4u;
  let ty = li / 8u;
  let tx = li % 8u;
  for (var i = 0u; i < 8u; i++) {
    let n = n0 + rowOf(ty, i);
    let values = blockRow(i);
    for (var j = 0u; j < 2u; j++) {
      let pc = p0 + colOf(tx, 4u * j);
      if (n < N && pc < P4) {
        chunkStates[base + (n * P4 + pc) / 4u] = values[j];
      }
    }
  }
}

// Grid: ⌈batch · heads · dState · P4 / WG⌉ workgroups, a thread per element of
// a chunk state: the inter-chunk recurrence. Each chunk's own state is loaded
// before the previous chunk's incoming state is stored in its place, so that
// the loads do not wait on the stores.
@compute @workgroup_size(WG)
fn carry(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * WG + li;
  let P = p.headDim;
  let N = p.dState;
  let P4 = paddedHeadDim();
  let perHead = N * P4;
  let perSequence = p.heads * perHead;
  if (i >= p.batch * perSequence) {
    return;
  }
  let b = i / perSequence;
  let e = i % perSequence;
  let h = e / perHead;
  let n = (e % perHead) / P4;
  let pc = e % P4;
  // The pool holds [heads, headDim, dState]; padding channels stay 0.
  let at = ((stateRow(b) * p.heads + h) * P + pc) * N + n;
  var hv = 0.0;
  if (pc < P) {
    hv = state[at];
  }
  var k = ((b * p.nChunks) * p.heads + h) * perHead + e % perHead;
  let stride = p.heads * perHead; // from one chunk's state to the next's
  var own = chunkStates[k / 4u][k % 4u];
  for (var c = 0u; c < p.nChunks; c++) {
    var next = 0.0;
    if (c + 1u < p.nChunks) {
      next = chunkStates[(k + stride) / 4u][(k + stride) % 4u];
    }
    chunkStates[k / 4u][k % 4u] = hv;
    let lastT = c * CHUNK + chunkTokens(c) - 1u;
    hv = exp(cs[decayAt(b, h, lastT)]) * hv + own;
    own = next;
    k += stride;
  }
  if (pc < P) {
    state[at] = hv;
  }
}

// Grid: (nChunks, heads · ⌈P4 / 64⌉ · ⌈CHUNK / 128⌉, batch). y of 128 tokens
// × 64 channels, rows t and columns p: first over the states n,
// Σ_n C_t[n]·h_in[n, p], whose rows are then scaled by exp(cs_t); then over
// the tokens s of the chunk up to the tile's last, Σ_s M[t, s]·x_s[p] with
// M = C_t·B_s · exp(cs_t - cs_s)·Δ_s for s <= t, else 0; plus D·x.
@compute @workgroup_size(TILE_THREADS)
fn output(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let c = wg.x;
  let b = wg.z;
  let P = p.headDim;
  let N = p.dState;
  let P4 = paddedHeadDim();
  let pTiles = (P4 + 63u) / 64u;
  let tTiles = (CHUNK + 127u) / 128u;
  let h = wg.y / (pTiles * tTiles);
  let p0 = ((wg.y / tTiles) % pTiles) * 64u;
  let tFirst = (wg.y % tTiles) * 128u; // the tile's first token in the chunk
  let g = h / (p.heads / p.groups);
  let q = chunkTokens(c);
  if (tFirst >= q) {
    return;
  }
  let t0 = c * CHUNK;
  let cbBase = ((b * p.nChunks + c) * p.groups + g) * CHUNK * CHUNK / 4u;
  let ctBase = ((b * p.nChunks + c) * p.groups + g) * N * CHUNK / 4u;
  let incoming = ((b * p.nChunks + c) * p.heads + h) * N * P4 / 4u;
  for (var s = li; s < q; s += TILE_THREADS) {
    chunkCs[s] = cs[decayAt(b, h, t0 + s)];
    chunkDl[s] = dl[decayAt(b, h, t0 + s)];
  }
  // Slices [0, over) run over the states n, the rest over the tokens s.
  let over = (N + BK - 1u) / BK;
  let sEnd = min(q, tFirst + 128u);
  let slices = over + (sEnd + BK - 1u) / BK;
  // Thread li fetches, over n, Cᵀ's vec4s li and li + 128 of a slice (states
  // n = e / 32, tokens t = 4·(e % 32) …) and h_in's vec4 li (state li / 16,
  // channels 4·(li % 16) …); over s, C·Bᵀ's vec4s li and li + 128 (tokens
  // s = e / 32, t = 4·(e % 32) …) and x's vec4 li (token li / 16, channels
  // 4·(li % 16) …).
  let xK = li / 16u;
  let xP = p0 + 4u * (li % 16u);
  let xValid = select(0u, P - xP, xP < P);
  let tq = tFirst + 4u * (li % 32u);
  var fa0: vec4<f32>;
  var fa1: vec4<f32>;
  var fb: vec4<f32>;
  workgroupBarrier();
  for (var i = 0u; i <= slices; i++) {
    if (i < over) {
      let n0 = i * BK;
      fa0 = vec4<f32>(0.0);
      fa1 = vec4<f32>(0.0);
      if (tq < CHUNK) {
        if (n0 + li / 32u < N) {
          fa0 = ct[ctBase + ((n0 + li / 32u) * CHUNK + tq) / 4u];
        }
        if (n0 + 4u + li / 32u < N) {
          fa1 = ct[ctBase + ((n0 + 4u + li / 32u) * CHUNK + tq) / 4u];
        }
      }
      fb = vec4<f32>(0.0);
      if (n0 + xK < N && xP < P4) {
        fb = chunkStates[incoming + ((n0 + xK) * P4 + xP) / 4u];
      }
    } else if (i < slices) {
      let s0 = (i - over) * BK;
      fa0 = vec4<f32>(0.0);
      fa1 = vec4<f32>(0.0);
      if (tq < CHUNK) {
        fa0 = cb[cbBase + ((s0 + li / 32u) * CHUNK + tq) / 4u];
        fa1 = cb[cbBase + ((s0 + 4u + li / 32u) * CHUNK + tq) / 4u];
      }
      fb = xBC4At(tokenRow(b, t0 + s0 + xK), h * P + xP, select(0u, xValid, s0 + xK < q));
    }
    if (i > 0u) {
      slice8x8((i - 1u) % 2u, li / 8u, li % 8u);
      if (i == over) {
        scaleRows(tFirst, li / 8u, q);
      }
    }
    let buf = i % 2u;
    if (i < over) {
      slabA[buf * BK * 32u + li] = fa0;
      slabA[buf * BK * 32u + 128u + li] = fa1;
      slabB[buf * BK * 16u + li] = fb;
    } else if (i < slices) {
      let s = (i - over) * BK + li / 32u;
      slabA[buf * BK * 32u + li] = decayed(fa0, s, tq, q);
      slabA[buf * BK * 32u + 128u + li] = decayed(fa1, s + 4u, tq, q);
      slabB[buf * BK * 16u + li] = fb;
    }
    workgroupBarrier();
  }
  var skip = 0.0;
  if ((p.flags & 1u) != 0u) {
    skip = Dv[h];
  }
  let ty = li / 8u;
  let tx = li % 8u;
  for (var i = 0u; i < 8u; i++) {
    let t = tFirst + rowOf(ty, i);
    if (t >= q) {
      continue;
    }
    let row = tokenRow(b, t0 + t);
    let values = blockRow(i);
    for (var j = 0u; j < 8u; j++) {
      let pc = p0 + colOf(tx, j);
      if (pc < P) {
        let at = row * (p.heads * P) + h * P + pc;
        y[at] = values[j / 4u][j % 4u] + skip * xBC[row * width() + h * P + pc];
      }
    }
  }
}

// Scales row t of the block by exp(cs_t): the carried state's decay to token t.
fn scaleRows(tFirst: u32, ty: u32, q: u32) {
  let last = q - 1u;
  let e0 = exp(chunkCs[min(tFirst + rowOf(ty, 0u), last)]);
  let e1 = exp(chunkCs[min(tFirst + rowOf(ty, 1u), last)]);
  let e2 = exp(chunkCs[min(tFirst + rowOf(ty, 2u), last)]);
  let e3 = exp(chunkCs[min(tFirst + rowOf(ty, 3u), last)]);
  let e4 = exp(chunkCs[min(tFirst + rowOf(ty, 4u), last)]);
  let e5 = exp(chunkCs[min(tFirst + rowOf(ty, 5u), last)]);
  let e6 = exp(chunkCs[min(tFirst + rowOf(ty, 6u), last)]);
  let e7 = exp(chunkCs[min(tFirst + rowOf(ty, 7u), last)]);
  acc0a *= e0;
  acc0b *= e0;
  acc1a *= e1;
  acc1b *= e1;
  acc2a *= e2;
  acc2b *= e2;
  acc3a *= e3;
  acc3b *= e3;
  acc4a *= e4;
  acc4b *= e4;
  acc5a *= e5;
  acc5b *= e5;
  acc6a *= e6;
  acc6b *= e6;
  acc7a *= e7;
  acc7b *= e7;
}

// M[t … t + 3, s] from C·Bᵀ's values there: C_t·B_s · exp(cs_t - cs_s)·Δ_s
// where s <= t < q, else 0 (C·Bᵀ above the diagonal was never written).
fn decayed(cbv: vec4<f32>, s: u32, t: u32, q: u32) -> vec4<f32> {
  let last = q - 1u;
  let csS = chunkCs[min(s, last)];
  let dS = chunkDl[min(s, last)];
  let ok = vec4<bool>(s <= t && t < q, s <= t + 1u && t + 1u < q, s <= t + 2u && t + 2u < q, s <= t + 3u && t + 3u < q);
  let csT = vec4<f32>(
    chunkCs[min(t, last)],
    chunkCs[min(t + 1u, last)],
    chunkCs[min(t + 2u, last)],
    chunkCs[min(t + 3u, last)],
  );
  return select(vec4<f32>(0.0), cbv * exp(csT - csS) * dS, ok);
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
  xCol: u32, // its x in xBC
  bCol: u32, // its B's first element in xBC
  cCol: u32, // its C's
  head: u32,
  b: u32, // its sequence
}

fn stepTask(wg: vec3u, nwg: vec3u, li: u32) -> StepTask {
  return withDecay(stepPlace(wg, nwg, li));
}

/** A StepTask's channel, lane and addresses, its decay and x not yet loaded. */
fn stepPlace(wg: vec3u, nwg: vec3u, li: u32) -> StepTask {
  let inner = p.heads * p.headDim;
  let i = (wg.y * nwg.x + wg.x) * (STEP_WG / STEP_LANES) + li / STEP_LANES;
  var t = StepTask(i, li % STEP_LANES, i < p.batch * inner, 0.0, 0.0, 0.0, 0u, 0u, 0u, 0u, 0u, 0u);
  if (t.valid) {
    let b = i / inner;
    let channel = i % inner; // h·P + p
    let h = channel / p.headDim;
    let g = h / (p.heads / p.groups);
    let row = b * width();
    t.b = b;
    t.head = h;
    t.xCol = row + channel;
    t.base = (stateRow(b) * inner + channel) * p.dState;
    t.bCol = row + inner + g * p.dState;
    t.cCol = row + inner + (p.groups + g) * p.dState;
  }
  return t;
}

/** `place` (a stepPlace) with its decay, x and Δ·x. */
fn withDecay(place: StepTask) -> StepTask {
  var t = place;
  if (t.valid) {
    let d = delta(t.b, t.head);
    t.decay = exp(d * A[t.head]);
    t.xv = xBC[t.xCol];
    t.dx = d * t.xv;
  }
  return t;
}

/**
 * y of the thread's channel: its lanes' parts of h·C (`part`) summed, plus
 * D·x, times silu(gate) with flag 4. Every thread must call it (it reduces
 * through workgroup memory).
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
      out += Dv[t.head] * t.xv;
    }
    if ((p.flags & 4u) != 0u) {
      let g = gate[t.i];
      out *= g / (1.0 + exp(-g));
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
// takes 4 consecutive states per load, two such loads issued first (a
// decode step's cost is reading and writing the states).
@compute @workgroup_size(STEP_WG)
fn step_vec4(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  // The thread's first two quads of states, B and C are loaded before Δ, so
  // that the wait for them overlaps Δ's chain (dt, softplus, exp) rather than
  // following it.
  let place = stepPlace(wg, nwg, li);
  let quads = p.dState / 4u;
  let base = place.base / 4u;
  let bCol = place.bCol / 4u;
  let cCol = place.cCol / 4u;
  let q = place.lane;
  let q2 = q + STEP_LANES;
  let first = place.valid && q < quads;
  let second = place.valid && q2 < quads;
  var s0 = vec4<f32>(0.0);
  var b0 = vec4<f32>(0.0);
  var c0 = vec4<f32>(0.0);
  var s1 = vec4<f32>(0.0);
  var b1 = vec4<f32>(0.0);
  var c1 = vec4<f32>(0.0);
  if (first) {
    s0 = state4[base + q];
    b0 = xBC4[bCol + q];
    c0 = xBC4[cCol + q];
  }
  if (second) {
    s1 = state4[base + q2];
    b1 = xBC4[bCol + q2];
    c1 = xBC4[cCol + q2];
  }
  let t = withDecay(place);
  let h0 = t.decay * s0 + t.dx * b0;
  let h1 = t.decay * s1 + t.dx * b1;
  if (first) {
    state4[base + q] = h0;
  }
  if (second) {
    state4[base + q2] = h1;
  }
  var acc = h0 * c0 + h1 * c1;
  if (t.valid) {
    // d_state past 8·STEP_LANES: the rest a quad at a time.
    for (var r = q + 2u * STEP_LANES; r < quads; r += STEP_LANES) {
      let h = t.decay * state4[base + r] + t.dx * xBC4[bCol + r];
      state4[base + r] = h;
      acc += h * xBC4[cCol + r];
    }
  }
  finishStep(li, t, dot(acc, vec4<f32>(1.0)));
}
