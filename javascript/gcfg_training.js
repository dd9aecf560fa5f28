// "GCFG Training" tab: polling, row selection, confirm dialogs and relative times; gradio 3 has none of these.
// Loaded by the WebUI into the page head (every extension's javascript/*.js). Globals are prefixed "gcfgTrain".

(function() {
    "use strict";

    const POLL_MS = 2000;
    const STORAGE_KEY = "gcfg_train_selected";
    let pendingSelection = null; // a clicked row, sent with the next poll
    let lastPoll = 0;

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function tabVisible() {
        const root = app().querySelector("#gcfg_train_jobs");
        // offsetParent is null while an ancestor (the inactive tab) has display: none
        return root !== null && root.offsetParent !== null && document.visibilityState === "visible";
    }

    function poll(force) {
        const now = Date.now();
        if (!force && (!tabVisible() || now - lastPoll < POLL_MS - 100)) {
            return;
        }
        const button = app().querySelector("#gcfg_train_poll");
        if (button !== null) {
            lastPoll = now;
            button.click();
        }
    }

    // Called by gradio before every poll: a clicked or remembered job replaces the selection the page holds.
    window.gcfgTrainPollArgs = function(selected, sent, followed) {
        let choice = pendingSelection;
        pendingSelection = null;
        if (choice === null && !selected) {
            choice = window.localStorage ? localStorage.getItem(STORAGE_KEY) : null;
        }
        if (choice !== null && choice !== undefined && choice !== "") {
            selected = choice;
        }
        if (selected && window.localStorage) {
            localStorage.setItem(STORAGE_KEY, selected);
        }
        return [selected, sent, followed];
    };

    // Called by gradio before an action: [selected job, confirmed, followed job]; cancel and delete ask first.
    window.gcfgTrainConfirm = function(action, selected, followed) {
        if (!selected) {
            return [selected, false, followed];
        }
        const questions = {
            cancel: `Cancel training job "${selected}"? It ends at once without saving a checkpoint and cannot be resumed.`,
            delete: `Delete training job "${selected}" and all its files (checkpoints, previews, log)? ` +
                "A published concept model is kept.",
        };
        const question = questions[action];
        return [selected, question === undefined ? true : window.confirm(question), followed];
    };

    function formatAge(iso) {
        const then = Date.parse(iso);
        if (Number.isNaN(then)) {
            return iso;
        }
        const seconds = Math.max(0, Math.round((Date.now() - then) / 1000));
        if (seconds < 60) {
            return `${seconds} s ago`;
        }
        if (seconds < 3600) {
            return `${Math.floor(seconds / 60)} min ago`;
        }
        return new Date(then).toLocaleString();
    }

    function refreshTimes() {
        app().querySelectorAll("#gcfg_train_detail [data-updated]").forEach(function(el) {
            el.textContent = "updated " + formatAge(el.dataset.updated);
        });
    }

    // Keep the log scrolled to its end when new lines arrive, unless the user scrolled up to read.
    let lastLog = "";
    let followEnd = true;
    function followLog() {
        const box = app().querySelector("#gcfg_train_log textarea");
        if (box === null) {
            return;
        }
        if (box.value !== lastLog) {
            lastLog = box.value;
            if (followEnd) {
                box.scrollTop = box.scrollHeight;
            }
        }
        followEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    }

    function onJobsClick(event) {
        const row = event.target.closest("tr[data-job-id]");
        if (row === null) {
            return;
        }
        pendingSelection = row.dataset.jobId;
        row.parentElement.querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
        row.classList.add("selected");
        poll(true);
    }

    function setup() {
        const jobs = app().querySelector("#gcfg_train_jobs");
        if (jobs === null || jobs.dataset.gcfgReady) {
            return jobs !== null;
        }
        jobs.dataset.gcfgReady = "1";
        jobs.addEventListener("click", onJobsClick);
        setInterval(function() {
            poll(false);
            refreshTimes();
            followLog();
        }, 1000);
        document.addEventListener("visibilitychange", () => poll(false));
        poll(true); // re-attach at once after a page reload
        return true;
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup);
    } else {
        // Outside the WebUI (the tab served on its own): wait for gradio to render.
        const timer = setInterval(() => setup() && clearInterval(timer), 200);
    }
})();
