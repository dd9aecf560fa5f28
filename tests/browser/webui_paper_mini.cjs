// Screenshot of txt2img in a running WebUI with the trained paper-mini models (tests/benchmarks/paper_mini, installed
// by `run.py assets`): the base checkpoint, the prompt "a cyan ring on a gray background", and GCFG with the base as
// prior and the rings concept UNet (the benchmark table's settings by default: DPM++ 2M, 15 steps, CFG 2.5, concept
// weight 2.5); generates a batch of 4 and shoots the settings beside the gallery.
//
//   NODE_PATH=<dir with playwright-core> node tests/browser/webui_paper_mini.cjs URL OUT.png [WEIGHT] [CFG] [STEPS]
// Env: CHROMIUM (default /usr/bin/chromium), TIMEOUT_MS (default 0: no limit). Setting width and height logs two page
// errors ("reading 'props'") from the WebUI 1.10.1's own dimension handlers, with or without this extension.
"use strict";

const { log, launch, fill, watchErrors, closeAndReport, runScript } = require("./tab_page.cjs");

const [url, out, weight = "2.5", cfg = "2.5", steps = "15"] = process.argv.slice(2);
const timeout = Number(process.env.TIMEOUT_MS || 0);

async function pick(page, selector, text) {
    await page.locator(`${selector} input`).first().click();
    const option = page.locator("ul.options li", { hasText: text }).first();
    await option.waitFor({ timeout });
    await option.click();
}

async function setNumber(page, elemId, value) {
    const box = page.locator(`#${elemId} input[type=number]`).first();
    await box.fill(String(value));
    await box.dispatchEvent("change");
}

runScript(async () => {
    const browser = await launch();
    const page = await browser.newPage({ viewport: { width: 1360, height: 1100 } });
    page.setDefaultTimeout(timeout);
    const errors = watchErrors(page);
    await page.goto(url);
    await page.locator("#txt2img_prompt textarea").first().waitFor({ timeout });
    await pick(page, "#setting_sd_model_checkpoint", "paper-mini-base");
    // the checkpoint switch finishes when the dropdown shows it and the WebUI is idle again
    await page.waitForTimeout(3000);
    await page.locator("#txt2img_prompt textarea").first().fill("a cyan ring on a gray background");
    await page.locator("#txt2img_prompt textarea").first().dispatchEvent("input");
    await setNumber(page, "txt2img_steps", steps);
    await pick(page, "#txt2img_sampling", "DPM++ 2M");
    await setNumber(page, "txt2img_width", 64);
    await setNumber(page, "txt2img_height", 64);
    await setNumber(page, "txt2img_batch_size", 4);
    await setNumber(page, "txt2img_cfg_scale", cfg);
    const accordion = page.locator("#script_txt2img_gcfg_enabled");
    await accordion.scrollIntoViewIfNeeded();
    await accordion.locator(".label-wrap").first().click();
    await accordion.locator("input[type=checkbox]").first().check();
    await pick(page, "#script_txt2img_gcfg_prior", "paper-mini-base");
    await pick(page, "#script_txt2img_gcfg_concept", "paper-mini-rings");
    await setNumber(page, "script_txt2img_gcfg_concept_weight", weight);
    await fill(page, "script_txt2img_gcfg_terms", "");
    await page.click("#txt2img_generate");
    const images = page.locator("#txt2img_gallery img");
    for (let tries = 0; (await images.count()) < 4; tries++) {
        if (tries > 600 && timeout > 0) throw new Error("no images in the gallery");
        await page.waitForTimeout(200);
    }
    await page.waitForTimeout(1500);
    const info = await page.locator("#html_info_txt2img").first().innerText();
    log("infotext:", info.replace(/\s+/g, " ").slice(0, 400));
    if (!info.includes("GCFG concept: paper-mini-rings")) throw new Error("the infotext has no GCFG concept");
    await page.locator("#txt2img_settings").first().evaluate((e) => e.scrollIntoView());
    await page.screenshot({ path: out, fullPage: false });
    log("screenshot:", out);
    await closeAndReport(browser, errors);
});
