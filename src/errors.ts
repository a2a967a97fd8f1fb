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
