"""The file MLflow runs to build a registered segmenter (its "models from code" entry point).

``mlflow.pyfunc.log_model(python_model=<this file>)`` stores the file beside the bundle instead of a
cloudpickle of the model object, so loading a registered segmenter unpickles nothing: MLflow
executes these lines, which import :class:`~seg_pipeline.tracking.pyfunc.SegmenterModel` from the
installed package.
"""

from mlflow.models import set_model

from seg_pipeline.tracking.pyfunc import SegmenterModel

set_model(SegmenterModel())
