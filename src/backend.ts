/**
 * The small set of operations a Mamba model needs from a compute backend.
 *
 * The model code ({@link ../model.ts}) is written against this interface only and
 * never knows which backend runs it, in the spirit of ggml's and candle's backends.
 * A backend owns its buffers (`Buf`): plain `Float32Array`s for the reference
 * backend, WASM memory ranges or GPU buffers for the fast ones. Operations are
 * issued in order and may run lazily; {@link Backend.read} is the only point
 * where results must be complete.
 *
 * Layouts are token-major: a `[len, dim]` buffer holds token t's vector at
 * `t * dim`. Every buffer holds float32 values.
 *
 * @module
 */

import type { HalfMatrix, QuantizedMatrix } from "./quant.ts";

/**
 * Arguments of {@link Backend.copy}: `length` floats of src from `srcOffset`
 * into dst from `dstOffset`.
 */
export interface CopyArgs<Buf> {
  /** Written. */
  dst: Buf;
  /** Where the copy starts in dst, in floats (default 0). */
  dstOffset?: number;
  /** Read; may be dst itself. */
  src: Buf;
  /** Where the copy starts in src, in floats (default 0). */
  srcOffset?: number;
  /** Floats copied. */
  length: number;
}

/** Arguments of {@link Backend.embed}: out [ids.length, dim] = rows `ids` of table [rows, dim]. */
export interface EmbedArgs<Buf> {
  /** Output [ids.length, dim]: row t is row `ids[t]` of table. */
  out: Buf;
  /** Table [rows, dim]; may be a matrix kept 16-bit, quantized or split. */
  table: Buf;
  /** Rows of table to gather (token ids), one per row of out. */
  ids: Int32Array;
  /** Floats per row. */
  dim: number;
}

/** Arguments of {@link Backend.rmsNorm}: out = x / sqrt(mean(x²) + eps) * weight, per row. */
export interface RmsNormArgs<Buf> {
  /** Output [rows, dim]; may be x itself. */
  out: Buf;
  /** Input [rows, dim]. */
  x: Buf;
  /** Scale [dim]. */
  weight: Buf;
  /** Rows. */
  rows: number;
  /** Channels per row. */
  dim: number;
  /** Added to each row's mean square. */
  eps: number;
}

/**
 * Arguments of {@link Backend.linear}: out = x · weightᵀ + bias, or with
 * `accumulate`, out += that instead (the residual connection).
 */
export interface LinearArgs<Buf> {
  /** Output [rows, outDim]. */
  out: Buf;
  /** Input x [rows, inDim]. */
  x: Buf;
  /** Weight [outDim, inDim]; may be a matrix kept 16-bit, quantized or split. */
  weight: Buf;
  /** Bias [outDim], or null or absent for none. */
  bias?: Buf | null;
  /** Rows of x and out. */
  rows: number;
  /** Floats per row of x. */
  inDim: number;
  /** Floats per row of out. */
  outDim: number;
  /** Whether the product is added to out rather than written over it (default false). */
  accumulate?: boolean;
}

/**
 * Arguments of {@link Backend.linearSplit}: a linear whose output columns go
 * to separate buffers, outs[i] getting the next widths[i] columns of x ·
 * weightᵀ + bias (in_proj's x and z; x_proj's dt, B and C).
 */
export interface LinearSplitArgs<Buf> {
  /** Outputs, outs[i] [rows, widths[i]]. */
  outs: readonly Buf[];
  /** Columns of each output, in order. */
  widths: readonly number[];
  /** Input x [rows, inDim]. */
  x: Buf;
  /** Weight [Σ widths, inDim]; may be a matrix kept 16-bit, quantized or split. */
  weight: Buf;
  /** Bias [Σ widths], or null or absent for none. */
  bias?: Buf | null;
  /** Rows of x and of each output. */
  rows: number;
  /** Floats per row of x. */
  inDim: number;
}

/** Arguments of {@link Backend.addInPlace}: acc[i] += x[i] for the first `length` floats. */
export interface AddArgs<Buf> {
  /** Accumulator [length], added to in place. */
  acc: Buf;
  /** Addend [length]. */
  x: Buf;
  /** Floats added. */
  length: number;
}

/**
 * Arguments of {@link Backend.selectiveScan}, token-major. With `batch`
 * sequences, each per-token buffer holds them one after the other (u [batch,
 * len, dim], B [batch, len, dState], …) and state is [batch, dim, dState].
 */
export interface ScanArgs<Buf> {
  /** Output [len, dim]: `(C·h + D*u) * silu(z)`. */
  y: Buf;
  /** Input u [len, dim]. */
  u: Buf;
  /** Raw delta [len, dim], before bias and softplus (Mamba's dt_proj(dt)). */
  delta: Buf;
  /** A [dim, dState]: the (negative) state matrix, `-exp(A_log)`. */
  A: Buf;
  /** B [len, dState]: input projection of the state, per token. */
  B: Buf;
  /** C [len, dState]: output projection of the state, per token. */
  C: Buf;
  /** D [dim]: skip connection, or null for none. */
  D: Buf | null;
  /** z [len, dim]: gate, or null for none. */
  z: Buf | null;
  /** Bias [dim] added to delta before softplus, or null for none. */
  deltaBias: Buf | null;
  /** Whether delta goes through softplus. */
  deltaSoftplus: boolean;
  /** State h [dim, dState]: read as the initial state, overwritten with the last one. */
  state: Buf;
  /**
   * Optional: sequence b's state is row `slots[b]` (a float) of `state`, a
   * pool of [rows, dim, dState] states; without it, row b.
   */
  slots?: Buf;
  /** Number of tokens (per sequence). */
  len: number;
  /** Number of channels. */
  dim: number;
  /** N: state size per channel. */
  dState: number;
  /** Independent sequences, each with its own state (default 1). */
  batch?: number;
  /**
   * Optional, where `supports("channelMajorScan")`: u, delta, z and y are
   * channel-major [batch, dim, len], as mamba_ssm lays them out (B and C stay
   * [batch, len, dState]).
   */
  channelMajor?: boolean;
}

/**
 * Arguments of {@link Backend.causalConv}, token-major. With `batch`
 * sequences, x and out are [batch, len, channels] and state is [batch,
 * kernel - 1, channels].
 */
export interface ConvArgs<Buf> {
  /** Output [len, channels]: `silu(conv(x) + bias)`. */
  out: Buf;
  /** Input [len, channels]. */
  x: Buf;
  /** Weights [channels, kernel]; tap `kernel - 1` multiplies the current token. */
  weight: Buf;
  /** Bias [channels], or null for none. */
  bias: Buf | null;
  /**
   * The previous `kernel - 1` inputs [kernel - 1, channels], oldest first
   * (zeros at the start of a sequence); overwritten with the last `kernel - 1`
   * inputs seen, so prefill and step share one operation.
   */
  state: Buf;
  /**
   * Optional: sequence b's state is row `slots[b]` (a float) of `state`, a
   * pool of [rows, kernel - 1, channels] states; without it, row b.
   */
  slots?: Buf;
  /** Number of tokens (per sequence). */
  len: number;
  /** Number of channels. */
  channels: number;
  /** Kernel width. */
  kernel: number;
  /** Independent sequences, each with its own state (default 1). */
  batch?: number;
}

/** Where {@link Backend.copyRows} reads or writes row r: row `buf[offset + r]` (a float). */
export interface RowIndex<Buf> {
  /** Holds the row numbers, as floats. */
  buf: Buf;
  /** Where row 0's number is. */
  offset: number;
}

/**
 * Arguments of {@link Backend.copyRows}: for r < count, row dstRow(r) of dst
 * (rows of `width` floats from `dstOffset`) = row srcRow(r) of src (from
 * `srcOffset`). A row number is read from its index where one is given, else
 * it is r itself. A row number outside its buffer (an id of -1 from
 * {@link Backend.chooseTokens}, say) copies nothing.
 */
export interface CopyRowsArgs<Buf> {
  /** Rows written. */
  dst: Buf;
  /** Rows read; may be a matrix that the backend keeps split (an embedding). */
  src: Buf;
  /** Floats per row, in both. */
  width: number;
  /** Rows copied. */
  count: number;
  /** Where dst's row 0 starts, in floats (default 0). */
  dstOffset?: number;
  /** Where src's row 0 starts, in floats (default 0; not for a split matrix). */
  srcOffset?: number;
  /** Which row of src row r reads (a gather), or row r. */
  srcRows?: RowIndex<Buf>;
  /** Which row of dst row r writes (a scatter), or row r. */
  dstRows?: RowIndex<Buf>;
}

/**
 * Floats per row of {@link ChooseArgs.settings}: a row's sampling options
 * (`Sampler.sample`'s) and where its history stands, as
 * {@link samplingSettings} writes them.
 */
export const SAMPLING_SETTINGS = 8;

/** What {@link samplingSettings} encodes. */
export interface SamplingSettings {
  /** 0: greedy. */
  temperature: number;
  /** 0: off. */
  topK: number;
  /** 1: off. */
  topP: number;
  /** 0: off. */
  minP: number;
  /** 1: off. */
  repetitionPenalty: number;
  /** History ids the penalty looks back over; -1: all of them. */
  repeatLastN: number;
}

/**
 * One row of {@link ChooseArgs.settings}: temperature, topK, topP, minP,
 * repetitionPenalty, repeatLastN, then `position`, the sequence position
 * (ids before it) of the row's pick at step 0, and `limit`: only ids below
 * it are candidates.
 */
export function samplingSettings(
  options: SamplingSettings,
  position: number,
  limit: number,
): number[] {
  const { temperature, topK, topP, minP, repetitionPenalty, repeatLastN } = options;
  return [temperature, topK, topP, minP, repetitionPenalty, repeatLastN, position, limit];
}

/** Which sampling features the rows of a {@link ChooseArgs} use, so a backend may skip work. */
export interface SamplingFeatures {
  /** Some row is greedy (temperature 0). */
  greedy: boolean;
  /** Some row samples (temperature above 0). */
  sampled: boolean;
  /** Some row has a repetition penalty that changes logits. */
  penalized: boolean;
  /**
   * The most candidates a sampled row keeps after top-k: its topK, or its
   * `limit` where top-k is off (0) or not below it; 0 without sampled rows.
   */
  widestTopK: number;
}

/** The {@link SamplingFeatures} of rows with these options, each choosing among its `limit` ids. */
export function samplingFeatures(
  rows: readonly (SamplingSettings & { limit: number })[],
): SamplingFeatures {
  let greedy = false;
  let sampled = false;
  let penalized = false;
  let widestTopK = 0;
  for (const { limit, ...row } of rows) {
    if (row.repetitionPenalty !== 1 && row.repeatLastN !== 0) penalized = true;
    if (row.temperature === 0) greedy = true;
    if (row.temperature > 0) {
      sampled = true;
      const kept = row.topK > 0 && row.topK < limit ? row.topK : limit;
      widestTopK = Math.max(widestTopK, kept);
    }
  }
  return { greedy, sampled, penalized, widestTopK };
}

/**
 * Arguments of {@link Backend.chooseTokens}: one id for each of `rows` rows
 * of logits, chosen as `Sampler.sample` chooses it (see `pickToken` in
 * `src/sampler.ts`), each row with its own options, random number and
 * history.
 */
export interface ChooseArgs<Buf> {
  /** Logits [rows, vocab]; a repetition penalty may change them in place. */
  logits: Buf;
  /** Rows to choose for. */
  rows: number;
  /** Floats per row of logits. */
  vocab: number;
  /** [rows, SAMPLING_SETTINGS]: each row's {@link samplingSettings}. */
  settings: Buf;
  /** What the settings use, for the backend to skip work: {@link samplingFeatures}. */
  features: SamplingFeatures;
  /** Row r draws with the number `randoms[randomOffset + r]`, in [0, 1) (unread where greedy). */
  randoms: Buf;
  /** Where row 0's random number is. */
  randomOffset: number;
  /**
   * The ids of each sequence, [sequences, historyLength]: the id at
   * sequence position p of the sequence in row `slots[r]` is at `p %
   * historyLength` of that row. The penalty reads the `repeatLastN` ids
   * before a pick's position (all of them for -1); the chosen id is written
   * at its position.
   */
  history: Buf;
  /** Ids kept per sequence in `history` (a window that moves along). */
  historyLength: number;
  /** Row r's sequence is row `slots[r]` (a float) of `history`. */
  slots: Buf;
  /** Added to each row's position: the call is the `step`-th pick after it. */
  step: number;
  /** Receives row r's id at `ids[idsOffset + r]`, as a float; -1 where no logit can be chosen. */
  ids: Buf;
  /** Where row 0's id goes. */
  idsOffset: number;
}

/**
 * Arguments of {@link Backend.ssdScan}: Mamba-2's state space dual layer,
 * token-major, `batch` sequences of `len` tokens one after the other (L =
 * batch · len rows). Per head h of group g = floor(h / (heads / groups)), per
 * token t:
 *
 * ```text
 * Δ     = clamp(softplus(dt[t, h] + dtBias[h]), dtLimit)
 * h     = exp(Δ·A[h]) · h + Δ · x[t, h, :] ⊗ B[t, g, :]     [headDim, dState]
 * y     = h · C[t, g, :] + D[h] · x[t, h, :]                   [headDim]
 * ```
 *
 * A backend may compute it in chunks of `chunkSize` tokens (the SSD form);
 * the result is the same recurrence.
 */
export interface SsdArgs<Buf> {
  /** Output y [L, heads · headDim]. */
  y: Buf;
  /**
   * The convolution's output [L, heads · headDim + 2 · groups · dState]: per
   * token x [heads, headDim], then B [groups, dState], then C [groups, dState].
   */
  xBC: Buf;
  /** Raw Δ [L, heads], before bias, softplus and clamp. */
  dt: Buf;
  /** Added to Δ before softplus [heads]. */
  dtBias: Buf;
  /** Δ's clamp after softplus: [min, max]. */
  dtLimit: readonly [number, number];
  /** A [heads]: each head's (negative) scalar decay rate, `-exp(A_log)`. */
  A: Buf;
  /** D [heads]: skip connection, or null for none. */
  D: Buf | null;
  /**
   * States [rows, heads, headDim, dState]: read as the initial state of
   * sequence b (row `slots[b]`, or row b without slots), overwritten with its last.
   */
  state: Buf;
  /** Optional: sequence b's state is row `slots[b]` (a float) of `state`. */
  slots?: Buf;
  /** Tokens per sequence. */
  len: number;
  /** Independent sequences. */
  batch: number;
  /** H. */
  heads: number;
  /** P: channels per head. */
  headDim: number;
  /** G: groups sharing B and C; divides heads. */
  groups: number;
  /** N. */
  dState: number;
  /** Tokens per chunk of a chunked scan (the model's `chunk_size`). */
  chunkSize: number;
}

/**
 * Arguments of {@link Backend.gatedRmsNorm}: mamba_ssm's gated RMSNorm
 * (`RMSNormGated`, norm after the gate): per row, g = x · silu(gate), then
 * each group of `groupSize` consecutive channels of g is RMS-normalised on
 * its own and scaled by weight.
 */
export interface GatedNormArgs<Buf> {
  /** Output [rows, dim]. */
  out: Buf;
  /** Input [rows, dim]. */
  x: Buf;
  /** Gate [rows, dim]. */
  gate: Buf;
  /** Scale [dim]. */
  weight: Buf;
  /** Rows. */
  rows: number;
  /** Channels per row. */
  dim: number;
  /** Channels normalised together; divides dim. */
  groupSize: number;
  /** Added to each group's mean square. */
  eps: number;
}

/** Operations that only some backends provide: ask {@link Backend.supports}. */
export type OptionalOp = "ssdScan" | "gatedRmsNorm" | "channelMajorScan";

/** Operations recorded by {@link Backend.capture}. */
export interface Recording {
  /** How many kernels a replay issues. */
  readonly dispatches: number;
}

/** The operations a backend provides. `Buf` is its buffer handle. */
export interface Backend<Buf = unknown> {
  /** Short name shown to users: "js", "wasm", "webgpu". */
  readonly name: string;
  /**
   * Rows of a prompt's chunk: larger chunks cost scratch memory and give
   * each kernel more work, which pays on a GPU; smaller ones keep the
   * decoding of other sequences waiting less.
   */
  readonly chunkTokens: number;
  /**
   * Rows of a chunk while no sequence decodes (prompts that arrive together,
   * with no stream waiting on them): several prompts in one chunk share each
   * kernel launch, which pays on a GPU. At least `chunkTokens`.
   */
  readonly idleChunkTokens: number;
  /**
   * Whether operations are queued for a device that runs them while the host
   * goes on (webgpu): a read then costs a round trip, so the decode engine
   * overlaps it with the next round. False where an operation has completed
   * when it returns (js, wasm).
   */
  readonly queued: boolean;

  /**
   * A buffer holding `data`. A backend in host memory may keep the array itself
   * rather than copy it, so the caller must not change `data` afterwards.
   * `rowLength` marks `data` as a row-major matrix with rows of that length,
   * which a backend may split by rows (webgpu, past its binding size limit).
   */
  upload(data: Float32Array, rowLength?: number): Buf;
  /**
   * `byteLength` bytes inside the backend's own memory, for the loader to
   * read a weight file into. Float32Arrays viewing these bytes then upload
   * without a copy, so the weights are never held twice. The bytes live as
   * long as the backend. Undefined where the backend cannot lend memory.
   */
  hostBytes(byteLength: number): Uint8Array | undefined;
  /**
   * A buffer for a weight matrix of an F16 or BF16 checkpoint kept 16-bit,
   * which only `linear`/`linearSplit` read as their `weight` and
   * `embed`/`copyRows` gather rows from (as the float32 values they hold);
   * null where the backend keeps f32, and the caller then uploads the
   * widened values. The backend may copy the values or keep `matrix.halves`
   * itself, so the caller must not change them afterwards.
   */
  uploadHalfMatrix(matrix: HalfMatrix): Buf | null;
  /**
   * A buffer for a weight matrix kept in its quantized block form, which
   * only `linear`/`linearSplit` read as their `weight` and `embed`/`copyRows`
   * gather rows from (as the float32 values `dequantizeMatrix` gives); null
   * where the backend does not keep that form, and the caller then uploads
   * the dequantized values. The backend may copy the blocks or keep `matrix`
   * itself, so the caller must not change it afterwards.
   */
  uploadQuantizedMatrix(matrix: QuantizedMatrix): Buf | null;
  /** A new buffer of `length` zeros. */
  zeros(length: number): Buf;
  /**
   * A zeroed buffer for an intermediate result that only the next operation
   * reads (a model's scratch activations): a backend may fold the operation
   * that writes it into that reader and leave it unwritten, its contents
   * then undefined. Otherwise as {@link zeros}.
   */
  scratch(length: number): Buf;
  /** Overwrites `buf` from `offset` (in floats) with `data`. */
  write(buf: Buf, data: Float32Array, offset?: number): void;
  /** Completes pending work and copies `length` floats from `offset` back to the host. */
  read(buf: Buf, offset?: number, length?: number): Promise<Float32Array>;
  /**
   * Copies `length` floats from `offset` back to the host as the work
   * submitted so far (see {@link flush}) leaves them; work issued since stays
   * unsubmitted until the next flush, ready to go the moment the read
   * returns control. The caller makes sure that none of that work writes
   * `buf`. Where nothing is queued it is {@link read}.
   */
  readSubmitted(buf: Buf, offset?: number, length?: number): Promise<Float32Array>;
  /** Copies `length` floats from src into dst, each from its offset (see {@link CopyArgs}). */
  copy(args: CopyArgs<Buf>): void;
  /** Gives the buffer's memory back; the handle must not be used again. */
  release(buf: Buf): void;
  /**
   * Records the operations `ops` issues, without running them, so that
   * replaying them costs the host a fraction of issuing them one by one (like
   * a CUDA graph; a decode step is hundreds of kernels). The operations must
   * not move data to or from the host nor need temporary buffers, and every
   * buffer they name must outlive the recording; a `flush` among them does
   * nothing. A backend throws, having run nothing, where it cannot record
   * one of them (webgpu: a scan over several chunks), so a caller may then
   * issue them directly. A backend without such a facility keeps `ops` and
   * calls it on replay.
   */
  capture(ops: () => void): Recording;
  /** Issues the operations of a recording again, in order. */
  replay(recording: Recording): void;
  /** Frees what a recording holds; it must not be replayed afterwards. */
  releaseRecording(recording: Recording): void;
  /** Starts the work issued so far without waiting for it (a no-op where nothing is queued). */
  flush(): void;
  /**
   * Frees what the backend holds beyond its buffers (worker threads, a
   * device); the backend must not be used afterwards.
   */
  dispose(): void;

  /** out [ids.length, dim] = rows `ids` of table [rows, dim] (see {@link EmbedArgs}). */
  embed(args: EmbedArgs<Buf>): void;
  /** Rows copied by index: gathers and scatters (see {@link CopyRowsArgs}). */
  copyRows(args: CopyRowsArgs<Buf>): void;
  /** One id per row of logits, as `Sampler.sample` would choose it (see {@link ChooseArgs}). */
  chooseTokens(args: ChooseArgs<Buf>): void;
  /** out [rows, dim] = x / sqrt(mean(x²) + eps) * weight, per row (see {@link RmsNormArgs}). */
  rmsNorm(args: RmsNormArgs<Buf>): void;
  /**
   * out [rows, outDim] = x [rows, inDim] · weightᵀ + bias; with `accumulate`,
   * out += that instead (see {@link LinearArgs}).
   */
  linear(args: LinearArgs<Buf>): void;
  /** A linear whose output columns go to separate buffers (see {@link LinearSplitArgs}). */
  linearSplit(args: LinearSplitArgs<Buf>): void;
  /** acc[i] += x[i] for the first `length` floats (see {@link AddArgs}). */
  addInPlace(args: AddArgs<Buf>): void;
  /** Causal depthwise convolution with SiLU, carrying state across calls. */
  causalConv(args: ConvArgs<Buf>): void;
  /** Selective scan (S6) with fused softplus, D skip and z gating, carrying state. */
  selectiveScan(args: ScanArgs<Buf>): void;

  /** Whether this backend provides the optional operation `op`. */
  supports(op: OptionalOp): boolean;
  /** Mamba-2's SSD scan, carrying state (see {@link SsdArgs}); where `supports("ssdScan")`. */
  ssdScan?(args: SsdArgs<Buf>): void;
  /** mamba_ssm's grouped gated RMSNorm (see {@link GatedNormArgs}); where `supports("gatedRmsNorm")`. */
  gatedRmsNorm?(args: GatedNormArgs<Buf>): void;
}

/** A backend's view of `length` floats of `buf` from `offset` (in floats). */
export type ViewOf<Buf> = (buf: Buf, offset: number, length: number) => Buf;

/**
 * Whether a caller issuing a run of like pieces of work (a round's decode
 * steps, a prompt's layers) calls {@link Backend.flush} after piece `index`:
 * after pieces 0 and 1, then after every fourth (3, 7, 11, …). Where the
 * backend queues work each submission costs time, so fewer are faster; groups
 * of four still keep the device ahead of a host issuing the rest, where larger
 * or doubling groups sometimes left it waiting (docs/performance.md has the
 * figures).
 */
export function flushesAfter(index: number): boolean {
  return index <= 1 || (index + 1) % 4 === 0;
}

/**
 * For a host backend: the state row of each sequence of a batch, `slots`
 * read as integers (checked against the `rows` that `state` holds), or 0 …
 * batch - 1 without slots.
 */
export function stateRows(
  slots: Float32Array | undefined,
  batch: number,
  rows: number,
): number[] {
  return Array.from({ length: batch }, (_, b) => {
    const row = slots ? slots[b] : b;
    if (!(Number.isInteger(row) && row >= 0 && row < rows)) {
      throw new RangeError(`State row ${row} of sequence ${b} is outside the ${rows} rows held`);
    }
    return row;
  });
}

/**
 * A batched scan run one sequence at a time, for backends whose kernel takes
 * one: `scan` gets each sequence's views (batch 1), its state the row that
 * `rows[b]` names.
 */
export function scanEachSequence<Buf>(
  args: ScanArgs<Buf>,
  view: ViewOf<Buf>,
  rows: readonly number[],
  scan: (one: ScanArgs<Buf>) => void,
): void {
  const { len, dim, dState, batch = 1 } = args;
  for (let b = 0; b < batch; b++) {
    const tokens = (buf: Buf, width: number) => view(buf, b * len * width, len * width);
    scan({
      ...args,
      y: tokens(args.y, dim),
      u: tokens(args.u, dim),
      delta: tokens(args.delta, dim),
      B: tokens(args.B, dState),
      C: tokens(args.C, dState),
      z: args.z && tokens(args.z, dim),
      state: view(args.state, rows[b] * dim * dState, dim * dState),
      slots: undefined,
      batch: 1,
    });
  }
}

/** A batched causal conv run one sequence at a time, like {@link scanEachSequence}. */
export function convEachSequence<Buf>(
  args: ConvArgs<Buf>,
  view: ViewOf<Buf>,
  rows: readonly number[],
  conv: (one: ConvArgs<Buf>) => void,
): void {
  const { len, channels, kernel, batch = 1 } = args;
  const kept = (kernel - 1) * channels;
  for (let b = 0; b < batch; b++) {
    conv({
      ...args,
      out: view(args.out, b * len * channels, len * channels),
      x: view(args.x, b * len * channels, len * channels),
      state: view(args.state, rows[b] * kept, kept),
      slots: undefined,
      batch: 1,
    });
  }
}
