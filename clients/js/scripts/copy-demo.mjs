// Copies the built module to the demo (src/demo/changecast.js), which the Rust binary
// embeds and serves at /changecast.js: the Rust build never needs npm.
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const built = readFileSync(join(here, '..', 'dist', 'changecast.js'), 'utf8');
const header =
  '// Generated from clients/js (dist/changecast.js); do not edit: run `npm run build` there.\n';
writeFileSync(join(here, '..', '..', '..', 'src', 'demo', 'changecast.js'), header + built);
