"""A small fake of the WebUI 1.10.1 `modules` package: only the APIs the GCFG glue uses.

Behaviour follows /work/shared/reference/webui-internals.md (paraphrased, nothing copied). Importable only when
a test puts `tests/fake_webui` on `sys.path` (the `fake_webui` fixture in tests/test_webui_*.py); the import hook of
tests/fake_hosts.py then finds it under the name `modules`.
"""
