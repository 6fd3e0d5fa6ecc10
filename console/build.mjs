// Builds the console into services/gateway/console/ (committed, embedded by the gateway with
// include_str!, so cargo build needs no node): console.js (src/main.js + Leaflet), console.css
// (Leaflet's + ours, its images inlined), index.html naming both with a content hash.
//
//   cd console && npm ci && node build.mjs
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import * as esbuild from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, '..', 'services', 'gateway', 'console');
mkdirSync(out, { recursive: true });

await esbuild.build({
  entryPoints: [join(here, 'src', 'main.js')],
  bundle: true,
  minify: true,
  format: 'iife',
  target: ['es2020'],
  outfile: join(out, 'console.js'),
  loader: { '.png': 'dataurl' },
  // Leaflet's BSD-2-Clause notice stays in the bundle.
  legalComments: 'eof',
  logLevel: 'warning',
});

const hash = (file) => createHash('sha256').update(readFileSync(join(out, file))).digest('hex').slice(0, 12);
const html = readFileSync(join(here, 'src', 'index.html'), 'utf8')
  .replace('__JS_HASH__', hash('console.js'))
  .replace('__CSS_HASH__', hash('console.css'));
writeFileSync(join(out, 'index.html'), html);

for (const file of ['index.html', 'console.js', 'console.css']) {
  const bytes = readFileSync(join(out, file));
  console.log(`${file}: ${bytes.length} bytes, ${gzipSync(bytes, { level: 9 }).length} gzipped`);
}
