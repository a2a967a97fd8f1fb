/**
 * What a dispatch costs the GPU by itself: 2,000 dispatches of a kernel that
 * updates one float per thread, timed with timestamp queries at the ends of
 * their compute pass, per dispatch; on one buffer, on two in turn, and each in
 * a compute pass of its own (as `profile: true` runs them). The adapter must
 * offer "timestamp-query".
 *
 * ```sh
 * deno run -A bench/gpu_dispatch_floor.ts
 * ```
 *
 * @module
 */

const adapter = await navigator.gpu.requestAdapter();
if (!adapter?.features.has("timestamp-query")) {
  throw new Error("This benchmark needs a WebGPU adapter with timestamp-query");
}
const device = await adapter.requestDevice({ requiredFeatures: ["timestamp-query"] });
const module = device.createShaderModule({
  code: `
@group(0) @binding(0) var<storage, read_write> buf: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3u) {
  buf[g.x] = buf[g.x] * 0.5 + 1.0;
}`,
});
const pipeline = device.createComputePipeline({
  layout: "auto",
  compute: { module, entryPoint: "main" },
});
const bindGroups = [0, 1].map(() =>
  device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [{
      binding: 0,
      resource: { buffer: device.createBuffer({ size: 4 << 20, usage: GPUBufferUsage.STORAGE }) },
    }],
  })
);
const querySet = device.createQuerySet({ type: "timestamp", count: 2 });
const resolved = device.createBuffer({
  size: 16,
  usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
});
const staging = device.createBuffer({
  size: 16,
  usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
});

type Layout = "one buffer" | "two buffers" | "a pass each";

/** GPU µs per dispatch of `count` dispatches of `groups` workgroups. */
async function perDispatch(count: number, groups: number, layout: Layout): Promise<number> {
  const encoder = device.createCommandEncoder();
  const dispatch = (pass: GPUComputePassEncoder, i: number) => {
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroups[layout === "two buffers" ? i % 2 : 0]);
    pass.dispatchWorkgroups(groups);
  };
  if (layout === "a pass each") {
    for (let i = 0; i < count; i++) {
      const timestampWrites: GPUComputePassTimestampWrites = { querySet };
      if (i === 0) timestampWrites.beginningOfPassWriteIndex = 0;
      if (i === count - 1) timestampWrites.endOfPassWriteIndex = 1;
      const pass = encoder.beginComputePass({ timestampWrites });
      dispatch(pass, i);
      pass.end();
    }
  } else {
    const pass = encoder.beginComputePass({
      timestampWrites: { querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 },
    });
    for (let i = 0; i < count; i++) dispatch(pass, i);
    pass.end();
  }
  encoder.resolveQuerySet(querySet, 0, 2, resolved, 0);
  encoder.copyBufferToBuffer(resolved, 0, staging, 0, 16);
  device.queue.submit([encoder.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const [begin, end] = new BigUint64Array(staging.getMappedRange());
  const ns = Number(end - begin);
  staging.unmap();
  return ns / 1000 / count;
}

console.log(`adapter: ${adapter.info.description || adapter.info.vendor}`);
for (const groups of [1, 384, 4096]) {
  for (const layout of ["one buffer", "two buffers", "a pass each"] as const) {
    await perDispatch(200, groups, layout); // warm-up
    const runs = [];
    for (let i = 0; i < 3; i++) runs.push((await perDispatch(2000, groups, layout)).toFixed(2));
    console.log(
      `${groups} workgroups of 64 threads, ${layout}: µs per dispatch ${runs.join(" / ")}`,
    );
  }
}
