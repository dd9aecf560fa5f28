"""Concept-UNet trainer (null-text SD 1.5 UNet, full fine-tune). Never imports the WebUI or gradio."""
