/**
 * The docs cannot drift from the code: every code snippet in docs/*.md is a file of its own,
 * byte for byte, and runs; every code link names a symbol its file really has; every image is
 * there.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');
const docs = join(root, 'docs');
const pages = readdirSync(docs).filter((f) => f.endsWith('.md'));

t.ok(pages.length > 0, 'there are docs');

for (const page of pages) {
  const text = readFileSync(join(docs, page), 'utf8');
  t.test(`${page}: snippets are their files`, async (t) => {
    const snippets = [...text.matchAll(/<!-- snippet: (\S+) -->\n```\w*\n([\s\S]*?)```/g)];
    for (const [, file, body] of snippets) {
      const path = join(root, file!);
      t.ok(existsSync(path), `${file} exists`);
      if (existsSync(path)) t.equal(body, readFileSync(path, 'utf8'), `the block above ${file} is the file, byte for byte`);
    }
    // A fenced TypeScript block without a snippet marker would be untested code.
    const fences = [...text.matchAll(/(?:<!-- snippet: \S+ -->\n)?```(ts|js|typescript|javascript)\n/g)];
    for (const f of fences) t.ok(f[0].startsWith('<!-- snippet:'), 'every TypeScript/JavaScript block is a tested snippet');
  });
  t.test(`${page}: code links name symbols their files have`, async (t) => {
    for (const m of text.matchAll(/\[`([^`]+)`\]\((\.\.\/[^)#]+)\)/g)) {
      const path = resolve(docs, m[2]!);
      t.ok(existsSync(path), `${m[2]} exists`);
      const name = m[1]!.replace(/\(.*$/, '').split('.').pop()!;
      if (existsSync(path) && /^[A-Za-z_]\w*$/.test(name)) {
        t.match(readFileSync(path, 'utf8'), new RegExp(`\\b${name}\\b`), `${name} is in ${m[2]}`);
      }
    }
    for (const m of text.matchAll(/!\[[^\]]*\]\(([^)]+)\)/g)) {
      const path = resolve(docs, m[1]!);
      t.ok(existsSync(path), `image ${m[1]} exists`);
      if (path.endsWith('.svg') && existsSync(path)) t.match(readFileSync(path, 'utf8'), /^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"[\s\S]*<\/svg>\s*$/, 'a whole SVG');
    }
  });
}

// The snippets that need only the host kernel run here (ublk ones run in the VM suite).
for (const file of readdirSync(join(docs, 'snippets')).filter((f) => f.startsWith('ring-'))) {
  t.test(`docs/snippets/${file} runs`, async (t) => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(docs, 'snippets', file)], { encoding: 'utf8', cwd: dirname(docs) });
    t.equal(r.status, 0, r.stderr);
  });
}
