"""sd-webui-gcfg engine: Generalized Classifier-free Guidance for SD 1.x, in pure torch.

Never imports the WebUI (`modules.*`) or gradio; `tests/test_import_boundaries.py` enforces it.
"""

__version__ = "0.1.0"
