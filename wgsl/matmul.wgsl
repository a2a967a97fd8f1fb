// out [rows, outDim] = x [rows, inDim] · weightᵀ + bias, weight [outDim, inDim]:
// the linear layers of prefill (rows > 4). Two entry points; the backend picks
// one and its constants by shape (linearProgram in src/backends/webgpu/linear.ts).
//
// main: a register-blocked SGEMM. A workgroup computes a TM×TN tile of out,
// each thread an 8×8 block in 16 named vec4 accumulators: rows 4ty..4ty+3 and
// TM/2+4ty.., columns 4tx..4tx+3 and TN/2+4tx... Per k, a thread reads 2 vec4s
// of x and 2 of weight from workgroup memory for 64 FMAs (the old 4×4 blocks
// read 8 scalars for 16). The k loop runs over slices of BK = 8 or 16, staged
// transposed (k-major, so those reads are vec4s) in two buffers: the next slice
// is fetched from global memory into registers before the current one is used
// and stored after it, so the fetch latency hides behind the math and one
// barrier per slice suffices. With inDim % 4 == 0 (VEC4 = 1) the fetches are
// vec4s, else bounds-checked scalars. 2 · BK · (TM + TN) floats stay within the
// 16 KiB that any WebGPU device allows: slices of 16 fit 64×64 tiles only, and
// a thread fetches at most 2 vec4s of each per slice. Large outputs take 128×64
// tiles (128 threads; 128×128 measured about as fast), or for 64 rows at most
// (a batch of decode steps) 64×64 ones, or 32×64 and 64×128 for 32 and 64 rows
// at most of a wide output (lm_head), where gemv4 would read it once per 4 rows
// (and 64×64 tiles would read x twice as often). 8×8 blocks leave few threads
// on smaller outputs (512 × 1536 is 96 such tiles for 132 SMs), so there the
// backend takes 64×64 tiles with KSPLIT = 2: two groups of threads take the
// first and last half of each slice, and the second hands its sums to the first
// at the end (TN = 64 only, for the hand-over to fit in xs). Where even those
// tiles are too few (a batch of decode steps: 64 × 3072, 256 × 768), K is split
// over KPARTS workgroups too (the grid's z), as many as fill one wave of the
// GPU: each writes its partial sums to `partial` (matmul_parts.wgsl) and
// matmul_sum.wgsl adds them up, bias and all; a tile then runs a short k loop
// instead of a long one on a few SMs.
//
// skinny: outDim ≤ 128 (x_proj's 16 and 48 columns) gives main a handful of
// tiles with a long k loop each, so each output is split over LANES threads
// along K instead: a thread computes a 4×4 block of out over every LANES-th vec4
// of K, straight from global memory (the weight is small and stays in cache),
// then the lanes' partial sums meet in workgroup memory. Needs inDim % 4 == 0.
// The backend also takes it for 33 to 64 rows through a narrow matrix with a
// long K (out_proj), where main's few tiles would be split over K and summed.
//
// Accumulators are module-scope private vec4s, updated by small functions
// called with constant arguments: a private array indexed in a loop (or a k
// loop that the driver does not unroll) would land in slow local memory.
// Prepended by the backend: linear_io.wgsl (parameters, bias, outputs and
// storeOut), weight_f32.wgsl or weight_f16.wgsl (the weight and its accessors),
// block8x8.wgsl (the accumulators and their outer product) and
// matmul_whole.wgsl or matmul_parts.wgsl (where main's sums go: putSum).

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

const TM: u32 = 128u; // rows of out per workgroup of main (64 or 128)
const TN: u32 = 64u; // columns of out per workgroup of main (64 or 128)
const KSPLIT: u32 = 1u; // thread groups per tile of main, 1 or 2 (with TN = 64)
const KPARTS: u32 = 1u; // workgroups sharing one tile of main over K (grid z)
const VEC4: u32 = 1u; // 1 when inDim % 4 == 0: rows of x and weight read as vec4s
const LANES: u32 = 32u; // threads sharing one 4×4 block of out in skinny (a power of two, 4 to 256)
// k per slice of main, 8 or 16, with BK / KSPLIT = 4 or 8 (step() calls are written out)
const BK: u32 = 8u;
const QUADS: u32 = BK / 4u; // vec4s of a row of x or of the weight in a slice
const BLOCKS: u32 = TM * TN / 64u; // threads per group of main
const THREADS: u32 = KSPLIT * BLOCKS;

// [2][BK][TM] and [2][BK][TN] floats: transposed slices of x and weight.
var<workgroup> xs: array<vec4<f32>, 2u * BK * TM / 4u>;
var<workgroup> ws: array<vec4<f32>, 2u * BK * TN / 4u>;
// skinny's partial sums: 4 vec4s per thread (a pipeline counts only the
// workgroup memory that its entry point uses).
var<workgroup> red: array<vec4<f32>, 1024>;

// The thread's block: acc0a … acc7b of block8x8.wgsl (prepended); skinny
// uses them differently (see skinnyStep).

// x[r, k], 0 past the end of the row.
fn xAt(r: u32, k: u32) -> f32 {
  if (k >= p.inDim) {
    return 0.0;
  }
  let i = r * p.inDim + k;
  return x[i / 4u][i % 4u];
}

// weight[c, k], 0 past the end of the row.
fn wAt(c: u32, k: u32) -> f32 {
  if (k >= p.inDim) {
    return 0.0;
  }
  return weightAt(c * p.inDim + k);
}

// A slice of x is QUADS·TM vec4s: element e is row e / QUADS, k 4·(e % QUADS),
// so QUADS threads read a row's BK contiguous floats. Elements past it
// (e ≥ QUADS·TM, where threads outnumber them) fetch and stash nothing.
// Likewise fetchW over TN columns.
fn fetchX(e: u32, row0: u32, k0: u32) -> vec4<f32> {
  let r = row0 + e / QUADS;
  let k = k0 + 4u * (e % QUADS);
  if (e >= QUADS * TM || r >= p.rows) {
    return vec4<f32>(0.0);
  }
  if (VEC4 == 1u) {
    if (k >= p.inDim) {
      return vec4<f32>(0.0);
    }
    return x[(r * p.inDim + k) / 4u];
  }
  return vec4<f32>(xAt(r, k), xAt(r, k + 1u), xAt(r, k + 2u), xAt(r, k + 3u));
}

fn fetchW(e: u32, col0: u32, k0: u32) -> vec4<f32> {
  let c = col0 + e / QUADS;
  let k = k0 + 4u * (e % QUADS);
  if (e >= QUADS * TN || c >= p.outDim) {
    return vec4<f32>(0.0);
  }
  if (VEC4 == 1u) {
    if (k >= p.inDim) {
      return vec4<f32>(0.0);
    }
    return weight4At((c * p.inDim + k) / 4u);
  }
  return vec4<f32>(wAt(c, k), wAt(c, k + 1u), wAt(c, k + 2u), wAt(c, k + 3u));
}

// Stores fetchX's element e into buffer b of xs, transposed.
fn stashX(b: u32, e: u32, v: vec4<f32>) {
  if (e >= QUADS * TM) {
    return;
  }
  let i = (b * BK + 4u * (e % QUADS)) * TM + e / QUADS; // float index of [b][k][m]
  xs[i / 4u][i % 4u] = v.x;
  xs[(i + TM) / 4u][i % 4u] = v.y;
  xs[(i + 2u * TM) / 4u][i % 4u] = v.z;
  xs[(i + 3u * TM) / 4u][i % 4u] = v.w;
}

fn stashW(b: u32, e: u32, v: vec4<f32>) {
  if (e >= QUADS * TN) {
    return;
  }
  let i = (b * BK + 4u * (e % QUADS)) * TN + e / QUADS;
  ws[i / 4u][i % 4u] = v.x;
  ws[(i + TN) / 4u][i % 4u] = v.y;
  ws[(i + 2u * TN) / 4u][i % 4u] = v.z;
  ws[(i + 3u * TN) / 4u][i % 4u] = v.w;
}

// One k of main: the outer product of the thread's 8 rows and 8 columns.
fn step(xi: u32, wi: u32) {
  outer8x8(xs[xi], xs[xi + TM / 8u], ws[wi], ws[wi + TN / 8u]);
}

// out[r, c..c+3] = v (+ bias, to whichever output holds the column: storeOut
// of linear_io.wgsl), the rows and columns in range.
fn put(r: u32, c: u32, v: vec4<f32>) {
  if (r >= p.rows) {
    return;
  }
  if (c < p.outDim) {
    storeOut(r, c, v.x);
  }
  if (c + 1u < p.outDim) {
    storeOut(r, c + 1u, v.y);
  }
  if (c + 2u < p.outDim) {
    storeOut(r, c + 2u, v.z);
  }
  if (c + 3u < p.outDim) {
    storeOut(r, c + 3u, v.w);
  }
}

// KSPLIT = 2: group 1 adds four of its accumulators to group 0's, through xs.
fn handOver(g: u32, lt: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>) {
  workgroupBarrier();
  if (g == 1u) {
    xs[4u * lt] = a;
    xs[4u * lt + 1u] = b;
    xs[4u * lt + 2u] = c;
    xs[4u * lt + 3u] = d;
  }
  workgroupBarrier();
}

@compute @workgroup_size(THREADS)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row0 = wg.y * TM;
  let col0 = wg.x * TN;
  let g = li / BLOCKS; // group: k 4g..4g+3 of each slice when KSPLIT = 2
  let lt = li % BLOCKS;
  let tx = lt % (TN / 8u);
  let ty = lt / (TN / 8u);
  // This workgroup's slices of K: part wg.z of KPARTS (none past the end).
  let slices = (p.inDim + BK - 1u) / BK;
  let perPart = (slices + KPARTS - 1u) / KPARTS;
  let firstSlice = min(slices, wg.z * perPart);
  let endSlice = min(slices, firstSlice + perPart);
  // Slice elements: QUADS·TM vec4s of x and QUADS·TN of weight, li and li + THREADS.
  let twoX = QUADS * TM > THREADS;
  let twoW = QUADS * TN > THREADS;
  var xv = fetchX(li, row0, firstSlice * BK);
  var xv2 = vec4<f32>(0.0);
  var wv = fetchW(li, col0, firstSlice * BK);
  var wv2 = vec4<f32>(0.0);
  if (twoX) {
    xv2 = fetchX(li + THREADS, row0, firstSlice * BK);
  }
  if (twoW) {
    wv2 = fetchW(li + THREADS, col0, firstSlice * BK);
  }
  stashX(0u, li, xv);
  stashW(0u, li, wv);
  if (twoX) {
    stashX(0u, li + THREADS, xv2);
  }
  if (twoW) {
    stashW(0u, li + THREADS, wv2);
  }
  workgroupBarrier();
  for (var s = firstSlice; s < endSlice; s++) {
    let b = (s - firstSlice) % 2u;
    let more = s + 1u < endSlice;
    if (more) {
      let k0 = (s + 1u) * BK;
      xv = fetchX(li, row0, k0);
      wv = fetchW(li, col0, k0);
      if (twoX) {
        xv2 = fetchX(li + THREADS, row0, k0);
      }
      if (twoW) {
        wv2 = fetchW(li + THREADS, col0, k0);
      }
    }
    let kk = b * BK + g * (BK / KSPLIT);
    let xi = kk * TM / 4u + ty;
    let wi = kk * TN / 4u + tx;
    step(xi, wi);
    step(xi + TM / 4u, wi + TN / 4u);
    step(xi + 2u * TM / 4u, wi + 2u * TN / 4u);
    step(xi + 3u * TM / 4u, wi + 3u * TN / 4u);
    if (BK / KSPLIT == 8u) {
      step(xi + 4u * TM / 4u, wi + 4u * TN / 4u);
      step(xi + 5u * TM / 4u, wi + 5u * TN / 4u);
      step(xi + 6u * TM / 4u, wi + 6u * TN / 4u);
      step(xi + 7u * TM / 4u, wi + 7u * TN / 4u);
    }
    if (more) {
      // The other buffer was last read before the previous barrier.
      stashX(1u - b, li, xv);
      stashW(1u - b, li, wv);
      if (twoX) {
        stashX(1u - b, li + THREADS, xv2);
      }
      if (twoW) {
        stashW(1u - b, li + THREADS, wv2);
      }
    }
    workgroupBarrier();
  }
  if (KSPLIT == 2u) {
    // 4 · BLOCKS vec4s fit in xs when TN = 64.
    let i = 4u * lt;
    handOver(g, lt, acc0a, acc0b, acc1a, acc1b);
    acc0a += xs[i];
    acc0b += xs[i + 1u];
    acc1a += xs[i + 2u];
    acc1b += xs[i + 3u];
    handOver(g, lt, acc2a, acc2b, acc3a, acc3b);
    acc2a += xs[i];
    acc2b += xs[i + 1u];
    acc3a += xs[i + 2u];
    acc3b += xs[i + 3u];
    handOver(g, lt, acc4a, acc4b, acc5a, acc5b);
    acc4a += xs[i];
    acc4b += xs[i + 1u];
    acc5a += xs[i + 2u];
    acc5b += xs[i + 3u];
    handOver(g, lt, acc6a, acc6b, acc7a, acc7b);
    acc6a += xs[i];
    acc6b += xs[i + 1u];
    acc7a += xs[i + 2u];
    acc7b += xs[i + 3u];
    if (g == 1u) {
      return;
    }
  }
  let r = row0 + 4u * ty;
  let r2 = r + TM / 2u;
  let c = col0 + 4u * tx;
  let c2 = c + TN / 2u;
  putSum(wg.z, r, c, acc0a);
  putSum(wg.z, r, c2, acc0b);
  putSum(wg.z, r + 1u, c, acc1a);
  putSum(wg.z, r + 1u, c2, acc1b);
  putSum(wg.z, r + 2u, c, acc2a);
  putSum(wg.z, r + 2u, c2, acc2b);
  putSum(wg.z, r + 3u, c, acc3a);
  putSum(wg.z, r + 3u, c2, acc3b);
  putSum(wg.z, r2, c, acc4a);
  putSum(wg.z, r2, c2, acc4b);
  putSum(wg.z, r2 + 1u, c, acc5a);
  putSum(wg.z, r2 + 1u, c2, acc5b);
  putSum(wg.z, r2 + 2u, c, acc6a);
  putSum(wg.z, r2 + 2u, c2, acc6b);
  putSum(wg.z, r2 + 3u, c, acc7a);
  putSum(wg.z, r2 + 3u, c2, acc7b);
}

// One vec4 of K for skinny: the 16 (row i, column j) pairs of its 4×4 block,
// in the order acc0a, acc0b, acc1a, ..., acc7b (row-major), accumulate the
// componentwise products of x row i and weight row j, summed at the end.
fn skinnyStep(
  x0: vec4<f32>,
  x1: vec4<f32>,
  x2: vec4<f32>,
  x3: vec4<f32>,
  w0: vec4<f32>,
  w1: vec4<f32>,
  w2: vec4<f32>,
  w3: vec4<f32>,
) {
  acc0a = fma(x0, w0, acc0a);
  acc0b = fma(x0, w1, acc0b);
  acc1a = fma(x0, w2, acc1a);
  acc1b = fma(x0, w3, acc1b);
  acc2a = fma(x1, w0, acc2a);
  acc2b = fma(x1, w1, acc2b);
  acc3a = fma(x1, w2, acc3a);
  acc3b = fma(x1, w3, acc3b);
  acc4a = fma(x2, w0, acc4a);
  acc4b = fma(x2, w1, acc4b);
  acc5a = fma(x2, w2, acc5a);
  acc5b = fma(x2, w3, acc5b);
  acc6a = fma(x3, w0, acc6a);
  acc6b = fma(x3, w1, acc6b);
  acc7a = fma(x3, w2, acc7a);
  acc7b = fma(x3, w3, acc7b);
}

fn sum4(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>) -> vec4<f32> {
  let ones = vec4<f32>(1.0);
  return vec4<f32>(dot(a, ones), dot(b, ones), dot(c, ones), dot(d, ones));
}

// Blocks of 4 rows × 4 columns, numbered column block first; 256 / LANES per
// workgroup, on a grid of any shape (nwg.x · nwg.y workgroups).
@compute @workgroup_size(256)
fn skinny(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let lane = li % LANES;
  let block = (wg.y * nwg.x + wg.x) * (256u / LANES) + li / LANES;
  let colBlocks = (p.outDim + 3u) / 4u;
  let r = 4u * (block / colBlocks);
  let c = 4u * (block % colBlocks);
  // Rows and columns past the end repeat the last one: computed, not stored.
  let last = max(p.rows, 1u) - 1u;
  let lastCol = max(p.outDim, 1u) - 1u;
  let k4 = p.inDim / 4u;
  let x0 = min(r, last) * k4;
  let x1 = min(r + 1u, last) * k4;
  let x2 = min(r + 2u, last) * k4;
  let x3 = min(r + 3u, last) * k4;
  let w0 = min(c, lastCol) * k4;
  let w1 = min(c + 1u, lastCol) * k4;
  let w2 = min(c + 2u, lastCol) * k4;
  let w3 = min(c + 3u, lastCol) * k4;
  for (var k = lane; k < k4; k += LANES) {
    skinnyStep(
      x[x0 + k],
      x[x1 + k],
      x[x2 + k],
      x[x3 + k],
      weight4At(w0 + k),
      weight4At(w1 + k),
      weight4At(w2 + k),
      weight4At(w3 + k),
    );
  }
  red[4u * li] = sum4(acc0a, acc0b, acc1a, acc1b);
  red[4u * li + 1u] = sum4(acc2a, acc2b, acc3a, acc3b);
  red[4u * li + 2u] = sum4(acc4a, acc4b, acc5a, acc5b);
  red[4u * li + 3u] = sum4(acc6a, acc6b, acc7a, acc7b);
  workgroupBarrier();
  // The lanes' sums meet pairwise (LANES is a power of two), so that many
  // lanes do not make one thread's sum long; lane i < 4 stores block row i.
  for (var stride = LANES / 2u; stride > 0u; stride >>= 1u) {
    if (lane < stride) {
      let other = 4u * (li + stride);
      red[4u * li] += red[other];
      red[4u * li + 1u] += red[other + 1u];
      red[4u * li + 2u] += red[other + 2u];
      red[4u * li + 3u] += red[other + 3u];
    }
    workgroupBarrier();
  }
  if (lane < 4u) {
    put(r + lane, c, red[4u * (li - lane) + lane]);
  }
}
