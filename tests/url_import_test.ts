/**
 * The library imported by URL, as a user of a hosted copy runs it: this file
 * serves the repository over HTTP and runs a probe script in a subprocess
 * that has no permission but `--allow-net=127.0.0.1` and no config file (so
 * no import map). The probe imports `mod.ts` and loads the bundled model by
 * URL, and loads it again as a hub repo id from a fake hub endpoint with a
 * cache directory it may not touch; greedy text must match the reference.
 */

import { assert, assertEquals } from "@std/assert";
import { readSamples } from "./helpers.ts";

const ROOT = new URL("../", import.meta.url);
const HUB_PREFIX = "/hub/local/tiny-shakespeare/resolve/main/";

/** The probe, served as /_probe.ts; it prints one JSON line with its results. */
function probeSource(prompts: string[], cacheDir: string): string {
  return `
import { loadModel } from "./mod.ts";

const prompts = ${JSON.stringify(prompts)};
async function greedy(model, prompt) {
  let text = prompt;
  for await (const event of model.generate(prompt, { maxNewTokens: 48, temperature: 0 })) {
    text += event.text;
  }
  return text;
}

// The default options: backend "auto" (wasm with its worker threads where SIMD runs).
const byUrl = await loadModel(new URL("./models/tiny-shakespeare/", import.meta.url));
const texts = [];
for (const prompt of prompts) texts.push(await greedy(byUrl, prompt));

const byId = await loadModel("local/tiny-shakespeare", {
  hfEndpoint: new URL("./hub", import.meta.url).href,
  cacheDir: ${JSON.stringify(cacheDir)},
  backend: "js",
});
const hub = await greedy(byId, prompts[0]);
console.log(JSON.stringify({ backend: byUrl.backend, texts, hub }));
`;
}

/** Serves the repository's files, the probe, and the model under a hub-style path. */
function serveRepository(probe: () => string): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    const path = decodeURIComponent(new URL(request.url).pathname);
    if (path === "/_probe.ts") {
      return new Response(probe(), { headers: { "content-type": "application/typescript" } });
    }
    const file = path.startsWith(HUB_PREFIX)
      ? new URL(`models/tiny-shakespeare/${path.slice(HUB_PREFIX.length)}`, ROOT)
      : new URL(`.${path}`, ROOT);
    try {
      const bytes = await Deno.readFile(file);
      const type = path.endsWith(".ts") ? "application/typescript" : "application/octet-stream";
      return new Response(request.method === "HEAD" ? null : bytes, {
        headers: { "content-type": type, "content-length": String(bytes.length) },
      });
    } catch {
      return new Response("Not found", { status: 404 });
    }
  });
}

Deno.test("mod.ts imported over HTTP with only --allow-net generates the reference text", async () => {
  const samples = await readSamples();
  const scratch = await Deno.makeTempDir({ prefix: "mamba-url-import-" });
  const cacheDir = `${scratch}/cache`;
  const server = serveRepository(() => probeSource(samples.map((s) => s.prompt), cacheDir));
  try {
    const origin = `http://127.0.0.1:${server.addr.port}`;
    // The subprocess inherits the environment (DENO_DIR with the npm cache, JSR_URL). It runs
    // in an empty directory with --no-config, as a script elsewhere would; --reload for this
    // origin keeps Deno's module cache from serving files of an earlier run on the same port.
    const output = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--quiet",
        "--no-config",
        `--reload=${origin}/`,
        "--allow-net=127.0.0.1",
        `${origin}/_probe.ts`,
      ],
      cwd: scratch,
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).output();
    const stderr = new TextDecoder().decode(output.stderr);
    assertEquals(output.code, 0, stderr);
    const result = JSON.parse(new TextDecoder().decode(output.stdout));
    assertEquals(result.texts, samples.map((s) => s.greedy_text));
    assertEquals(result.hub, samples[0].greedy_text);
    assert(["wasm", "js", "webgpu"].includes(result.backend), result.backend);
    // Without read/write permission the hub cache is skipped, not prompted for or failed on.
    const created = await Deno.stat(cacheDir).then(() => true, () => false);
    assertEquals(created, false, "the cache directory was created without permission");
  } finally {
    await server.shutdown();
    await Deno.remove(scratch, { recursive: true });
  }
});
