"""`UnetPatcher`: the main model's patcher, with the extra patchers Forge loads beside it while sampling."""

import copy

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        clone = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        clone.model_options = copy.deepcopy(self.model_options)
        clone.controlnet_linked_list = self.controlnet_linked_list
        clone.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        clone.extra_concat_condition = self.extra_concat_condition
        return clone

    def add_extra_model_patcher_during_sampling(self, patcher):
        self.extra_model_patchers_during_sampling.append(patcher)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)
