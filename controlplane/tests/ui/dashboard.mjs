// Drives the admin dashboard in headless Chromium (Debian `chromium`) through playwright-core:
// a wrong token gets 401 (one no header can carry a message), the right one signs in, a route
// added through the API appears, the req/s number moves under load in two tabs over one live
// stream, a rollback (confirmed) takes the route away again, and a double-clicked sign-in
// leaves nothing running after the sign-out.
// Screenshots go to SHOTS_DIR. Run by tests/it/dashboard.rs:
//   node dashboard.mjs ADMIN_URL TOKEN DATA_URL SHOTS_DIR
import { chromium } from "playwright-core";

const [admin, token, data, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // gw.test: the admin API at a name that is not loopback's, which makes no secure context.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--host-resolver-rules=MAP gw.test 127.0.0.1"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 1100 } });
const page = await context.newPage();
// Every request the dashboard's tabs make, by path: [tab, path, Authorization].
const requests = [];
function watch(p, tab) {
  p.on("request", (r) => requests.push([tab, new URL(r.url()).pathname, r.headers()["authorization"] || ""]));
}
watch(page, 1);
// Script errors (uncaught exceptions), not the browser's notes about non-2xx answers (the
// wrong token's 401 is one on purpose).
const consoleErrors = [];
page.on("pageerror", (e) => consoleErrors.push(e.message));
let step = "start";

async function fail(message) {
  try { await page.screenshot({ path: shots + "/failure.png", fullPage: true }); } catch (e) { /* best effort */ }
  console.error("FAIL at " + step + ": " + message);
  await browser.close();
  process.exit(1);
}

async function adminApi(method, path, body) {
  const res = await fetch(admin + path, {
    method,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return res;
}

try {
  step = "a wrong token gets 401";
  await page.goto(admin + "/ui");
  await page.fill("#token", "not-the-token-0123456789");
  await page.click("#login-form button[type=submit]");
  await page.waitForFunction(() => document.getElementById("login-error").textContent.includes("401"), null, { timeout: 10000 });
  if (await page.isVisible("#app")) await fail("the dashboard opened with a wrong token");
  await page.screenshot({ path: shots + "/01-wrong-token.png" });

  step = "a token no header can carry gets a message";
  await page.fill("#token", "t\u00f6ken-0123456789abcdef");
  await page.click("#login-form button[type=submit]");
  await page.waitForFunction(() => document.getElementById("login-error").textContent.includes("cannot be sent"), null, { timeout: 10000 });

  step = "sign in";
  await page.fill("#token", token);
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector("#app", { state: "visible", timeout: 10000 });
  await page.waitForSelector('#routes tr[data-route="hello"]', { timeout: 10000 });
  if (page.url().includes(token)) await fail("the token is in the URL");
  const kept = await page.evaluate(() => sessionStorage.getItem("gw-token"));
  if (kept !== token) await fail("the token is not kept in the session");

  step = "an upstream's backup target is marked";
  await page.waitForFunction(() => {
    const lines = [...document.querySelectorAll("#upstreams td div")].map((d) => d.textContent);
    return lines.some((l) => l.startsWith("127.0.0.1:9 ") && !l.includes("backup"))
      && lines.some((l) => l.startsWith("127.0.0.1:10 ") && l.endsWith(" backup"));
  }, null, { timeout: 10000 });

  step = "a route added through the API appears";
  const put = await adminApi("PUT", "/v1/routes/added-by-test", { path: "/added", redirect: { path: "/new", status: 308 } });
  if (put.status !== 201) await fail("PUT answered " + put.status);
  await page.waitForSelector('#routes tr[data-route="added-by-test"]', { timeout: 15000 });
  const action = await page.textContent('#routes tr[data-route="added-by-test"] td:nth-child(3)');
  if (action !== "redirect 308 /new") await fail("the added route's action reads " + JSON.stringify(action));
  const moved = await fetch(data + "/added", { redirect: "manual" });
  if (moved.status !== 308) await fail("/added answered " + moved.status + ", not its redirect");
  await page.screenshot({ path: shots + "/02-route-added.png", fullPage: true });

  step = "a second tab signs in";
  const page2 = await context.newPage();
  watch(page2, 2);
  page2.on("pageerror", (e) => consoleErrors.push("tab 2: " + e.message));
  await page2.goto(admin + "/ui");
  await page2.fill("#token", token);
  await page2.click("#login-form button[type=submit]");
  await page2.waitForSelector("#app", { state: "visible", timeout: 10000 });

  step = "req/s moves under load";
  let loading = true;
  const load = (async () => {
    let n = 0;
    while (loading) {
      await Promise.all(Array.from({ length: 8 }, () => fetch(data + "/").then((r) => r.text())));
      n += 8;
    }
    return n;
  })();
  await page.waitForFunction(() => parseFloat(document.getElementById("live-rps").textContent) > 20, null, { timeout: 20000 });
  await page.waitForFunction(() => {
    const row = document.querySelector('#routes tr[data-route="hello"] td.num');
    return row && parseFloat(row.textContent) > 20;
  }, null, { timeout: 10000 });
  const rps = await page.textContent("#live-rps");
  step = "the second tab shows it too, over the first tab's stream";
  await page2.waitForFunction(() => parseFloat(document.getElementById("live-rps").textContent) > 20, null, { timeout: 20000 });
  const streams = requests.filter(([, path]) => path === "/v1/stream");
  if (streams.length !== 1) await fail("live streams opened: " + JSON.stringify(streams.map(([tab]) => tab)));
  await page.waitForTimeout(3000);
  await page.screenshot({ path: shots + "/03-live-under-load.png", fullPage: true });
  loading = false;
  const sent = await load;
  console.log("load: " + sent + " requests; the dashboard showed " + rps + " req/s");

  step = "roll back to revision 1 (confirmed)";
  page.on("dialog", (d) => d.accept());
  await page.waitForSelector('#revisions tr[data-revision="1"] button.rollback', { timeout: 10000 });
  await page.click('#revisions tr[data-revision="1"] button.rollback');
  await page.waitForFunction(() => document.getElementById("rollback-result").textContent.includes("rolled back to 1"), null, { timeout: 10000 });
  await page.waitForSelector('#routes tr[data-route="added-by-test"]', { state: "detached", timeout: 15000 });
  const gone = await fetch(data + "/added");
  if (gone.status !== 404) await fail("/added still answers " + gone.status + " after the rollback");

  step = "diff between two revisions";
  await page.selectOption("#diff-a", "1");
  await page.selectOption("#diff-b", "2");
  await page.click("#diff-show");
  await page.waitForFunction(() => document.getElementById("diff").textContent.includes("+ routes/added-by-test"), null, { timeout: 10000 });
  await page.screenshot({ path: shots + "/04-rolled-back.png", fullPage: true });

  step = "the access log's last lines";
  await page.waitForFunction(() => document.getElementById("log").textContent.includes("\"route\":\"hello\""), null, { timeout: 15000 });

  await page.screenshot({ path: shots + "/05-overview.png", fullPage: true });

  step = "a double-clicked sign-in leaves nothing running after the sign-out";
  await page2.click("#signout");
  await page2.waitForSelector("#login", { state: "visible", timeout: 10000 });
  await page2.fill("#token", token);
  await page2.evaluate(() => {
    const form = document.getElementById("login-form");
    form.requestSubmit();
    form.requestSubmit();
  });
  await page2.waitForSelector("#app", { state: "visible", timeout: 10000 });
  await page2.waitForTimeout(1000);
  await page2.click("#signout");
  const signedOut = requests.length;
  await page2.waitForTimeout(6000);
  const after = requests.slice(signedOut).filter(([tab]) => tab === 2);
  if (after.length) await fail("requests after the sign-out: " + JSON.stringify(after));
  const said = await page2.textContent("#login-error");
  if (said) await fail("the sign-out says " + JSON.stringify(said));

  step = "without a secure context each tab has its own stream, and its own ticks only";
  const insecure = await browser.newContext();
  const tabs = [];
  for (let i = 0; i < 2; i++) {
    const t = await insecure.newPage();
    t.on("pageerror", (e) => consoleErrors.push("insecure tab: " + e.message));
    await t.goto(admin.replace("127.0.0.1", "gw.test") + "/ui");
    await t.fill("#token", token);
    await t.click("#login-form button[type=submit]");
    await t.waitForSelector("#app", { state: "visible", timeout: 10000 });
    await t.evaluate(() => { window.ticksSeen = 0; const on = onTick; onTick = (x) => { window.ticksSeen++; on(x); }; });
    tabs.push(t);
  }
  if (await tabs[0].evaluate(() => window.isSecureContext)) await fail("gw.test is a secure context");
  await tabs[0].waitForTimeout(5000);
  for (const t of tabs) {
    const seen = await t.evaluate(() => window.ticksSeen);
    if (seen < 3 || seen > 7) await fail("a tab had " + seen + " ticks in 5 s");
  }

  if (consoleErrors.length) await fail("script errors: " + consoleErrors.join(" | "));
} catch (e) {
  await fail(e.message);
}
await browser.close();
console.log("ok");
