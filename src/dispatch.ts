/**
 * `backend: "auto"`: picks the backend a model runs on by running a short
 * real workload on each candidate, through the same decode engine that
 * `generate`, sessions and the edge server use.
 *
 * What is measured. On each backend that can run here (see
 * `./backends/registry.ts`), three small models with the real model's
 * dimensions are built: "head", with no Mamba block and the real vocabulary
 * (embedding, lm_head, sampling and the engine's work: all that does not
 * grow with depth, and what dominates decoding at small models); "base",
 * with no block and a vocabulary of {@link SMALL_VOCAB} ids; and "layers",
 * with {@link PROBE_LAYERS} blocks and the same small vocabulary, so that
 * what the blocks cost is the difference between the last two, undiluted by
 * the head (measured beside a full-size head, two blocks' time would drown
 * in its noise). Their weights are random, drawn as Mamba initialises them
 * so that activations stay in range, and rounded to f16 or bf16 where the
 * checkpoint's are (`halfWeights`), as a backend that keeps such matrices
 * 16-bit (webgpu, wasm) does so with the real ones; where a file keeps
 * its matrices as quantized blocks (`matrixBlocks`), the measured ones are
 * quantized the same way, so that a backend with kernels for the blocks
 * runs those kernels. On each model,
 * through {@link Session} and the model's {@link DecodeEngine}:
 *
 * - a prompt chunk: one session is fed {@link PREFILL_TOKENS} ids and its
 *   logits are read (`Session.prefill`), with one wait for the backend;
 * - a decode round: `batch` sessions (the streams the caller expects to run
 *   at once, default 1) each pick {@link DECODE_STEPS} ids with the default
 *   sampling options, on the backend, as `generate` does. Where the backend
 *   queues work on a device (webgpu), the engine runs them as one round of
 *   {@link DECODE_STEPS} steps with one read-back at its end, the shape its
 *   pipelined rounds take in a long generation; on the host backends it runs
 *   them as it always does, a step per round.
 *
 * Each is timed on the wall clock, the final read included. So is a wait for
 * the backend with nothing queued (`sync`: Deno's WebGPU read-back alone
 * costs ≥ 10 ms), which is taken out of each: in a long generation the
 * engine overlaps read-backs with the next round, so the fixed latency is
 * paid about once rather than per token, let alone per operation. The full
 * model's costs then follow by layers (runs less sync; decode rounds per
 * step, i.e. divided by {@link DECODE_STEPS}):
 *
 * ```text
 * prompt     = head prompt + nLayer · (layers prompt − base prompt) / PROBE_LAYERS
 * step       = head step   + nLayer · (layers step − base step) / PROBE_LAYERS
 * total (ms) = sync + batch · prompt + GENERATED_TOKENS · step
 * ```
 *
 * i.e. the estimated time to prompt `batch` streams with
 * {@link PREFILL_TOKENS} ids each and then generate {@link GENERATED_TOKENS}
 * ids for each, decoding them together. Each model's runs are warmed up
 * first, untimed (on a device at the measured prompt length and batch, as
 * pipelines compile on first use; on the host shorter, which is enough for
 * the JavaScript engine to optimise the kernels).
 *
 * Noise. Each run is repeated while it is short (until {@link RUN_MS} is
 * spent) and its fastest time counts, as contention only ever adds time. A
 * repetition times every run once on every candidate still in the running,
 * in alternating order, and gives one estimate per candidate; repetitions go
 * on until the ranking is clear, {@link MAX_REPETITIONS} are done, or
 * {@link REPEAT_BUDGET_MS} has passed since the first. The ranking is clear
 * when every other candidate either stopped being measured, sure to be
 * slower than the leader's worst estimate, or is slower than the leader by
 * the rule of {@link verdict}: a rank test on the two sets of estimates, or
 * a margin far beyond their spread. A candidate stops being measured, as it
 * cannot win, once its runs so far put it beyond {@link FIRST_ROUND_FACTOR}
 * times another's worst estimate (in the first repetition; each model only
 * adds to the estimate, and a host's decode round stops midway; a device's
 * cannot, so there short rounds come first) or once its best estimate is
 * beyond that (later {@link CLEARLY_SLOWER}) times the leader's worst. The
 * backend with the lowest median estimate wins; the decision is cached (in
 * memory and, where the runtime has a usable `localStorage`, across runs)
 * only when the ranking was clear: a choice inside the noise is measured
 * again next time.
 *
 * One backend runs the whole model rather than the fastest one per
 * operation: a model's weights live in one backend's buffers (WASM memory,
 * GPU buffers), so mixing would copy activations across every layer and keep
 * the weights twice.
 *
 * A backend that fails to initialise, or whose work throws while it is
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
import { convChannels, type MambaConfig } from "./config.ts";
import { engineFor } from "./engine.ts";
import type { Mamba2LayerWeights } from "./mamba2.ts";
import { MambaModel } from "./model.ts";
import { Sampler } from "./sampler.ts";
import { Session } from "./session.ts";
import type { HostWeights, LayerWeights } from "./weights.ts";
import {
  BLOCK_ELEMENTS,
  type BlockType,
  type HalfFormat,
  halfMatrix,
  type HostMatrix,
  quantizedMatrix,
} from "./quant.ts";
import { quantize, QUANTIZED_TYPES } from "./gguf_write.ts";
import { f32BitsToBf16, packHalves } from "./safetensors.ts";
import { checkPositiveInteger } from "./errors.ts";

/** Prompt ids per stream of the scored workload, and of the measured prompt chunk. */
export const PREFILL_TOKENS = 64;
/** Generated ids per stream of the scored workload (the CLI's default `-n` is 128). */
export const GENERATED_TOKENS = 128;
/** Steps of the measured decode round. */
export const DECODE_STEPS = 16;
/** Blocks of the layers model (fewer where the model has fewer). */
export const PROBE_LAYERS = 2;
/** Vocabulary of the base and layers models (the real one where smaller). */
export const SMALL_VOCAB = 64;

/** The rank test's threshold for calling the runner-up slower (see {@link verdict}). */
const RANK_TEST_ALPHA = 0.01;
/**
 * Or, after this many repetitions each, the runner-up is slower when all its
 * estimates are above all the leader's and the margin between the medians
 * is {@link SPREADS_APART} times the larger relative spread ((max − min) /
 * median) of the two.
 */
const MIN_REPETITIONS = 3;
const SPREADS_APART = 2;
/** Repetitions at most. */
const MAX_REPETITIONS = 9;
/**
 * Repetitions after the first (which always runs) stop once they have taken
 * this long (ms).
 */
const REPEAT_BUDGET_MS = 6000;
/**
 * In the first repetition, a candidate stops being measured once its runs
 * put it beyond this many times the lowest worst estimate of the others, or
 * its estimate is beyond this many times the leader's worst.
 */
const FIRST_ROUND_FACTOR = 3;
/** Later, once its best estimate is beyond this many times the leader's worst. */
const CLEARLY_SLOWER = 2;
/** Prompt ids of the host backends' warm-up runs. */
const WARM_UP_PROMPT = 16;
/** Decode steps of the host backends' warm-up runs (on a device: one). */
const WARM_UP_STEPS = 4;
/** Steps of the short round that tells whether a device candidate is worth a full one. */
const SHORT_ROUND_STEPS = 4;
/**
 * Within a repetition, each run is repeated until it has taken this long in
 * all (ms), and its fastest time counts: a short run is easily stretched by
 * a moment of contention.
 */
const RUN_MS = 40;
/** …but at most this many times. */
const MAX_RUN_REPEATS = 5;
/** Part of every cache key: bump it when kernels or the measurement change. */
const CACHE_VERSION = 6;
const CACHE_PREFIX = "mamba-deno/backend/";

/** Where "auto" keeps its decisions: `localStorage` or anything with the same two methods. */
export interface BackendCache {
  /** The stored value, or null. */
  getItem(key: string): string | null;
  /** Stores a value. */
  setItem(key: string, value: string): void;
}

/**
 * The wall-clock times of a candidate's runs (medians over its
 * repetitions), in ms. The arrays hold the three measured models: "head" (no
 * blocks, the real vocabulary), "base" (no blocks, `smallVocab` ids) and
 * "layers" (`layers` blocks, `smallVocab` ids).
 */
export interface MeasuredRuns {
  /** A wait for the backend with nothing queued. */
  syncMs: number;
  /** Blocks of the layers model. */
  layers: number;
  /** Vocabulary of the base and layers models. */
  smallVocab: number;
  /** Feeding one session {@link PREFILL_TOKENS} ids and reading its logits, per model. */
  promptMs: [number, number, number];
  /** `batch` sessions picking {@link DECODE_STEPS} ids each (one round on a device), per model. */
  decodeMs: [number, number, number];
}

/** One backend in a {@link BackendReport}. */
export interface CandidateReport {
  /** Backend name. */
  name: string;
  /** Whether it could run this model (false: not here, failed to start, or its work threw). */
  available: boolean;
  /** Why it is not available, or why its measurement stopped early. */
  reason?: string;
  /** What it runs on: adapter or threads. */
  device?: string;
  /** What was timed (medians over the repetitions); see {@link MeasuredRuns}. */
  measured?: MeasuredRuns;
  /** Estimated time of the workload's prompts on the full model: `batch` × {@link PREFILL_TOKENS} ids. */
  prefillMs?: number;
  /** Estimated time of the workload's decoding on the full model: {@link GENERATED_TOKENS} steps at `batch`. */
  decodeMs?: number;
  /**
   * The score, the median over repetitions of sync + prefill + decode
   * (a lower bound where {@link stoppedEarly}).
   */
  totalMs?: number;
  /** The lowest and highest estimate of `totalMs` over the repetitions. */
  totalRangeMs?: [number, number];
  /** Repetitions measured to the end. */
  repetitions?: number;
  /** Prompt ids per second of one stream on the full model. */
  prefillTokensPerSecond?: number;
  /** Generated ids per second, all `batch` streams together, on the full model. */
  decodeTokensPerSecond?: number;
  /** Whether its measurement stopped once it could no longer win; `totalMs` is then a lower bound. */
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
  /** Why this backend, in a sentence or two. */
  reason: string;
  /** Every backend considered, with its measurements. */
  candidates: CandidateReport[];
  /** Wall time of the measurement that made the decision (0 when nothing was measured). */
  measureMs: number;
  /** Streams the workload decodes at once ("auto" only). */
  batch?: number;
  /**
   * Whether the winner's margin was clear of the measurements' noise ("auto"
   * only); a decision that is not is never cached.
   */
  clear?: boolean;
}

/**
 * Which of a model's matrices a file keeps as quantized blocks, and in which
 * format: those of the Mamba-1 blocks (each whose rows are whole blocks; a
 * quantizer leaves the others, such as a dt_proj of 48 columns, in 16 bits),
 * and the embedding, which is also the tied lm_head. Null: float.
 */
export interface MatrixBlocks {
  /** The blocks' in_proj, x_proj, dt_proj and out_proj. */
  layers: BlockType | null;
  /** The embedding and lm_head. */
  head: BlockType | null;
}

/** Options of {@link selectBackend}. */
export interface SelectOptions extends BackendOptions {
  /**
   * Streams the model is expected to decode at once (default 1): the batch of
   * the measured decode round. A server passes its concurrency.
   */
  batch?: number;
  /**
   * The 16-bit format the checkpoint's matrices were stored in (F16, BF16),
   * or null: the measured weights are then rounded to it too, as a backend
   * may keep such matrices 16-bit.
   */
  halfWeights?: HalfFormat | null;
  /**
   * The block formats of a quantized file's matrices (see
   * {@link MatrixBlocks}): the measured matrices are quantized alike.
   */
  matrixBlocks?: MatrixBlocks;
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

/** `batch` (streams expected to decode at once), 1 if undefined; a RangeError unless a positive integer. */
export function checkedBatch(batch: number | undefined): number {
  return batch === undefined ? 1 : checkPositiveInteger("batch", batch);
}

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
  const batch = checkedBatch(options.batch);

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
    reports[index] = {
      name: reports[index].name,
      device: reports[index].device,
      available: false,
      reason,
    };
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
  const halfWeights = options.halfWeights ?? null;
  const matrixBlocks = options.matrixBlocks ?? { layers: null, head: null };
  const key = cacheKey(config, reports, batch, halfWeights, matrixBlocks);
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
  let outcome: Outcome = { ranked: runnable, clear: true, reason: "" };
  if (runnable.length > 1) {
    outcome = await measureCandidates(runnable, reports, config, {
      batch,
      halfWeights,
      matrixBlocks,
      create,
      passOver,
    });
  }
  let best: Backend | undefined;
  let chosen = -1;
  for (const index of outcome.ranked) {
    best = await create(index);
    chosen = index;
    if (best) break;
  }
  if (!best) {
    const reasons = reports.map((r) => `${r.name}: ${r.reason}`).join("; ");
    throw new Error(`No backend can run this model (${reasons})`);
  }
  // The winner may have failed to start again after measuring: then the
  // next one runs, and the decision is not one to keep.
  const asRanked = chosen === outcome.ranked[0];
  const report: BackendReport = {
    chosen: reports[chosen].name,
    mode: "auto",
    cached: false,
    reason: asRanked && outcome.reason
      ? outcome.reason
      : reports[chosen].totalMs === undefined
      ? "The only backend that can run here"
      : `${reports[chosen].name} runs it: the backends measured faster could not start again`,
    candidates: reports,
    measureMs: performance.now() - started,
    batch,
    clear: outcome.clear && asRanked,
  };
  if (report.clear) {
    try {
      storage?.setItem(key, JSON.stringify(report));
    } catch {
      // Full or refused storage only means measuring again next time.
    }
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
 * threads), the runtime, the model's dimensions and weights' precision, the
 * workload and batch, and the version.
 */
function cacheKey(
  config: MambaConfig,
  reports: readonly CandidateReport[],
  batch: number,
  halfWeights: HalfFormat | null,
  matrixBlocks: MatrixBlocks,
): string {
  const { dModel, dInner, dState, dtRank, dConv, nLayer, vocabSize, projBias, convBias } = config;
  return CACHE_PREFIX + JSON.stringify({
    version: CACHE_VERSION,
    runtime: (globalThis.navigator as Navigator | undefined)?.userAgent ?? "",
    backends: reports.filter((r) => r.available).map((r) => `${r.name}: ${r.device}`),
    shape: [dModel, dInner, dState, dtRank, dConv, nLayer, vocabSize, projBias, convBias],
    halfWeights,
    matrixBlocks: [matrixBlocks.layers, matrixBlocks.head],
    workload: [PREFILL_TOKENS, GENERATED_TOKENS, DECODE_STEPS, batch],
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

/** The report as text for a terminal: the choice, why, each candidate and the measurements. */
export function formatBackendReport(report: BackendReport): string {
  const how = report.mode === "explicit"
    ? "named explicitly"
    : report.cached
    ? `auto, reusing a decision measured earlier in ${formatMs(report.measureMs)}`
    : `auto, measured in ${formatMs(report.measureMs)}${
      report.clear === false ? ", inside the noise: not cached" : ""
    }`;
  const lines = [`backend ${report.chosen} (${how})`, `  why: ${report.reason}`];
  for (const c of report.candidates) {
    const state = c.available ? c.device ?? "available" : "not available";
    lines.push(`  ${c.name}: ${state}${c.reason ? `. ${c.reason}` : ""}`);
  }
  const measured = report.candidates.filter((c) => c.measured || c.totalMs !== undefined);
  if (measured.length === 0) return lines.join("\n");
  const cell = (value: string) => value.padStart(15);
  const row = (label: string, values: string[]) =>
    `  ${label.padEnd(32)}${values.map(cell).join("")}`;
  const ms = (value: number | undefined) => value === undefined ? "-" : formatNumber(value);
  const runs = (pick: (m: MeasuredRuns) => number) =>
    measured.map((c) => c.measured ? ms(pick(c.measured)) : "-");
  const batch = report.batch ?? 1;
  const shape = measured.find((c) => c.measured)?.measured;
  lines.push(row("ms, wall clock", measured.map((c) => c.name)));
  lines.push(row("sync (idle wait)", runs((m) => m.syncMs)));
  const models = ["head", "base", "layers"];
  for (const [i, model] of models.entries()) {
    lines.push(row(`prompt ${PREFILL_TOKENS} ids, ${model} model`, runs((m) => m.promptMs[i])));
  }
  for (const [i, model] of models.entries()) {
    lines.push(
      row(`decode ${DECODE_STEPS} × ${batch}, ${model} model`, runs((m) => m.decodeMs[i])),
    );
  }
  const bound = (c: CandidateReport, value: number | undefined) =>
    c.stoppedEarly || value === undefined ? "-" : formatNumber(value);
  lines.push(
    row("full model: prefill tok/s", measured.map((c) => bound(c, c.prefillTokensPerSecond))),
  );
  lines.push(
    row(
      `full model: decode tok/s at ${batch}`,
      measured.map((c) => bound(c, c.decodeTokensPerSecond)),
    ),
  );
  lines.push(
    row(
      `est. ms, ${batch} × (${PREFILL_TOKENS} + ${GENERATED_TOKENS} ids)`,
      measured.map((c) =>
        c.totalMs === undefined ? "-" : `${c.stoppedEarly ? "≥ " : ""}${ms(c.totalMs)}`
      ),
    ),
  );
  lines.push(
    row(
      "  range over repetitions",
      measured.map((c) =>
        c.totalRangeMs ? `${ms(c.totalRangeMs[0])}-${ms(c.totalRangeMs[1])}` : "-"
      ),
    ),
  );
  lines.push(row("  repetitions", measured.map((c) => String(c.repetitions ?? 0))));
  if (shape) {
    lines.push(
      `  (head model: no blocks, the full vocabulary; base: no blocks, ${shape.smallVocab} ids; ` +
        `layers: ${shape.layers} blocks, ${shape.smallVocab} ids)`,
    );
  }
  return lines.join("\n");
}

/**
 * Indices of the runnable candidates in the order they are measured first:
 * wasm first, as it is quick and sets the bar that stops hopeless candidates
 * early; then the others in registry order.
 */
function measureOrder(reports: readonly CandidateReport[]): number[] {
  const runnable = reports.flatMap((report, i) => report.available ? [i] : []);
  const first = runnable.filter((i) => reports[i].name === "wasm");
  return [...first, ...runnable.filter((i) => !first.includes(i))];
}

function formatMs(value: number): string {
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${formatNumber(value)} ms`;
}

function formatNumber(value: number): string {
  if (value >= 100) return Math.round(value).toLocaleString("en-US");
  return value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

// ---- measuring ------------------------------------------------------------------------------

/** The ranking that measuring produced. */
interface Outcome {
  /** Candidate indices to try, best first. */
  ranked: number[];
  /** Whether the first one's lead is clear of the noise. */
  clear: boolean;
  /** Why it leads, as the report says it. */
  reason: string;
}

/** What {@link measureCandidates} needs from {@link selectBackend}. */
interface MeasureContext {
  batch: number;
  halfWeights: HalfFormat | null;
  matrixBlocks: MatrixBlocks;
  create(index: number): Promise<Backend | undefined>;
  passOver(index: number, reason: string): void;
}

/** The dimensions of what is measured. */
interface Shape {
  config: MambaConfig;
  /** Blocks of the layers model. */
  probeLayers: number;
  /** Vocabulary of the base and layers models. */
  smallVocab: number;
  batch: number;
}

/** The measured models, in the order of {@link MeasuredRuns}' arrays. */
const HEAD = 0;
const BASE = 1;
const LAYERS = 2;

/** One repetition's runs on a candidate, in ms, as in {@link MeasuredRuns}. */
interface Runs {
  syncMs: number;
  promptMs: [number, number, number];
  decodeMs: [number, number, number];
}

/** The full model's estimated costs from one repetition. */
interface Estimate {
  /** One stream's prompt of {@link PREFILL_TOKENS} ids. */
  promptMs: number;
  /** One decode step of `batch` streams. */
  stepMs: number;
  /** `batch` prompts. */
  prefillMs: number;
  /** {@link GENERATED_TOKENS} steps. */
  decodeMs: number;
  /** sync + prefill + decode. */
  totalMs: number;
}

/** A candidate being measured. */
interface Contender {
  index: number;
  name: string;
  bench: EngineBench<unknown>;
  runs: Runs[];
  estimates: Estimate[];
}

/** Thrown inside a repetition once the candidate is sure to lose. */
class Hopeless extends Error {
  constructor(readonly lowerBoundMs: number, readonly after: string) {
    super(`Hopeless after ${after}`);
  }
}

/**
 * Measures the candidates `runnable` (indices into `reports`, which it fills
 * in) and ranks them; see the module documentation.
 */
async function measureCandidates(
  runnable: number[],
  reports: CandidateReport[],
  config: MambaConfig,
  context: MeasureContext,
): Promise<Outcome> {
  const { batch } = context;
  /** When the first repetition ended. */
  let firstDone = Infinity;
  const probeLayers = Math.min(PROBE_LAYERS, config.nLayer);
  const shape: Shape = {
    config,
    probeLayers,
    smallVocab: Math.min(SMALL_VOCAB, config.vocabSize),
    batch,
  };
  const weights = probeWeights(shape, context.halfWeights, context.matrixBlocks);
  const contenders: Contender[] = [];
  /** Candidates that stopped being measured, with their lower bound. */
  const stopped = new Map<number, number>();
  try {
    for (let repetition = 1; repetition <= MAX_REPETITIONS; repetition++) {
      const factor = repetition === 1 ? FIRST_ROUND_FACTOR : CLEARLY_SLOWER;
      // The first repetition goes in measuring order (wasm first), then the
      // order alternates so that a slow spell does not always hit the same one.
      const order = repetition === 1
        ? runnable
        : repetition % 2 === 0
        ? contenders.map((c) => c.index).reverse()
        : contenders.map((c) => c.index);
      for (const index of order) {
        if (stopped.has(index)) continue;
        let contender = contenders.find((c) => c.index === index);
        try {
          if (!contender) {
            const backend = await context.create(index);
            if (!backend) continue;
            const bench = new EngineBench(backend, weights, shape);
            contender = { index, name: reports[index].name, bench, runs: [], estimates: [] };
            contenders.push(contender);
          }
          // It stops once it is sure to take `factor` times the worst estimate
          // of the candidate whose worst is lowest (the bar).
          const bar = lowestWorst(contenders.filter((c) => c !== contender));
          const limit = bar ? factor * worst(bar) : Infinity;
          // Past the budget a repetition stops, except the first: every
          // candidate gets an estimate.
          const budgetEnd = repetition === 1 ? Infinity : firstDone + REPEAT_BUDGET_MS;
          try {
            const runs = await contender.bench.repetition(limit, budgetEnd);
            if (!runs) break; // Out of time: this repetition is not counted.
            contender.runs.push(runs);
            contender.estimates.push(estimateOf(runs, shape));
          } catch (error) {
            if (!(error instanceof Hopeless)) throw error;
            stopped.set(index, error.lowerBoundMs);
            contenders.splice(contenders.indexOf(contender), 1);
            contender.bench.dispose();
            // Its completed repetitions, if any, stay in the report.
            fillReport(reports[index], contender, shape);
            reports[index].stoppedEarly = true;
            reports[index].totalMs = Math.max(
              error.lowerBoundMs,
              contender.estimates.length > 0 ? median(totals(contender)) : 0,
            );
            reports[index].reason = `Measurement stopped after ${error.after}: its runs so ` +
              `far put it at ${formatMs(error.lowerBoundMs)} or more, over ${factor} times ` +
              `${bar!.name}'s worst estimate, ${formatMs(worst(bar!))}`;
          }
        } catch (error) {
          stopped.set(index, Infinity);
          context.passOver(index, `Failed while being measured: ${messageOf(error)}`);
          if (contender) {
            contenders.splice(contenders.indexOf(contender), 1);
            contender.bench.dispose();
          }
        }
      }
      // Those whose best is far beyond the leader's worst cannot win.
      const leader = leaderOf(contenders);
      for (const contender of [...contenders]) {
        if (!leader || contender === leader || contender.estimates.length === 0) continue;
        const best = Math.min(...totals(contender));
        if (best > factor * worst(leader)) {
          stopped.set(contender.index, best);
          contenders.splice(contenders.indexOf(contender), 1);
          contender.bench.dispose();
          fillReport(reports[contender.index], contender, shape);
          reports[contender.index].reason = `Measurement stopped after ${repetition} ` +
            `repetition${repetition === 1 ? "" : "s"}: its best estimate, ${formatMs(best)}, is ` +
            `over ${factor} times ${leader.name}'s worst, ${formatMs(worst(leader))}`;
        }
      }
      if (verdict(contenders, stopped).clear) break;
      if (repetition === 1) firstDone = performance.now();
      if (performance.now() - firstDone > REPEAT_BUDGET_MS) break;
    }
  } finally {
    // The winner is created afresh: memory a backend took for measuring
    // (wasm memory never shrinks) must not stay with the model.
    for (const contender of contenders) contender.bench.dispose();
  }
  const sorted = contenders
    .filter((c) => c.estimates.length > 0)
    .sort((a, b) => median(totals(a)) - median(totals(b)));
  for (const contender of sorted) fillReport(reports[contender.index], contender, shape);
  const ranked = [
    ...sorted.map((c) => c.index),
    // Then those that stopped early, best bound first, in case the measured ones cannot start again.
    ...[...stopped].filter(([i]) => reports[i].available).sort((a, b) => a[1] - b[1]).map(([i]) =>
      i
    ),
  ];
  const { clear, why } = verdict(contenders, stopped);
  return {
    ranked,
    clear,
    reason: sorted.length > 0 ? explain(sorted, reports, stopped, clear, why) : "",
  };
}

/** The contender whose worst estimate is lowest. */
function lowestWorst(contenders: readonly Contender[]): Contender | undefined {
  let best: Contender | undefined;
  for (const c of contenders) {
    if (c.estimates.length > 0 && (!best || worst(c) < worst(best))) best = c;
  }
  return best;
}

/** The contender with the lowest median estimate. */
function leaderOf(contenders: readonly Contender[]): Contender | undefined {
  let leader: Contender | undefined;
  for (const c of contenders) {
    if (c.estimates.length === 0) continue;
    if (!leader || median(totals(c)) < median(totals(leader))) leader = c;
  }
  return leader;
}

/**
 * Whether the leader's lead is clear: every candidate that stopped being
 * measured is sure to be slower than the leader's worst estimate, and the
 * runner-up, if any, is slower either by a rank test (Mann–Whitney's exact
 * test on the two sets of estimates, two-sided, at {@link RANK_TEST_ALPHA}:
 * it counts the pairs where the leader was not the faster one and asks how
 * likely so few would be if both were as fast; it assumes nothing of the
 * noise's distribution and lets an outlier or two through, but needs five
 * repetitions each at least), or, sooner, by a margin far beyond the
 * spread (see {@link MIN_REPETITIONS}).
 */
function verdict(
  contenders: readonly Contender[],
  stopped: ReadonlyMap<number, number>,
): { clear: boolean; why: string } {
  const leader = leaderOf(contenders);
  if (!leader) return { clear: false, why: "" };
  const worstOfLeader = worst(leader);
  for (const bound of stopped.values()) {
    if (!(bound > worstOfLeader)) {
      return { clear: false, why: "a candidate stopped early is not sure to be slower" };
    }
  }
  if (contenders.some((c) => c.estimates.length === 0)) return { clear: false, why: "" };
  const runnerUp = contenders
    .filter((c) => c !== leader)
    .sort((a, b) => median(totals(a)) - median(totals(b)))[0];
  if (!runnerUp) {
    const why = stopped.size > 0
      ? "every other candidate stopped being measured, sure to be slower than its worst estimate" +
        " or unable to run"
      : "";
    return { clear: true, why };
  }
  const ours = totals(leader);
  const theirs = totals(runnerUp);
  let inversions = 0;
  for (const a of ours) for (const b of theirs) if (a >= b) inversions++;
  const p = rankTestP(inversions, ours.length, theirs.length);
  const margin = median(theirs) / median(ours) - 1;
  const spread = Math.max(spreadOf(ours), spreadOf(theirs));
  const reps = Math.min(ours.length, theirs.length);
  const apart = inversions === 0 && reps >= MIN_REPETITIONS && margin > SPREADS_APART * spread;
  const why = `${leader.name} was faster in ${ours.length * theirs.length - inversions} of ` +
    `${ours.length * theirs.length} pairs of estimates against ${runnerUp.name} (rank test p = ` +
    `${p < 0.001 ? p.toExponential(1) : p.toFixed(3)}); median margin ${percent(margin)}, ` +
    `spread up to ${percent(spread)}`;
  return { clear: p <= RANK_TEST_ALPHA || apart, why };
}

/**
 * The two-sided p-value of Mann–Whitney's U: the chance that, with both
 * sets drawn from one distribution, at most `u` of the m·n pairs would go
 * the other way (exact, by counting rankings).
 */
function rankTestP(u: number, m: number, n: number): number {
  // ways[i][j][k]: rankings of i and j values with k inversions.
  const memo = new Map<string, number>();
  const ways = (i: number, j: number, k: number): number => {
    if (k < 0) return 0;
    if (i === 0 || j === 0) return k === 0 ? 1 : 0;
    const key = `${i},${j},${k}`;
    let value = memo.get(key);
    if (value === undefined) {
      // The largest value is one of the i (it is above all j: j inversions) or one of the j.
      value = ways(i - 1, j, k - j) + ways(i, j - 1, k);
      memo.set(key, value);
    }
    return value;
  };
  let below = 0;
  for (let k = 0; k <= u; k++) below += ways(m, n, k);
  let total = 1;
  for (let k = 1; k <= n; k++) total = (total * (m + k)) / k;
  return Math.min(1, (2 * below) / total);
}

/** Fills a measured candidate's report from its repetitions. */
function fillReport(report: CandidateReport, c: Contender, shape: Shape): void {
  if (c.estimates.length === 0) return;
  const med = (pick: (e: Estimate) => number) => median(c.estimates.map(pick));
  const runs = (pick: (r: Runs) => number[]) =>
    [HEAD, BASE, LAYERS].map((m) => median(c.runs.map((r) => pick(r)[m]))) as [
      number,
      number,
      number,
    ];
  const all = totals(c);
  report.measured = {
    syncMs: median(c.runs.map((r) => r.syncMs)),
    layers: shape.probeLayers,
    smallVocab: shape.smallVocab,
    promptMs: runs((r) => r.promptMs),
    decodeMs: runs((r) => r.decodeMs),
  };
  report.prefillMs = med((e) => e.prefillMs);
  report.decodeMs = med((e) => e.decodeMs);
  report.totalMs = median(all);
  report.totalRangeMs = [Math.min(...all), Math.max(...all)];
  report.repetitions = c.estimates.length;
  const promptMs = med((e) => e.promptMs);
  const stepMs = med((e) => e.stepMs);
  report.prefillTokensPerSecond = promptMs > 0 ? (PREFILL_TOKENS / promptMs) * 1000 : Infinity;
  report.decodeTokensPerSecond = stepMs > 0 ? (shape.batch / stepMs) * 1000 : Infinity;
}

/** The report's reason: the winner's figures against the others', and whether the lead is clear. */
function explain(
  sorted: readonly Contender[],
  reports: readonly CandidateReport[],
  stopped: ReadonlyMap<number, number>,
  clear: boolean,
  why: string,
): string {
  const winner = reports[sorted[0].index];
  const others = [
    ...sorted.slice(1).map((c) => reports[c.index]),
    ...[...stopped.keys()].map((i) => reports[i]).filter((r) =>
      r.available && r.totalMs !== undefined
    ),
  ].sort((a, b) => a.totalMs! - b.totalMs!).map((r) =>
    `${r.name} ${r.stoppedEarly ? "≥ " : ""}${formatMs(r.totalMs!)} (${
      (r.totalMs! / winner.totalMs!).toFixed(1)
    }×)`
  );
  const batch = sorted[0].bench.batch;
  const head = `Lowest estimated time for ${batch === 1 ? "a" : `${batch} streams each with a`} ` +
    `${PREFILL_TOKENS}-id prompt and ${GENERATED_TOKENS} generated ids${
      batch === 1 ? "" : ` (decoded at batch ${batch})`
    }: ${winner.name} ${formatMs(winner.totalMs!)} (prefill ` +
    `${formatNumber(winner.prefillTokensPerSecond!)} tok/s, decode ` +
    `${formatNumber(winner.decodeTokensPerSecond!)} tok/s)` +
    (others.length ? `, against ${others.join(", ")}` : "");
  if (clear) return `${head}. Clear of the noise${why ? `: ${why}` : ""}`;
  return `${head}. Inside the noise (${why}): picked the lower median, not cached`;
}

function totals(c: Contender): number[] {
  return c.estimates.map((e) => e.totalMs);
}

function worst(c: Contender): number {
  return Math.max(...totals(c));
}

/** (max − min) / median. */
function spreadOf(values: readonly number[]): number {
  return (Math.max(...values) - Math.min(...values)) / median(values);
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function percent(value: number): string {
  return `${(value * 100).toFixed(value < 0.1 ? 1 : 0)}%`;
}

/** The full model's costs from one repetition's runs; see the module documentation. */
function estimateOf(runs: Runs, { config, probeLayers, batch }: Shape): Estimate {
  const { syncMs } = runs;
  const prompt = runs.promptMs.map((ms) => Math.max(0, ms - syncMs));
  const step = runs.decodeMs.map((ms) => Math.max(0, ms - syncMs) / DECODE_STEPS);
  const n = config.nLayer;
  const promptMs = prompt[HEAD] + n * Math.max(0, (prompt[LAYERS] - prompt[BASE]) / probeLayers);
  const stepMs = step[HEAD] + n * Math.max(0, (step[LAYERS] - step[BASE]) / probeLayers);
  const prefillMs = batch * promptMs;
  const decodeMs = GENERATED_TOKENS * stepMs;
  return { promptMs, stepMs, prefillMs, decodeMs, totalMs: syncMs + prefillMs + decodeMs };
}

/**
 * Weights of the measured models, in {@link EngineBench}'s order: random,
 * drawn as Mamba initialises them (as `bench/make_random_model.ts` does) so
 * that activations stay in range and every logit is finite, with tied heads.
 * With `half`, the matrices hold f16 or bf16 values; with `blocks`, those it
 * names are quantized.
 */
function probeWeights(
  shape: Shape,
  half: HalfFormat | null,
  blocks: MatrixBlocks,
): HostWeights[] {
  const { config, probeLayers, smallVocab } = shape;
  const { dModel, dInner, dState, dtRank, dConv, vocabSize, projBias, convBias } = config;
  let s = 0x9e3779b9;
  const f16 = (Math as { f16round?: (x: number) => number }).f16round;
  const rand = (length: number, scale: number, matrix = false) => {
    const out = new Float32Array(length);
    for (let i = 0; i < length; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      out[i] = ((s >>> 0) / 4294967296 * 2 - 1) * scale;
    }
    if (half === "f16" && matrix && f16) {
      for (let i = 0; i < length; i++) out[i] = f16(out[i]);
    } else if (half === "bf16" && matrix) {
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < length; i++) bits[i] = f32BitsToBf16(bits[i]) << 16;
    }
    return out;
  };
  /**
   * A random matrix [rows, cols], as `blocks` of `type` where its rows are whole blocks, else
   * 16-bit with `half`.
   */
  const matrix = (rows: number, cols: number, scale: number, type: BlockType | null) => {
    const values = rand(rows * cols, scale, true);
    if (type && cols % BLOCK_ELEMENTS[type] === 0) {
      return quantizedMatrix(type, rows, cols, quantize(QUANTIZED_TYPES[type], values), "probe");
    }
    const halves = half && packHalves(values, half);
    return halves
      ? halfMatrix(half!, rows, cols, halves.subarray(0, values.length), "probe")
      : values;
  };
  const ones = (n: number) => new Float32Array(n).fill(1);
  // Inverse softplus of steps spread log-uniformly over [0.001, 0.1].
  const stepBias = (n: number) =>
    rand(n, 1).map((r) => {
      const dt = Math.exp(Math.log(0.001) + (r + 1) / 2 * (Math.log(0.1) - Math.log(0.001)));
      return dt + Math.log(-Math.expm1(-dt));
    });
  const mamba2Block = (heads: number): Mamba2LayerWeights<Float32Array> => {
    const convDim = convChannels(config);
    const inRows = dInner + convDim + heads;
    return {
      norm: ones(dModel),
      inProj: rand(inRows * dModel, 1 / Math.sqrt(dModel), true),
      inProjBias: projBias ? rand(inRows, 0.1) : null,
      convWeight: rand(convDim * dConv, 1 / Math.sqrt(dConv)),
      convBias: convBias ? rand(convDim, 0.1) : null,
      dtBias: stepBias(heads),
      A: Float32Array.from({ length: heads }, (_, h) => -(1 + (h % 16))),
      D: ones(heads),
      gatedNorm: ones(dInner),
      outProj: rand(dModel * dInner, 1 / Math.sqrt(dInner) / config.nLayer, true),
      outProjBias: projBias ? rand(dModel, 0.1) : null,
    };
  };
  const layerType = blocks.layers;
  const block = (): LayerWeights<Float32Array, HostMatrix> | Mamba2LayerWeights<Float32Array> => {
    if (config.mamba2) return mamba2Block(config.mamba2.nHeads);
    const A = new Float32Array(dInner * dState);
    for (let i = 0; i < A.length; i++) A[i] = -(1 + (i % dState));
    const dtProjBias = stepBias(dInner);
    return {
      norm: ones(dModel),
      inProj: matrix(2 * dInner, dModel, 1 / Math.sqrt(dModel), layerType),
      inProjBias: projBias ? rand(2 * dInner, 0.1) : null,
      convWeight: rand(dInner * dConv, 1 / Math.sqrt(dConv)),
      convBias: convBias ? rand(dInner, 0.1) : null,
      xProj: matrix(dtRank + 2 * dState, dInner, 1 / Math.sqrt(dInner), layerType),
      dtProj: matrix(dInner, dtRank, 1 / Math.sqrt(dtRank), layerType),
      dtProjBias,
      A,
      D: ones(dInner),
      outProj: matrix(dModel, dInner, 1 / Math.sqrt(dInner) / config.nLayer, layerType),
      outProjBias: projBias ? rand(dModel, 0.1) : null,
    };
  };
  const model = (vocab: number, layers: HostWeights["layers"]): HostWeights => {
    const embedding = matrix(vocab, dModel, 0.1, blocks.head);
    return { embedding, lmHead: embedding, normF: ones(dModel), layers };
  };
  const small = model(smallVocab, Array.from({ length: probeLayers }, block));
  return [model(vocabSize, []), { ...small, layers: [] }, small];
}

/**
 * The measured models on one backend and the runs of a repetition on them,
 * through sessions and the decode engine: "head" has no blocks and the real
 * vocabulary (embedding, lm_head, sampling and the engine's work: what does
 * not grow with depth); "base" has no blocks and a small vocabulary, and
 * "layers" {@link Shape.probeLayers} blocks and the same small vocabulary,
 * so that their difference is what the blocks cost, undiluted by the head.
 */
class EngineBench<Buf> {
  readonly backend: Backend<Buf>;
  readonly batch: number;
  readonly #models: MambaModel<Buf>[];
  readonly #prompts: Int32Array[];
  readonly #idle: Buf;
  readonly #shape: Shape;
  #seed = 1;
  #disposed = false;
  /** The runs warmed up: `model:decode`. */
  readonly #warm = new Set<string>();
  /** Whether the short rounds of {@link #screen} have passed. */
  #screened = false;

  constructor(backend: Backend<Buf>, weights: HostWeights[], shape: Shape) {
    this.backend = backend;
    this.batch = shape.batch;
    this.#shape = shape;
    const { config } = shape;
    try {
      this.#models = weights.map((w) => {
        const vocabSize = w.embedding instanceof Float32Array
          ? w.embedding.length / config.dModel
          : w.embedding.rows;
        const model = new MambaModel(backend, { ...config, nLayer: w.layers.length, vocabSize }, w);
        // On a device, the measured round is one round of DECODE_STEPS steps.
        engineFor(model, backend.queued ? { roundSteps: DECODE_STEPS } : undefined);
        return model;
      });
      this.#idle = backend.zeros(1);
    } catch (error) {
      backend.dispose();
      throw error;
    }
    this.#prompts = this.#models.map(({ config: { vocabSize } }) =>
      Int32Array.from({ length: PREFILL_TOKENS }, (_, i) => (i * 7919 + 13) % vocabSize)
    );
  }

  /**
   * One repetition: the idle wait, then the head model's decode round and
   * prompt, the base model's, and the layers model's; each run is repeated
   * while it is short (see {@link RUN_MS}) and its fastest time counts.
   * Throws {@link Hopeless} as soon as the runs so far put the estimate
   * above `limitMs` (each model only adds to it); returns null when
   * `budgetEnd` (a `performance.now()` time) passes during a decode round.
   */
  async repetition(limitMs: number, budgetEnd: number): Promise<Runs | null> {
    const { batch, config, probeLayers } = this.#shape;
    await this.#warmUp(HEAD, true);
    const syncMs = await this.#fastest(() => this.#sync());
    const perStep = (ms: number) => Math.max(0, ms - syncMs) / DECODE_STEPS;
    const perPrompt = (ms: number) => Math.max(0, ms - syncMs);
    const check = (bound: number, after: string) => {
      if (bound > limitMs) throw new Hopeless(bound, after);
    };
    const decodeMs: [number, number, number] = [0, 0, 0];
    const promptMs: [number, number, number] = [0, 0, 0];
    if (this.backend.queued && limitMs < Infinity && !this.#screened) {
      await this.#screen(syncMs, limitMs);
    }
    // The full model does all the head model does, and more.
    const decodeHead = await this.#decodeChecked(HEAD, syncMs, GENERATED_TOKENS, 0, {
      syncMs,
      limitMs,
      budgetEnd,
      what: "head model",
    });
    if (decodeHead === null) return null;
    decodeMs[HEAD] = decodeHead;
    let bound = syncMs + GENERATED_TOKENS * perStep(decodeHead);
    await this.#warmUp(HEAD, false);
    promptMs[HEAD] = await this.#fastest(() => this.#promptRun(HEAD));
    bound += batch * perPrompt(promptMs[HEAD]);
    check(bound, "the runs of its head model");
    for (const decode of [true, false]) {
      await this.#warmUp(BASE, decode);
      if (decode) {
        decodeMs[BASE] = await this.#fastest(async () =>
          (await this.#decodeRun(BASE, DECODE_STEPS, batch)).ms
        );
      } else promptMs[BASE] = await this.#fastest(() => this.#promptRun(BASE));
    }
    // Then each block adds what the layers model adds to the base model.
    const perLayer = config.nLayer / probeLayers;
    await this.#warmUp(LAYERS, true);
    const decodeLayers = await this.#decodeChecked(
      LAYERS,
      bound,
      GENERATED_TOKENS * perLayer,
      perStep(decodeMs[BASE]),
      { syncMs, limitMs, budgetEnd, what: "layers model" },
    );
    if (decodeLayers === null) return null;
    decodeMs[LAYERS] = decodeLayers;
    bound += GENERATED_TOKENS * perLayer *
      Math.max(0, perStep(decodeLayers) - perStep(decodeMs[BASE]));
    check(bound, `the decode round of its layers model`);
    await this.#warmUp(LAYERS, false);
    promptMs[LAYERS] = await this.#fastest(() => this.#promptRun(LAYERS));
    return { syncMs, promptMs, decodeMs };
  }

  /**
   * For a device, whose decode round cannot stop midway: short rounds of
   * the three models first say whether the candidate is worth full ones.
   * Throws {@link Hopeless} when the decode estimate from them goes over
   * `limitMs` (their time per step is a little above a full round's, as a
   * round's own work is shared by fewer steps).
   */
  async #screen(syncMs: number, limitMs: number): Promise<void> {
    const { batch, config, probeLayers } = this.#shape;
    const perStep: number[] = [];
    for (const m of [HEAD, BASE, LAYERS]) {
      await this.#warmUp(m, true);
      const { ms } = await this.#decodeRun(m, SHORT_ROUND_STEPS, batch);
      perStep[m] = Math.max(0, ms - syncMs) / SHORT_ROUND_STEPS;
      const layers = m === LAYERS
        ? (config.nLayer / probeLayers) * Math.max(0, perStep[LAYERS] - perStep[BASE])
        : 0;
      const estimate = syncMs + GENERATED_TOKENS * (perStep[HEAD] + layers);
      if (estimate > limitMs) {
        throw new Hopeless(
          estimate,
          `${SHORT_ROUND_STEPS}-step decode rounds of its ${
            m === HEAD ? "head model" : "head, base and layers models"
          }`,
        );
      }
    }
    this.#screened = true;
  }

  /**
   * The fastest time of model `m`'s decode round, or null when `budgetEnd`
   * passed during the first. Throws {@link Hopeless} once the estimate,
   * `base + weight · max(0, time per step − less)`, goes over `limitMs`; on
   * the host the round stops at that point (a device's runs to its end).
   */
  async #decodeChecked(
    m: number,
    base: number,
    weight: number,
    less: number,
    { syncMs, limitMs, budgetEnd, what }: {
      syncMs: number;
      limitMs: number;
      budgetEnd: number;
      what: string;
    },
  ): Promise<number | null> {
    const { batch } = this.#shape;
    const queued = this.backend.queued;
    const hopelessAfter = queued || limitMs === Infinity
      ? Infinity
      : syncMs + DECODE_STEPS * (less + Math.max(0, limitMs - base) / weight);
    const first = await this.#decodeRun(
      m,
      DECODE_STEPS,
      batch,
      hopelessAfter,
      queued ? Infinity : budgetEnd,
    );
    const bound = base +
      weight * Math.max(0, Math.max(0, first.ms - syncMs) / DECODE_STEPS - less);
    if (bound > limitMs) {
      throw new Hopeless(
        bound,
        first.complete
          ? `the ${DECODE_STEPS}-step decode round of its ${what}`
          : `${first.steps} steps of the ${DECODE_STEPS}-step decode round of its ${what}`,
      );
    }
    if (!first.complete) return null;
    return await this.#fastest(
      async () => (await this.#decodeRun(m, DECODE_STEPS, batch)).ms,
      first.ms,
    );
  }

  /** Frees the backend (and with it the models). */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.backend.dispose();
  }

  /**
   * Runs model `m`'s decode round (`decode`) or prompt untimed, once: at the
   * measured prompt length and batch where the backend queues work
   * (pipelines compile on first use), else shorter (enough for the
   * JavaScript engine to optimise the kernels).
   */
  async #warmUp(m: number, decode: boolean): Promise<void> {
    const key = `${m}:${decode}`;
    if (this.#warm.has(key)) return;
    this.#warm.add(key);
    const queued = this.backend.queued;
    if (decode) await this.#decodeRun(m, queued ? 1 : WARM_UP_STEPS, queued ? this.batch : 1);
    else await this.#promptRun(m, queued ? PREFILL_TOKENS : WARM_UP_PROMPT);
    await this.#sync();
  }

  /**
   * The fastest of `run`'s times, run (after `first`, a time it already
   * took, if given) until {@link RUN_MS} is spent or {@link MAX_RUN_REPEATS}
   * times: a short run is easily stretched by a moment of contention.
   */
  async #fastest(run: () => Promise<number>, first?: number): Promise<number> {
    let best = first ?? await run();
    let spent = best;
    for (let i = 1; i < MAX_RUN_REPEATS && spent < RUN_MS; i++) {
      const ms = await run();
      best = Math.min(best, ms);
      spent += ms;
    }
    return best;
  }

  /** Milliseconds of a wait for the backend with nothing queued. */
  async #sync(): Promise<number> {
    const start = performance.now();
    await this.backend.read(this.#idle, 0, 1);
    return performance.now() - start;
  }

  /** Milliseconds to feed `tokens` ids to a new session of model `m` and read its logits. */
  async #promptRun(m: number, tokens = PREFILL_TOKENS): Promise<number> {
    const session = new Session(this.#models[m]);
    try {
      const start = performance.now();
      await session.prefill(this.#prompts[m].subarray(0, tokens));
      return performance.now() - start;
    } finally {
      session.dispose();
    }
  }

  /**
   * Milliseconds for `batch` sessions of model `m` to pick `steps` ids each
   * (after a first pick from their one-id prompts' logits, as a generation
   * starts), with the default sampling options; the sequences end early
   * once `maxMs` have passed, or `budgetEnd` (a `performance.now()` time).
   */
  async #decodeRun(
    m: number,
    steps: number,
    batch: number,
    maxMs = Infinity,
    budgetEnd = Infinity,
  ): Promise<{ ms: number; steps: number; complete: boolean }> {
    const model = this.#models[m];
    const prompt = this.#prompts[m];
    const sessions = Array.from({ length: batch }, () => new Session(model));
    try {
      // Untimed: each session gets the logits of a one-id prompt.
      await Promise.all(sessions.map((s, b) => s.prefill([prompt[b % prompt.length]])));
      let complete = true;
      const start = performance.now();
      const deadline = Math.min(budgetEnd, start + maxMs);
      const results = await Promise.all(sessions.map((s) =>
        s.decode({
          sampler: new Sampler({ seed: this.#seed++ }),
          maxTokens: steps + 1,
          judge: () => {
            if (performance.now() > deadline) {
              complete = false;
              return "stop-before";
            }
            return "continue";
          },
        })
      ));
      const ms = performance.now() - start;
      const picks = Math.max(...results.map((result) => result.ids.length));
      return { ms, steps: Math.max(0, picks - 1), complete };
    } finally {
      for (const s of sessions) s.dispose();
    }
  }
}
