// Prelude of scan.wgsl when dt, B and C are buffers of their own (see
// scan_shares.wgsl).

const PROJECTED: u32 = 0u;

fn projectedAt(i: u32) -> f32 {
  return 0.0;
}

fn sumProjection(b: u32, li: u32) {}
