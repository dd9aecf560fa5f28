// Drives the "GCFG Training" tab in headless Chromium (playwright-core): create a tiny job, watch its progress
// move, take a screenshot, cancel it through the confirm dialog.
//
//   NODE_PATH=<dir with playwright-core> node tests/browser/training_tab.cjs URL DATASET_DIR SCREENSHOT.png
// Env: CHROMIUM (default /usr/bin/chromium), JOB_NAME (default browser-test), TIMEOUT_MS (default 180000).
"use strict";

const { log, launch, fill, jobRow, waitForRow: waitFor } = require("./tab_page.cjs");

const [url, datasetDir, screenshot] = process.argv.slice(2);
const jobName = process.env.JOB_NAME || "browser-test";
// 0 = no limit (playwright's convention); the pytest runner passes its one backstop (tests/waiting.py).
const timeout = Number(process.env.TIMEOUT_MS || 0);

function waitForRowOf(page, predicate, what) {
    return waitFor(page, jobName, predicate, what, timeout);
}

(async () => {
    const browser = await launch();
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.setDefaultTimeout(timeout);  // every click, fill and navigation too (playwright's own 30 s)
    page.on("pageerror", (error) => log("page error:", error.message));
    const dialogs = [];
    page.on("dialog", async (dialog) => {
        dialogs.push(dialog.message());
        await dialog.accept();
    });
    await page.goto(url);
    await page.waitForSelector("#gcfg_train_jobs", { timeout });
    await page.waitForSelector(".gcfg-train-empty");

    // The form: a tiny job (16 images of 64 px, batch 4), previews every 4 steps.
    await fill(page, "gcfg_train_name", jobName);
    await fill(page, "gcfg_train_dataset_dir", datasetDir);
    await fill(page, "gcfg_train_resolution", 64);
    await fill(page, "gcfg_train_max_steps", 400);
    await fill(page, "gcfg_train_batch_size", 4);
    await fill(page, "gcfg_train_micro_batch_size", 2);
    await fill(page, "gcfg_train_checkpoint_every_steps", 4);
    await fill(page, "gcfg_train_preview_every_steps", 4);
    await page.locator("#gcfg_train_advanced").getByText("Advanced").first().click();
    await fill(page, "gcfg_train_min_image_size", 0);
    await fill(page, "gcfg_train_calibration_images", 4);
    await fill(page, "gcfg_train_preview_steps", 3);
    await fill(page, "gcfg_train_preview_seeds", "0, 1");
    await page.locator("#gcfg_train_advanced").getByText("Advanced").first().click();
    await page.click("#gcfg_train_start");
    await page.waitForSelector("#gcfg_train_form_message .gcfg-train-ok", { timeout });
    log("created:", await page.locator("#gcfg_train_form_message").first().innerText());

    // Progress moves without any click: the page polls by itself.
    const first = await waitForRowOf(page, (r) => r.state.startsWith("training") && r.step >= 1, "training");
    log("training:", first.text);
    const later = await waitForRowOf(page, (r) => r.step >= first.step + 4, "progress");
    log("progress:", later.text);
    await page.waitForSelector("#gcfg_train_preview img", { timeout });
    await page.waitForTimeout(2500); // one more poll: loss plot and log up to date
    await page.screenshot({ path: screenshot, fullPage: true });
    log("screenshot:", screenshot);

    // Cancel through the confirm dialog.
    await page.click("#gcfg_train_cancel");
    const cancelled = await waitForRowOf(page, (r) => r.state.startsWith("cancelled"), "cancelled");
    log("cancelled:", cancelled.text);
    if (!dialogs.some((m) => m.includes("Cancel training job"))) {
        throw new Error(`no confirm dialog before cancelling: ${JSON.stringify(dialogs)}`);
    }
    await page.screenshot({ path: screenshot.replace(/\.png$/, "-cancelled.png"), fullPage: true });
    await browser.close();
    log("OK");
})().catch((error) => {
    process.stderr.write(`FAILED: ${error.stack || error}\n`);
    process.exit(1);
});
