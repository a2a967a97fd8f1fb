/**
 * The decode engine: one per model, it runs every sequence that decodes on
 * the model (a lone `generate`, concurrent ones, `Session.greedy` and
 * `Session.sample`, the edge server's streams) together, in rounds, and
 * feeds every prompt, in chunks between rounds.
 *
 * A round takes `k` steps over all decoding sequences at once (continuous
 * batching: sequences join and leave between rounds). Each step feeds every
 * sequence its next id, runs the model on their slots of the state pool,
 * and picks each one's next id on the backend with that sequence's own
 * options, random numbers and history (`Backend.chooseTokens`). Only ids
 * come back, once per round. A sequence that has just been prefilled joins
 * with a pick from its prompt's logits.
 *
 * Where the backend queues work on a device (webgpu), a read-back costs a
 * round trip (at least 10 ms in Deno), so the engine issues round r + 1
 * before it reads round r: the device never waits for the host. Round r's
 * read starts once round r + 1's first step is on its way and its second is
 * issued, unsubmitted (`Backend.readSubmitted`), since starting a read blocks
 * the thread until the device is idle. Sequences
 * then run ahead of what the host has judged: each round starts by copying
 * the pool (a checkpoint), and a sequence that ends inside a round (an
 * end-of-sequence id, a stop string, its last token, an abort) is rewound
 * to the latest checkpoint before its end and replays the ids it keeps. On
 * the host backends a round is one step and is read at once, so nothing
 * runs ahead.
 *
 * Every id a sequence keeps is fed before it ends, except an id judged
 * "stop-before" (an end-of-sequence id): the state then stands after the
 * ids before it, with the logits that follow them in the pool.
 *
 * @module
 */

import {
  type Backend,
  flushesAfter,
  type Recording,
  SAMPLING_SETTINGS,
  type SamplingFeatures,
  samplingFeatures,
  samplingSettings,
} from "./backend.ts";
import type { MambaModel, Scratch } from "./model.ts";
import type { PoolCopy } from "./pool.ts";
import { penalizes, type Sampler, SAMPLING_DEFAULTS, type SamplingOptions } from "./sampler.ts";
import { yieldToEventLoop } from "./yield.ts";
import { checkPositiveInteger } from "./errors.ts";

/**
 * What a decoding sequence's owner says of each id picked for it, in order:
 * go on, end without it (it is not fed), or end with it.
 */
export type Verdict = "continue" | "stop-before" | "stop-after";

/** A sequence to decode, as an entry point describes it to {@link DecodeEngine.decode}. */
export interface DecodeJob {
  /**
   * The pool slot holding the sequence. Without a prompt, its logits row
   * must hold the logits after its last id (it has been fed before).
   */
  slot: number;
  /** The ids fed so far, oldest first: the repetition penalty's history. */
  history: readonly number[];
  /** Ids to feed before decoding (a prompt); may be empty. */
  prompt: Int32Array;
  /** How to pick. */
  options: Readonly<Required<SamplingOptions>>;
  /** Draws one random number per pick where the temperature is above 0. */
  sampler: Sampler;
  /** Only ids below this are picked. */
  limit: number;
  /** Ids to pick at most. */
  maxTokens: number;
  /** Judges each picked id, in order; a throw ends the sequence with that error. */
  judge(id: number): Verdict;
  /** Receives the ids kept in each round, in order, as they are judged. */
  onIds(ids: number[]): void;
}

/** How a decode ended: the ids kept, and whether a verdict (rather than `maxTokens`) ended it. */
export interface DecodeResult {
  /** The ids kept, in order. */
  ids: number[];
  /** Whether a verdict ended the decode. */
  stopped: boolean;
}

/** Tuning of a {@link DecodeEngine}; the defaults follow the backend. */
export interface EngineOptions {
  /**
   * Steps per decode round: default 1 where the backend runs each operation
   * at once, else {@link FIRST_ROUND_STEPS} for a round that sequences join
   * while at least half of its rows wait for their first ids, and
   * {@link MAX_ROUND_STEPS} for the others.
   */
  roundSteps?: number;
  /** Issue each round before the previous one is read back (default: where the backend queues work). */
  pipelined?: boolean;
  /** Recordings kept before the least recently used is released (default {@link MAX_RECORDINGS}). */
  keptRecordings?: number;
  /** Prompt rows fed per chunk while sequences decode (default: the backend's `chunkTokens`). */
  chunkTokens?: number;
  /**
   * Prompt rows fed per chunk while none decodes (default: the backend's
   * `idleChunkTokens`, within {@link IDLE_CHUNK_BYTES} of activations).
   */
  idleChunkTokens?: number;
}

/**
 * The most steps in one round. A pipelined round must keep the device busy
 * for longer than a read-back takes (Deno's is 10 ms or more) and the host's
 * work between rounds, or the device waits: 32 steps of mamba-130m at one
 * sequence outlast a read-back on an H200 (docs/engine.md). Timing rounds to
 * size them is not reliable (when a read returns says little about when the
 * device finished), and a round shorter than a read-back leaves the device
 * idle for the rest of it, so every round takes this many but a first one
 * (see FIRST_ROUND_STEPS).
 */
const MAX_ROUND_STEPS = 32;
/**
 * Steps of a round that sequences join while at least half of its rows wait
 * for their first ids (the engine was idle, or a burst of requests arrives
 * over several rounds, as an edge server's do), so that those ids come back
 * soon; a lone newcomer among decoding streams joins a full round, which
 * keeps the device busy over the read-back.
 */
const FIRST_ROUND_STEPS = 4;
/**
 * Where the backend queues work, a prompt chunk shorter than this is fed in
 * captured pieces (see {@link DecodeEngine}'s `#feedGroup`): recording a
 * prompt's forward pass launch by launch costs the host more than the
 * device takes for it, and a short prompt's first token waits for it.
 */
const CAPTURED_PROMPT_LIMIT = 128;
/**
 * The longest captured piece: short enough that a backend can record its
 * scan as one chunk (webgpu splits a scan of more than 48 tokens, which it
 * cannot capture), long enough that a prompt takes few pieces.
 */
const CAPTURED_PIECE = 32;
/**
 * Bytes of activations that a chunk fed while no sequence decodes may take
 * (`MambaModel.activationFloatsPerRow`): mamba-130m's 10,240 rows take 412
 * MB, and larger models take fewer rows, down to `chunkTokens`.
 */
const IDLE_CHUNK_BYTES = 512 * 2 ** 20;
/**
 * Recordings kept (a round's steps at one batch size take up to
 * {@link MAX_ROUND_STEPS}); past it the least recently used is released.
 */
const MAX_RECORDINGS = 1024;
/** History ids kept per sequence at least (see {@link DecodeEngine}'s ring). */
const MIN_HISTORY = 64;

/** A sequence inside the engine. */
class Sequence {
  /** The ids fed or to be fed: history, prompt, then the picks kept. */
  readonly tokens: number[];
  /** Ids fed before the first pick: history and prompt. */
  readonly start: number;
  /** The pool slot of the sequence. */
  readonly slot: number;
  /** Prompt ids not fed yet. */
  promptLeft: Int32Array;
  /** Picks issued on the backend so far (the last one is fed by the next round). */
  issued = 0;
  /** Picks judged and kept. */
  readonly kept: number[] = [];
  /** Set once judged to its end (its rows in rounds still in flight are ignored). */
  ended = false;
  /** The sampler's state before the first pick. */
  readonly samplerStart: number[];

  constructor(
    readonly job: DecodeJob,
    readonly settle: (result: DecodeResult | Error) => void,
  ) {
    this.tokens = [...job.history, ...job.prompt];
    this.start = this.tokens.length;
    this.slot = job.slot;
    this.promptLeft = job.prompt;
    this.samplerStart = job.sampler.state();
  }

  /** History ids this sequence needs on the backend: its penalty's window. */
  get historyNeeded(): number {
    const { options } = this.job;
    if (!penalizes(options)) return 0;
    return options.repeatLastN < 0 ? this.start + this.job.maxTokens + 1 : options.repeatLastN;
  }

  /** Ids fed on the backend once every round issued so far has run. */
  get fedOnBackend(): number {
    return this.start + Math.max(0, this.issued - 1);
  }
}

/** Ids to feed to a slot without decoding (a session's prefill or step). */
interface Feed {
  slot: number;
  promptLeft: Int32Array;
  settle: (result: null | Error) => void;
}

/** A buffer that a round's ids are copied into, and the floats it holds. */
interface IdsCopy<Buf> {
  buf: Buf;
  capacity: number;
}

/** A round issued on the backend, until its ids are judged. */
interface Round<Buf = unknown> {
  /** Row b's sequence; rows [0, joiners) make their first pick in this round. */
  rows: Sequence[];
  joiners: number;
  steps: number;
  /** The pool as it stood before the round (rows [0, pool end)), where the engine rewinds. */
  checkpoint: PoolCopy<unknown> | null;
  /** Per row, the ids fed on the backend when the round started. */
  fedAtStart: number[];
  /**
   * A pipelined round's ids, copied out of the engine's ids buffer for their
   * read, which starts after the next round has begun writing that buffer.
   */
  ids: IdsCopy<Buf> | null;
  /** Ids [steps + 1, rows]: row 0 each sequence's id fed first, row t + 1 its pick of step t. */
  read: Promise<Float32Array> | null;
}

/** Engines of the models that have one. */
const engines = new WeakMap<MambaModel<unknown>, DecodeEngine<unknown>>();

/**
 * The engine of `model`, made on first use; `options` (re)make it, which
 * only an idle engine allows (tests use this to force round shapes).
 */
export function engineFor<Buf>(model: MambaModel<Buf>, options?: EngineOptions): DecodeEngine<Buf> {
  const key = model as MambaModel<unknown>;
  let engine = engines.get(key) as DecodeEngine<Buf> | undefined;
  if (engine && options) {
    if (engine.busy) throw new Error("The decode engine is busy: configure it before using it");
    engine.dispose();
    engine = undefined;
  }
  if (!engine) {
    engine = new DecodeEngine(model, options);
    engines.set(key, engine as DecodeEngine<unknown>);
  }
  return engine;
}

/** Runs the decoding and prompt feeding of one model; see the module documentation. */
export class DecodeEngine<Buf> {
  /**
   * Rounds issued so far, and the sequence-steps they held (their ratio is
   * the mean batch); rewinds; prompt pieces replayed from a recording.
   */
  readonly stats = {
    rounds: 0,
    steps: 0,
    rowSteps: 0,
    rewinds: 0,
    replayedPieces: 0,
    /** Prompt chunks fed (see `#feedChunk`). */
    chunks: 0,
  };

  readonly #model: MambaModel<Buf>;
  readonly #be: Backend<Buf>;
  readonly #pipelined: boolean;
  readonly #keptRecordings: number;
  readonly #fixedSteps: number | undefined;
  readonly #checkpoints: boolean;
  readonly #chunkTokens: number;
  readonly #idleChunkTokens: number;

  /** Sequences and feeds whose prompt is being fed, in arrival order. */
  #prompts: (Sequence | Feed)[] = [];
  /** Sequences fed and waiting for their first pick. */
  #joining: Sequence[] = [];
  /** Sequences that have made their first pick and have not ended. */
  #decoding: Sequence[] = [];
  /** The round issued last, until it is judged. */
  #inFlight: Round<Buf> | null = null;
  /** Whether the loop runs (or is about to): it stops once there is no work left. */
  #running = false;
  /** What waits for the loop to stop (see {@link prepare}). */
  #whenIdle: (() => void)[] = [];

  /** Rows the round buffers hold. */
  #rows = 0;
  #scratch: Scratch<Buf> | null = null;
  #logits: Buf | null = null; // [rows, vocab]
  #ids: Buf | null = null; // [MAX_ROUND_STEPS + 1, rows]
  #slots: Buf | null = null; // [rows]
  #settings: Buf | null = null; // [rows, SAMPLING_SETTINGS]
  #randoms: Buf | null = null; // [MAX_ROUND_STEPS + 1, rows]
  #buffersVersion = 0;
  /** Each sequence's recent ids [pool capacity, #historyLength], for the penalty. */
  #history: Buf | null = null;
  #historyRows = 0;
  #historyLength = 0;
  /** Pool copies not in use by a round. */
  #spareCopies: PoolCopy<Buf>[] = [];
  /** Buffers for rounds' ids not in use by a round (see `#copyIds`). */
  #spareIds: IdsCopy<Buf>[] = [];
  readonly #recordings = new Map<string, Recording>();
  /** Buffers of captured prompt pieces: rows [#feedRows], sequences [#feedBatch]. */
  #feedScratch: Scratch<Buf> | null = null;
  #feedTokens: Buf | null = null; // [#feedRows]
  #feedSlots: Buf | null = null; // [#feedBatch]
  #feedLogits: Buf | null = null; // [#feedBatch, vocab]
  #feedRows = 0;
  #feedBatch = 0;
  #feedVersion = 0;
  /** Per "batch:len" of a piece, the rows whose logits it keeps (see `MambaModel.lastRows`). */
  readonly #feedLastRows = new Map<string, Buf | null>();
  /** Piece shapes "batch:len" the backend refused to capture: fed directly. */
  readonly #uncaptured = new Set<string>();

  /** An engine for `model`; use {@link engineFor}, which keeps one per model. */
  constructor(model: MambaModel<Buf>, options: EngineOptions = {}) {
    this.#model = model;
    this.#be = model.backend;
    this.#pipelined = options.pipelined ?? this.#be.queued;
    this.#keptRecordings = checkPositiveInteger(
      "keptRecordings",
      options.keptRecordings ?? MAX_RECORDINGS,
    );
    const steps = options.roundSteps;
    if (
      steps !== undefined && !(Number.isInteger(steps) && steps >= 1 && steps <= MAX_ROUND_STEPS)
    ) {
      throw new RangeError(
        `roundSteps must be an integer from 1 to ${MAX_ROUND_STEPS}, got ${steps}`,
      );
    }
    this.#fixedSteps = steps ?? (this.#pipelined ? undefined : 1);
    // Sequences run ahead of the host's verdicts where rounds are pipelined or take several steps.
    this.#checkpoints = this.#pipelined || (this.#fixedSteps ?? 2) > 1;
    this.#chunkTokens = options.chunkTokens ?? this.#be.chunkTokens;
    const fitting = Math.floor(IDLE_CHUNK_BYTES / (4 * model.activationFloatsPerRow));
    this.#idleChunkTokens = Math.max(
      this.#chunkTokens,
      options.idleChunkTokens ?? Math.min(this.#be.idleChunkTokens, fitting),
    );
  }

  /** Whether any sequence or feed is in the engine. */
  get busy(): boolean {
    return this.#running;
  }

  /**
   * Feeds `ids` to `slot` (in chunks, between decode rounds); resolves once
   * the work is issued, after which the slot's logits row holds the logits
   * after the last id (a read waits for it).
   */
  feed(slot: number, ids: Int32Array): Promise<void> {
    if (ids.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#prompts.push({
        slot,
        promptLeft: ids,
        settle: (result: null | Error) => result instanceof Error ? reject(result) : resolve(),
      });
      this.#start();
    });
  }

  /** Decodes a sequence; resolves when it has ended, with the ids it kept. */
  decode(job: DecodeJob): Promise<DecodeResult> {
    if (job.maxTokens === 0) return Promise.resolve({ ids: [], stopped: false });
    return new Promise((resolve, reject) => {
      const sequence = new Sequence(
        job,
        (result) => result instanceof Error ? reject(result) : resolve(result),
      );
      if (sequence.promptLeft.length > 0) this.#prompts.push(sequence);
      else this.#joining.push(sequence);
      this.#start();
    });
  }

  /**
   * Records now what rounds of 1 to `streams` sequences run (a greedy step at
   * each batch; sampled ones at one, with the default options, without
   * top-k, and with a repetition penalty) and, where the backend queues work, the pieces that
   * short prompts of up to `streams` sequences are fed in. A backend that
   * makes a kernel for each shape on first use (webgpu compiles a pipeline
   * per choice of tiles) then makes them here, not while a server's streams
   * wait on a batch size it has not run before. It waits for the sequences
   * in the engine to end; those submitted meanwhile start once it is done.
   */
  async prepare(streams: number): Promise<void> {
    checkPositiveInteger("streams", streams);
    while (this.#running) await new Promise<void>((resolve) => this.#whenIdle.push(resolve));
    this.#running = true;
    try {
      this.#model.pool.reserve(streams);
      await this.#fitHistory();
      this.#fitBuffers(streams);
      // Sampling's kernels do not depend on the batch: the usual options at one.
      const sampled = { ...SAMPLING_DEFAULTS, limit: this.#model.config.vocabSize };
      for (
        const row of [sampled, { ...sampled, topK: 0 }, { ...sampled, repetitionPenalty: 1.1 }]
      ) {
        this.#recording(1, 0, samplingFeatures([row]));
      }
      const greedy = samplingFeatures([{ ...sampled, temperature: 0 }]);
      // A group of prompts fed together takes at most a chunk's rows.
      const pieceRows = Math.min(streams * CAPTURED_PIECE, this.#idleChunkTokens);
      if (this.#be.queued) this.#fitFeedBuffers(streams, pieceRows);
      for (let batch = 1; batch <= streams; batch++) {
        this.#recording(batch, 0, greedy);
        if (!this.#be.queued) continue;
        for (let piece = 1; piece <= CAPTURED_PIECE && batch * piece <= pieceRows; piece *= 2) {
          this.#feedRecording(batch, piece);
        }
      }
    } finally {
      this.#stopped();
      if (this.#hasWork()) this.#start();
    }
  }

  /** Frees the engine's buffers; it must be idle. */
  dispose(): void {
    this.#releaseBuffers();
    this.#releaseFeedBuffers();
    for (const rows of this.#feedLastRows.values()) if (rows !== null) this.#be.release(rows);
    this.#feedLastRows.clear();
    for (const copy of this.#spareCopies) this.#model.pool.releaseCopy(copy);
    this.#spareCopies = [];
    for (const ids of this.#spareIds) this.#be.release(ids.buf);
    this.#spareIds = [];
    if (this.#history !== null) this.#be.release(this.#history);
    this.#history = null;
    this.#historyRows = this.#historyLength = 0;
  }

  #start(): void {
    if (this.#running) return;
    this.#running = true;
    // From a microtask: what is submitted in the same turn (concurrent
    // generations, stepTogether) goes into the first chunk and round together.
    queueMicrotask(() => this.#run());
  }

  #hasWork(): boolean {
    return this.#prompts.length > 0 || this.#joining.length > 0 || this.#decoding.length > 0 ||
      this.#inFlight !== null;
  }

  async #run(): Promise<void> {
    try {
      while (this.#hasWork()) {
        this.#feedChunk();
        await this.#fitHistory();
        const previous = this.#inFlight;
        // The previous round's read starts once the new round's first step
        // is on its way and its second is issued, unsubmitted: starting a
        // read blocks the thread until the device is idle (Deno's `mapAsync`
        // polls the device before it returns), and the device then waits
        // only for that step's submission, not for the new round's setup or
        // for the host to issue a step.
        const round = this.#issueRound(() => {
          if (previous) this.#startRead(previous, true);
        });
        this.#inFlight = round;
        // While the device runs the new round, the previous one is judged.
        if (previous) {
          await this.#judge(previous, round);
          // Its readers take their ids now, before the next read blocks the thread.
          if (this.#be.queued) await yieldToEventLoop();
        }
        if (round && !this.#pipelined) {
          this.#inFlight = null;
          await this.#judge(round, null);
        }
        if (!this.#be.queued) await yieldToEventLoop();
      }
    } catch (error) {
      this.#failAll(asError(error));
    } finally {
      // Synchronously after the last check for work: a later submission starts a new loop.
      this.#stopped();
    }
  }

  /** Marks the loop (or a {@link prepare}) stopped, and wakes what waits for that. */
  #stopped(): void {
    this.#running = false;
    for (const resolve of this.#whenIdle.splice(0)) resolve();
  }

  /**
   * Feeds one chunk of the waiting prompts: at most `chunkTokens` ids, the
   * earliest prompts first, or `idleChunkTokens` while no sequence decodes
   * (no stream then waits for the chunk, and prompts that arrive together,
   * such as concurrent prefills, share each kernel launch). A batched feed
   * gives every sequence the same number of ids, so prompts of different
   * lengths go in several groups within the chunk (all waiting prompts, then
   * those longer than the shortest, and so on): all in this chunk, rather
   * than one group between two rounds, so that a burst of requests with
   * prompts of many lengths (an edge server's) joins the next round together.
   */
  #feedChunk(): void {
    if (this.#prompts.length === 0) return;
    this.stats.chunks++;
    let budget = this.#decoding.length > 0 ? this.#chunkTokens : this.#idleChunkTokens;
    while (this.#prompts.length > 0 && budget > 0) budget -= this.#feedGroupOf(budget);
  }

  /** Feeds the earliest waiting prompts the same number of ids, at most `budget` in all; returns how many. */
  #feedGroupOf(budget: number): number {
    const group: (Sequence | Feed)[] = [];
    let len = Infinity;
    for (const item of this.#prompts) {
      const next = Math.min(len, item.promptLeft.length, budget);
      if (group.length > 0 && (group.length + 1) * next > budget) break;
      group.push(item);
      len = next;
    }
    const ids = new Int32Array(group.length * len);
    // Logits are only read once a prompt is done: a group that ends none skips the head.
    const ending = group.some((item) => item.promptLeft.length === len);
    group.forEach((item, b) => {
      ids.set(item.promptLeft.subarray(0, len), b * len);
      item.promptLeft = item.promptLeft.subarray(len);
    });
    this.#feedGroup(group.map((item) => item.slot), ids, len, ending);
    for (const item of group) {
      if (item.promptLeft.length > 0) continue;
      this.#prompts.splice(this.#prompts.indexOf(item), 1);
      if (item instanceof Sequence) this.#joining.push(item);
      else item.settle(null);
    }
    return ids.length;
  }

  /**
   * Feeds `len` ids to each sequence of `slots` (ids [slots.length · len]),
   * as `MambaModel.feed` does, with logits where `withLogits`. Where the
   * backend queues work and the chunk is short, it goes in pieces of
   * {@link CAPTURED_PIECE} ids and then powers of two, each replayed from a
   * recording made once per shape (with logits, whatever is asked).
   */
  #feedGroup(slots: readonly number[], ids: Int32Array, len: number, withLogits: boolean): void {
    this.#model.pool.zeroAcquired(); // the new sequences' slots, before the pieces replayed below
    if (!this.#be.queued || len >= CAPTURED_PROMPT_LIMIT) {
      this.#model.feed(slots, ids, len, withLogits);
      return;
    }
    for (let from = 0; from < len;) {
      const left = len - from;
      const piece = left >= CAPTURED_PIECE ? CAPTURED_PIECE : 2 ** Math.floor(Math.log2(left));
      this.#feedPiece(slots, ids, len, from, piece);
      from += piece;
    }
  }

  /** Feeds ids [from, from + piece) of each sequence's `len` in `ids`, replayed where it can be. */
  #feedPiece(
    slots: readonly number[],
    ids: Int32Array,
    len: number,
    from: number,
    piece: number,
  ): void {
    const batch = slots.length;
    const tokens = new Int32Array(batch * piece);
    for (let b = 0; b < batch; b++) {
      tokens.set(ids.subarray(b * len + from, b * len + from + piece), b * piece);
    }
    const recording = this.#feedRecording(batch, piece);
    if (recording === null) {
      this.#model.feed(slots, tokens, piece);
      return;
    }
    const be = this.#be;
    be.write(this.#feedSlots!, Float32Array.from(slots));
    be.write(this.#feedTokens!, Float32Array.from(tokens));
    be.replay(recording);
    be.flush();
    this.stats.replayedPieces++;
  }

  /** The recording of a prompt piece of `batch` sequences × `len` ids, or null where the backend refuses it. */
  #feedRecording(batch: number, len: number): Recording | null {
    const shape = `${batch}:${len}`;
    if (this.#uncaptured.has(shape)) return null;
    this.#fitFeedBuffers(batch, batch * len);
    const key = `feed:${shape}:${this.#model.pool.version}:${this.#feedVersion}`;
    let recording = this.#recalled(key);
    if (recording) return recording;
    if (!this.#feedLastRows.has(shape)) {
      this.#feedLastRows.set(shape, this.#model.lastRows(batch, len));
    }
    const lastRows = this.#feedLastRows.get(shape)!;
    try {
      recording = this.#be.capture(() =>
        this.#model.feedRows(
          this.#feedScratch!,
          batch,
          len,
          this.#feedSlots!,
          this.#feedTokens!,
          lastRows,
          this.#feedLogits!,
        )
      );
    } catch {
      // Some operation cannot be recorded (a capture that throws has run nothing).
      this.#uncaptured.add(shape);
      return null;
    }
    this.#keep(key, recording);
    return recording;
  }

  /** Makes the prompt pieces' buffers hold at least `batch` sequences and `rows` rows. */
  #fitFeedBuffers(batch: number, rows: number): void {
    if (batch <= this.#feedBatch && rows <= this.#feedRows) return;
    this.#releaseFeedBuffers();
    // Recordings of the old buffers must not be replayed.
    this.#clearRecordings();
    const be = this.#be;
    this.#feedRows = Math.max(rows, 2 * this.#feedRows);
    this.#feedBatch = Math.max(batch, 2 * this.#feedBatch);
    this.#feedScratch = this.#model.allocScratch(this.#feedRows);
    this.#feedTokens = be.zeros(this.#feedRows);
    this.#feedSlots = be.zeros(this.#feedBatch);
    this.#feedLogits = be.zeros(this.#feedBatch * this.#model.config.vocabSize);
    this.#feedVersion++;
  }

  #releaseFeedBuffers(): void {
    if (this.#feedScratch) this.#model.releaseScratch(this.#feedScratch);
    for (const buf of [this.#feedTokens, this.#feedSlots, this.#feedLogits]) {
      if (buf !== null) this.#be.release(buf);
    }
    this.#feedScratch =
      this.#feedTokens =
      this.#feedSlots =
      this.#feedLogits =
        null;
    this.#feedRows = this.#feedBatch = 0;
  }

  /**
   * Makes the history ring long enough for every sequence about to join,
   * waiting for the round in flight first when it must be rewritten.
   */
  async #fitHistory(): Promise<void> {
    const pool = this.#model.pool;
    const needed = this.#joining.reduce((most, s) => Math.max(most, s.historyNeeded), MIN_HISTORY);
    let length = this.#historyLength;
    if (needed > length) length = 2 ** Math.ceil(Math.log2(needed));
    if (length === this.#historyLength && pool.capacity <= this.#historyRows) return;
    const be = this.#be;
    const grown = be.zeros(pool.capacity * length);
    if (this.#history !== null && length === this.#historyLength) {
      // More rows, same length: the rows held so far move as they are.
      be.copy({ dst: grown, src: this.#history, length: this.#historyRows * length });
    } else if (this.#decoding.length > 0) {
      // A new length moves every id: write each sequence's anew, once the
      // host knows them all.
      if (this.#inFlight) {
        const round = this.#inFlight;
        this.#inFlight = null;
        await this.#judge(round, null);
      }
    }
    if (this.#history !== null) be.release(this.#history);
    const rewrite = length !== this.#historyLength;
    this.#history = grown;
    this.#historyRows = pool.capacity;
    this.#historyLength = length;
    this.#clearRecordings();
    if (rewrite) this.#writeHistories(this.#decoding);
  }

  /**
   * Writes each sequence's last ids (up to the ring's length) into its row of
   * the ring, one write per run of consecutive slots: a burst of new streams
   * holds consecutive slots, and a write per stream cost the host a call each.
   */
  #writeHistories(seqs: readonly Sequence[]): void {
    const length = this.#historyLength;
    const bySlot = [...seqs].sort((a, b) => a.slot - b.slot);
    for (let start = 0; start < bySlot.length;) {
      let end = start + 1;
      while (end < bySlot.length && bySlot[end].slot === bySlot[end - 1].slot + 1) end++;
      const rows = new Float32Array((end - start) * length);
      for (let i = start; i < end; i++) {
        const { tokens } = bySlot[i];
        const row = rows.subarray((i - start) * length, (i - start + 1) * length);
        for (let p = Math.max(0, tokens.length - length); p < tokens.length; p++) {
          row[p % length] = tokens[p];
        }
      }
      this.#be.write(this.#history!, rows, bySlot[start].slot * length);
      start = end;
    }
  }

  /**
   * Issues the next round over the joining and decoding sequences, or returns
   * null when there are none; calls `started` once the round's first step
   * (or, without steps, its first picks) is submitted.
   */
  #issueRound(started: () => void): Round<Buf> | null {
    const be = this.#be;
    const model = this.#model;
    const pool = model.pool;
    pool.zeroAcquired(); // a sequence that joins with no prompt picks from its slot's zero logits
    const joiners = this.#joining;
    const continuing = this.#decoding.filter((seq) => !seq.ended && seq.issued < seq.job.maxTokens);
    // Without checkpoints a first pick is judged before it is fed: joiners take a round of their own.
    const separateJoins = !this.#checkpoints && joiners.length > 0;
    const rows = separateJoins ? [...joiners] : [...joiners, ...continuing];
    if (rows.length === 0) return null;
    this.#joining = [];
    const joinCount = joiners.length;
    for (const seq of joiners) this.#decoding.push(seq);
    this.#writeHistories(joiners);
    // Steps: none for a round of joins, else as many as the longest remaining sequence needs, at most k.
    const remaining = rows.reduce(
      (most, seq, b) => Math.max(most, seq.job.maxTokens - seq.issued - (b < joinCount ? 1 : 0)),
      -Infinity,
    );
    // Rows still without their first ids: the joiners, and sequences of rounds not judged yet.
    const mostlyFirstIds = joinCount > 0 &&
      2 * rows.filter((seq) => seq.kept.length === 0).length >= rows.length;
    const steps = separateJoins ? 0 : Math.min(this.#roundSteps(mostlyFirstIds), remaining);
    const batch = rows.length;
    this.#fitBuffers(batch);

    const fedAtStart = rows.map((seq) => seq.fedOnBackend);
    const settings = new Float32Array(batch * SAMPLING_SETTINGS);
    const randoms = new Float32Array((steps + 1) * batch);
    rows.forEach((seq, b) => {
      // A step's pick at position fedAtStart + 1 + t; a first pick at fedAtStart (step -1).
      const row = samplingSettings(seq.job.options, fedAtStart[b] + 1, seq.job.limit);
      settings.set(row, b * SAMPLING_SETTINGS);
      if (seq.job.options.temperature > 0) {
        const draws = seq.job.sampler.randoms((b < joinCount ? 1 : 0) + steps);
        let i = 0;
        if (b < joinCount) randoms[b] = keepBelowOne(draws[i++]);
        for (let t = 0; t < steps; t++) randoms[(t + 1) * batch + b] = keepBelowOne(draws[i++]);
      }
      seq.issued += (b < joinCount ? 1 : 0) + steps;
    });
    be.write(this.#slots!, Float32Array.from(rows, (seq) => seq.slot));
    be.write(this.#settings!, settings);
    be.write(this.#randoms!, randoms);
    const features = samplingFeatures(
      rows.map(({ job }) => ({ ...job.options, limit: job.limit })),
    );

    let checkpoint: PoolCopy<Buf> | null = null;
    if (this.#checkpoints) {
      checkpoint = this.#takeCopy();
      pool.save(checkpoint, pool.end);
    }
    const vocab = model.config.vocabSize;
    if (joinCount > 0) {
      // First picks, from the logits the prompts (or earlier calls) left, into the pool's next ids.
      be.copyRows({
        dst: this.#logits!,
        src: pool.logits,
        width: vocab,
        count: joinCount,
        srcRows: { buf: this.#slots!, offset: 0 },
      });
      this.#choose(joinCount, features, -1, 0, 0);
      be.copyRows({
        dst: pool.next,
        src: this.#ids!,
        width: 1,
        count: joinCount,
        dstRows: { buf: this.#slots!, offset: 0 },
      });
    }
    be.copyRows({
      dst: this.#ids!,
      src: pool.next,
      width: 1,
      count: batch,
      srcRows: { buf: this.#slots!, offset: 0 },
    });
    for (let t = 0; t < steps; t++) {
      be.replay(this.#recording(batch, t, features));
      // The read started here returns once the device is idle, with the
      // second step issued but not yet submitted: it then goes at once.
      if (t === 1) started();
      if (flushesAfter(t)) be.flush();
      if (t === 0 && steps === 1) started();
    }
    if (steps > 0) {
      // What the next round feeds first, and the logits it picks from, go back to the pool.
      be.copyRows({
        dst: pool.next,
        src: this.#ids!,
        srcOffset: steps * batch,
        width: 1,
        count: batch,
        dstRows: { buf: this.#slots!, offset: 0 },
      });
      be.copyRows({
        dst: pool.logits,
        src: this.#logits!,
        width: vocab,
        count: batch,
        dstRows: { buf: this.#slots!, offset: 0 },
      });
    }
    // The round's ids are submitted with it: its read submits nothing else.
    const ids = this.#pipelined ? this.#copyIds((steps + 1) * batch) : null;
    be.flush();
    if (steps === 0) started();
    this.stats.rounds++;
    this.stats.steps += steps;
    this.stats.rowSteps += steps * batch;
    return { rows, joiners: joinCount, steps, checkpoint, fedAtStart, ids, read: null };
  }

  /**
   * Copies a pipelined round's `length` ids out of the engine's ids buffer,
   * which the next round writes before this round's read starts.
   */
  #copyIds(length: number): IdsCopy<Buf> {
    const be = this.#be;
    let ids = this.#spareIds.pop();
    if (ids && ids.capacity < length) {
      be.release(ids.buf);
      ids = undefined;
    }
    if (!ids) {
      const capacity = (MAX_ROUND_STEPS + 1) * this.#rows;
      ids = { buf: be.zeros(capacity), capacity };
    }
    be.copy({ dst: ids.buf, src: this.#ids!, length });
    return ids;
  }

  /**
   * Starts reading a round's ids back: with `readSubmitted` where the next
   * round runs meanwhile (`overlapped`), else with `read`, which on a device
   * returns as soon as the device is idle: nothing runs after the round.
   */
  #startRead(round: Round<Buf>, overlapped: boolean): Promise<Float32Array> {
    const length = (round.steps + 1) * round.rows.length;
    const { ids } = round;
    // Nothing unsubmitted writes a round's ids: the next round writes the engine's buffer, not its copy.
    const buf = ids?.buf ?? this.#ids!;
    const read = overlapped
      ? this.#be.readSubmitted(buf, 0, length)
      : this.#be.read(buf, 0, length);
    round.read = read;
    read.catch(() => {}); // Reported where it is awaited.
    if (ids) {
      round.ids = null;
      const giveBack = () => void this.#spareIds.push(ids);
      read.then(giveBack, giveBack);
    }
    return read;
  }

  /** Steps of the next round: short where it serves mostly first ids. */
  #roundSteps(mostlyFirstIds: boolean): number {
    if (this.#fixedSteps !== undefined) return this.#fixedSteps;
    return mostlyFirstIds ? FIRST_ROUND_STEPS : MAX_ROUND_STEPS;
  }

  /** The step `t` of a round of `batch` rows, recorded once and replayed after. */
  #recording(batch: number, t: number, features: SamplingFeatures): Recording {
    const key = [
      batch,
      t,
      features.greedy,
      features.sampled,
      features.penalized,
      features.widestTopK,
      this.#model.pool.version,
      this.#buffersVersion,
    ].join(":");
    let recording = this.#recalled(key);
    if (!recording) {
      recording = this.#be.capture(() => {
        this.#model.step(this.#scratch!, batch, this.#slots!, this.#ids!, t * batch, this.#logits!);
        this.#choose(batch, features, t, (t + 1) * batch, (t + 1) * batch);
      });
      this.#keep(key, recording);
    }
    return recording;
  }

  /** The recording kept under `key`, now the most recently used, or undefined. */
  #recalled(key: string): Recording | undefined {
    const recording = this.#recordings.get(key);
    if (recording) {
      // A Map iterates in insertion order: the least recently used comes first.
      this.#recordings.delete(key);
      this.#recordings.set(key, recording);
    }
    return recording;
  }

  /**
   * Keeps `recording` under `key`, releasing the least recently used one
   * when the engine keeps all it may: a server's batch sizes come and go,
   * and releasing them all made every size in use record its steps again.
   */
  #keep(key: string, recording: Recording): void {
    if (this.#recordings.size >= this.#keptRecordings) {
      const [oldestKey, oldest] = this.#recordings.entries().next().value!;
      this.#be.releaseRecording(oldest);
      this.#recordings.delete(oldestKey);
    }
    this.#recordings.set(key, recording);
  }

  /** Picks for rows [0, rows) from the round's logits, at `step` from each row's position. */
  #choose(
    rows: number,
    features: SamplingFeatures,
    step: number,
    randomOffset: number,
    idsOffset: number,
  ): void {
    this.#be.chooseTokens({
      logits: this.#logits!,
      rows,
      vocab: this.#model.config.vocabSize,
      settings: this.#settings!,
      features,
      randoms: this.#randoms!,
      randomOffset,
      history: this.#history!,
      historyLength: this.#historyLength,
      slots: this.#slots!,
      step,
      ids: this.#ids!,
      idsOffset,
    });
  }

  /**
   * Judges a round's ids: hands each sequence its picks in order, ends
   * those whose verdict or length says so, and rewinds them to the exact
   * id. `later` is the round issued after it, if any (it ran ahead).
   */
  async #judge(round: Round<Buf>, later: Round<Buf> | null): Promise<void> {
    const ids = await (round.read ?? this.#startRead(round, false));
    const batch = round.rows.length;
    /** Replays by length: the slots and their ids, one after the other. */
    const replays = new Map<number, { slots: number[]; ids: number[] }>();
    round.rows.forEach((seq, b) => {
      if (seq.ended) return;
      const picks: number[] = [];
      if (b < round.joiners) picks.push(ids[b]);
      for (let t = 1; t <= round.steps; t++) picks.push(ids[t * batch + b]);
      let ending: { stopped: boolean; before: boolean; error?: Error } | null = null;
      const kept: number[] = [];
      for (const id of picks) {
        if (id < 0) {
          ending = {
            stopped: true,
            before: true,
            error: new RangeError("No token can be picked: every logit is -Infinity or NaN"),
          };
          break;
        }
        let verdict: Verdict;
        try {
          verdict = seq.job.judge(id);
        } catch (error) {
          ending = { stopped: true, before: true, error: asError(error) };
          break;
        }
        if (verdict === "stop-before") {
          ending = { stopped: true, before: true };
          break;
        }
        kept.push(id);
        seq.kept.push(id);
        seq.tokens.push(id);
        if (verdict === "stop-after" || seq.kept.length === seq.job.maxTokens) {
          ending = { stopped: verdict === "stop-after", before: false };
          break;
        }
      }
      if (kept.length > 0 && !ending?.error) {
        try {
          seq.job.onIds(kept);
        } catch (error) {
          ending = { stopped: true, before: false, error: asError(error) };
        }
      }
      if (!ending) return;
      seq.ended = true;
      this.#decoding.splice(this.#decoding.indexOf(seq), 1);
      this.#rewind(seq, round, b, later, replays);
      const { temperature } = seq.job.options;
      if (temperature > 0) {
        // The sampler ends as if it had drawn each pick judged.
        seq.job.sampler.restore(seq.samplerStart);
        seq.job.sampler.randoms(seq.kept.length + (ending.before ? 1 : 0));
      }
      seq.settle(ending.error ?? { ids: seq.kept, stopped: ending.stopped });
    });
    for (const [len, { slots, ids }] of replays) {
      // With logits: a session goes on from the slot's row after its kept ids.
      this.#feedGroup(slots, Int32Array.from(ids), len, true);
    }
    if (round.checkpoint) this.#returnCopy(round.checkpoint as PoolCopy<Buf>);
  }

  /**
   * Brings an ended sequence's slot to the state after its kept ids: from
   * the latest state at or before that point (the backend's own, or a
   * round's checkpoint), replaying the ids between.
   */
  #rewind(
    seq: Sequence,
    round: Round<Buf>,
    row: number,
    later: Round<Buf> | null,
    replays: Map<number, { slots: number[]; ids: number[] }>,
  ): void {
    const target = seq.start + seq.kept.length;
    const onBackend = seq.fedOnBackend;
    let from = onBackend;
    if (target < onBackend) {
      const laterRow = later ? later.rows.indexOf(seq) : -1;
      const pool = this.#model.pool;
      if (laterRow >= 0 && later!.checkpoint && later!.fedAtStart[laterRow] <= target) {
        from = later!.fedAtStart[laterRow];
        pool.restore(later!.checkpoint as PoolCopy<Buf>, seq.slot);
      } else if (round.checkpoint && round.fedAtStart[row] <= target) {
        from = round.fedAtStart[row];
        pool.restore(round.checkpoint as PoolCopy<Buf>, seq.slot);
      } else {
        throw new Error("A sequence ran past its end with no checkpoint to rewind to");
      }
      this.stats.rewinds++;
    }
    if (target > from) {
      const len = target - from;
      let replay = replays.get(len);
      if (!replay) replays.set(len, replay = { slots: [], ids: [] });
      replay.slots.push(seq.slot);
      replay.ids.push(...seq.tokens.slice(from, target));
    }
  }

  /** Ends every sequence and feed with `error` and drops the engine's state. */
  #failAll(error: Error): void {
    const all = [...this.#prompts, ...this.#joining, ...this.#decoding];
    this.#prompts = [];
    this.#joining = [];
    this.#decoding = [];
    if (this.#inFlight?.ids) this.#spareIds.push(this.#inFlight.ids);
    this.#inFlight = null;
    for (const item of all) {
      if (item instanceof Sequence) {
        if (!item.ended) item.settle(error);
        item.ended = true;
      } else {
        item.settle(error);
      }
    }
    this.#clearRecordings();
  }

  /** Makes the round buffers hold at least `batch` rows. */
  #fitBuffers(batch: number): void {
    if (batch <= this.#rows) return;
    this.#releaseBuffers();
    const rows = Math.max(batch, 2 * this.#rows);
    const be = this.#be;
    this.#scratch = this.#model.allocScratch(rows);
    this.#logits = be.zeros(rows * this.#model.config.vocabSize);
    this.#ids = be.zeros((MAX_ROUND_STEPS + 1) * rows);
    this.#slots = be.zeros(rows);
    this.#settings = be.zeros(rows * SAMPLING_SETTINGS);
    this.#randoms = be.zeros((MAX_ROUND_STEPS + 1) * rows);
    this.#rows = rows;
    this.#buffersVersion++;
  }

  #releaseBuffers(): void {
    this.#clearRecordings();
    if (this.#scratch) this.#model.releaseScratch(this.#scratch);
    for (const buf of [this.#logits, this.#ids, this.#slots, this.#settings, this.#randoms]) {
      if (buf !== null) this.#be.release(buf);
    }
    this.#scratch =
      this.#logits =
      this.#ids =
      this.#slots =
      this.#settings =
      this.#randoms =
        null;
    this.#rows = 0;
  }

  #clearRecordings(): void {
    for (const recording of this.#recordings.values()) this.#be.releaseRecording(recording);
    this.#recordings.clear();
  }

  /** A pool copy for a round's checkpoint, as large as the pool. */
  #takeCopy(): PoolCopy<Buf> {
    const pool = this.#model.pool;
    const fits = this.#spareCopies.findIndex((copy) => copy.capacity >= pool.capacity);
    if (fits >= 0) return this.#spareCopies.splice(fits, 1)[0];
    return pool.createCopy();
  }

  #returnCopy(copy: PoolCopy<Buf>): void {
    const pool = this.#model.pool;
    if (copy.capacity >= pool.capacity && this.#spareCopies.length < 2) {
      this.#spareCopies.push(copy);
    } else {
      pool.releaseCopy(copy);
    }
  }
}

/** A random number as f32, kept below 1: a number within 2^-25 of 1 would round up to it. */
function keepBelowOne(u: number): number {
  return Math.min(u, 1 - 2 ** -24);
}

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}
