// End-to-end run of the "GCFG Training" tab in a real WebUI (headless Chromium, playwright-core): start a tiny job,
// watch progress, stop it, resume it to completion (the status line under the buttons follows it), find its
// concept model in txt2img's GCFG accordion, then the same views in the dark theme. One-line values must be
// one-line inputs; console and page errors are listed at the end (the WebUI's own ones included: compare with a
// WebUI without the extension, tests/browser/webui_console.cjs).
//
//   NODE_PATH=<dir with playwright-core> node tests/browser/webui_training_tab.cjs URL DATASET_DIR OUT_DIR
// Env: CHROMIUM (default /usr/bin/chromium), JOB_NAME (default faces-tiny), MAX_STEPS (default 40),
//      TIMEOUT_MS (default 0: no limit). Writes OUT_DIR/training-tab{,-stopped,-completed,-dark}.png and txt2img-concept{,-dark}.png.
"use strict";

const path = require("path");
const { log, launch, fill, waitForRow: waitFor, watchErrors, checkSingleLine, statusLine } = require("./tab_page.cjs");

const [url, datasetDir, outDir] = process.argv.slice(2);
const jobName = process.env.JOB_NAME || "faces-tiny";
const maxSteps = Number(process.env.MAX_STEPS || 40);
// 0 = no limit (playwright's convention); the pytest runner passes its one backstop (tests/waiting.py).
const timeout = Number(process.env.TIMEOUT_MS || 0);

async function shot(page, name, selector) {
    const file = path.join(outDir, name);
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.locator(selector).first().screenshot({ path: file });
    log("screenshot:", file);
}

function waitForRowOf(page, predicate, what) {
    return waitFor(page, jobName, predicate, what, timeout);
}

(async () => {
    const browser = await launch();
    const page = await browser.newPage({ viewport: { width: 1360, height: 1080 } });
    page.setDefaultTimeout(timeout);  // every click, fill and navigation too (playwright's own 30 s)
    const errors = watchErrors(page);
    page.on("dialog", (dialog) => dialog.accept());
    await page.goto(url);
    await page.waitForSelector("#tab_gcfg_training", { state: "attached", timeout });
    await page.getByRole("button", { name: "GCFG Training", exact: true }).click();
    await page.waitForSelector("#gcfg_train_jobs");
    await checkSingleLine(page, ["gcfg_train_name", "gcfg_train_dataset_dir"]);
    log("device:", await page.locator("#gcfg_train_device input").first().inputValue());

    await fill(page, "gcfg_train_name", jobName);
    await fill(page, "gcfg_train_dataset_dir", datasetDir);
    await fill(page, "gcfg_train_resolution", 64);
    await fill(page, "gcfg_train_max_steps", maxSteps);
    await fill(page, "gcfg_train_batch_size", 4);
    await fill(page, "gcfg_train_micro_batch_size", 2);
    await fill(page, "gcfg_train_checkpoint_every_steps", 8);
    await fill(page, "gcfg_train_preview_every_steps", 8);
    await fill(page, "gcfg_train_preview_prompts", "a photo");
    const advanced = page.locator("#gcfg_train_advanced").getByText("Advanced").first();
    await advanced.click();
    await fill(page, "gcfg_train_min_image_size", 0);
    await fill(page, "gcfg_train_calibration_images", 4);
    await fill(page, "gcfg_train_preview_steps", 3);
    await fill(page, "gcfg_train_preview_seeds", "0, 1, 2");
    await advanced.click();
    await page.click("#gcfg_train_start");
    await page.waitForSelector("#gcfg_train_form_message .gcfg-train-ok", { timeout });

    // start, progress
    const first = await waitForRowOf(page, (r) => r.state.startsWith("training") && r.step >= 1, "training");
    await waitForRowOf(page, (r) => r.step >= Math.max(first.step + 6, 9), "progress");
    await page.waitForSelector("#gcfg_train_preview img", { timeout });
    await page.waitForTimeout(2500);
    await shot(page, "training-tab.png", "#tab_gcfg_training");

    // stop (keeps a checkpoint), resume
    await page.click("#gcfg_train_stop");
    const stopped = await waitForRowOf(page, (r) => r.state.startsWith("stopped"), "stopped");
    await page.waitForTimeout(2500);
    await shot(page, "training-tab-stopped.png", "#tab_gcfg_training");
    await page.click("#gcfg_train_resume");
    await waitForRowOf(page, (r) => r.state.startsWith("training") && r.step > stopped.step, "resumed");
    await waitForRowOf(page, (r) => r.state.startsWith("completed"), "completed");
    await page.waitForTimeout(3000);
    const line = await statusLine(page);
    log("status line:", line.state, "|", line.text);
    if (line.state !== "completed") {
        throw new Error(`the status line did not follow the job to completion: ${JSON.stringify(line)}`);
    }
    await shot(page, "training-tab-completed.png", "#tab_gcfg_training");

    // the concept model in txt2img's GCFG accordion
    await page.getByRole("button", { name: "txt2img", exact: true }).click();
    const accordion = page.locator("#script_txt2img_gcfg_enabled");
    await accordion.scrollIntoViewIfNeeded();
    await accordion.locator(".label-wrap").first().click();
    await page.click("#script_txt2img_gcfg_concept_refresh");
    await page.waitForTimeout(1500);
    const concept = page.locator("#script_txt2img_gcfg_concept input").first();
    await concept.click();
    const option = page.locator("ul.options li", { hasText: `${jobName}.safetensors` }).first();
    await option.waitFor({ timeout });
    await option.click();
    await page.waitForTimeout(500);
    const value = await concept.inputValue();
    if (!value.includes(jobName)) {
        throw new Error(`concept dropdown shows ${value}`);
    }
    log("concept selected:", value);
    await shot(page, "txt2img-concept.png", "#script_txt2img_gcfg_enabled");

    // the dark theme: the finished job (the page remembers the selection) and the accordion
    const dark = await browser.newPage({ viewport: { width: 1360, height: 1080 } });
    const darkErrors = watchErrors(dark);
    await dark.goto(url + (url.includes("?") ? "&" : "?") + "__theme=dark");
    await dark.waitForSelector("#tab_gcfg_training", { state: "attached", timeout });
    await dark.getByRole("button", { name: "GCFG Training", exact: true }).click();
    await dark.waitForSelector(`#gcfg_train_jobs tr[data-job-id="${jobName}"]`, { timeout });
    await dark.locator(`#gcfg_train_jobs tr[data-job-id="${jobName}"]`).click();
    await dark.waitForSelector("#gcfg_train_loss canvas, #gcfg_train_loss svg", { timeout });
    await dark.waitForTimeout(3000);
    await shot(dark, "training-tab-dark.png", "#tab_gcfg_training");
    await dark.getByRole("button", { name: "txt2img", exact: true }).click();
    const darkAccordion = dark.locator("#script_txt2img_gcfg_enabled");
    await darkAccordion.scrollIntoViewIfNeeded();
    await darkAccordion.locator(".label-wrap").first().click();
    await dark.waitForTimeout(1000);
    await shot(dark, "txt2img-concept-dark.png", "#script_txt2img_gcfg_enabled");
    await browser.close();
    const all = [...errors, ...darkErrors];
    log(`console and page errors: ${all.length}`);
    all.forEach((e) => log("  " + e));
    log("OK");
})().catch((error) => {
    process.stderr.write(`FAILED: ${error.stack || error}\n`);
    process.exit(1);
});
