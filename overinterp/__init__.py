"""overinterp: find out whether an image classifier overinterprets its inputs.

Science modules (data, models, selection, training, store, report) import neither Ray nor MLflow;
orchestration lives in overinterp.pipeline and jobs/.
"""

__version__ = "0.1.0"
