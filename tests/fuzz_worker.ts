/**
 * Child process of the fuzz campaign: `fuzz_worker.ts <kind> <seed> <from> <to> <scratch>`
 * runs cases [from, to) and writes one JSON line before ("start") and after
 * ("done") each, so that the parent knows which case a crash or a hang hit.
 *
 * @module
 */

import { type FuzzKind, type FuzzOutcome, runCase } from "./fuzz_cases.ts";

/** Cases that misbehave on purpose, so that a test can see the caps work. */
const SELF_CHECKS: Record<string, () => Promise<FuzzOutcome>> = {
  "self-check-hang": () => new Promise(() => setInterval(() => {}, 1000)),
  "self-check-memory": () => {
    const held: Uint8Array[] = [];
    for (;;) held.push(new Uint8Array(64 << 20).fill(1));
  },
};

const [kind, seed, from, to, scratch] = Deno.args;
const encoder = new TextEncoder();
const say = (line: unknown) => Deno.stdout.writeSync(encoder.encode(JSON.stringify(line) + "\n"));
for (let index = Number(from); index < Number(to); index++) {
  say({ start: index });
  const outcome = await (SELF_CHECKS[kind]?.() ??
    runCase(kind as FuzzKind, Number(seed), index, scratch));
  say({ done: index, ...outcome });
}
