// Prelude of gemv4.wgsl when nothing is projected (see gemv4_shares.wgsl).

fn keepConvOut(j: u32, v: vec4<f32>) {}

fn loadProjAhead(block: u32, li: u32) {}

fn projectBlock(block: u32, li: u32) {}

// vec4 i of x.
fn xAt(i: u32) -> vec4<f32> {
  return x[i];
}
