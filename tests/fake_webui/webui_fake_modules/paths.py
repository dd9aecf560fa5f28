import os
import tempfile

models_path = os.environ.get("FAKE_WEBUI_MODELS", os.path.join(tempfile.gettempdir(), "fake-webui-models"))
