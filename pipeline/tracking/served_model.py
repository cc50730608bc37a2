"""MLflow models-from-code entry point: `log_pyfunc_model` logs this script, MLflow runs it to build the model.

Nothing is pickled: loading the model runs this file with the logged `code/` (the
`pipeline` and `features` packages) on the path, so the model loads in any environment
that installed its `requirements.txt`.
"""
import mlflow

from pipeline.tracking.pyfunc import MethodPyfunc

mlflow.models.set_model(MethodPyfunc())
