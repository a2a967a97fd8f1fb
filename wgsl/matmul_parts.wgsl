// Where matmul.wgsl's main puts its sums when K is split over KPARTS
// workgroups: partial [KPARTS, rows, outDim], every element written (zeros from
// a part past the end of K), for matmul_sum.wgsl to add up. Four sums that
// start a vec4 of the buffer (outDim % 4 == 0) go as one store: a warp's
// scalar stores, a vec4 apart, would each write a quarter of the same sectors.
@group(0) @binding(14) var<storage, read_write> partial: array<vec4<f32>>;

fn putSum(part: u32, r: u32, c: u32, v: vec4<f32>) {
  if (r >= p.rows) {
    return;
  }
  let base = (part * p.rows + r) * p.outDim;
  if (p.outDim % 4u == 0u && c + 3u < p.outDim) {
    partial[(base + c) / 4u] = v;
    return;
  }
  for (var j = 0u; j < 4u; j++) {
    let i = base + c + j;
    if (c + j < p.outDim) {
      partial[i / 4u][i % 4u] = v[j];
    }
  }
}
