/**
 * Asking for permissions without prompting: optional features (a download
 * cache, environment variables, a quieter WebGPU start) use a permission only
 * where it is already granted.
 *
 * @module
 */

/**
 * Whether an optional feature may use a permission: true where it is granted,
 * or where the runtime has no permission API to ask (the call then simply
 * fails or succeeds). "prompt" counts as no, so optional features never
 * interrupt an interactive run with a permission prompt.
 */
export function mayUse(descriptor: Deno.PermissionDescriptor): boolean {
  if (typeof Deno === "undefined" || typeof Deno.permissions?.querySync !== "function") {
    return true;
  }
  try {
    return Deno.permissions.querySync(descriptor).state === "granted";
  } catch {
    return true; // A descriptor the runtime cannot query: let the call itself decide.
  }
}
