// Module hooks that let the SDK and the example plugins load in plain node
// for unit tests: every `watchgate:plugin/NAME@0.1.0` import becomes a
// module whose functions call `globalThis.__watchgateHost[NAME]`, which the
// test fills with recording fakes. `@watchgate/sdk` resolves to this SDK,
// as build.mjs resolves it when bundling.

const FUNCTIONS = {
  log: ['log'],
  state: ['get', 'set'],
  settings: ['get'],
  files: ['append', 'replace', 'read', 'rename', 'remove'],
  http: ['send'],
  kv: ['put', 'delete'],
  snapshot: ['get', 'scan'],
  commands: ['run', 'trigger', 'signal'],
};

export async function resolve(specifier, context, next) {
  if (specifier === '@watchgate/sdk') {
    return { url: new URL('../src/index.js', import.meta.url).href, shortCircuit: true };
  }
  const m = /^watchgate:plugin\/([a-z]+)@0\.1\.0$/.exec(specifier);
  if (m === null || !(m[1] in FUNCTIONS)) return next(specifier, context);
  const iface = m[1];
  const code = FUNCTIONS[iface]
    .map((f) => `const _${f} = (...a) => globalThis.__watchgateHost[${JSON.stringify(iface)}][${JSON.stringify(f)}](...a);\nexport { _${f} as ${f} };`)
    .join('\n');
  return { url: `data:text/javascript,${encodeURIComponent(code)}`, shortCircuit: true };
}
