// Open one page in headless Chromium and report what a person (and a test) needs to know about it:
// console errors, page errors, requests that left the allowed origin, broken images, the visible
// text, and optionally a screenshot and the value of an expression.
//
// usage: node check_page.mjs '{"url": "file:///...", "allow": ["http://127.0.0.1:8080"],
//                              "screenshot": "/tmp/x.png", "evaluate": "document.title",
//                              "steps": [{"click": "#confirm"}, {"wait": "text=adapted"}]}'
// Prints one JSON object on stdout.
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
});
const out = { console_errors: [], page_errors: [], external_requests: [], broken_images: [], failed_requests: [] };
try {
  const context = await browser.newContext({ viewport: spec.viewport || { width: 1280, height: 900 } });
  const page = await context.newPage();
  const allowed = (u) => u.startsWith("file:") || u.startsWith("data:") || u.startsWith("blob:") ||
    (spec.allow || []).some((a) => u.startsWith(a));
  await page.route("**/*", (route) => {
    const u = route.request().url();
    if (allowed(u)) return route.continue();
    out.external_requests.push(u);
    return route.abort();
  });
  page.on("console", (m) => { if (m.type() === "error") out.console_errors.push(m.text()); });
  page.on("pageerror", (e) => out.page_errors.push(String(e)));
  page.on("requestfailed", (r) => out.failed_requests.push(r.url()));
  await page.goto(spec.url, { waitUntil: "load", timeout: spec.timeout_ms || 30000 });
  for (const step of spec.steps || []) {
    if (step.click) await page.click(step.click);
    if (step.fill) await page.fill(step.fill[0], step.fill[1]);
    if (step.press) await page.keyboard.press(step.press);
    if (step.wait) await page.waitForSelector(step.wait, { timeout: step.timeout_ms || 30000 });
    if (step.sleep_ms) await page.waitForTimeout(step.sleep_ms);
  }
  out.broken_images = await page.$$eval("img", (imgs) =>
    imgs.filter((i) => !i.complete || i.naturalWidth === 0).map((i) => i.getAttribute("src")?.slice(0, 80) || ""));
  out.text = await page.evaluate(() => document.body.innerText);
  out.title = await page.title();
  if (spec.evaluate) out.value = await page.evaluate(spec.evaluate);
  if (spec.screenshot) await page.screenshot({ path: spec.screenshot, fullPage: spec.full_page !== false });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
