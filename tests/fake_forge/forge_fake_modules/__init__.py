"""Forge's `modules`, where they differ from WebUI 1.10's: its CFG denoiser (which calls
`backend.sampling.sampling_function`), its samplers and `sd_models`. Every other module comes from the fake
WebUI (`tests/fake_webui/webui_fake_modules`), appended to this package's path."""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "fake_webui", "webui_fake_modules"))
