// Drives the "GCFG Training" tab in headless Chromium (playwright-core): the page logs no error, one-line values
// are one-line inputs, a tiny job trains, stops, resumes and completes while the status line under the buttons
// follows it, screenshots in the light and the dark theme, and the job is deleted through the confirm dialog.
//
//   NODE_PATH=<dir with playwright-core> node tests/browser/training_tab.cjs URL DATASET_DIR SCREENSHOT.png
// Env: CHROMIUM (default /usr/bin/chromium), JOB_NAME (default browser-test), TIMEOUT_MS (default 0: no limit).
"use strict";

const { log, launch, fill, waitForRow: waitFor, watchErrors, checkSingleLine, statusLine } = require("./tab_page.cjs");

const [url, datasetDir, screenshot] = process.argv.slice(2);
const jobName = process.env.JOB_NAME || "browser-test";
// 0 = no limit (playwright's convention); the pytest runner passes its one backstop (tests/waiting.py).
const timeout = Number(process.env.TIMEOUT_MS || 0);

function waitForRowOf(page, predicate, what) {
    return waitFor(page, jobName, predicate, what, timeout);
}

async function waitForStatus(page, state, what) {
    const deadline = Date.now() + timeout;
    let last = null;
    while (Date.now() < deadline) {
        last = await statusLine(page);
        if (last.state === state) {
            log(`${what}:`, last.text);
            return last;
        }
        await page.waitForTimeout(250);
    }
    throw new Error(`timed out waiting for the status line to say ${state}; it says: ${JSON.stringify(last)}`);
}

(async () => {
    const browser = await launch();
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.setDefaultTimeout(timeout);  // every click, fill and navigation too (playwright's own 30 s)
    const errors = watchErrors(page);
    const dialogs = [];
    page.on("dialog", async (dialog) => {
        dialogs.push(dialog.message());
        await dialog.accept();
    });
    await page.goto(url);
    await page.waitForSelector("#gcfg_train_jobs", { timeout });
    await page.waitForSelector(".gcfg-train-empty");
    await checkSingleLine(page, ["gcfg_train_name", "gcfg_train_dataset_dir"]);

    // The form: a tiny job (16 images of 64 px, batch 4, 60 steps: long enough that Stop lands mid-run on an idle
    // machine, where a step takes well under a second), previews every 10 steps.
    await fill(page, "gcfg_train_name", jobName);
    await fill(page, "gcfg_train_dataset_dir", datasetDir);
    await fill(page, "gcfg_train_resolution", 64);
    await fill(page, "gcfg_train_max_steps", 60);
    await fill(page, "gcfg_train_batch_size", 4);
    await fill(page, "gcfg_train_micro_batch_size", 2);
    await fill(page, "gcfg_train_checkpoint_every_steps", 3);
    await fill(page, "gcfg_train_preview_every_steps", 10);
    await page.locator("#gcfg_train_advanced").getByText("Advanced").first().click();
    await checkSingleLine(page, ["gcfg_train_preview_seeds", "gcfg_train_preview_sampler"]);
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
    const later = await waitForRowOf(page, (r) => r.step >= first.step + 3, "progress");
    log("progress:", later.text);
    await page.waitForSelector("#gcfg_train_preview img", { timeout });
    await page.waitForSelector("#gcfg_train_loss canvas, #gcfg_train_loss svg", { timeout });
    await page.waitForTimeout(2500); // one more poll: loss plot and log up to date
    await page.screenshot({ path: screenshot, fullPage: true });
    log("screenshot:", screenshot, "at step", later.step);

    // Stop, resume, complete: the line under the buttons follows the job to its end.
    await page.click("#gcfg_train_stop");
    await waitForRowOf(page, (r) => r.state.startsWith("stopped"), "stopped");
    await waitForStatus(page, "stopped", "status line after the stop");
    await page.click("#gcfg_train_resume");
    const queued = await statusLine(page);
    log("status line right after Resume:", queued.text);
    await waitForRowOf(page, (r) => r.state.startsWith("completed"), "completed");
    const done = await waitForStatus(page, "completed", "status line after completion");
    if (done.text.includes("queued to resume")) {
        throw new Error(`the status line still says the job is queued: ${done.text}`);
    }
    await page.waitForTimeout(2500);
    await page.screenshot({ path: screenshot.replace(/\.png$/, "-completed.png"), fullPage: true });

    // The dark theme (the WebUI's ?__theme=dark adds the class "dark"): same page, same job.
    await page.evaluate(() => document.body.classList.add("dark"));
    await page.waitForTimeout(1000);
    await page.screenshot({ path: screenshot.replace(/\.png$/, "-dark.png"), fullPage: true });
    await page.evaluate(() => document.body.classList.remove("dark"));

    // Delete through the confirm dialog.
    await page.click("#gcfg_train_delete");
    await page.waitForSelector(".gcfg-train-empty", { timeout });
    if (!dialogs.some((m) => m.includes("Delete training job"))) {
        throw new Error(`no confirm dialog before deleting: ${JSON.stringify(dialogs)}`);
    }
    await browser.close();
    if (errors.length) {
        throw new Error(`the page logged errors:\n${errors.join("\n")}`);
    }
    log("OK");
})().catch((error) => {
    process.stderr.write(`FAILED: ${error.stack || error}\n`);
    process.exit(1);
});
