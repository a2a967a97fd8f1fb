/**
 * The workload that `gpu_profile.ts` and `gpu_ablate.ts` run on a WebGPU
 * backend of their own: the model (`--model=DIR`, `$MAMBA_BENCH_MODEL`, or a
 * random mamba-130m- or, with `--mamba2`, mamba2-130m-shaped one) and what
 * `generate` runs on it, through the engine.
 *
 * @module
 */

import type { WebGpuBackend } from "../src/backends/webgpu/mod.ts";
import { loadCheckpoint } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { Sampler } from "../src/sampler.ts";
import { Session } from "../src/session.ts";
import {
  benchModelDir,
  MAMBA2_130M_CONFIG,
  promptIds,
  randomMamba2Weights,
  SAMPLED_OPTIONS,
} from "./make_random_model.ts";

/** The bench model on `backend`, and where it came from. */
export async function benchModel(
  backend: WebGpuBackend,
  options: { model?: string; mamba2?: boolean },
): Promise<{ model: MambaModel<unknown>; source: string }> {
  if (options.mamba2) {
    const weights = randomMamba2Weights(MAMBA2_130M_CONFIG);
    return {
      model: new MambaModel(backend, MAMBA2_130M_CONFIG, weights),
      source: "random mamba2-130m",
    };
  }
  const source = options.model ?? await benchModelDir();
  const checkpoint = await loadCheckpoint(source);
  return { model: new MambaModel(backend, checkpoint.config, checkpoint.weights), source };
}

/**
 * `streams` new sessions at once, each a 16-id prompt then `tokens` ids,
 * greedy or drawn as `api_bench.ts --sampled` draws them.
 */
export function decodeStreams(
  model: MambaModel<unknown>,
  streams: number,
  tokens: number,
  sampled: boolean,
): Promise<unknown> {
  const vocab = model.config.vocabSize;
  return Promise.all(Array.from({ length: streams }, (_, i) => {
    const session = new Session(model);
    return session.decode({
      prompt: promptIds(16, vocab).map((id) => (id + i) % vocab),
      sampler: new Sampler(sampled ? { ...SAMPLED_OPTIONS, seed: i } : { temperature: 0 }),
      maxTokens: tokens,
    }).finally(() => session.dispose());
  }));
}

/** One new session's prefill of `length` ids, its logits read back. */
export async function prefillOnce(model: MambaModel<unknown>, length: number): Promise<void> {
  const session = new Session(model);
  await session.prefill(promptIds(length, model.config.vocabSize));
  session.dispose();
}
