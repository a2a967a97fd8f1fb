/**
 * Reads a Mamba `config.json` in either of the two layouts found in the wild:
 * transformers' `MambaConfig` (`hidden_size`, `num_hidden_layers`, `state_size`, ...)
 * and the original state-spaces one (`d_model`, `n_layer`, `ssm_cfg`, ...), and
 * turns it into one normalized {@link MambaConfig}.
 *
 * @example
 * ```ts
 * import { parseConfig } from "./config.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const config = parseConfig(
 *   { d_model: 768, n_layer: 24, vocab_size: 50277, pad_vocab_size_multiple: 8 },
 *   "config.json",
 * );
 * // Derived as mamba_ssm does: dInner = 2 * dModel, dtRank = dModel / 16, vocabulary padded to 8.
 * assertEquals([config.dInner, config.dtRank, config.vocabSize], [1536, 48, 50280]);
 * ```
 *
 * @module
 */

import { ModelFileError } from "./errors.ts";

/** The normalized model hyperparameters, named after the paper's symbols. */
export interface MambaConfig {
  /** D in the paper: width of the residual stream (`hidden_size`, `d_model`). */
  dModel: number;
  /** Number of Mamba blocks (`num_hidden_layers`, `n_layer`). */
  nLayer: number;
  /** N: size of each channel's SSM state (`state_size`, `d_state`). */
  dState: number;
  /** Width of the causal depthwise convolution (`conv_kernel`, `d_conv`). */
  dConv: number;
  /** E: expansion factor from dModel to dInner. */
  expand: number;
  /** E*D: number of SSM channels (`intermediate_size`). */
  dInner: number;
  /**
   * R: rank of the delta projection (`time_step_rank`; "auto" is ceil(dModel
   * / 16)). Mamba-2 has no delta projection: there it is H, dt's width.
   */
  dtRank: number;
  /** Rows of the embedding and of the logits (padded vocabulary). */
  vocabSize: number;
  /** Epsilon of every RMSNorm. */
  eps: number;
  /** Whether in_proj and out_proj carry biases (`use_bias`). */
  projBias: boolean;
  /** Whether the convolution carries a bias (`use_conv_bias`). */
  convBias: boolean;
  /** Whether lm_head shares the embedding's weights. */
  tieEmbeddings: boolean;
  /** End-of-sequence id, when the config names one. */
  eosTokenId?: number;
  /** Beginning-of-sequence id, when the config names one. */
  bosTokenId?: number;
  /**
   * Falcon-Mamba only (`model_type` "falcon_mamba"): epsilon of the
   * weightless RMSNorms on dt, B and C after x_proj (`mixer_rms_eps`).
   */
  mixerRmsEps?: number;
  /** Mamba-2 only: the SSD layer's sizes; absent for Mamba-1 and Falcon-Mamba. */
  mamba2?: Mamba2Dims;
}

/**
 * Mamba-2's (Dao & Gu, arXiv 2405.21060) sizes beyond {@link MambaConfig}'s,
 * where dInner = H·P and N is `dState`.
 */
export interface Mamba2Dims {
  /** H: SSD heads (`num_heads`; state-spaces: dInner / `headdim`). */
  nHeads: number;
  /** P: channels per head (`head_dim`, `headdim`). */
  headDim: number;
  /** G: groups of heads sharing B and C (`n_groups`, `ngroups`); divides H. */
  nGroups: number;
  /** Tokens per chunk of the chunked SSD scan (`chunk_size`). */
  chunkSize: number;
  /** Δ is clamped to [min, max] after softplus (`time_step_limit`, `dt_limit`). */
  dtLimit: [number, number];
}

/**
 * Channels of the causal convolution: dInner for Mamba-1; for Mamba-2 x, B
 * and C together, dInner + 2·G·N.
 */
export function convChannels(config: MambaConfig): number {
  const m2 = config.mamba2;
  return m2 ? config.dInner + 2 * m2.nGroups * config.dState : config.dInner;
}

type Json = Record<string, unknown>;

/** Largest plausible RMSNorm epsilon (checkpoints use 1e-5 or 1e-6). */
const MAX_EPSILON = 0.01;
/** Smallest plausible RMSNorm epsilon: float32's smallest normal number. */
const MIN_EPSILON = 2 ** -126;

function positiveInt(raw: Json, keys: string[], file: string, fallback?: number): number {
  for (const key of keys) {
    if (raw[key] === undefined || raw[key] === null) continue;
    const value = raw[key];
    if (typeof value !== "number" || !Number.isInteger(value) || value <= 0) {
      throw new ModelFileError(
        file,
        `"${key}" must be a positive integer, got ${JSON.stringify(value)}`,
      );
    }
    return value;
  }
  if (fallback !== undefined) return fallback;
  throw new ModelFileError(file, `Missing "${keys.join('" or "')}"`);
}

function flag(raw: Json, keys: string[], file: string, fallback: boolean): boolean {
  for (const key of keys) {
    if (raw[key] === undefined || raw[key] === null) continue;
    if (typeof raw[key] !== "boolean") {
      throw new ModelFileError(
        file,
        `"${key}" must be true or false, got ${JSON.stringify(raw[key])}`,
      );
    }
    return raw[key] as boolean;
  }
  return fallback;
}

function optionalId(raw: Json, key: string): number | undefined {
  const value = raw[key];
  return typeof value === "number" && Number.isInteger(value) && value >= 0 ? value : undefined;
}

/**
 * Normalizes a parsed `config.json`. `file` names the file in errors.
 * Throws {@link ModelFileError} for missing or malformed fields.
 */
export function parseConfig(json: unknown, file: string): MambaConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ModelFileError(file, "Config must be a JSON object");
  }
  const top = json as Json;
  const ssmCfg = top.ssm_cfg ?? {};
  if (typeof ssmCfg !== "object" || ssmCfg === null || Array.isArray(ssmCfg)) {
    throw new ModelFileError(file, `"ssm_cfg" must be an object`);
  }
  const layer = (ssmCfg as Json).layer;
  if (layer === "Mamba2" || top.model_type === "mamba2") {
    return parseMamba2Config(top, ssmCfg as Json, file);
  }
  if (layer !== undefined && layer !== "Mamba1") {
    throw new ModelFileError(
      file,
      `Unsupported ssm_cfg.layer ${JSON.stringify(layer)}: only Mamba1 is supported`,
    );
  }
  if (
    top.model_type !== undefined && top.model_type !== "mamba" &&
    top.model_type !== "falcon_mamba"
  ) {
    throw new ModelFileError(
      file,
      `Unsupported model_type ${
        JSON.stringify(top.model_type)
      }: expected "mamba" or "falcon_mamba"`,
    );
  }
  // The state-spaces layout keeps the SSM sizes in ssm_cfg; HF keeps them at the top.
  const raw: Json = { ...(ssmCfg as Json), ...top };

  const dModel = positiveInt(raw, ["hidden_size", "d_model"], file);
  const nLayer = positiveInt(raw, ["num_hidden_layers", "n_layer"], file);
  const dState = positiveInt(raw, ["state_size", "d_state"], file, 16);
  const dConv = positiveInt(raw, ["conv_kernel", "d_conv"], file, 4);
  const expand = positiveInt(raw, ["expand"], file, 2);
  const dInner = positiveInt(raw, ["intermediate_size", "d_inner"], file, expand * dModel);
  const innerKey = raw.intermediate_size != null ? "intermediate_size" : "d_inner";
  if (raw.expand != null && raw[innerKey] != null && dInner !== expand * dModel) {
    throw new ModelFileError(
      file,
      `"expand" ${expand} contradicts "${innerKey}" ${dInner}: ` +
        `expand times the hidden size (${dModel}) is ${expand * dModel}`,
    );
  }

  let dtRank: number;
  const rankRaw = raw.time_step_rank ?? raw.dt_rank ?? "auto";
  if (rankRaw === "auto") {
    dtRank = Math.ceil(dModel / 16);
  } else {
    dtRank = positiveInt(raw, ["time_step_rank", "dt_rank"], file);
  }

  let vocabSize = positiveInt(raw, ["vocab_size"], file);
  const padMultiple = raw.pad_vocab_size_multiple;
  if (padMultiple !== undefined) {
    const multiple = positiveInt(raw, ["pad_vocab_size_multiple"], file);
    vocabSize = Math.ceil(vocabSize / multiple) * multiple;
  }

  const epsKey = raw.layer_norm_epsilon != null ? "layer_norm_epsilon" : "norm_epsilon";
  const eps = normEpsilon(raw[epsKey] ?? 1e-5, `"${epsKey}"`, file);

  return {
    dModel,
    nLayer,
    dState,
    dConv,
    expand,
    dInner,
    dtRank,
    vocabSize,
    eps,
    projBias: flag(raw, ["use_bias", "bias"], file, false),
    convBias: flag(raw, ["use_conv_bias", "conv_bias"], file, true),
    tieEmbeddings: flag(raw, ["tie_word_embeddings", "tie_embeddings"], file, true),
    eosTokenId: optionalId(raw, "eos_token_id"),
    bosTokenId: optionalId(raw, "bos_token_id"),
    ...(top.model_type === "falcon_mamba" ? { mixerRmsEps: mixerRmsEps(raw, file) } : {}),
  };
}

/** Falcon-Mamba's `mixer_rms_eps` (transformers' default 1e-6). */
function mixerRmsEps(raw: Json, file: string): number {
  return normEpsilon(raw.mixer_rms_eps ?? 1e-6, `"mixer_rms_eps"`, file);
}

/**
 * An RMSNorm epsilon from `field` of `file` (the field as an error names it).
 * RMSNorm adds epsilon to a mean square of order 1: past MAX_EPSILON it
 * swamps the signal, below float32's smallest normal it vanishes.
 *
 * @throws {ModelFileError} For anything but a number in that range.
 */
export function normEpsilon(value: unknown, field: string, file: string): number {
  if (typeof value !== "number" || !(value > 0) || !Number.isFinite(value)) {
    const text = typeof value === "bigint" ? String(value) : JSON.stringify(value);
    throw new ModelFileError(file, `${field} must be a positive number, got ${text}`);
  }
  if (value > MAX_EPSILON || value < MIN_EPSILON) {
    throw new ModelFileError(
      file,
      `${field} ${value} is implausible: expected between ${MIN_EPSILON} and ${MAX_EPSILON}`,
    );
  }
  return value;
}

/**
 * A number of a config, spelled as JSON allows: a number, or an infinity as
 * transformers 5 writes it (`{"__float__": "Infinity"}`) or as a string
 * (`"Infinity"`, `"inf"`).
 */
function configNumber(value: unknown): number | undefined {
  if (typeof value === "number") return value;
  const text = typeof value === "string" ? value : (value as Json | null)?.__float__;
  if (text === "Infinity" || text === "inf") return Infinity;
  if (text === "-Infinity" || text === "-inf") return -Infinity;
  return undefined;
}

/**
 * A Mamba-2 config: transformers' `Mamba2Config` (`model_type` "mamba2",
 * sizes at the top) or state-spaces' (`ssm_cfg.layer` "Mamba2", sizes in
 * `ssm_cfg`, mamba_ssm's defaults where absent).
 */
function parseMamba2Config(top: Json, ssmCfg: Json, file: string): MambaConfig {
  const hf = top.model_type === "mamba2";
  const raw: Json = { ...ssmCfg, ...top };
  const dModel = positiveInt(raw, ["hidden_size", "d_model"], file);
  const nLayer = positiveInt(raw, ["num_hidden_layers", "n_layer"], file);
  const dState = positiveInt(raw, ["state_size", "d_state"], file, 128);
  const dConv = positiveInt(raw, ["conv_kernel", "d_conv"], file, 4);
  const expand = positiveInt(raw, ["expand"], file, 2);
  const dInner = expand * dModel;
  const ssmWidth = positiveInt(raw, ["d_ssm"], file, dInner);
  if (ssmWidth !== dInner) {
    throw new ModelFileError(
      file,
      `Unsupported "d_ssm" ${ssmWidth}: only an SSD over all ${dInner} inner channels is supported`,
    );
  }
  const headDim = positiveInt(raw, ["head_dim", "headdim"], file, 64);
  const nHeads = hf
    ? positiveInt(raw, ["num_heads"], file, Math.floor(dInner / headDim))
    : dInner / headDim;
  if (!Number.isInteger(nHeads) || nHeads * headDim !== dInner) {
    throw new ModelFileError(
      file,
      `Mamba-2 needs heads · head_dim = expand · hidden_size, got ${nHeads} · ${headDim} and ${expand} · ${dModel}`,
    );
  }
  const nGroups = positiveInt(raw, ["n_groups", "ngroups"], file, hf ? 8 : 1);
  if (nHeads % nGroups !== 0) {
    throw new ModelFileError(
      file,
      `"n_groups" ${nGroups} must divide the ${nHeads} heads`,
    );
  }
  const chunkSize = positiveInt(raw, ["chunk_size"], file, 256);
  const limitRaw = raw.time_step_limit ?? raw.dt_limit ?? [0, Infinity];
  const dtLimit = Array.isArray(limitRaw) ? limitRaw.map(configNumber) : [];
  if (
    dtLimit.length !== 2 || dtLimit.some((v) => v === undefined || Number.isNaN(v)) ||
    !(dtLimit[0]! <= dtLimit[1]!)
  ) {
    throw new ModelFileError(
      file,
      `"time_step_limit" must be [min, max] with min <= max, got ${JSON.stringify(limitRaw)}`,
    );
  }
  if (raw.d_intermediate !== undefined && raw.d_intermediate !== 0) {
    throw new ModelFileError(
      file,
      `Unsupported "d_intermediate" ${
        JSON.stringify(raw.d_intermediate)
      }: MLP layers are not supported`,
    );
  }
  if (raw.norm_before_gate === true) {
    throw new ModelFileError(
      file,
      `Unsupported "norm_before_gate" true: the norm follows the gate`,
    );
  }
  if (ssmCfg.rmsnorm === false) {
    throw new ModelFileError(
      file,
      `Unsupported "rmsnorm" false: Mamba-2 without its gated RMSNorm is not supported`,
    );
  }
  if (top.rms_norm === false) {
    throw new ModelFileError(
      file,
      `Unsupported "rms_norm" false: only RMSNorm blocks are supported, not LayerNorm ones`,
    );
  }
  const attention = raw.attn_layer_idx;
  if (Array.isArray(attention) && attention.length > 0) {
    throw new ModelFileError(
      file,
      `Unsupported "attn_layer_idx": attention layers are not supported`,
    );
  }

  let vocabSize = positiveInt(raw, ["vocab_size"], file);
  if (raw.pad_vocab_size_multiple !== undefined) {
    const multiple = positiveInt(raw, ["pad_vocab_size_multiple"], file);
    vocabSize = Math.ceil(vocabSize / multiple) * multiple;
  }
  const eps = raw.layer_norm_epsilon ?? raw.norm_epsilon ?? 1e-5;
  if (typeof eps !== "number" || !(eps > 0) || !Number.isFinite(eps)) {
    throw new ModelFileError(
      file,
      `"layer_norm_epsilon" must be a positive number, got ${JSON.stringify(eps)}`,
    );
  }
  return {
    dModel,
    nLayer,
    dState,
    dConv,
    expand,
    dInner,
    dtRank: nHeads,
    vocabSize,
    eps,
    projBias: flag(raw, ["use_bias", "bias"], file, false),
    convBias: flag(raw, ["use_conv_bias", "conv_bias"], file, true),
    // transformers' Mamba2Config unties by default, mamba_ssm's config ties.
    tieEmbeddings: flag(raw, ["tie_word_embeddings", "tie_embeddings"], file, !hf),
    eosTokenId: optionalId(raw, "eos_token_id"),
    bosTokenId: optionalId(raw, "bos_token_id"),
    mamba2: { nHeads, headDim, nGroups, chunkSize, dtLimit: [dtLimit[0]!, dtLimit[1]!] },
  };
}
