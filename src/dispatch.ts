/**
 * `backend: "auto"`: picks the backend a model runs on by measuring it.
 *
 * Every backend that can run here (see `./backends/registry.ts`) is created
 * and each operation of a Mamba block is timed on it with the model's real
 * dimensions, at the shape of a prefill chunk ({@link PREFILL_TOKENS} rows) and
 * at the decode shape (one row): in_proj (with the block's RMSNorm, and at one
 * row the convolution and x_proj), the convolution, x_proj, the scan (with dt_proj) and
 * out_proj, plus lm_head (with the final norm) and the logits read-back of a
 * step. A few milliseconds per operation suffice, after a warm-up that lets
 * the JavaScript engine optimise the kernels. The prefill chunk is measured at
 * 64 rows rather than the model's 512-row chunks: the kernels' time per row is
 * flat from there on (the wasm matmul runs at 38 GFLOP/s at 64 and at 512 rows),
 * and 512 rows would take the js backend about a second per operation at
 * mamba-130m's size. The decision and its table are cached in memory and,
 * where the runtime has a usable `localStorage`, across runs.
 *
 * One backend runs the whole model rather than the fastest one per operation:
 * a model's weights live in one backend's buffers (WASM memory, GPU buffers),
 * so running in_proj on the GPU and the scan in WASM would copy activations
 * across every layer and keep the weights twice. The per-operation times are
 * therefore summed into the cost of a workload (a {@link PREFILL_TOKENS}-token
 * prompt, then {@link GENERATED_TOKENS} generated tokens) and the backend with
 * the lowest total gets the weights; the report keeps the per-operation table
 * so that the choice can be checked. To keep measuring short, wasm goes first
 * and every later candidate stops as soon as the operations it has done already
 * cost more than the best total: it cannot win, and its partial table shows
 * why. Choosing per shape does happen inside a
 * backend, where it costs nothing: wasm and webgpu run `linear` as a GEMV for
 * decode rows and as a tiled matmul for prefill chunks.
 *
 * A backend that fails to initialise, or whose operation throws while it is
 * measured, is passed over with the reason in the report (and on
 * `console.warn` with `verbose`). An explicitly named backend is created as
 * asked, with no measuring and no fallback.
 *
 * @module
 */

import type { Backend } from "./backend.ts";
import {
  type BackendCandidate,
  type BackendName,
  type BackendOptions,
  BACKENDS,
  type Capabilities,
  createBackend,
  messageOf,
  probeCapabilities,
} from "./backends/registry.ts";
import type { MambaConfig } from "./config.ts";
import { BLOCK_OPS, type BlockBuffers, blockOp, projectLogits } from "./model.ts";
import type { LayerWeights } from "./weights.ts";

/** Rows of the measured prefill chunk, and prompt tokens of the scored workload. */
export const PREFILL_TOKENS = 64;
/** Generated tokens of the scored workload (the CLI's default `-n` is 128). */
export const GENERATED_TOKENS = 128;

/** Each operation at each shape is timed until it has done this much work, after a warm-up call. */
const TIME_PER_OP_MS = 4;
/** …unless the rounds take this long in all (WebGPU's wait for results dominates small ones). */
const MAX_TIME_PER_OP_MS = 40;
/**
 * Rows of the warm-up's multi-row pass: enough to take the kernels' matmul
 * paths, a fraction of a prefill chunk's cost.
 */
const WARM_UP_ROWS = 8;
/** Warm-up passes at most (a pass is one layer's operations at 1 and {@link WARM_UP_ROWS} rows). */
const MAX_WARM_UP_PASSES = 6;
/** A backend this slow to warm up (a software GPU compiling shaders) is timed as it is. */
const MAX_WARM_UP_MS = 100;
/** Part of every cache key: bump it when kernels or the measurement change. */
const CACHE_VERSION = 4;
const CACHE_PREFIX = "mamba-deno/backend/";

/** The operations of one Mamba block, in the order the model issues them. */
const LAYER_OPS = BLOCK_OPS;
/** Once per forward call, after the blocks, at one row. */
const HEAD_OPS = ["lm_head", "read"] as const;
type OpName = typeof LAYER_OPS[number] | typeof HEAD_OPS[number];
/** Waiting for the backend with no work queued: measured to take it out of the others' times. */
type BenchOp = OpName | "sync";

/** Where "auto" keeps its decisions: `localStorage` or anything with the same two methods. */
export interface BackendCache {
  /** The stored value, or null. */
  getItem(key: string): string | null;
  /** Stores a value. */
  setItem(key: string, value: string): void;
}

/** One backend in a {@link BackendReport}. */
export interface CandidateReport {
  /** Backend name. */
  name: string;
  /** Whether it could run this model (false: not here, failed to start, or an op threw). */
  available: boolean;
  /** Why it is not available, or why its measurement stopped early. */
  reason?: string;
  /** What it runs on: adapter or threads. */
  device?: string;
  /**
   * Milliseconds per call of each operation at the model's dimensions, keyed
   * `op@rows` (`in_proj@64`, `in_proj@1`, …); one layer's worth: in_proj is both
   * halves, x_proj its three outputs, out_proj includes the residual add.
   * `read@1` is copying a step's logits to the host.
   */
  perOp?: Record<string, number>;
  /** Estimated model time for a {@link PREFILL_TOKENS}-token prompt, from `perOp`. */
  prefillMs?: number;
  /** Estimated model time per generated token, from `perOp`. */
  decodeMs?: number;
  /** The score: `prefillMs + GENERATED_TOKENS * decodeMs`. */
  totalMs?: number;
  /**
   * Whether its measurement stopped once it could no longer win: `perOp` is
   * then partial and the estimates are lower bounds.
   */
  stoppedEarly?: boolean;
}

/** How the backend of a model was chosen; see {@link selectBackend}. */
export interface BackendReport {
  /** The backend that runs the model. */
  chosen: string;
  /** "explicit": named by the caller; "auto": picked by measuring (or from the cache). */
  mode: "explicit" | "auto";
  /** Whether an earlier measurement was reused instead of measuring now. */
  cached: boolean;
  /** Why this backend, in a sentence. */
  reason: string;
  /** Every backend considered, with its measurements. */
  candidates: CandidateReport[];
  /** Wall time of the measurement that made the decision (0 when nothing was measured). */
  measureMs: number;
}

/** Options of {@link selectBackend}. */
export interface SelectOptions extends BackendOptions {
  /**
   * Where decisions are kept: default `localStorage` where usable (across
   * runs), else this process's memory; null: nowhere, measure every time.
   */
  cache?: BackendCache | null;
  /** Measure again even where a decision is cached, and replace it. */
  remeasure?: boolean;
  /**
   * Also tell `console.warn` when a backend is passed over because it failed
   * (the report always says).
   */
  verbose?: boolean;
  /** The runtime's capabilities (default: probed); tests pass their own. */
  capabilities?: Capabilities;
  /** The backends to choose from (default: the registry's). */
  candidates?: readonly BackendCandidate[];
}

/** A created backend and the report of how it was chosen. */
export interface Selection {
  /** The backend, ready for the model's weights. */
  backend: Backend;
  /** How it was chosen. */
  report: BackendReport;
}

/** Decisions made in this process, where the runtime has no usable `localStorage`. */
const memoryCache = new Map<string, string>();
const memoryStore: BackendCache = {
  getItem: (key) => memoryCache.get(key) ?? null,
  setItem: (key, value) => void memoryCache.set(key, value),
};

/**
 * Creates the backend a model with `config` runs on: the one named, or for
 * "auto" the one with the lowest measured cost (see the module documentation).
 */
export async function selectBackend(
  name: BackendName,
  config: MambaConfig,
  options: SelectOptions = {},
): Promise<Selection> {
  const capabilities = options.capabilities ?? probeCapabilities();
  const candidates = options.candidates ?? BACKENDS;
  if (name !== "auto") {
    const backend = await createBackend(name, options, capabilities, candidates);
    return {
      backend,
      report: {
        chosen: backend.name,
        mode: "explicit",
        cached: false,
        reason: `Named by the caller (backend: "${name}")`,
        candidates: [{ name: backend.name, available: true }],
        measureMs: 0,
      },
    };
  }

  const warn = options.verbose ? (message: string) => console.warn(message) : () => {};
  const probes = await Promise.all(candidates.map(async (candidate) => {
    try {
      return await candidate.probe(capabilities, options);
    } catch (error) {
      return {
        available: false as const,
        reason: `Its capability check threw: ${messageOf(error)}`,
      };
    }
  }));
  const reports: CandidateReport[] = candidates.map((candidate, i) => {
    const probe = probes[i];
    return probe.available
      ? { name: candidate.name, available: true, device: probe.device }
      : { name: candidate.name, available: false, reason: probe.reason };
  });
  const passOver = (index: number, reason: string) => {
    reports[index] = { ...reports[index], available: false, reason };
    warn(`mamba: backend "${reports[index].name}" passed over: ${reason}`);
  };
  /** Creates candidate `index`, or records why it could not be. */
  const create = async (index: number): Promise<Backend | undefined> => {
    const probe = probes[index];
    if (!probe.available) return undefined;
    try {
      return await probe.create();
    } catch (error) {
      passOver(index, `Failed to initialise: ${messageOf(error)}`);
    }
  };

  const storage = options.cache === undefined ? usableLocalStorage() ?? memoryStore : options.cache;
  const key = cacheKey(config, reports);
  if (!options.remeasure) {
    const cached = readDecision(storage?.getItem(key));
    const index = cached ? reports.findIndex((r) => r.available && r.name === cached.chosen) : -1;
    if (cached && index >= 0) {
      const backend = await create(index);
      if (backend) return { backend, report: { ...cached, cached: true } };
    }
  }

  const started = performance.now();
  const runnable = measureOrder(reports);
  // Candidates in the order they are to be tried for the model.
  let ranked = runnable;
  if (runnable.length > 1) {
    let leader: CandidateReport | undefined; // The lowest complete estimate so far.
    for (const index of runnable) {
      const backend = await create(index);
      if (!backend) continue;
      try {
        const bar = leader?.totalMs ?? Infinity;
        const { perOp, stoppedEarly, ...estimate } = await measureOps(backend, config, bar);
        reports[index] = { ...reports[index], perOp, ...estimate };
        if (stoppedEarly) {
          reports[index].stoppedEarly = true;
          reports[index].reason = `Measurement stopped after ${Object.keys(perOp).length} of ` +
            `${MEASURED_OPS.length} operations: they alone put it at ` +
            `${formatMs(estimate.totalMs)} or more, above ${leader!.name}'s ${formatMs(bar)}`;
        } else if (estimate.totalMs < bar) {
          leader = reports[index];
        }
      } catch (error) {
        passOver(index, `Failed while being measured: ${messageOf(error)}`);
      } finally {
        // The winner is created afresh: memory a backend took for measuring
        // (wasm memory never shrinks) must not stay with the model.
        backend.dispose?.();
      }
    }
    ranked = runnable
      .filter((i) => reports[i].available && !reports[i].stoppedEarly)
      .sort((a, b) => reports[a].totalMs! - reports[b].totalMs!);
  }
  let best: Backend | undefined;
  let chosen = -1;
  for (const index of ranked) {
    best = await create(index);
    chosen = index;
    if (best) break;
  }
  if (!best) {
    const reasons = reports.map((r) => `${r.name}: ${r.reason}`).join("; ");
    throw new Error(`No backend can run this model (${reasons})`);
  }

  const report: BackendReport = {
    chosen: reports[chosen].name,
    mode: "auto",
    cached: false,
    reason: explain(reports, chosen),
    candidates: reports,
    measureMs: performance.now() - started,
  };
  try {
    storage?.setItem(key, JSON.stringify(report));
  } catch {
    // Full or refused storage only means measuring again next time.
  }
  return { backend: best, report };
}

/**
 * Removes every decision "auto" stored in `storage` (default: `localStorage`
 * where usable) and in this process's memory; returns how many were stored.
 */
export function clearBackendCache(
  storage: Pick<Storage, "length" | "key" | "removeItem"> | null = usableLocalStorage(),
): number {
  memoryCache.clear();
  if (!storage) return 0;
  const keys: string[] = [];
  for (let i = 0; i < storage.length; i++) {
    const key = storage.key(i);
    if (key?.startsWith(CACHE_PREFIX)) keys.push(key);
  }
  for (const key of keys) storage.removeItem(key);
  return keys.length;
}

/** `globalThis.localStorage` if reading and writing it works here, else null. */
function usableLocalStorage(): Storage | null {
  try {
    // Throws or is absent where the runtime offers none (workers, some server runtimes).
    const storage = globalThis.localStorage;
    if (!storage) return null;
    const probe = `${CACHE_PREFIX}probe`;
    storage.setItem(probe, "1");
    storage.removeItem(probe);
    return storage;
  } catch {
    return null;
  }
}

/**
 * What a decision depends on: the backends that can run and on what (adapter,
 * threads), the runtime, the model's dimensions, the workload and the version.
 */
function cacheKey(config: MambaConfig, reports: readonly CandidateReport[]): string {
  const { dModel, dInner, dState, dtRank, dConv, nLayer, vocabSize, projBias, convBias } = config;
  return CACHE_PREFIX + JSON.stringify({
    version: CACHE_VERSION,
    runtime: (globalThis.navigator as Navigator | undefined)?.userAgent ?? "",
    backends: reports.filter((r) => r.available).map((r) => `${r.name}: ${r.device}`),
    shape: [dModel, dInner, dState, dtRank, dConv, nLayer, vocabSize, projBias, convBias],
    workload: [PREFILL_TOKENS, GENERATED_TOKENS],
  });
}

/** A stored report, or undefined when the value is missing or not one of ours. */
function readDecision(value: string | null | undefined): BackendReport | undefined {
  if (!value) return undefined;
  try {
    const report = JSON.parse(value) as BackendReport;
    const valid = typeof report.chosen === "string" && Array.isArray(report.candidates);
    return valid ? report : undefined;
  } catch {
    return undefined;
  }
}

/** The report as text for a terminal: the choice, why, each candidate and the per-operation table. */
export function formatBackendReport(report: BackendReport): string {
  const how = report.mode === "explicit"
    ? "named explicitly"
    : report.cached
    ? `auto, reusing a decision measured earlier in ${formatMs(report.measureMs)}`
    : `auto, measured in ${formatMs(report.measureMs)}`;
  const lines = [`backend ${report.chosen} (${how})`, `  why: ${report.reason}`];
  for (const c of report.candidates) {
    const state = c.available ? c.device ?? "available" : "not available";
    lines.push(`  ${c.name}: ${state}${c.reason ? `. ${c.reason}` : ""}`);
  }
  const measured = report.candidates.filter((c) => c.perOp);
  if (measured.length === 0) return lines.join("\n");
  const cell = (ms: number | undefined) =>
    (ms === undefined ? "-" : ms >= 100 ? ms.toFixed(0) : ms >= 1 ? ms.toFixed(2) : ms.toFixed(3))
      .padStart(10);
  const row = (label: string, values: (number | undefined)[]) =>
    `  ${label.padEnd(26)}${values.map(cell).join("")}`;
  lines.push(
    `  ${"ms per call, one layer".padEnd(26)}${measured.map((c) => c.name.padStart(10)).join("")}`,
  );
  for (const [op, rows] of MEASURED_OPS) {
    const key = `${op}@${rows}`;
    lines.push(row(key, measured.map((c) => c.perOp![key])));
  }
  const bound = (c: CandidateReport, ms: number | undefined) => c.stoppedEarly ? undefined : ms;
  lines.push(
    row(`model: ${PREFILL_TOKENS}-token prompt`, measured.map((c) => bound(c, c.prefillMs))),
  );
  lines.push(row("model: per token", measured.map((c) => bound(c, c.decodeMs))));
  lines.push(
    row(
      `total: ${PREFILL_TOKENS} + ${GENERATED_TOKENS} tokens`,
      measured.map((c) => bound(c, c.totalMs)),
    ),
  );
  return lines.join("\n");
}

/**
 * Indices of the runnable candidates in the order they are measured: wasm
 * first, as its measurement is quick and sets a bar that stops the slower
 * candidates' measurements early (see {@link measureOps}); then the others in
 * registry order.
 */
function measureOrder(reports: readonly CandidateReport[]): number[] {
  const runnable = reports.flatMap((report, i) => report.available ? [i] : []);
  const first = runnable.filter((i) => reports[i].name === "wasm");
  return [...first, ...runnable.filter((i) => !first.includes(i))];
}

function formatMs(value: number): string {
  return `${value < 10 ? value.toFixed(2) : Math.round(value)} ms`;
}

/** One sentence: the winner's estimate against the others', or why there was no contest. */
function explain(reports: readonly CandidateReport[], chosen: number): string {
  const winner = reports[chosen];
  if (winner.totalMs === undefined) return "The only backend that can run here";
  const others = reports
    .filter((r, i) => i !== chosen && r.totalMs !== undefined)
    .map((r) => `${r.name} ${r.stoppedEarly ? "≥ " : ""}${formatMs(r.totalMs!)}`);
  return `Lowest estimated time for a ${PREFILL_TOKENS}-token prompt and ${GENERATED_TOKENS} ` +
    `generated tokens: ${winner.name} ${formatMs(winner.totalMs)} (prefill ` +
    `${formatMs(winner.prefillMs!)}, ${formatMs(winner.decodeMs!)} per token)` +
    (others.length ? `, against ${others.join(", ")}` : "");
}

/**
 * Every `op@rows` timed, in order: the decode shape first, as the workload
 * calls it most (per generated token, per layer), so that a hopeless
 * candidate is found out after few operations; then the prefill chunk.
 * lm_head runs on one row in both: generation only needs the last
 * position's logits.
 */
const MEASURED_OPS: readonly [OpName, number][] = [
  ...LAYER_OPS.map((op): [OpName, number] => [op, 1]),
  ...HEAD_OPS.map((op): [OpName, number] => [op, 1]),
  ...LAYER_OPS.map((op): [OpName, number] => [op, PREFILL_TOKENS]),
];

/** How often the workload calls `op@rows`: for the whole prompt, and per generated token. */
function callsOf(op: OpName, rows: number, nLayer: number): { prompt: number; token: number } {
  if (rows > 1) return { prompt: nLayer, token: 0 };
  if (op === "lm_head" || op === "read") return { prompt: 1, token: 1 };
  return { prompt: 0, token: nLayer };
}

/** Per-operation times and the workload estimate from them. */
interface Measurement {
  /** Milliseconds per call, by `op@rows`. */
  perOp: Record<string, number>;
  /** Model time for the prompt, from the operations measured. */
  prefillMs: number;
  /** Model time per generated token, from the operations measured. */
  decodeMs: number;
  /** `prefillMs + GENERATED_TOKENS * decodeMs`. */
  totalMs: number;
  /** Whether it stopped before measuring everything; the estimates are then lower bounds. */
  stoppedEarly: boolean;
}

/**
 * Times the operations of {@link MEASURED_OPS} on `backend` at the model's
 * dimensions, stopping early once the estimate from those measured so far
 * exceeds `limitMs` (the best complete candidate's): the rest could only add.
 * A candidate still in the running after a full pass is timed again, and
 * each operation's faster time counts: a moment of contention (another process,
 * the engine still optimising in the background) would otherwise decide.
 */
async function measureOps<Buf>(
  backend: Backend<Buf>,
  config: MambaConfig,
  limitMs: number,
): Promise<Measurement> {
  const bench = new OpBench(backend, config, PREFILL_TOKENS);
  const perOp: Record<string, number> = {};
  try {
    await warmUp(bench);
    // What waiting for the backend costs with no work queued (WebGPU's submit
    // and map): taken out of each timed round, as a step pays it once (`read`).
    const idleMs = await timeOp((reps) => bench.round("sync", 1, reps), 0);
    for (let pass = 0; pass < 2; pass++) {
      // A complete first pass above the bar has lost; a second could only refine a loser.
      if (pass > 0 && estimate(perOp, config.nLayer).totalMs > limitMs) break;
      for (const [op, rows] of MEASURED_OPS) {
        if (pass === 0 && estimate(perOp, config.nLayer).totalMs > limitMs) {
          return { perOp, ...estimate(perOp, config.nLayer), stoppedEarly: true };
        }
        const ms = await timeOp((reps) => bench.round(op, rows, reps), op === "read" ? 0 : idleMs);
        const key = `${op}@${rows}`;
        perOp[key] = Math.min(perOp[key] ?? Infinity, ms);
      }
    }
  } finally {
    bench.release();
  }
  return { perOp, ...estimate(perOp, config.nLayer), stoppedEarly: false };
}

/** The workload's estimated time from the operations in `perOp` (a lower bound if some are missing). */
function estimate(
  perOp: Record<string, number>,
  nLayer: number,
): { prefillMs: number; decodeMs: number; totalMs: number } {
  let prefillMs = 0;
  let decodeMs = 0;
  for (const [op, rows] of MEASURED_OPS) {
    const ms = perOp[`${op}@${rows}`] ?? 0;
    const calls = callsOf(op, rows, nLayer);
    prefillMs += calls.prompt * ms;
    decodeMs += calls.token * ms;
  }
  return { prefillMs, decodeMs, totalMs: prefillMs + GENERATED_TOKENS * decodeMs };
}

/**
 * Runs one layer's operations, at one row and at a few, until a pass is no
 * longer clearly faster than the one before (at most {@link MAX_WARM_UP_PASSES}
 * passes or {@link MAX_WARM_UP_MS}).
 * JavaScript engines first run code unoptimised and optimise the hot parts on
 * background threads, which on a machine with few cores also compete with the
 * wasm backend's workers; timing before that settles measures the compiler.
 */
async function warmUp<Buf>(bench: OpBench<Buf>): Promise<void> {
  let previous = Infinity;
  for (let pass = 0, spent = 0; pass < MAX_WARM_UP_PASSES && spent < MAX_WARM_UP_MS; pass++) {
    const start = performance.now();
    await bench.layers([1, WARM_UP_ROWS]);
    const elapsed = performance.now() - start;
    if (elapsed > 0.8 * previous) return;
    previous = elapsed;
    spent += elapsed;
  }
}

/**
 * Milliseconds per repetition: `round(reps)` does the work `reps` times and
 * waits until it is done, which by itself costs `overheadMs`. One untimed
 * warm-up round (pipelines compile, wasm tiers up, pages fault in), then
 * rounds of 1, 2, 4, … repetitions until {@link TIME_PER_OP_MS} of work, or
 * {@link MAX_TIME_PER_OP_MS} in all, is spent; the best round counts.
 */
async function timeOp(
  round: (reps: number) => Promise<unknown>,
  overheadMs: number,
): Promise<number> {
  await round(1);
  let best = Infinity;
  let work = 0;
  let spent = 0;
  for (let reps = 1; work < TIME_PER_OP_MS && spent < MAX_TIME_PER_OP_MS; reps *= 2) {
    const start = performance.now();
    await round(reps);
    const elapsed = performance.now() - start;
    const perRep = Math.max(0, elapsed - overheadMs) / reps;
    best = Math.min(best, perRep);
    work += perRep * reps;
    spent += elapsed;
  }
  return best;
}

/**
 * The buffers of one layer and the head at the model's dimensions, and each
 * operation issued on them as `MambaModel` issues it. Weights and activations
 * are zeros: the kernels' speed does not depend on the values, and zeros are
 * never subnormal.
 */
class OpBench<Buf> {
  readonly #be: Backend<Buf>;
  readonly #c: MambaConfig;
  readonly #buffers: Buf[] = [];
  readonly #b: Record<string, Buf>;
  /** The buffers above seen as one layer's weights and activations. */
  readonly #weights: LayerWeights<Buf>;
  readonly #activations: BlockBuffers<Buf>;

  constructor(backend: Backend<Buf>, config: MambaConfig, maxRows: number) {
    this.#be = backend;
    this.#c = config;
    const { dModel, dInner, dState, dtRank, dConv, vocabSize } = config;
    const sizes: Record<string, number> = {
      hidden: maxRows * dModel,
      x: maxRows * dInner,
      z: maxRows * dInner,
      xc: maxRows * dInner,
      dt: maxRows * dtRank,
      B: maxRows * dState,
      C: maxRows * dState,
      delta: maxRows * dInner,
      y: maxRows * dInner,
      logits: vocabSize,
      norm: dModel,
      inProj: 2 * dInner * dModel,
      inProjBias: 2 * dInner,
      convWeight: dInner * dConv,
      convBias: dInner,
      convState: (dConv - 1) * dInner,
      xProj: (dtRank + 2 * dState) * dInner,
      dtProj: dInner * dtRank,
      dtProjBias: dInner,
      A: dInner * dState,
      D: dInner,
      ssmState: dInner * dState,
      outProj: dModel * dInner,
      outProjBias: dModel,
    };
    this.#b = Object.fromEntries(
      Object.entries(sizes).map(([name, length]) => {
        const buf = backend.zeros(length);
        this.#buffers.push(buf);
        return [name, buf];
      }),
    );
    // Uploaded as the model uploads it, so a backend may split it as it would
    // the real one (webgpu, past its binding limit).
    this.#b.lmHead = backend.upload(new Float32Array(vocabSize * dModel), dModel);
    this.#buffers.push(this.#b.lmHead);
    const b = this.#b;
    const projBias = (buf: Buf) => config.projBias ? buf : null;
    this.#weights = {
      norm: b.norm,
      inProj: b.inProj,
      inProjBias: projBias(b.inProjBias),
      convWeight: b.convWeight,
      convBias: config.convBias ? b.convBias : null,
      xProj: b.xProj,
      dtProj: b.dtProj,
      dtProjBias: b.dtProjBias,
      A: b.A,
      D: b.D,
      outProj: b.outProj,
      outProjBias: projBias(b.outProjBias),
    };
    const { hidden, x, z, xc, dt, B, C, delta, y } = b;
    this.#activations = { hidden, x, z, xc, dt, B, C, delta, y };
  }

  /** Issues every layer operation at each of `rows`, then waits until the work is done. */
  async layers(rows: readonly number[]): Promise<void> {
    for (const r of rows) {
      for (const op of LAYER_OPS) this.#issue(op, r);
    }
    await this.#sync("The layer's operations");
  }

  /** Issues `op` on `rows` tokens, saying which operation failed if it throws. */
  #issue(op: Exclude<OpName, "read">, rows: number): void {
    try {
      this.#run(op, rows);
    } catch (error) {
      throw new Error(`${op} on ${rows} row${rows === 1 ? "" : "s"} threw: ${messageOf(error)}`);
    }
  }

  /** Waits for the work issued (backends that queue work report its failures here). */
  async #sync(what: string): Promise<void> {
    try {
      await this.#be.read(this.#b.logits, 0, 1);
    } catch (error) {
      throw new Error(`${what} failed: ${messageOf(error)}`);
    }
  }

  /** Issues operation `op` on `rows` tokens, as the model does. */
  #run(op: Exclude<OpName, "read">, rows: number): void {
    const b = this.#b;
    if (op === "lm_head") {
      const head = { lmHead: b.lmHead, normF: b.norm };
      return projectLogits(this.#be, this.#c, b.logits, b.hidden, head, 1);
    }
    const sequences = { conv: b.convState, ssm: b.ssmState, len: rows, batch: 1 };
    blockOp(this.#be, this.#c, op, this.#weights, this.#activations, sequences);
  }

  /**
   * Issues `op` `reps` times and waits until the work is done (by reading one
   * float; "sync" issues nothing); "read" copies a step's logits row to the
   * host `reps` times.
   */
  async round(op: BenchOp, rows: number, reps: number): Promise<void> {
    if (op === "read") {
      for (let i = 0; i < reps; i++) await this.#be.read(this.#b.logits);
      return;
    }
    if (op !== "sync") {
      for (let i = 0; i < reps; i++) this.#issue(op, rows);
    }
    await this.#sync(op === "sync" ? "Waiting for the backend" : `${op} on ${rows} rows`);
  }

  /** Gives every buffer back. */
  release(): void {
    for (const buf of this.#buffers) this.#be.release(buf);
  }
}
