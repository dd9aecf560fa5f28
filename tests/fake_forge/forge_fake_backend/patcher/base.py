"""`ModelPatcher`: a model with its devices and `model_options`; `clone()` deep-copies the options (Forge does)."""

import copy


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.current_device = offload_device if current_device is None else current_device
        self.size = size
        self.model_options = {"transformer_options": {}}

    def clone(self):
        clone = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        clone.model_options = copy.deepcopy(self.model_options)
        return clone

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape)

    def set_model_sampler_cfg_function(self, function, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []),
                                                          function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, function):
        self.model_options["model_function_wrapper"] = function
