// Parameters, bias and outputs of the linear kernels (gemv, gemv4, matmul),
// prepended to them: out [rows, outDim] = x [rows, inDim] · weightᵀ + bias.
//
// The columns of the full product (outStride of them) may go to up to three
// buffers: [0, split1) to out, [split1, split2) to out2, the rest to out3,
// each a matrix of its own width (in_proj's x and z, x_proj's dt, B and C).
// With one output, split1 = split2 = outStride. `accumulate` adds to out
// instead of overwriting it (the residual connection).
//
// A weight matrix split by rows over several buffers (too large for one
// binding) runs once per part: outDim is then the part's rows, which are the
// columns colOffset.. of the full product.
//
// With convKernel > 0 (gemv4, decode steps), the columns of out go through a
// causal conv step before they are stored: row r is one token of sequence r,
// whose last convKernel - 1 inputs convState holds (see convStep).
struct Params {
  rows: u32,
  inDim: u32,
  outDim: u32,
  hasBias: u32,
  outStride: u32,
  colOffset: u32,
  split1: u32,
  split2: u32,
  accumulate: u32,
  hasNorm: u32, // gemv4 only: normalise x's rows first (see gemv4.wgsl)
  convKernel: u32, // gemv4 only: taps of the conv step out's columns take, or 0
  convHasBias: u32,
  normEps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out2: array<f32>;
@group(0) @binding(6) var<storage, read_write> out3: array<f32>;
@group(0) @binding(8) var<storage, read> convWeight: array<f32>; // [split1, convKernel]
@group(0) @binding(9) var<storage, read> convBias: array<f32>; // [split1]
@group(0) @binding(10) var<storage, read_write> convState: array<f32>; // [rows, convKernel - 1, split1]

// silu(conv + bias) of channel c for sequence r, whose newest input is v;
// shifts v into the sequence's conv state (oldest input first). Only the thread
// storing (r, c) touches that channel's state.
fn convStep(r: u32, c: u32, v: f32) -> f32 {
  let taps = p.convKernel;
  let channels = p.split1;
  var sum = convWeight[c * taps + taps - 1u] * v;
  if (p.convHasBias != 0u) {
    sum += convBias[c];
  }
  let base = r * (taps - 1u) * channels + c;
  for (var k = 0u; k + 1u < taps; k++) {
    let held = convState[base + k * channels];
    sum = fma(convWeight[c * taps + k], held, sum);
    var next = v;
    if (k + 2u < taps) {
      next = convState[base + (k + 1u) * channels];
    }
    convState[base + k * channels] = next;
  }
  return sum / (1.0 + exp(-sum));
}

// Stores the product at row r, column c of this dispatch (c < outDim): bias
// added, then written to the output that holds the column.
fn storeOut(r: u32, c: u32, sum: f32) {
  let g = p.colOffset + c;
  var v = sum;
  if (p.hasBias != 0u) {
    v += bias[g];
  }
  if (g < p.split1) {
    let i = r * p.split1 + g;
    if (p.convKernel != 0u) {
      v = convStep(r, g, v);
    }
    if (p.accumulate != 0u) {
      v += out[i];
    }
    out[i] = v;
  } else if (g < p.split2) {
    out2[r * (p.split2 - p.split1) + g - p.split1] = v;
  } else {
    out3[r * (p.outStride - p.split2) + g - p.split2] = v;
  }
}
