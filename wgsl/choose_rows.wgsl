// Prelude of the kernels of Backend.chooseTokens (penalize, argmax, sample,
// sample_wide):
// their parameters, each row's settings (src/backend.ts's samplingSettings:
// temperature, topK, topP, minP, repetitionPenalty, repeatLastN, position,
// limit) and where a row's ids are in the history ring. Row r's sequence is
// row slots[r] of the ring, which holds the id at sequence position q at
// q % historyLength; the row's pick in this call is at position + step.
struct Params {
  rows: u32,
  vocab: u32, // floats per row of logits
  randomOffset: u32, // row r draws with randoms[randomOffset + r]
  historyLength: u32,
  step: i32,
  idsOffset: u32, // row r's id goes to ids[idsOffset + r]
  maxSlices: u32, // sample.wgsl: slices per row in `found` (the rows' largest count)
  // sample_wide.wgsl: the pass's search and round, bytes of an id, ids per slice.
  search: u32,
  round: u32,
  idDigits: u32,
  sliceLength: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> settings: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<f32>;

const SETTINGS: u32 = 8u;

// The most candidates that sample.wgsl's selection keeps; rows sampling among
// more take sample_wide.wgsl.
const MAX_K: u32 = 64u;

fn temperatureOf(row: u32) -> f32 {
  return settings[row * SETTINGS];
}

fn topKOf(row: u32) -> u32 {
  return u32(settings[row * SETTINGS + 1u]);
}

fn topPOf(row: u32) -> f32 {
  return settings[row * SETTINGS + 2u];
}

fn minPOf(row: u32) -> f32 {
  return settings[row * SETTINGS + 3u];
}

fn penaltyOf(row: u32) -> f32 {
  return settings[row * SETTINGS + 4u];
}

// repeatLastN: -1 for the whole history.
fn windowOf(row: u32) -> i32 {
  return i32(settings[row * SETTINGS + 5u]);
}

// The sequence position of the row's pick in this call: the ids before it.
fn positionOf(row: u32) -> u32 {
  return u32(i32(settings[row * SETTINGS + 6u]) + p.step);
}

// Only ids below it are candidates.
fn limitOf(row: u32) -> u32 {
  return min(u32(settings[row * SETTINGS + 7u]), p.vocab);
}

// Index in the ring of the row's id at sequence position q.
fn historyAt(row: u32, q: u32) -> u32 {
  return u32(slots[row]) * p.historyLength + q % p.historyLength;
}

// Row r samples rather than taking the argmax.
fn samples(row: u32) -> bool {
  return temperatureOf(row) > 0.0;
}

// Whether top-k cuts the row's candidates: on and below its limit (compared
// as floats: a topK past u32 does not cut).
fn cutsTopK(row: u32) -> bool {
  let k = settings[row * SETTINGS + 1u];
  return k > 0.0 && k < f32(limitOf(row));
}

// The candidates a sampled row keeps after top-k, at most (-Infinity and NaN
// are never candidates), as samplingFeatures counts them.
fn keptOf(row: u32) -> u32 {
  return select(limitOf(row), topKOf(row), cutsTopK(row));
}

// Whether pickToken draws walking the candidates in sorted order (larger
// logit first, the lower id on ties), as where top-k or top-p cuts them, or
// else in id order.
fn walksSorted(row: u32) -> bool {
  return cutsTopK(row) || topPOf(row) < 1.0;
}

// Row r samples among at most MAX_K candidates (sample.wgsl).
fn samplesNarrow(row: u32) -> bool {
  return samples(row) && keptOf(row) <= MAX_K;
}

// Row r samples among more than MAX_K candidates (sample_wide.wgsl).
fn samplesWide(row: u32) -> bool {
  return samples(row) && keptOf(row) > MAX_K;
}

// A key that orders like the logit, or 0 for NaN and -Infinity (never
// candidates). Tested on the bits: a compiler may assume that floats are
// never NaN.
fn keyOf(logit: f32) -> u32 {
  let bits = bitcast<u32>(logit);
  if ((bits & 0x7fffffffu) > 0x7f800000u || bits == 0xff800000u) {
    return 0u;
  }
  if ((bits & 0x80000000u) != 0u) {
    return ~bits;
  }
  return bits | 0x80000000u;
}

// The weight of a candidate's logit v relative to the top logit's, which
// weighs 1: exp((v - top) / temperature), or where the top is +Infinity, 1
// for +Infinity and 0 for the others (pickToken's softmax).
fn weightOf(v: f32, top: f32, temperature: f32) -> f32 {
  if (bitcast<u32>(v) == bitcast<u32>(top)) {
    return 1.0;
  }
  if (bitcast<u32>(top) == 0x7f800000u) {
    return 0.0;
  }
  return exp((v - top) / temperature);
}
