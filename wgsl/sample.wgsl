// Samples one id per row of logits on the device, as Sampler.sample does with
// top-k and no repetition penalty (src/sampler.ts): the topK largest logits
// below `limit` (ties to the lower id; -Infinity and NaN never), temperature,
// softmax, top-p, min-p, then a draw with the row's random number u in [0, 1).
// ids[index + r] = the id as an f32, or -1 when no logit can be sampled, so
// that sampled decoding needs no read-back per token.
//
// Two entry points, each a workgroup running the same top-k selection over a
// list of items (a key and an id each):
// - `slices`: one workgroup per SLICE ids of a row selects their top k into
//   `found` (the whole row would keep a single workgroup busy for long);
// - `main`: one workgroup per row selects the top k of its slices' lists,
//   then one thread does the arithmetic over them and draws.
// Every id of the row's top k is in its slice's top k, and a row's lists, read
// slice after slice, hold ids in increasing order among equal keys.
//
// The selection is a radix select. Logits map to u32 keys in the same order,
// and four rounds over 8 bits each (a histogram in workgroup memory, then
// suffix sums) find T, the k-th largest key. Keys above T are taken; of the
// keys equal to T, those first in the list make up the rest, which each thread
// finds in a contiguous run of the list. The taken items (at most MAX_K) are
// then ranked. The arithmetic is f32 where the host's is f64: a draw or the
// top-p cut within about 1e-7 (relative) of the boundary between two ids may
// go the other way.
struct Params {
  limit: u32,
  index: u32, // ids[index + r] receives row r's id
  stride: u32, // floats from one row of logits to the next
  topK: u32, // 1 to MAX_K
  uniformIndex: u32, // row r's random number is uniforms[uniformIndex + r]
  temperature: f32,
  topP: f32,
  minP: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<f32>;
@group(0) @binding(3) var<storage, read> uniforms: array<f32>;
// Each slice's selection: MAX_K (key, id) pairs per slice, key 0 past its end.
@group(0) @binding(4) var<storage, read_write> found: array<vec2<u32>>;

const MAX_K: u32 = 64u;
const THREADS: u32 = 256u;
const SLICE: u32 = 1024u; // ids per workgroup of `slices`

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> sums: array<u32, 256>;
var<workgroup> chosenBin: u32;
var<workgroup> stillNeeded: u32; // keys equal to the prefix found so far that are taken
var<workgroup> candidates: atomic<u32>;
var<workgroup> candKey: array<u32, MAX_K>;
var<workgroup> candId: array<u32, MAX_K>;
var<workgroup> sortedKey: array<u32, MAX_K>;
var<workgroup> sortedId: array<u32, MAX_K>;

// The list the selection runs over: `count` items from `first`, ids of the
// logits (stage 0, `slices`) or pairs of `found` (stage 1, `main`).
struct Items {
  stage: u32,
  first: u32,
  count: u32,
  base: u32, // of the row in logits
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

// Key and id of item i of the list.
fn item(list: Items, i: u32) -> vec2<u32> {
  let at = list.first + i;
  if (list.stage == 0u) {
    return vec2<u32>(keyOf(logits[list.base + at]), at);
  }
  return found[at];
}

// sums[b] ← Σ sums[b'] over b' ≥ b (suffix) or over b' ≤ b (prefix).
fn scan(li: u32, suffix: bool) {
  for (var offset = 1u; offset < THREADS; offset <<= 1u) {
    var add = 0u;
    if (suffix && li + offset < THREADS) {
      add = sums[li + offset];
    }
    if (!suffix && li >= offset) {
      add = sums[li - offset];
    }
    workgroupBarrier();
    sums[li] += add;
    workgroupBarrier();
  }
}

// Row r's weight of candidate j (the top one weighs 1), as the host computes it.
fn weight(base: u32, j: u32, top: f32) -> f32 {
  let v = logits[base + sortedId[j]];
  if (bitcast<u32>(top) == 0x7f800000u) {
    return select(0.0, 1.0, bitcast<u32>(v) == 0x7f800000u);
  }
  return exp((v - top) / p.temperature);
}

// Selects the top min(topK, valid items) of the list into sortedKey and
// sortedId (larger key first, the lower id on ties: ids rise along the list
// among equal keys) and returns how many.
// Every thread of the workgroup must call it.
fn selectTop(list: Items, li: u32) -> u32 {
  // The radix select: after round q, `prefix` holds the top 8(q + 1) bits of T.
  var prefix = 0u;
  var mask = 0u;
  var need = 0u; // keys at or above the prefix that are still to be taken
  var k = 0u; // items to take in all: topK, or fewer valid ones
  for (var round = 0u; round < 4u; round++) {
    let shift = 24u - 8u * round;
    atomicStore(&hist[li], 0u);
    workgroupBarrier();
    for (var i = li; i < list.count; i += THREADS) {
      let key = item(list, i).x;
      if (key != 0u && (key & mask) == prefix) {
        atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
    }
    workgroupBarrier();
    sums[li] = atomicLoad(&hist[li]);
    workgroupBarrier();
    scan(li, true);
    if (round == 0u) {
      k = min(p.topK, sums[0]);
      need = k;
    }
    // The bin where the count from the top first reaches `need`.
    var above = 0u;
    if (li + 1u < THREADS) {
      above = sums[li + 1u];
    }
    if (need > 0u && sums[li] >= need && above < need) {
      chosenBin = li;
      stillNeeded = need - above;
    }
    workgroupBarrier();
    prefix |= chosenBin << shift;
    mask |= 255u << shift;
    need = stillNeeded;
    workgroupBarrier();
  }
  let threshold = prefix;
  let ties = need; // keys equal to T to take
  let aboveCount = k - ties;

  // Gather: keys above T in any order, ties in list order by contiguous runs.
  if (li == 0u) {
    atomicStore(&candidates, 0u);
  }
  workgroupBarrier();
  let run = (list.count + THREADS - 1u) / THREADS;
  let first = min(li * run, list.count);
  let last = min(first + run, list.count);
  var myTies = 0u;
  if (k > 0u) {
    for (var i = first; i < last; i++) {
      let it = item(list, i);
      if (it.x > threshold) {
        let slot = atomicAdd(&candidates, 1u);
        candKey[slot] = it.x;
        candId[slot] = it.y;
      } else if (it.x == threshold) {
        myTies++;
      }
    }
  }
  sums[li] = myTies;
  workgroupBarrier();
  scan(li, false);
  let tiesBefore = sums[li] - myTies;
  if (myTies > 0u && tiesBefore < ties) {
    var rank = tiesBefore;
    for (var i = first; i < last && rank < ties; i++) {
      let it = item(list, i);
      if (it.x == threshold) {
        candKey[aboveCount + rank] = threshold;
        candId[aboveCount + rank] = it.y;
        rank++;
      }
    }
  }
  workgroupBarrier();

  // Rank the taken items: larger key first, lower id on ties.
  if (li < k) {
    let key = candKey[li];
    let id = candId[li];
    var rank = 0u;
    for (var j = 0u; j < k; j++) {
      if (candKey[j] > key || (candKey[j] == key && candId[j] < id)) {
        rank++;
      }
    }
    sortedKey[rank] = key;
    sortedId[rank] = id;
  }
  workgroupBarrier();
  return k;
}

@compute @workgroup_size(256)
fn slices(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let slice = wg.x;
  let row = wg.y;
  let first = min(slice * SLICE, p.limit);
  let list = Items(0u, first, min(first + SLICE, p.limit) - first, row * p.stride);
  let k = selectTop(list, li);
  if (li < MAX_K) {
    var pair = vec2<u32>(0u);
    if (li < k) {
      pair = vec2<u32>(sortedKey[li], sortedId[li]);
    }
    found[(row * nwg.x + slice) * MAX_K + li] = pair;
  }
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.x;
  let base = row * p.stride;
  let nSlices = (p.limit + SLICE - 1u) / SLICE;
  let k = selectTop(Items(1u, row * nSlices * MAX_K, nSlices * MAX_K, base), li);

  if (li != 0u) {
    return;
  }
  if (k == 0u) {
    ids[p.index + row] = -1.0;
    return;
  }
  // Temperature and softmax as weights relative to the top token, then top-p
  // and min-p keep the first `count`, then the draw: Sampler.sample's steps.
  let top = logits[base + sortedId[0]];
  var total = 0.0;
  for (var j = 0u; j < k; j++) {
    total += weight(base, j, top);
  }
  var count = k;
  if (p.topP < 1.0) {
    let nucleus = p.topP * total;
    var mass = 0.0;
    for (var j = 0u; j < k; j++) {
      let w = weight(base, j, top);
      if (w < p.minP) {
        count = j;
        break;
      }
      mass += w;
      if (mass >= nucleus) {
        count = j + 1u;
        break;
      }
    }
  } else if (p.minP > 0.0) {
    for (var j = 0u; j < k; j++) {
      if (weight(base, j, top) < p.minP) {
        count = j;
        break;
      }
    }
  }
  var sum = 0.0;
  for (var j = 0u; j < count; j++) {
    sum += weight(base, j, top);
  }
  var r = uniforms[p.uniformIndex + row] * sum;
  var chosen = sortedId[0];
  for (var j = 0u; j < count; j++) {
    let w = weight(base, j, top);
    if (w <= 0.0) {
      continue;
    }
    chosen = sortedId[j];
    if (r < w) {
      break;
    }
    r -= w;
  }
  ids[p.index + row] = f32(chosen);
}
