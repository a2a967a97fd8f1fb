/**
 * Choosing each row's next token on the GPU (argmax.wgsl, penalize.wgsl,
 * sample.wgsl, sample_wide.wgsl over choose_rows.wgsl): the repetition
 * penalty, then greedy rows take the argmax, rows sampling among up to
 * SAMPLE_MAX_K candidates sample.wgsl's radix select, and rows sampling among
 * more (a larger top-k, or none) the passes of {@link WideSampling}.
 *
 * @module
 */

import type { ChooseArgs } from "../../backend.ts";
import type { ChooseRowsParams } from "../../generated/wgsl_params.ts";
import type { GpuBuffer } from "./memory.ts";
import { Program } from "./program.ts";
import type { GpuRuntime } from "./runtime.ts";

const SAMPLE_SLICE = 1024; // logits per workgroup of sample.wgsl's first stage
const SAMPLE_MAX_K = 64; // MAX_K of choose_rows.wgsl: rows keeping more take sample_wide.wgsl
// sample_wide.wgsl spreads each row over slices of at least this many ids,
// fewer where the rows alone make about WIDE_GROUPS workgroups per pass.
const WIDE_MIN_SLICE = 1024;
const WIDE_GROUPS = 1024;
const WIDE_ROW_WORDS = 531; // ROW_WORDS of sample_wide.wgsl: a row's state

/** A program over choose_rows.wgsl. */
function chooser(shader: string, entry: string, bindings: number[]): Program<ChooseRowsParams> {
  return new Program(shader, entry, bindings, {}, ["choose_rows"]);
}

const PROGRAMS = {
  argmax: chooser("argmax", "main", [0, 1, 2, 3, 5, 6]),
  penalize: chooser("penalize", "main", [0, 1, 3, 5, 6, 7]),
  sampleSlices: chooser("sample", "slices", [0, 1, 3, 6, 7]),
  sample: chooser("sample", "main", [0, 1, 2, 3, 4, 5, 6, 7]),
};

/** The entry points of sample_wide.wgsl, which {@link WideSampling} puts in order. */
const WIDE_PROGRAMS = (() => {
  const wide = (entry: string) => chooser("sample_wide", entry, [0, 1, 2, 3, 4, 5, 6, 7]);
  return {
    begin: wide("begin"),
    extent: wide("extent"),
    histogram: wide("histogram"),
    settle: wide("settle"),
    totals: wide("totals"),
  };
})();

/** sample_wide.wgsl's searches (its p.search), in the order they run. */
const WIDE_SEARCHES = { topK: 0, topP: 1, draw: 2 };

/** One dispatch of sample_wide.wgsl's schedule: a program, its search and round, per slice or per row. */
interface WidePass {
  program: Program<ChooseRowsParams>;
  search: number;
  round: number;
  perSlice: boolean;
}

/**
 * The schedule of sample_wide.wgsl for calls of `rows` rows of `vocab`
 * logits: how a row is sliced, and each dispatch's program, parameters and
 * workgroups.
 */
class WideSampling {
  /** Ids per slice (a workgroup's share of a row): a multiple of 256. */
  readonly sliceLength: number;
  /** Slices per row. */
  readonly slices: number;
  /** Bytes of an id below `vocab`: a search's rounds on the id, after 4 on the key. */
  readonly idDigits: number;
  /** Its dispatches, in order. */
  readonly passes: readonly WidePass[];

  constructor(readonly rows: number, readonly vocab: number) {
    // Enough workgroups to fill a large GPU where there are few rows, each
    // with enough ids that the histograms' merging stays a small part.
    const wanted = Math.ceil((rows * vocab) / WIDE_GROUPS);
    this.sliceLength = Math.max(WIDE_MIN_SLICE, Math.ceil(wanted / 256) * 256);
    this.slices = Math.ceil(vocab / this.sliceLength);
    let idDigits = 1;
    while (vocab > 256 ** idDigits) idDigits++;
    this.idDigits = idDigits;
    const { begin, extent, histogram, settle, totals } = WIDE_PROGRAMS;
    const passes: WidePass[] = [
      { program: begin, search: 0, round: 0, perSlice: false },
      { program: extent, search: 0, round: 0, perSlice: true },
    ];
    for (const search of [WIDE_SEARCHES.topK, WIDE_SEARCHES.topP, WIDE_SEARCHES.draw]) {
      if (search === WIDE_SEARCHES.topP) {
        passes.push({ program: totals, search, round: 0, perSlice: true });
      }
      for (let round = 0; round < 4 + idDigits; round++) {
        passes.push({ program: histogram, search, round, perSlice: true });
        passes.push({ program: settle, search, round, perSlice: false });
      }
    }
    this.passes = passes;
  }

  /** Words of scratch: each row's state, rows rounded up so that few sizes are kept. */
  get scratchLength(): number {
    return 2 ** Math.ceil(Math.log2(this.rows)) * WIDE_ROW_WORDS;
  }

  /** The parameters of a pass: chooseTokens' with the pass's search and round. */
  params(common: ChooseRowsParams, pass: WidePass): ChooseRowsParams {
    const { idDigits, sliceLength } = this;
    return { ...common, search: pass.search, round: pass.round, idDigits, sliceLength };
  }

  /** The workgroups of a pass: one per slice of each row, or one per row. */
  groups(pass: WidePass): [number, number, number] {
    return [pass.perSlice ? this.slices : 1, this.rows, 1];
  }
}

/** Backend.chooseTokens on `rt`; see the module documentation. */
export function chooseTokens(rt: GpuRuntime, args: ChooseArgs<GpuBuffer>): void {
  const { logits, rows, vocab, features, settings, randoms, history, slots, ids } = args;
  if (rows === 0) return;
  const slices = Math.ceil(vocab / SAMPLE_SLICE);
  const params: ChooseRowsParams = {
    rows,
    vocab,
    randomOffset: args.randomOffset,
    historyLength: args.historyLength,
    step: args.step,
    idsOffset: args.idsOffset,
    maxSlices: slices,
    search: 0,
    round: 0,
    idDigits: 0,
    sliceLength: 0,
  };
  const common = { 3: settings.buffer, 6: slots.buffer };
  if (features.penalized) {
    // A bitmap of the ids seen per row; rows rounded up so that few sizes are kept.
    const seen = rt.memory.lasting("seen", 2 ** Math.ceil(Math.log2(rows)) * Math.ceil(vocab / 32));
    rt.run(PROGRAMS.penalize, params, {
      ...common,
      1: logits.buffer,
      5: history.buffer,
      7: seen.buffer,
    }, [rows, 1, 1]);
  }
  const picked = { ...common, 1: logits.buffer, 2: ids.buffer, 5: history.buffer };
  if (features.greedy) rt.run(PROGRAMS.argmax, params, picked, [rows, 1, 1]);
  if (features.sampled) {
    // Each slice's top k, (key, id) pairs of two u32s; then each row's.
    const found = rt.memory.lasting("found", rows * slices * SAMPLE_MAX_K * 2);
    const bindings = { ...picked, 4: randoms.buffer, 7: found.buffer };
    rt.run(PROGRAMS.sampleSlices, params, bindings, [slices, rows, 1]);
    rt.run(PROGRAMS.sample, params, bindings, [rows, 1, 1]);
  }
  if (features.widestTopK > SAMPLE_MAX_K) {
    const wide = new WideSampling(rows, vocab);
    const scratch = rt.memory.lasting("wide", wide.scratchLength);
    const bindings = { ...picked, 4: randoms.buffer, 7: scratch.buffer };
    for (const pass of wide.passes) {
      rt.run(pass.program, wide.params(params, pass), bindings, wide.groups(pass));
    }
  }
}
