"""`shared.opts`, `cmd_opts`, `OptionInfo`, `sd_model` and `state` (webui-internals §6)."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section
        self.comment_after = comment_after

    def info(self, text):
        self.comment_after += text
        return self

    def needs_reload_ui(self):
        return self


class Options:
    _defaults = {"skip_early_cond": 0.0, "s_min_uncond_all": False, "batch_cond_uncond": True, "pad_cond_uncond": False,
                 "CLIP_stop_at_last_layers": 1}

    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        if item in self._defaults:
            return self._defaults[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()
cmd_opts = SimpleNamespace(api_auth=None, lowvram=False, medvram=False, no_half=True, api=True, nowebui=False,
                           gradio_auth=None, gradio_auth_path=None, listen=False, share=False, ngrok=None,
                           server_name=None)
state = SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
sd_model = None
