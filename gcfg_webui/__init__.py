"""WebUI glue for GCFG: the only package that imports the WebUI (`modules.*`) and gradio.

Small modules, one per host surface: `args` (script args → settings), `coefficients` (pure per-step weights),
`hook` (combine wrapper), `session` (per-generation/per-pass setup), `extra_models` (side UNets, cache),
`infotext`, `xyz`, `api` (REST routes), `settings`, `ui`, `decouple`.
"""
