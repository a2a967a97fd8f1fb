// Samples one id for each row of logits whose settings sample among at most
// MAX_K candidates (choose_rows.wgsl is prepended): a top-k of 1 to MAX_K
// below the row's limit, or a limit of at most MAX_K; sample_wide.wgsl takes
// the other sampled rows. As Sampler.sample does after its repetition
// penalty (penalize.wgsl): the topK largest logits below the limit (ties to
// the lower id; -Infinity and NaN never), temperature, softmax, top-p, min-p,
// then a draw with the row's random number u in [0, 1). ids[idsOffset + r] =
// the id as an f32, or -1 when no logit can be sampled, so that sampled
// decoding needs no read-back per token; the id also goes into the row's
// history.
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
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<f32>;
@group(0) @binding(4) var<storage, read> randoms: array<f32>;
@group(0) @binding(5) var<storage, read_write> history: array<f32>;
// Each slice's selection: a row's slices take keptOf(row) (key, id) pairs
// each, one after the other from the row's MAX_K · maxSlices (key 0 past the
// slice's selection), so that main reads no more than the row can keep.
@group(0) @binding(7) var<storage, read_write> found: array<vec2<u32>>;

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
// main: the weight of each of the row's top k (sortedWeight[j] of sortedId[j]),
// each computed by a thread of its own, so that the one thread that draws
// does not wait on a load of the logits per candidate and pass.
var<workgroup> sortedWeight: array<f32, MAX_K>;

// The list the selection runs over: `count` items from `first`, ids of the
// logits (stage 0, `slices`) or pairs of `found` (stage 1, `main`).
struct Items {
  stage: u32,
  first: u32,
  count: u32,
  base: u32, // of the row in logits
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

// The slices of a row of `limit` ids.
fn slicesOf(limit: u32) -> u32 {
  return (limit + SLICE - 1u) / SLICE;
}

// Row r's weight of candidate j (the top one weighs 1), as the host computes it.
fn weight(base: u32, j: u32, top: f32, temperature: f32) -> f32 {
  return weightOf(logits[base + sortedId[j]], top, temperature);
}

// Counts a key that matches the digits found so far in the bin of its next digit.
fn countKey(key: u32, mask: u32, prefix: u32, shift: u32) {
  if (key != 0u && (key & mask) == prefix) {
    atomicAdd(&hist[(key >> shift) & 255u], 1u);
  }
}

// Takes an item above the threshold T into the candidates; returns 1 for a
// key equal to T (a tie, taken in list order afterwards), else 0.
fn gather(it: vec2<u32>, threshold: u32) -> u32 {
  if (it.x > threshold) {
    let slot = atomicAdd(&candidates, 1u);
    candKey[slot] = it.x;
    candId[slot] = it.y;
  }
  return select(0u, 1u, it.x == threshold);
}

// Selects the top min(topK, valid items) of the list into sortedKey and
// sortedId (larger key first, the lower id on ties: ids rise along the list
// among equal keys) and returns how many.
// Every thread of the workgroup must call it.
fn selectTop(list: Items, topK: u32, li: u32) -> u32 {
  // The radix select: after round q, `prefix` holds the top 8(q + 1) bits of T.
  var prefix = 0u;
  var mask = 0u;
  var need = 0u; // keys at or above the prefix that are still to be taken
  var k = 0u; // items to take in all: topK, or fewer valid ones
  for (var round = 0u; round < 4u; round++) {
    let shift = 24u - 8u * round;
    atomicStore(&hist[li], 0u);
    workgroupBarrier();
    // Four loads in flight per iteration, as in the gather below: a loop
    // that waits on each load in turn idles for every load's latency (the
    // loop is not unrolled for us).
    var i = li;
    for (; i + 3u * THREADS < list.count; i += 4u * THREADS) {
      let k0 = item(list, i).x;
      let k1 = item(list, i + THREADS).x;
      let k2 = item(list, i + 2u * THREADS).x;
      let k3 = item(list, i + 3u * THREADS).x;
      countKey(k0, mask, prefix, shift);
      countKey(k1, mask, prefix, shift);
      countKey(k2, mask, prefix, shift);
      countKey(k3, mask, prefix, shift);
    }
    for (; i < list.count; i += THREADS) {
      countKey(item(list, i).x, mask, prefix, shift);
    }
    workgroupBarrier();
    sums[li] = atomicLoad(&hist[li]);
    workgroupBarrier();
    scan(li, true);
    if (round == 0u) {
      k = min(topK, sums[0]);
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
    var i = first;
    for (; i + 3u < last; i += 4u) {
      let it0 = item(list, i);
      let it1 = item(list, i + 1u);
      let it2 = item(list, i + 2u);
      let it3 = item(list, i + 3u);
      myTies += gather(it0, threshold) + gather(it1, threshold) + gather(it2, threshold) +
        gather(it3, threshold);
    }
    for (; i < last; i++) {
      myTies += gather(item(list, i), threshold);
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
  @builtin(local_invocation_index) li: u32,
) {
  let slice = wg.x;
  let row = wg.y;
  let limit = limitOf(row);
  if (!samplesNarrow(row) || slice >= slicesOf(limit)) {
    return; // the same for the whole workgroup
  }
  let first = slice * SLICE;
  let list = Items(0u, first, min(first + SLICE, limit) - first, row * p.vocab);
  let kept = keptOf(row);
  let k = selectTop(list, kept, li);
  if (li < kept) {
    var pair = vec2<u32>(0u);
    if (li < k) {
      pair = vec2<u32>(sortedKey[li], sortedId[li]);
    }
    found[row * p.maxSlices * MAX_K + slice * kept + li] = pair;
  }
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.x;
  if (!samplesNarrow(row)) {
    return; // the same for the whole workgroup
  }
  let base = row * p.vocab;
  let nSlices = slicesOf(limitOf(row));
  let kept = keptOf(row);
  let k = selectTop(Items(1u, row * p.maxSlices * MAX_K, nSlices * kept, base), kept, li);
  let temperature = temperatureOf(row);
  // Temperature and softmax as weights relative to the top token.
  if (li < k) {
    sortedWeight[li] = weight(base, li, logits[base + sortedId[0]], temperature);
  }
  workgroupBarrier();

  if (li != 0u) {
    return;
  }
  if (k == 0u) {
    ids[p.idsOffset + row] = -1.0;
    return;
  }
  let topP = topPOf(row);
  let minP = minPOf(row);
  let top = logits[base + sortedId[0]];
  let u = randoms[p.randomOffset + row];
  var chosen = sortedId[0];
  if (walksSorted(row)) {
    // Top-p and min-p keep the first `count`, then the draw walks them in order.
    var total = 0.0;
    for (var j = 0u; j < k; j++) {
      total += sortedWeight[j];
    }
    var count = k;
    if (topP < 1.0) {
      let nucleus = topP * total;
      var mass = 0.0;
      for (var j = 0u; j < k; j++) {
        let w = sortedWeight[j];
        if (w < minP) {
          count = j;
          break;
        }
        mass += w;
        if (mass >= nucleus) {
          count = j + 1u;
          break;
        }
      }
    } else if (minP > 0.0) {
      for (var j = 0u; j < k; j++) {
        if (sortedWeight[j] < minP) {
          count = j;
          break;
        }
      }
    }
    var sum = 0.0;
    for (var j = 0u; j < count; j++) {
      sum += sortedWeight[j];
    }
    var r = u * sum;
    for (var j = 0u; j < count; j++) {
      let w = sortedWeight[j];
      if (w <= 0.0) {
        continue;
      }
      chosen = sortedId[j];
      if (r < w) {
        break;
      }
      r -= w;
    }
  } else {
    // Nothing cuts (a limit of at most MAX_K ids): min-p keeps what it keeps
    // and the draw walks it in id order, as pickToken does.
    let limit = limitOf(row);
    var sum = 0.0;
    for (var i = 0u; i < limit; i++) {
      let v = logits[base + i];
      if (keyOf(v) != 0u) {
        let w = weightOf(v, top, temperature);
        if (w >= minP) {
          sum += w;
        }
      }
    }
    var r = u * sum;
    for (var i = 0u; i < limit; i++) {
      let v = logits[base + i];
      if (keyOf(v) == 0u) {
        continue;
      }
      let w = weightOf(v, top, temperature);
      if (w < minP || w <= 0.0) {
        continue;
      }
      chosen = i;
      if (r < w) {
        break;
      }
      r -= w;
    }
  }
  ids[p.idsOffset + row] = f32(chosen);
  history[historyAt(row, positionOf(row))] = f32(chosen);
}
