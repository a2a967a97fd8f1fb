// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them: f16 values packed two per u32 (low
// half first), widened to f32 on load with the core builtin unpack2x16float,
// so no shader-f16 feature is needed and the products equal the f32 kernels'
// for weights that are exactly f16.
@group(0) @binding(2) var<storage, read> weight: array<vec2<u32>>;

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return unpack2x16float(weight[i / 4u][(i / 2u) % 2u])[i % 2u];
}

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  let packed = weight[k];
  return vec4<f32>(unpack2x16float(packed.x), unpack2x16float(packed.y));
}
