/**
 * Operations that the backends in host memory (js, wasm) share: they see
 * their buffers as `Float32Array`s, so one implementation serves both.
 *
 * @module
 */

import { type ChooseArgs, type Recording, SAMPLING_SETTINGS } from "../backend.ts";
import { penalizes, type PickScratch, pickToken } from "../sampler.ts";

/** The host views of a {@link ChooseArgs}' buffers. */
export interface ChooseViews {
  logits: Float32Array;
  settings: Float32Array;
  randoms: Float32Array;
  history: Float32Array;
  slots: Float32Array;
  ids: Float32Array;
}

/**
 * `Backend.chooseTokens` in host memory: each row through `pickToken`, the
 * sampler's own arithmetic, with the row's history window read from the ring
 * and its pick written back to it.
 */
export function chooseOnHost<Buf>(
  args: ChooseArgs<Buf>,
  views: ChooseViews,
  scratch: PickScratch,
): void {
  const { rows, vocab, randomOffset, historyLength, step, idsOffset } = args;
  const { logits, settings, randoms, history, slots, ids } = views;
  const sequences = history.length / historyLength;
  for (let r = 0; r < rows; r++) {
    const at = r * SAMPLING_SETTINGS;
    const options = {
      temperature: settings[at],
      topK: settings[at + 1],
      topP: settings[at + 2],
      minP: settings[at + 3],
      repetitionPenalty: settings[at + 4],
      repeatLastN: settings[at + 5],
      seed: 0,
    };
    const position = settings[at + 6] + step;
    const limit = settings[at + 7];
    const slot = slots[r];
    if (!(Number.isInteger(slot) && slot >= 0 && slot < sequences)) {
      throw new RangeError(`Row ${r} names sequence ${slot}, outside the ${sequences} held`);
    }
    const ring = history.subarray(slot * historyLength, (slot + 1) * historyLength);
    // The ids the penalty looks back over, oldest first (none without a penalty).
    const window = penalizes(options)
      ? Math.min(options.repeatLastN < 0 ? position : options.repeatLastN, position, historyLength)
      : 0;
    const recent = Array.from(
      { length: window },
      (_, i) => ring[(position - window + i) % historyLength],
    );
    const id = pickToken(
      logits.subarray(r * vocab, (r + 1) * vocab),
      recent,
      limit,
      options,
      () => randoms[randomOffset + r],
      scratch,
    );
    ids[idsOffset + r] = id;
    if (id >= 0) ring[position % historyLength] = id;
  }
}

/** A recording of a backend with no faster way to repeat work: the operations themselves. */
export class HostRecording implements Recording {
  readonly dispatches = 0;
  constructor(readonly ops: () => void) {}
}
