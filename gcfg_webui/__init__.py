"""WebUI glue for GCFG: the only package that imports the WebUI (`modules.*`) and gradio.

Shared by every host: `args` (script args → settings), `generation` (one generation's state, last-run),
`uncond_slot` (what the host's uncond rows hold, from the coefficients), `model_files` (checkpoint and concept
files, the side-model cache), `infotext`, `xyz`, `api` (REST routes), `settings`, `ui`, `decouple`, and the
training tab. `hosts` detects the host; its adapter package (`a1111`) holds the sampling hook and the side-model
loading.
"""
