// out [rows, dim] = x / sqrt(mean(x²) + eps) * weight: one workgroup per row.
struct Params {
  rows: u32,
  dim: u32,
  eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
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
  for (var i = li; i < p.dim; i += 256u) {
    let v = x[base + i];
    sum += v * v;
  }
  partial[li] = sum;
  workgroupBarrier();
  for (var stride = 128u; stride > 0u; stride >>= 1u) {
    if (li < stride) {
      partial[li] += partial[li + stride];
    }
    workgroupBarrier();
  }
  let scale = inverseSqrt(partial[0] / f32(p.dim) + p.eps);
  for (var i = li; i < p.dim; i += 256u) {
    out[base + i] = x[base + i] * scale * weight[i];
  }
}
