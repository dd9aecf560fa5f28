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

// Every console error and uncaught page error, collected for a check at the end. Requests to other hosts (the
// theme's web fonts) are answered empty here: this machine has no network, and their failures are not the page's.
function watchErrors(page) {
    page.route(/^https?:\/\/(?!127\.0\.0\.1[:/]|localhost[:/])/, (route) => route.fulfill({ status: 200, body: "" }));
    const errors = [];
    page.on("console", (message) => {
        if (message.type() === "error") {
            errors.push(`console: ${message.text()}`);
        }
    });
    page.on("pageerror", (error) => errors.push(`page error: ${error.message}`));
    page.on("response", (response) => {
        if (response.status() >= 500) {
            errors.push(`HTTP ${response.status()}: ${response.request().method()} ${response.url()}`);
        }
    });
    return errors;
}

// One-line values must be <input> boxes, not resizable text areas.
async function checkSingleLine(page, elemIds) {
    for (const elemId of elemIds) {
        const inputs = await page.locator(`#${elemId} input[type="text"]`).count();
        const areas = await page.locator(`#${elemId} textarea`).count();
        if (inputs !== 1 || areas !== 0) {
            throw new Error(`#${elemId}: ${inputs} one-line input(s), ${areas} text area(s); want one input`);
        }
    }
    log("one-line inputs:", elemIds.join(", "));
}

// The line under the job buttons: {state, text} (state from its data-state attribute, "" when empty).
async function statusLine(page) {
    const box = page.locator("#gcfg_train_action_message [data-state]").first();
    if (await box.count() === 0) {
        return { state: "", text: (await page.locator("#gcfg_train_action_message").first().innerText()).trim() };
    }
    return { state: await box.getAttribute("data-state"), text: (await box.innerText()).trim() };
}

// Close the browser and list the errors `watchErrors` collected (they are reported, not fatal).
async function closeAndReport(browser, errors) {
    await browser.close();
    log(`console and page errors: ${errors.length}`);
    errors.forEach((e) => log("  " + e));
}

// Run a script's body; any failure prints FAILED with its stack and exits 1.
function runScript(body) {
    body().catch((error) => {
        process.stderr.write(`FAILED: ${error.stack || error}\n`);
        process.exit(1);
    });
}

module.exports = {
    log, launch, fill, jobRow, waitForRow, watchErrors, checkSingleLine, statusLine, closeAndReport, runScript,
};
