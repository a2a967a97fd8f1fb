/**
 * The Mamba-1 language model (Gu & Dao, arXiv 2312.00752), written once against
 * the {@link Backend} interface so that every backend runs the same code.
 *
 * Glossary (code name — paper symbol — meaning):
 *
 * | code       | paper | meaning                                                    |
 * |------------|-------|------------------------------------------------------------|
 * | `L`/`len`  | L     | tokens in the current call (1 when decoding a step)        |
 * | `dModel`   | D     | width of the residual stream                               |
 * | `dInner`   | E·D   | SSM channels after the input projection (expand E, often 2)|
 * | `dState`   | N     | state size per channel                                     |
 * | `dtRank`   | R     | rank of the delta projection                               |
 * | `dConv`    | —     | width of the causal depthwise convolution                  |
 * | `delta`    | Δ     | per-token, per-channel step size, softplus(dt_proj(...))   |
 * | `A`        | A     | [dInner, N], negative: `-exp(A_log)`; exp(Δ·A) is the decay |
 * | `B`, `C`   | B, C  | [L, N] input and output projections of the state           |
 * | `D`        | D     | [dInner] skip connection                                   |
 * | `h`        | h     | [dInner, N] SSM state, carried in {@link MambaState}       |
 * | `z`        | —     | [L, dInner] gate, applied as y·silu(z)                     |
 *
 * One block, for the L tokens of a call (all buffers token-major):
 *
 * ```text
 * xn      = rmsNorm(hidden)                       [L, D]
 * x, z    = in_proj(xn)                           [L, dInner] each (one linearSplit, norm included)
 * xc      = silu(causalConv(x) + convBias)        [L, dInner]  (conv state carries dConv-1 inputs;
 *                                                 in a decode step, part of in_proj's linearSplit)
 * dt,B,C  = x_proj(xc)                            [L, R], [L, N], [L, N] (one linearSplit; in a
 *                                                 decode step, part of in_proj's too)
 * delta   = dt_proj(dt)                           [L, dInner]  (in the scan call, as are bias + softplus)
 * h       = exp(Δ·A)·h + Δ·B·xc  per token        [dInner, N]
 * y       = (C·h + D·xc) · silu(z)                [L, dInner]
 * hidden += out_proj(y)                           [L, D]  (linear, accumulating)
 * ```
 *
 * and logits = lm_head(rmsNorm_f(hidden)). Prefill and decode are the same code:
 * a decode step is a call with L = 1 on the carried state.
 *
 * @module
 */

import type { Backend, Recording, TopKSampling } from "./backend.ts";
import type { MambaConfig } from "./config.ts";
import type { LayerWeights, MambaWeights } from "./weights.ts";

/** The recurrent state of one sequence: constant size, whatever its length. */
export interface MambaState<Buf> {
  /** Per layer, the last dConv-1 inputs of the convolution [dConv - 1, dInner]. */
  conv: Buf[];
  /** Per layer, the SSM state h [dInner, N]. */
  ssm: Buf[];
}

/**
 * `Sampler.sample`'s repetition penalty for {@link MambaModel.decodeSampledBatch},
 * applied on the device.
 */
export interface DevicePenalty {
  /** Divides positive logits and multiplies the others; above 0. */
  penalty: number;
  /** History ids it looks back over: 1 to `MAX_DEVICE_PENALTY_WINDOW`. */
  window: number;
  /** Per sequence, its ids before the first one fed (only the last `window` count). */
  histories: readonly (readonly number[])[];
}

/** Histories as Backend.penalize takes them: per sequence, a count, then that many ids. */
function penaltyHistories({ window, histories }: DevicePenalty, batch: number): Float32Array {
  if (histories.length !== batch) {
    throw new RangeError(`${batch} sequences but ${histories.length} histories`);
  }
  const out = new Float32Array(batch * (window + 1));
  histories.forEach((ids, b) => {
    const tail = ids.slice(Math.max(0, ids.length - window));
    out[b * (window + 1)] = tail.length;
    out.set(tail, b * (window + 1) + 1);
  });
  return out;
}

/**
 * One read-back of a {@link MambaModel.streamGreedyBatch} or
 * {@link MambaModel.streamSampledBatch}: per sequence, the ids fed in this
 * chunk, and after the last chunk the logits that follow them.
 */
export interface DecodedChunk {
  /** Per sequence, the ids fed in this chunk. */
  ids: Int32Array[];
  /** Per sequence, the logits after its last id: with the last chunk only. */
  logits: Float32Array[] | null;
}

/** A device decode's chunks put together: per sequence, all its ids and its last logits. */
async function collect(
  chunks: AsyncGenerator<DecodedChunk, void, undefined>,
): Promise<{ ids: Int32Array; logits: Float32Array }[]> {
  const parts: Int32Array[][] = [];
  let logits: Float32Array[] = [];
  for await (const chunk of chunks) {
    chunk.ids.forEach((ids, b) => (parts[b] ??= []).push(ids));
    if (chunk.logits) logits = chunk.logits;
  }
  return logits.map((row, b) => {
    const ids = new Int32Array(parts[b].reduce((sum, part) => sum + part.length, 0));
    let at = 0;
    for (const part of parts[b]) {
      ids.set(part, at);
      at += part.length;
    }
    return { ids, logits: row };
  });
}

/** Which positions {@link MambaModel.run} returns logits for. */
export type LogitsFor = "all" | "last";

/**
 * Prompts longer than this are processed in chunks, bounding scratch memory,
 * unless the backend asks for other chunks (Backend.chunkTokens) and only the
 * last position's logits are wanted.
 */
const MAX_CHUNK = 512;

/** The operations of one block, in the order the model issues them. */
export const BLOCK_OPS = ["in_proj", "conv", "x_proj", "scan", "out_proj"] as const;
/** One of {@link BLOCK_OPS}. */
export type BlockOp = typeof BLOCK_OPS[number];

/** The activations a block reads and writes, token-major, `L` rows each. */
export interface BlockBuffers<Buf> {
  hidden: Buf; // [L, D] residual stream: read by in_proj, added to by out_proj
  x: Buf; // [L, dInner]
  z: Buf; // [L, dInner]
  xc: Buf; // [L, dInner]
  dt: Buf; // [L, R]
  B: Buf; // [L, N]
  C: Buf; // [L, N]
  delta: Buf; // [L, dInner]: scratch of the scan (dt_proj's output where the backend computes it first)
  y: Buf; // [L, dInner]
}

/**
 * The sequences a block runs over: `batch` of `len` tokens each (L = batch ·
 * len rows), carried in conv [batch, dConv - 1, dInner] and ssm [batch,
 * dInner, N].
 */
export interface BlockSequences<Buf> {
  conv: Buf;
  ssm: Buf;
  len: number;
  batch: number;
}

/**
 * Issues operation `op` of a block with weights `w`; see the module
 * documentation for the math. The model runs the block as {@link BLOCK_OPS}
 * in order; the dispatcher times each one alone.
 */
export function blockOp<Buf>(
  be: Backend<Buf>,
  config: MambaConfig,
  op: BlockOp,
  w: LayerWeights<Buf>,
  s: BlockBuffers<Buf>,
  { conv, ssm, len, batch }: BlockSequences<Buf>,
): void {
  const { dModel, dInner, dtRank, dState, dConv, eps } = config;
  const L = len * batch;
  switch (op) {
    case "in_proj": // x, z = in_proj(rmsNorm(hidden)); in a decode step, xc, dt, B and C too
      return be.linearSplit(
        [s.x, s.z],
        [dInner, dInner],
        s.hidden,
        w.inProj,
        w.inProjBias,
        L,
        dModel,
        { weight: w.norm, eps },
        len === 1
          ? {
            out: s.xc,
            weight: w.convWeight,
            bias: w.convBias,
            state: conv,
            kernel: dConv,
            project: { weight: w.xProj, outs: [s.dt, s.B, s.C], widths: [dtRank, dState, dState] },
          }
          : undefined,
      );
    case "conv": // xc = silu(causalConv(x) + convBias), done by in_proj in a decode step
      if (len === 1) return;
      return be.causalConv({
        out: s.xc,
        x: s.x,
        weight: w.convWeight,
        bias: w.convBias,
        state: conv,
        len,
        channels: dInner,
        kernel: dConv,
        batch,
      });
    case "x_proj": // dt, B, C = x_proj(xc), done by in_proj in a decode step
      if (len === 1) return;
      return be.linearSplit(
        [s.dt, s.B, s.C],
        [dtRank, dState, dState],
        s.xc,
        w.xProj,
        null,
        L,
        dInner,
      );
    case "scan": // delta = dt_proj(dt); y = selective scan, gated by silu(z)
      return be.selectiveScan({
        y: s.y,
        u: s.xc,
        delta: s.delta,
        deltaProj: { dt: s.dt, weight: w.dtProj, rank: dtRank },
        A: w.A,
        B: s.B,
        C: s.C,
        D: w.D,
        z: s.z,
        deltaBias: w.dtProjBias,
        deltaSoftplus: true,
        state: ssm,
        len,
        dim: dInner,
        dState,
        batch,
      });
    case "out_proj": // hidden += out_proj(y)
      return be.linear(s.hidden, s.y, w.outProj, w.outProjBias, L, dInner, dModel, true);
  }
}

/** logits [count, vocab] = lm_head(rmsNorm_f(input [count, D])). */
export function projectLogits<Buf>(
  be: Backend<Buf>,
  config: MambaConfig,
  logits: Buf,
  input: Buf,
  weights: Pick<MambaWeights<Buf>, "lmHead" | "normF">,
  count: number,
): void {
  const norm = { weight: weights.normF, eps: config.eps };
  be.linearSplit(
    [logits],
    [config.vocabSize],
    input,
    weights.lmHead,
    null,
    count,
    config.dModel,
    norm,
  );
}

/** Per-call scratch buffers, sized for `len` tokens. */
interface Scratch<Buf> extends BlockBuffers<Buf> {
  len: number;
  headIn: Buf; // [L, D] rows of the residual stream copied out for the head
}

/** A Mamba model whose weights live on one backend. */
export class MambaModel<Buf> {
  /** The backend that holds the weights and runs every operation. */
  readonly backend: Backend<Buf>;
  /** The normalized configuration the weights were checked against. */
  readonly config: MambaConfig;
  readonly #weights: MambaWeights<Buf>;
  /** One-token scratch and logits [vocab] of decode steps, kept from step to step. */
  #step?: { scratch: Scratch<Buf>; logits: Buf };
  /** Each state's decode step, recorded by backends that can (see {@link #decodeStep}). */
  readonly #recordings = new WeakMap<MambaState<Buf>, Recording>();

  /** Uploads host weights to the backend. */
  constructor(backend: Backend<Buf>, config: MambaConfig, weights: MambaWeights<Float32Array>) {
    this.backend = backend;
    this.config = config;
    const { dModel, dInner, dtRank } = config;
    const up = (w: Float32Array) => backend.upload(w);
    const upOrNull = (w: Float32Array | null) => (w ? backend.upload(w) : null);
    // Matrices [rows, cols] that only `linear` reads may be stored as exact f16
    // (webgpu); the row length lets a backend split one that is too large.
    const matrix = (w: Float32Array, cols: number) =>
      backend.uploadHalfMatrix?.(w, cols) ?? backend.upload(w, cols);
    const embedding = backend.upload(weights.embedding, dModel);
    this.#weights = {
      embedding,
      // A tied head shares the embedding's buffer unless an f16 copy is smaller.
      lmHead: weights.lmHead === weights.embedding
        ? backend.uploadHalfMatrix?.(weights.lmHead, dModel) ?? embedding
        : matrix(weights.lmHead, dModel),
      normF: up(weights.normF),
      layers: weights.layers.map((l): LayerWeights<Buf> => ({
        norm: up(l.norm),
        inProj: matrix(l.inProj, dModel),
        inProjBias: upOrNull(l.inProjBias),
        convWeight: up(l.convWeight),
        convBias: upOrNull(l.convBias),
        xProj: matrix(l.xProj, dInner),
        dtProj: matrix(l.dtProj, dtRank),
        dtProjBias: up(l.dtProjBias),
        A: up(l.A),
        D: up(l.D),
        outProj: matrix(l.outProj, dInner),
        outProjBias: upOrNull(l.outProjBias),
      })),
    };
  }

  /**
   * `ids` as the Int32Array {@link run} takes, each checked to be a token id of
   * this model.
   *
   * @throws {RangeError} Naming the first id that is not an integer in [0, vocab).
   */
  tokenIds(ids: readonly number[] | Int32Array): Int32Array {
    const array = Int32Array.from(ids);
    const vocab = this.config.vocabSize;
    for (let i = 0; i < array.length; i++) {
      if (array[i] !== ids[i] || array[i] < 0 || array[i] >= vocab) {
        throw new RangeError(
          `Unknown token id ${ids[i]}: the model's vocabulary has ids 0 to ${vocab - 1}`,
        );
      }
    }
    return array;
  }

  /** A zeroed state: the start of a sequence. */
  newState(): MambaState<Buf> {
    const { nLayer, dConv, dInner, dState } = this.config;
    const conv: Buf[] = [];
    const ssm: Buf[] = [];
    for (let l = 0; l < nLayer; l++) {
      conv.push(this.backend.zeros((dConv - 1) * dInner));
      ssm.push(this.backend.zeros(dInner * dState));
    }
    return { conv, ssm };
  }

  /** Gives a state's buffers back to the backend. */
  releaseState(state: MambaState<Buf>): void {
    const recording = this.#recordings.get(state);
    if (recording) this.backend.releaseRecording?.(recording);
    this.#recordings.delete(state);
    for (const buf of [...state.conv, ...state.ssm]) this.backend.release(buf);
  }

  /**
   * Feeds `ids` through the model, advancing `state`, and returns logits:
   * [ids.length, vocab] for "all", [vocab] of the last token for "last".
   * Token ids must already be checked to lie in [0, vocab).
   */
  async run(state: MambaState<Buf>, ids: Int32Array, logitsFor: LogitsFor): Promise<Float32Array> {
    const { vocabSize } = this.config;
    if (ids.length === 1 && logitsFor === "last") {
      const step = this.#stepBuffers();
      this.backend.embed(step.scratch.hidden, this.#weights.embedding, ids, this.config.dModel);
      this.#decodeStep(state);
      return await this.backend.read(step.logits);
    }
    const logits = new Float32Array((logitsFor === "all" ? ids.length : 1) * vocabSize);
    let scratch: Scratch<Buf> | undefined;
    // Logits of every position are [chunk, vocab]: those chunks stay small.
    const chunkTokens = logitsFor === "all" ? MAX_CHUNK : this.backend.chunkTokens ?? MAX_CHUNK;
    for (let start = 0; start < ids.length; start += chunkTokens) {
      const chunk = ids.subarray(start, Math.min(start + chunkTokens, ids.length));
      if (scratch?.len !== chunk.length) {
        if (scratch) this.#releaseScratch(scratch);
        scratch = this.#allocScratch(chunk.length);
      }
      this.backend.embed(scratch.hidden, this.#weights.embedding, chunk, this.config.dModel);
      this.#blocks(state, scratch, chunk.length);
      const isLast = start + chunk.length === ids.length;
      if (logitsFor === "all") {
        logits.set(await this.#logits(scratch, 0, chunk.length), start * vocabSize);
      } else if (isLast) {
        logits.set(await this.#logits(scratch, chunk.length - 1, 1));
      }
    }
    if (scratch) this.#releaseScratch(scratch);
    return logits;
  }

  /** Whether {@link decodeGreedy} runs on the device (the backend has argmax and embedFrom). */
  get decodesOnDevice(): boolean {
    return this.backend.argmax !== undefined && this.backend.embedFrom !== undefined;
  }

  /**
   * Greedy decoding without a round trip per token, for backends where
   * {@link decodesOnDevice}: feeds `first`, then `count - 1` more ids, each
   * the argmax over ids below `limit` of the logits so far (computed and
   * embedded on the device), advancing `state`. Returns the ids fed and the
   * logits after the last one, read back once.
   */
  async decodeGreedy(
    state: MambaState<Buf>,
    first: number,
    count: number,
    limit: number,
    penalty?: DevicePenalty,
  ): Promise<{ ids: Int32Array; logits: Float32Array }> {
    const [result] = await this.decodeGreedyBatch([state], [first], count, limit, penalty);
    return result;
  }

  /**
   * {@link decodeGreedy} for several sequences at once, one token of each per
   * step: the projections read each weight once for all of them, and conv and
   * scan run batched on a gathered copy of their states. Returns each
   * sequence's ids fed and last logits. With `penalty`, the argmax is over
   * logits with `Sampler.sample`'s repetition penalty (the backend needs
   * penalize).
   */
  decodeGreedyBatch(
    states: readonly MambaState<Buf>[],
    firsts: readonly number[],
    count: number,
    limit: number,
    penalty?: DevicePenalty,
  ): Promise<{ ids: Int32Array; logits: Float32Array }[]> {
    return collect(this.streamGreedyBatch(states, firsts, [count], limit, penalty));
  }

  /**
   * {@link decodeGreedyBatch} read back in chunks of `chunks[k]` ids per
   * sequence (count = their sum), each yielded as it arrives. The device
   * does not wait for the host: chunk k + 1 is issued before chunk k's
   * read-back is awaited, so the GPU keeps working through Deno's wait for a
   * read-back (at least 10 ms each). A consumer that stops early leaves the
   * states advanced past the ids it has seen, by up to two chunks.
   */
  async *streamGreedyBatch(
    states: readonly MambaState<Buf>[],
    firsts: readonly number[],
    chunks: readonly number[],
    limit: number,
    penalty?: DevicePenalty,
  ): AsyncGenerator<DecodedChunk, void, undefined> {
    const be = this.backend;
    const { argmax } = be;
    if (!argmax) throw new Error(`The ${be.name} backend cannot decode on the device`);
    const { vocabSize } = this.config;
    const batch = states.length;
    yield* this.#decodeChunks(
      states,
      firsts,
      chunks,
      (ids, index, logits) => argmax.call(be, ids, index, logits, limit, batch, vocabSize),
      penalty,
    );
  }

  /** Whether {@link decodeSampledBatch} runs (the backend has sampleTopK and penalize). */
  get samplesOnDevice(): boolean {
    return this.decodesOnDevice && this.backend.sampleTopK !== undefined &&
      this.backend.penalize !== undefined;
  }

  /**
   * {@link decodeGreedyBatch}, but each id after the first is drawn as
   * `Sampler.sample` would draw it with `sampling` (top-k on) and `penalty`
   * (none when left out), over ids below `limit`: the id after step t of
   * sequence b takes the random number uniforms[t · batch + b] (see
   * `Sampler.randoms`).
   */
  decodeSampledBatch(
    states: readonly MambaState<Buf>[],
    firsts: readonly number[],
    count: number,
    limit: number,
    sampling: TopKSampling,
    uniforms: Float32Array,
    penalty?: DevicePenalty,
  ): Promise<{ ids: Int32Array; logits: Float32Array }[]> {
    return collect(
      this.streamSampledBatch(states, firsts, [count], limit, sampling, uniforms, penalty),
    );
  }

  /** {@link decodeSampledBatch} read back in chunks, like {@link streamGreedyBatch}. */
  async *streamSampledBatch(
    states: readonly MambaState<Buf>[],
    firsts: readonly number[],
    chunks: readonly number[],
    limit: number,
    sampling: TopKSampling,
    uniforms: Float32Array,
    penalty?: DevicePenalty,
  ): AsyncGenerator<DecodedChunk, void, undefined> {
    const be = this.backend;
    const { sampleTopK } = be;
    if (!sampleTopK) throw new Error(`The ${be.name} backend cannot sample on the device`);
    const batch = states.length;
    const count = chunks.reduce((sum, size) => sum + size, 0);
    const needed = Math.max(0, count - 1) * batch;
    if (uniforms.length < needed) {
      throw new RangeError(`${needed} random numbers needed, got ${uniforms.length}`);
    }
    const { vocabSize } = this.config;
    const randoms = be.upload(needed > 0 ? uniforms.slice(0, needed) : new Float32Array(1));
    const choose = (ids: Buf, index: number, logits: Buf, t: number) =>
      sampleTopK.call(
        be,
        ids,
        index,
        logits,
        limit,
        sampling,
        randoms,
        t * batch,
        batch,
        vocabSize,
      );
    try {
      yield* this.#decodeChunks(states, firsts, chunks, choose, penalty);
    } finally {
      be.release(randoms);
    }
  }

  /**
   * Decoding without a round trip per token: feeds `firsts`, then `count - 1`
   * more ids per sequence (count = the sum of `chunks`), each chosen on the
   * device by `pick` (after step t, into ids at `index` from the batch's
   * logits), with `penalty` applied to the logits first. Each chunk's ids are
   * read back, and yielded, once the next chunk has been issued.
   */
  async *#decodeChunks(
    states: readonly MambaState<Buf>[],
    firsts: readonly number[],
    chunks: readonly number[],
    pick: (ids: Buf, index: number, logits: Buf, t: number) => void,
    penalty?: DevicePenalty,
  ): AsyncGenerator<DecodedChunk, void, undefined> {
    const be = this.backend;
    const { embedFrom, penalize } = be;
    if (!embedFrom) throw new Error(`The ${be.name} backend cannot decode on the device`);
    if (penalty && !penalize) {
      throw new Error(`The ${be.name} backend cannot apply a repetition penalty on the device`);
    }
    if (states.length !== firsts.length) {
      throw new RangeError(`${states.length} states but ${firsts.length} first ids`);
    }
    if (new Set(states).size !== states.length) {
      throw new RangeError("A state can take only one step at a time");
    }
    if (chunks.length === 0 || chunks.some((size) => !Number.isInteger(size) || size < 1)) {
      throw new RangeError(`Chunks must be positive integers, got [${chunks.join(", ")}]`);
    }
    const count = chunks.reduce((sum, size) => sum + size, 0);
    const { dModel, vocabSize } = this.config;
    const batch = states.length;
    // What comes back: the last logits [batch, vocab], then the ids [count, batch].
    const idsAt = batch * vocabSize;
    const result = be.zeros(idsAt + count * batch);
    be.write(result, Float32Array.from(firsts), idsAt);
    // One sequence steps its own state, its step recorded once (#decodeStep);
    // several step a gathered batch state, recorded for this call.
    const single = batch === 1;
    const state = single ? states[0] : this.#gather(states);
    const { scratch, logits } = single ? this.#stepBuffers() : {
      scratch: this.#allocScratch(batch),
      logits: be.zeros(batch * vocabSize),
    };
    const ops = () => {
      this.#blocks(state, scratch, 1, batch);
      this.#head(logits, scratch, 0, batch);
    };
    const recording = single || count < 2 ? undefined : be.capture?.(ops);
    const history = penalty && be.upload(penaltyHistories(penalty, batch));
    // The ids fed so far, t + 1 per sequence, count in the penalty's window.
    const penalizeAfter = penalty && penalize && history
      ? (t: number) =>
        penalize.call(
          be,
          logits,
          batch,
          vocabSize,
          penalty.penalty,
          penalty.window,
          history,
          result,
          idsAt,
          t + 1,
        )
      : undefined;
    const step = single
      ? () => this.#decodeStep(state)
      : recording
      ? () => be.replay!(recording)
      : ops;
    let scattered = single;
    // The read-back of the chunk issued last: ids [first, first + size) of each sequence.
    let inFlight: { read: Promise<Float32Array>; first: number; size: number } | null = null;
    const chunkOf = (
      host: Float32Array,
      offset: number,
      size: number,
      last: boolean,
    ): DecodedChunk => {
      const ids = states.map((_, b) =>
        Int32Array.from({ length: size }, (_, t) => host[offset + t * batch + b])
      );
      if (ids.some((row) => row.some((id) => id < 0))) {
        throw new RangeError("No candidate token: every logit is -Infinity or NaN");
      }
      const rows = last
        ? states.map((_, b) => host.slice(b * vocabSize, (b + 1) * vocabSize))
        : null;
      return { ids, logits: rows };
    };
    try {
      let t = 0;
      for (const [k, size] of chunks.entries()) {
        const first = t;
        for (; t < first + size; t++) {
          embedFrom.call(
            be,
            scratch.hidden,
            this.#weights.embedding,
            result,
            idsAt + t * batch,
            dModel,
            batch,
          );
          step();
          if (t + 1 < count) {
            penalizeAfter?.(t);
            pick(result, idsAt + (t + 1) * batch, logits, t);
          }
          be.flush?.();
        }
        const last = k === chunks.length - 1;
        if (last) {
          if (!single) this.#scatter(state, states);
          scattered = true;
          be.copy(result, 0, logits, 0, batch * vocabSize);
        }
        // Started now, awaited after the next chunk is issued.
        const read = last ? be.read(result) : be.read(result, idsAt + first * batch, size * batch);
        read.catch(() => {}); // Reported where it is awaited.
        if (inFlight) {
          const before = inFlight;
          inFlight = null;
          yield chunkOf(await before.read, 0, before.size, false);
        }
        inFlight = { read, first, size };
      }
      const { read, first, size } = inFlight!;
      inFlight = null;
      yield chunkOf(await read, idsAt + first * batch, size, true);
    } finally {
      // A consumer that stopped early leaves a read-back in flight and, for a
      // batch, the states still to be copied back.
      if (inFlight) await inFlight.read.catch(() => {});
      if (!scattered) this.#scatter(state, states);
      be.release(result);
      if (history) be.release(history);
      if (!single) {
        if (recording) be.releaseRecording?.(recording);
        this.#releaseScratch(scratch);
        be.release(logits);
        this.releaseState(state);
      }
    }
  }

  #stepBuffers(): { scratch: Scratch<Buf>; logits: Buf } {
    return this.#step ??= {
      scratch: this.#allocScratch(1),
      logits: this.backend.zeros(this.config.vocabSize),
    };
  }

  /**
   * One decode step of `state`: from the token's embedding in the step
   * scratch's `hidden` to logits in the step's logits buffer. A backend that
   * can record work (webgpu) records the step's kernels once per state and
   * replays them afterwards, which spares the host most of the cost of issuing
   * them; the operations are the same either way.
   */
  #decodeStep(state: MambaState<Buf>): void {
    const { scratch, logits } = this.#stepBuffers();
    const ops = () => {
      this.#blocks(state, scratch, 1);
      this.#head(logits, scratch, 0, 1);
    };
    const be = this.backend;
    if (!be.capture || !be.replay) return ops();
    let recording = this.#recordings.get(state);
    if (!recording) this.#recordings.set(state, recording = be.capture(ops));
    be.replay(recording);
  }

  /**
   * Runs every block over the rows of `s`, whose embeddings are in
   * `s.hidden`: `batch` sequences of `len` tokens, one after the other, each
   * carried in its part of `state` (a batch state from {@link #gather} when
   * batch > 1). Leaves the residual stream in `s.hidden`.
   */
  #blocks(state: MambaState<Buf>, s: Scratch<Buf>, len: number, batch = 1): void {
    this.#weights.layers.forEach((w, layer) => {
      const sequences = { conv: state.conv[layer], ssm: state.ssm[layer], len, batch };
      for (const op of BLOCK_OPS) blockOp(this.backend, this.config, op, w, s, sequences);
      // A prompt's layers go to the device one by one, so that it runs each
      // layer while the host records the next, rather than all once every
      // layer is recorded. (Decode steps, which are recorded for replay, are
      // started by their callers.)
      if (len > 1) this.backend.flush?.();
    });
  }

  /**
   * A batch state: per layer, the conv states of `states` one after the other
   * [batch, dConv - 1, dInner] and their SSM states [batch, dInner, N],
   * copied in; {@link #scatter} copies them back.
   */
  #gather(states: readonly MambaState<Buf>[]): MambaState<Buf> {
    const { dConv, dInner, dState } = this.config;
    const be = this.backend;
    const join = (parts: Buf[], length: number) => {
      const joined = be.zeros(parts.length * length);
      parts.forEach((part, b) => be.copy(joined, b * length, part, 0, length));
      return joined;
    };
    return {
      conv: states[0].conv.map((_, l) => join(states.map((s) => s.conv[l]), (dConv - 1) * dInner)),
      ssm: states[0].ssm.map((_, l) => join(states.map((s) => s.ssm[l]), dInner * dState)),
    };
  }

  /** Copies each sequence's part of a batch state back into `states`. */
  #scatter(batchState: MambaState<Buf>, states: readonly MambaState<Buf>[]): void {
    const { dConv, dInner, dState } = this.config;
    const be = this.backend;
    states.forEach((state, b) => {
      state.conv.forEach((conv, l) => {
        const length = (dConv - 1) * dInner;
        be.copy(conv, 0, batchState.conv[l], b * length, length);
      });
      state.ssm.forEach((ssm, l) => {
        const length = dInner * dState;
        be.copy(ssm, 0, batchState.ssm[l], b * length, length);
      });
    });
  }

  /**
   * One decode step for several sequences at once: row b of `ids` is fed to
   * `states[b]`. Every operation runs once for the batch (conv and scan on a
   * gathered copy of the states), so each weight is read once for all rows.
   * Returns logits [states.length, vocab]. Ids must already be checked.
   */
  async stepBatch(states: readonly MambaState<Buf>[], ids: Int32Array): Promise<Float32Array> {
    if (states.length !== ids.length) {
      throw new RangeError(`${states.length} states but ${ids.length} ids`);
    }
    if (states.length === 1) return this.run(states[0], ids, "last");
    const s = this.#allocScratch(ids.length);
    const batchState = this.#gather(states);
    try {
      this.backend.embed(s.hidden, this.#weights.embedding, ids, this.config.dModel);
      this.#blocks(batchState, s, 1, states.length);
      this.#scatter(batchState, states);
      return await this.#logits(s, 0, ids.length);
    } finally {
      this.#releaseScratch(s);
      this.releaseState(batchState);
    }
  }

  /** Final norm and lm_head over `count` rows of the residual stream from `first`. */
  async #logits(s: Scratch<Buf>, first: number, count: number): Promise<Float32Array> {
    const logits = this.backend.zeros(count * this.config.vocabSize);
    try {
      this.#head(logits, s, first, count);
      return await this.backend.read(logits);
    } finally {
      this.backend.release(logits);
    }
  }

  /**
   * logits [count, vocab] = lm_head(rmsNorm_f(rows [first, first + count) of
   * the residual stream)); the norm is part of the projection (linearSplit's
   * `norm`), whose input must start at row 0, so later rows are copied out.
   */
  #head(logits: Buf, s: Scratch<Buf>, first: number, count: number): void {
    const { dModel } = this.config;
    const be = this.backend;
    const input = first === 0 ? s.hidden : s.headIn;
    if (first !== 0) be.copy(s.headIn, 0, s.hidden, first * dModel, count * dModel);
    projectLogits(be, this.config, logits, input, this.#weights, count);
  }

  #allocScratch(len: number): Scratch<Buf> {
    const { dModel, dInner, dState, dtRank } = this.config;
    const z = (n: number) => this.backend.zeros(n);
    return {
      len,
      hidden: z(len * dModel),
      headIn: z(len * dModel),
      x: z(len * dInner),
      z: z(len * dInner),
      xc: z(len * dInner),
      dt: z(len * dtRank),
      B: z(len * dState),
      C: z(len * dState),
      delta: z(len * dInner),
      y: z(len * dInner),
    };
  }

  #releaseScratch(s: Scratch<Buf>): void {
    for (const [key, buf] of Object.entries(s)) {
      if (key !== "len") this.backend.release(buf as Buf);
    }
  }
}
