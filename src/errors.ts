/**
 * Error types shared by the loaders, the tokenizer and the model.
 *
 * @module
 */

/**
 * A model file that cannot be used: malformed, truncated, inconsistent with its
 * config, or missing. `file` names the file (path or URL) and the message says
 * what is wrong with it, in sentence case.
 */
export class ModelFileError extends Error {
  /** The path or URL of the offending file. */
  readonly file: string;

  /** Builds an error whose message starts with the file's name. */
  constructor(file: string, problem: string, options?: ErrorOptions) {
    super(`${file}: ${problem}`, options);
    this.name = "ModelFileError";
    this.file = file;
  }
}

/** Thrown for a snapshot that is malformed or made for another model. */
export class SnapshotError extends Error {
  /** Builds the error from a problem description. */
  constructor(problem: string, options?: ErrorOptions) {
    super(`Invalid snapshot: ${problem}`, options);
    this.name = "SnapshotError";
  }
}

/**
 * Thrown when the backend asked for cannot run in this runtime (no WebGPU
 * adapter, no WebAssembly SIMD) or when no backend can run at all. `backend`
 * names the one asked for ("auto" when none could run).
 */
export class BackendUnavailableError extends Error {
  /** The backend that was asked for. */
  readonly backend: string;

  /** Builds the error for `backend` with a message saying why and what to use instead. */
  constructor(backend: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BackendUnavailableError";
    this.backend = backend;
  }
}

/** `value` if it is a positive integer; otherwise a RangeError naming the option `name`. */
export function checkPositiveInteger(name: string, value: number): number {
  if (!(Number.isInteger(value) && value >= 1)) {
    throw new RangeError(`${name} must be a positive integer, got ${value}`);
  }
  return value;
}
