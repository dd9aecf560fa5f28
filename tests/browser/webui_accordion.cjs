// Screenshot of txt2img's GCFG accordion in a running host (A1111 or Forge; headless Chromium, playwright-core):
// opens the accordion, checks "Decouple prompt" on the real page (the prompt's later parts become terms weighted by
// the CFG scale), picks the prior and writes two extra terms, then shoots the accordion alone.
//
//   NODE_PATH=<dir with playwright-core> node tests/browser/webui_accordion.cjs URL OUT.png [PRIOR]
// Env: CHROMIUM (default /usr/bin/chromium), TIMEOUT_MS (default 0: no limit).
"use strict";

const { log, launch, fill, watchErrors, closeAndReport, runScript } = require("./tab_page.cjs");

const [url, out, prior] = process.argv.slice(2);
const timeout = Number(process.env.TIMEOUT_MS || 0);

runScript(async () => {
    const browser = await launch();
    const page = await browser.newPage({ viewport: { width: 1360, height: 1200 } });
    page.setDefaultTimeout(timeout);
    const errors = watchErrors(page);
    await page.goto(url);
    const accordion = page.locator("#script_txt2img_gcfg_enabled");
    await accordion.waitFor({ state: "attached", timeout });
    await accordion.scrollIntoViewIfNeeded();
    await accordion.locator(".label-wrap").first().click();
    if (prior) {
        const box = page.locator("#script_txt2img_gcfg_prior input").first();
        await box.click();
        const option = page.locator("ul.options li", { hasText: prior }).first();
        await option.waitFor({ timeout });
        await option.click();
    }
    const prompt = page.locator("#txt2img_prompt textarea").first();
    await prompt.fill("a cat, red hat, in the snow");
    await prompt.dispatchEvent("input");
    const cfg = await page.locator("#txt2img_cfg_scale input[type=number]").first().inputValue();
    await page.click("#script_txt2img_gcfg_decouple");
    const terms = page.locator("#script_txt2img_gcfg_terms textarea").first();
    const expected = `+${Number(cfg)} red hat\n+${Number(cfg)} in the snow`;
    for (let tries = 0; (await terms.inputValue()) !== expected; tries++) {
        if (tries > 100 && timeout > 0) throw new Error(`decouple gave ${JSON.stringify(await terms.inputValue())}`);
        await page.waitForTimeout(100);
    }
    if ((await prompt.inputValue()) !== "a cat") {
        throw new Error(`decouple left the prompt ${JSON.stringify(await prompt.inputValue())}`);
    }
    log("decouple:", JSON.stringify(await terms.inputValue()));
    await prompt.fill("a cat");
    await fill(page, "script_txt2img_gcfg_terms", "+2 a dog\n-1 {0-0.5} blurry");
    await page.waitForTimeout(1500);
    await accordion.screenshot({ path: out });
    log("screenshot:", out);
    await closeAndReport(browser, errors);
});
