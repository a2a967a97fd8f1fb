/**
 * One WebGPU kernel as a {@link Program}: a WGSL shader, its entry point, the
 * constants it is specialised with and the bindings it uses, with the cache
 * keys of its module, pipeline and bind group layout and the named fields of
 * its uniform block (`struct Params`, whose TypeScript side
 * `deno task build:wgsl` generates from the shader).
 *
 * @module
 */

import { WGSL } from "../../generated/wgsl.ts";
import { PARAM_FIELDS, type ParamField } from "../../generated/wgsl_params.ts";

/** The most workgroups of one dimension that a dispatch may ask for. */
export const MAX_GROUPS = 65535;

/**
 * One kernel: a shader, its entry point, its specialisation and the bindings
 * it uses. `P` is the shader's `struct Params` (an interface of
 * `src/generated/wgsl_params.ts`), which a dispatch fills by name.
 */
export class Program<P = unknown> {
  /** Identifies the pipeline in the cache. */
  readonly key: string;
  /** Identifies the shader module: preludes, shader and constants. */
  readonly moduleKey: string;
  /** Identifies the bind group layout: shader, bindings and which are writable. */
  readonly layoutKey: string;
  /** The bindings the shader declares `read_write` (storage); the others of 1.. are read-only. */
  readonly writable: readonly number[];
  /** The fields of the uniform block, 4 bytes each, in order. */
  readonly paramFields: readonly ParamField[];
  /** Only for the compiler: ties the program to its parameters' type. */
  declare readonly params?: P;

  constructor(
    /** Key of the shader in {@link WGSL}. */
    readonly shader: string,
    /** Entry point. */
    readonly entry: string,
    /** Binding indices of group 0 that the entry point uses (0 is the uniform block). */
    readonly bindings: readonly number[],
    /** `const NAME: u32 = …u;` declarations replaced in the source. */
    readonly constants: Readonly<Record<string, number>> = {},
    /** Keys of WGSL modules prepended to the shader, in order (declarations it uses). */
    readonly preludes: readonly string[] = [],
  ) {
    this.moduleKey = `${[...preludes, shader].join("+")}:${JSON.stringify(constants)}`;
    this.key = `${this.moduleKey}:${entry}`;
    // The layout follows the declarations: a binding is writable where the
    // WGSL declares it `read_write`.
    const writable = [...this.source().matchAll(/@binding\((\d+)\)\s*var<storage,\s*read_write>/g)]
      .map((match) => Number(match[1]));
    this.writable = bindings.filter((binding) => writable.includes(binding));
    this.layoutKey = `${shader}:${bindings.join(",")}:${this.writable.join(",")}`;
    const declaring = [...preludes, shader].filter((name) => PARAM_FIELDS[name] !== undefined);
    if (declaring.length > 1) {
      throw new Error(`${this.key}: struct Params is declared by ${declaring.join(" and ")}`);
    }
    this.paramFields = declaring.length === 1 ? PARAM_FIELDS[declaring[0]] : [];
  }

  /** The WGSL source with the prelude prepended and the constants substituted. */
  source(): string {
    let text = WGSL[this.shader];
    if (text === undefined) throw new Error(`No WGSL kernel named ${this.shader}`);
    for (const name of [...this.preludes].reverse()) {
      const prelude = WGSL[name];
      if (prelude === undefined) throw new Error(`No WGSL module named ${name}`);
      text = `${prelude}\n${text}`;
    }
    for (const [name, value] of Object.entries(this.constants)) {
      const pattern = new RegExp(`const ${name}: u32 = \\d+u;`);
      if (!pattern.test(text)) throw new Error(`${this.shader}.wgsl has no constant ${name}`);
      text = text.replace(pattern, `const ${name}: u32 = ${value}u;`);
    }
    return text;
  }

  /**
   * Writes `params` as the uniform block at word `at` of `words` and `floats`
   * (two views of the same bytes): field i at word at + i, u32 and i32 as
   * their bits, f32 as a float.
   */
  writeParams(params: P, words: Uint32Array, floats: Float32Array, at: number): void {
    const fields = this.paramFields;
    const values = params as Record<string, number>;
    for (let i = 0; i < fields.length; i++) {
      const [name, type] = fields[i];
      const value = values[name];
      if (value === undefined) throw new Error(`${this.key}: the parameter ${name} is missing`);
      if (type === "f32") floats[at + i] = value;
      else words[at + i] = value; // an i32 keeps its two's complement bits
    }
  }
}

/** Workgroup counts for `groups` one-dimensional groups, split over y beyond 65535. */
export function grid(groups: number): [number, number, number] {
  const n = Math.max(1, groups);
  if (n <= MAX_GROUPS) return [n, 1, 1];
  const y = Math.ceil(n / MAX_GROUPS);
  return [Math.ceil(n / y), y, 1];
}
