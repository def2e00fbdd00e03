"""lmms-eval finds the model ``vtprune`` through this entry point (group ``lmms_eval.models`` in pyproject.toml).

Kept free of heavy imports: lmms-eval loads every plugin manifest when it builds its model registry.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vtprune", simple_class_path="vtprune.eval.lmms_model.VtpruneLMM")
