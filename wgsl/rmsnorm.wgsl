// out [rows, dim] = x / sqrt(mean(x²) + eps) * weight: one workgroup per row.
//
// Entry points (main_quads and residual_quads do the same as main and
// residual on rows of whole vec4s, read as such by 64 threads a row rather
// than as floats by 256: mamba-130m's 768 is 3 vec4s a thread):
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
  var sum = 0.0;
  for (var i = li; i < quads; i += WG) {
    let v = x4[base + i];
    sum += dot(v, v);
  }
  let scale = scaleOf(li, sum);
  for (var i = li; i < quads; i += WG) {
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
  var sum = 0.0;
  for (var i = li; i < quads; i += WG) {
    var product = vec4<f32>(0.0);
    for (var part = 0u; part < KPARTS; part++) {
      product += partial4[part * size + base + i];
    }
    if (p.hasBias != 0u) {
      product += bias4[i];
    }
    var v = product;
    if (p.accumulate != 0u) {
      v = hidden4[base + i] + product;
    }
    hidden4[base + i] = v;
    sum += dot(v, v);
  }
  let scale = scaleOf(li, sum);
  for (var i = li; i < quads; i += WG) {
    out4[base + i] = hidden4[base + i] * scale * weight4[i];
  }
}
