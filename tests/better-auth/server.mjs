// A Better Auth server for hatch's end-to-end tests: the real `better-auth`
// package with its API-key plugin on a SQLite file, served over plain HTTP.
//
//   node server.mjs --port PORT --db FILE
//
// It serves Better Auth's own HTTP API under /api/auth/ (sign-up, sign-in,
// api-key create/update/delete, ...) and, like the Hatch web app, a verify
// route at /api/auth/api-key/verify that answers POST {"key": KEY} with
// {"valid": BOOL, "userId": ID}.
//
// Test-only fault switch (not part of any real deployment): POST
// /__test/verify-mode {"mode": M} makes the verify route misbehave so the
// daemon's handling of a broken verifier can be tested: "normal", "garbage"
// (200 with a body that is not JSON), "status" (a 503 whose body still says
// valid), "hang" (never answers), "bad-user" (valid with a userId hatch must
// refuse), "huge" (a valid answer padded past any sane size), "redirect" (a
// 307 to a route that says valid).

import http from "node:http";
import { parseArgs } from "node:util";
import Database from "better-sqlite3";
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { apiKey } from "@better-auth/api-key";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "3000" },
    host: { type: "string", default: "127.0.0.1" },
    db: { type: "string" },
  },
});
if (!args.db) {
  console.error("usage: node server.mjs --port PORT --db FILE");
  process.exit(2);
}

const baseURL = `http://${args.host}:${args.port}`;
const auth = betterAuth({
  baseURL,
  // A fixed secret is fine for a throwaway test server on loopback.
  secret: "hatch-test-better-auth-secret-0123456789abcdef",
  database: new Database(args.db),
  emailAndPassword: { enabled: true, autoSignIn: true },
  telemetry: { enabled: false },
  plugins: [
    apiKey({
      // The plugin's default rate limit (10 verifications a day per key)
      // would refuse keys the tests use many times.
      rateLimit: { enabled: false },
    }),
  ],
});

const { runMigrations } = await getMigrations(auth.options);
await runMigrations();

const betterAuthHandler = toNodeHandler(auth);
let verifyMode = "normal";
const MODES = ["normal", "garbage", "status", "hang", "bad-user", "huge", "redirect"];

function readJson(req) {
  return new Promise((resolve) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (chunk) => {
      body += chunk;
      if (body.length > 65536) req.destroy();
    });
    req.on("end", () => {
      try {
        resolve(JSON.parse(body));
      } catch {
        resolve(null);
      }
    });
  });
}

function sendJson(res, status, value) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(value));
}

// What the Hatch web app's route does: Better Auth's server-side verifyApiKey,
// and the key's owner (its referenceId, the user id) when it is valid.
async function verify(req, res) {
  const body = await readJson(req);
  const key = body?.key;
  if (typeof key !== "string" || key === "") {
    return sendJson(res, 400, { valid: false, error: "missing key" });
  }
  switch (verifyMode) {
    case "garbage":
      res.writeHead(200, { "content-type": "application/json" });
      return res.end("<html>this is not json</html>");
    case "status":
      return sendJson(res, 503, { valid: true, userId: "someone" });
    case "hang":
      return; // never answers; the daemon's timeout must end the wait
    case "bad-user":
      return sendJson(res, 200, { valid: true, userId: "../../etc/passwd\n" });
    case "huge":
      return sendJson(res, 200, { valid: true, userId: "padded", pad: "x".repeat(1 << 20) });
    case "redirect":
      res.writeHead(307, { location: "/__test/always-valid" });
      return res.end();
  }
  try {
    const result = await auth.api.verifyApiKey({ body: { key } });
    const userId = result.valid ? (result.key?.referenceId ?? "") : "";
    return sendJson(res, 200, { valid: result.valid, userId });
  } catch {
    return sendJson(res, 200, { valid: false });
  }
}

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, baseURL).pathname;
  try {
    if (req.method === "POST" && path === "/api/auth/api-key/verify") {
      return await verify(req, res);
    }
    if (req.method === "POST" && path === "/__test/verify-mode") {
      const mode = (await readJson(req))?.mode;
      if (!MODES.includes(mode)) return sendJson(res, 400, { error: `mode must be one of ${MODES}` });
      verifyMode = mode;
      return sendJson(res, 200, { mode });
    }
    if (req.method === "POST" && path === "/__test/always-valid") {
      return sendJson(res, 200, { valid: true, userId: "redirected" });
    }
    if (req.method === "GET" && path === "/__test/health") {
      return sendJson(res, 200, { ok: true });
    }
    if (path.startsWith("/api/auth/")) {
      return await betterAuthHandler(req, res);
    }
    sendJson(res, 404, { error: "not found" });
  } catch (e) {
    console.error(e);
    if (!res.headersSent) sendJson(res, 500, { error: String(e?.message ?? e) });
  }
});

server.listen(Number(args.port), args.host, () => {
  console.log(`better-auth test server on ${baseURL}`);
});
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => process.exit(0));
}
