// Holds REST exchanges to Discord's published API: the zod schemas of discord-api-spec (pinned in package.json).
// stdin: a JSON list of {where, schemas, value}, `schemas` naming the schemas of which the value must match one;
// stdout: a JSON list of the problems found, each a string.
import * as spec from "discord-api-spec/zod";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const problems = [];
for (const { where, schemas, value } of JSON.parse(Buffer.concat(chunks).toString())) {
  const unknown = schemas.filter((name) => !(name in spec));
  if (unknown.length) {
    problems.push(`${where}: the spec has no ${unknown.join(", ")}`);
    continue;
  }
  const failures = schemas.map((name) => spec[name].safeParse(value)).filter((result) => !result.success);
  if (failures.length === schemas.length) {
    const issues = failures[0].error.issues.slice(0, 8).map((issue) => `${issue.path.join(".")}: ${issue.message} (${issue.code})`);
    problems.push(`${where}: not a ${schemas.join(" or ")}: ${issues.join("; ")}`);
  }
}
process.stdout.write(JSON.stringify(problems));
