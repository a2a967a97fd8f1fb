// Prelude of gemv4.wgsl when nothing is projected (see gemv4_shares.wgsl): its
// input may be gated instead (Mamba-2's out_proj after the gated RMSNorm).

@group(0) @binding(15) var<storage, read> gate: array<vec4<f32>>; // [rows, inDim], where GATED

fn keepConvOut(j: u32, v: vec4<f32>) {}

fn projectBlock(block: u32, li: u32) {}

const GATED: u32 = 0u; // 1: x's rows are x · silu(gate) (specialised per pipeline)

// vec4 i of x, times silu(gate) where GATED.
fn xAt(i: u32) -> vec4<f32> {
  if (GATED == 0u) {
    return x[i];
  }
  let g = gate[i];
  return x[i] * g / (1.0 + exp(-g));
}
