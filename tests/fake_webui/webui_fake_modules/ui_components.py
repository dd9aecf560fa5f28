"""InputAccordion and ToolButton (§1.2): a checkbox holding the accordion's open/enabled state, a small button.

Also mirrors the WebUI's gradio patch that accepts `tooltip=` on every component.
"""

import gradio as gr

_original_init = gr.components.IOComponent.__init__
_original_block_init = gr.blocks.Block.__init__


def _block_init(self, *args, tooltip=None, **kwargs):
    _original_block_init(self, *args, **kwargs)
    self.webui_tooltip = tooltip


if not getattr(gr.blocks.Block, "_fake_tooltip", False):
    gr.blocks.Block.__init__ = _block_init
    gr.blocks.Block._fake_tooltip = True


class ToolButton(gr.Button):
    def __init__(self, value="", *args, **kwargs):
        super().__init__(value, *args, **kwargs)


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        self.label_text = kwargs.get("label", "")
        self.accordion = gr.Accordion(kwargs.get("label", ""), open=value)
        super().__init__(value, visible=False, **kwargs)  # the WebUI's hidden checkbox keeps the label too

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *args):
        self.accordion.__exit__(*args)
