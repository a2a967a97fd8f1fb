/**
 * A {@link Session} is one sequence being read or written: the model's
 * recurrent state, the ids consumed so far and the logits of the last one.
 * Its whole content round-trips through a `Uint8Array` snapshot, so a
 * conversation can be stored and resumed anywhere.
 *
 * Snapshot layout (little-endian): the 8 ASCII bytes `MAMBASS1`, then u32
 * fields nLayer, dConv, dInner, dState, vocabSize, tokenCount, hasLogits; then
 * tokenCount i32 ids; then vocabSize f32 logits when hasLogits is 1; then per
 * layer the conv state [dConv - 1, dInner] and the SSM state [dInner, N] as f32.
 *
 * @module
 */

import type { DecodedChunk, DevicePenalty, MambaModel, MambaState } from "./model.ts";
import { MAX_DEVICE_PENALTY_WINDOW, MAX_DEVICE_TOP_K } from "./backend.ts";
import {
  penalizes,
  penaltyFitsDevice,
  Sampler,
  samplesTopK,
  type SamplingOptions,
} from "./sampler.ts";

const MAGIC = "MAMBASS1";
const HEADER_BYTES = 8 + 7 * 4;

/** Thrown for a snapshot that is malformed or made for another model. */
export class SnapshotError extends Error {
  /** Builds the error from a problem description. */
  constructor(problem: string) {
    super(`Invalid snapshot: ${problem}`);
    this.name = "SnapshotError";
  }
}

/** Options of {@link Session.greedy} and {@link Session.sample}. */
export interface DecodeOptions {
  /** Only ids below this are chosen (default: the whole vocabulary). */
  limit?: number;
  /** Stops before the first id for which this is true; that id is not fed. */
  stopBefore?: (id: number) => boolean;
  /**
   * Where decoding runs on the device: how many ids each read-back brings,
   * in order, summing to the count (default: one read-back for all). Each
   * chunk is read while the device already runs the next, and handed to
   * `onIds` as it arrives, so a long call streams without the device waiting.
   */
  chunks?: readonly number[];
  /** Called with the ids fed, in order, as they arrive: a chunk at a time on the device. */
  onIds?: (ids: number[]) => void;
}

/**
 * `chunks` checked against `count`: positive integers that sum to it, or
 * [count]. Throws a RangeError for a bad count or bad chunks.
 */
function readBackChunks(count: number, chunks?: readonly number[]): readonly number[] {
  if (!Number.isInteger(count) || count < 0) {
    throw new RangeError(`count must be a non-negative integer, got ${count}`);
  }
  if (!chunks) return count > 0 ? [count] : [];
  const sum = chunks.reduce((total, size) => total + size, 0);
  if (chunks.some((size) => !Number.isInteger(size) || size < 1) || sum !== count) {
    throw new RangeError(
      `chunks must be positive integers that sum to count (${count}), got [${chunks.join(", ")}]`,
    );
  }
  return chunks;
}

/** Decoded snapshot contents, validated against a model's sizes. */
interface SnapshotData {
  tokens: number[];
  logits: Float32Array | null;
  conv: Float32Array[];
  ssm: Float32Array[];
}

/** One sequence's recurrent state on a model. */
export class Session<Buf = unknown> {
  readonly #model: MambaModel<Buf>;
  readonly #state: MambaState<Buf>;
  #tokens: number[] = [];
  #lastLogits: Float32Array | null = null;
  /** Restoring from a snapshot that was still being taken; settled before any use. */
  #pending: Promise<void> | null = null;
  /** Serializes calls so overlapping prefill/step calls cannot interleave. */
  #queue: Promise<unknown> = Promise.resolve();

  /**
   * A fresh session, or one resumed from `snapshot` (a promise is accepted, so
   * `model.session(other.snapshot())` works without an await).
   */
  constructor(model: MambaModel<Buf>, snapshot?: Uint8Array | Promise<Uint8Array>) {
    this.#model = model;
    this.#state = model.newState();
    if (snapshot instanceof Uint8Array) {
      try {
        this.#restore(snapshot);
      } catch (error) {
        model.releaseState(this.#state);
        throw error;
      }
    } else if (snapshot) {
      this.#pending = snapshot.then((bytes) => this.#restore(bytes));
      this.#pending.catch(() => {}); // Reported by the first call that awaits it.
    }
  }

  /**
   * The ids consumed so far (prompt and generated), oldest first. A session
   * made from a snapshot promise shows them once that promise has settled
   * (after the first awaited call).
   */
  get tokens(): readonly number[] {
    return this.#tokens;
  }

  /** Logits after the last consumed id [vocab], or null before any. */
  get lastLogits(): Float32Array | null {
    return this.#lastLogits;
  }

  /** Feeds a sequence of ids; returns the logits after the last one [vocab]. */
  // deno-lint-ignore require-await -- async so that invalid ids reject instead of throwing.
  async prefill(ids: readonly number[] | Int32Array): Promise<Float32Array> {
    const array = this.#model.tokenIds(ids);
    if (array.length === 0) throw new RangeError("Cannot prefill an empty sequence of ids");
    return this.#enqueue(() => this.#run(array));
  }

  /** Feeds one id; returns the logits after it [vocab]. */
  // deno-lint-ignore require-await -- async so that an invalid id rejects instead of throwing.
  async step(id: number): Promise<Float32Array> {
    const array = this.#model.tokenIds([id]);
    return this.#enqueue(() => this.#run(array));
  }

  /**
   * Feeds `ids[i]` to `sessions[i]`, for sessions of one model, in one batched
   * step: the projections read each weight once for all of them, which is
   * where a decode step spends its time. Returns each session's logits
   * [vocab]. Each session still runs its calls in order.
   */
  static stepTogether(
    sessions: readonly Session<unknown>[],
    ids: readonly number[],
  ): Promise<Float32Array[]> {
    if (sessions.length !== ids.length) {
      return Promise.reject(new RangeError(`${sessions.length} sessions but ${ids.length} ids`));
    }
    if (sessions.length === 0) return Promise.resolve([]);
    const model = sessions[0].#model;
    if (sessions.some((session) => session.#model !== model)) {
      return Promise.reject(new RangeError("Sessions stepped together must share one model"));
    }
    if (new Set(sessions).size !== sessions.length) {
      return Promise.reject(new RangeError("A session can take only one step at a time"));
    }
    let array: Int32Array;
    try {
      array = model.tokenIds(ids);
    } catch (error) {
      return Promise.reject(error);
    }
    const ready = Promise.all(sessions.map((session) => session.#idle()));
    const result = ready.then(async () => {
      const logits = await model.stepBatch(sessions.map((session) => session.#state), array);
      const vocab = model.config.vocabSize;
      return sessions.map((session, i) => {
        const row = logits.slice(i * vocab, (i + 1) * vocab);
        session.#tokens.push(ids[i]);
        session.#lastLogits = row;
        return row;
      });
    });
    for (const session of sessions) session.#queue = result.catch(() => {});
    return result;
  }

  /** Settles once this session's earlier calls (and a pending restore) have. */
  async #idle(): Promise<void> {
    await this.#queue;
    if (this.#pending) await this.#pending;
  }

  /** Whether {@link greedy} runs on the device, with one read-back per chunk. */
  get decodesOnDevice(): boolean {
    return this.#model.decodesOnDevice;
  }

  /**
   * Feeds up to `count` greedy ids, each the argmax (lowest id on ties) over
   * ids below `limit` of the logits so far, with `Sampler.sample`'s
   * repetition penalty when given, and returns them. It stops before
   * an id for which `stopBefore` is true: that id is not fed, and `stopped`
   * says so. Where the backend decodes on the device (webgpu) a call costs
   * one read-back per chunk (see {@link DecodeOptions}) instead of one per
   * token. Needs logits: prefill first.
   */
  greedy(
    count: number,
    options: DecodeOptions & { repetitionPenalty?: number; repeatLastN?: number } = {},
  ): Promise<{ ids: number[]; stopped: boolean }> {
    const limit = this.#limit(options);
    let chunks: readonly number[];
    let sampler: Sampler;
    try {
      chunks = readBackChunks(count, options.chunks);
      // At temperature 0 the sampler is a penalized argmax and draws nothing.
      const { repetitionPenalty, repeatLastN } = options;
      sampler = new Sampler({ temperature: 0, repetitionPenalty, repeatLastN, seed: 0 });
    } catch (error) {
      return Promise.reject(error);
    }
    const onDevice = this.greedyOnDevice(sampler.options);
    return this.#enqueue(async () => {
      const stopBefore = options.stopBefore ?? (() => false);
      const ids: number[] = [];
      const next = () => {
        if (!this.#lastLogits) {
          throw new RangeError("Greedy decoding needs logits: prefill the session first");
        }
        return sampler.sample(this.#lastLogits, this.#tokens, limit);
      };
      if (count === 0) return { ids, stopped: false };
      if (!onDevice) {
        for (let i = 0; i < count; i++) {
          const id = next();
          if (stopBefore(id)) return { ids, stopped: true };
          await this.#run(Int32Array.of(id));
          ids.push(id);
          options.onIds?.([id]);
        }
        return { ids, stopped: false };
      }
      const first = next();
      if (stopBefore(first)) return { ids, stopped: true };
      const penalty = this.#devicePenalty(sampler.options);
      return await this.#feedFromDevice(
        stopBefore,
        () => this.#model.streamGreedyBatch([this.#state], [first], chunks, limit, penalty),
        options.onIds,
      );
    });
  }

  /** The ids below which a decode call chooses: its `limit`, within the vocabulary. */
  #limit(options: DecodeOptions): number {
    return Math.min(options.limit ?? Infinity, this.#model.config.vocabSize);
  }

  /**
   * Whether {@link greedy} with a repetition penalty from these options
   * decodes on the device: the backend decodes there, and applies the
   * penalty there too where there is one.
   */
  greedyOnDevice(options: Readonly<Required<SamplingOptions>>): boolean {
    return this.#model.decodesOnDevice && penaltyFitsDevice(options) &&
      (!penalizes(options) || this.#model.samplesOnDevice);
  }

  /** The repetition penalty of these options for the device, over this session's ids; none when off. */
  #devicePenalty(options: Readonly<Required<SamplingOptions>>): DevicePenalty | undefined {
    if (!penalizes(options)) return undefined;
    const { repetitionPenalty, repeatLastN } = options;
    return { penalty: repetitionPenalty, window: repeatLastN, histories: [this.#tokens] };
  }

  /**
   * Feeds the ids that `decode` chooses on the device, chunk by chunk (the
   * first id already checked against `stopBefore`), up to the first later one
   * for which `stopBefore` is true, handing each chunk's ids to `onIds`. The
   * device runs past such an id, so then the state is rewound and only the
   * ids before it are fed. Returns those ids; on an error the state is as
   * before the call.
   */
  async #feedFromDevice(
    stopBefore: (id: number) => boolean,
    decode: () => AsyncGenerator<DecodedChunk, void, undefined>,
    onIds?: (ids: number[]) => void,
  ): Promise<{ ids: number[]; stopped: boolean }> {
    const backup = this.#copyState();
    try {
      const kept: number[] = [];
      let logits: Float32Array | null = null;
      let stopped = false;
      for await (const chunk of decode()) {
        const ids = chunk.ids[0];
        const stop = ids.findIndex((id, i) => (kept.length > 0 || i > 0) && stopBefore(id));
        const part = Array.from(stop >= 0 ? ids.subarray(0, stop) : ids);
        kept.push(...part);
        if (part.length > 0) onIds?.(part);
        if (stop >= 0) {
          stopped = true;
          break;
        }
        logits = chunk.logits?.[0] ?? null;
      }
      if (stopped) {
        this.#restoreState(backup);
        this.#lastLogits = await this.#model.run(this.#state, Int32Array.from(kept), "last");
      } else {
        this.#lastLogits = logits;
      }
      this.#tokens.push(...kept);
      return { ids: kept, stopped };
    } catch (error) {
      this.#restoreState(backup);
      throw error;
    } finally {
      this.#model.releaseState(backup);
    }
  }

  /** Whether {@link sample} runs on the device, with one read-back per chunk. */
  get samplesOnDevice(): boolean {
    return this.#model.samplesOnDevice;
  }

  /**
   * Feeds up to `count` ids drawn by `sampler` (which must have top-k on, from
   * 1 to 64, and a repetition penalty off or over at most 1024 ids), like
   * {@link greedy}: it stops before
   * an id for which `stopBefore` is true. The first id is drawn on the host
   * from the session's logits, the others on the device, with the random
   * numbers the sampler would have drawn; the sampler ends as if it had drawn
   * each id itself. Needs a backend that {@link samplesOnDevice}, and logits.
   */
  sample(
    count: number,
    sampler: Sampler,
    options: DecodeOptions = {},
  ): Promise<{ ids: number[]; stopped: boolean }> {
    const limit = this.#limit(options);
    let chunks: readonly number[];
    try {
      chunks = readBackChunks(count, options.chunks);
    } catch (error) {
      return Promise.reject(error);
    }
    const { temperature, topK, topP, minP } = sampler.options;
    if (!samplesTopK(sampler.options, limit)) {
      return Promise.reject(
        new RangeError(
          `Sampling on the device needs a temperature above 0, topK from 1 to ${MAX_DEVICE_TOP_K} and below the ${limit} candidates, and a repetition penalty off or over at most ${MAX_DEVICE_PENALTY_WINDOW} ids`,
        ),
      );
    }
    return this.#enqueue(async () => {
      const stopBefore = options.stopBefore ?? (() => false);
      const ids: number[] = [];
      if (count === 0) return { ids, stopped: false };
      if (!this.#lastLogits) {
        throw new RangeError("Sampling needs logits: prefill the session first");
      }
      const first = sampler.sample(this.#lastLogits, this.#tokens, limit);
      if (stopBefore(first)) return { ids, stopped: true };
      const drawn = sampler.state();
      // As f32, kept below 1: a number within 2^-25 of 1 would round up to it.
      const uniforms = Float32Array.from(
        sampler.randoms(count - 1),
        (u) => Math.min(u, 1 - 2 ** -24),
      );
      const sampling = { topK, temperature, topP, minP };
      const penalty = this.#devicePenalty(sampler.options);
      const run = await this.#feedFromDevice(
        stopBefore,
        () =>
          this.#model.streamSampledBatch(
            [this.#state],
            [first],
            chunks,
            limit,
            sampling,
            uniforms,
            penalty,
          ),
        options.onIds,
      );
      if (run.stopped) {
        // The sampler drew one number per id up to the stopping one, as the
        // host would have; the device drew more.
        sampler.restore(drawn);
        sampler.randoms(run.ids.length);
      }
      return run;
    });
  }

  /** The whole session as bytes; pass it to `model.session(snapshot)` to resume. */
  snapshot(): Promise<Uint8Array> {
    return this.#enqueue(async () => {
      const { nLayer, dConv, dInner, dState, vocabSize } = this.#model.config;
      const be = this.#model.backend;
      const logitsBytes = this.#lastLogits ? vocabSize * 4 : 0;
      const stateBytes = nLayer * ((dConv - 1) * dInner + dInner * dState) * 4;
      const bytes = new Uint8Array(
        HEADER_BYTES + this.#tokens.length * 4 + logitsBytes + stateBytes,
      );
      const view = new DataView(bytes.buffer);
      bytes.set(new TextEncoder().encode(MAGIC));
      const fields = [
        nLayer,
        dConv,
        dInner,
        dState,
        vocabSize,
        this.#tokens.length,
        this.#lastLogits ? 1 : 0,
      ];
      fields.forEach((v, i) => view.setUint32(8 + 4 * i, v, true));
      let offset = HEADER_BYTES;
      for (const id of this.#tokens) {
        view.setInt32(offset, id, true);
        offset += 4;
      }
      // Snapshots store floats little-endian, as the host does (the project
      // assumes one, see safetensors.ts): their bytes copy as they are.
      const putFloats = (values: Float32Array) => {
        bytes.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), offset);
        offset += values.byteLength;
      };
      if (this.#lastLogits) putFloats(this.#lastLogits);
      for (let l = 0; l < nLayer; l++) {
        putFloats(await be.read(this.#state.conv[l]));
        putFloats(await be.read(this.#state.ssm[l]));
      }
      return bytes;
    });
  }

  /** Gives the state's buffers back; the session must not be used afterwards. */
  dispose(): void {
    this.#model.releaseState(this.#state);
  }

  /** A copy of the recurrent state, on the backend. */
  #copyState(): MambaState<Buf> {
    const copy = this.#model.newState();
    this.#transfer(this.#state, copy);
    return copy;
  }

  #restoreState(copy: MambaState<Buf>): void {
    this.#transfer(copy, this.#state);
  }

  #transfer(from: MambaState<Buf>, to: MambaState<Buf>): void {
    const { dConv, dInner, dState } = this.#model.config;
    const be = this.#model.backend;
    from.conv.forEach((buf, l) => be.copy(to.conv[l], 0, buf, 0, (dConv - 1) * dInner));
    from.ssm.forEach((buf, l) => be.copy(to.ssm[l], 0, buf, 0, dInner * dState));
  }

  #enqueue<T>(task: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(async () => {
      if (this.#pending) await this.#pending;
      return task();
    });
    this.#queue = result.catch(() => {});
    return result;
  }

  async #run(ids: Int32Array): Promise<Float32Array> {
    const logits = await this.#model.run(this.#state, ids, "last");
    for (const id of ids) this.#tokens.push(id);
    this.#lastLogits = logits;
    return logits;
  }

  #restore(bytes: Uint8Array): void {
    const data = decodeSnapshot(bytes, this.#model);
    const be = this.#model.backend;
    data.conv.forEach((values, l) => be.write(this.#state.conv[l], values));
    data.ssm.forEach((values, l) => be.write(this.#state.ssm[l], values));
    this.#tokens = data.tokens;
    this.#lastLogits = data.logits;
  }
}

function decodeSnapshot<Buf>(bytes: Uint8Array, model: MambaModel<Buf>): SnapshotData {
  if (!(bytes instanceof Uint8Array)) throw new SnapshotError("expected a Uint8Array");
  if (bytes.length < HEADER_BYTES || new TextDecoder().decode(bytes.subarray(0, 8)) !== MAGIC) {
    throw new SnapshotError("it does not start with the MAMBASS1 header");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const field = (i: number) => view.getUint32(8 + 4 * i, true);
  const { nLayer, dConv, dInner, dState, vocabSize } = model.config;
  const expected = { nLayer, dConv, dInner, dState, vocabSize };
  Object.entries(expected).forEach(([name, value], i) => {
    if (field(i) !== value) {
      throw new SnapshotError(
        `it was made for a model with ${name} ${field(i)}, this one has ${value}`,
      );
    }
  });
  const tokenCount = field(5);
  const hasLogits = field(6);
  if (hasLogits > 1) throw new SnapshotError("the logits flag is neither 0 nor 1");
  const convLength = (dConv - 1) * dInner;
  const ssmLength = dInner * dState;
  const length = HEADER_BYTES +
    4 * (tokenCount + hasLogits * vocabSize + nLayer * (convLength + ssmLength));
  if (bytes.length !== length) {
    throw new SnapshotError(`it holds ${bytes.length} bytes, its header implies ${length}`);
  }
  let offset = HEADER_BYTES;
  const tokens: number[] = [];
  for (let i = 0; i < tokenCount; i++, offset += 4) {
    const id = view.getInt32(offset, true);
    if (id < 0 || id >= vocabSize) {
      throw new SnapshotError(`token ${i} has id ${id}, outside the vocabulary`);
    }
    tokens.push(id);
  }
  // Little-endian floats, copied so that they are aligned whatever the offset.
  const floats = (count: number) => {
    const values = new Float32Array(bytes.slice(offset, offset + count * 4).buffer);
    offset += count * 4;
    return values;
  };
  const logits = hasLogits ? floats(vocabSize) : null;
  const conv: Float32Array[] = [];
  const ssm: Float32Array[] = [];
  for (let l = 0; l < nLayer; l++) {
    conv.push(floats(convLength));
    ssm.push(floats(ssmLength));
  }
  return { tokens, logits, conv, ssm };
}
