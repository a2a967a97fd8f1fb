// Weight access of the linear kernels (gemv, gemv4, matmul), prepended to them
// after linear_io.wgsl: f32 storage. weight_f16.wgsl is the same interface over
// packed f16.
@group(0) @binding(2) var<storage, read> weight: array<vec4<f32>>;

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight[i / 4u][i % 4u];
}

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  return weight[k];
}
