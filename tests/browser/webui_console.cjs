// Loads a real WebUI's txt2img page in headless Chromium, logs in when WEBUI_AUTH=user:password is set (gradio's
// login form), fills the txt2img fields, opens the GCFG accordion (when there is one), generates one image, and
// prints every console error and uncaught page error with where it came from. Exit code 1 when there was any.
//
//   NODE_PATH=<dir with playwright-core> node tests/browser/webui_console.cjs URL [SCREENSHOT.png]
"use strict";

const { log, launch, watchErrors } = require("./tab_page.cjs");

const [url, screenshot] = process.argv.slice(2);
// 0 = no limit (playwright's convention); a runner passes its one backstop (tests/waiting.py) as TIMEOUT_MS.
const timeout = Number(process.env.TIMEOUT_MS || 0);

(async () => {
    const browser = await launch();
    const page = await browser.newPage({ viewport: { width: 1360, height: 1000 } });
    const errors = watchErrors(page);
    page.on("pageerror", (error) => log("page error stack:", (error.stack || "").split("\n").slice(0, 4).join(" | ")));
    if (process.env.DEBUG_REQUESTS) {
        page.on("request", (request) => {
            if (request.url().includes("/run/") || request.url().includes("/api/")) {
                log("request:", request.url(), (request.postData() || "").slice(0, 120));
            }
        });
        page.on("response", async (response) => {
            if (response.url().includes("/run/predict")) {
                const body = JSON.parse(response.request().postData() || "{}");
                const data = await response.json().catch(() => null);
                log("response:", body.fn_index, "values:", data && data.data ? data.data.length : "-");
            }
        });
        page.on("pageerror", () => log("--- page error here"));
    }
    await page.goto(url);
    if (process.env.WEBUI_AUTH) {
        const [user, password] = process.env.WEBUI_AUTH.split(/:(.*)/s);
        await page.locator("input").first().waitFor({ timeout });
        const inputs = page.locator("input");
        await inputs.nth(0).fill(user);
        await inputs.nth(1).fill(password);
        await page.getByRole("button", { name: /login/i }).click();
        await page.waitForSelector("#txt2img_prompt textarea", { timeout });
        errors.length = 0; // the login page's own 401s and its failed API lookup are gradio's, before any UI
        log("logged in as", user);
    }
    await page.waitForSelector("#txt2img_prompt textarea", { timeout });
    await page.waitForTimeout(3000); // onUiLoaded callbacks
    await page.fill("#txt2img_prompt textarea", "a photo of a cat");
    await page.fill("#txt2img_neg_prompt textarea", "blurry");
    for (const [id, value] of [["txt2img_steps", "3"], ["txt2img_width", "64"], ["txt2img_height", "64"]]) {
        const input = page.locator(`#${id} input[type=number]`).first();
        await input.fill(value);
        await input.dispatchEvent("change");
    }
    const accordion = page.locator("#script_txt2img_gcfg_enabled .label-wrap").first();
    if (await accordion.count()) {
        await accordion.click();
        log("GCFG accordion opened");
    }
    await page.waitForTimeout(1500);
    await page.click("#txt2img_generate");
    await page.waitForSelector("#txt2img_gallery img", { timeout });
    await page.waitForTimeout(2000);
    if (screenshot) {
        await page.screenshot({ path: screenshot });
    }
    await browser.close();
    log(`console and page errors: ${errors.length}`);
    errors.forEach((e) => log("  " + e));
    process.exit(errors.length ? 1 : 0);
})().catch((error) => {
    process.stderr.write(`FAILED: ${error.stack || error}\n`);
    process.exit(2);
});
