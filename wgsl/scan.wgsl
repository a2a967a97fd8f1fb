// Fused selective scan (Mamba-1 S6), token-major, for `batch` sequences:
//
//   dt   = softplus(delta + deltaBias)              (each optional)
//   h    = exp(dt·A)·h + dt·u·B[t]                  per state n, h in registers
//   y    = (C[t]·h + D·u) · silu(z)                 (D and z optional)
//
// Layouts: u, delta, z, y [batch, len, dim]; B, C [batch, len, nState];
// A [dim, nState]; state [rows, dim, nState], sequence b's in row slots[b]
// with flag 32 (a pool of states), else in row b. One thread per channel; B and C
// are staged per tile of TT tokens in workgroup memory, loaded a tile ahead.
//
// A thread holds 16 states as four vec4s (a `Lanes`), never as an array: Naga
// turns loops into while-loops that the GPU compiler does not unroll, and an
// array indexed in such a loop lives in local memory (3-5× slower on an H100).
// States are taken 16 at a time: `group` g covers states 16g … 16g+15, lanes
// past nState are zero (A = 0 and B = 0 keep them at zero). For nState > 16 the
// backend runs the passes once per group; the output pass of each group adds
// its C·h to the previous groups' sum in y, and the last group applies D and z.
//
// A long sequence is cut into nChunks chunks of chunkLen tokens so that even one
// sequence fills the GPU:
// - `chunk_state` (chunks 0..nChunks-2): each chunk's end state from a zero start
//   and its Σdt (the chunk's total decay is exp(A·Σdt));
// - `carry`: one thread per (sequence, channel, lane) walks the chunks, turning
//   hbuf into each chunk's start state;
// - `output`: every chunk again from its start state, writing y and (last chunk)
//   the final state. With one chunk only `output` runs, starting from `state`.
//
// `step` takes one token per sequence (decode), four threads per channel, and
// computes delta itself from the low-rank dt and dt_proj's weight, which saves
// a dispatch per layer. With PROJECTED it also adds up dt, B and C from the
// shares of x_proj that in_proj's GEMV left (gemv4.wgsl), saving another.
// `step_vec4`, the same for nState a multiple of 4, loads and stores each
// thread's four states as one vec4 (through state4, a second view of the
// buffer), which shortens the step where its states are many (docs/performance.md).
// `step_quads`, for step_vec4's plain case where the rank is a multiple of 4
// and dt_proj is f32, also loads A, B, C, dt and dt_proj as vec4s.
//
// WG and TT are specialised per pipeline by the backend, which prepends
// scan_shares.wgsl (PROJECTED, for the decode step) or scan_no_shares.wgsl,
// after blocks.wgsl (which decodes a dt_proj kept as quantized blocks).
struct Params {
  len: u32,
  dim: u32,
  batch: u32,
  chunkLen: u32,
  nChunks: u32,
  // 1: D, 2: z, 4: deltaBias, 8: softplus, 32: slots; dtProj's format: f32, or packed f16 (16) or
  // bf16 (64), or Q8_0 (128), Q4_0 (256) or Q4_K (512) blocks (blocks.wgsl)
  flags: u32,
  nState: u32,
  group: u32,
  nGroups: u32,
  rank: u32, // step with dt_proj: columns of dt
  blocks: u32, // step with PROJECTED: shares per sequence in projParts
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
@group(0) @binding(11) var<storage, read_write> hbuf: array<vec4<f32>>; // [batch, nChunks, dim, 4]
@group(0) @binding(12) var<storage, read_write> dtsum: array<f32>; // [batch, nChunks, dim]
@group(0) @binding(13) var<storage, read> dtLow: array<f32>; // step: dt [batch, rank]
@group(0) @binding(14) var<storage, read> dtProj: array<u32>; // step: [dim, rank], in the format of p.flags
@group(0) @binding(16) var<storage, read> slots: array<f32>; // with flag 32: sequence b's state row
// step_vec4's view of state (the same buffer as binding 10, which it does not bind)
@group(0) @binding(17) var<storage, read_write> state4: array<vec4<f32>>;
// step_quads's views of A, B, C, dt and an f32 dt_proj as vec4s (the buffers of
// bindings 3, 4, 5, 13 and 14, which it does not bind)
@group(0) @binding(18) var<storage, read> A4: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read> B4: array<vec4<f32>>;
@group(0) @binding(20) var<storage, read> C4: array<vec4<f32>>;
@group(0) @binding(21) var<storage, read> dtLow4: array<vec4<f32>>;
@group(0) @binding(22) var<storage, read> dtProj4: array<vec4<f32>>;

const WG: u32 = 128u;
const TT: u32 = 32u; // a multiple of 4, at most WG / 4
const LOG2E: f32 = 1.4426950408889634;

/** 16 states (or their A, B or C) of one channel. */
struct Lanes {
  q0: vec4<f32>,
  q1: vec4<f32>,
  q2: vec4<f32>,
  q3: vec4<f32>,
}

var<workgroup> sB: array<vec4<f32>, TT * 4u>; // [TT tokens][4 quads]
var<workgroup> sC: array<vec4<f32>, TT * 4u>;

/** What a thread of `chunk_state` or `output` works on. */
struct Task {
  d: u32, // channel
  dd: u32, // channel clamped into range, for loads
  inRange: bool,
  b: u32, // sequence
  c: u32, // chunk
  t0: u32, // first token of the chunk
  t1: u32, // one past its last
  seq: u32, // row of the sequence's first token
}

fn task(wg: vec3u, li: u32) -> Task {
  let d = wg.x * WG + li;
  let t0 = wg.y * p.chunkLen;
  return Task(
    d,
    min(d, p.dim - 1u),
    d < p.dim,
    wg.z,
    wg.y,
    t0,
    min(t0 + p.chunkLen, p.len),
    wg.z * p.len,
  );
}

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
  return stepSizeBiased(raw + biasOf(d));
}

/**
 * Channel d's delta bias (0 without flag 4). A decode step loads it before its
 * exchanges, so that the wait for it is not on the chain after them.
 */
fn biasOf(d: u32) -> f32 {
  if ((p.flags & 4u) != 0u) {
    return deltaBias[d];
  }
  return 0.0;
}

/** dt from a raw delta with its bias added: softplus with flag 8. */
fn stepSizeBiased(v: f32) -> f32 {
  if ((p.flags & 8u) != 0u) {
    return softplus(v);
  }
  return v;
}

/** stepSize of four tokens' deltas. */
fn stepSizes(raw: vec4<f32>, d: u32) -> vec4<f32> {
  return vec4<f32>(stepSize(raw.x, d), stepSize(raw.y, d), stepSize(raw.z, d), stepSize(raw.w, d));
}

/** Lanes 4q … 4q+3 of this group from a [rows, nState] matrix row, zero past nState. */
fn quadOf(values: vec4<f32>, q: u32) -> vec4<f32> {
  let n = p.group * 16u + q * 4u;
  let valid = vec4<u32>(n, n + 1u, n + 2u, n + 3u) < vec4<u32>(p.nState);
  return select(vec4<f32>(0.0), values, valid);
}

/** Index of state n of this group (clamped into the row) in a row of nState values. */
fn lane(row: u32, n: u32) -> u32 {
  return row * p.nState + min(p.group * 16u + n, p.nState - 1u);
}

/** The row of `state` holding channel d of sequence b's states. */
fn stateRow(b: u32, d: u32) -> u32 {
  var s = b;
  if ((p.flags & 32u) != 0u) {
    s = u32(slots[b]);
  }
  return s * p.dim + d;
}

fn stateQuad(row: u32, q: u32) -> vec4<f32> {
  let n = q * 4u;
  let v = vec4<f32>(
    state[lane(row, n)],
    state[lane(row, n + 1u)],
    state[lane(row, n + 2u)],
    state[lane(row, n + 3u)],
  );
  return quadOf(v, q);
}

/** Writes lanes 4q … 4q+3 of this group into a state row, those below nState. */
fn storeStateQuad(row: u32, q: u32, v: vec4<f32>) {
  let n = p.group * 16u + q * 4u;
  let base = row * p.nState + n;
  if (n < p.nState) {
    state[base] = v.x;
  }
  if (n + 1u < p.nState) {
    state[base + 1u] = v.y;
  }
  if (n + 2u < p.nState) {
    state[base + 2u] = v.z;
  }
  if (n + 3u < p.nState) {
    state[base + 3u] = v.w;
  }
}

fn aQuad(d: u32, q: u32) -> vec4<f32> {
  let n = q * 4u;
  let v = vec4<f32>(A[lane(d, n)], A[lane(d, n + 1u)], A[lane(d, n + 2u)], A[lane(d, n + 3u)]);
  return quadOf(v, q) * LOG2E;
}

/** A·log2(e) of channel d: exp(dt·A) is then exp2(dt·a2). */
fn decayRates(d: u32) -> Lanes {
  return Lanes(aQuad(d, 0u), aQuad(d, 1u), aQuad(d, 2u), aQuad(d, 3u));
}

/**
 * B and C of one token and quad of lanes, loaded a tile ahead by the thread
 * that will store them into sB and sC (thread li holds entry li of the tile).
 */
struct Staged {
  b: vec4<f32>,
  c: vec4<f32>,
}

/** Loads entry li (token li / 4, quad li % 4) of the tile of `count` tokens from row `first`. */
fn loadStaged(li: u32, first: u32, count: u32, withC: bool) -> Staged {
  var staged = Staged(vec4<f32>(0.0), vec4<f32>(0.0));
  if (li < count * 4u) {
    let row = first + li / 4u;
    let q = li % 4u;
    let n = q * 4u;
    let b = vec4<f32>(Bm[lane(row, n)], Bm[lane(row, n + 1u)], Bm[lane(row, n + 2u)], Bm[lane(row, n + 3u)]);
    staged.b = quadOf(b, q);
    if (withC) {
      let c = vec4<f32>(Cm[lane(row, n)], Cm[lane(row, n + 1u)], Cm[lane(row, n + 2u)], Cm[lane(row, n + 3u)]);
      staged.c = quadOf(c, q);
    }
  }
  return staged;
}

/**
 * Starts tile [t, t + TT) of a chunk ending at t1: stores the staged B and C
 * into workgroup memory once every thread is done with the previous tile, and
 * returns the next tile's, loaded now so that their latency overlaps this
 * tile's arithmetic.
 */
fn nextTile(li: u32, w: Task, t: u32, staged: Staged, withC: bool) -> Staged {
  workgroupBarrier();
  if (li < TT * 4u) {
    sB[li] = staged.b;
    sC[li] = staged.c;
  }
  workgroupBarrier();
  let after = min(t + TT, w.t1);
  return loadStaged(li, w.seq + after, min(TT, w.t1 - after), withC);
}

/** u, delta and z of a channel for four consecutive tokens. */
struct Inputs {
  u: vec4<f32>,
  delta: vec4<f32>,
  z: vec4<f32>,
}

/**
 * Loads channel d's inputs of tokens t … t+3 of a chunk (rows past the
 * chunk's last token repeat it). The four loads of each input are in flight
 * together, which a loop over tokens would not give: Naga's loops are not
 * unrolled.
 */
fn loadInputs(w: Task, t: u32, withZ: bool) -> Inputs {
  let last = w.seq + w.t1 - 1u;
  let i = vec4<u32>(
    min(w.seq + t, last),
    min(w.seq + t + 1u, last),
    min(w.seq + t + 2u, last),
    min(w.seq + t + 3u, last),
  ) * p.dim + w.dd;
  var z4 = vec4<f32>(0.0);
  if (withZ) {
    z4 = vec4<f32>(z[i.x], z[i.y], z[i.z], z[i.w]);
  }
  return Inputs(
    vec4<f32>(u[i.x], u[i.y], u[i.z], u[i.w]),
    vec4<f32>(delta[i.x], delta[i.y], delta[i.z], delta[i.w]),
    z4,
  );
}

/** h ← exp2(dt·a2)·h + du·B for staged token k. */
fn advance(h: Lanes, a2: Lanes, dt: f32, du: f32, k: u32) -> Lanes {
  let s = k * 4u;
  return Lanes(
    fma(exp2(dt * a2.q0), h.q0, du * sB[s]),
    fma(exp2(dt * a2.q1), h.q1, du * sB[s + 1u]),
    fma(exp2(dt * a2.q2), h.q2, du * sB[s + 2u]),
    fma(exp2(dt * a2.q3), h.q3, du * sB[s + 3u]),
  );
}

/** C·h for staged token k. */
fn readout(h: Lanes, k: u32) -> f32 {
  let s = k * 4u;
  return dot(h.q0, sC[s]) + dot(h.q1, sC[s + 1u]) + dot(h.q2, sC[s + 2u]) + dot(h.q3, sC[s + 3u]);
}

@compute @workgroup_size(WG)
fn chunk_state(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let w = task(wg, li);
  let a2 = decayRates(w.dd);
  var h = Lanes(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
  var dsum = 0.0;
  var staged = loadStaged(li, w.seq + w.t0, min(TT, w.t1 - w.t0), false);
  var next = loadInputs(w, w.t0, false);
  // Four tokens per iteration; the next four load meanwhile.
  for (var t = w.t0; t < w.t1; t += 4u) {
    let k = (t - w.t0) % TT;
    if (k == 0u) {
      staged = nextTile(li, w, t, staged, false);
    }
    let now = next;
    next = loadInputs(w, t + 4u, false);
    let n = w.t1 - t;
    let dt = stepSizes(now.delta, w.dd);
    h = advance(h, a2, dt.x, dt.x * now.u.x, k);
    dsum += dt.x;
    if (n > 1u) {
      h = advance(h, a2, dt.y, dt.y * now.u.y, k + 1u);
      dsum += dt.y;
    }
    if (n > 2u) {
      h = advance(h, a2, dt.z, dt.z * now.u.z, k + 2u);
      dsum += dt.z;
    }
    if (n > 3u) {
      h = advance(h, a2, dt.w, dt.w * now.u.w, k + 3u);
      dsum += dt.w;
    }
  }
  if (w.inRange) {
    let base = (w.b * p.nChunks + w.c) * p.dim + w.d;
    hbuf[base * 4u] = h.q0;
    hbuf[base * 4u + 1u] = h.q1;
    hbuf[base * 4u + 2u] = h.q2;
    hbuf[base * 4u + 3u] = h.q3;
    dtsum[base] = dsum;
  }
}

/** Four consecutive chunks' end states (one quad of lanes) and Σdt, as chunk_state left them. */
struct ChunkEnds {
  h0: vec4<f32>,
  h1: vec4<f32>,
  h2: vec4<f32>,
  h3: vec4<f32>,
  dtsum: vec4<f32>,
}

/** Index of chunk c's entry for sequence b, channel d in dtsum (hbuf: times 4, plus the quad). */
fn chunkEntry(b: u32, c: u32, d: u32) -> u32 {
  return (b * p.nChunks + min(c, p.nChunks - 1u)) * p.dim + d;
}

/** Loads chunks c … c+3 (clamped to the last) together, as loadInputs does tokens. */
fn loadChunkEnds(b: u32, c: u32, d: u32, q: u32) -> ChunkEnds {
  let e = vec4<u32>(chunkEntry(b, c, d), chunkEntry(b, c + 1u, d), chunkEntry(b, c + 2u, d), chunkEntry(b, c + 3u, d));
  return ChunkEnds(
    hbuf[e.x * 4u + q],
    hbuf[e.y * 4u + q],
    hbuf[e.z * 4u + q],
    hbuf[e.w * 4u + q],
    vec4<f32>(dtsum[e.x], dtsum[e.y], dtsum[e.z], dtsum[e.w]),
  );
}

/**
 * Chunk c takes h as its start state; returns the next chunk's start state,
 * from chunk c's zero-start end state `end` and its Σdt.
 */
fn carryOver(b: u32, c: u32, d: u32, q: u32, a2: vec4<f32>, h: vec4<f32>, end: vec4<f32>, dsum: f32) -> vec4<f32> {
  hbuf[chunkEntry(b, c, d) * 4u + q] = h;
  return fma(exp2(a2 * dsum), h, end);
}

@compute @workgroup_size(256)
fn carry(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  // One thread per (sequence, channel, quad of lanes). Only the first
  // nChunks - 1 chunks have end states; the last takes its start state only.
  let g = (wg.y * nwg.x + wg.x) * 256u + li;
  if (g >= p.batch * p.dim * 4u) {
    return;
  }
  let q = g % 4u;
  let bd = g / 4u;
  let d = bd % p.dim;
  let b = bd / p.dim;
  let a2 = aQuad(d, q);
  var h = stateQuad(stateRow(b, d), q);
  let ends = p.nChunks - 1u;
  var next = loadChunkEnds(b, 0u, d, q);
  // Four chunks per iteration; the next four load meanwhile.
  for (var c = 0u; c < ends; c += 4u) {
    let now = next;
    next = loadChunkEnds(b, c + 4u, d, q);
    h = carryOver(b, c, d, q, a2, h, now.h0, now.dtsum.x);
    if (c + 1u < ends) {
      h = carryOver(b, c + 1u, d, q, a2, h, now.h1, now.dtsum.y);
    }
    if (c + 2u < ends) {
      h = carryOver(b, c + 2u, d, q, a2, h, now.h2, now.dtsum.z);
    }
    if (c + 3u < ends) {
      h = carryOver(b, c + 3u, d, q, a2, h, now.h3, now.dtsum.w);
    }
  }
  hbuf[chunkEntry(b, ends, d) * 4u + q] = h;
}

/** What the output pass needs besides the state and the token's inputs. */
struct OutputPass {
  skip: f32, // D of the channel in the last group, else 0
  first: bool, // first group of states: y holds nothing yet
  last: bool, // last group: apply D and the gate
  hasZ: bool,
}

/** Writes y of the token at `row` (its index in u) from staged token k, after h took it in. */
fn emit(o: OutputPass, w: Task, h: Lanes, row: u32, ui: f32, zi: f32, k: u32) {
  var acc = fma(o.skip, ui, readout(h, k));
  if (!o.first) {
    acc += y[row]; // the earlier groups' C·h
  }
  if (o.hasZ && o.last) {
    acc *= zi / (1.0 + exp(-zi));
  }
  if (w.inRange) {
    y[row] = acc;
  }
}

@compute @workgroup_size(WG)
fn output(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let w = task(wg, li);
  let hasZ = (p.flags & 2u) != 0u;
  let last = p.group + 1u == p.nGroups;
  let a2 = decayRates(w.dd);
  let row = stateRow(w.b, w.dd);
  var h: Lanes;
  if (p.nChunks == 1u) {
    h = Lanes(stateQuad(row, 0u), stateQuad(row, 1u), stateQuad(row, 2u), stateQuad(row, 3u));
  } else {
    let base = ((w.b * p.nChunks + w.c) * p.dim + w.dd) * 4u;
    h = Lanes(hbuf[base], hbuf[base + 1u], hbuf[base + 2u], hbuf[base + 3u]);
  }
  var skip = 0.0;
  if ((p.flags & 1u) != 0u && last) {
    skip = Dv[w.dd];
  }
  let o = OutputPass(skip, p.group == 0u, last, hasZ);
  var staged = loadStaged(li, w.seq + w.t0, min(TT, w.t1 - w.t0), true);
  var next = loadInputs(w, w.t0, hasZ);
  // Four tokens per iteration, as in chunk_state.
  for (var t = w.t0; t < w.t1; t += 4u) {
    let k = (t - w.t0) % TT;
    if (k == 0u) {
      staged = nextTile(li, w, t, staged, true);
    }
    let now = next;
    next = loadInputs(w, t + 4u, hasZ);
    let n = w.t1 - t;
    let i = (w.seq + t) * p.dim + w.dd;
    let dt = stepSizes(now.delta, w.dd);
    h = advance(h, a2, dt.x, dt.x * now.u.x, k);
    emit(o, w, h, i, now.u.x, now.z.x, k);
    if (n > 1u) {
      h = advance(h, a2, dt.y, dt.y * now.u.y, k + 1u);
      emit(o, w, h, i + p.dim, now.u.y, now.z.y, k + 1u);
    }
    if (n > 2u) {
      h = advance(h, a2, dt.z, dt.z * now.u.z, k + 2u);
      emit(o, w, h, i + 2u * p.dim, now.u.z, now.z.z, k + 2u);
    }
    if (n > 3u) {
      h = advance(h, a2, dt.w, dt.w * now.u.w, k + 3u);
      emit(o, w, h, i + 3u * p.dim, now.u.w, now.z.w, k + 3u);
    }
  }
  if (w.inRange && w.c + 1u == p.nChunks) {
    storeStateQuad(row, 0u, h.q0);
    storeStateQuad(row, 1u, h.q1);
    storeStateQuad(row, 2u, h.q2);
    storeStateQuad(row, 3u, h.q3);
  }
}

/**
 * Element i of dt_proj's weight, stored as f32, or as f16 (flag 16) or bf16
 * (flag 64, each the top half of its f32) packed two per u32 (low half first).
 */
fn dtProjAt(i: u32) -> f32 {
  if ((p.flags & 16u) != 0u) {
    return unpack2x16float(dtProj[i / 2u])[i % 2u];
  }
  if ((p.flags & 64u) != 0u) {
    return bitcast<f32>((dtProj[i / 2u] << (16u - 16u * (i % 2u))) & 0xffff0000u);
  }
  return bitcast<f32>(dtProj[i]);
}

/**
 * Elements i to i + 3 of dt_proj's weight: decoded from its blocks (whose
 * rows, and so rank, are a multiple of 32: i is a multiple of 4 there), else
 * element by element.
 */
fn dtProjQuad(i: u32) -> vec4<f32> {
  let k = i / 4u;
  if ((p.flags & 128u) != 0u) {
    let at = q8_0Words(k);
    return q8_0Quad(dtProj[at.x], dtProj[at.y]);
  }
  if ((p.flags & 256u) != 0u) {
    let at = q4_0Words(k);
    return q4_0Quad(k, dtProj[at.x], dtProj[at.y]);
  }
  if ((p.flags & 512u) != 0u) {
    let at = q4_kWords(k);
    return q4_kQuad(k, dtProj[at.x], dtProj[at.x + 1u], dtProj[at.y], dtProj[at.z], dtProj[at.w]);
  }
  return vec4<f32>(dtProjAt(i), dtProjAt(i + 1u), dtProjAt(i + 2u), dtProjAt(i + 3u));
}

/** dt[k] of the sequence whose dt starts at dtLow[x]. */
fn dtAt(x: u32, k: u32) -> f32 {
  if (PROJECTED != 0u) {
    return projectedAt(k);
  }
  return dtLow[x + k];
}

/** dt[x + k … x + k + 3] times a quad of dt_proj, for k + 4 ≤ rank. */
fn dtTimes(x: u32, k: u32, weights: vec4<f32>) -> vec4<f32> {
  return vec4<f32>(dtAt(x, k), dtAt(x, k + 1u), dtAt(x, k + 2u), dtAt(x, k + 3u)) * weights;
}

/** dt[x + k … x + k + 3] · dt_proj[w + k … w + k + 3], for k + 4 ≤ rank. */
fn dtTerms(x: u32, w: u32, k: u32) -> vec4<f32> {
  return dtTimes(x, k, dtProjQuad(w + k));
}

/**
 * Thread q's first four quads of dt_proj's row d (terms 4q, 4q + 16, 4q + 32
 * and 4q + 48; zero past the rank's whole quads). A decode step loads them
 * before it waits for dt, so that their latency overlaps that wait.
 */
struct DeltaWeights {
  q0: vec4<f32>,
  q1: vec4<f32>,
  q2: vec4<f32>,
  q3: vec4<f32>,
}

/** dt_proj's quad at w + k, zero past the rank's whole quads. */
fn deltaQuad(w: u32, k: u32) -> vec4<f32> {
  if (k + 4u > p.rank) {
    return vec4<f32>(0.0);
  }
  return dtProjQuad(w + k);
}

/** The DeltaWeights of thread q of channel d. */
fn deltaWeights(d: u32, q: u32) -> DeltaWeights {
  let w = d * p.rank;
  let k = 4u * q;
  return DeltaWeights(deltaQuad(w, k), deltaQuad(w, k + 16u), deltaQuad(w, k + 32u), deltaQuad(w, k + 48u));
}

/** dt[x + k … x + k + 3] times a quad of dt_proj, zero past the rank's whole quads. */
fn deltaPart(x: u32, k: u32, weights: vec4<f32>) -> vec4<f32> {
  if (k + 4u > p.rank) {
    return vec4<f32>(0.0);
  }
  return dtTimes(x, k, weights);
}

/**
 * Thread q's share (q = 0 … 3) of channel d's raw delta for sequence b, dt[b]
 * · dt_proj[d]: the quads of terms 4q, 4q + 16, … (the first four from
 * `first`, the rest two per iteration, written out, so that their loads are in
 * flight together), and term 4⌊rank/4⌋ + q of the tail. The four shares add
 * up to the whole product.
 */
fn deltaShare(b: u32, d: u32, q: u32, first: DeltaWeights) -> f32 {
  let x = b * p.rank;
  let w = d * p.rank;
  var k = 4u * q;
  var sums = (deltaPart(x, k, first.q0) + deltaPart(x, k + 16u, first.q1)) +
    (deltaPart(x, k + 32u, first.q2) + deltaPart(x, k + 48u, first.q3));
  k += 64u;
  for (; k + 20u <= p.rank; k += 32u) {
    sums += dtTerms(x, w, k) + dtTerms(x, w, k + 16u);
  }
  if (k + 4u <= p.rank) {
    sums += dtTerms(x, w, k);
  }
  var share = (sums.x + sums.y) + (sums.z + sums.w);
  let tail = p.rank / 4u * 4u + q;
  if (tail < p.rank) {
    share = fma(dtAt(x, tail), dtProjAt(w + tail), share);
  }
  return share;
}

/** Lanes 4q … 4q+3 of this group of sequence b's B (or C with `ofC`): a decode step's one token. */
fn tokenQuad(b: u32, q: u32, ofC: bool) -> vec4<f32> {
  let n = q * 4u;
  var v: vec4<f32>;
  if (PROJECTED != 0u) {
    // lane(0, n) is state n's index within a row of B or C.
    var first = p.rank;
    if (ofC) {
      first += p.nState;
    }
    v = vec4<f32>(
      projectedAt(first + lane(0u, n)),
      projectedAt(first + lane(0u, n + 1u)),
      projectedAt(first + lane(0u, n + 2u)),
      projectedAt(first + lane(0u, n + 3u)),
    );
  } else if (ofC) {
    v = vec4<f32>(Cm[lane(b, n)], Cm[lane(b, n + 1u)], Cm[lane(b, n + 2u)], Cm[lane(b, n + 3u)]);
  } else {
    v = vec4<f32>(Bm[lane(b, n)], Bm[lane(b, n + 1u)], Bm[lane(b, n + 2u)], Bm[lane(b, n + 3u)]);
  }
  return quadOf(v, q);
}

// step: the four threads of a channel exchange their shares of delta and of
// C·h here, the channel's in entries 4c … 4c + 3.
var<workgroup> shares: array<f32, WG>;

/** The sum of the four shares of the calling thread's channel; every thread must call it. */
fn sumShares(li: u32, share: f32) -> f32 {
  shares[li] = share;
  workgroupBarrier();
  let c = li & ~3u;
  let sum = ((shares[c] + shares[c + 1u]) + shares[c + 2u]) + shares[c + 3u];
  workgroupBarrier(); // shares is reused
  return sum;
}

/** What a thread of `step` or `step_vec4` works on: channel d (dd clamped) of sequence b, lanes 4q … 4q+3. */
struct StepTask {
  d: u32,
  dd: u32,
  q: u32,
  b: u32,
  row: u32, // of u, z and y
  held: u32, // of state
}

fn stepTask(wg: vec3u, li: u32) -> StepTask {
  let d = wg.x * (WG / 4u) + li / 4u;
  let dd = min(d, p.dim - 1u);
  let b = wg.z;
  return StepTask(d, dd, li % 4u, b, b * p.dim + dd, stateRow(b, dd));
}

/** A thread's new states, its channel's C·h (summed over the four threads), its input u, and D and z. */
struct StepResult {
  h: vec4<f32>,
  sum: f32,
  ur: f32,
  dv: f32,
  zi: f32,
}

/**
 * The step from the thread's states h0, loaded by the caller first. Everything
 * but dt, B and C (the states, A, u, the first quads of dt_proj, D and z) is
 * in flight before the exchanges, so that those loads overlap the wait for dt
 * rather than follow it.
 */
fn stepStates(li: u32, t: StepTask, h0: vec4<f32>) -> StepResult {
  let a2 = aQuad(t.dd, t.q);
  let ur = u[t.row];
  let weights = deltaWeights(t.dd, t.q);
  let dz = skipAndGate(t);
  let bias = biasOf(t.dd);
  if (PROJECTED != 0u) {
    sumProjection(t.b, li);
  }
  let bq = tokenQuad(t.b, t.q, false);
  let cq = tokenQuad(t.b, t.q, true);
  let dt = stepSizeBiased(sumShares(li, deltaShare(t.b, t.dd, t.q, weights)) + bias);
  let h = fma(exp2(dt * a2), h0, dt * ur * bq);
  return StepResult(h, sumShares(li, dot(h, cq)), ur, dz.x, dz.y);
}

/** D and z of the thread's channel where its last group applies them, else 0. */
fn skipAndGate(t: StepTask) -> vec2<f32> {
  var dz = vec2<f32>(0.0);
  if (p.group + 1u == p.nGroups) {
    if ((p.flags & 1u) != 0u) {
      dz.x = Dv[t.dd];
    }
    if ((p.flags & 2u) != 0u) {
      dz.y = z[t.row];
    }
  }
  return dz;
}

/** y of the thread's channel from its C·h (thread 0 of the four). */
fn stepOutput(t: StepTask, r: StepResult) {
  var acc = r.sum;
  if (p.group != 0u) {
    acc += y[t.row]; // the earlier groups' C·h
  }
  if (p.group + 1u == p.nGroups) {
    if ((p.flags & 1u) != 0u) {
      acc = fma(r.dv, r.ur, acc);
    }
    if ((p.flags & 2u) != 0u) {
      acc *= r.zi / (1.0 + exp(-r.zi));
    }
  }
  y[t.row] = acc;
}

// Four threads per channel, thread q holding lanes 4q … 4q+3 of its 16
// states: a decode step is latency-bound, and splitting a channel's loads and
// its dt_proj product four ways shortens each thread's chain and spreads the
// step over four times the workgroups.
@compute @workgroup_size(WG)
fn step(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let t = stepTask(wg, li);
  let r = stepStates(li, t, stateQuad(t.held, t.q));
  if (t.d >= p.dim) {
    return;
  }
  storeStateQuad(t.held, t.q, r.h);
  if (t.q == 0u) {
    stepOutput(t, r);
  }
}

// step for nState a multiple of 4: a thread's four states are one vec4 of
// state4, one load and one store rather than four of each.
@compute @workgroup_size(WG)
fn step_vec4(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let t = stepTask(wg, li);
  let held = heldQuad(t);
  finishQuadStep(t, held, stepStates(li, t, held.h0));
}

/** A thread's four states in state4, for step_vec4 and step_quads. */
struct HeldQuad {
  n: u32, // the first of them, within the channel's nState
  at: u32, // their index in state4
  valid: bool, // n < nState: the thread holds states of this group
  h0: vec4<f32>, // their values, 0 where not valid
}

fn heldQuad(t: StepTask) -> HeldQuad {
  let n = p.group * 16u + t.q * 4u;
  let at = (t.held * p.nState + n) / 4u;
  var h0 = vec4<f32>(0.0);
  if (n < p.nState) {
    h0 = state4[at];
  }
  return HeldQuad(n, at, n < p.nState, h0);
}

/** The end of step_vec4 and step_quads: the thread's new states (if valid) back in state4, y. */
fn finishQuadStep(t: StepTask, held: HeldQuad, r: StepResult) {
  if (t.d >= p.dim) {
    return;
  }
  if (held.valid) {
    state4[held.at] = r.h;
  }
  if (t.q == 0u) {
    stepOutput(t, r);
  }
}

/**
 * Thread q's share of channel d's raw delta for sequence b (as deltaShare),
 * from whole vec4s of dt and an f32 dt_proj: quads q, q + 4, q + 8, … of the
 * rank's, three loads of each in flight at a time.
 */
fn deltaShareQuads(b: u32, d: u32, q: u32) -> f32 {
  let quads = p.rank / 4u;
  let x = b * quads;
  let w = d * quads;
  var sums = vec4<f32>(0.0);
  var k = q;
  for (; k + 8u < quads; k += 12u) {
    sums += (dtLow4[x + k] * dtProj4[w + k] + dtLow4[x + k + 4u] * dtProj4[w + k + 4u]) +
      dtLow4[x + k + 8u] * dtProj4[w + k + 8u];
  }
  for (; k < quads; k += 4u) {
    sums += dtLow4[x + k] * dtProj4[w + k];
  }
  return (sums.x + sums.y) + (sums.z + sums.w);
}

// step_vec4 where A, B, C and dt are whole vec4s and dt_proj is f32: each of
// those is one vec4 load rather than four scalar ones, which at large batches
// spend the step's time in the cache (docs/performance.md).
@compute @workgroup_size(WG)
fn step_quads(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let t = stepTask(wg, li);
  let held = heldQuad(t);
  var a2 = vec4<f32>(0.0);
  var bq = vec4<f32>(0.0);
  var cq = vec4<f32>(0.0);
  if (held.valid) {
    a2 = A4[(t.dd * p.nState + held.n) / 4u] * LOG2E;
    bq = B4[(t.b * p.nState + held.n) / 4u];
    cq = C4[(t.b * p.nState + held.n) / 4u];
  }
  let ur = u[t.row];
  let dz = skipAndGate(t);
  let bias = biasOf(t.dd);
  let dt = stepSizeBiased(sumShares(li, deltaShareQuads(t.b, t.dd, t.q)) + bias);
  let h = fma(exp2(dt * a2), held.h0, dt * ur * bq);
  finishQuadStep(t, held, StepResult(h, sumShares(li, dot(h, cq)), ur, dz.x, dz.y));
}
