// mamba_ssm's gated RMSNorm (GatedNormArgs of src/backend.ts): per row,
// v = x·silu(gate), each group of groupSize channels scaled by
// 1 / sqrt(mean(v²) + eps), then by weight. One workgroup per group of a row.
struct Params {
  rows: u32,
  dim: u32,
  groupSize: u32,
  eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gate: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 256>;

fn gated(i: u32) -> f32 {
  let g = gate[i];
  return x[i] * g / (1.0 + exp(-g));
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let group = wg.y * nwg.x + wg.x;
  let perRow = p.dim / p.groupSize;
  if (group >= p.rows * perRow) {
    return;
  }
  let base = group * p.groupSize;
  let col = (group % perRow) * p.groupSize;
  var sum = 0.0;
  for (var i = li; i < p.groupSize; i += 256u) {
    let v = gated(base + i);
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
  let scale = inverseSqrt(partial[0] / f32(p.groupSize) + p.eps);
  for (var i = li; i < p.groupSize; i += 256u) {
    out[base + i] = gated(base + i) * scale * weight[col + i];
  }
}
