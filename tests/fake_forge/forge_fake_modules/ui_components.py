"""Forge's InputAccordion hands its keyword arguments to a gradio 4 Accordion, which refuses any it does not know
(`tooltip` among them); the rest is the fake WebUI's."""

from modules import _a1111

_base = _a1111.load("ui_components")
ToolButton = _base.ToolButton


class InputAccordion(_base.InputAccordion):
    def __init__(self, value, **kwargs):
        if "tooltip" in kwargs:
            raise TypeError("Accordion.__init__() got an unexpected keyword argument 'tooltip'")
        super().__init__(value, **kwargs)
