#!/usr/bin/env node
// Build a JavaScript watchgate plugin into a component.
//
// Usage: node plugin-sdk/js/build.mjs PLUGIN_DIR OUT.wasm
//
// PLUGIN_DIR holds a package.json whose `main` (default `src/index.js`)
// default-exports the plugin, and whose `name`, `version`, `description`
// and `watchgate.capabilities` / `watchgate.subscribe` become the manifest.
// The module is bundled with its imports (`@watchgate/sdk` is this SDK),
// componentized against plugin-sdk/wit with the WASI features the host does
// not link turned off, and the manifest is appended as the
// `watchgate-manifest` custom section.

import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { componentize } from '@bytecodealliance/componentize-js';
import { rolldown } from 'rolldown';

const sdkDir = dirname(fileURLToPath(import.meta.url));
const witDir = resolve(sdkDir, '..', 'wit');
const sdkEntry = join(sdkDir, 'src', 'index.js');

// The host links every wasi:*@0.2 interface except wasi:http (see
// gateway/src/runtime.rs); componentize-js would import wasi:http for
// `fetch` and the incoming-handler event, so those two are turned off.
// stdio stays on: with it a thrown error is printed instead of trapping
// silently, and console.log reaches the gateway log.
const DISABLED_FEATURES = ['http', 'fetch-event'];

// Interfaces the host links: its own, and the wasi:*@0.2 that
// wasmtime_wasi::p2::add_to_linker_sync adds. Anything else would fail to
// instantiate, so the build refuses it with the interface's name.
const LINKED = [/^watchgate:plugin\//, /^wasi:(io|clocks|cli|filesystem|random|sockets)\//];

/** The interfaces a component imports, read back with `jco wit`. */
function componentImports(wasmPath) {
  const wit = execFileSync(join(sdkDir, 'node_modules', '.bin', 'jco'), ['wit', wasmPath], {
    encoding: 'utf8',
    maxBuffer: 16 << 20,
  });
  return [...wit.matchAll(/^\s*import ([^;]+);/gm)].map((m) => m[1].trim());
}

const CAPABILITIES = new Set(['files', 'http', 'kv', 'snapshot', 'commands']);
const MANIFEST_SECTION = 'watchgate-manifest';

function fail(message) {
  console.error(`build.mjs: ${message}`);
  process.exit(1);
}

function tomlString(text) {
  return JSON.stringify(String(text)).replace(/\u007f/g, '\\u007f');
}

/** The manifest TOML for a plugin's package.json, checked like the host would. */
export function manifestToml(pkg) {
  const extra = pkg.watchgate ?? {};
  const unknown = Object.keys(extra).filter((k) => k !== 'capabilities' && k !== 'subscribe');
  if (unknown.length > 0) fail(`package.json "watchgate" has unknown keys: ${unknown.join(', ')}`);
  const lines = [];
  if (pkg.name !== undefined) lines.push(`name = ${tomlString(pkg.name.replace(/^@[^/]+\//, ''))}`);
  if (pkg.version !== undefined) lines.push(`version = ${tomlString(pkg.version)}`);
  if (pkg.description !== undefined) lines.push(`description = ${tomlString(pkg.description)}`);
  const caps = extra.capabilities ?? [];
  for (const c of caps) {
    if (!CAPABILITIES.has(c)) fail(`unknown capability ${JSON.stringify(c)} (known: ${[...CAPABILITIES].join(', ')})`);
  }
  lines.push(`capabilities = [${caps.map(tomlString).join(', ')}]`);
  for (const sub of extra.subscribe ?? []) {
    if (typeof sub.source !== 'string') fail('each "watchgate.subscribe" entry needs a "source" string');
    lines.push('', '[[subscribe]]', `source = ${tomlString(sub.source)}`);
    if (sub.prefix !== undefined) lines.push(`prefix = ${tomlString(sub.prefix)}`);
  }
  return lines.join('\n') + '\n';
}

function leb128(n) {
  const out = [];
  do {
    let byte = n & 0x7f;
    n >>>= 7;
    if (n !== 0) byte |= 0x80;
    out.push(byte);
  } while (n !== 0);
  return out;
}

/** `wasm` with a custom section `name` holding `data` appended at the top level. */
export function appendCustomSection(wasm, name, data) {
  const nameBytes = Buffer.from(name, 'utf8');
  const body = Buffer.concat([Buffer.from(leb128(nameBytes.length)), nameBytes, data]);
  return Buffer.concat([wasm, Buffer.from([0x00, ...leb128(body.length)]), body]);
}

async function main() {
  const [pluginArg, outArg] = process.argv.slice(2);
  if (!pluginArg || !outArg) fail('usage: node plugin-sdk/js/build.mjs PLUGIN_DIR OUT.wasm');
  const pluginDir = resolve(pluginArg);
  const out = resolve(outArg);
  const pkg = JSON.parse(await readFile(join(pluginDir, 'package.json'), 'utf8'));
  const main = resolve(pluginDir, pkg.main ?? 'src/index.js');
  if (!existsSync(main)) fail(`${main} does not exist (package.json "main")`);
  const manifest = manifestToml(pkg);

  const work = await mkdtemp(join(tmpdir(), 'watchgate-js-'));
  try {
    const entry = join(work, 'entry.js');
    await writeFile(
      entry,
      [
        `import plugin from ${JSON.stringify(pathToFileURL(main).pathname)};`,
        `import { exportsFor } from ${JSON.stringify(pathToFileURL(sdkEntry).pathname)};`,
        'const exported = exportsFor(plugin);',
        'export const handle = exported.handle;',
        'export const handleBatch = exported.handleBatch;',
        '',
      ].join('\n'),
    );
    const bundle = await rolldown({
      input: entry,
      cwd: pluginDir,
      external: [/^watchgate:/, /^wasi:/],
      resolve: { alias: { '@watchgate/sdk': sdkEntry } },
      logLevel: 'warn',
    });
    const bundled = join(work, 'plugin.js');
    await bundle.write({ file: bundled, format: 'esm', codeSplitting: false });
    await bundle.close();

    const { component } = await componentize({
      sourcePath: bundled,
      witPath: witDir,
      worldName: 'plugin',
      disableFeatures: DISABLED_FEATURES,
    });
    const wasm = appendCustomSection(Buffer.from(component), MANIFEST_SECTION, Buffer.from(manifest, 'utf8'));
    const built = join(work, 'plugin.wasm');
    await writeFile(built, wasm);
    const imports = componentImports(built);
    if (!imports.some((i) => i.startsWith('watchgate:plugin/'))) fail(`could not read the imports of the component: ${imports.join(', ')}`);
    const unlinked = imports.filter((i) => !LINKED.some((re) => re.test(i)));
    if (unlinked.length > 0) fail(`the component imports what the host does not link: ${unlinked.join(', ')}`);
    await writeFile(out, wasm);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main();
}
