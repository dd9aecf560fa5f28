"""Script base class (webui-internals §1)."""

import os
from collections import namedtuple

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []


class OnComponent:
    def __init__(self, component):
        self.component = component


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    infotext_fields = None
    paste_field_names = None
    api_info = None

    def __init__(self):
        self.on_after_component_elem_id = []

    def title(self):
        raise NotImplementedError()

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        pass

    def on_after_component(self, callback, *, elem_id):
        self.on_after_component_elem_id.append((elem_id, callback))

    def elem_id(self, item_id):
        title = "".join(c for c in self.title().lower().replace(" ", "_") if c.isalnum() or c == "_")
        return f"script_{self.tabname or ''}{'_' if self.tabname else ''}{title}_{item_id}"


def basedir():
    return os.getcwd()
