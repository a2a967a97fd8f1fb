/**
 * Reads a Mamba `config.json` in either of the two layouts found in the wild:
 * transformers' `MambaConfig` (`hidden_size`, `num_hidden_layers`, `state_size`, ...)
 * and the original state-spaces one (`d_model`, `n_layer`, `ssm_cfg`, ...), and
 * turns it into one normalized {@link MambaConfig}.
 *
 * @example
 * ```ts
 * import { parseConfig } from "./config.ts";
 * const config = parseConfig(
 *   { d_model: 768, n_layer: 24, vocab_size: 50277, pad_vocab_size_multiple: 8 },
 *   "config.json",
 * );
 * console.log(config.dInner, config.dtRank, config.vocabSize); // 1536 48 50280
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
  /** R: rank of the delta projection (`time_step_rank`; "auto" is ceil(dModel / 16)). */
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
  if (layer !== undefined && layer !== "Mamba1") {
    throw new ModelFileError(
      file,
      `Unsupported ssm_cfg.layer ${JSON.stringify(layer)}: only Mamba1 is supported`,
    );
  }
  if (top.model_type !== undefined && top.model_type !== "mamba") {
    throw new ModelFileError(
      file,
      `Unsupported model_type ${JSON.stringify(top.model_type)}: expected "mamba"`,
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
  const epsRaw = raw[epsKey] ?? 1e-5;
  if (typeof epsRaw !== "number" || !(epsRaw > 0) || !Number.isFinite(epsRaw)) {
    throw new ModelFileError(
      file,
      `"${epsKey}" must be a positive number, got ${JSON.stringify(epsRaw)}`,
    );
  }
  // RMSNorm adds epsilon to a mean square of order 1: past this it swamps the
  // signal, below float32's smallest normal it vanishes.
  if (epsRaw > MAX_EPSILON || epsRaw < MIN_EPSILON) {
    throw new ModelFileError(
      file,
      `"${epsKey}" ${epsRaw} is implausible: expected between ${MIN_EPSILON} and ${MAX_EPSILON}`,
    );
  }

  return {
    dModel,
    nLayer,
    dState,
    dConv,
    expand,
    dInner,
    dtRank,
    vocabSize,
    eps: epsRaw,
    projBias: flag(raw, ["use_bias", "bias"], file, false),
    convBias: flag(raw, ["use_conv_bias", "conv_bias"], file, true),
    tieEmbeddings: flag(raw, ["tie_word_embeddings", "tie_embeddings"], file, true),
    eosTokenId: optionalId(raw, "eos_token_id"),
    bosTokenId: optionalId(raw, "bos_token_id"),
  };
}
