// Holds REST exchanges to Discord's published API: the zod schemas of discord-api-spec (pinned in package.json).
// One process serves a whole test session: each line on stdin is a JSON list of {where, schemas, value},
// `schemas` naming the schemas of which the value must match one; each answer on stdout is one line, a JSON
// list of the problems found, each a string.
import * as readline from "node:readline";
import * as spec from "discord-api-spec/zod";

function problems(checks) {
  const found = [];
  for (const { where, schemas, value } of checks) {
    const unknown = schemas.filter((name) => !(name in spec));
    if (unknown.length) {
      found.push(`${where}: the spec has no ${unknown.join(", ")}`);
      continue;
    }
    const failures = schemas.map((name) => spec[name].safeParse(value)).filter((result) => !result.success);
    if (failures.length === schemas.length) {
      const issues = failures[0].error.issues.slice(0, 8).map((issue) => `${issue.path.join(".")}: ${issue.message} (${issue.code})`);
      found.push(`${where}: not a ${schemas.join(" or ")}: ${issues.join("; ")}`);
    }
  }
  return found;
}

for await (const line of readline.createInterface({ input: process.stdin })) {
  process.stdout.write(JSON.stringify(problems(JSON.parse(line))) + "\n");
}
