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
 * x, z    = in_proj(xn)                           [L, dInner] each (one linearSplit)
 * xc      = silu(causalConv(x) + convBias)        [L, dInner]  (conv state carries dConv-1 inputs)
 * dt,B,C  = x_proj(xc)                            [L, R], [L, N], [L, N] (one linearSplit)
 * delta   = dt_proj(dt)                           [L, dInner]  (its bias and softplus: in the scan call)
 * h       = exp(Δ·A)·h + Δ·B·xc  per token        [dInner, N]
 * y       = (C·h + D·xc) · silu(z)                [L, dInner]
 * hidden += out_proj(y)                           [L, D]  (linear, accumulating)
 * ```
 *
 * and logits = lm_head(rmsNorm_f(hidden)). Prefill and decode are the same code:
 * a decode step is a call with L = 1 on the carried state.
 *
 * Mamba-2's block is in `mamba2.ts`; the model runs it where the config says
 * so, with the same embedding, final norm, head, state pool and engine.
 *
 * Falcon-Mamba (`model_type` "falcon_mamba") is this block with dt, B and C
 * each RMS-normalised without a weight right after x_proj (epsilon
 * `mixer_rms_eps`), as transformers' `FalconMambaMixer` does; x_proj then
 * runs as an operation of its own in decode steps too.
 *
 * @module
 */

import { type Backend, flushesAfter } from "./backend.ts";
import type { MambaConfig } from "./config.ts";
import {
  allocMamba2Buffers,
  checkMamba2Support,
  isMamba2Layer,
  MAMBA2_OPS,
  mamba2BlockOp,
  type Mamba2Buffers,
  type Mamba2LayerWeights,
  mamba2RowWidths,
} from "./mamba2.ts";
import { StatePool } from "./pool.ts";
import type { HostWeights, LayerWeights, MambaWeights } from "./weights.ts";
import {
  dequantizeMatrix,
  type HostMatrix,
  isHalf,
  isQuantized,
  widenHalfMatrix,
} from "./quant.ts";
import { crc32, crc32Floats } from "./checksum.ts";

/**
 * Tokens per chunk of {@link MambaModel.forward}, whose logits of every
 * position ([chunk, vocab]) bound its scratch memory.
 */
const FORWARD_CHUNK = 512;

/** The operations of one block, in the order the model issues them. */
export const BLOCK_OPS = [
  "norm",
  "in_proj",
  "conv",
  "x_proj",
  "dt_proj",
  "scan",
  "out_proj",
] as const;
/** One of {@link BLOCK_OPS}. */
export type BlockOp = typeof BLOCK_OPS[number];

/** The activations a block reads and writes, token-major, `L` rows each. */
export interface BlockBuffers<Buf> {
  /** [L, D] residual stream: read by the norm, added to by out_proj. */
  hidden: Buf;
  /** [L, D] the normalised residual stream: in_proj's input (and the head's). */
  normed: Buf;
  /** [L, dInner] in_proj's first half: the convolution's input. */
  x: Buf;
  /** [L, dInner] in_proj's second half: the gate. */
  z: Buf;
  /** [L, dInner] the convolution's output: the scan's u. */
  xc: Buf;
  /** [L, R] x_proj's low-rank delta. */
  dt: Buf;
  /** [L, N] x_proj's B. */
  B: Buf;
  /** [L, N] x_proj's C. */
  C: Buf;
  /** [L, dInner] dt_proj's output: the scan's raw delta. */
  delta: Buf;
  /** [L, dInner] the scan's output, out_proj's input. */
  y: Buf;
  /**
   * Falcon-Mamba only ({@link MambaConfig.mixerRmsEps}): x_proj's dt [L, R],
   * B and C [L, N] before their weightless RMSNorms, and ones [max(R, N)] as
   * those norms' weight.
   */
  mixerNorm?: { dt: Buf; B: Buf; C: Buf; ones: Buf };
}

/**
 * The sequences a block runs over: `batch` of `len` tokens each (L = batch ·
 * len rows), carried in conv [rows, dConv - 1, dInner] and ssm [rows,
 * dInner, N]: sequence b in row `slots[b]` (a pool's layer buffers), or in
 * row b without slots.
 */
export interface BlockSequences<Buf> {
  conv: Buf;
  ssm: Buf;
  slots?: Buf;
  len: number;
  batch: number;
}

/**
 * Issues operation `op` of a block with weights `w`; see the module
 * documentation for the math. The model runs the block as {@link BLOCK_OPS}
 * in order.
 */
export function blockOp<Buf>(
  be: Backend<Buf>,
  config: MambaConfig,
  op: BlockOp,
  w: LayerWeights<Buf>,
  s: BlockBuffers<Buf>,
  { conv, ssm, slots, len, batch }: BlockSequences<Buf>,
): void {
  const { dModel, dInner, dtRank, dState, dConv, eps, mixerRmsEps } = config;
  const L = len * batch;
  switch (op) {
    case "norm": // xn = rmsNorm(hidden)
      return be.rmsNorm({ out: s.normed, x: s.hidden, weight: w.norm, rows: L, dim: dModel, eps });
    case "in_proj": // x, z = in_proj(xn)
      return be.linearSplit({
        outs: [s.x, s.z],
        widths: [dInner, dInner],
        x: s.normed,
        weight: w.inProj,
        bias: w.inProjBias,
        rows: L,
        inDim: dModel,
      });
    case "conv": // xc = silu(causalConv(x) + convBias)
      return be.causalConv({
        out: s.xc,
        x: s.x,
        weight: w.convWeight,
        bias: w.convBias,
        state: conv,
        slots,
        len,
        channels: dInner,
        kernel: dConv,
        batch,
      });
    case "x_proj": { // dt, B, C = x_proj(xc)
      // Falcon-Mamba: dt, B, C = rmsNorm(x_proj(xc)) each, without weights.
      const split = mixerRmsEps === undefined ? s : s.mixerNorm!;
      be.linearSplit({
        outs: [split.dt, split.B, split.C],
        widths: [dtRank, dState, dState],
        x: s.xc,
        weight: w.xProj,
        rows: L,
        inDim: dInner,
      });
      if (mixerRmsEps === undefined) return;
      const norm = { weight: s.mixerNorm!.ones, rows: L, eps: mixerRmsEps };
      be.rmsNorm({ ...norm, out: s.dt, x: split.dt, dim: dtRank });
      be.rmsNorm({ ...norm, out: s.B, x: split.B, dim: dState });
      be.rmsNorm({ ...norm, out: s.C, x: split.C, dim: dState });
      return;
    }
    case "dt_proj": // delta = dt_proj(dt), before its bias and softplus (the scan's)
      return be.linear({
        out: s.delta,
        x: s.dt,
        weight: w.dtProj,
        rows: L,
        inDim: dtRank,
        outDim: dInner,
      });
    case "scan": // y = selective scan over delta, gated by silu(z)
      return be.selectiveScan({
        y: s.y,
        u: s.xc,
        delta: s.delta,
        A: w.A,
        B: s.B,
        C: s.C,
        D: w.D,
        z: s.z,
        deltaBias: w.dtProjBias,
        deltaSoftplus: true,
        state: ssm,
        slots,
        len,
        dim: dInner,
        dState,
        batch,
      });
    case "out_proj": // hidden += out_proj(y)
      return be.linear({
        out: s.hidden,
        x: s.y,
        weight: w.outProj,
        bias: w.outProjBias,
        rows: L,
        inDim: dInner,
        outDim: dModel,
        accumulate: true,
      });
  }
}

/** logits [count, vocab] = lm_head(rmsNorm_f(input [count, D])), the norm's output in `normed`. */
export function projectLogits<Buf>(
  be: Backend<Buf>,
  config: MambaConfig,
  logits: Buf,
  input: Buf,
  normed: Buf,
  weights: Pick<MambaWeights<Buf>, "lmHead" | "normF">,
  count: number,
): void {
  const { dModel, vocabSize, eps } = config;
  be.rmsNorm({ out: normed, x: input, weight: weights.normF, rows: count, dim: dModel, eps });
  be.linear({
    out: logits,
    x: normed,
    weight: weights.lmHead,
    rows: count,
    inDim: dModel,
    outDim: vocabSize,
  });
}

/** Activations of up to `rows` rows: a block's buffers and the head's input. */
export interface Scratch<Buf> extends BlockBuffers<Buf> {
  /** Rows the buffers hold. */
  rows: number;
  /** [rows, D]: rows of the residual stream gathered for the head. */
  headIn: Buf;
  /** A Mamba-2 model's block buffers (its Mamba-1 ones then hold nothing). */
  mamba2?: Omit<Mamba2Buffers<Buf>, "hidden" | "normed">;
}

/**
 * A Mamba model whose weights live on one backend, with the states of its
 * sequences in a {@link StatePool}: every call names the slots it runs on.
 */
export class MambaModel<Buf> {
  /** The backend that holds the weights and runs every operation. */
  readonly backend: Backend<Buf>;
  /** The normalized configuration the weights were checked against. */
  readonly config: MambaConfig;
  /** The recurrent state of each sequence, a slot each. */
  readonly pool: StatePool<Buf>;
  readonly #weights: MambaWeights<Buf>;
  /**
   * A CRC-32 of the config and the model's small vectors (final norm, and
   * each layer's norm, D and delta bias): snapshots carry it, so that one is
   * not resumed on another model of the same sizes.
   */
  readonly identity: number;

  /**
   * Uploads host weights to the backend; matrices kept as quantized blocks
   * stay so where the backend keeps that form, else go up dequantized.
   */
  constructor(backend: Backend<Buf>, config: MambaConfig, weights: HostWeights) {
    this.backend = backend;
    this.config = config;
    const { dModel, dInner, dtRank } = config;
    if (config.mamba2) checkMamba2Support(backend);
    if (weights.layers.some((l) => isMamba2Layer(l) !== (config.mamba2 !== undefined))) {
      throw new TypeError(
        `The weights' blocks are not the ${
          config.mamba2 ? "Mamba-2" : "Mamba-1"
        } blocks the config describes`,
      );
    }
    const up = (w: Float32Array) => backend.upload(w);
    const upOrNull = (w: Float32Array | null) => (w ? backend.upload(w) : null);
    // A matrix [rows, cols] that only `linear` reads, or the embedding, which `embed` and
    // `copyRows` gather by rows: kept as the file stores it (blocks, 16-bit) where the backend
    // keeps that form, else its float32 values. The row length lets a backend split a matrix
    // that is too large.
    const matrix = (w: HostMatrix, cols: number) => {
      if (isQuantized(w)) {
        return backend.uploadQuantizedMatrix(w) ?? backend.upload(dequantizeMatrix(w), cols);
      }
      if (isHalf(w)) return backend.uploadHalfMatrix(w) ?? backend.upload(widenHalfMatrix(w), cols);
      return backend.upload(w, cols);
    };
    let identity = crc32(new TextEncoder().encode(JSON.stringify(config)));
    identity = crc32Floats(weights.normF, identity);
    for (const layer of weights.layers) {
      const dtBias = isMamba2Layer<Float32Array, HostMatrix>(layer)
        ? layer.dtBias
        : layer.dtProjBias;
      for (const values of [layer.norm, layer.D, dtBias]) {
        identity = crc32Floats(values, identity);
      }
    }
    this.identity = identity;
    const embedding = matrix(weights.embedding, dModel);
    this.#weights = {
      embedding,
      lmHead: weights.lmHead === weights.embedding ? embedding : matrix(weights.lmHead, dModel),
      normF: up(weights.normF),
      layers: weights.layers.map((l): LayerWeights<Buf> | Mamba2LayerWeights<Buf> =>
        isMamba2Layer<Float32Array, HostMatrix>(l)
          ? {
            norm: up(l.norm),
            inProj: matrix(l.inProj, dModel),
            inProjBias: upOrNull(l.inProjBias),
            convWeight: up(l.convWeight),
            convBias: upOrNull(l.convBias),
            dtBias: up(l.dtBias),
            A: up(l.A),
            D: up(l.D),
            gatedNorm: up(l.gatedNorm),
            outProj: matrix(l.outProj, dInner),
            outProjBias: upOrNull(l.outProjBias),
          }
          : {
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
          }
      ),
    };
    this.pool = new StatePool(backend, config);
  }

  /**
   * `ids` as the Int32Array {@link feed} takes, each checked to be a token id
   * of this model.
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

  /**
   * Feeds `len` ids to each sequence of `slots` (ids [slots.length · len],
   * sequence b's from b · len), advancing their states in the pool; with
   * `withLogits`, each slot's logits row then holds the logits after its last
   * id (a prompt's chunks but its last need none: the head is a GEMV over
   * the whole vocabulary). Issues the work without waiting for it. Ids must
   * already be checked.
   */
  feed(slots: readonly number[], ids: Int32Array, len: number, withLogits = true): void {
    const be = this.backend;
    const batch = slots.length;
    if (batch === 0 || len === 0) return;
    if (ids.length !== batch * len) {
      throw new RangeError(
        `${batch} sequences of ${len} ids need ${batch * len} ids, got ${ids.length}`,
      );
    }
    this.pool.zeroAcquired();
    const s = this.allocScratch(batch * len);
    const slotRows = be.upload(Float32Array.from(slots));
    const tokens = be.upload(Float32Array.from(ids));
    const lastRows = withLogits ? this.lastRows(batch, len) : null;
    const logits = withLogits ? be.zeros(batch * this.config.vocabSize) : null;
    try {
      this.feedRows(s, batch, len, slotRows, tokens, lastRows, logits);
      be.flush();
    } finally {
      this.releaseScratch(s);
      for (const buf of [slotRows, tokens, logits, lastRows]) {
        if (buf) be.release(buf);
      }
    }
  }

  /**
   * The rows {@link feedRows} keeps logits of when `batch` sequences are fed
   * `len` ids each: each sequence's last, b · len + len − 1; null for one id
   * each, where every row is kept.
   */
  lastRows(batch: number, len: number): Buf | null {
    if (len === 1) return null;
    return this.backend.upload(Float32Array.from({ length: batch }, (_, b) => b * len + len - 1));
  }

  /**
   * The work of {@link feed} on buffers: `batch` sequences on the slots
   * `slots[b]` are fed `len` ids each, `tokens[b · len + t]`; `lastRows` is
   * {@link lastRows}'s buffer, and `logits` [batch, vocab] is scratch (null:
   * no logits, the head skipped). Records nothing on the host and allocates nothing, so that a backend
   * can capture it.
   */
  feedRows(
    s: Scratch<Buf>,
    batch: number,
    len: number,
    slots: Buf,
    tokens: Buf,
    lastRows: Buf | null,
    logits: Buf | null,
  ): void {
    const be = this.backend;
    const { dModel, vocabSize } = this.config;
    be.copyRows({
      dst: s.hidden,
      src: this.#weights.embedding,
      width: dModel,
      count: batch * len,
      srcRows: { buf: tokens, offset: 0 },
    });
    this.blocks(s, slots, len, batch);
    if (!logits) return;
    if (lastRows) {
      be.copyRows({
        dst: s.headIn,
        src: s.hidden,
        width: dModel,
        count: batch,
        srcRows: { buf: lastRows, offset: 0 },
      });
    }
    this.head(s, logits, lastRows ? s.headIn : s.hidden, batch);
    be.copyRows({
      dst: this.pool.logits,
      src: logits,
      width: vocabSize,
      count: batch,
      dstRows: { buf: slots, offset: 0 },
    });
  }

  /**
   * Full-sequence logits [ids.length, vocab] (row t after ids[0..t]) of
   * `ids` fed to `slot`, in chunks. Ids must already be checked.
   */
  async forward(slot: number, ids: Int32Array): Promise<Float32Array> {
    const be = this.backend;
    const { vocabSize, dModel } = this.config;
    const logits = new Float32Array(ids.length * vocabSize);
    this.pool.zeroAcquired();
    const slotRows = be.upload(Float32Array.of(slot));
    try {
      for (let start = 0; start < ids.length; start += FORWARD_CHUNK) {
        const chunk = ids.subarray(start, Math.min(start + FORWARD_CHUNK, ids.length));
        const s = this.allocScratch(chunk.length);
        const rows = be.zeros(chunk.length * vocabSize);
        try {
          be.embed({ out: s.hidden, table: this.#weights.embedding, ids: chunk, dim: dModel });
          this.blocks(s, slotRows, chunk.length, 1);
          this.head(s, rows, s.hidden, chunk.length);
          logits.set(await be.read(rows), start * vocabSize);
        } finally {
          this.releaseScratch(s);
          be.release(rows);
        }
      }
    } finally {
      be.release(slotRows);
    }
    return logits;
  }

  /**
   * One decode step of `rows` sequences: embeds their ids, `tokens[offset +
   * r]` for row r, runs every block on the slots `slots[r]` and leaves the
   * logits after those ids in `logits` [rows, vocab]. Records nothing on the
   * host and allocates nothing, so that a backend can capture it.
   */
  step(s: Scratch<Buf>, rows: number, slots: Buf, tokens: Buf, offset: number, logits: Buf): void {
    this.backend.copyRows({
      dst: s.hidden,
      src: this.#weights.embedding,
      width: this.config.dModel,
      count: rows,
      srcRows: { buf: tokens, offset },
    });
    this.blocks(s, slots, 1, rows);
    this.head(s, logits, s.hidden, rows);
  }

  /**
   * Runs every block over the rows of `s`, whose embeddings are in
   * `s.hidden`: `batch` sequences of `len` tokens, one after the other, on the
   * pool's slots `slots[b]`. Leaves the residual stream in `s.hidden`.
   */
  blocks(s: Scratch<Buf>, slots: Buf, len: number, batch: number): void {
    this.#weights.layers.forEach((w, layer) => {
      const sequences = {
        conv: this.pool.conv[layer],
        ssm: this.pool.ssm[layer],
        slots,
        len,
        batch,
      };
      if (isMamba2Layer<Buf>(w)) {
        const buffers = { hidden: s.hidden, normed: s.normed, ...s.mamba2! };
        for (const op of MAMBA2_OPS) {
          mamba2BlockOp(this.backend, this.config, op, w, buffers, sequences);
        }
      } else {
        for (const op of BLOCK_OPS) blockOp(this.backend, this.config, op, w, s, sequences);
      }
      // A prompt's layers go to the device in groups (flushesAfter) while the
      // host records the rest, rather than all once every layer is recorded;
      // the caller submits what is left. (Decode steps are started by their
      // callers.)
      if (len > 1 && flushesAfter(layer)) this.backend.flush();
    });
  }

  /** logits [count, vocab] = lm_head(rmsNorm_f(rows [0, count) of `input`)), on `s`'s norm buffer. */
  head(s: Scratch<Buf>, logits: Buf, input: Buf, count: number): void {
    projectLogits(this.backend, this.config, logits, input, s.normed, this.#weights, count);
  }

  /**
   * Floats that {@link allocScratch} takes per row: what each row of a
   * prompt's chunk costs in activations.
   */
  get activationFloatsPerRow(): number {
    const groups = Object.values(this.#scratchRowWidths());
    return groups.reduce(
      (total, widths) => Object.values(widths ?? {}).reduce((sum, width) => sum + width, total),
      0,
    );
  }

  /**
   * Floats per row of each of {@link allocScratch}'s buffers: the block's
   * input and output; Mamba-1's mixer (empty for Mamba-2); Falcon-Mamba's
   * normed dt, B and C; Mamba-2's buffers (mamba2.ts).
   */
  #scratchRowWidths() {
    const { dModel, dInner, dState, dtRank, mamba2, mixerRmsEps } = this.config;
    const [inner, rank, state] = mamba2 ? [0, 0, 0] : [dInner, dtRank, dState];
    const mixer = {
      x: inner,
      z: inner,
      xc: inner,
      dt: rank,
      B: state,
      C: state,
      delta: inner,
      y: inner,
    };
    const mixerNorm = mamba2 || mixerRmsEps === undefined
      ? undefined
      : { dt: dtRank, B: dState, C: dState };
    return {
      block: { hidden: dModel, normed: dModel, headIn: dModel },
      mixer,
      mixerNorm,
      mamba2: mamba2 ? mamba2RowWidths(this.config) : undefined,
    };
  }

  /** Scratch activations for up to `rows` rows; give them back with {@link releaseScratch}. */
  allocScratch(rows: number): Scratch<Buf> {
    const { dtRank, dState, mamba2 } = this.config;
    const { block, mixer, mixerNorm } = this.#scratchRowWidths();
    const z = (width: number) => this.backend.zeros(rows * width);
    // What only the next operation reads, which a backend may fold away.
    const scratch = (width: number) => this.backend.scratch(rows * width);
    return {
      rows,
      hidden: z(block.hidden),
      normed: scratch(block.normed),
      headIn: z(block.headIn),
      x: scratch(mixer.x),
      z: z(mixer.z),
      xc: z(mixer.xc),
      dt: scratch(mixer.dt),
      B: scratch(mixer.B),
      C: scratch(mixer.C),
      delta: scratch(mixer.delta),
      y: z(mixer.y),
      ...(mamba2 && { mamba2: allocMamba2Buffers(this.backend, this.config, rows) }),
      ...(mixerNorm && {
        mixerNorm: {
          dt: z(mixerNorm.dt),
          B: z(mixerNorm.B),
          C: z(mixerNorm.C),
          ones: this.backend.upload(new Float32Array(Math.max(dtRank, dState)).fill(1)),
        },
      }),
    };
  }

  /** Gives scratch buffers back. */
  releaseScratch(s: Scratch<Buf>): void {
    const { rows: _, mixerNorm, mamba2, ...buffers } = s;
    const nested = [...Object.values(mixerNorm ?? {}), ...Object.values(mamba2 ?? {})];
    for (const buf of [...Object.values(buffers), ...nested]) {
      this.backend.release(buf);
    }
  }
}
