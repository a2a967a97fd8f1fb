// The second pass of a matmul split over K (matmul_parts.wgsl): each thread
// adds one output's KPARTS partial sums and stores it like any linear kernel
// (bias, split outputs, accumulate: linear_io.wgsl, prepended).
@group(0) @binding(14) var<storage, read> partial: array<f32>;

const KPARTS: u32 = 2u;

// Threads numbered over a grid of any shape (nwg.x · nwg.y workgroups of 256).
@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * 256u + li;
  let size = p.rows * p.outDim;
  if (i >= size) {
    return;
  }
  var sum = 0.0;
  for (var part = 0u; part < KPARTS; part++) {
    sum += partial[part * size + i];
  }
  storeOut(i / p.outDim, i % p.outDim, sum);
}
