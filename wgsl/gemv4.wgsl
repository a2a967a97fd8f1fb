// out [rows, outDim] = x [rows, inDim] · weightᵀ + bias for inDim % 4 == 0: the
// GEMV of decode steps. Each weight is read once per ROWS rows, as vec4s: LANES
// threads per output stride along the row (LANES · 16 contiguous bytes per
// step), 256 / LANES outputs per workgroup, partial sums reduced in workgroup
// memory. ROWS (1 to 4) and LANES are specialised per pipeline (the backend
// picks LANES by shape), so the accumulators are plain registers;
// more rows (a batch of decode steps) run in groups of ROWS, the groups of one
// block of outputs in neighbouring workgroups, so that the later ones find the
// block's weights in L2 (lm_head's 154 MB do not fit there whole).
// With hasNorm, x's rows are RMS-normalised with normWeight first (the
// block's norm before in_proj, norm_f before lm_head, and Mamba-2's gated
// norm before out_proj, whose gate the SSD step has applied): each workgroup
// computes its rows' scales itself, which costs less than a dispatch. At one
// row the lanes of its first output read every vec4 of x anyway, so they sum
// the squares on the way and reduce them with their products (at more rows
// that measured slower than a pass over x of its own, as did loading the
// conv's inputs ahead). With
// convKernel, out's columns take a decode step's causal conv (in_proj's x),
// and with gemv4_shares.wgsl prepended, a projection of the conv's outputs
// (x_proj) follows, as partial sums per workgroup that its reader adds up.
// Prepended by the backend: linear_io.wgsl (parameters, bias, out),
// weight_f32.wgsl or weight_f16.wgsl (the weight and its accessors), and
// gemv4_shares.wgsl or gemv4_no_shares.wgsl (loadProjAhead, keepConvOut and
// projectBlock).

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> normWeight: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> convWeight: array<f32>; // [split1, convKernel]
@group(0) @binding(9) var<storage, read> convBias: array<f32>; // [split1]
@group(0) @binding(10) var<storage, read_write> convState: array<f32>; // [states, convKernel - 1, split1]
@group(0) @binding(13) var<storage, read> convSlots: array<f32>; // with convSlots: row r's state row

// With convKernel > 0 (decode steps), the columns of out go through a causal
// conv step before they are stored: row r is one token of sequence r, whose
// last convKernel - 1 inputs convState holds in row convSlots[r] (with
// p.convSlots, a pool of states), else in row r.
//
// Where sequence r's conv state starts, for channel c.
fn convBase(r: u32, c: u32) -> u32 {
  var held = r;
  if (p.convSlots != 0u) {
    held = u32(convSlots[r]);
  }
  return held * (p.convKernel - 1u) * p.split1 + c;
}

// convStep's loads at one row, made as the workgroup starts (loadConvAhead)
// by the thread that stores the row's output, so that the conv does not wait
// on them after the GEMV: the taps' weights, the bias and the held inputs
// (oldest first), for kernels of at most 4 taps.
var<private> convAhead: bool;
var<private> convAheadWeights: vec4<f32>;
var<private> convAheadBias: f32;
var<private> convAheadHeld: vec4<f32>;

// Component i of v, by selects: indexing a private vector in a loop would
// move it to slow local memory.
fn component(v: vec4<f32>, i: u32) -> f32 {
  return select(select(v.x, v.y, i == 1u), select(v.z, v.w, i == 3u), i >= 2u);
}

fn loadConvAhead(c: u32) {
  let taps = p.convKernel;
  if (taps == 0u || taps > 4u || c >= p.split1) {
    return;
  }
  convAhead = true;
  let w = c * taps;
  let base = convBase(row0, c);
  convAheadWeights.x = convWeight[w];
  if (taps > 1u) {
    convAheadWeights.y = convWeight[w + 1u];
    convAheadHeld.x = convState[base];
  }
  if (taps > 2u) {
    convAheadWeights.z = convWeight[w + 2u];
    convAheadHeld.y = convState[base + p.split1];
  }
  if (taps > 3u) {
    convAheadWeights.w = convWeight[w + 3u];
    convAheadHeld.z = convState[base + 2u * p.split1];
  }
  if (p.convHasBias != 0u) {
    convAheadBias = convBias[c];
  }
}

// silu(conv + bias) of channel c for sequence r, whose newest input is v;
// shifts v into the sequence's conv state (oldest input first). Only the thread
// storing (r, c) touches that channel's state.
fn convStep(r: u32, c: u32, v: f32) -> f32 {
  let taps = p.convKernel;
  let channels = p.split1;
  let base = convBase(r, c);
  var sum: f32;
  if (convAhead) {
    sum = component(convAheadWeights, taps - 1u) * v;
    if (p.convHasBias != 0u) {
      sum += convAheadBias;
    }
    for (var k = 0u; k + 1u < taps; k++) {
      sum = fma(component(convAheadWeights, k), component(convAheadHeld, k), sum);
      var next = v;
      if (k + 2u < taps) {
        next = component(convAheadHeld, k + 1u);
      }
      convState[base + k * channels] = next;
    }
    return sum / (1.0 + exp(-sum));
  }
  sum = convWeight[c * taps + taps - 1u] * v;
  if (p.convHasBias != 0u) {
    sum += convBias[c];
  }
  for (var k = 0u; k + 1u < taps; k++) {
    let held = convState[base + k * channels];
    sum = fma(convWeight[c * taps + k], held, sum);
    var next = v;
    if (k + 2u < taps) {
      next = convState[base + (k + 1u) * channels];
    }
    convState[base + k * channels] = next;
  }
  return sum / (1.0 + exp(-sum));
}

const ROWS: u32 = 1u;
const LANES: u32 = 32u; // threads per output, 8 to 256 (specialised per pipeline)
const PER_GROUP: u32 = 256u / LANES; // outputs per workgroup

var<workgroup> red: array<vec4<f32>, 256>; // row r's partial sum in component r
var<workgroup> laneSquares: array<f32, LANES>; // with hasNorm at one row: the lanes' sums of squares

// The group's first row, row r's running sums and, at one row with hasNorm
// in the lanes of the workgroup's first output, the row's sum of squares
// (module scope, so madd can update them).
var<private> row0: u32;
var<private> acc0: vec4<f32>;
var<private> acc1: vec4<f32>;
var<private> acc2: vec4<f32>;
var<private> acc3: vec4<f32>;
var<private> sumsSquares: bool;
var<private> rowSquares: f32;

// Adds weight vec4 w times vec4 k of each row of x (times the norm's weight).
fn madd(weight4: vec4<f32>, k: u32, k4: u32) {
  var w = weight4;
  if (p.hasNorm != 0u) {
    w *= normWeight[k];
  }
  let base = row0 * k4 + k;
  let x0 = xAt(base);
  acc0 = fma(w, x0, acc0);
  if (sumsSquares) {
    rowSquares += dot(x0, x0); // one row: there is no other
  }
  if (hasRow(1u)) {
    acc1 = fma(w, xAt(base + k4), acc1);
  }
  if (hasRow(2u)) {
    acc2 = fma(w, xAt(base + 2u * k4), acc2);
  }
  if (hasRow(3u)) {
    acc3 = fma(w, xAt(base + 3u * k4), acc3);
  }
}

// storeOut, with out's columns through the conv step when there is one;
// returns the value stored.
fn store(r: u32, c: u32, sum: f32) -> f32 {
  var v = withBias(c, sum);
  if (p.convKernel != 0u && p.colOffset + c < p.split1) {
    v = convStep(r, p.colOffset + c, v);
  }
  storeValue(r, c, v);
  return v;
}

// Whether row r of the group exists (the last group may have fewer than ROWS).
fn hasRow(r: u32) -> bool {
  return ROWS > r && row0 + r < p.rows;
}

// 1 / sqrt(mean(x²) + eps) of each row of the group, in component r, from x
// read again (ROWS > 1); every thread of the workgroup must call it (it
// reduces through workgroup memory).
fn rowScales(li: u32, k4: u32) -> vec4<f32> {
  var squares = vec4<f32>(0.0);
  for (var k = li; k < k4; k += 256u) {
    let base = row0 * k4 + k;
    let v0 = xAt(base);
    squares.x += dot(v0, v0);
    if (hasRow(1u)) {
      let v = xAt(base + k4);
      squares.y += dot(v, v);
    }
    if (hasRow(2u)) {
      let v = xAt(base + 2u * k4);
      squares.z += dot(v, v);
    }
    if (hasRow(3u)) {
      let v = xAt(base + 3u * k4);
      squares.w += dot(v, v);
    }
  }
  red[li] = squares;
  workgroupBarrier();
  for (var stride = 128u; stride > 0u; stride >>= 1u) {
    if (li < stride) {
      red[li] += red[li + stride];
    }
    workgroupBarrier();
  }
  let scales = inverseSqrt(red[0] / f32(p.inDim) + p.normEps);
  workgroupBarrier(); // red is reused for the sums
  return scales;
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let lane = li % LANES;
  let flat = wg.y * nwg.x + wg.x;
  let rowGroups = (p.rows + ROWS - 1u) / ROWS;
  let o = (flat / rowGroups) * PER_GROUP + li / LANES;
  row0 = (flat % rowGroups) * ROWS;
  let k4 = p.inDim / 4u;
  // The first output's lanes cover x: the workgroup's first output is in range.
  sumsSquares = ROWS == 1u && p.hasNorm != 0u && li < LANES;
  loadProjAhead(flat / rowGroups, li);
  if (ROWS == 1u && lane == 0u && o < p.outDim) {
    loadConvAhead(p.colOffset + o);
  }
  if (o < p.outDim) {
    let wBase = o * k4;
    // Four loads per iteration, written out: the driver does not unroll the
    // loop, and one load in flight per thread leaves a short GEMV waiting on
    // memory latency once per iteration.
    var k = lane;
    for (; k + 3u * LANES < k4; k += 4u * LANES) {
      let w0 = weight4At(wBase + k);
      let w1 = weight4At(wBase + k + LANES);
      let w2 = weight4At(wBase + k + 2u * LANES);
      let w3 = weight4At(wBase + k + 3u * LANES);
      madd(w0, k, k4);
      madd(w1, k + LANES, k4);
      madd(w2, k + 2u * LANES, k4);
      madd(w3, k + 3u * LANES, k4);
    }
    for (; k < k4; k += LANES) {
      madd(weight4At(wBase + k), k, k4);
    }
  }
  let ones = vec4<f32>(1.0);
  var scales = ones;
  if (ROWS > 1u && p.hasNorm != 0u) {
    scales = rowScales(li, k4);
  }
  red[li] = vec4<f32>(dot(acc0, ones), dot(acc1, ones), dot(acc2, ones), dot(acc3, ones));
  if (sumsSquares) {
    laneSquares[li] = rowSquares;
  }
  workgroupBarrier();
  for (var stride = LANES / 2u; stride > 0u; stride >>= 1u) {
    if (lane < stride) {
      red[li] += red[li + stride];
      if (sumsSquares) {
        laneSquares[li] += laneSquares[li + stride];
      }
    }
    workgroupBarrier();
  }
  if (ROWS == 1u && p.hasNorm != 0u) {
    // 1 / sqrt(mean(x²) + eps) of the row.
    scales = vec4<f32>(inverseSqrt(laneSquares[0] / f32(p.inDim) + p.normEps));
  }
  if (lane == 0u) {
    // Outputs past the end, and rows past the last, add nothing to the projection.
    var stored = vec4<f32>(0.0);
    if (o < p.outDim) {
      let sums = red[li] * scales;
      stored.x = store(row0, o, sums.x);
      if (hasRow(1u)) {
        stored.y = store(row0 + 1u, o, sums.y);
      }
      if (hasRow(2u)) {
        stored.z = store(row0 + 2u, o, sums.z);
      }
      if (hasRow(3u)) {
        stored.w = store(row0 + 3u, o, sums.w);
      }
    }
    if (o >= p.split1) {
      stored = vec4<f32>(0.0); // a column of z
    }
    keepConvOut(li / LANES, stored);
  }
  projectBlock(flat / rowGroups, li);
}
