// Where matmul.wgsl's main puts its sums when K is split over KPARTS
// workgroups: partial [KPARTS, rows, outDim], every element written (zeros from
// a part past the end of K), for matmul_sum.wgsl to add up.
@group(0) @binding(14) var<storage, read_write> partial: array<f32>;

fn putSum(part: u32, r: u32, c: u32, v: vec4<f32>) {
  if (r >= p.rows) {
    return;
  }
  let base = (part * p.rows + r) * p.outDim;
  if (c < p.outDim) {
    partial[base + c] = v.x;
  }
  if (c + 1u < p.outDim) {
    partial[base + c + 1u] = v.y;
  }
  if (c + 2u < p.outDim) {
    partial[base + c + 2u] = v.z;
  }
  if (c + 3u < p.outDim) {
    partial[base + c + 3u] = v.w;
  }
}
