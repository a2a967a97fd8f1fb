// out [rows, dim] = x / sqrt(mean(x²) + eps) * weight: one workgroup per row.
//
// Entry points (main_quads and residual_quads do the same as main and
// residual on rows of whole vec4s, read as such):
// - `main`: the norm of x.
// - `residual`: first hidden += a product still in KPARTS partial sums (a
//   matmul split over K, matmul_parts.wgsl) and its bias, then the norm of
//   hidden: a batch of decode steps' out_proj, its residual connection and
//   the next norm in one dispatch, the sums taken in matmul_sum.wgsl's order.
struct Params {
  rows: u32,
  dim: u32,
  eps: f32,
  hasBias: u32, // residual: the product has a bias
  accumulate: u32, // residual: hidden += the product; else hidden = it
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> hidden: array<f32>;
@group(0) @binding(5) var<storage, read> partial: array<f32>; // [KPARTS, rows, dim]
@group(0) @binding(6) var<storage, read> bias: array<f32>;
// main_quads and residual_quads: the same as vec4s.
@group(0) @binding(7) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> weight4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> hidden4: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read> partial4: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read> bias4: array<vec4<f32>>;

const KPARTS: u32 = 2u;
const WG: u32 = 256u; // threads per row: 256, or 64 for the vec4 entry points

var<workgroup> squares: array<f32, WG>;

// 1 / sqrt(mean(v²) + eps) of a row, from each thread's sum of squares.
fn scaleOf(li: u32, sum: f32) -> f32 {
  squares[li] = sum;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
    if (li < stride) {
      squares[li] += squares[li + stride];
    }
    workgroupBarrier();
  }
  return inverseSqrt(squares[0] / f32(p.dim) + p.eps);
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y * nwg.x + wg.x;
  if (row >= p.rows) {
    return;
  }
  let base = row * p.dim;
  var sum = 0.0;
  for (var i = li; i < p.dim; i += WG) {
    let v = x[base + i];
    sum += v * v;
  }
  let scale = scaleOf(li, sum);
  for (var i = li; i < p.dim; i += WG) {
    out[base + i] = x[base + i] * scale * weight[i];
  }
}

// main_quads and residual_quads: thread li holds quads li and li + WG of the
// row in registers (every quad of rows up to 8·WG wide), loaded together and
// with their weights before the sum of squares, so that a row takes one wait
// on memory before the exchanges and none after; quads past 2·WG go in a loop
// that loads them again.
struct HeldQuads {
  v0: vec4<f32>,
  v1: vec4<f32>,
  w0: vec4<f32>,
  w1: vec4<f32>,
}

/**
 * Where the weights of quads li and li + WG are, clamped into the row
 * (nothing is stored past it).
 */
fn heldWeights(li: u32, quads: u32) -> vec2<u32> {
  return vec2<u32>(min(li, quads - 1u), min(li + WG, quads - 1u));
}

/** y = v · scale · w of the held quads, stored in out4 at base. */
fn storeHeld(base: u32, li: u32, quads: u32, held: HeldQuads, scale: f32) {
  if (li < quads) {
    out4[base + li] = held.v0 * scale * held.w0;
  }
  if (li + WG < quads) {
    out4[base + li + WG] = held.v1 * scale * held.w1;
  }
}

@compute @workgroup_size(WG)
fn main_quads(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y * nwg.x + wg.x;
  if (row >= p.rows) {
    return;
  }
  let quads = p.dim / 4u;
  let base = row * quads;
  var held = HeldQuads(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
  let w = heldWeights(li, quads);
  held.w0 = weight4[w.x];
  held.w1 = weight4[w.y];
  if (li < quads) {
    held.v0 = x4[base + li];
  }
  if (li + WG < quads) {
    held.v1 = x4[base + li + WG];
  }
  var sum = dot(held.v0, held.v0) + dot(held.v1, held.v1);
  for (var i = li + 2u * WG; i < quads; i += WG) {
    let v = x4[base + i];
    sum += dot(v, v);
  }
  let scale = scaleOf(li, sum);
  storeHeld(base, li, quads, held, scale);
  for (var i = li + 2u * WG; i < quads; i += WG) {
    out4[base + i] = x4[base + i] * scale * weight4[i];
  }
}

@compute @workgroup_size(WG)
fn residual(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y * nwg.x + wg.x;
  if (row >= p.rows) {
    return;
  }
  let base = row * p.dim;
  let size = p.rows * p.dim;
  var sum = 0.0;
  for (var i = li; i < p.dim; i += WG) {
    var product = 0.0;
    for (var part = 0u; part < KPARTS; part++) {
      product += partial[part * size + base + i];
    }
    if (p.hasBias != 0u) {
      product += bias[i];
    }
    var v = product;
    if (p.accumulate != 0u) {
      v = hidden[base + i] + product;
    }
    hidden[base + i] = v;
    sum += v * v;
  }
  let scale = scaleOf(li, sum);
  for (var i = li; i < p.dim; i += WG) {
    out[base + i] = hidden[base + i] * scale * weight[i];
  }
}

/**
 * hidden4 at `at` (of `size` per part; quad i of its row) after the product
 * is added to it (or stored in it): the product's KPARTS partial sums added in
 * order (as matmul_sum.wgsl adds them), eight or four loads at a time, then
 * its bias, then hidden's old value (hidden's and the bias's loads go first).
 */
fn residualQuad(at: u32, size: u32, i: u32) -> vec4<f32> {
  var old = vec4<f32>(0.0);
  if (p.accumulate != 0u) {
    old = hidden4[at];
  }
  var biasQuad = vec4<f32>(0.0);
  if (p.hasBias != 0u) {
    biasQuad = bias4[i];
  }
  var product = vec4<f32>(0.0);
  var part = 0u;
  for (; part + 8u <= KPARTS; part += 8u) {
    let a = partial4[part * size + at];
    let b = partial4[(part + 1u) * size + at];
    let c = partial4[(part + 2u) * size + at];
    let d = partial4[(part + 3u) * size + at];
    let e = partial4[(part + 4u) * size + at];
    let f = partial4[(part + 5u) * size + at];
    let g = partial4[(part + 6u) * size + at];
    let h = partial4[(part + 7u) * size + at];
    product = (((((((product + a) + b) + c) + d) + e) + f) + g) + h;
  }
  for (; part + 4u <= KPARTS; part += 4u) {
    let a = partial4[part * size + at];
    let b = partial4[(part + 1u) * size + at];
    let c = partial4[(part + 2u) * size + at];
    let d = partial4[(part + 3u) * size + at];
    product = (((product + a) + b) + c) + d;
  }
  for (; part < KPARTS; part++) {
    product += partial4[part * size + at];
  }
  let v = (product + biasQuad) + old;
  hidden4[at] = v;
  return v;
}

@compute @workgroup_size(WG)
fn residual_quads(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y * nwg.x + wg.x;
  if (row >= p.rows) {
    return;
  }
  let quads = p.dim / 4u;
  let base = row * quads;
  let size = p.rows * quads;
  var held = HeldQuads(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
  let w = heldWeights(li, quads);
  held.w0 = weight4[w.x];
  held.w1 = weight4[w.y];
  if (li < quads) {
    held.v0 = residualQuad(base + li, size, li);
  }
  if (li + WG < quads) {
    held.v1 = residualQuad(base + li + WG, size, li + WG);
  }
  var sum = dot(held.v0, held.v0) + dot(held.v1, held.v1);
  for (var i = li + 2u * WG; i < quads; i += WG) {
    let v = residualQuad(base + i, size, i);
    sum += dot(v, v);
  }
  let scale = scaleOf(li, sum);
  storeHeld(base, li, quads, held, scale);
  for (var i = li + 2u * WG; i < quads; i += WG) {
    out4[base + i] = hidden4[base + i] * scale * weight4[i];
  }
}
