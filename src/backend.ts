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
  /**
   * Raw delta [len, dim], before bias and softplus; with {@link deltaProj}, a
   * buffer of that size that the backend may use for it.
   */
  delta: Buf;
  /**
   * Optional: dt_proj folded into the scan. The raw delta is then dt [len,
   * rank] · weightᵀ, with weight [dim, rank]: a backend computes it into
   * `delta` first (see {@link projectDelta}) or inside its scan kernel.
   */
  deltaProj?: DeltaProjection<Buf>;
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
  /** Number of tokens (per sequence). */
  len: number;
  /** Number of channels. */
  dim: number;
  /** N: state size per channel. */
  dState: number;
  /** Independent sequences, each with its own state (default 1). */
  batch?: number;
}

/** The low-rank input of delta and its projection (Mamba's dt and dt_proj). */
export interface DeltaProjection<Buf> {
  /** dt [len, rank], per sequence as the other per-token buffers. */
  dt: Buf;
  /** dt_proj's weight [dim, rank]: what {@link Backend.linear} takes as a weight. */
  weight: Buf;
  /** R: columns of dt. */
  rank: number;
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
  /** Number of tokens (per sequence). */
  len: number;
  /** Number of channels. */
  channels: number;
  /** Kernel width. */
  kernel: number;
  /** Independent sequences, each with its own state (default 1). */
  batch?: number;
}

/** An RMSNorm of each row: x / sqrt(mean(x²) + eps) * weight, with weight [dim]. */
export interface RowNorm<Buf> {
  /** Per-channel scale [dim]. */
  weight: Buf;
  /** Added to the mean square. */
  eps: number;
}

/**
 * A decode step's causal convolution folded into the {@link Backend.linearSplit}
 * that makes its input (in_proj): row r of the first output is the newest
 * input of sequence r, whose conv state `state` holds the ones before.
 */
export interface ConvStep<Buf> {
  /** Output [rows, channels]: `silu(conv(x) + bias)` ({@link ConvArgs.out} of one token per sequence). */
  out: Buf;
  /** Weights [channels, kernel]. */
  weight: Buf;
  /** Bias [channels], or null for none. */
  bias: Buf | null;
  /** Per sequence, the previous `kernel - 1` inputs [rows, kernel - 1, channels]; updated. */
  state: Buf;
  /** Kernel width. */
  kernel: number;
  /** Optional: x_proj folded in as well, taking `out` as its input. */
  project?: ConvProjection<Buf>;
}

/**
 * A decode step's x_proj folded into the {@link ConvStep} that makes its
 * input: outs[i] [rows, widths[i]] gets the next widths[i] columns of conv.out
 * · weightᵀ (Mamba's dt, B and C), as {@link Backend.linearSplit} would.
 * The selectiveScan that takes them next (dt as `deltaProj.dt`, B and C) may
 * receive them in a backend's own form instead (webgpu: as partial sums that
 * the scan adds up); any other reader before it sees the values, but after
 * it the buffers' contents are undefined.
 */
export interface ConvProjection<Buf> {
  /** x_proj's weight [Σ widths, channels]. */
  weight: Buf;
  /** The outputs, each [rows, widths[i]]. */
  outs: readonly Buf[];
  /** Columns of each output. */
  widths: readonly number[];
}

/**
 * Settings of {@link Backend.sampleTopK}: those of `Sampler.sample` (see
 * `src/sampler.ts`) when top-k is on and there is no repetition penalty.
 */
export interface TopKSampling {
  /** Candidates: 1 to {@link MAX_DEVICE_TOP_K}. */
  topK: number;
  /** Softmax temperature, above 0. */
  temperature: number;
  /** Nucleus mass in (0, 1]; 1 is off. */
  topP: number;
  /** Minimum probability relative to the top one, in [0, 1]; 0 is off. */
  minP: number;
}

/** The largest top-k that {@link Backend.sampleTopK} takes. */
export const MAX_DEVICE_TOP_K = 64;

/** The longest history window that {@link Backend.penalize} takes. */
export const MAX_DEVICE_PENALTY_WINDOW = 1024;

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
   * Optional: tokens per chunk of a long prompt (the model's default is 512).
   * Larger chunks cost scratch memory and give each kernel more work, which
   * pays on a GPU.
   */
  readonly chunkTokens?: number;

  /**
   * A buffer holding `data`. A backend in host memory may keep the array itself
   * rather than copy it, so the caller must not change `data` afterwards.
   * `rowLength` marks `data` as a row-major matrix with rows of that length,
   * which a backend may split by rows (webgpu, past its binding size limit).
   */
  upload(data: Float32Array, rowLength?: number): Buf;
  /**
   * Optional: `byteLength` bytes inside the backend's own memory, for the
   * loader to read a weight file into. Float32Arrays viewing these bytes then
   * upload without a copy, so the weights are never held twice. The bytes live
   * as long as the backend. Undefined where the backend cannot lend memory.
   */
  hostBytes?(byteLength: number): Uint8Array | undefined;
  /**
   * Optional: a buffer for a weight matrix that is only ever `linear`'s
   * `weight`, stored as f16 when every value is exactly an f16 (so products
   * are unchanged), or null when some value is not or the backend keeps f32.
   */
  uploadHalfMatrix?(data: Float32Array, rowLength?: number): Buf | null;
  /** A new buffer of `length` zeros. */
  zeros(length: number): Buf;
  /** Overwrites `buf` from `offset` (in floats) with `data`. */
  write(buf: Buf, data: Float32Array, offset?: number): void;
  /** Completes pending work and copies `length` floats from `offset` back to the host. */
  read(buf: Buf, offset?: number, length?: number): Promise<Float32Array>;
  /** Copies `length` floats from `src` at `srcOffset` into `dst` at `dstOffset`. */
  copy(dst: Buf, dstOffset: number, src: Buf, srcOffset: number, length: number): void;
  /** Gives the buffer's memory back; the handle must not be used again. */
  release(buf: Buf): void;
  /**
   * Optional, with {@link replay} and {@link releaseRecording}: records the
   * operations `ops` issues, without running them, so that replaying them
   * costs the host a fraction of issuing them one by one (like a CUDA graph;
   * a decode step is hundreds of kernels). The operations must not move data
   * to or from the host nor need temporary buffers, and every buffer they
   * name must outlive the recording.
   */
  capture?(ops: () => void): Recording;
  /** Issues the operations of a recording again, in order. */
  replay?(recording: Recording): void;
  /** Frees what a recording holds; it must not be replayed afterwards. */
  releaseRecording?(recording: Recording): void;
  /**
   * Optional: starts the work recorded so far without waiting for it, so the
   * device runs one token while the host records the next (webgpu).
   */
  flush?(): void;
  /**
   * Optional: frees what the backend holds beyond its buffers (worker threads,
   * a device); the backend must not be used afterwards.
   */
  dispose?(): void;

  /** out [ids.length, dim] = rows `ids` of table [rows, dim]. */
  embed(out: Buf, table: Buf, ids: Int32Array, dim: number): void;
  /**
   * Optional, with {@link argmax}, for greedy decoding on the device: out
   * [count, dim] = rows `ids[index]` … `ids[index + count - 1]` of table [rows,
   * dim], the ids read from a buffer (as floats) rather than from the host.
   */
  embedFrom?(out: Buf, table: Buf, ids: Buf, index: number, dim: number, count?: number): void;
  /**
   * Optional: for each of `rows` rows r of logits (rows `stride` apart),
   * ids[index + r] = the lowest i < limit holding the largest of that row's
   * first `limit` logits (as a float), or -1 where none is a number; NaN is
   * never chosen. Lets a backend whose read-backs are slow (webgpu) decode
   * greedily without a round trip per token.
   */
  argmax?(
    ids: Buf,
    index: number,
    logits: Buf,
    limit: number,
    rows?: number,
    stride?: number,
  ): void;
  /**
   * Optional, with {@link embedFrom}, for sampled decoding on the device: for
   * each of `rows` rows r of logits (rows `stride` apart), ids[index + r] =
   * the id below `limit` that `Sampler.sample` would draw with `sampling` and
   * the random number uniforms[uniformIndex + r] (as a float; -1 where no
   * logit can be sampled). Its weights are f32 where the sampler's are f64, so
   * a draw or the top-p cut within about 1e-7 (relative) of the boundary
   * between two ids may go the other way.
   */
  sampleTopK?(
    ids: Buf,
    index: number,
    logits: Buf,
    limit: number,
    sampling: TopKSampling,
    uniforms: Buf,
    uniformIndex: number,
    rows?: number,
    stride?: number,
  ): void;
  /**
   * Optional, with {@link sampleTopK}: `Sampler.sample`'s repetition penalty,
   * in place on `rows` rows of logits (rows `stride` apart). For each
   * distinct id among the last `window` (1 to
   * {@link MAX_DEVICE_PENALTY_WINDOW}) ids of row r's history, its logit is
   * divided by `penalty` when positive and multiplied by it otherwise. Row
   * r's history is the host's ids, history[r · (window + 1)] of them after
   * that count, then the ids chosen on the device, ids[deviceFirst + j ·
   * rows + r] for j < deviceCount; all as floats.
   */
  penalize?(
    logits: Buf,
    rows: number,
    stride: number,
    penalty: number,
    window: number,
    history: Buf,
    ids: Buf,
    deviceFirst: number,
    deviceCount: number,
  ): void;
  /** out [rows, dim] = x / sqrt(mean(x²) + eps) * weight, per row. */
  rmsNorm(out: Buf, x: Buf, weight: Buf, rows: number, dim: number, eps: number): void;
  /**
   * out [rows, outDim] = x [rows, inDim] · weightᵀ + bias, with weight [outDim,
   * inDim]; with `accumulate`, out += that instead (the residual connection).
   */
  linear(
    out: Buf,
    x: Buf,
    weight: Buf,
    bias: Buf | null,
    rows: number,
    inDim: number,
    outDim: number,
    accumulate?: boolean,
  ): void;
  /**
   * A linear whose output columns go to separate buffers: outs[i] [rows,
   * widths[i]] gets the next widths[i] columns of x · weightᵀ + bias, where
   * weight is [Σ widths, inDim] (in_proj's x and z; x_proj's dt, B and C).
   * With `norm`, the product takes x's rows RMS-normalised (x is unchanged).
   * With `conv`, the first output's rows then go through a decode step's
   * causal convolution into `conv.out`, and with `conv.project` through x_proj
   * (see {@link convStepAfter}); outs[0] itself may be left unwritten.
   */
  linearSplit(
    outs: readonly Buf[],
    widths: readonly number[],
    x: Buf,
    weight: Buf,
    bias: Buf | null,
    rows: number,
    inDim: number,
    norm?: RowNorm<Buf>,
    conv?: ConvStep<Buf>,
  ): void;
  /** acc[i] += x[i] for the first `length` floats. */
  addInPlace(acc: Buf, x: Buf, length: number): void;
  /** Causal depthwise convolution with SiLU, carrying state across calls. */
  causalConv(args: ConvArgs<Buf>): void;
  /** Selective scan (S6) with fused softplus, D skip and z gating, carrying state. */
  selectiveScan(args: ScanArgs<Buf>): void;
}

/**
 * For a scan that does not fold dt_proj in: computes delta = dt · weightᵀ into
 * `args.delta` and returns the arguments of a plain scan over it.
 */
export function projectDelta<Buf>(be: Backend<Buf>, args: ScanArgs<Buf>): ScanArgs<Buf> {
  const { deltaProj, ...plain } = args;
  if (!deltaProj) return args;
  const rows = args.len * (args.batch ?? 1);
  be.linear(args.delta, deltaProj.dt, deltaProj.weight, null, rows, deltaProj.rank, args.dim);
  return plain;
}

/**
 * The convolution of a {@link ConvStep} as an operation of its own, for a
 * linearSplit that does not fold it in: conv.out = silu(conv(first) + bias),
 * `rows` sequences of one token each; then its projection, if any.
 */
export function convStepAfter<Buf>(
  be: Backend<Buf>,
  first: Buf,
  rows: number,
  channels: number,
  conv: ConvStep<Buf>,
): void {
  const { out, weight, bias, state, kernel } = conv;
  be.causalConv({ out, x: first, weight, bias, state, len: 1, channels, kernel, batch: rows });
  projectAfterConv(be, rows, channels, conv);
}

/**
 * The projection of a {@link ConvStep} as an operation of its own, for a
 * backend that folds the convolution in but not the projection.
 */
export function projectAfterConv<Buf>(
  be: Backend<Buf>,
  rows: number,
  channels: number,
  { out, project }: ConvStep<Buf>,
): void {
  if (!project) return;
  be.linearSplit(project.outs, project.widths, out, project.weight, null, rows, channels);
}

/** A backend's view of `length` floats of `buf` from `offset` (in floats). */
export type ViewOf<Buf> = (buf: Buf, offset: number, length: number) => Buf;

/**
 * A batched scan run one sequence at a time, for backends whose kernel takes
 * one: `scan` gets each sequence's views (batch 1).
 */
export function scanEachSequence<Buf>(
  args: ScanArgs<Buf>,
  view: ViewOf<Buf>,
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
      state: view(args.state, b * dim * dState, dim * dState),
      batch: 1,
    });
  }
}

/** A batched causal conv run one sequence at a time, like {@link scanEachSequence}. */
export function convEachSequence<Buf>(
  args: ConvArgs<Buf>,
  view: ViewOf<Buf>,
  conv: (one: ConvArgs<Buf>) => void,
): void {
  const { len, channels, kernel, batch = 1 } = args;
  const kept = (kernel - 1) * channels;
  for (let b = 0; b < batch; b++) {
    conv({
      ...args,
      out: view(args.out, b * len * channels, len * channels),
      x: view(args.x, b * len * channels, len * channels),
      state: view(args.state, b * kept, kept),
      batch: 1,
    });
  }
}
