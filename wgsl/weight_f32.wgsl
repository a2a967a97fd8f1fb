// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them: f32 storage. weight_f16.wgsl,
// weight_bf16.wgsl, weight_q8_0.wgsl, weight_q4_0.wgsl and weight_q4_k.wgsl
// are the same interface over packed formats.
@group(0) @binding(2) var<storage, read> weight: array<vec4<f32>>;

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return weight[i / 4u][i % 4u];
}

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  return weight[k];
}
