// Samples one id for each row of logits whose settings sample among more
// than MAX_K candidates (choose_rows.wgsl is prepended): a top-k above MAX_K,
// or none (0, or not below the row's limit) over more than MAX_K ids;
// sample.wgsl takes the other sampled rows. The steps are pickToken's
// (src/sampler.ts), after its repetition penalty (penalize.wgsl):
//
// 1. top-k: the k-th candidate in sorted order (larger logit first, the lower
//    id on ties; -Infinity, NaN and ids from the limit on are never
//    candidates) is the top-k cut, which keeps it and those before it;
// 2. temperature and softmax: each candidate's weight relative to the top
//    one; their total, and the total of those at or above min-p;
// 3. top-p (below 1): the first candidate in sorted order where the weights
//    from the top reach topP × total is the top-p cut;
// 4. the draw: of the kept candidates (inside both cuts, at or above min-p),
//    the first where the weights from the start pass u × their sum, for the
//    row's random number u in [0, 1). The walk starts at the top in sorted
//    order, or at id 0 where pickToken walks in id order (no top-k cut and a
//    top-p of 1).
// ids[idsOffset + r] = the id as an f32, or -1 when no logit can be sampled;
// the id also goes into the row's history.
//
// Steps 1, 3 and 4 are one search: the first candidate, in an order, where
// the running sum of masses (1 each for top-k, else the weights) passes a
// goal. It is a radix select over the digits of the order: the key (a u32
// that orders like the logit) from its top byte down, larger first, then the
// id from its top byte down, smaller first (the id alone for id order). A
// round histograms the masses of the candidates that match the digits found
// so far by their next digit, and the bin where the running sum passes the
// goal is the next digit; after the last round, one candidate matches.
// Masses add up as 64-bit fixed point (WEIGHT_ONE for a weight of 1) with u32
// atomics, as WGSL has no float atomics.
//
// Each row has a few words of state in `wide` and is spread over slices of
// p.sliceLength ids, a workgroup each. webgpu/sample.ts dispatches the entry points
// in order: `begin` (a workgroup per row), `extent` (the largest logit),
// then for each search round by round `histogram` and `settle` (a workgroup
// per row, which finds the bin), with `totals` after top-k. A row skips the
// rounds it does not need: top-k that cuts nothing, top-p of 1, the key's
// rounds of a draw in id order. A kernel doing all of a round (every
// workgroup settling the round before) would need half the dispatches but
// takes llvmpipe several times as long to compile.
//
// The weights are f32 and truncated to the fixed point where the host's are
// f64: a draw or a cut within about 1e-6 of the total mass (relative) of the
// boundary between two ids may go the other way.
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<f32>;
@group(0) @binding(4) var<storage, read> randoms: array<f32>;
@group(0) @binding(5) var<storage, read_write> history: array<f32>;
// [rows, ROW_WORDS]: each row's state (the offsets below).
@group(0) @binding(7) var<storage, read_write> wide: array<atomic<u32>>;

const THREADS: u32 = 256u;
const BINS: u32 = 256u; // one per value of a digit (a byte)
const KEY_DIGITS: u32 = 4u;
// A weight of 1 in fixed point: 2^40 leaves room for 2^24 of them (a whole
// vocabulary) in 64 bits, and drops a weight under 1e-12 of the top one.
const WEIGHT_ONE: f32 = 1099511627776.0;
const TWO_32: f32 = 4294967296.0;

// The searches (p.search).
const TOP_K: u32 = 0u;
const TOP_P: u32 = 1u;
const DRAW: u32 = 2u;

// Word offsets in a row's state. A cut (key, id) keeps the candidates at or
// before that one in sorted order: (0, all ones) keeps them all. A mass takes
// two words, the low one first.
const MAX_KEY: u32 = 0u; // the row's largest key; 0 where no logit is a candidate
const CUT_K: u32 = 1u; // the top-k cut
const CUT_P: u32 = 3u; // the top-p cut
const NUCLEUS: u32 = 5u; // the mass up to and including the top-p cut
const TOTAL_MASS: u32 = 7u; // the candidates' mass (inside the top-k cut)
const MIN_P_MASS: u32 = 9u; // the mass of those at or above min-p
const SEARCH: u32 = 11u; // the search under way (storeSearch)
const HISTOGRAM: u32 = 19u; // BINS low words, then BINS high words
// Words per row: webgpu/sample.ts's WIDE_ROW_WORDS.
const ROW_WORDS: u32 = 531u;

// Where a search stands: the digits found so far, in place (the masks mark
// them), the mass of the candidates before every one that matches them, and
// the goal, which the running mass passes first at the candidate searched
// for.
struct Search {
  key: u32,
  keyMask: u32,
  id: u32,
  idMask: u32,
  above: vec2u,
  goal: vec2u,
}

var<workgroup> binLo: array<atomic<u32>, BINS>;
var<workgroup> binHi: array<atomic<u32>, BINS>;
var<workgroup> runLo: array<u32, BINS>;
var<workgroup> runHi: array<u32, BINS>;
var<workgroup> foundBin: u32;
var<workgroup> foundBefore: vec2u;
var<workgroup> foundMass: vec2u;
var<workgroup> largest: atomic<u32>;

// 64-bit unsigned arithmetic on (low, high) pairs.
fn add64(a: vec2u, b: vec2u) -> vec2u {
  let low = a.x + b.x;
  return vec2u(low, a.y + b.y + select(0u, 1u, low < a.x));
}

fn sub64(a: vec2u, b: vec2u) -> vec2u {
  return vec2u(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x));
}

fn less64(a: vec2u, b: vec2u) -> bool {
  return a.y < b.y || (a.y == b.y && a.x < b.x);
}

fn min64(a: vec2u, b: vec2u) -> vec2u {
  return select(b, a, less64(a, b));
}

fn toFloat(a: vec2u) -> f32 {
  return f32(a.y) * TWO_32 + f32(a.x);
}

// x (0 or more) rounded down; exact, as an f32 holds 24 bits.
fn toFixed(x: f32) -> vec2u {
  let high = floor(x / TWO_32);
  return vec2u(u32(x - high * TWO_32), u32(high));
}

// The fixed-point mass of a weight (at most 1).
fn massOf(weight: f32) -> vec2u {
  return toFixed(weight * WEIGHT_ONE);
}

fn load64(at: u32) -> vec2u {
  return vec2u(atomicLoad(&wide[at]), atomicLoad(&wide[at + 1u]));
}

fn store64(at: u32, v: vec2u) {
  atomicStore(&wide[at], v.x);
  atomicStore(&wide[at + 1u], v.y);
}

// Adds v to the 64-bit number whose words are at `low` and `high` of `wide`.
fn addToWide(low: u32, high: u32, v: vec2u) {
  if ((v.x | v.y) == 0u) {
    return;
  }
  let old = atomicAdd(&wide[low], v.x);
  let carried = v.y + select(0u, 1u, old + v.x < old);
  if (carried != 0u) {
    atomicAdd(&wide[high], carried);
  }
}

// Adds v to a bin of this workgroup's histogram.
fn addToBin(bin: u32, v: vec2u) {
  if ((v.x | v.y) == 0u) {
    return;
  }
  let old = atomicAdd(&binLo[bin], v.x);
  let carried = v.y + select(0u, 1u, old + v.x < old);
  if (carried != 0u) {
    atomicAdd(&binHi[bin], carried);
  }
}

// The logit of a key (other than 0).
fn logitOf(key: u32) -> f32 {
  return bitcast<f32>(select(~key, key & 0x7fffffffu, (key & 0x80000000u) != 0u));
}

// Whether a candidate is at or before a cut in sorted order.
fn inCut(key: u32, id: u32, cut: vec2u) -> bool {
  return key > cut.x || (key == cut.x && id <= cut.y);
}

// The first round of a search that a row takes part in: a draw in id order
// skips the key's digits.
fn firstRound(row: u32, search: u32) -> u32 {
  return select(0u, KEY_DIGITS, search == DRAW && !walksSorted(row));
}

// Whether the row takes part in a round of a search (it has candidates).
fn takesPart(row: u32, search: u32, round: u32) -> bool {
  if (atomicLoad(&wide[row * ROW_WORDS + MAX_KEY]) == 0u) {
    return false;
  }
  if (search == TOP_K) {
    return cutsTopK(row);
  }
  if (search == TOP_P) {
    return topPOf(row) < 1.0;
  }
  return round >= firstRound(row, search);
}

// Where a round's digit is: in the key's bytes from the top, then the id's.
fn digitShift(round: u32) -> u32 {
  if (round < KEY_DIGITS) {
    return 24u - 8u * round;
  }
  return 8u * (p.idDigits - 1u - (round - KEY_DIGITS));
}

fn storeSearch(words: u32, s: Search) {
  let at = words + SEARCH;
  atomicStore(&wide[at], s.key);
  atomicStore(&wide[at + 1u], s.keyMask);
  atomicStore(&wide[at + 2u], s.id);
  atomicStore(&wide[at + 3u], s.idMask);
  store64(at + 4u, s.above);
  store64(at + 6u, s.goal);
}

// The search under way, or a new one at its first round.
fn loadSearch(row: u32, search: u32, round: u32) -> Search {
  let at = row * ROW_WORDS + SEARCH;
  if (round == firstRound(row, search)) {
    return Search(0u, 0u, 0u, 0u, vec2u(0u), vec2u(0u));
  }
  return Search(
    atomicLoad(&wide[at]),
    atomicLoad(&wide[at + 1u]),
    atomicLoad(&wide[at + 2u]),
    atomicLoad(&wide[at + 3u]),
    load64(at + 4u),
    load64(at + 6u),
  );
}

// The goal of a new search, from what the passes before found.
fn goalOf(row: u32, search: u32) -> vec2u {
  let words = row * ROW_WORDS;
  if (search == TOP_K) {
    // The k-th candidate: the first where the count passes k - 1.
    return vec2u(topKOf(row) - 1u, 0u);
  }
  if (search == TOP_P) {
    // The first where the mass reaches topP × total: passes one less.
    let reach = toFixed(topPOf(row) * toFloat(load64(words + TOTAL_MASS)));
    return select(sub64(reach, vec2u(1u, 0u)), vec2u(0u), (reach.x | reach.y) == 0u);
  }
  var sum = load64(words + MIN_P_MASS);
  if (topPOf(row) < 1.0) {
    // Both cuts keep a head of the sorted order: the shorter one, the lighter.
    sum = min64(sum, load64(words + NUCLEUS));
  }
  return toFixed(randoms[p.randomOffset + row] * toFloat(sum));
}

// The row's largest logit.
fn topOf(row: u32) -> f32 {
  return logitOf(atomicLoad(&wide[row * ROW_WORDS + MAX_KEY]));
}

// The ids of a slice of the row: first and end.
fn sliceIds(row: u32, slice: u32) -> vec2u {
  let first = slice * p.sliceLength;
  return vec2u(first, min(first + p.sliceLength, limitOf(row)));
}

// Sets up each row's state.
@compute @workgroup_size(256)
fn begin(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y;
  if (!samplesWide(row)) {
    return;
  }
  let words = row * ROW_WORDS;
  atomicStore(&wide[words + HISTOGRAM + li], 0u);
  atomicStore(&wide[words + HISTOGRAM + BINS + li], 0u);
  if (li == 0u) {
    atomicStore(&wide[words + MAX_KEY], 0u);
    store64(words + CUT_K, vec2u(0u, 0xffffffffu));
    store64(words + CUT_P, vec2u(0u, 0xffffffffu));
    store64(words + TOTAL_MASS, vec2u(0u));
    store64(words + MIN_P_MASS, vec2u(0u));
  }
}

// The row's largest key, over its slices.
@compute @workgroup_size(256)
fn extent(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y;
  if (!samplesWide(row)) {
    return;
  }
  var m = 0u;
  let span = sliceIds(row, wg.x);
  for (var id = span.x + li; id < span.y; id += THREADS) {
    m = max(m, keyOf(logits[row * p.vocab + id]));
  }
  atomicMax(&largest, m);
  workgroupBarrier();
  if (li == 0u) {
    atomicMax(&wide[row * ROW_WORDS + MAX_KEY], atomicLoad(&largest));
  }
}

// Round p.round of search p.search over a slice: the masses of the
// candidates matching the digits found so far, by their next digit, added to
// the row's histogram.
@compute @workgroup_size(256)
fn histogram(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y;
  let search = p.search;
  let round = p.round;
  if (!samplesWide(row) || !takesPart(row, search, round)) {
    return; // the same for the whole workgroup
  }
  let words = row * ROW_WORDS;
  let s = loadSearch(row, search, round);
  let cutK = load64(words + CUT_K);
  let cutP = load64(words + CUT_P);
  let top = topOf(row);
  let temperature = temperatureOf(row);
  let minP = minPOf(row);
  let shift = digitShift(round);
  let byKey = round < KEY_DIGITS;
  // Each thread adds up a run of masses in one bin before adding it to the
  // bin: in the key's first rounds most candidates share a few bins, whose
  // atomics would take turns.
  var runBin = BINS;
  var runMass = vec2u(0u);
  let span = sliceIds(row, wg.x);
  for (var id = span.x + li; id < span.y; id += THREADS) {
    let v = logits[row * p.vocab + id];
    let key = keyOf(v);
    if (key == 0u || (key & s.keyMask) != s.key || (id & s.idMask) != s.id) {
      continue;
    }
    var mass = vec2u(1u, 0u); // top-k counts
    if (search != TOP_K) {
      if (!inCut(key, id, cutK)) {
        continue;
      }
      let w = weightOf(v, top, temperature);
      if (search == DRAW && (w < minP || !inCut(key, id, cutP))) {
        continue;
      }
      mass = massOf(w);
    }
    let bin = (select(id, key, byKey) >> shift) & 255u;
    if (bin != runBin) {
      if (runBin < BINS) {
        addToBin(runBin, runMass);
      }
      runBin = bin;
      runMass = mass;
    } else {
      runMass = add64(runMass, mass);
    }
  }
  if (runBin < BINS) {
    addToBin(runBin, runMass);
  }
  workgroupBarrier();
  let at = words + HISTOGRAM + li;
  addToWide(at, at + BINS, vec2u(atomicLoad(&binLo[li]), atomicLoad(&binHi[li])));
}

// The mass of a slice's candidates (inside the top-k cut), added to the
// row's total, and of those at or above min-p, to its min-p mass.
@compute @workgroup_size(256)
fn totals(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y;
  let words = row * ROW_WORDS;
  if (!samplesWide(row) || atomicLoad(&wide[words + MAX_KEY]) == 0u) {
    return; // the same for the whole workgroup
  }
  let cutK = load64(words + CUT_K);
  let top = topOf(row);
  let temperature = temperatureOf(row);
  let minP = minPOf(row);
  var total = vec2u(0u);
  var atMinP = vec2u(0u);
  let span = sliceIds(row, wg.x);
  for (var id = span.x + li; id < span.y; id += THREADS) {
    let v = logits[row * p.vocab + id];
    let key = keyOf(v);
    if (key == 0u || !inCut(key, id, cutK)) {
      continue;
    }
    let w = weightOf(v, top, temperature);
    let mass = massOf(w);
    total = add64(total, mass);
    if (w >= minP) {
      atMinP = add64(atMinP, mass);
    }
  }
  addToBin(0u, total);
  addToBin(1u, atMinP);
  workgroupBarrier();
  if (li < 2u) {
    let at = words + select(TOTAL_MASS, MIN_P_MASS, li == 1u);
    addToWide(at, at + 1u, vec2u(atomicLoad(&binLo[li]), atomicLoad(&binHi[li])));
  }
}

// Round p.round of search p.search for a row: the bin of the row's histogram
// where the running mass, in the order of the round's digit, passes the goal.
// Where rounding left the goal at or past the end, it finds the last
// candidate with a mass, as pickToken then takes its last one. Stores the
// search and clears the histogram; after its last round, a search stores its
// cut, or the draw its id.
@compute @workgroup_size(256)
fn settle(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.y;
  let search = p.search;
  let round = p.round;
  let last = round + 1u == KEY_DIGITS + p.idDigits;
  if (!samplesWide(row)) {
    return;
  }
  if (!takesPart(row, search, round)) {
    if (search == DRAW && last && li == 0u) {
      ids[p.idsOffset + row] = -1.0; // no candidate: the only draw that takes no part
    }
    return; // the same for the whole workgroup
  }
  let words = row * ROW_WORDS;
  var s = loadSearch(row, search, round);
  if (round == firstRound(row, search)) {
    s.goal = goalOf(row, search);
  }
  let at = words + HISTOGRAM + li;
  let mass = vec2u(atomicLoad(&wide[at]), atomicLoad(&wide[at + BINS]));
  atomicStore(&wide[at], 0u);
  atomicStore(&wide[at + BINS], 0u);
  // Bin li's place in the order: larger key digits first, smaller id digits first.
  let byKey = round < KEY_DIGITS;
  let place = select(li, BINS - 1u - li, byKey);
  runLo[place] = mass.x;
  runHi[place] = mass.y;
  workgroupBarrier();
  for (var offset = 1u; offset < BINS; offset <<= 1u) {
    var add = vec2u(0u);
    if (place >= offset) {
      add = vec2u(runLo[place - offset], runHi[place - offset]);
    }
    workgroupBarrier();
    let sum = add64(vec2u(runLo[place], runHi[place]), add);
    runLo[place] = sum.x;
    runHi[place] = sum.y;
    workgroupBarrier();
  }
  let through = vec2u(runLo[place], runHi[place]);
  let before = sub64(through, mass);
  let whole = vec2u(runLo[BINS - 1u], runHi[BINS - 1u]);
  let need = min64(sub64(s.goal, s.above), sub64(whole, vec2u(1u, 0u)));
  if (!less64(need, before) && less64(need, through)) {
    foundBin = li;
    foundBefore = before;
    foundMass = mass;
  }
  workgroupBarrier();
  if (li != 0u) {
    return;
  }
  let shift = digitShift(round);
  if (byKey) {
    s.key |= foundBin << shift;
    s.keyMask |= 255u << shift;
  } else {
    s.id |= foundBin << shift;
    s.idMask |= 255u << shift;
  }
  s.goal = add64(s.above, need);
  s.above = add64(s.above, foundBefore);
  storeSearch(words, s);
  if (!last) {
    return;
  }
  let cut = vec2u(s.key, s.id);
  if (search == TOP_K) {
    store64(words + CUT_K, cut);
  } else if (search == TOP_P) {
    store64(words + CUT_P, cut);
    store64(words + NUCLEUS, add64(s.above, foundMass));
  } else {
    ids[p.idsOffset + row] = f32(s.id);
    history[historyAt(row, positionOf(row))] = f32(s.id);
  }
}
