// Prelude of scan.wgsl for a decode step whose dt, B and C come as the shares
// of x_proj that in_proj's GEMV left (gemv4_shares.wgsl): the step adds them
// up itself (sumProjection). Its own file, so that the other scan kernels
// neither declare nor bind its buffer.

const PROJECTED: u32 = 1u;

// dt, B and C of each sequence as the sum of `blocks` shares, ⌈(rank + 2·nState) / 4⌉ vec4s each
@group(0) @binding(15) var<storage, read> projParts: array<vec4<f32>>;

// step with PROJECTED: this workgroup's sequence's dt, B and C, summed from
// projParts (projected), and the threads' partial sums on the way (projLanes).
var<workgroup> projected: array<vec4<f32>, 64>;
var<workgroup> projLanes: array<vec4<f32>, WG>;

/** Element i of `projected`: dt, then B, then C. */
fn projectedAt(i: u32) -> f32 {
  return projected[i / 4u][i % 4u];
}

/**
 * Sums sequence b's shares of x_proj into `projected`: thread li adds quad li
 * % quads of every (WG / quads)-th share, four loads in flight, then the first
 * `quads` threads add those sums up. Every thread must call it.
 */
fn sumProjection(b: u32, li: u32) {
  let quads = (p.rank + 2u * p.nState + 3u) / 4u;
  let lanes = WG / quads;
  let lane = li / quads;
  let base = b * p.blocks * quads + li % quads;
  var sum = vec4<f32>(0.0);
  if (lane < lanes) {
    var i = lane;
    for (; i + 3u * lanes < p.blocks; i += 4u * lanes) {
      sum += (projParts[base + i * quads] + projParts[base + (i + lanes) * quads]) +
        (projParts[base + (i + 2u * lanes) * quads] + projParts[base + (i + 3u * lanes) * quads]);
    }
    for (; i < p.blocks; i += lanes) {
      sum += projParts[base + i * quads];
    }
  }
  projLanes[li] = sum;
  workgroupBarrier();
  if (li < quads) {
    var total = projLanes[li];
    for (var l = 1u; l < lanes; l++) {
      total += projLanes[l * quads + li];
    }
    projected[li] = total;
  }
  workgroupBarrier();
}
