// Page helpers shared by the browser scripts of the "GCFG Training" tab (the fake-host test and the real-WebUI run).
"use strict";

const { chromium } = require("playwright-core");

function log(...args) {
    process.stdout.write(args.join(" ") + "\n");
}

function launch() {
    return chromium.launch({
        executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
        args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    });
}

async function fill(page, elemId, value) {
    const input = page.locator(`#${elemId} input, #${elemId} textarea`).first();
    await input.fill(String(value));
    await input.dispatchEvent("change");
}

// The job list row of `jobName`: state, step and the whole text, or null while the job is not listed.
async function jobRow(page, jobName) {
    const tr = page.locator(`#gcfg_train_jobs tr[data-job-id="${jobName}"]`);
    if (await tr.count() === 0) {
        return null;
    }
    const cells = await tr.locator("td").allInnerTexts();
    return { state: cells[1].trim(), step: Number(cells[3].split("/")[0]), text: cells.join(" | ") };
}

async function waitForRow(page, jobName, predicate, what, timeout) {
    const deadline = timeout > 0 ? Date.now() + timeout : Infinity;
    let last = null;
    while (Date.now() < deadline) {
        last = await jobRow(page, jobName);
        if (last !== null && predicate(last)) {
            log(`${what}:`, last.text);
            return last;
        }
        await page.waitForTimeout(250);
    }
    throw new Error(`timed out waiting for ${what}; last row: ${last && last.text}`);
}

module.exports = { log, launch, fill, jobRow, waitForRow };
