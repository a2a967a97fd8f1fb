/**
 * `deno task generate` as a user runs it: stdout carries exactly the prompt
 * and the generated text, stderr the statistics; bad flags exit non-zero.
 */

import { assert, assertEquals, assertMatch, assertStringIncludes } from "@std/assert";
import { CLI, readSamples, runCli, tempDir, tempFile } from "./helpers.ts";

Deno.test("greedy generation on the embedded model prints exactly the expected text", async () => {
  const samples = await readSamples();
  const { code, stdout, stderr } = await runCli([
    "-p",
    samples[1].prompt,
    "-n",
    "48",
    "--temp",
    "0",
    "--backend",
    "js",
  ]);
  assertEquals(code, 0, stderr);
  assertEquals(stdout, samples[1].greedy_text);
  assertMatch(stderr, /^48 tokens, [\d.]+ tok\/s \(prefill [\d.]+ tok\/s\), backend js$/m);
  assertStringIncludes(stderr, "model.safetensors");
});

Deno.test("--help prints the options; bad flags fail with a usage error", async () => {
  const help = await runCli(["--help"]);
  assertEquals(help.code, 0);
  assertStringIncludes(help.stdout, "--max-new-tokens");
  assertStringIncludes(help.stdout, "-1 is no limit: until the end of\n");
  const unknown = await runCli(["--frobnicate"]);
  assertEquals(unknown.code, 2);
  assertStringIncludes(unknown.stderr, "Unknown option --frobnicate");
  const badNumber = await runCli(["-n", "many"]);
  assertEquals(badNumber.code, 2);
  assertStringIncludes(badNumber.stderr, "--max-new-tokens needs an integer");
});

Deno.test("negative values are values; every range is checked before the model loads", async () => {
  const negatives = await runCli([
    "--repeat-last-n",
    "-1",
    "-n",
    "4",
    "--temp",
    "0",
    "--backend",
    "js",
  ]);
  assertEquals(negatives.code, 0, negatives.stderr);
  assertMatch(negatives.stderr, /^4 tokens/m);
  const cases: [string[], string][] = [
    [["--temp", "-1"], "--temp must be at least 0"],
    [["-n", "-2"], "--max-new-tokens must be at least -1 (-1 is no limit), got -2"],
    [["--max-new-tokens=-5"], "--max-new-tokens must be at least -1 (-1 is no limit), got -5"],
    [["-n", "-1.5"], '--max-new-tokens needs an integer, got "-1.5"'],
    [
      ["-n", "-1", "--repeat-last-n", "-1", "--repeat-penalty", "1.1"],
      "--repeat-last-n -1 (every token) needs a limit",
    ],
    [["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"],
    [["--min-p", "-0.1"], "--min-p must be in [0, 1]"],
    [["--top-k", "-3"], "--top-k must be at least 0"],
    [["--repeat-penalty", "0"], "--repeat-penalty must be above 0"],
    [["--repeat-last-n", "-2"], "--repeat-last-n must be at least -1"],
    [["-t", "0"], "--threads must be at least 1"],
    [["-p", ""], "The prompt is empty"],
    [["-m"], "-m needs a value"],
    [["-m", "-p", "x"], "-m needs a value"],
    [["-p", "a", "-f", "b.txt"], "not both"],
    [["-f", "/nonexistent/prompt.txt"], "--file /nonexistent/prompt.txt: File not found"],
  ];
  for (const [args, message] of cases) {
    // The model path does not exist: the usage error must come before any load.
    const result = await runCli([...args, "-m", "/nonexistent/model"]);
    assertEquals(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
    assertStringIncludes(result.stderr, message);
    assertEquals(result.stdout, "");
  }
});

Deno.test("-n -1 generates past the default 128 tokens until a stop string ends it", async () => {
  const run = async (args: string[]) => {
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-read", "--allow-write", "--allow-env", CLI, ...args],
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
      // Should -1 never end, the test fails instead of hanging.
      signal: AbortSignal.timeout(120_000),
    }).output();
    const decoder = new TextDecoder();
    assertEquals(output.code, 0, decoder.decode(output.stderr));
    return { stdout: decoder.decode(output.stdout), stderr: decoder.decode(output.stderr) };
  };
  const greedy = ["-p", "ROMEO:", "--temp", "0", "--backend", "js"];
  // Greedy text from "ROMEO:" names KING RICHARD first at its 195th token.
  const stop = "KING RICHARD";
  const long = await run([...greedy, "-n", "400"]);
  const expected = long.stdout.slice(0, long.stdout.indexOf(stop));
  assert(expected.length > "ROMEO:".length);

  const unlimited = await run([...greedy, "-n", "-1", "--stop", stop]);
  assertEquals(unlimited.stdout, expected);
  const tokens = Number(/^(\d+) tokens/m.exec(unlimited.stderr)?.[1]);
  assert(tokens > 128, `only ${tokens} tokens: -1 kept the default limit`);

  const json = await run([...greedy, "--max-new-tokens=-1", "--stop", stop, "--json"]);
  const summary = JSON.parse(json.stdout.trim().split("\n").at(-1)!);
  assertEquals(summary.finishReason, "stop");
  assertEquals(summary.generatedTokens, tokens);
});

Deno.test("a model path that does not exist is not taken for a hub id", async () => {
  for (const path of ["/nonexistent/model", "tests/no-such-model"]) {
    const { code, stderr } = await runCli(["-m", path]);
    assertEquals(code, 1);
    assertStringIncludes(stderr, `error: ${path}: No such local directory`);
    assertEquals(stderr.includes("fetching"), false, stderr);
  }
});

Deno.test("a hub id prints what it fetches before the network work", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const endpoint = `http://127.0.0.1:${listener.addr.port}`;
  listener.close(); // Nothing listens there: the fetch fails, after the notice.
  const { code, stderr } = await runCli(["-m", "someone/some-model"], {
    HF_ENDPOINT: endpoint,
    MAMBA_CACHE_DIR: await tempDir(),
  });
  assertEquals(code, 1);
  assertMatch(stderr, /^fetching someone\/some-model \.\.\.\n/);
  assertStringIncludes(stderr, `${endpoint}/someone/some-model/resolve/main/config.json`);
  assertStringIncludes(stderr, "To work offline");
});

Deno.test("-f reads the prompt from a file; -t sets the wasm threads", async () => {
  const samples = await readSamples();
  const file = await tempFile();
  await Deno.writeTextFile(file, samples[1].prompt);
  const { code, stdout, stderr } = await runCli([
    "-f",
    file,
    "-n",
    "48",
    "--temp",
    "0",
    "--backend",
    "wasm",
    "-t",
    "1",
  ]);
  assertEquals(code, 0, stderr);
  assertEquals(stdout, samples[1].greedy_text);
  assertMatch(stderr, /backend wasm$/m);
});

Deno.test("--json prints one object per token and a summary", async () => {
  const samples = await readSamples();
  const { code, stdout, stderr } = await runCli([
    "-p",
    samples[1].prompt,
    "-n",
    "8",
    "--temp",
    "0",
    "--backend",
    "js",
    "--json",
  ]);
  assertEquals(code, 0, stderr);
  const lines = stdout.trimEnd().split("\n").map((line) => JSON.parse(line));
  assertEquals(lines.length, 9);
  const tokens = lines.slice(0, 8);
  for (const event of tokens) assert(Number.isInteger(event.token), JSON.stringify(event));
  const text = samples[1].prompt + tokens.map((event) => event.text).join("");
  assert(samples[1].greedy_text.startsWith(text), text);
  assert(text.length > samples[1].prompt.length);
  const summary = lines[8];
  assertEquals(summary.generatedTokens, 8);
  assertEquals(summary.finishReason, "length");
  assertEquals(summary.backend, "js");
});

/** Spawns a long greedy generation with stdout piped to the test. */
function spawnLong(): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-env",
      CLI,
      "-n",
      "100000",
      "--ignore-eos",
      "--backend",
      "js",
    ],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
}

async function firstChunk(
  stream: ReadableStream<Uint8Array>,
): Promise<ReadableStreamDefaultReader<Uint8Array>> {
  const reader = stream.getReader();
  await reader.read();
  return reader;
}

Deno.test("a reader that goes away (| head) ends the run quietly", async () => {
  const child = spawnLong();
  const reader = await firstChunk(child.stdout);
  await reader.cancel();
  const { code } = await child.status;
  const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
  assertEquals(stderr.includes("Broken pipe"), false, stderr);
  assertEquals(stderr.includes("error"), false, stderr);
  assertEquals(code, 0);
});

Deno.test("Ctrl-C stops the generation with exit code 130", async () => {
  const child = spawnLong();
  const reader = await firstChunk(child.stdout);
  child.kill("SIGINT");
  while (!(await reader.read()).done) { /* Drain what was written before the stop. */ }
  const { code } = await child.status;
  const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
  assertEquals(code, 130, stderr);
  assertMatch(stderr, /tokens, [\d.]+ tok\/s/);
});

Deno.test("--prompt-cache saves the state after the prompt and a later run skips that prefill", async () => {
  const samples = await readSamples();
  const cache = `${await tempDir()}/prompt.bin`;
  const run = (prompt: string) =>
    runCli(["--prompt-cache", cache, "-p", prompt, "-n", "48", "--temp", "0", "--backend", "js"]);
  const first = await run(samples[1].prompt);
  assertEquals(first.code, 0, first.stderr);
  assertEquals(first.stdout, samples[1].greedy_text);
  assertMatch(first.stderr, /prompt cache: 0 of (\d+) prompt tokens reused/);
  const promptTokens = Number(/of (\d+) prompt tokens/.exec(first.stderr)![1]);
  const second = await run(samples[1].prompt);
  assertEquals(second.code, 0, second.stderr);
  assertEquals(second.stdout, samples[1].greedy_text);
  assertStringIncludes(
    second.stderr,
    `prompt cache: ${promptTokens} of ${promptTokens} prompt tokens reused`,
  );
  // A different prompt starts afresh and replaces the cache.
  const other = await run(samples[0].prompt);
  assertEquals(other.code, 0, other.stderr);
  assertEquals(other.stdout, samples[0].greedy_text);
  assertMatch(other.stderr, /prompt cache: 0 of \d+ prompt tokens reused/);
  // A file that is no snapshot is reported and rewritten.
  await Deno.writeTextFile(cache, "not a snapshot");
  const broken = await run(samples[1].prompt);
  assertEquals(broken.code, 0, broken.stderr);
  assertEquals(broken.stdout, samples[1].greedy_text);
  assertStringIncludes(broken.stderr, "is not usable (Invalid snapshot");
});
