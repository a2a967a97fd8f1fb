// Weight access of the linear kernels (gemv, gemv4, matmul) and the gathers
// (embed, copy_rows), prepended to them: bf16 values packed two per u32 (low
// half first), each the top half of its f32, so a shift or a mask widens it
// exactly (WGSL has no bf16 type). The products equal the f32 kernels' for
// weights that are exactly bf16. weight_f16.wgsl is the same interface over
// packed f16.
@group(0) @binding(2) var<storage, read> weight: array<vec2<u32>>;

// The two bf16 values packed in `bits`, low half first.
fn unpackBf16(bits: u32) -> vec2<f32> {
  return bitcast<vec2<f32>>(vec2<u32>(bits << 16u, bits & 0xffff0000u));
}

// Element i of the row-major weight matrix.
fn weightAt(i: u32) -> f32 {
  return unpackBf16(weight[i / 4u][(i / 2u) % 2u])[i % 2u];
}

// Elements 4k to 4k+3.
fn weight4At(k: u32) -> vec4<f32> {
  let packed = weight[k];
  return vec4<f32>(unpackBf16(packed.x), unpackBf16(packed.y));
}
