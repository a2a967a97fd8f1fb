/**
 * Maps a checkpoint's tensors onto the model's weights, checking every shape
 * against the config before any value is used.
 *
 * Both naming schemes are accepted: transformers' (`backbone.embeddings.weight`)
 * and state-spaces' (`backbone.embedding.weight`). in_proj and x_proj stay
 * whole, as stored: one `linearSplit` writes each of their outputs (x and z;
 * dt, B and C) to a buffer of its own.
 *
 * @module
 */

import type { MambaConfig } from "./config.ts";
import { ModelFileError } from "./errors.ts";
import { type Mamba2LayerWeights, readMamba2Layer } from "./mamba2.ts";
import { halfMatrix, type Halves, type HostMatrix, type QuantizedMatrix } from "./quant.ts";

/** A file of named tensors: safetensors, PyTorch, or GGUF under transformers' names. */
export interface TensorFile {
  /** The path or URL, for messages. */
  readonly file: string;
  /** Every tensor's name (the values are the format's own infos). */
  readonly tensors: ReadonlyMap<string, unknown>;
  /** A tensor's shape, outermost first. */
  info(name: string): { readonly shape: readonly number[] };
  /** A tensor's values as float32. */
  float32(name: string): Float32Array;
  /**
   * A 2-D tensor kept in its quantized block form, where the file stores it
   * in one that {@link QuantizedMatrix} holds; null otherwise.
   */
  quantized?(name: string): QuantizedMatrix | null;
  /** A tensor's 16-bit values, where the file stores it as F16 or BF16; null otherwise. */
  halves?(name: string): Halves | null;
}

/**
 * One Mamba block's weights. Shapes use the glossary of `model.ts`. The
 * matrices that only `linear` reads have type `M` (by default `T`): the
 * loader may hand them over as quantized blocks.
 */
export interface LayerWeights<T, M = T> {
  /** RMSNorm weight before the mixer [D]. */
  norm: T;
  /** in_proj weight [2·dInner, D]: rows producing x, then rows producing the gate z. */
  inProj: M;
  /** in_proj bias [2·dInner], when `projBias`. */
  inProjBias: T | null;
  /** Depthwise conv weights [dInner, dConv]. */
  convWeight: T;
  /** Conv bias [dInner], when `convBias`. */
  convBias: T | null;
  /** x_proj weight [R + 2N, dInner]: rows producing the low-rank delta, then B, then C. */
  xProj: M;
  /** dt_proj weight, rank R up to dInner [dInner, R]. */
  dtProj: M;
  /** dt_proj bias [dInner], added before softplus inside the scan. */
  dtProjBias: T;
  /** A = -exp(A_log) [dInner, N]. */
  A: T;
  /** Skip connection D [dInner]. */
  D: T;
  /** out_proj weight [D, dInner]. */
  outProj: M;
  /** out_proj bias [D], when `projBias`. */
  outProjBias: T | null;
}

/**
 * All weights of a Mamba language model; the matrices (embedding, lm_head
 * and each Mamba-1 block's projections) have type `M`, by default `T`.
 */
export interface MambaWeights<T, M = T> {
  /** Token embedding [vocab, D]. */
  embedding: M;
  /** One entry per block: Mamba-1's (and Falcon-Mamba's), or Mamba-2's where the config says so. */
  layers: (LayerWeights<T, M> | Mamba2LayerWeights<T, M>)[];
  /** Final RMSNorm weight [D]. */
  normF: T;
  /** Output projection [vocab, D]; the embedding itself when tied. */
  lmHead: M;
}

/**
 * Weights as the loader hands them to the model: float32, with the matrices
 * of a quantized or 16-bit file kept as stored (see {@link loadWeightsAsStored}).
 */
export type HostWeights = MambaWeights<Float32Array, HostMatrix>;

/** Where tensors come from: one file or the shards of a checkpoint. */
export class TensorStore {
  readonly #fileOf = new Map<string, TensorFile>();

  /** Indexes the tensors of every file; a name present twice is an error. */
  constructor(files: TensorFile[]) {
    for (const file of files) {
      for (const name of file.tensors.keys()) {
        const other = this.#fileOf.get(name);
        if (other) {
          throw new ModelFileError(file.file, `Tensor "${name}" is also in ${other.file}`);
        }
        this.#fileOf.set(name, file);
      }
    }
  }

  /** Whether a tensor of that name exists. */
  has(name: string): boolean {
    return this.#fileOf.has(name);
  }

  /** The file holding `name`; throws a clear error when it is missing. */
  fileOf(name: string, description: string): TensorFile {
    const file = this.#fileOf.get(name);
    if (!file) {
      const anyFile = this.#fileOf.values().next().value?.file ?? "checkpoint";
      throw new ModelFileError(anyFile, `Missing tensor "${name}" (${description})`);
    }
    return file;
  }
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/**
 * Says whether a tensor's values are already known to be finite (see
 * `FiniteScan.vouches`), so that the pass over them can be skipped.
 */
export type FiniteVouch = (values: Float32Array) => boolean;

/**
 * Reads and checks all weights as float32 arrays (F16 and BF16 are widened).
 * `configFile` names config.json in errors about contradictions. Every value
 * must be finite: tensors `vouched` for are not checked again.
 */
export function loadWeights(
  store: TensorStore,
  config: MambaConfig,
  configFile: string,
  vouched?: FiniteVouch,
): MambaWeights<Float32Array> {
  const weights = walkWeights(store, config, configFile, true, false, vouched);
  return weights as MambaWeights<Float32Array>; // Without keepStored every matrix is float32.
}

/**
 * Reads and checks all weights as {@link loadWeights} does, but keeps the
 * matrices as the file stores them where it stores them quantized (see
 * {@link TensorFile.quantized}) or 16-bit (F16, BF16: {@link TensorFile.halves}):
 * a backend with kernels for the form holds it, others get the values
 * dequantized or widened at upload.
 */
export function loadWeightsAsStored(
  store: TensorStore,
  config: MambaConfig,
  configFile: string,
  vouched?: FiniteVouch,
): HostWeights {
  return walkWeights(store, config, configFile, true, true, vouched);
}

/**
 * OR of every word's exponent plus 2^23: an exponent of all ones (NaN,
 * ±Infinity) carries into the sign bit, so the result is negative exactly
 * when some value is not finite. Branch-free, the fast pass.
 */
function orOfExponentCarries(bits: Int32Array): number {
  let carries = 0;
  for (let i = 0; i < bits.length; i++) carries |= ((bits[i] & 0x7f800000) + 0x00800000) | 0;
  return carries;
}

/**
 * Checks that the files hold every tensor the config implies, with its shape,
 * from the headers alone (no tensor data is read): run before anything is
 * sized from the config.
 *
 * @throws {ModelFileError} Naming the file and the tensor that contradicts the config.
 */
export function checkWeightShapes(
  store: TensorStore,
  config: MambaConfig,
  configFile: string,
): void {
  walkWeights(store, config, configFile, false, false);
}

/**
 * Throws unless every value is finite, naming the tensor: one pass, unless
 * `vouched` says the values were already scanned.
 */
function checkFinite(
  values: Float32Array,
  file: string,
  name: string,
  vouched?: FiniteVouch,
): void {
  if (vouched?.(values)) return;
  if (orOfExponentCarries(new Int32Array(values.buffer, values.byteOffset, values.length)) >= 0) {
    return;
  }
  const i = values.findIndex((v) => !Number.isFinite(v));
  throw new ModelFileError(
    file,
    `Tensor "${name}" holds ${values[i]} at index ${i}; weights must be finite`,
  );
}

/**
 * `check(stored)`, run each time the stored form's data is asked for: by the
 * backend's upload, once, so that a tensor a file reads as asked (a local
 * GGUF's) is held only while the backend copies it. Its RangeError (a value
 * or scale that is not finite, a wrong size) becomes a
 * {@link ModelFileError} naming `file`.
 */
export function checkedWhenRead<T>(file: string, check: () => T): T {
  try {
    return check();
  } catch (error) {
    if (error instanceof RangeError) throw new ModelFileError(file, error.message);
    throw error;
  }
}

/** Empty stand-in for tensor data when only shapes are checked. */
const NO_DATA = new Float32Array(0);

function walkWeights(
  store: TensorStore,
  config: MambaConfig,
  configFile: string,
  read: boolean,
  keepStored: boolean,
  vouched?: FiniteVouch,
): HostWeights {
  const { dModel, dInner, dState, dConv, dtRank, nLayer, vocabSize } = config;
  const m2 = config.mamba2;
  const mixerSizes = m2
    ? `num_heads ${m2.nHeads}, head_dim ${m2.headDim}, n_groups ${m2.nGroups}`
    : `time_step_rank ${dtRank}`;
  const sizes =
    `${configFile} says hidden_size ${dModel}, intermediate_size ${dInner}, state_size ${dState}, conv_kernel ${dConv}, ${mixerSizes}, vocab_size ${vocabSize}`;

  const tensor = (
    name: string,
    shape: number[],
    alternatives: number[][] = [],
    why = `${configFile} says num_hidden_layers ${nLayer}`,
    readValues = read,
  ) => {
    const file = store.fileOf(name, why);
    const actual = file.info(name).shape;
    const fits = [shape, ...alternatives].find((s) => sameShape(s, actual));
    if (!fits) {
      throw new ModelFileError(
        file.file,
        `Tensor "${name}" has shape [${actual.join(", ")}] but the config implies [${
          shape.join(", ")
        }] (${sizes})`,
      );
    }
    if (!readValues) return NO_DATA;
    const values = file.float32(name);
    checkFinite(values, file.file, name, vouched);
    return values;
  };
  // A matrix that only `linear` reads (or the embedding): kept as blocks or 16-bit where asked
  // and stored so.
  const matrix = (name: string, [rows, cols]: [number, number]): HostMatrix => {
    if (!(read && keepStored)) return tensor(name, [rows, cols]);
    const file = store.fileOf(name, `${configFile} says num_hidden_layers ${nLayer}`);
    const halves = file.halves?.(name);
    let stored: HostMatrix | null = file.quantized?.(name) ?? null;
    if (!stored && halves) {
      const { format } = halves;
      const what = `Tensor "${name}"`;
      stored = {
        format,
        rows,
        cols,
        get halves() {
          return checkedWhenRead(
            file.file,
            () => halfMatrix(format, rows, cols, halves.halves, what),
          ).halves;
        },
      };
    }
    if (!stored) return tensor(name, [rows, cols]);
    tensor(name, [rows, cols], [], undefined, false); // Checks the shape.
    return stored;
  };
  const optional = (name: string, shape: number[], wanted: boolean, flagName: string) => {
    if (wanted) return tensor(name, shape, [], `${configFile} sets ${flagName} to true`);
    if (store.has(name)) {
      throw new ModelFileError(
        store.fileOf(name, "").file,
        `Holds "${name}" but ${configFile} sets ${flagName} to false`,
      );
    }
    return null;
  };

  const embeddingName = store.has("backbone.embeddings.weight")
    ? "backbone.embeddings.weight"
    : "backbone.embedding.weight";
  const embedding = matrix(embeddingName, [vocabSize, dModel]);

  const extraLayer = `backbone.layers.${nLayer}.mixer.in_proj.weight`;
  if (store.has(extraLayer)) {
    throw new ModelFileError(
      store.fileOf(extraLayer, "").file,
      `Holds more layers than the ${nLayer} that ${configFile} declares ("${extraLayer}" exists)`,
    );
  }

  const layers: HostWeights["layers"] = [];
  for (let l = 0; l < nLayer; l++) {
    const p = `backbone.layers.${l}.`;
    // -exp(A_log) overflows to -Infinity for a finite but huge A_log. (A file holding A itself
    // had it checked as it was read.)
    const checkA = (A: Float32Array) => {
      if (store.has(`${p}mixer.A`)) return;
      checkFinite(A, store.fileOf(`${p}mixer.A_log`, "").file, `${p}mixer.A_log (as -exp)`);
    };
    if (config.mamba2) {
      const layer = readMamba2Layer(p, config, tensor, optional, matrix, (name) => store.has(name));
      checkA(layer.A);
      layers.push(layer);
      continue;
    }
    // GGUF files hold A itself (llama.cpp's converter computes it), checkpoints A_log.
    let A: Float32Array;
    if (store.has(`${p}mixer.A`)) {
      A = tensor(`${p}mixer.A`, [dInner, dState]);
    } else {
      A = tensor(`${p}mixer.A_log`, [dInner, dState]).map((aLog) => -Math.exp(aLog));
      checkA(A);
    }
    layers.push({
      norm: tensor(`${p}norm.weight`, [dModel]),
      inProj: matrix(`${p}mixer.in_proj.weight`, [2 * dInner, dModel]),
      inProjBias: optional(`${p}mixer.in_proj.bias`, [2 * dInner], config.projBias, "use_bias"),
      // PyTorch stores the depthwise kernel as [dInner, 1, dConv].
      convWeight: tensor(`${p}mixer.conv1d.weight`, [dInner, 1, dConv], [[dInner, dConv]]),
      convBias: optional(`${p}mixer.conv1d.bias`, [dInner], config.convBias, "use_conv_bias"),
      xProj: matrix(`${p}mixer.x_proj.weight`, [dtRank + 2 * dState, dInner]),
      dtProj: matrix(`${p}mixer.dt_proj.weight`, [dInner, dtRank]),
      dtProjBias: tensor(`${p}mixer.dt_proj.bias`, [dInner]),
      A,
      D: tensor(`${p}mixer.D`, [dInner]),
      outProj: matrix(`${p}mixer.out_proj.weight`, [dModel, dInner]),
      outProjBias: optional(`${p}mixer.out_proj.bias`, [dModel], config.projBias, "use_bias"),
    });
  }

  const normF = tensor("backbone.norm_f.weight", [dModel]);
  let lmHead = embedding;
  if (store.has("lm_head.weight")) {
    lmHead = matrix("lm_head.weight", [vocabSize, dModel]);
  } else if (!config.tieEmbeddings) {
    store.fileOf("lm_head.weight", `${configFile} sets tie_word_embeddings to false`);
  }
  return { embedding, layers, normF, lmHead };
}
