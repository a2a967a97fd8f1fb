/**
 * {@link StepBatcher}: gathers the decode steps of concurrent generations on
 * one model into batched steps, so a server with many streams reads each
 * weight once per round rather than once per stream.
 *
 * @example Two generations sharing a batcher
 * ```ts
 * import { loadModel, StepBatcher } from "../mod.ts";
 *
 * const model = await loadModel(new URL("../models/tiny-shakespeare/", import.meta.url));
 * const batcher = new StepBatcher();
 * const texts = await Promise.all(["ROMEO:", "JULIET:"].map(async (prompt) => {
 *   let text = prompt;
 *   for await (const event of model.generate(prompt, { maxNewTokens: 8, batcher })) {
 *     text += event.text;
 *   }
 *   return text;
 * }));
 * ```
 *
 * @module
 */

import { Session } from "./session.ts";

/** Options of {@link StepBatcher}. */
export interface StepBatcherOptions {
  /** Steps run together at most (default 16). */
  maxBatch?: number;
  /**
   * Milliseconds a step waits for the other joined generations before it runs
   * with those that have asked (default 2): a generation busy elsewhere, such
   * as a long prefill, delays the others by at most this much.
   */
  maxWaitMs?: number;
}

interface PendingStep {
  session: Session<unknown>;
  id: number;
  resolve: (logits: Float32Array) => void;
  reject: (error: unknown) => void;
}

/**
 * Batches the steps of the generations that have {@link join}ed: a step
 * waits until every joined generation has asked for its next one (or
 * `maxBatch` steps wait, or `maxWaitMs` passes), then all of them run in one
 * {@link Session.stepTogether}.
 */
export class StepBatcher {
  /** Batched steps run so far, and the steps they held (steps / batches is the mean batch). */
  readonly stats: { batches: number; steps: number } = { batches: 0, steps: 0 };
  readonly #maxBatch: number;
  readonly #maxWaitMs: number;
  #joined = 0;
  #pending: PendingStep[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;

  /** A batcher for the sessions of one model. */
  constructor(options: StepBatcherOptions = {}) {
    this.#maxBatch = options.maxBatch ?? 16;
    this.#maxWaitMs = options.maxWaitMs ?? 2;
    if (!Number.isInteger(this.#maxBatch) || this.#maxBatch < 1) {
      throw new RangeError(`maxBatch must be a positive integer, got ${this.#maxBatch}`);
    }
    if (!(this.#maxWaitMs >= 0)) {
      throw new RangeError(`maxWaitMs must be a non-negative number, got ${this.#maxWaitMs}`);
    }
  }

  /** Counts a generation in, until the returned function is called. */
  join(): () => void {
    this.#joined++;
    let joined = true;
    return () => {
      if (!joined) return;
      joined = false;
      this.#joined--;
      this.#schedule();
    };
  }

  /** Feeds `id` to `session` in the next batch; resolves to its logits [vocab]. */
  step(session: Session<unknown>, id: number): Promise<Float32Array> {
    return new Promise((resolve, reject) => {
      this.#pending.push({ session, id, resolve, reject });
      this.#schedule();
    });
  }

  /** Runs the waiting steps now if every joined generation has asked, else sets the timer. */
  #schedule(): void {
    if (this.#pending.length === 0) return;
    if (this.#pending.length >= Math.min(Math.max(this.#joined, 1), this.#maxBatch)) {
      this.#flush();
    } else {
      this.#timer ??= setTimeout(() => this.#flush(), this.#maxWaitMs);
    }
  }

  #flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const batch = this.#pending.splice(0, this.#maxBatch);
    this.stats.batches++;
    this.stats.steps += batch.length;
    Session.stepTogether(batch.map((step) => step.session), batch.map((step) => step.id)).then(
      (rows) => batch.forEach((step, i) => step.resolve(rows[i])),
      (error) => batch.forEach((step) => step.reject(error)),
    );
    this.#schedule();
  }
}
